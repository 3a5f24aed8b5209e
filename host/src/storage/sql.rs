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

mod audit;
pub(crate) mod cards;
pub(crate) mod history;
mod invariants;
pub(crate) mod ledger;
mod mandates;
mod optimistic;
pub(crate) mod registry;
pub(crate) mod spends;
mod store;
mod value;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

pub use optimistic::Lender;
pub(crate) use value::args;
pub use value::{Arg, FromValue, Row, Value};

use audit::append_audit;
use cards::authorize;
use ledger::resolve_hold;
use spends::{agent_revoked, resolve_approval};

use super::{Actor, AuthorizationOutcome, Conflict, StorageError};
use crate::audit::AuditKey;
use crate::cards::{AuthorizationRequest, CardKey};
use crate::money::Amount;

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

/// Open holds that lapsed in `(?1, ?2]`: a range of `holds_expiry`.
pub(crate) const EXPIRY_DUE_SQL: &str = "SELECT h.id, h.currency, h.units FROM holds h
     LEFT JOIN hold_resolutions r ON r.hold_id = h.id
     WHERE h.expires_at_ms > ?1 AND h.expires_at_ms <= ?2 AND r.hold_id IS NULL";

pub(crate) fn ms(value: u64) -> Result<i64, StorageError> {
    i64::try_from(value).map_err(|_| {
        StorageError::Conflict(Conflict::TimeOutOfRange, format!("time {value} ms is out of range"))
    })
}

pub(crate) fn from_ms(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn amount(units: i64, currency: &str) -> Result<Amount, StorageError> {
    Amount::from_units(units, currency).map_err(|e| StorageError::Invariant(format!("stored amount: {e}")))
}

/// Record a resolution that may happen once: a hold's, a spend's approval,
/// a mandate's answer or end. `insert` is an `INSERT … ON CONFLICT DO
/// NOTHING` into a table keyed by what it resolves, so the second of two
/// resolutions, even racing from another connection or daemon, inserts
/// nothing and is refused as `conflict`, saying `message`; its transaction
/// then rolls back whatever it did before.
fn resolve_once(
    conn: &dyn Conn,
    insert: &str,
    args: &[Arg<'_>],
    conflict: Conflict,
    message: impl FnOnce() -> String,
) -> Result<(), StorageError> {
    match conn.execute(insert, args)? {
        1 => Ok(()),
        _ => Err(StorageError::Conflict(conflict, message())),
    }
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
}
