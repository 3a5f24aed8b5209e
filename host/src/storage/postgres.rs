//! The shared store: one PostgreSQL database that several daemons use at
//! once. The same SQL as SQLite ([`super::sql`]); what differs is how
//! transactions are made safe across processes that share nothing else.
//!
//! - **Writes are serial across every daemon.** Each write transaction's
//!   first statement takes a transaction-scoped advisory lock
//!   (`pg_advisory_xact_lock`), released by its commit or rollback — or by
//!   the server, when a daemon dies mid-transaction and its connection
//!   closes. Taken first, in READ COMMITTED, every later statement of the
//!   transaction sees every write committed before it: the transaction
//!   runs as if alone, exactly as SQLite's `BEGIN IMMEDIATE`. So the
//!   atomicity of a policy's view of history with its commit (docs/contract/money.md),
//!   exactly-once holds, idempotency keys and the audit chain hold across
//!   daemons by the same code that keeps them in one.
//! - **Reads are snapshots** (REPEATABLE READ, READ ONLY) and never wait for
//!   the lock; policies evaluate on one, as with SQLite.
//! - **Durability is the server's**: a commit returns once PostgreSQL has
//!   flushed it (`synchronous_commit` as the server sets it; on by default).
//!
//! One database holds one wallet (the lock is per database).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::error::Error;
use std::time::Duration;

use bytes::BytesMut;
use postgres::types::{IsNull, ToSql, Type, to_sql_checked};
use postgres::{Client, NoTls, Statement};

use super::StorageError;
use super::sql::{Arg, Conn, Ending, Engine, Lender, Row, SqlStore, Value};

/// The advisory lock every write transaction holds ("SGWR").
const WRITE_LOCK: i64 = 0x5347_5752;
/// The advisory lock held while migrating ("SGMG").
const MIGRATION_LOCK: i64 = 0x5347_4d47;

/// The schema, in order. A database is at version N when the first N have
/// been applied; each runs in its own transaction with its record.
const MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/postgres/0001_ledger.sql"),
    include_str!("../../migrations/postgres/0002_daemon.sql"),
    include_str!("../../migrations/postgres/0003_history_covering.sql"),
    include_str!("../../migrations/postgres/0004_revocation_and_authorizations.sql"),
    include_str!("../../migrations/postgres/0005_token_labels_and_uses.sql"),
    include_str!("../../migrations/postgres/0006_mandates.sql"),
];

/// How long a connection may wait for the write lock (or any lock) before
/// the statement fails, like SQLite's busy timeout.
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection left idle inside a transaction this long is closed by the
/// server, which rolls the transaction back and frees the write lock: a
/// daemon that hangs cannot stop the others for longer.
pub const IDLE_IN_TRANSACTION_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a request waits for a free connection of the pool.
pub const POOL_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections per daemon, unless configured.
pub const DEFAULT_POOL_SIZE: u32 = 16;

/// The PostgreSQL store.
pub type PgStorage = SqlStore<PgEngine>;

impl PgStorage {
    /// Connect to the database at `url` (`postgres://user@host:port/db`),
    /// with a pool of up to `pool_size` connections, and apply every
    /// migration not yet applied (taking a lock, so daemons starting
    /// together migrate once).
    pub fn connect(url: &str, pool_size: u32) -> Result<Self, StorageError> {
        let mut config: postgres::Config =
            url.parse().map_err(|e| StorageError::Database(format!("invalid database URL: {e}")))?;
        config
            .application_name("spendguard")
            .connect_timeout(Duration::from_secs(10))
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(30));
        let manager = PgManager { config: config.clone() };
        {
            let conn = manager.open()?;
            migrate(&mut conn.client.borrow_mut())?;
        }
        let pool = r2d2::Pool::builder()
            .max_size(pool_size.max(1))
            .min_idle(Some(1))
            .connection_timeout(POOL_TIMEOUT)
            // A broken connection is found by its next statement failing
            // (and `has_broken`); a test query on every checkout would add a
            // round trip to every transaction.
            .test_on_check_out(false)
            .build(manager)
            .map_err(|e| StorageError::Database(format!("cannot connect to PostgreSQL: {e}")))?;
        let target = describe(&config);
        Ok(SqlStore::new(PgEngine { pool: Some(pool), target }))
    }
}

/// Where a config points, for messages: never the password.
fn describe(config: &postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(postgres::config::Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "postgres://{}@{host}:{port}/{}",
        config.get_user().unwrap_or(""),
        config.get_dbname().unwrap_or("")
    )
}

impl From<postgres::Error> for StorageError {
    fn from(e: postgres::Error) -> Self {
        // The server's own message, with its detail, when it sent one.
        match e.as_db_error() {
            Some(db) => StorageError::Database(match db.detail() {
                Some(detail) => format!("{}: {detail}", db.message()),
                None => db.message().to_owned(),
            }),
            None => StorageError::Database(e.to_string()),
        }
    }
}

impl From<r2d2::Error> for StorageError {
    fn from(e: r2d2::Error) -> Self {
        StorageError::Database(format!("no database connection: {e}"))
    }
}

/// Apply the migrations not yet applied, under the migration lock.
fn migrate(client: &mut Client) -> Result<(), StorageError> {
    client.batch_execute(
        "SET client_min_messages = warning;
         CREATE TABLE IF NOT EXISTS spendguard_migrations (
             version    BIGINT PRIMARY KEY,
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
         )",
    )?;
    client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])?;
    let result = (|| {
        let applied: i64 =
            client.query_one("SELECT COALESCE(MAX(version), 0) FROM spendguard_migrations", &[])?.get(0);
        let known = MIGRATIONS.len() as i64;
        if applied > known {
            return Err(StorageError::Database(format!(
                "the database is at schema version {applied}, newer than this spendguard knows ({known}): upgrade spendguard"
            )));
        }
        for (version, sql) in (1_i64..).zip(MIGRATIONS).skip(applied as usize) {
            let mut tx = client.transaction()?;
            tx.batch_execute(sql).map_err(|e| {
                StorageError::Database(format!("migration {version}: {}", StorageError::from(e)))
            })?;
            tx.execute("INSERT INTO spendguard_migrations (version) VALUES ($1)", &[&version])?;
            tx.commit()?;
        }
        Ok(())
    })();
    let unlocked = client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]);
    result?;
    unlocked?;
    Ok(())
}

/// A pool of connections to one database.
pub struct PgEngine {
    /// `None` only while being dropped.
    pool: Option<r2d2::Pool<PgManager>>,
    /// The database, for messages (no password).
    target: String,
}

impl std::fmt::Debug for PgEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStorage").field("database", &self.target).finish_non_exhaustive()
    }
}

/// Opens connections for the pool, each set up for spendguard's sessions.
#[derive(Debug)]
pub struct PgManager {
    config: postgres::Config,
}

impl PgManager {
    fn open(&self) -> Result<PgConn, StorageError> {
        let mut client = self.config.connect(NoTls)?;
        client.batch_execute(&format!(
            "SET lock_timeout = {}; SET idle_in_transaction_session_timeout = {}",
            LOCK_TIMEOUT.as_millis(),
            IDLE_IN_TRANSACTION_TIMEOUT.as_millis()
        ))?;
        Ok(PgConn { client: RefCell::new(client), statements: RefCell::default(), open: Cell::new(false) })
    }
}

impl r2d2::ManageConnection for PgManager {
    type Connection = PgConn;
    type Error = StorageError;

    fn connect(&self) -> Result<PgConn, StorageError> {
        self.open()
    }

    fn is_valid(&self, conn: &mut PgConn) -> Result<(), StorageError> {
        conn.client.get_mut().simple_query("")?;
        Ok(())
    }

    /// Closed, or given back with its transaction still open (a panic
    /// while it was lent, a failed rollback): never reused, so no one
    /// inherits a transaction, or the write lock, that is not theirs.
    fn has_broken(&self, conn: &mut PgConn) -> bool {
        conn.open.get() || conn.client.get_mut().is_closed()
    }
}

/// One connection, with its prepared statements (each SQL text is parsed by
/// the server once per connection).
pub struct PgConn {
    client: RefCell<Client>,
    statements: RefCell<HashMap<String, Statement>>,
    /// Inside a transaction this module began and has not yet ended.
    open: Cell<bool>,
}

impl std::fmt::Debug for PgConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgConn").field("open", &self.open.get()).finish_non_exhaustive()
    }
}

impl PgConn {
    fn batch(&self, sql: &str) -> Result<(), StorageError> {
        Ok(self.client.borrow_mut().batch_execute(sql)?)
    }

    /// Begin a transaction (with `then`, in the same round trip).
    fn begin(&self, sql: &str) -> Result<(), StorageError> {
        self.open.set(true);
        self.batch(sql)
    }

    /// End the transaction: commit or roll back. Should that fail, the
    /// connection stays marked open, and the pool closes it.
    fn end(&self, sql: &str) -> Result<(), StorageError> {
        self.batch(sql)?;
        self.open.set(false);
        Ok(())
    }

    fn statement(&self, sql: &str) -> Result<Statement, StorageError> {
        if let Some(statement) = self.statements.borrow().get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.client.borrow_mut().prepare(&numbered(sql))?;
        self.statements.borrow_mut().insert(sql.to_owned(), statement.clone());
        Ok(statement)
    }
}

/// `?N` placeholders as PostgreSQL writes them (`$N`). The shared SQL has
/// no `?` anywhere else (no string literal holds one).
fn numbered(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '?' && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('$');
        } else {
            out.push(c);
        }
    }
    out
}

/// A pooled connection is a [`Conn`]: what the shared SQL runs on.
type Pooled = r2d2::PooledConnection<PgManager>;

impl Conn for Pooled {
    fn rows(&self, sql: &str, args: &[Arg<'_>]) -> Result<Vec<Row>, StorageError> {
        let statement = self.statement(sql)?;
        let params: Vec<&(dyn ToSql + Sync)> = args.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
        let rows = self.client.borrow_mut().query(&statement, &params)?;
        rows.iter().map(row).collect()
    }

    fn execute(&self, sql: &str, args: &[Arg<'_>]) -> Result<u64, StorageError> {
        let statement = self.statement(sql)?;
        let params: Vec<&(dyn ToSql + Sync)> = args.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
        Ok(self.client.borrow_mut().execute(&statement, &params)?)
    }
}

/// A result row as [`Value`]s, by each column's type. The schema has only
/// integers, text and bytes (and booleans from expressions); any other type
/// is an error, so a numeric or float never passes as something else.
fn row(r: &postgres::Row) -> Result<Row, StorageError> {
    let mut values = Vec::with_capacity(r.len());
    for (i, column) in r.columns().iter().enumerate() {
        let ty = column.type_();
        let value = if *ty == Type::INT8 {
            r.try_get::<_, Option<i64>>(i)?.map(Value::Int)
        } else if *ty == Type::INT4 {
            r.try_get::<_, Option<i32>>(i)?.map(|v| Value::Int(v.into()))
        } else if *ty == Type::INT2 {
            r.try_get::<_, Option<i16>>(i)?.map(|v| Value::Int(v.into()))
        } else if *ty == Type::BOOL {
            r.try_get::<_, Option<bool>>(i)?.map(|v| Value::Int(v.into()))
        } else if [Type::TEXT, Type::VARCHAR, Type::BPCHAR, Type::NAME].contains(ty) {
            r.try_get::<_, Option<String>>(i)?.map(Value::Text)
        } else if *ty == Type::BYTEA {
            r.try_get::<_, Option<Vec<u8>>>(i)?.map(Value::Blob)
        } else {
            return Err(StorageError::Database(format!(
                "column `{}` is of type {ty}, which spendguard never reads (cast it to BIGINT or TEXT)",
                column.name()
            )));
        };
        values.push(value.unwrap_or(Value::Null));
    }
    Ok(Row(values))
}

impl ToSql for Arg<'_> {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        match *self {
            Arg::Null => Ok(IsNull::Yes),
            Arg::Int(v) if *ty == Type::INT8 => v.to_sql(ty, out),
            Arg::Int(v) if *ty == Type::INT4 => i32::try_from(v)?.to_sql(ty, out),
            Arg::Int(v) if *ty == Type::INT2 => i16::try_from(v)?.to_sql(ty, out),
            Arg::Text(s) if <&str as ToSql>::accepts(ty) => s.to_sql(ty, out),
            Arg::Blob(b) if *ty == Type::BYTEA => b.to_sql(ty, out),
            arg => Err(format!("cannot pass {arg:?} as a parameter of type {ty}").into()),
        }
    }

    /// Every type, so that a null goes anywhere; `to_sql` refuses a value
    /// of the wrong kind.
    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

impl PgEngine {
    fn connection(&self) -> Result<Pooled, StorageError> {
        let pool = self.pool.as_ref().ok_or_else(|| StorageError::Database("the store is closed".into()))?;
        Ok(pool.get()?)
    }
}

impl Drop for PgEngine {
    /// A `postgres::Client` blocks on a runtime of its own to close its
    /// connection, which tokio forbids on a thread that drives async tasks;
    /// the last reference to the store may go on one (a daemon shutting
    /// down). There, the pool and its connections close on a thread of
    /// their own.
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take()
            && tokio::runtime::Handle::try_current().is_ok()
        {
            let _ = std::thread::spawn(move || drop(pool)).join();
        }
    }
}

impl Engine for PgEngine {
    type Conn = Pooled;
    const QUICK_READS: bool = false;
    const QUEUED_WRITES: bool = false;

    fn begin_read(&self) -> Result<Pooled, StorageError> {
        let conn = self.connection()?;
        conn.begin("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")?;
        Ok(conn)
    }

    fn end_read(&self, conn: Pooled) {
        // A read-only transaction has nothing to keep: roll it back. Should
        // even that fail, the pool closes the connection rather than reuse it.
        let _ = conn.end("ROLLBACK");
    }

    fn transaction<T>(
        &self,
        body: impl FnOnce(&mut Lender<Pooled>) -> Result<Ending<T>, StorageError>,
    ) -> Result<T, StorageError> {
        let conn = self.connection()?;
        // The lock first, in the same round trip: nothing this transaction
        // reads can change before it commits.
        if let Err(e) = conn.begin(&format!("BEGIN; SELECT pg_advisory_xact_lock({WRITE_LOCK})")) {
            let _ = conn.end("ROLLBACK");
            return Err(e);
        }
        let mut lender = Lender::new(conn);
        let result = body(&mut lender);
        // A connection lost while lent went back to the pool still open,
        // so the pool closed it, which rolled it back.
        let (conn, result) = lender.reclaim(result)?;
        match result {
            Ok(Ending::Commit(value)) => {
                // An error here leaves the outcome unknown to us (the
                // server may have committed before the connection broke):
                // the caller retries with its idempotency key.
                conn.end("COMMIT")?;
                Ok(value)
            }
            Ok(Ending::Rollback(value)) => {
                conn.end("ROLLBACK")?;
                Ok(value)
            }
            Err(e) => {
                let _ = conn.end("ROLLBACK");
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_renumbered_and_nothing_else_changes() {
        assert_eq!(
            numbered("SELECT a FROM t WHERE x = ?1 AND y = ?12 OR ?2 IS NULL"),
            "SELECT a FROM t WHERE x = $1 AND y = $12 OR $2 IS NULL"
        );
        assert_eq!(numbered("SELECT '?' , ?x"), "SELECT '?' , ?x");
    }
}
