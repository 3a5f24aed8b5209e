//! The embedded store: one SQLite file, WAL, every commit fsync'd.
//!
//! Writes are serialized by SQLite's own write lock (`BEGIN IMMEDIATE`), so
//! several processes on one file stay correct; within a process one writer
//! connection does them in turn. Reads use a pool of read connections, each
//! read one snapshot, and never wait for the writer.
//!
//! Policies run outside the write lock, against a read snapshot; each
//! history query they make is recorded with its answer. Under the lock the
//! queries run again: if every answer is the same, the decision commits (it
//! is the one the policies would make now); if not, they run again. After
//! [`OPTIMISTIC_ATTEMPTS`] the evaluation happens under the lock, which
//! always completes. A deny commits without the check: it moves no money.
//! So a slow or hostile policy holds the lock only while its own agent's
//! proposals keep conflicting, and a faulting one never does.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use rusqlite_migration::{M, Migrations};
use serde_json::json;

use super::{
    AUDIT_GENESIS, AuditBreak, AuditRecord, AuthorizationOutcome, CardIssuance, CardRecord, Decided,
    DepositRecord, NewSpend, Proposed, SpendRecord, SpendStatus, Storage, StorageError, Verdict, audit_hash,
    new_id, verify_chain,
};
use crate::cards::{
    AuthorizationRequest, CardKey, CardRequest, CardState, CardView, DeclineCode, IssuedCard, decide,
};
use crate::history::{History, HistoryError, HistoryScope};
use crate::ledger::{AccountKind, Balance, TransferKind};
use crate::money::{self, Amount};
use crate::policy::{CardTerms, Merchant, SpendFilter, SpendSummary};

mod registry;

/// How long a writer waits for another process's write lock before failing.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

fn migrations() -> Migrations<'static> {
    Migrations::new(vec![
        M::up(include_str!("../../migrations/sqlite/0001_ledger.sql")),
        M::up(include_str!("../../migrations/sqlite/0002_daemon.sql")),
    ])
}

impl From<rusqlite::Error> for StorageError {
    fn from(e: rusqlite::Error) -> Self {
        StorageError::Database(e.to_string())
    }
}

fn ms(value: u64) -> Result<i64, StorageError> {
    i64::try_from(value).map_err(|_| StorageError::InvalidState(format!("time {value} ms is out of range")))
}

fn from_ms(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn amount(units: i64, currency: &str) -> Result<Amount, StorageError> {
    Amount::from_units(units, currency).map_err(|e| StorageError::Invariant(format!("stored amount: {e}")))
}

/// How far behind the last sweep's mark each expiry sweep looks again, for
/// daemons whose clocks disagree (a card issued by a daemon whose clock is
/// behind may expire before another daemon's mark).
pub const SWEEP_OVERLAP: Duration = Duration::from_secs(3600);

/// Open holds that lapsed in `(?1, ?2]`: a range of `holds_expiry`.
const EXPIRY_DUE_SQL: &str = "SELECT h.id, h.currency, h.units FROM holds h
     LEFT JOIN hold_resolutions r ON r.hold_id = h.id
     WHERE h.expires_at_ms > ?1 AND h.expires_at_ms <= ?2 AND r.hold_id IS NULL";

/// The SQLite store.
pub struct SqliteStorage {
    path: PathBuf,
    /// The writer connection. `None` only while a proposal lends it to the
    /// policies' history, with this lock held.
    conn: Mutex<Option<Connection>>,
    /// Idle read connections. Reads (and policies' history queries outside
    /// the write lock) never wait for the writer: WAL gives each its
    /// snapshot.
    readers: Mutex<Vec<Connection>>,
    /// Group commit: see [`SqliteStorage::sync`].
    durability: Durability,
}

/// What is committed and what of it is on disk. SQLite commits without an
/// fsync (`synchronous=NORMAL`); a writer returns only once an fsync of the
/// WAL that began after its commit has finished. One fsync covers every
/// commit before it (the WAL is written in order), so concurrent writers
/// share it instead of paying one each.
#[derive(Debug)]
struct Durability {
    wal: PathBuf,
    /// Commits that wrote something, counted under the write lock.
    committed: std::sync::atomic::AtomicU64,
    /// How many of them an fsync has covered. Held while fsyncing.
    synced: Mutex<u64>,
    /// Set when an fsync failed: whether earlier commits are on disk is then
    /// unknown, so nothing more is acknowledged until a restart.
    broken: std::sync::atomic::AtomicBool,
    /// fsyncs done, for tests and curiosity.
    fsyncs: std::sync::atomic::AtomicU64,
}

/// Read connections kept open for reuse; more are opened when needed.
const IDLE_READERS: usize = 16;

/// How many times a proposal's policies are evaluated outside the write
/// lock before the host gives up on optimism and evaluates under it. An
/// evaluation whose history changed before its commit is thrown away; under
/// the lock nothing can change, so the last attempt always completes.
pub const OPTIMISTIC_ATTEMPTS: usize = 3;

impl std::fmt::Debug for SqliteStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStorage").field("path", &self.path).finish_non_exhaustive()
    }
}

impl SqliteStorage {
    /// Open (creating if needed) the database at `path` and apply every
    /// migration not yet applied.
    pub fn open(path: &Path) -> Result<Self, StorageError> {
        let conn = Self::connect(path)?;
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        let durability = Durability {
            wal: PathBuf::from(wal),
            committed: Default::default(),
            synced: Mutex::new(0),
            broken: Default::default(),
            fsyncs: Default::default(),
        };
        // The WAL file exists now; make its directory entry durable too.
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| StorageError::Database(format!("cannot sync `{}`: {e}", dir.display())))?;
        }
        Ok(SqliteStorage {
            path: path.to_path_buf(),
            conn: Mutex::new(Some(conn)),
            readers: Mutex::new(Vec::new()),
            durability,
        })
    }

    fn connect(path: &Path) -> Result<Connection, StorageError> {
        let mut conn = Connection::open(path)?;
        // WAL; commits are made durable by a shared fsync (group commit,
        // `SqliteStorage::sync`) before any writer returns. SQLite still
        // fsyncs the WAL before every checkpoint and the database after.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        tune(&conn)?;
        migrations().to_latest(&mut conn).map_err(|e| StorageError::Database(format!("migrations: {e}")))?;
        Ok(conn)
    }

    /// A read connection: refuses every write, whatever a bug asks of it.
    fn connect_reader(&self) -> Result<Connection, StorageError> {
        let conn = Connection::open(&self.path)?;
        conn.pragma_update(None, "query_only", "ON")?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        tune(&conn)?;
        Ok(conn)
    }

    /// The writer connection, reopened if a panic ever lost it (its open
    /// transaction was rolled back when it was dropped).
    fn writer(&self) -> Result<(MutexGuard<'_, Option<Connection>>, Connection), StorageError> {
        let mut slot = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let conn = match slot.take() {
            Some(conn) => conn,
            None => Self::connect(&self.path)?,
        };
        Ok((slot, conn))
    }

    /// Run `f` in one immediate (write-locked) transaction.
    fn write<T>(
        &self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T, StorageError>,
    ) -> Result<T, StorageError> {
        let (mut slot, mut conn) = self.writer()?;
        self.usable()?;
        let before = conn.total_changes();
        let result: Result<T, StorageError> = (|| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let value = f(&tx)?;
            tx.commit()?;
            Ok(value)
        })();
        let commit = self.counted(result.is_ok() && conn.total_changes() != before);
        *slot = Some(conn);
        drop(slot);
        let value = result?;
        self.sync(commit)?;
        Ok(value)
    }

    /// Refuse to write once durability is in doubt.
    fn usable(&self) -> Result<(), StorageError> {
        if self.durability.broken.load(std::sync::atomic::Ordering::Acquire) {
            return Err(StorageError::Database(
                "an fsync of the database failed earlier: restart the daemon before it writes again".into(),
            ));
        }
        Ok(())
    }

    /// Count a commit that wrote something, under the write lock: its
    /// number, to wait for with [`SqliteStorage::sync`].
    fn counted(&self, wrote: bool) -> Option<u64> {
        wrote.then(|| self.durability.committed.fetch_add(1, std::sync::atomic::Ordering::AcqRel) + 1)
    }

    /// Return once commit `seq` is on disk: if an fsync since has covered
    /// it, at once; otherwise fsync the WAL, covering every commit so far
    /// (others waiting here then find theirs covered). Called without the
    /// write lock, so the next transactions proceed during the fsync.
    fn sync(&self, seq: Option<u64>) -> Result<(), StorageError> {
        let Some(seq) = seq else { return Ok(()) };
        let mut synced = self.durability.synced.lock().unwrap_or_else(|p| p.into_inner());
        if *synced >= seq {
            return Ok(());
        }
        self.usable()?;
        // Every commit counted so far has written its WAL frames.
        let upto = self.durability.committed.load(std::sync::atomic::Ordering::Acquire);
        let fsynced = std::fs::File::open(&self.durability.wal).and_then(|wal| wal.sync_data());
        if let Err(e) = fsynced {
            self.durability.broken.store(true, std::sync::atomic::Ordering::Release);
            tracing::error!(error = %e, "fsync of the WAL failed: no more writes until a restart");
            return Err(StorageError::Database(format!("fsync of the WAL failed: {e}")));
        }
        *synced = upto;
        self.durability.fsyncs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Run `f` in a read transaction on a read connection: one consistent
    /// snapshot, taken without waiting for any writer.
    fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T, StorageError>) -> Result<T, StorageError> {
        let conn = self.idle_reader().map_or_else(|| self.connect_reader(), Ok)?;
        conn.execute_batch("BEGIN")?;
        let result = f(&conn);
        self.end_read(conn);
        result
    }

    fn idle_reader(&self) -> Option<Connection> {
        self.readers.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }

    /// End a read transaction and keep the connection for the next read.
    fn end_read(&self, conn: Connection) {
        if !conn.is_autocommit() && conn.execute_batch("COMMIT").is_err() {
            return; // dropped: closing it ends the transaction
        }
        let mut idle = self.readers.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < IDLE_READERS {
            idle.push(conn);
        }
    }

    /// Run `decide` against history read from one snapshot, outside the
    /// write lock; what it decided, and every history query it made with
    /// its answer (to be checked again at commit).
    fn evaluate_on_snapshot<R>(
        &self,
        decide: impl FnOnce(Arc<dyn History>) -> R,
    ) -> Result<(R, Vec<HistoryRead>), StorageError> {
        let conn = self.idle_reader().map_or_else(|| self.connect_reader(), Ok)?;
        conn.execute_batch("BEGIN")?;
        let mut lender = Lender { conn: Some(conn) };
        let result = lender.lend(decide);
        if let Some(conn) = lender.conn.take() {
            self.end_read(conn);
        }
        result
    }
}

/// A history query a policy made, with the answer it got.
type HistoryRead = (HistoryScope, SpendFilter, SpendSummary);

/// Whether every history query of an evaluation still has the answer it
/// had. Policies are deterministic (same request, config and answers, same
/// decision), so if so, evaluating again now would decide the same: the
/// decision may commit as if it had been made under this lock.
fn still_true(conn: &Connection, reads: &[HistoryRead]) -> Result<bool, StorageError> {
    for (scope, filter, answer) in reads {
        if summarize(conn, scope, filter)? != *answer {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Settings of every connection that only change speed: a larger page
/// cache, and statements kept prepared. (Not a memory map: the file grows
/// with every proposal, and SQLite remaps it as it grows, which costs more
/// in page faults and TLB shootdowns than the copies it saves.)
fn tune(conn: &Connection) -> Result<(), StorageError> {
    conn.pragma_update(None, "cache_size", -16_384)?; // KiB: 16 MiB
    conn.set_prepared_statement_cache_capacity(64);
    Ok(())
}

/// Whether a decision made on a snapshot may commit now: a deny always (it
/// moves no money, and stands as of its snapshot); anything else only if
/// every history query it made still has the same answer.
fn stands(conn: &Connection, decided: &Decided, reads: &[HistoryRead]) -> Result<bool, StorageError> {
    Ok(matches!(decided.verdict, Verdict::Deny(_)) || still_true(conn, reads)?)
}

/// How a lending transaction ends.
enum Ending<T> {
    Commit(T),
    /// Nothing to write (a replay): roll back, answer with this.
    Rollback(T),
}

/// A connection inside a transaction, which may be lent to the policies'
/// history for the time of their evaluation.
struct Lender {
    conn: Option<Connection>,
}

impl Lender {
    fn conn(&self) -> Result<&Connection, StorageError> {
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

impl SqliteStorage {
    /// One write-locked transaction in which policies can read history: the
    /// lock is taken first, so nothing commits between what they read and
    /// this transaction's commit.
    fn lending_transaction<T>(
        &self,
        body: impl FnOnce(&mut Lender) -> Result<Ending<T>, StorageError>,
    ) -> Result<T, StorageError> {
        let (mut slot, conn) = self.writer()?;
        self.usable()?;
        let before = conn.total_changes();
        if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
            *slot = Some(conn);
            return Err(e.into());
        }
        let mut lender = Lender { conn: Some(conn) };
        let result = body(&mut lender);
        // A lost connection (a panic while lent) is dropped, which rolls
        // its transaction back; the next writer reconnects.
        let Some(conn) = lender.conn.take() else {
            return match result {
                Err(e) => Err(e),
                Ok(_) => Err(StorageError::Invariant("the transaction's connection was lost".into())),
            };
        };
        let (result, wrote) = match result {
            Ok(Ending::Commit(value)) => match conn.execute_batch("COMMIT") {
                Ok(()) => (Ok(value), conn.total_changes() != before),
                Err(e) => (Err(e.into()), false),
            },
            Ok(Ending::Rollback(value)) => (Ok(value), false),
            Err(e) => (Err(e), false),
        };
        if !conn.is_autocommit() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        let commit = self.counted(wrote);
        *slot = Some(conn);
        drop(slot);
        let value = result?;
        self.sync(commit)?;
        Ok(value)
    }
}

/// The policies' view of history during one evaluation: a connection inside
/// a transaction (a read snapshot, or the write-locked transaction that will
/// commit the decision), and a record of what was asked.
struct LentHistory {
    conn: Mutex<Option<Connection>>,
    reads: Mutex<Vec<HistoryRead>>,
}

impl History for LentHistory {
    fn summarize(&self, scope: &HistoryScope, filter: &SpendFilter) -> Result<SpendSummary, HistoryError> {
        let guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let conn = guard.as_ref().ok_or_else(|| HistoryError("the evaluation has ended".into()))?;
        let answer = summarize(conn, scope, filter).map_err(|e| HistoryError(e.to_string()))?;
        self.reads.lock().unwrap_or_else(|p| p.into_inner()).push((scope.clone(), filter.clone(), answer));
        Ok(answer)
    }
}

/// Committed spend: captured amounts plus the holds of cards still open.
fn summarize(
    conn: &Connection,
    scope: &HistoryScope,
    filter: &SpendFilter,
) -> Result<SpendSummary, StorageError> {
    let (sql, args) = summarize_query(scope, filter)?;
    let (total, count): (i64, i64) = conn
        .prepare_cached(&sql)?
        .query_row(rusqlite::params_from_iter(args.iter().map(|a| a.as_ref())), |row| {
            Ok((row.get(0)?, row.get(1)?))
        })?;
    Ok(SpendSummary { total_units: total, count: u32::try_from(count).unwrap_or(u32::MAX) })
}

type SqlArgs = Vec<Box<dyn rusqlite::ToSql>>;

/// The history query for one filter shape, built so that it is one range
/// scan of `holds_agent_time` (or `holds_wallet_time` when wallet-wide): its
/// cost follows the spends in the window, not the size of the ledger.
fn summarize_query(scope: &HistoryScope, filter: &SpendFilter) -> Result<(String, SqlArgs), StorageError> {
    let mut sql = String::from(
        "SELECT COALESCE(SUM(CASE WHEN r.hold_id IS NULL THEN h.units ELSE r.captured_units END), 0),
                COUNT(CASE WHEN r.hold_id IS NULL OR r.kind = 'captured' THEN 1 END)
         FROM holds h LEFT JOIN hold_resolutions r ON r.hold_id = h.id
         WHERE h.currency = ?1 AND h.received_at_ms >= ?2",
    );
    let mut args: SqlArgs = vec![Box::new(scope.currency.clone()), Box::new(ms(filter.since_ms)?)];
    if !filter.wallet_wide {
        args.push(Box::new(scope.agent_id.clone()));
        sql.push_str(&format!(" AND h.agent_id = ?{}", args.len()));
    }
    if let Some(merchant) = &filter.merchant_id {
        args.push(Box::new(merchant.clone()));
        sql.push_str(&format!(" AND h.merchant_id = ?{}", args.len()));
    }
    if let Some(mcc) = &filter.mcc {
        args.push(Box::new(mcc.clone()));
        sql.push_str(&format!(" AND h.mcc = ?{}", args.len()));
    }
    Ok((sql, args))
}

fn account_id(conn: &Connection, currency: &str, kind: AccountKind) -> Result<Option<i64>, StorageError> {
    Ok(conn
        .query_row(
            "SELECT id FROM accounts WHERE currency = ?1 AND kind = ?2",
            params![currency, kind.as_str()],
            |r| r.get(0),
        )
        .optional()?)
}

fn ensure_accounts(conn: &Connection, currency: &str) -> Result<(), StorageError> {
    for kind in AccountKind::ALL {
        conn.prepare_cached("INSERT OR IGNORE INTO accounts (currency, kind) VALUES (?1, ?2)")?
            .execute(params![currency, kind.as_str()])?;
    }
    Ok(())
}

fn balance_of(conn: &Connection, account: i64) -> Result<i64, StorageError> {
    Ok(conn
        .query_row(
            "SELECT balance_after FROM entries WHERE account_id = ?1 ORDER BY id DESC LIMIT 1",
            params![account],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(0))
}

fn balance(conn: &Connection, currency: &str, kind: AccountKind) -> Result<i64, StorageError> {
    match account_id(conn, currency, kind)? {
        Some(id) => balance_of(conn, id),
        None => Ok(0),
    }
}

/// Post one transfer: a transfer row and its two entries. Refuses to take
/// any account but `funding` below zero.
fn transfer(
    conn: &Connection,
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
    conn.prepare_cached(
        "INSERT INTO transfers (kind, currency, units, debit_account, credit_account, hold_id, created_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![kind.as_str(), currency, units, debit, credit, hold_id, now_ms])?;
    let transfer_id = conn.last_insert_rowid();
    conn.prepare_cached("INSERT INTO entries (transfer_id, account_id, delta, balance_after) VALUES (?1, ?2, ?3, ?4), (?1, ?5, ?6, ?7)")?.execute(params![transfer_id, debit, -units, debit_after, credit, units, credit_after],
    )?;
    Ok(transfer_id)
}

/// Resolve a hold exactly once: the primary key of `hold_resolutions` makes
/// a second resolution fail, whatever raced.
fn resolve_hold(
    conn: &Connection,
    hold_id: i64,
    kind: &str,
    currency: &str,
    cap_units: i64,
    captured_units: i64,
    now_ms: i64,
) -> Result<(), StorageError> {
    let inserted = conn.prepare_cached("INSERT OR IGNORE INTO hold_resolutions (hold_id, kind, captured_units, resolved_at_ms) VALUES (?1, ?2, ?3, ?4)")?.execute(params![hold_id, kind, captured_units, now_ms],
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

const CARD_COLUMNS: &str =
    "c.id, c.spend_id, c.agent_id, c.issuer, c.last4, c.exp_month, c.exp_year, c.cap_units,
     c.currency, c.merchant_id, c.expires_at_ms, c.hold_id, c.cvv_hash, r.kind, r.captured_units";

/// A card row with its hold's resolution, as read by [`CARD_COLUMNS`].
struct CardRow {
    record: CardRecord,
    hold_id: i64,
    cvv_hash: String,
}

fn card_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<(CardRowRaw, i64, String)> {
    Ok((
        CardRowRaw {
            id: row.get(0)?,
            spend_id: row.get(1)?,
            agent_id: row.get(2)?,
            issuer: row.get(3)?,
            last4: row.get(4)?,
            exp_month: row.get(5)?,
            exp_year: row.get(6)?,
            cap_units: row.get(7)?,
            currency: row.get(8)?,
            merchant_id: row.get(9)?,
            expires_at_ms: row.get(10)?,
            resolution: row.get(13)?,
            captured_units: row.get(14)?,
        },
        row.get(11)?,
        row.get(12)?,
    ))
}

struct CardRowRaw {
    id: String,
    spend_id: String,
    agent_id: String,
    issuer: String,
    last4: String,
    exp_month: u8,
    exp_year: u16,
    cap_units: i64,
    currency: String,
    merchant_id: String,
    expires_at_ms: i64,
    resolution: Option<String>,
    captured_units: Option<i64>,
}

impl CardRowRaw {
    fn into_row(self, hold_id: i64, cvv_hash: String) -> Result<CardRow, StorageError> {
        let state = match self.resolution.as_deref() {
            None => CardState::Open,
            Some("captured") => CardState::Used,
            Some("voided") => CardState::Voided,
            Some("expired") => CardState::Expired,
            Some(other) => {
                return Err(StorageError::Invariant(format!("unknown resolution `{other}`")));
            }
        };
        let captured_units = (state == CardState::Used).then_some(self.captured_units).flatten();
        Ok(CardRow {
            record: CardRecord {
                cap: amount(self.cap_units, &self.currency)?,
                id: self.id,
                spend_id: self.spend_id,
                agent_id: self.agent_id,
                issuer: self.issuer,
                last4: self.last4,
                exp_month: self.exp_month,
                exp_year: self.exp_year,
                merchant_id: self.merchant_id,
                expires_at_ms: from_ms(self.expires_at_ms),
                state,
                captured_units,
            },
            hold_id,
            cvv_hash,
        })
    }
}

fn find_card(conn: &Connection, column: &str, value: &str) -> Result<Option<CardRow>, StorageError> {
    let sql = format!(
        "SELECT {CARD_COLUMNS} FROM cards c LEFT JOIN hold_resolutions r ON r.hold_id = c.hold_id WHERE c.{column} = ?1"
    );
    match conn.prepare_cached(&sql)?.query_row(params![value], card_row).optional()? {
        Some((raw, hold_id, cvv_hash)) => Ok(Some(raw.into_row(hold_id, cvv_hash)?)),
        None => Ok(None),
    }
}

/// The columns of a spend with its outcome: the first decision, overridden
/// by the operator's for a spend that waited for approval.
const SPEND_SELECT: &str =
    "SELECT s.id, s.agent_id, s.units, s.currency, s.merchant_id, s.merchant_name, s.mcc,
        s.country, s.purpose, s.received_at_ms, s.status, s.reasons, c.id, a.decision, a.reason
     FROM spends s
     LEFT JOIN cards c ON c.spend_id = s.id
     LEFT JOIN approval_resolutions a ON a.spend_id = s.id";

fn spend_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SpendRow> {
    Ok(SpendRow {
        id: r.get(0)?,
        agent_id: r.get(1)?,
        units: r.get(2)?,
        currency: r.get(3)?,
        merchant: Merchant { id: r.get(4)?, name: r.get(5)?, mcc: r.get(6)?, country: r.get(7)? },
        purpose: r.get(8)?,
        received_at_ms: r.get(9)?,
        status: r.get(10)?,
        reasons: r.get(11)?,
        card_id: r.get(12)?,
        approval: r.get(13)?,
        approval_reason: r.get(14)?,
    })
}

struct SpendRow {
    id: String,
    agent_id: String,
    units: i64,
    currency: String,
    merchant: Merchant,
    purpose: String,
    received_at_ms: i64,
    status: String,
    reasons: String,
    card_id: Option<String>,
    approval: Option<String>,
    approval_reason: Option<String>,
}

impl SpendRow {
    fn into_record(self) -> Result<SpendRecord, StorageError> {
        let mut reasons: Vec<String> = serde_json::from_str(&self.reasons)
            .map_err(|e| StorageError::Invariant(format!("spend reasons: {e}")))?;
        let mut status = SpendStatus::parse(&self.status)
            .ok_or_else(|| StorageError::Invariant(format!("unknown spend status `{}`", self.status)))?;
        match self.approval.as_deref() {
            None => {}
            Some("approved") => status = SpendStatus::Approved,
            Some(_) => {
                status = SpendStatus::Denied;
                reasons.push(self.approval_reason.unwrap_or_default());
            }
        }
        Ok(SpendRecord {
            id: self.id,
            agent_id: self.agent_id,
            amount: amount(self.units, &self.currency)?,
            merchant: self.merchant,
            purpose: self.purpose,
            received_at_ms: from_ms(self.received_at_ms),
            status,
            reasons,
            card_id: self.card_id,
        })
    }
}

fn spend_by_id(conn: &Connection, id: &str) -> Result<Option<SpendRecord>, StorageError> {
    let row = conn
        .prepare_cached(&format!("{SPEND_SELECT} WHERE s.id = ?1"))?
        .query_row(params![id], spend_from_row)
        .optional()?;
    row.map(SpendRow::into_record).transpose()
}

fn insert_spend(
    conn: &Connection,
    spend: &NewSpend,
    status: SpendStatus,
    reasons: &[String],
    pending_terms: Option<(u32, i64)>,
    now_ms: i64,
) -> Result<(), StorageError> {
    let reasons = serde_json::to_string(reasons).map_err(|e| StorageError::Invariant(e.to_string()))?;
    conn.prepare_cached("INSERT INTO spends (id, agent_id, idempotency_key, fingerprint, units, currency, merchant_id, merchant_name,
                             mcc, country, purpose, received_at_ms, status, reasons, card_ttl_seconds,
                             card_cap_units, created_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)")?.execute(params![
            spend.id,
            spend.agent_id,
            spend.idempotency_key,
            spend.fingerprint(),
            spend.amount.units(),
            spend.amount.currency(),
            spend.merchant.id,
            spend.merchant.name,
            spend.merchant.mcc,
            spend.merchant.country,
            spend.purpose,
            ms(spend.received_at_ms)?,
            status.as_str(),
            reasons,
            pending_terms.map(|(ttl, _)| ttl),
            pending_terms.map(|(_, cap)| cap),
            now_ms,
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
    conn: &Connection,
    spend_id: &str,
    agent_id: &str,
    cap: &Amount,
    merchant: &Merchant,
    received_at_ms: i64,
    expires_at_ms: i64,
    now: i64,
) -> Result<i64, StorageError> {
    conn.prepare_cached("INSERT INTO holds (spend_id, agent_id, currency, units, merchant_id, mcc, received_at_ms, expires_at_ms,
                            created_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)")?.execute(params![
            spend_id,
            agent_id,
            cap.currency(),
            cap.units(),
            merchant.id,
            merchant.mcc,
            received_at_ms,
            expires_at_ms,
            now
        ],
    )?;
    let hold_id = conn.last_insert_rowid();
    transfer(conn, TransferKind::Hold, cap.currency(), cap.units(), Some(hold_id), now)?;
    Ok(hold_id)
}

/// The outcome of the part of a proposal that runs after the policies.
fn commit_verdict(
    conn: &Connection,
    spend: &NewSpend,
    decided: Decided,
    cards: &CardIssuance<'_>,
    now_ms: u64,
) -> Result<Proposed, StorageError> {
    let now = ms(now_ms)?;
    let (status, reasons, approved, pending) = match &decided.verdict {
        Verdict::Deny(reasons) => (SpendStatus::Denied, reasons.clone(), None, None),
        Verdict::RequireApproval { reasons, terms } => {
            let (cap, ttl) = card_terms(&spend.amount, terms, cards.default_ttl_seconds);
            (SpendStatus::PendingApproval, reasons.clone(), None, Some((ttl, cap.units())))
        }
        Verdict::Approve(terms) => {
            let (cap, ttl) = card_terms(&spend.amount, terms, cards.default_ttl_seconds);
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
        &serde_json::json!({
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
        now,
    )?;
    Ok(Proposed { spend: record, card: issued, replayed: false })
}

/// The reason of an approval the wallet cannot cover.
pub const INSUFFICIENT_FUNDS: &str = "insufficient funds";

/// How many times a card is drawn again when its PAN is already taken. One
/// test BIN leaves 10^9 numbers, so a collision is rare but real.
const PAN_ATTEMPTS: usize = 8;

/// Issue a card for a hold and store it (hashes only), drawing a new PAN
/// should the issuer hand out one already in use.
#[allow(clippy::too_many_arguments)]
fn issue_card(
    conn: &Connection,
    spend_id: &str,
    agent_id: &str,
    merchant_id: &str,
    cards: &CardIssuance<'_>,
    hold_id: i64,
    cap: &Amount,
    ttl_seconds: u32,
    now_ms: u64,
) -> Result<crate::cards::IssuedCard, StorageError> {
    let now = ms(now_ms)?;
    for _ in 0..PAN_ATTEMPTS {
        let card_id = new_id("card");
        let request = CardRequest {
            card_id: card_id.clone(),
            cap: cap.clone(),
            merchant_id: merchant_id.to_owned(),
            ttl_seconds,
            now_ms,
        };
        let card = cards.issuer.issue(&request).map_err(|e| StorageError::Issuer(e.to_string()))?;
        let pan_hash = cards.key.hash_pan(&card.secrets.pan);
        let taken: bool = conn
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM cards WHERE pan_hash = ?1)")?
            .query_row(params![pan_hash], |r| r.get(0))?;
        if taken {
            continue;
        }
        conn.prepare_cached("INSERT INTO cards (id, hold_id, spend_id, agent_id, issuer, pan_hash, cvv_hash, last4, exp_month, exp_year,
                                cap_units, currency, merchant_id, expires_at_ms, created_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)")?.execute(params![
                card_id,
                hold_id,
                spend_id,
                agent_id,
                cards.issuer.name(),
                pan_hash,
                cards.key.hash_cvv(&card_id, &card.secrets.cvv),
                card.last4,
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
/// (whose write lock orders the chain).
fn append_audit(
    conn: &Connection,
    kind: &str,
    record: &serde_json::Value,
    now: i64,
) -> Result<(), StorageError> {
    let last: Option<(i64, String)> = conn
        .query_row("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()?;
    let (seq, prev_hash) = match last {
        Some((seq, hash)) => (seq + 1, hash),
        None => (1, AUDIT_GENESIS.to_owned()),
    };
    let text = record.to_string();
    let seq_u = u64::try_from(seq).map_err(|_| StorageError::Invariant("audit sequence".into()))?;
    let hash = audit_hash(&prev_hash, seq_u, from_ms(now), kind, &text);
    conn.prepare_cached(
        "INSERT INTO audit (seq, at_ms, kind, record, prev_hash, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![seq, now, kind, text, prev_hash, hash])?;
    Ok(())
}

/// A spend waiting for approval, write-locked: refuses anything else.
fn pending_spend(
    conn: &Connection,
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

fn resolve_approval(
    conn: &Connection,
    spend_id: &str,
    decision: &str,
    reason: &str,
    now: i64,
) -> Result<(), StorageError> {
    let inserted = conn.prepare_cached("INSERT OR IGNORE INTO approval_resolutions (spend_id, decision, reason, resolved_at_ms) VALUES (?1, ?2, ?3, ?4)")?.execute(params![spend_id, decision, reason, now],
    )?;
    if inserted != 1 {
        return Err(StorageError::InvalidState(format!("spend `{spend_id}` is already resolved")));
    }
    append_audit(
        conn,
        "approval",
        &serde_json::json!({ "spend_id": spend_id, "decision": decision, "reason": reason }),
        now,
    )
}

/// The answer already given to a proposal with this idempotency key, if any.
fn replay(conn: &Connection, spend: &NewSpend) -> Result<Option<Proposed>, StorageError> {
    let Some(key) = &spend.idempotency_key else {
        return Ok(None);
    };
    let earlier: Option<(String, String)> = conn
        .query_row(
            "SELECT id, fingerprint FROM spends WHERE agent_id = ?1 AND idempotency_key = ?2",
            params![spend.agent_id, key],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    match earlier {
        None => Ok(None),
        Some((_, fingerprint)) if fingerprint != spend.fingerprint() => {
            Err(StorageError::IdempotencyConflict(key.clone()))
        }
        Some((id, _)) => {
            let spend = spend_by_id(conn, &id)?
                .ok_or_else(|| StorageError::Invariant("replayed spend vanished".into()))?;
            Ok(Some(Proposed { spend, card: None, replayed: true }))
        }
    }
}

/// The operator's approval of a pending spend, once its policies have run
/// again: a deny still wins; otherwise the hold is placed (the card is made
/// when the agent collects it).
fn commit_approval(
    tx: &Connection,
    spend: &SpendRecord,
    decided: Decided,
    default_ttl_seconds: u32,
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
    let (ttl, cap_units): (Option<u32>, Option<i64>) = tx
        .prepare_cached("SELECT card_ttl_seconds, card_cap_units FROM spends WHERE id = ?1")?
        .query_row(params![spend_id], |r| Ok((r.get(0)?, r.get(1)?)))?;
    let recorded = CardTerms {
        ttl_seconds: ttl,
        max_amount: cap_units.map(|u| amount(u, spend.amount.currency())).transpose()?,
    };
    let (cap, ttl) = card_terms(&spend.amount, &recorded.narrowest(terms), default_ttl_seconds);
    if balance(tx, cap.currency(), AccountKind::Available)? < cap.units() {
        return Err(StorageError::InvalidState(format!(
            "{INSUFFICIENT_FUNDS}: spend `{spend_id}` needs {cap}"
        )));
    }
    resolve_approval(tx, spend_id, "approved", "approved by the operator", now)?;
    let received = ms(spend.received_at_ms)?;
    let expires = now + i64::from(ttl) * 1000;
    place_hold(tx, spend_id, &spend.agent_id, &cap, &spend.merchant, received, expires, now)?;
    append_audit(
        tx,
        "approval_policies",
        &json!({ "spend_id": spend_id, "policies": decided.evaluations }),
        now,
    )?;
    spend_by_id(tx, spend_id)?.ok_or_else(|| StorageError::Invariant("approved spend vanished".into()))
}

impl Storage for SqliteStorage {
    fn deposit(
        &self,
        amount: &Amount,
        idempotency_key: Option<&str>,
        now_ms: u64,
    ) -> Result<DepositRecord, StorageError> {
        self.write(|tx| {
            if let Some(key) = idempotency_key {
                let earlier: Option<(String, i64, String)> = tx
                    .query_row(
                        "SELECT d.id, t.units, t.currency FROM deposits d JOIN transfers t ON t.id = d.transfer_id
                         WHERE d.idempotency_key = ?1",
                        params![key],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                    )
                    .optional()?;
                if let Some((id, units, currency)) = earlier {
                    if units != amount.units() || currency != amount.currency() {
                        return Err(StorageError::IdempotencyConflict(key.to_owned()));
                    }
                    return Ok(DepositRecord { id, amount: amount.clone(), replayed: true });
                }
            }
            let now = ms(now_ms)?;
            ensure_accounts(tx, amount.currency())?;
            let transfer_id = transfer(tx, TransferKind::Deposit, amount.currency(), amount.units(), None, now)?;
            let id = new_id("dep");
            tx.prepare_cached("INSERT INTO deposits (id, transfer_id, idempotency_key, created_at_ms) VALUES (?1, ?2, ?3, ?4)")?.execute(params![id, transfer_id, idempotency_key, now],
            )?;
            append_audit(
                tx,
                "deposit",
                &serde_json::json!({
                    "deposit_id": id,
                    "amount": amount.to_decimal().to_string(),
                    "currency": amount.currency(),
                }),
                now,
            )?;
            Ok(DepositRecord { id, amount: amount.clone(), replayed: false })
        })
    }

    fn balances(&self) -> Result<Vec<Balance>, StorageError> {
        self.read(|conn| {
            let mut stmt = conn.prepare("SELECT DISTINCT currency FROM accounts ORDER BY currency")?;
            let currencies: Vec<String> = stmt.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
            currencies
                .into_iter()
                .map(|currency| {
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
        cards: &CardIssuance<'_>,
        now_ms: u64,
        decide: &mut dyn FnMut(Arc<dyn History>) -> Decided,
    ) -> Result<Proposed, StorageError> {
        // The idempotency key first: a retry never runs the policies again.
        if spend.idempotency_key.is_some()
            && let Some(replay) = self.read(|conn| replay(conn, spend))?
        {
            return Ok(replay);
        }
        // Evaluate outside the write lock, so a slow (or hostile) policy
        // delays only its own agent's proposals; commit only if no history
        // the policies read has changed since.
        for _ in 0..OPTIMISTIC_ATTEMPTS {
            let (decided, reads) = self.evaluate_on_snapshot(&mut *decide)?;
            let committed = self.write(|tx| {
                if let Some(replay) = replay(tx, spend)? {
                    return Ok(Some(replay));
                }
                let stands = stands(tx, &decided, &reads)?;
                if !stands {
                    return Ok(None);
                }
                commit_verdict(tx, spend, decided, cards, now_ms).map(Some)
            })?;
            if let Some(proposed) = committed {
                return Ok(proposed);
            }
        }
        // Contended: evaluate under the write lock, where nothing can change.
        self.lending_transaction(|lender| {
            if let Some(replay) = replay(lender.conn()?, spend)? {
                return Ok(Ending::Rollback(replay));
            }
            let (decided, _) = lender.lend(&mut *decide)?;
            commit_verdict(lender.conn()?, spend, decided, cards, now_ms).map(Ending::Commit)
        })
    }

    fn approve(
        &self,
        spend_id: &str,
        default_ttl_seconds: u32,
        approval_ttl_ms: u64,
        now_ms: u64,
        decide: &mut dyn FnMut(&SpendRecord, Arc<dyn History>) -> Decided,
    ) -> Result<SpendRecord, StorageError> {
        // As a proposal: the policies run again outside the write lock, and
        // their decision commits only if what they read still holds.
        for _ in 0..OPTIMISTIC_ATTEMPTS {
            let spend = self.read(|conn| pending_spend(conn, spend_id, approval_ttl_ms, now_ms))?;
            let (decided, reads) = self.evaluate_on_snapshot(|history| decide(&spend, history))?;
            let committed = self.write(|tx| {
                let spend = pending_spend(tx, spend_id, approval_ttl_ms, now_ms)?;
                let stands = stands(tx, &decided, &reads)?;
                if !stands {
                    return Ok(None);
                }
                commit_approval(tx, &spend, decided, default_ttl_seconds, now_ms).map(Some)
            })?;
            if let Some(record) = committed {
                return Ok(record);
            }
        }
        self.lending_transaction(|lender| {
            let spend = pending_spend(lender.conn()?, spend_id, approval_ttl_ms, now_ms)?;
            let (decided, _) = lender.lend(|history| decide(&spend, history))?;
            commit_approval(lender.conn()?, &spend, decided, default_ttl_seconds, now_ms).map(Ending::Commit)
        })
    }

    fn deny(
        &self,
        spend_id: &str,
        reason: &str,
        approval_ttl_ms: u64,
        now_ms: u64,
    ) -> Result<SpendRecord, StorageError> {
        self.write(|tx| {
            pending_spend(tx, spend_id, approval_ttl_ms, now_ms)?;
            resolve_approval(tx, spend_id, "denied", reason, ms(now_ms)?)?;
            spend_by_id(tx, spend_id)?.ok_or_else(|| StorageError::Invariant("denied spend vanished".into()))
        })
    }

    fn expire_approvals(&self, approval_ttl_ms: u64, now_ms: u64) -> Result<usize, StorageError> {
        self.write(|tx| {
            let now = ms(now_ms)?;
            let cutoff = ms(now_ms.saturating_sub(approval_ttl_ms))?;
            let mut stmt = tx.prepare(
                "SELECT s.id FROM spends s LEFT JOIN approval_resolutions a ON a.spend_id = s.id
                 WHERE s.status = 'pending_approval' AND s.received_at_ms <= ?1 AND a.spend_id IS NULL",
            )?;
            let due: Vec<String> =
                stmt.query_map(params![cutoff], |r| r.get(0))?.collect::<Result<_, _>>()?;
            for id in &due {
                resolve_approval(tx, id, "expired", "approval expired", now)?;
            }
            Ok(due.len())
        })
    }

    fn pending_approvals(&self, approval_ttl_ms: u64, now_ms: u64) -> Result<Vec<SpendRecord>, StorageError> {
        self.read(|conn| {
            let cutoff = ms(now_ms.saturating_sub(approval_ttl_ms))?;
            let mut stmt = conn.prepare(&format!(
                "{SPEND_SELECT} WHERE s.status = 'pending_approval' AND s.received_at_ms > ?1 AND a.spend_id IS NULL
                 ORDER BY s.received_at_ms, s.id"
            ))?;
            let rows: Vec<SpendRow> = stmt.query_map(params![cutoff], spend_from_row)?.collect::<Result<_, _>>()?;
            rows.into_iter().map(SpendRow::into_record).collect()
        })
    }

    fn claim_card(
        &self,
        spend_id: &str,
        cards: &CardIssuance<'_>,
        now_ms: u64,
    ) -> Result<Option<IssuedCard>, StorageError> {
        self.write(|tx| {
            type HoldRow = (i64, String, i64, String, i64, Option<String>, Option<String>);
            let hold: Option<HoldRow> = tx
                .query_row(
                    "SELECT h.id, h.agent_id, h.units, h.currency, h.expires_at_ms, c.id, r.kind
                     FROM holds h LEFT JOIN cards c ON c.hold_id = h.id
                     LEFT JOIN hold_resolutions r ON r.hold_id = h.id WHERE h.spend_id = ?1",
                    params![spend_id],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?)),
                )
                .optional()?;
            let Some((hold_id, agent_id, units, currency, expires_at, None, None)) = hold else {
                return Ok(None);
            };
            let left_ms = expires_at - ms(now_ms)?;
            if left_ms < 1000 {
                return Ok(None);
            }
            let merchant_id: String = tx
                .prepare_cached("SELECT merchant_id FROM spends WHERE id = ?1")?
                .query_row(params![spend_id], |r| r.get(0))?;
            let ttl = u32::try_from(left_ms / 1000).unwrap_or(u32::MAX).min(cards.default_ttl_seconds);
            let cap = amount(units, &currency)?;
            let card = issue_card(tx, spend_id, &agent_id, &merchant_id, cards, hold_id, &cap, ttl, now_ms)?;
            Ok(Some(card))
        })
    }

    fn spends(&self, agent_id: Option<&str>, limit: usize) -> Result<Vec<SpendRecord>, StorageError> {
        self.read(|conn| {
            let mut stmt = conn.prepare(&format!(
                "{SPEND_SELECT} WHERE ?1 IS NULL OR s.agent_id = ?1 ORDER BY s.created_at_ms DESC, s.id LIMIT ?2"
            ))?;
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let rows: Vec<SpendRow> =
                stmt.query_map(params![agent_id, limit], spend_from_row)?.collect::<Result<_, _>>()?;
            rows.into_iter().map(SpendRow::into_record).collect()
        })
    }

    fn authorize(
        &self,
        request: &AuthorizationRequest,
        key: &CardKey,
        now_ms: u64,
    ) -> Result<AuthorizationOutcome, StorageError> {
        self.write(|tx| {
            let now = ms(now_ms)?;
            let card = find_card(tx, "pan_hash", &key.hash_pan(&request.pan))?;
            let view = card.as_ref().map(|c| CardView {
                card_id: c.record.id.clone(),
                cvv_hash: c.cvv_hash.clone(),
                exp_month: c.record.exp_month,
                exp_year: c.record.exp_year,
                cap: c.record.cap.clone(),
                merchant_id: c.record.merchant_id.clone(),
                expires_at_ms: c.record.expires_at_ms,
                state: c.record.state,
            });
            let decision = decide(key, view.as_ref(), request, now_ms);
            if let Some(card) = &card {
                let cap = card.record.cap.units();
                let currency = card.record.cap.currency();
                match decision {
                    Ok(()) => resolve_hold(tx, card.hold_id, "captured", currency, cap, request.amount.units(), now)?,
                    // Seen past its life before the sweep got to it: expire it now.
                    Err(DeclineCode::CardExpired) if card.record.state == CardState::Open => {
                        resolve_hold(tx, card.hold_id, "expired", currency, cap, 0, now)?
                    }
                    Err(_) => {}
                }
            }
            let card_id = card.as_ref().map(|c| c.record.id.clone());
            tx.prepare_cached("INSERT INTO authorizations (card_id, units, currency, merchant_id, approved, decline_code, created_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)")?.execute(params![
                    card_id,
                    request.amount.units(),
                    request.amount.currency(),
                    request.merchant_id,
                    decision.is_ok(),
                    decision.err().map(DeclineCode::as_str),
                    now
                ],
            )?;
            append_audit(
                tx,
                "authorization",
                &serde_json::json!({
                    "card_id": card_id,
                    "amount": request.amount.to_decimal().to_string(),
                    "currency": request.amount.currency(),
                    "merchant_id": request.merchant_id,
                    "approved": decision.is_ok(),
                    "decline_code": decision.err().map(DeclineCode::as_str),
                }),
                now,
            )?;
            Ok(AuthorizationOutcome { approved: decision.is_ok(), decline_code: decision.err(), card_id })
        })
    }

    fn void_card(&self, card_id: &str, now_ms: u64) -> Result<CardRecord, StorageError> {
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
            append_audit(tx, "card_void", &serde_json::json!({ "card_id": card_id }), now)?;
            find_card(tx, "id", card_id)?
                .map(|c| c.record)
                .ok_or_else(|| StorageError::Invariant("voided card vanished".into()))
        })
    }

    fn expire_cards(&self, now_ms: u64) -> Result<usize, StorageError> {
        self.write(|tx| {
            let now = ms(now_ms)?;
            let swept_to: i64 = tx
                .prepare_cached("SELECT COALESCE(MAX(swept_to_ms), 0) FROM expiry_sweeps")?
                .query_row([], |r| r.get(0))?;
            let overlap = i64::try_from(SWEEP_OVERLAP.as_millis()).unwrap_or(i64::MAX);
            let mut stmt = tx.prepare(EXPIRY_DUE_SQL)?;
            let due: Vec<(i64, String, i64)> = stmt
                .query_map(params![swept_to.saturating_sub(overlap), now], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })?
                .collect::<Result<_, _>>()?;
            for (hold_id, currency, units) in &due {
                resolve_hold(tx, *hold_id, "expired", currency, *units, 0, now)?;
            }
            // Move the mark on when it is worth a row: after a release, or a
            // minute on. Between marks a sweep rescans at most that much.
            if now > swept_to && (!due.is_empty() || now - swept_to >= 60_000) {
                tx.prepare_cached("INSERT INTO expiry_sweeps (swept_to_ms) VALUES (?1)")?
                    .execute(params![now])?;
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
            let sql = format!(
                "SELECT {CARD_COLUMNS} FROM cards c LEFT JOIN hold_resolutions r ON r.hold_id = c.hold_id
                 WHERE ?1 IS NULL OR c.agent_id = ?1 ORDER BY c.created_at_ms DESC, c.id"
            );
            let mut stmt = conn.prepare(&sql)?;
            let rows: Vec<_> = stmt.query_map(params![agent_id], card_row)?.collect::<Result<_, _>>()?;
            rows.into_iter().map(|(raw, hold, cvv)| raw.into_row(hold, cvv).map(|c| c.record)).collect()
        })
    }

    fn audit(&self, kind: &str, record: &serde_json::Value, now_ms: u64) -> Result<(), StorageError> {
        self.write(|tx| append_audit(tx, kind, record, ms(now_ms)?))
    }

    fn audit_records(&self, after: u64, limit: usize) -> Result<Vec<AuditRecord>, StorageError> {
        self.read(|conn| read_audit(conn, after, limit))
    }

    fn verify_audit(&self) -> Result<Result<u64, AuditBreak>, StorageError> {
        self.read(|conn| Ok(verify_chain(&read_audit(conn, 0, usize::MAX)?)))
    }

    fn check_invariants(&self) -> Result<(), String> {
        self.read(|conn| Ok(check_invariants(conn))).map_err(|e| e.to_string())?
    }
}

fn read_audit(conn: &Connection, after: u64, limit: usize) -> Result<Vec<AuditRecord>, StorageError> {
    let mut stmt = conn.prepare(
        "SELECT seq, at_ms, kind, record, prev_hash, hash FROM audit WHERE seq > ?1 ORDER BY seq LIMIT ?2",
    )?;
    let after = i64::try_from(after).unwrap_or(i64::MAX);
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = stmt.query_map(params![after, limit], |r| {
        Ok(AuditRecord {
            seq: from_ms(r.get(0)?),
            at_ms: from_ms(r.get(1)?),
            kind: r.get(2)?,
            record: r.get(3)?,
            prev_hash: r.get(4)?,
            hash: r.get(5)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn check_invariants(conn: &Connection) -> Result<(), String> {
    let q = |sql: &str| -> Result<Vec<(String, i64)>, String> {
        let mut stmt = conn.prepare(sql).map_err(|e| e.to_string())?;
        stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .map_err(|e| e.to_string())?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())
    };
    // Every transfer has exactly two entries that cancel out.
    if let Some((transfer, n)) = q(
        "SELECT CAST(transfer_id AS TEXT), COUNT(*) FROM entries GROUP BY transfer_id HAVING COUNT(*) <> 2 OR SUM(delta) <> 0",
    )?.into_iter().next() {
        return Err(format!("transfer {transfer} has {n} entries that do not cancel out"));
    }
    // The accounts of each currency sum to zero.
    if let Some((currency, sum)) =
        q("SELECT a.currency, SUM(e.delta) FROM entries e JOIN accounts a ON a.id = e.account_id
         GROUP BY a.currency HAVING SUM(e.delta) <> 0")?
        .into_iter()
        .next()
    {
        return Err(format!("{currency} accounts sum to {sum}, not zero"));
    }
    // Each account's running balance is the sum of its entries so far.
    if let Some((account, bad)) = q("SELECT CAST(account_id AS TEXT), COUNT(*) FROM (
                                 SELECT account_id, balance_after,
                                        SUM(delta) OVER (PARTITION BY account_id ORDER BY id) AS running
                                 FROM entries)
                             WHERE balance_after <> running GROUP BY account_id")?
    .into_iter()
    .next()
    {
        return Err(format!("account {account} has {bad} entries with a wrong running balance"));
    }
    let currencies = q("SELECT DISTINCT currency, 0 FROM accounts")?;
    for (currency, _) in currencies {
        let bal = |kind| balance(conn, &currency, kind).map_err(|e| e.to_string());
        let (available, held, spent, funding) = (
            bal(AccountKind::Available)?,
            bal(AccountKind::Held)?,
            bal(AccountKind::Spent)?,
            bal(AccountKind::Funding)?,
        );
        let one = |sql: &str| -> Result<i64, String> {
            conn.query_row(sql, params![currency], |r| r.get(0)).map_err(|e| e.to_string())
        };
        let deposits =
            one("SELECT COALESCE(SUM(units), 0) FROM transfers WHERE kind = 'deposit' AND currency = ?1")?;
        if available < 0 || held < 0 || spent < 0 {
            return Err(format!("{currency}: a balance is negative ({available}/{held}/{spent})"));
        }
        if available + held + spent != deposits || -funding != deposits {
            return Err(format!(
                "{currency}: available {available} + held {held} + spent {spent} != deposits {deposits}"
            ));
        }
        let open = one(
            "SELECT COALESCE(SUM(h.units), 0) FROM holds h LEFT JOIN hold_resolutions r ON r.hold_id = h.id
                        WHERE r.hold_id IS NULL AND h.currency = ?1",
        )?;
        if open != held {
            return Err(format!("{currency}: held {held} but open holds add up to {open}"));
        }
        let captured = one("SELECT COALESCE(SUM(r.captured_units), 0) FROM hold_resolutions r JOIN holds h ON h.id = r.hold_id
                            WHERE h.currency = ?1")?;
        if captured != spent {
            return Err(format!("{currency}: spent {spent} but captures add up to {captured}"));
        }
    }
    // Each hold: one hold transfer, and once resolved, transfers that move
    // exactly its amount out of `held`.
    if let Some((hold, n)) = q("SELECT CAST(h.id AS TEXT), COUNT(t.id) FROM holds h LEFT JOIN transfers t ON t.hold_id = h.id AND t.kind = 'hold'
                        GROUP BY h.id HAVING COUNT(t.id) <> 1")?.into_iter().next() {
        return Err(format!("hold {hold} has {n} hold transfers"));
    }
    if let Some((hold, _)) = q("SELECT CAST(h.id AS TEXT), 0 FROM holds h JOIN hold_resolutions r ON r.hold_id = h.id
                        WHERE h.units <> (SELECT COALESCE(SUM(t.units), 0) FROM transfers t WHERE t.hold_id = h.id AND t.kind IN ('capture', 'release'))
                           OR r.captured_units > h.units")?.into_iter().next() {
        return Err(format!("hold {hold} was resolved with the wrong amounts"));
    }
    if let Some((hold, _)) = q("SELECT CAST(h.id AS TEXT), 0 FROM holds h LEFT JOIN hold_resolutions r ON r.hold_id = h.id
                        WHERE r.hold_id IS NULL AND EXISTS (SELECT 1 FROM transfers t WHERE t.hold_id = h.id AND t.kind <> 'hold')")?.into_iter().next() {
        return Err(format!("open hold {hold} has money moved out of it"));
    }
    // A hold without a card only while an approved-after-escalation spend
    // waits for its agent to collect the card.
    if let Some((hold, _)) =
        q("SELECT CAST(h.id AS TEXT), 0 FROM holds h LEFT JOIN cards c ON c.hold_id = h.id
                        LEFT JOIN approval_resolutions a ON a.spend_id = h.spend_id
                        WHERE c.id IS NULL AND (a.decision IS NULL OR a.decision <> 'approved')")?
        .into_iter()
        .next()
    {
        return Err(format!("hold {hold} has no card and no approval"));
    }
    // Cards and holds go together, and only approved spends have them.
    if let Some((card, _)) = q(
        "SELECT c.id, 0 FROM cards c LEFT JOIN holds h ON h.id = c.hold_id WHERE h.id IS NULL OR h.spend_id <> c.spend_id OR h.units <> c.cap_units",
    )?.into_iter().next() {
        return Err(format!("card {card} has no matching hold"));
    }
    if let Some((spend, _)) = q("SELECT s.id, 0 FROM spends s LEFT JOIN holds h ON h.spend_id = s.id
                 LEFT JOIN approval_resolutions a ON a.spend_id = s.id
                 WHERE (s.status = 'approved' OR COALESCE(a.decision, '') = 'approved') <> (h.id IS NOT NULL)")?
    .into_iter()
    .next()
    {
        return Err(format!("spend {spend}: approved if and only if it holds money, which is not the case"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plan SQLite chose, one line per step.
    pub(super) fn plan(conn: &Connection, sql: &str, args: &[&dyn rusqlite::ToSql]) -> String {
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let rows = stmt.query_map(args, |r| r.get::<_, String>(3)).unwrap();
        rows.map(Result::unwrap).collect::<Vec<_>>().join("\n")
    }

    /// The queries on the paths of a spend and of a charge must stay
    /// index lookups or range scans as the ledger grows: no full scans.
    #[test]
    fn hot_queries_use_their_indexes() {
        let dir = tempfile::tempdir().unwrap();
        let storage = SqliteStorage::open(&dir.path().join("db")).unwrap();
        let conn = storage.conn.lock().unwrap();
        let conn = conn.as_ref().unwrap();
        let scope = HistoryScope { agent_id: "bot".into(), currency: "USD".into() };
        for (wallet_wide, merchant, mcc, index) in [
            (false, None, None, "holds_agent_time"),
            (false, Some("m.com"), Some("5734"), "holds_agent_time"),
            (true, None, None, "holds_wallet_time"),
            (true, Some("m.com"), None, "holds_wallet_time"),
        ] {
            let filter = SpendFilter {
                since_ms: 0,
                merchant_id: merchant.map(Into::into),
                mcc: mcc.map(Into::into),
                wallet_wide,
            };
            let (sql, args) = summarize_query(&scope, &filter).unwrap();
            let args: Vec<&dyn rusqlite::ToSql> = args.iter().map(|a| a.as_ref()).collect();
            let plan = plan(conn, &sql, &args);
            assert!(plan.contains(&format!("USING INDEX {index}")), "{filter:?}:\n{plan}");
            assert!(!plan.contains("SCAN h"), "{filter:?}:\n{plan}");
        }
        let card = format!(
            "SELECT {CARD_COLUMNS} FROM cards c LEFT JOIN hold_resolutions r ON r.hold_id = c.hold_id WHERE c.pan_hash = ?1"
        );
        let p = plan(conn, &card, &[&"x"]);
        assert!(p.contains("SEARCH c USING INDEX sqlite_autoindex_cards"), "{p}");
        let p = plan(
            conn,
            "SELECT balance_after FROM entries WHERE account_id = ?1 ORDER BY id DESC LIMIT 1",
            &[&1],
        );
        assert!(p.contains("entries_account"), "{p}");
        let p = plan(conn, EXPIRY_DUE_SQL, &[&0, &1]);
        assert!(p.contains("SEARCH h USING INDEX holds_expiry"), "{p}");
        let p = plan(
            conn,
            "SELECT id, fingerprint FROM spends WHERE agent_id = ?1 AND idempotency_key = ?2",
            &[&"a", &"k"],
        );
        assert!(p.contains("spends_idempotency"), "{p}");
    }

    #[test]
    fn every_write_is_fsynced_before_it_returns_and_concurrent_writes_share_fsyncs() {
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir().unwrap();
        let storage = Arc::new(SqliteStorage::open(&dir.path().join("db")).unwrap());
        let usd = |u| Amount::from_units(u, "USD").unwrap();
        let durability = &storage.durability;
        // One at a time: an fsync each, covering exactly what was committed.
        for i in 1..=5 {
            storage.deposit(&usd(100), None, 1_000).unwrap();
            assert_eq!(durability.committed.load(Ordering::Acquire), i);
            assert_eq!(*durability.synced.lock().unwrap(), i, "returned before its commit was synced");
            assert_eq!(durability.fsyncs.load(Ordering::Relaxed), i);
        }
        // Nothing written, nothing to sync.
        storage.write(|_| Ok(())).unwrap();
        assert_eq!(durability.fsyncs.load(Ordering::Relaxed), 5);
        // Sixteen at once: everything synced by the end, with fsyncs shared.
        std::thread::scope(|s| {
            for _ in 0..16 {
                let storage = &storage;
                s.spawn(move || {
                    for _ in 0..20 {
                        storage.deposit(&usd(1), None, 1_000).unwrap();
                    }
                });
            }
        });
        let (committed, synced) =
            (durability.committed.load(Ordering::Acquire), *durability.synced.lock().unwrap());
        assert_eq!((committed, synced), (5 + 320, 5 + 320));
        let fsyncs = durability.fsyncs.load(Ordering::Relaxed);
        assert!(fsyncs < 5 + 320, "{fsyncs} fsyncs for 325 commits: none shared");
        storage.check_invariants().unwrap();
    }
}
