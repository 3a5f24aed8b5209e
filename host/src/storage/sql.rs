//! The wallet in SQL, written once for every engine (SQLite, PostgreSQL).
//!
//! An engine supplies connections and transactions ([`Engine`]); everything
//! the ledger and registry do is here, in SQL both engines run alike, so the
//! two backends cannot drift apart in what they promise.
//!
//! The rules an engine must keep:
//! - a write transaction ([`Engine::transaction`]) holds the wallet's one
//!   write lock from its first statement to its commit, so writes are
//!   serial (SQLite: `BEGIN IMMEDIATE`; PostgreSQL: a transaction-scoped
//!   advisory lock, which orders the writes of every daemon on the
//!   database), and returns only once its commit is durable;
//! - a read ([`Engine::begin_read`]) sees one consistent snapshot and never
//!   waits for the writer.
//!
//! Policies run outside the write lock, against a read snapshot; each
//! history query they make is recorded with its answer. Under the lock the
//! queries run again: if every answer is the same, the decision commits (it
//! is the one the policies would make now); if not, they run again. After
//! [`OPTIMISTIC_ATTEMPTS`] the evaluation happens under the lock, which
//! always completes. A deny commits without the check: it moves no money.
//! So a slow or hostile policy holds the lock only while its own agent's
//! proposals keep conflicting, and a faulting one never does.

mod mandates;
pub(crate) mod registry;
mod value;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde_json::json;

pub(crate) use value::args;
pub use value::{Arg, FromValue, Row, Value};

use super::{
    AUDIT_GENESIS, Actor, AuditBreak, AuditRecord, AuthorizationOutcome, CardIssuance, CardRecord, Decided,
    DepositRecord, NewSpend, Proposed, SpendRecord, SpendStatus, Storage, StorageError, Verdict, audit_hash,
    new_id, new_ordered_id, verify_chain,
};
use crate::audit::{AuditHead, AuditKey, Checkpoint};
use crate::cards::{
    AuthorizationRequest, CardKey, CardRequest, CardState, CardView, DeclineCode, IssuedCard, MAX_WRONG_CVV,
    decide,
};
use crate::history::{History, HistoryError, HistoryScope};
use crate::ledger::{AccountKind, Balance, TransferKind};
use crate::money::{self, Amount};
use crate::policy::{CardTerms, Merchant, SpendFilter, SpendSummary};

/// A connection, inside a transaction the engine opened. SQL is written
/// with `?N` placeholders; an engine that numbers them otherwise rewrites.
pub trait Conn {
    /// Every row `sql` returns.
    fn rows(&self, sql: &str, args: &[Arg<'_>]) -> Result<Vec<Row>, StorageError>;
    /// Run a statement; how many rows it changed.
    fn execute(&self, sql: &str, args: &[Arg<'_>]) -> Result<u64, StorageError>;

    /// The first row, if any.
    fn row(&self, sql: &str, args: &[Arg<'_>]) -> Result<Option<Row>, StorageError> {
        Ok(self.rows(sql, args)?.into_iter().next())
    }

    /// The first row; none is an error.
    fn one(&self, sql: &str, args: &[Arg<'_>]) -> Result<Row, StorageError> {
        self.row(sql, args)?.ok_or_else(|| StorageError::Database(format!("no row from `{}`", sql.trim())))
    }

    /// The key the audit records written on this connection are MAC'd
    /// under (`None`: plain SHA-256, a store without one). Only a store's
    /// own write transactions know it ([`Audited`]); anywhere else an audit
    /// record cannot be written.
    fn audit_key(&self) -> Result<Option<&AuditKey>, StorageError> {
        Err(StorageError::Invariant("an audit record written outside a store's write transaction".into()))
    }
}

/// A connection inside one of the store's write transactions, with the key
/// of the audit chain.
struct Audited<'a> {
    conn: &'a dyn Conn,
    key: Option<&'a AuditKey>,
}

impl Conn for Audited<'_> {
    fn rows(&self, sql: &str, args: &[Arg<'_>]) -> Result<Vec<Row>, StorageError> {
        self.conn.rows(sql, args)
    }

    fn execute(&self, sql: &str, args: &[Arg<'_>]) -> Result<u64, StorageError> {
        self.conn.execute(sql, args)
    }

    fn audit_key(&self) -> Result<Option<&AuditKey>, StorageError> {
        Ok(self.key)
    }
}

/// A write transaction's body that owns what it needs, for [`Engine::submit`].
pub type WriteJob<C, T> = Box<dyn FnOnce(&mut Lender<C>) -> Result<Ending<T>, StorageError> + Send>;

/// Where the answer to a submitted write arrives; closed without an answer
/// only if the write was lost (the writer thread gone, or a bug's panic).
pub type Answer<T> = tokio::sync::oneshot::Receiver<Result<T, StorageError>>;

/// How a write transaction ends.
#[derive(Debug)]
pub enum Ending<T> {
    Commit(T),
    /// Nothing to write (a replay): roll back, answer with this.
    Rollback(T),
}

/// What a database engine provides to [`SqlStore`].
pub trait Engine: Send + Sync + 'static {
    type Conn: Conn + Send + 'static;

    /// See [`Backend::quick_reads`](super::Backend::quick_reads).
    const QUICK_READS: bool;

    /// A connection inside a read transaction on one consistent snapshot,
    /// taken without waiting for any writer.
    fn begin_read(&self) -> Result<Self::Conn, StorageError>;

    /// End a read transaction; the connection may be kept for the next.
    fn end_read(&self, conn: Self::Conn);

    /// Whether [`Engine::submit`] queues a write for a thread of its own
    /// (then an async caller may await the answer instead of holding a
    /// thread); otherwise it runs the write on the caller's thread.
    const QUEUED_WRITES: bool;

    /// Run `body` as [`Engine::transaction`] does, answering through the
    /// channel once the commit is durable. By default on the caller's
    /// thread, before returning.
    fn submit<T: Send + 'static>(&self, body: WriteJob<Self::Conn, T>) -> Answer<T> {
        let (answer, answered) = tokio::sync::oneshot::channel();
        let _ = answer.send(self.transaction(body));
        answered
    }

    /// Run a write job on this thread or, when the engine has a writer
    /// thread, wherever makes it durable soonest; return once it is.
    fn run<T: Send + 'static>(&self, body: WriteJob<Self::Conn, T>) -> Result<T, StorageError> {
        self.transaction(body)
    }

    /// Run `body` in one write transaction holding the wallet's write lock
    /// from its first statement; commit on [`Ending::Commit`] (returning
    /// only once the commit is durable), roll back on anything else. If the
    /// connection was not given back (`body` panicked while it was lent),
    /// the transaction is abandoned, which rolls it back.
    fn transaction<T>(
        &self,
        body: impl FnOnce(&mut Lender<Self::Conn>) -> Result<Ending<T>, StorageError>,
    ) -> Result<T, StorageError>;
}

/// How many times a proposal's policies are evaluated outside the write
/// lock before the host gives up on optimism and evaluates under it. An
/// evaluation whose history changed before its commit is thrown away; under
/// the lock nothing can change, so the last attempt always completes.
pub const OPTIMISTIC_ATTEMPTS: usize = 3;

/// How far behind the last sweep's mark each expiry sweep looks again, for
/// daemons whose clocks disagree (a card issued by a daemon whose clock is
/// behind may expire before another daemon's mark).
pub const SWEEP_OVERLAP: Duration = Duration::from_secs(3600);

/// The reason of an approval the wallet cannot cover.
pub const INSUFFICIENT_FUNDS: &str = "insufficient funds";

/// How many times a card is drawn again when its PAN is already taken. One
/// test BIN leaves 10^9 numbers, so a collision is rare but real.
const PAN_ATTEMPTS: usize = 8;

/// Open holds that lapsed in `(?1, ?2]`: a range of `holds_expiry`.
pub(crate) const EXPIRY_DUE_SQL: &str = "SELECT h.id, h.currency, h.units FROM holds h
     LEFT JOIN hold_resolutions r ON r.hold_id = h.id
     WHERE h.expires_at_ms > ?1 AND h.expires_at_ms <= ?2 AND r.hold_id IS NULL";

pub(crate) fn ms(value: u64) -> Result<i64, StorageError> {
    i64::try_from(value).map_err(|_| StorageError::InvalidState(format!("time {value} ms is out of range")))
}

pub(crate) fn from_ms(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn amount(units: i64, currency: &str) -> Result<Amount, StorageError> {
    Amount::from_units(units, currency).map_err(|e| StorageError::Invariant(format!("stored amount: {e}")))
}

/// A connection inside a transaction, which may be lent to the policies'
/// history for the time of their evaluation.
pub struct Lender<C> {
    conn: Option<C>,
}

impl<C> std::fmt::Debug for Lender<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lender").field("lent", &self.conn.is_none()).finish()
    }
}

impl<C: Conn + Send + 'static> Lender<C> {
    pub fn new(conn: C) -> Self {
        Lender { conn: Some(conn) }
    }

    /// The connection back, unless it was lost while lent.
    pub fn into_inner(mut self) -> Option<C> {
        self.conn.take()
    }

    /// The connection back with what the transaction's body returned; if
    /// the connection was lost while lent (the transaction abandoned, so
    /// rolled back), the body's error, or an error saying so.
    pub fn reclaim<T>(
        self,
        result: Result<T, StorageError>,
    ) -> Result<(C, Result<T, StorageError>), StorageError> {
        match self.into_inner() {
            Some(conn) => Ok((conn, result)),
            None => Err(result
                .err()
                .unwrap_or_else(|| StorageError::Invariant("the transaction's connection was lost".into()))),
        }
    }

    pub fn conn(&self) -> Result<&C, StorageError> {
        self.conn
            .as_ref()
            .ok_or_else(|| StorageError::Invariant("the transaction's connection was lost".into()))
    }

    /// Lend the connection, inside its transaction, to `f` as a history;
    /// take it back when `f` returns, with the queries `f` made.
    fn lend<R>(
        &mut self,
        f: impl FnOnce(Arc<dyn History>) -> R,
    ) -> Result<(R, Vec<HistoryRead>), StorageError> {
        let history = Arc::new(LentHistory { conn: Mutex::new(self.conn.take()), reads: Mutex::default() });
        let result = f(history.clone());
        // Taken back even should a policy's host state still hold the
        // history: later queries through it find no connection.
        self.conn = history.conn.lock().unwrap_or_else(|p| p.into_inner()).take();
        let reads = std::mem::take(&mut *history.reads.lock().unwrap_or_else(|p| p.into_inner()));
        self.conn()?;
        Ok((result, reads))
    }
}

/// A history query a policy made, with the answer it got.
type HistoryRead = (HistoryScope, SpendFilter, SpendSummary);

/// The policies' view of history during one evaluation: a connection inside
/// a transaction (a read snapshot, or the write-locked transaction that will
/// commit the decision), and a record of what was asked.
struct LentHistory<C> {
    conn: Mutex<Option<C>>,
    reads: Mutex<Vec<HistoryRead>>,
}

impl<C: Conn + Send> History for LentHistory<C> {
    fn summarize(&self, scope: &HistoryScope, filter: &SpendFilter) -> Result<SpendSummary, HistoryError> {
        let guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let conn = guard.as_ref().ok_or_else(|| HistoryError("the evaluation has ended".into()))?;
        let answer = summarize(conn, scope, filter).map_err(|e| HistoryError(e.to_string()))?;
        self.reads.lock().unwrap_or_else(|p| p.into_inner()).push((scope.clone(), filter.clone(), answer));
        Ok(answer)
    }
}

/// Whether every history query of an evaluation still has the answer it
/// had. Policies are deterministic (same request, config and answers, same
/// decision), so if so, evaluating again now would decide the same: the
/// decision may commit as if it had been made under this lock.
fn still_true(conn: &dyn Conn, reads: &[HistoryRead]) -> Result<bool, StorageError> {
    for (scope, filter, answer) in reads {
        if summarize(conn, scope, filter)? != *answer {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Whether a decision made on a snapshot may commit now: a deny always (it
/// moves no money, and stands as of its snapshot); anything else only if
/// every history query it made still has the same answer.
fn stands(conn: &dyn Conn, decided: &Decided, reads: &[HistoryRead]) -> Result<bool, StorageError> {
    Ok(matches!(decided.verdict, Verdict::Deny(_)) || still_true(conn, reads)?)
}

/// The wallet on one SQL engine: the [`Storage`] and
/// [`Registry`](super::Registry) of both backends.
pub struct SqlStore<E> {
    pub(crate) engine: E,
    /// The audit chain's key, once the data directory gave it.
    audit_key: OnceLock<Arc<AuditKey>>,
}

impl<E: std::fmt::Debug> std::fmt::Debug for SqlStore<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.engine.fmt(f)
    }
}

impl<E: Engine> SqlStore<E> {
    pub(crate) fn new(engine: E) -> Self {
        SqlStore { engine, audit_key: OnceLock::new() }
    }

    /// See [`Backend::set_audit_key`](super::Backend::set_audit_key).
    pub(crate) fn set_audit_key(&self, key: Arc<AuditKey>) -> Result<(), StorageError> {
        let fingerprint = key.fingerprint();
        let set = self.audit_key.get_or_init(|| key);
        if set.fingerprint() != fingerprint {
            return Err(StorageError::Invariant("the store already has another audit key".into()));
        }
        Ok(())
    }

    fn key(&self) -> Option<Arc<AuditKey>> {
        self.audit_key.get().cloned()
    }

    /// Run `f` on one read snapshot.
    pub(crate) fn read<T>(
        &self,
        f: impl FnOnce(&dyn Conn) -> Result<T, StorageError>,
    ) -> Result<T, StorageError> {
        let conn = self.engine.begin_read()?;
        let result = f(&conn);
        self.engine.end_read(conn);
        result
    }

    /// Run `f` in one write transaction; it commits when `f` succeeds.
    pub(crate) fn write<T>(
        &self,
        f: impl FnOnce(&dyn Conn) -> Result<T, StorageError>,
    ) -> Result<T, StorageError> {
        let key = self.audit_key.get().map(Arc::as_ref);
        self.engine.transaction(|lender| f(&Audited { conn: lender.conn()?, key }).map(Ending::Commit))
    }

    /// [`Storage::authorize`] queued on the engine's writer thread when it
    /// has one ([`Engine::QUEUED_WRITES`]): the answer arrives, once
    /// durable, on the channel. Without one, the request is handed back.
    pub(crate) fn authorize_queued(
        &self,
        request: AuthorizationRequest,
        key: Arc<CardKey>,
        actor: Actor,
        now_ms: u64,
    ) -> Result<Answer<AuthorizationOutcome>, Box<AuthorizationRequest>> {
        if !E::QUEUED_WRITES {
            return Err(Box::new(request));
        }
        let audit_key = self.key();
        Ok(self.engine.submit(Box::new(move |lender| {
            let tx = Audited { conn: lender.conn()?, key: audit_key.as_deref() };
            authorize(&tx, &request, &key, &actor, now_ms).map(Ending::Commit)
        })))
    }

    /// Decide on a snapshot and commit if the decision still stands; after
    /// [`OPTIMISTIC_ATTEMPTS`] conflicts, decide under the write lock.
    /// `check` runs first on the snapshot and again first in the write
    /// transaction: it may answer without deciding (a replay), refuse, or
    /// hand `decide` and `commit` what they work on. `check` and `commit`
    /// own what they use: the optimistic commit is a [`WriteJob`] for
    /// [`Engine::run`] (on SQLite, queued for the writer thread while other
    /// writes are under way).
    fn decide_and_commit<S, T: Send + 'static>(
        &self,
        check: impl Fn(&dyn Conn) -> Result<Result<S, T>, StorageError> + Clone + Send + 'static,
        decide: &mut dyn FnMut(&S, Arc<dyn History>) -> Decided,
        commit: impl Fn(&dyn Conn, &S, Decided) -> Result<T, StorageError> + Clone + Send + 'static,
    ) -> Result<T, StorageError> {
        for _ in 0..OPTIMISTIC_ATTEMPTS {
            // Outside the write lock, on one snapshot: what the policies
            // decide, and every history query they made with its answer.
            let mut lender = Lender::new(self.engine.begin_read()?);
            let evaluated = match check(lender.conn()?) {
                Ok(Ok(subject)) => lender.lend(|history| decide(&subject, history)).map(Ok),
                Ok(Err(answer)) => Ok(Err(answer)),
                Err(e) => Err(e),
            };
            if let Some(conn) = lender.into_inner() {
                self.engine.end_read(conn);
            }
            let (decided, reads) = match evaluated? {
                Ok(evaluation) => evaluation,
                Err(answer) => return Ok(answer),
            };
            let (check, commit, audit_key) = (check.clone(), commit.clone(), self.key());
            let committed = self.engine.run(Box::new(move |lender| {
                let tx = &Audited { conn: lender.conn()?, key: audit_key.as_deref() };
                let subject = match check(tx)? {
                    Ok(subject) => subject,
                    Err(answer) => return Ok(Ending::Rollback(Some(answer))),
                };
                if !stands(tx, &decided, &reads)? {
                    return Ok(Ending::Rollback(None));
                }
                commit(tx, &subject, decided).map(|done| Ending::Commit(Some(done)))
            }))?;
            if let Some(done) = committed {
                return Ok(done);
            }
        }
        // Contended: evaluate under the write lock, where nothing can change.
        let key = self.audit_key.get().map(Arc::as_ref);
        self.engine.transaction(|lender| {
            let subject = match check(&Audited { conn: lender.conn()?, key })? {
                Ok(subject) => subject,
                Err(answer) => return Ok(Ending::Rollback(answer)),
            };
            let (decided, _) = lender.lend(|history| decide(&subject, history))?;
            commit(&Audited { conn: lender.conn()?, key }, &subject, decided).map(Ending::Commit)
        })
    }
}

/// Committed spend: captured amounts plus the holds of cards still open.
fn summarize(
    conn: &dyn Conn,
    scope: &HistoryScope,
    filter: &SpendFilter,
) -> Result<SpendSummary, StorageError> {
    let since = ms(filter.since_ms)?;
    let (sql, args) = summarize_query(scope, filter, &since);
    let row = conn.one(&sql, &args)?;
    let (total, count): (i64, i64) = (row.get(0)?, row.get(1)?);
    Ok(SpendSummary { total_units: total, count: u32::try_from(count).unwrap_or(u32::MAX) })
}

// The history rule (`spendguard_types::history::Query::counts`, which the
// fixed histories use) written again as SQL: the ledger is summed in the
// database, under the write lock, not read row by row into Rust. The two must
// say the same: currency, `since_ms`, merchant, category, mandate, this agent
// unless wallet-wide.
/// The history query for one filter shape, built so that it is one range
/// scan of `holds_agent_time` (or `holds_wallet_time` when wallet-wide): its
/// cost follows the spends in the window, not the size of the ledger.
pub(crate) fn summarize_query<'a>(
    scope: &'a HistoryScope,
    filter: &'a SpendFilter,
    since: &'a i64,
) -> (String, Vec<Arg<'a>>) {
    let mut sql = String::from(
        "SELECT CAST(COALESCE(SUM(CASE WHEN r.hold_id IS NULL THEN h.units ELSE r.captured_units END), 0) AS BIGINT),
                COUNT(CASE WHEN r.hold_id IS NULL OR r.kind = 'captured' THEN 1 END)
         FROM holds h LEFT JOIN hold_resolutions r ON r.hold_id = h.id
         WHERE h.currency = ?1 AND h.received_at_ms >= ?2",
    );
    let mut args = vec![Arg::Text(&scope.currency), Arg::Int(*since)];
    if !filter.wallet_wide {
        args.push(Arg::Text(&scope.agent_id));
        sql.push_str(&format!(" AND h.agent_id = ?{}", args.len()));
    }
    if let Some(merchant) = &filter.merchant_id {
        args.push(Arg::Text(merchant));
        sql.push_str(&format!(" AND h.merchant_id = ?{}", args.len()));
    }
    if let Some(mcc) = &filter.mcc {
        args.push(Arg::Text(mcc));
        sql.push_str(&format!(" AND h.mcc = ?{}", args.len()));
    }
    // Only the spends made under one mandate: found by `spends_mandate`.
    if let Some(mandate_id) = &filter.mandate_id {
        args.push(Arg::Text(mandate_id));
        sql.push_str(&format!(
            " AND h.spend_id IN (SELECT id FROM spends WHERE mandate_id = ?{})",
            args.len()
        ));
    }
    (sql, args)
}

fn account_id(conn: &dyn Conn, currency: &str, kind: AccountKind) -> Result<Option<i64>, StorageError> {
    conn.row("SELECT id FROM accounts WHERE currency = ?1 AND kind = ?2", args![currency, kind.as_str()])?
        .map(|r| r.get(0))
        .transpose()
}

fn ensure_accounts(conn: &dyn Conn, currency: &str) -> Result<(), StorageError> {
    for kind in AccountKind::ALL {
        conn.execute(
            "INSERT INTO accounts (currency, kind) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
            args![currency, kind.as_str()],
        )?;
    }
    Ok(())
}

pub(crate) const BALANCE_SQL: &str =
    "SELECT balance_after FROM entries WHERE account_id = ?1 ORDER BY id DESC LIMIT 1";

fn balance_of(conn: &dyn Conn, account: i64) -> Result<i64, StorageError> {
    conn.row(BALANCE_SQL, args![account])?.map_or(Ok(0), |r| r.get(0))
}

fn balance(conn: &dyn Conn, currency: &str, kind: AccountKind) -> Result<i64, StorageError> {
    match account_id(conn, currency, kind)? {
        Some(id) => balance_of(conn, id),
        None => Ok(0),
    }
}

/// Post one transfer: a transfer row and its two entries. Refuses to take
/// any account but `funding` below zero.
fn transfer(
    conn: &dyn Conn,
    kind: TransferKind,
    currency: &str,
    units: i64,
    hold_id: Option<i64>,
    now_ms: i64,
) -> Result<i64, StorageError> {
    let (debit_kind, credit_kind) = kind.accounts();
    let missing = || StorageError::Invariant(format!("no {currency} accounts"));
    let debit = account_id(conn, currency, debit_kind)?.ok_or_else(missing)?;
    let credit = account_id(conn, currency, credit_kind)?.ok_or_else(missing)?;
    let overflow = || StorageError::Invariant("balance overflow".into());
    let debit_after = balance_of(conn, debit)?.checked_sub(units).ok_or_else(overflow)?;
    let credit_after = balance_of(conn, credit)?.checked_add(units).ok_or_else(overflow)?;
    if debit_kind != AccountKind::Funding && debit_after < 0 {
        return Err(StorageError::Invariant(format!(
            "{} {currency} would go below zero",
            debit_kind.as_str()
        )));
    }
    let transfer_id: i64 = conn
        .one(
            "INSERT INTO transfers (kind, currency, units, debit_account, credit_account, hold_id, created_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) RETURNING id",
            args![kind.as_str(), currency, units, debit, credit, hold_id, now_ms],
        )?
        .get(0)?;
    conn.execute(
        "INSERT INTO entries (transfer_id, account_id, delta, balance_after) VALUES (?1, ?2, ?3, ?4), (?1, ?5, ?6, ?7)",
        args![transfer_id, debit, -units, debit_after, credit, units, credit_after],
    )?;
    Ok(transfer_id)
}

/// Resolve a hold exactly once: the primary key of `hold_resolutions` makes
/// a second resolution fail, whatever raced.
pub(crate) fn resolve_hold(
    conn: &dyn Conn,
    hold_id: i64,
    kind: &str,
    currency: &str,
    cap_units: i64,
    captured_units: i64,
    now_ms: i64,
) -> Result<(), StorageError> {
    let inserted = conn.execute(
        "INSERT INTO hold_resolutions (hold_id, kind, captured_units, resolved_at_ms) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT DO NOTHING",
        args![hold_id, kind, captured_units, now_ms],
    )?;
    if inserted != 1 {
        return Err(StorageError::InvalidState(format!("hold {hold_id} is already resolved")));
    }
    if captured_units > 0 {
        transfer(conn, TransferKind::Capture, currency, captured_units, Some(hold_id), now_ms)?;
    }
    let rest = cap_units - captured_units;
    if rest > 0 {
        transfer(conn, TransferKind::Release, currency, rest, Some(hold_id), now_ms)?;
    }
    Ok(())
}

pub(crate) const CARD_COLUMNS: &str =
    "c.id, c.spend_id, c.agent_id, c.issuer, c.last4, c.exp_month, c.exp_year, c.cap_units,
     c.currency, c.merchant_id, c.expires_at_ms, c.hold_id, c.cvv_hash, r.kind, r.captured_units";

/// A card row with its hold's resolution, as read by [`CARD_COLUMNS`].
struct CardRow {
    record: CardRecord,
    hold_id: i64,
    cvv_hash: String,
}

fn card_row(row: &Row) -> Result<CardRow, StorageError> {
    let resolution: Option<String> = row.get(13)?;
    let state = match resolution.as_deref() {
        None => CardState::Open,
        Some("captured") => CardState::Used,
        Some("voided") => CardState::Voided,
        Some("expired") => CardState::Expired,
        Some(other) => {
            return Err(StorageError::Invariant(format!("unknown resolution `{other}`")));
        }
    };
    let captured_units: Option<i64> = row.get(14)?;
    let currency: String = row.get(8)?;
    Ok(CardRow {
        record: CardRecord {
            id: row.get(0)?,
            spend_id: row.get(1)?,
            agent_id: row.get(2)?,
            issuer: row.get(3)?,
            last4: row.get(4)?,
            exp_month: row.get(5)?,
            exp_year: row.get(6)?,
            cap: amount(row.get(7)?, &currency)?,
            merchant_id: row.get(9)?,
            expires_at_ms: from_ms(row.get(10)?),
            state,
            captured_units: (state == CardState::Used).then_some(captured_units).flatten(),
        },
        hold_id: row.get(11)?,
        cvv_hash: row.get(12)?,
    })
}

fn find_card(conn: &dyn Conn, column: &str, value: &str) -> Result<Option<CardRow>, StorageError> {
    let sql = format!(
        "SELECT {CARD_COLUMNS} FROM cards c LEFT JOIN hold_resolutions r ON r.hold_id = c.hold_id WHERE c.{column} = ?1"
    );
    conn.row(&sql, args![value])?.as_ref().map(card_row).transpose()
}

/// The columns of a spend with its outcome: the first decision, overridden
/// by the operator's for a spend that waited for approval.
const SPEND_SELECT: &str =
    "SELECT s.id, s.agent_id, s.units, s.currency, s.merchant_id, s.merchant_name, s.mcc,
        s.country, s.purpose, s.received_at_ms, s.status, s.reasons, c.id, a.decision, a.reason, s.mandate_id
     FROM spends s
     LEFT JOIN cards c ON c.spend_id = s.id
     LEFT JOIN approval_resolutions a ON a.spend_id = s.id";

fn spend_record(r: &Row) -> Result<SpendRecord, StorageError> {
    let reasons: String = r.get(11)?;
    let mut reasons: Vec<String> =
        serde_json::from_str(&reasons).map_err(|e| StorageError::Invariant(format!("spend reasons: {e}")))?;
    let status: String = r.get(10)?;
    let mut status = SpendStatus::parse(&status)
        .ok_or_else(|| StorageError::Invariant(format!("unknown spend status `{status}`")))?;
    match r.get::<Option<String>>(13)?.as_deref() {
        None => {}
        Some("approved") => status = SpendStatus::Approved,
        Some(_) => {
            status = SpendStatus::Denied;
            reasons.push(r.get::<Option<String>>(14)?.unwrap_or_default());
        }
    }
    let currency: String = r.get(3)?;
    Ok(SpendRecord {
        id: r.get(0)?,
        agent_id: r.get(1)?,
        amount: amount(r.get(2)?, &currency)?,
        merchant: Merchant { id: r.get(4)?, name: r.get(5)?, mcc: r.get(6)?, country: r.get(7)? },
        purpose: r.get(8)?,
        received_at_ms: from_ms(r.get(9)?),
        status,
        reasons,
        card_id: r.get(12)?,
        mandate_id: r.get(15)?,
    })
}

fn spend_by_id(conn: &dyn Conn, id: &str) -> Result<Option<SpendRecord>, StorageError> {
    conn.row(&format!("{SPEND_SELECT} WHERE s.id = ?1"), args![id])?.as_ref().map(spend_record).transpose()
}

fn insert_spend(
    conn: &dyn Conn,
    spend: &NewSpend,
    status: SpendStatus,
    reasons: &[String],
    pending_terms: Option<(u32, i64)>,
    now_ms: i64,
) -> Result<(), StorageError> {
    let reasons = serde_json::to_string(reasons).map_err(|e| StorageError::Invariant(e.to_string()))?;
    let fingerprint = spend.fingerprint();
    conn.execute(
        "INSERT INTO spends (id, agent_id, idempotency_key, fingerprint, units, currency, merchant_id, merchant_name,
                             mcc, country, purpose, received_at_ms, status, reasons, card_ttl_seconds,
                             card_cap_units, created_at_ms, mandate_id)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)",
        args![
            &spend.id,
            &spend.agent_id,
            &spend.idempotency_key,
            &fingerprint,
            spend.amount.units(),
            spend.amount.currency(),
            &spend.merchant.id,
            &spend.merchant.name,
            &spend.merchant.mcc,
            &spend.merchant.country,
            &spend.purpose,
            ms(spend.received_at_ms)?,
            status.as_str(),
            &reasons,
            pending_terms.map(|(ttl, _)| ttl),
            pending_terms.map(|(_, cap)| cap),
            now_ms,
            &spend.mandate_id,
        ],
    )?;
    Ok(())
}

/// The card a spend may get: the narrowest cap any policy set, never above
/// the requested amount nor in another currency; the shortest life, never
/// above the default.
fn card_terms(amount: &Amount, terms: &CardTerms, default_ttl_seconds: u32) -> (Amount, u32) {
    let cap = match &terms.max_amount {
        Some(cap) if cap.currency() == amount.currency() && cap.units() < amount.units() => cap.clone(),
        _ => amount.clone(),
    };
    let ttl = terms.ttl_seconds.unwrap_or(default_ttl_seconds).clamp(1, default_ttl_seconds.max(1));
    (cap, ttl)
}

/// Reserve `cap` for a spend: a hold row and the transfer into `held`.
#[allow(clippy::too_many_arguments)] // one column each
fn place_hold(
    conn: &dyn Conn,
    spend_id: &str,
    agent_id: &str,
    cap: &Amount,
    merchant: &Merchant,
    received_at_ms: i64,
    expires_at_ms: i64,
    now: i64,
) -> Result<i64, StorageError> {
    let hold_id: i64 = conn
        .one(
            "INSERT INTO holds (spend_id, agent_id, currency, units, merchant_id, mcc, received_at_ms, expires_at_ms,
                                created_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) RETURNING id",
            args![
                spend_id,
                agent_id,
                cap.currency(),
                cap.units(),
                &merchant.id,
                &merchant.mcc,
                received_at_ms,
                expires_at_ms,
                now
            ],
        )?
        .get(0)?;
    transfer(conn, TransferKind::Hold, cap.currency(), cap.units(), Some(hold_id), now)?;
    Ok(hold_id)
}

/// The outcome of the part of a proposal that runs after the policies.
fn commit_verdict(
    conn: &dyn Conn,
    spend: &NewSpend,
    decided: Decided,
    cards: &CardIssuance,
    actor: &Actor,
    now_ms: u64,
) -> Result<Proposed, StorageError> {
    let now = ms(now_ms)?;
    // The mandate, checked here, under the write lock: what it has left is
    // what the spends committed before this one left. A card under it lives
    // no longer than it does.
    let mandate = mandates::check_mandate(
        conn,
        spend.mandate_id.as_deref(),
        &spend.agent_id,
        &spend.amount,
        &spend.merchant,
        now_ms,
    )?;
    let (mandate_ttl, verdict) = match mandate {
        Ok(left) => (left, decided.verdict.clone()),
        Err(reason) => {
            let mut reasons = match &decided.verdict {
                Verdict::Deny(reasons) => reasons.clone(),
                _ => Vec::new(),
            };
            reasons.push(reason);
            (None, Verdict::Deny(reasons))
        }
    };
    let ttl_of = |terms: &CardTerms| {
        let (cap, ttl) = card_terms(&spend.amount, terms, cards.default_ttl_seconds);
        (cap, mandate_ttl.map_or(ttl, |left| ttl.min(left)))
    };
    let (status, reasons, approved, pending) = match &verdict {
        Verdict::Deny(reasons) => (SpendStatus::Denied, reasons.clone(), None, None),
        Verdict::RequireApproval { reasons, terms } => {
            let (cap, ttl) = ttl_of(terms);
            (SpendStatus::PendingApproval, reasons.clone(), None, Some((ttl, cap.units())))
        }
        Verdict::Approve(terms) => {
            let (cap, ttl) = ttl_of(terms);
            if balance(conn, cap.currency(), AccountKind::Available)? < cap.units() {
                (SpendStatus::Denied, vec![INSUFFICIENT_FUNDS.to_owned()], None, None)
            } else {
                (SpendStatus::Approved, Vec::new(), Some((cap, ttl)), None)
            }
        }
    };
    insert_spend(conn, spend, status, &reasons, pending, now)?;
    let mut issued = None;
    if let Some((cap, ttl_seconds)) = approved {
        let expires = now + i64::from(ttl_seconds) * 1000;
        let received = ms(spend.received_at_ms)?;
        let hold_id =
            place_hold(conn, &spend.id, &spend.agent_id, &cap, &spend.merchant, received, expires, now)?;
        issued = Some(issue_card(
            conn,
            &spend.id,
            &spend.agent_id,
            &spend.merchant.id,
            cards,
            hold_id,
            &cap,
            ttl_seconds,
            now_ms,
        )?);
    }
    let record = spend_by_id(conn, &spend.id)?
        .ok_or_else(|| StorageError::Invariant("the spend just written is missing".into()))?;
    append_audit(
        conn,
        "spend",
        &json!({
            "spend_id": record.id,
            "agent_id": record.agent_id,
            "request": {
                "amount": spend.amount.to_decimal().to_string(),
                "currency": spend.amount.currency(),
                "merchant": spend.merchant,
                "purpose": spend.purpose,
                "received_at_ms": spend.received_at_ms,
            },
            "policies": decided.evaluations,
            "decision": record.status.as_str(),
            "reasons": record.reasons,
            "card_id": record.card_id,
        }),
        actor,
        now,
    )?;
    Ok(Proposed { spend: record, card: issued, replayed: false })
}

/// Issue a card for a hold and store it (hashes only), drawing a new PAN
/// should the issuer hand out one already in use.
#[allow(clippy::too_many_arguments)]
fn issue_card(
    conn: &dyn Conn,
    spend_id: &str,
    agent_id: &str,
    merchant_id: &str,
    cards: &CardIssuance,
    hold_id: i64,
    cap: &Amount,
    ttl_seconds: u32,
    now_ms: u64,
) -> Result<IssuedCard, StorageError> {
    let now = ms(now_ms)?;
    for _ in 0..PAN_ATTEMPTS {
        let card_id = new_ordered_id("card", now_ms);
        let request = CardRequest {
            card_id: card_id.clone(),
            cap: cap.clone(),
            merchant_id: merchant_id.to_owned(),
            ttl_seconds,
            now_ms,
        };
        let card = cards.issuer.issue(&request).map_err(|e| StorageError::Issuer(e.to_string()))?;
        let pan_hash = cards.key.hash_pan(&card.secrets.pan);
        if conn.row("SELECT 1 FROM cards WHERE pan_hash = ?1", args![&pan_hash])?.is_some() {
            continue;
        }
        let cvv_hash = cards.key.hash_cvv(&card_id, &card.secrets.cvv);
        conn.execute(
            "INSERT INTO cards (id, hold_id, spend_id, agent_id, issuer, pan_hash, cvv_hash, last4, exp_month, exp_year,
                                cap_units, currency, merchant_id, expires_at_ms, created_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
            args![
                &card_id,
                hold_id,
                spend_id,
                agent_id,
                cards.issuer.name(),
                &pan_hash,
                &cvv_hash,
                &card.last4,
                card.exp_month,
                card.exp_year,
                cap.units(),
                cap.currency(),
                merchant_id,
                ms(card.expires_at_ms)?,
                now
            ],
        )?;
        return Ok(card);
    }
    Err(StorageError::Issuer(format!("no unused card number after {PAN_ATTEMPTS} attempts")))
}

/// Append one record to the audit chain, inside the caller's transaction
/// (whose write lock orders the chain; `seq` being the primary key, two
/// records could never share a place in it anyway).
///
/// The record names its `actor` (see [`Actor::to_json`]) and, from where
/// the store's audit key begins, its hash is that key's MAC.
pub(crate) fn append_audit(
    conn: &dyn Conn,
    kind: &str,
    record: &serde_json::Value,
    actor: &Actor,
    now: i64,
) -> Result<(), StorageError> {
    let key = conn.audit_key()?;
    let (seq, prev_hash) = match conn.row("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1", &[])? {
        Some(last) => (last.get::<i64>(0)? + 1, last.get::<String>(1)?),
        None => (1, AUDIT_GENESIS.to_owned()),
    };
    let mut record = record.clone();
    match &mut record {
        serde_json::Value::Object(fields) => {
            fields.insert("actor".into(), actor.to_json());
        }
        other => {
            return Err(StorageError::Invariant(format!("an audit record must be an object, not {other}")));
        }
    }
    let text = record.to_string();
    let seq_u = u64::try_from(seq).map_err(|_| StorageError::Invariant("audit sequence".into()))?;
    // With a key, every new record is MAC'd, even one placed before where
    // the key file says keyed records begin (a trail cut back to before
    // that place): such a record never verifies, so the cut stays visible.
    let hash = match key {
        Some(key) => key.record_hash(&prev_hash, seq_u, from_ms(now), kind, &text),
        None => audit_hash(&prev_hash, seq_u, from_ms(now), kind, &text),
    };
    conn.execute(
        "INSERT INTO audit (seq, at_ms, kind, record, prev_hash, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        args![seq, now, kind, &text, &prev_hash, &hash],
    )?;
    Ok(())
}

/// The answer already given to an authorization with this idempotency
/// key, if any; the same key with another charge is a conflict.
fn replay_authorization(
    tx: &dyn Conn,
    key: &str,
    fingerprint: &str,
) -> Result<Option<AuthorizationOutcome>, StorageError> {
    let Some(earlier) = tx.row(IDEMPOTENT_AUTHORIZATION_SQL, args![key])? else {
        return Ok(None);
    };
    if earlier.get::<Option<String>>(0)?.as_deref() != Some(fingerprint) {
        return Err(StorageError::IdempotencyConflict(key.to_owned()));
    }
    let decline_code = earlier
        .get::<Option<String>>(3)?
        .map(|code| code.parse::<DeclineCode>())
        .transpose()
        .map_err(|e| StorageError::Invariant(format!("stored authorization: {e}")))?;
    Ok(Some(AuthorizationOutcome {
        approved: earlier.get(2)?,
        decline_code,
        card_id: earlier.get(1)?,
        replayed: true,
    }))
}

pub(crate) const IDEMPOTENT_AUTHORIZATION_SQL: &str =
    "SELECT fingerprint, card_id, approved, decline_code FROM authorizations WHERE idempotency_key = ?1";

/// How many authorizations of a card were declined `wrong_cvv`, and whether
/// its agent was revoked.
pub(crate) const CARD_STANDING_SQL: &str = "SELECT
        (SELECT CAST(COUNT(*) AS BIGINT) FROM authorizations WHERE card_id = ?1 AND decline_code = 'wrong_cvv'),
        EXISTS (SELECT 1 FROM agent_revocations WHERE agent_id = ?2)";

/// A merchant's charge, inside the caller's write transaction: see
/// [`Storage::authorize`]. With an idempotency key, a retry gets the first
/// answer and writes nothing. The lockout counts in the same transaction
/// as the wrong try that reaches it, so racing probes cannot overshoot it.
fn authorize(
    tx: &dyn Conn,
    request: &AuthorizationRequest,
    key: &CardKey,
    actor: &Actor,
    now_ms: u64,
) -> Result<AuthorizationOutcome, StorageError> {
    let now = ms(now_ms)?;
    let fingerprint = request.idempotency_key.as_ref().map(|_| key.authorization_fingerprint(request));
    if let (Some(idempotency_key), Some(fingerprint)) = (&request.idempotency_key, &fingerprint)
        && let Some(earlier) = replay_authorization(tx, idempotency_key, fingerprint)?
    {
        return Ok(earlier);
    }
    let card = find_card(tx, "pan_hash", &key.hash_pan(&request.pan))?;
    let view = match &card {
        Some(c) => {
            let standing = tx.one(CARD_STANDING_SQL, args![&c.record.id, &c.record.agent_id])?;
            let tries: i64 = standing.get(0)?;
            Some(CardView {
                card_id: c.record.id.clone(),
                cvv_hash: c.cvv_hash.clone(),
                exp_month: c.record.exp_month,
                exp_year: c.record.exp_year,
                cap: c.record.cap.clone(),
                merchant_id: c.record.merchant_id.clone(),
                expires_at_ms: c.record.expires_at_ms,
                state: c.record.state,
                wrong_cvv_tries: u32::try_from(tries).unwrap_or(u32::MAX),
                agent_revoked: standing.get(1)?,
            })
        }
        None => None,
    };
    let decision = decide(key, view.as_ref(), request, now_ms);
    // Why this authorization voided the card, if it did.
    let mut voided = None;
    if let (Some(card), Some(view)) = (&card, &view) {
        let cap = card.record.cap.units();
        let currency = card.record.cap.currency();
        let open = card.record.state == CardState::Open;
        match decision {
            Ok(()) => resolve_hold(tx, card.hold_id, "captured", currency, cap, request.amount.units(), now)?,
            // The last wrong try the card allows: voided now, its hold released.
            Err(DeclineCode::WrongCvv) if open && view.wrong_cvv_tries + 1 >= MAX_WRONG_CVV => {
                resolve_hold(tx, card.hold_id, "voided", currency, cap, 0, now)?;
                voided = Some(format!("{MAX_WRONG_CVV} authorizations with a wrong CVV"));
            }
            // Locked out or its agent revoked, yet still open: voided now.
            Err(DeclineCode::CardVoided) if open => {
                resolve_hold(tx, card.hold_id, "voided", currency, cap, 0, now)?;
                voided = Some(if view.agent_revoked {
                    "the agent was revoked".to_owned()
                } else {
                    format!("{MAX_WRONG_CVV} authorizations with a wrong CVV")
                });
            }
            // Seen past its life before the sweep got to it: expire it now.
            Err(DeclineCode::CardExpired) if open => {
                resolve_hold(tx, card.hold_id, "expired", currency, cap, 0, now)?
            }
            Err(_) => {}
        }
    }
    let card_id = card.as_ref().map(|c| c.record.id.clone());
    let code = decision.err().map(DeclineCode::as_str);
    tx.execute(
        "INSERT INTO authorizations (card_id, units, currency, merchant_id, approved, decline_code, created_at_ms,
                                     idempotency_key, fingerprint)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        args![
            &card_id,
            request.amount.units(),
            request.amount.currency(),
            &request.merchant_id,
            decision.is_ok(),
            code,
            now,
            &request.idempotency_key,
            &fingerprint
        ],
    )?;
    append_audit(
        tx,
        "authorization",
        &json!({
            "card_id": card_id,
            "amount": request.amount.to_decimal().to_string(),
            "currency": request.amount.currency(),
            "merchant_id": request.merchant_id,
            "approved": decision.is_ok(),
            "decline_code": code,
        }),
        actor,
        now,
    )?;
    if let Some(reason) = voided {
        append_audit(tx, "card_void", &json!({ "card_id": card_id, "reason": reason }), actor, now)?;
    }
    Ok(AuthorizationOutcome {
        approved: decision.is_ok(),
        decline_code: decision.err(),
        card_id,
        replayed: false,
    })
}

/// Whether the agent was revoked (a primary-key lookup).
pub(crate) fn agent_revoked(conn: &dyn Conn, agent_id: &str) -> Result<bool, StorageError> {
    Ok(conn.row("SELECT 1 FROM agent_revocations WHERE agent_id = ?1", args![agent_id])?.is_some())
}

/// Refuse whatever a revoked agent asked for.
fn refuse_revoked(conn: &dyn Conn, agent_id: &str) -> Result<(), StorageError> {
    if agent_revoked(conn, agent_id)? {
        return Err(StorageError::Revoked(format!("agent `{agent_id}` was revoked")));
    }
    Ok(())
}

/// A spend waiting for approval, write-locked: refuses anything else.
fn pending_spend(
    conn: &dyn Conn,
    spend_id: &str,
    approval_ttl_ms: u64,
    now_ms: u64,
) -> Result<SpendRecord, StorageError> {
    let spend =
        spend_by_id(conn, spend_id)?.ok_or_else(|| StorageError::NotFound(format!("spend `{spend_id}`")))?;
    if spend.status != SpendStatus::PendingApproval {
        return Err(StorageError::InvalidState(format!(
            "spend `{spend_id}` is {}, not waiting for approval",
            spend.status.as_str()
        )));
    }
    if spend.received_at_ms.saturating_add(approval_ttl_ms) <= now_ms {
        return Err(StorageError::InvalidState(format!("the approval of spend `{spend_id}` has expired")));
    }
    Ok(spend)
}

pub(crate) fn resolve_approval(
    conn: &dyn Conn,
    spend_id: &str,
    decision: &str,
    reason: &str,
    actor: &Actor,
    now: i64,
) -> Result<(), StorageError> {
    let inserted = conn.execute(
        "INSERT INTO approval_resolutions (spend_id, decision, reason, resolved_at_ms) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT DO NOTHING",
        args![spend_id, decision, reason, now],
    )?;
    if inserted != 1 {
        return Err(StorageError::InvalidState(format!("spend `{spend_id}` is already resolved")));
    }
    append_audit(
        conn,
        "approval",
        &json!({ "spend_id": spend_id, "decision": decision, "reason": reason }),
        actor,
        now,
    )
}

pub(crate) const IDEMPOTENT_SPEND_SQL: &str =
    "SELECT id, fingerprint FROM spends WHERE agent_id = ?1 AND idempotency_key = ?2";

/// The answer already given to a proposal with this idempotency key, if any.
fn replay(conn: &dyn Conn, spend: &NewSpend) -> Result<Option<Proposed>, StorageError> {
    let Some(key) = &spend.idempotency_key else {
        return Ok(None);
    };
    let Some(earlier) = conn.row(IDEMPOTENT_SPEND_SQL, args![&spend.agent_id, key])? else {
        return Ok(None);
    };
    if earlier.get::<String>(1)? != spend.fingerprint() {
        return Err(StorageError::IdempotencyConflict(key.clone()));
    }
    let spend = spend_by_id(conn, &earlier.get::<String>(0)?)?
        .ok_or_else(|| StorageError::Invariant("replayed spend vanished".into()))?;
    Ok(Some(Proposed { spend, card: None, replayed: true }))
}

/// The operator's approval of a pending spend, once its policies have run
/// again: a deny still wins; otherwise the hold is placed (the card is made
/// when the agent collects it).
fn commit_approval(
    tx: &dyn Conn,
    spend: &SpendRecord,
    decided: Decided,
    default_ttl_seconds: u32,
    actor: &Actor,
    now_ms: u64,
) -> Result<SpendRecord, StorageError> {
    let now = ms(now_ms)?;
    let spend_id = spend.id.as_str();
    // The operator answers the escalation, not the other policies: a deny
    // (a limit used up since, say) still wins.
    let terms = match decided.verdict {
        Verdict::Deny(reasons) => {
            return Err(StorageError::InvalidState(format!(
                "the policies now deny spend `{spend_id}`: {}",
                reasons.join("; ")
            )));
        }
        Verdict::Approve(terms) | Verdict::RequireApproval { terms, .. } => terms,
    };
    let row = tx.one("SELECT card_ttl_seconds, card_cap_units FROM spends WHERE id = ?1", args![spend_id])?;
    let (ttl, cap_units): (Option<u32>, Option<i64>) = (row.get(0)?, row.get(1)?);
    let recorded = CardTerms {
        ttl_seconds: ttl,
        max_amount: cap_units.map(|u| amount(u, spend.amount.currency())).transpose()?,
    };
    let (cap, ttl) = card_terms(&spend.amount, &recorded.narrowest(terms), default_ttl_seconds);
    // The mandate is checked again, as of now: it may have been spent,
    // revoked or run out while the spend waited.
    let mandate = mandates::check_mandate(
        tx,
        spend.mandate_id.as_deref(),
        &spend.agent_id,
        &spend.amount,
        &spend.merchant,
        now_ms,
    )?;
    let ttl = match mandate {
        Ok(left) => left.map_or(ttl, |left| ttl.min(left)),
        Err(reason) => {
            return Err(StorageError::InvalidState(format!(
                "spend `{spend_id}` no longer fits its {reason}"
            )));
        }
    };
    if balance(tx, cap.currency(), AccountKind::Available)? < cap.units() {
        return Err(StorageError::InvalidState(format!(
            "{INSUFFICIENT_FUNDS}: spend `{spend_id}` needs {cap}"
        )));
    }
    resolve_approval(tx, spend_id, "approved", "approved by the operator", actor, now)?;
    let received = ms(spend.received_at_ms)?;
    let expires = now + i64::from(ttl) * 1000;
    place_hold(tx, spend_id, &spend.agent_id, &cap, &spend.merchant, received, expires, now)?;
    append_audit(
        tx,
        "approval_policies",
        &json!({ "spend_id": spend_id, "policies": decided.evaluations }),
        actor,
        now,
    )?;
    spend_by_id(tx, spend_id)?.ok_or_else(|| StorageError::Invariant("approved spend vanished".into()))
}

impl<E: Engine> Storage for SqlStore<E> {
    fn deposit(
        &self,
        amount: &Amount,
        idempotency_key: Option<&str>,
        actor: &Actor,
        now_ms: u64,
    ) -> Result<DepositRecord, StorageError> {
        self.write(|tx| {
            if let Some(key) = idempotency_key {
                let earlier = tx.row(
                    "SELECT d.id, t.units, t.currency FROM deposits d JOIN transfers t ON t.id = d.transfer_id
                     WHERE d.idempotency_key = ?1",
                    args![key],
                )?;
                if let Some(earlier) = earlier {
                    let (units, currency): (i64, String) = (earlier.get(1)?, earlier.get(2)?);
                    if units != amount.units() || currency != amount.currency() {
                        return Err(StorageError::IdempotencyConflict(key.to_owned()));
                    }
                    return Ok(DepositRecord { id: earlier.get(0)?, amount: amount.clone(), replayed: true });
                }
            }
            let now = ms(now_ms)?;
            ensure_accounts(tx, amount.currency())?;
            let transfer_id = transfer(tx, TransferKind::Deposit, amount.currency(), amount.units(), None, now)?;
            let id = new_id("dep");
            tx.execute(
                "INSERT INTO deposits (id, transfer_id, idempotency_key, created_at_ms) VALUES (?1, ?2, ?3, ?4)",
                args![&id, transfer_id, idempotency_key, now],
            )?;
            append_audit(
                tx,
                "deposit",
                &json!({
                    "deposit_id": id,
                    "amount": amount.to_decimal().to_string(),
                    "currency": amount.currency(),
                }),
                actor,
                now,
            )?;
            Ok(DepositRecord { id, amount: amount.clone(), replayed: false })
        })
    }

    fn balances(&self) -> Result<Vec<Balance>, StorageError> {
        self.read(|conn| {
            let currencies = conn.rows("SELECT DISTINCT currency FROM accounts ORDER BY currency", &[])?;
            currencies
                .iter()
                .map(|row| {
                    let currency: String = row.get(0)?;
                    Ok(Balance {
                        exponent: money::exponent(&currency).ok_or_else(|| {
                            StorageError::Invariant(format!("unknown currency `{currency}`"))
                        })?,
                        available: balance(conn, &currency, AccountKind::Available)?,
                        held: balance(conn, &currency, AccountKind::Held)?,
                        spent: balance(conn, &currency, AccountKind::Spent)?,
                        currency,
                    })
                })
                .collect()
        })
    }

    fn propose(
        &self,
        spend: &NewSpend,
        cards: &CardIssuance,
        actor: &Actor,
        now_ms: u64,
        decide: &mut dyn FnMut(Arc<dyn History>) -> Decided,
    ) -> Result<Proposed, StorageError> {
        // The idempotency key first, in every transaction: a retry never
        // runs the policies again, and never commits twice.
        // One copy of the spend, shared by `check` and `commit` (which are
        // cloned into each attempt's write job).
        let (spend, cards, actor) = (Arc::new(spend.clone()), cards.clone(), actor.clone());
        let again = Arc::clone(&spend);
        self.decide_and_commit(
            // The agent first: a proposal of a revoked agent commits nothing,
            // however long ago its request arrived (re-checked in the write
            // transaction that would commit it).
            move |conn| {
                refuse_revoked(conn, &spend.agent_id)?;
                Ok(replay(conn, &spend)?.map_or(Ok(()), Err))
            },
            &mut |(), history| decide(history),
            move |tx, (), decided| commit_verdict(tx, &again, decided, &cards, &actor, now_ms),
        )
    }

    fn preview(&self, decide: &mut dyn FnMut(Arc<dyn History>) -> Decided) -> Result<Decided, StorageError> {
        let mut lender = Lender::new(self.engine.begin_read()?);
        let decided = lender.lend(|history| decide(history)).map(|(decided, _)| decided);
        if let Some(conn) = lender.into_inner() {
            self.engine.end_read(conn);
        }
        decided
    }

    fn approve(
        &self,
        spend_id: &str,
        default_ttl_seconds: u32,
        approval_ttl_ms: u64,
        actor: &Actor,
        now_ms: u64,
        decide: &mut dyn FnMut(&SpendRecord, Arc<dyn History>) -> Decided,
    ) -> Result<SpendRecord, StorageError> {
        // As a proposal: the policies run again, and their decision commits
        // only if the spend still waits and what they read still holds.
        let (spend_id, actor) = (spend_id.to_owned(), actor.clone());
        self.decide_and_commit(
            move |conn| {
                let spend = pending_spend(conn, &spend_id, approval_ttl_ms, now_ms)?;
                if agent_revoked(conn, &spend.agent_id)? {
                    return Err(StorageError::InvalidState(format!(
                        "the agent of spend `{spend_id}` was revoked"
                    )));
                }
                Ok(Ok(spend))
            },
            decide,
            move |tx, spend, decided| {
                commit_approval(tx, spend, decided, default_ttl_seconds, &actor, now_ms)
            },
        )
    }

    fn deny(
        &self,
        spend_id: &str,
        reason: &str,
        approval_ttl_ms: u64,
        actor: &Actor,
        now_ms: u64,
    ) -> Result<SpendRecord, StorageError> {
        self.write(|tx| {
            pending_spend(tx, spend_id, approval_ttl_ms, now_ms)?;
            resolve_approval(tx, spend_id, "denied", reason, actor, ms(now_ms)?)?;
            spend_by_id(tx, spend_id)?.ok_or_else(|| StorageError::Invariant("denied spend vanished".into()))
        })
    }

    fn expire_approvals(&self, approval_ttl_ms: u64, now_ms: u64) -> Result<usize, StorageError> {
        self.write(|tx| {
            let now = ms(now_ms)?;
            let cutoff = ms(now_ms.saturating_sub(approval_ttl_ms))?;
            let due = tx.rows(
                "SELECT s.id FROM spends s LEFT JOIN approval_resolutions a ON a.spend_id = s.id
                 WHERE s.status = 'pending_approval' AND s.received_at_ms <= ?1 AND a.spend_id IS NULL",
                args![cutoff],
            )?;
            for row in &due {
                resolve_approval(
                    tx,
                    &row.get::<String>(0)?,
                    "expired",
                    "approval expired",
                    &Actor::System,
                    now,
                )?;
            }
            Ok(due.len())
        })
    }

    fn pending_approvals(&self, approval_ttl_ms: u64, now_ms: u64) -> Result<Vec<SpendRecord>, StorageError> {
        self.read(|conn| {
            let cutoff = ms(now_ms.saturating_sub(approval_ttl_ms))?;
            conn.rows(
                &format!(
                    "{SPEND_SELECT} WHERE s.status = 'pending_approval' AND s.received_at_ms > ?1 AND a.spend_id IS NULL
                     ORDER BY s.received_at_ms, s.id"
                ),
                args![cutoff],
            )?
            .iter()
            .map(spend_record)
            .collect()
        })
    }

    fn claim_card(
        &self,
        spend_id: &str,
        cards: &CardIssuance,
        now_ms: u64,
    ) -> Result<Option<IssuedCard>, StorageError> {
        self.write(|tx| {
            let hold = tx.row(
                "SELECT h.id, h.agent_id, h.units, h.currency, h.expires_at_ms, c.id, r.kind, s.merchant_id
                 FROM holds h JOIN spends s ON s.id = h.spend_id LEFT JOIN cards c ON c.hold_id = h.id
                 LEFT JOIN hold_resolutions r ON r.hold_id = h.id WHERE h.spend_id = ?1",
                args![spend_id],
            )?;
            let Some(hold) = hold else { return Ok(None) };
            // Made already, or the hold is resolved: nothing to show.
            if hold.get::<Option<String>>(5)?.is_some() || hold.get::<Option<String>>(6)?.is_some() {
                return Ok(None);
            }
            let left_ms = hold.get::<i64>(4)? - ms(now_ms)?;
            if left_ms < 1000 {
                return Ok(None);
            }
            let (agent_id, merchant_id): (String, String) = (hold.get(1)?, hold.get(7)?);
            // Revoking releases the hold anyway; a revoked agent never gets a card.
            if agent_revoked(tx, &agent_id)? {
                return Ok(None);
            }
            let ttl = u32::try_from(left_ms / 1000).unwrap_or(u32::MAX).min(cards.default_ttl_seconds);
            let cap = amount(hold.get(2)?, &hold.get::<String>(3)?)?;
            let card =
                issue_card(tx, spend_id, &agent_id, &merchant_id, cards, hold.get(0)?, &cap, ttl, now_ms)?;
            Ok(Some(card))
        })
    }

    fn spends(&self, agent_id: Option<&str>, limit: usize) -> Result<Vec<SpendRecord>, StorageError> {
        self.read(|conn| {
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let rows = match agent_id {
                Some(agent_id) => conn.rows(
                    &format!(
                        "{SPEND_SELECT} WHERE s.agent_id = ?1 ORDER BY s.created_at_ms DESC, s.id LIMIT ?2"
                    ),
                    args![agent_id, limit],
                )?,
                None => conn.rows(
                    &format!("{SPEND_SELECT} ORDER BY s.created_at_ms DESC, s.id LIMIT ?1"),
                    args![limit],
                )?,
            };
            rows.iter().map(spend_record).collect()
        })
    }

    fn spends_since(
        &self,
        agent_id: &str,
        since_ms: u64,
        at_most: u64,
    ) -> Result<(u64, Option<u64>), StorageError> {
        let since = ms(since_ms)?;
        let at_most = i64::try_from(at_most).unwrap_or(i64::MAX);
        self.read(|conn| {
            // Walks the `spends_agent` index from `since` on, `at_most`
            // entries at most.
            let row = conn.one(
                "SELECT COUNT(*), MIN(created_at_ms) FROM (
                     SELECT created_at_ms FROM spends WHERE agent_id = ?1 AND created_at_ms >= ?2
                     ORDER BY created_at_ms LIMIT ?3
                 ) AS recent",
                args![agent_id, since, at_most],
            )?;
            Ok((row.get(0)?, row.get(1)?))
        })
    }

    fn authorize(
        &self,
        request: &AuthorizationRequest,
        key: &CardKey,
        actor: &Actor,
        now_ms: u64,
    ) -> Result<AuthorizationOutcome, StorageError> {
        self.write(|tx| authorize(tx, request, key, actor, now_ms))
    }

    fn void_card(&self, card_id: &str, actor: &Actor, now_ms: u64) -> Result<CardRecord, StorageError> {
        self.write(|tx| {
            let card = find_card(tx, "id", card_id)?
                .ok_or_else(|| StorageError::NotFound(format!("card `{card_id}`")))?;
            if card.record.state != CardState::Open {
                return Err(StorageError::InvalidState(format!(
                    "card `{card_id}` is already {}",
                    card.record.state.as_str()
                )));
            }
            let now = ms(now_ms)?;
            let cap = &card.record.cap;
            resolve_hold(tx, card.hold_id, "voided", cap.currency(), cap.units(), 0, now)?;
            append_audit(tx, "card_void", &json!({ "card_id": card_id }), actor, now)?;
            find_card(tx, "id", card_id)?
                .map(|c| c.record)
                .ok_or_else(|| StorageError::Invariant("voided card vanished".into()))
        })
    }

    fn expire_cards(&self, now_ms: u64) -> Result<usize, StorageError> {
        self.write(|tx| {
            let now = ms(now_ms)?;
            let swept_to: i64 = tx
                .one("SELECT CAST(COALESCE(MAX(swept_to_ms), 0) AS BIGINT) FROM expiry_sweeps", &[])?
                .get(0)?;
            let overlap = i64::try_from(SWEEP_OVERLAP.as_millis()).unwrap_or(i64::MAX);
            let due = tx.rows(EXPIRY_DUE_SQL, args![swept_to.saturating_sub(overlap), now])?;
            for row in &due {
                let currency: String = row.get(1)?;
                resolve_hold(tx, row.get(0)?, "expired", &currency, row.get(2)?, 0, now)?;
            }
            // Move the mark on when it is worth a row: after a release, or a
            // minute on. Between marks a sweep rescans at most that much.
            if now > swept_to && (!due.is_empty() || now - swept_to >= 60_000) {
                tx.execute("INSERT INTO expiry_sweeps (swept_to_ms) VALUES (?1)", args![now])?;
            }
            Ok(due.len())
        })
    }

    fn spend(&self, id: &str) -> Result<Option<SpendRecord>, StorageError> {
        self.read(|conn| spend_by_id(conn, id))
    }

    fn card(&self, id: &str) -> Result<Option<CardRecord>, StorageError> {
        self.read(|conn| Ok(find_card(conn, "id", id)?.map(|c| c.record)))
    }

    fn cards(&self, agent_id: Option<&str>) -> Result<Vec<CardRecord>, StorageError> {
        self.read(|conn| {
            let select = format!(
                "SELECT {CARD_COLUMNS} FROM cards c LEFT JOIN hold_resolutions r ON r.hold_id = c.hold_id"
            );
            let rows = match agent_id {
                Some(agent_id) => conn.rows(
                    &format!("{select} WHERE c.agent_id = ?1 ORDER BY c.created_at_ms DESC, c.id"),
                    args![agent_id],
                )?,
                None => conn.rows(&format!("{select} ORDER BY c.created_at_ms DESC, c.id"), &[])?,
            };
            rows.iter().map(|r| card_row(r).map(|c| c.record)).collect()
        })
    }

    fn audit(
        &self,
        kind: &str,
        record: &serde_json::Value,
        actor: &Actor,
        now_ms: u64,
    ) -> Result<(), StorageError> {
        self.write(|tx| append_audit(tx, kind, record, actor, ms(now_ms)?))
    }

    fn audit_records(&self, after: u64, limit: usize) -> Result<Vec<AuditRecord>, StorageError> {
        self.read(|conn| read_audit(conn, after, limit))
    }

    fn verify_audit(
        &self,
        checkpoint: Option<&Checkpoint>,
    ) -> Result<Result<AuditHead, AuditBreak>, StorageError> {
        let key = self.audit_key.get().map(Arc::as_ref);
        self.read(|conn| Ok(verify_chain(&read_audit(conn, 0, usize::MAX)?, key, checkpoint)))
    }

    fn check_invariants(&self) -> Result<(), String> {
        self.read(|conn| Ok(check_invariants(conn))).map_err(|e| e.to_string())?
    }
}

fn read_audit(conn: &dyn Conn, after: u64, limit: usize) -> Result<Vec<AuditRecord>, StorageError> {
    let after = i64::try_from(after).unwrap_or(i64::MAX);
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    conn.rows(
        "SELECT seq, at_ms, kind, record, prev_hash, hash FROM audit WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        args![after, limit],
    )?
    .iter()
    .map(|r| {
        Ok(AuditRecord {
            seq: from_ms(r.get(0)?),
            at_ms: from_ms(r.get(1)?),
            kind: r.get(2)?,
            record: r.get(3)?,
            prev_hash: r.get(4)?,
            hash: r.get(5)?,
        })
    })
    .collect()
}

fn check_invariants(conn: &dyn Conn) -> Result<(), String> {
    // The first row of a query whose rows are each a finding: (what, count).
    let first = |sql: &str| -> Result<Option<(String, i64)>, String> {
        match conn.row(sql, &[]).map_err(|e| e.to_string())? {
            Some(r) => Ok(Some((r.get(0).map_err(|e| e.to_string())?, r.get(1).map_err(|e| e.to_string())?))),
            None => Ok(None),
        }
    };
    // Every transfer has exactly two entries that cancel out.
    if let Some((transfer, n)) = first(
        "SELECT CAST(transfer_id AS TEXT), COUNT(*) FROM entries GROUP BY transfer_id HAVING COUNT(*) <> 2 OR SUM(delta) <> 0",
    )? {
        return Err(format!("transfer {transfer} has {n} entries that do not cancel out"));
    }
    // The accounts of each currency sum to zero.
    if let Some((currency, sum)) =
        first("SELECT a.currency, CAST(SUM(e.delta) AS BIGINT) FROM entries e JOIN accounts a ON a.id = e.account_id
               GROUP BY a.currency HAVING SUM(e.delta) <> 0")?
    {
        return Err(format!("{currency} accounts sum to {sum}, not zero"));
    }
    // Each account's running balance is the sum of its entries so far.
    if let Some((account, bad)) = first(
        "SELECT CAST(account_id AS TEXT), COUNT(*) FROM (
             SELECT account_id, balance_after,
                    SUM(delta) OVER (PARTITION BY account_id ORDER BY id) AS running
             FROM entries) AS running_balances
         WHERE balance_after <> running GROUP BY account_id",
    )? {
        return Err(format!("account {account} has {bad} entries with a wrong running balance"));
    }
    let currencies = conn.rows("SELECT DISTINCT currency FROM accounts", &[]).map_err(|e| e.to_string())?;
    for row in currencies {
        let currency: String = row.get(0).map_err(|e| e.to_string())?;
        let bal = |kind| balance(conn, &currency, kind).map_err(|e| e.to_string());
        let (available, held, spent, funding) = (
            bal(AccountKind::Available)?,
            bal(AccountKind::Held)?,
            bal(AccountKind::Spent)?,
            bal(AccountKind::Funding)?,
        );
        let one = |sql: &str| -> Result<i64, String> {
            conn.one(sql, args![&currency]).and_then(|r| r.get(0)).map_err(|e| e.to_string())
        };
        let deposits = one(
            "SELECT CAST(COALESCE(SUM(units), 0) AS BIGINT) FROM transfers WHERE kind = 'deposit' AND currency = ?1",
        )?;
        if available < 0 || held < 0 || spent < 0 {
            return Err(format!("{currency}: a balance is negative ({available}/{held}/{spent})"));
        }
        if available + held + spent != deposits || -funding != deposits {
            return Err(format!(
                "{currency}: available {available} + held {held} + spent {spent} != deposits {deposits}"
            ));
        }
        let open = one(
            "SELECT CAST(COALESCE(SUM(h.units), 0) AS BIGINT) FROM holds h LEFT JOIN hold_resolutions r ON r.hold_id = h.id
             WHERE r.hold_id IS NULL AND h.currency = ?1",
        )?;
        if open != held {
            return Err(format!("{currency}: held {held} but open holds add up to {open}"));
        }
        let captured = one(
            "SELECT CAST(COALESCE(SUM(r.captured_units), 0) AS BIGINT) FROM hold_resolutions r JOIN holds h ON h.id = r.hold_id
             WHERE h.currency = ?1",
        )?;
        if captured != spent {
            return Err(format!("{currency}: spent {spent} but captures add up to {captured}"));
        }
    }
    // Each hold: one hold transfer, and once resolved, transfers that move
    // exactly its amount out of `held`.
    if let Some((hold, n)) = first(
        "SELECT CAST(h.id AS TEXT), COUNT(t.id) FROM holds h LEFT JOIN transfers t ON t.hold_id = h.id AND t.kind = 'hold'
         GROUP BY h.id HAVING COUNT(t.id) <> 1",
    )? {
        return Err(format!("hold {hold} has {n} hold transfers"));
    }
    if let Some((hold, _)) = first(
        "SELECT CAST(h.id AS TEXT), 0 FROM holds h JOIN hold_resolutions r ON r.hold_id = h.id
         WHERE h.units <> (SELECT COALESCE(SUM(t.units), 0) FROM transfers t WHERE t.hold_id = h.id AND t.kind IN ('capture', 'release'))
            OR r.captured_units > h.units",
    )? {
        return Err(format!("hold {hold} was resolved with the wrong amounts"));
    }
    if let Some((hold, _)) = first(
        "SELECT CAST(h.id AS TEXT), 0 FROM holds h LEFT JOIN hold_resolutions r ON r.hold_id = h.id
         WHERE r.hold_id IS NULL AND EXISTS (SELECT 1 FROM transfers t WHERE t.hold_id = h.id AND t.kind <> 'hold')",
    )? {
        return Err(format!("open hold {hold} has money moved out of it"));
    }
    // A hold without a card only while an approved-after-escalation spend
    // waits for its agent to collect the card.
    if let Some((hold, _)) = first(
        "SELECT CAST(h.id AS TEXT), 0 FROM holds h LEFT JOIN cards c ON c.hold_id = h.id
         LEFT JOIN approval_resolutions a ON a.spend_id = h.spend_id
         WHERE c.id IS NULL AND (a.decision IS NULL OR a.decision <> 'approved')",
    )? {
        return Err(format!("hold {hold} has no card and no approval"));
    }
    // Cards and holds go together, and only approved spends have them.
    if let Some((card, _)) = first(
        "SELECT c.id, 0 FROM cards c LEFT JOIN holds h ON h.id = c.hold_id WHERE h.id IS NULL OR h.spend_id <> c.spend_id OR h.units <> c.cap_units",
    )? {
        return Err(format!("card {card} has no matching hold"));
    }
    if let Some((spend, _)) = first(
        "SELECT s.id, 0 FROM spends s LEFT JOIN holds h ON h.spend_id = s.id
         LEFT JOIN approval_resolutions a ON a.spend_id = s.id
         WHERE (s.status = 'approved' OR COALESCE(a.decision, '') = 'approved') <> (h.id IS NOT NULL)",
    )? {
        return Err(format!("spend {spend}: approved if and only if it holds money, which is not the case"));
    }
    Ok(())
}
