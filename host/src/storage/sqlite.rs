//! The embedded store: one SQLite file, WAL, every commit fsync'd.
//!
//! Writes are serialized by SQLite's own write lock (`BEGIN IMMEDIATE`), so
//! several processes on one file stay correct; within a process one writer
//! connection does them in turn. Reads use a pool of read connections, each
//! read one snapshot, and never wait for the writer. What is read and
//! written is the shared SQL of [`super::sql`].

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::Connection;
use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite_migration::{M, Migrations};

use super::StorageError;
use super::sql::{Answer, Arg, Conn, Ending, Engine, Lender, Row, SqlStore, Value, WriteJob};

/// How long a writer waits for another process's write lock before failing.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

fn migrations() -> Migrations<'static> {
    Migrations::new(vec![
        M::up(include_str!("../../migrations/sqlite/0001_ledger.sql")),
        M::up(include_str!("../../migrations/sqlite/0002_daemon.sql")),
        M::up(include_str!("../../migrations/sqlite/0003_history_covering.sql")),
        M::up(include_str!("../../migrations/sqlite/0004_revocation_and_authorizations.sql")),
        M::up(include_str!("../../migrations/sqlite/0005_token_labels_and_uses.sql")),
        M::up(include_str!("../../migrations/sqlite/0006_mandates.sql")),
    ])
}

impl From<rusqlite::Error> for StorageError {
    fn from(e: rusqlite::Error) -> Self {
        StorageError::Database(e.to_string())
    }
}

/// The SQLite store.
pub type SqliteStorage = SqlStore<SqliteEngine>;

impl SqliteStorage {
    /// Open (creating if needed) the database at `path` and apply every
    /// migration not yet applied.
    pub fn open(path: &Path) -> Result<Self, StorageError> {
        // Created owner-only (0600) before SQLite opens it: SQLite gives its
        // `-wal` and `-shm` files the database file's permissions.
        match crate::datadir::private_file(path) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(StorageError::Database(format!("cannot create `{}`: {e}", path.display())));
            }
        }
        let conn = Shared::connect(path)?;
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
        let checkpointer = Checkpointer::start(path)?;
        let shared = Arc::new(Shared {
            _checkpointer: checkpointer,
            path: path.to_path_buf(),
            conn: Mutex::new(Some(conn)),
            readers: Mutex::new(Vec::new()),
            durability,
        });
        let writer = WriterThread::start(Arc::clone(&shared))?;
        Ok(SqlStore::new(SqliteEngine { writer, shared }))
    }
}

/// Connections to one SQLite file.
pub struct SqliteEngine {
    /// Runs the write jobs queued by [`Engine::submit`]. Declared first, so
    /// that it stops (and answers what it took) before the rest is dropped.
    writer: WriterThread,
    shared: Arc<Shared>,
}

/// What the callers' threads and the writer thread share.
struct Shared {
    path: PathBuf,
    /// The writer connection. `None` only while a transaction lends it to
    /// the policies' history, with this lock held.
    conn: Mutex<Option<Connection>>,
    /// Idle read connections. Reads (and policies' history queries outside
    /// the write lock) never wait for the writer: WAL gives each its
    /// snapshot.
    readers: Mutex<Vec<Connection>>,
    /// Group commit: see [`Shared::sync`].
    durability: Durability,
    /// Copies the WAL back into the database off the write path.
    _checkpointer: Checkpointer,
}

impl std::fmt::Debug for SqliteEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStorage").field("path", &self.shared.path).finish_non_exhaustive()
    }
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

/// WAL pages after which the writer checkpoints by itself (SQLite's default
/// is 1000): reached only if the checkpointer cannot keep up.
const WRITER_CHECKPOINT_PAGES: i64 = 16_384;
/// How often the checkpointer copies the WAL back into the database.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(50);

/// A thread with its own connection that checkpoints the WAL (`PASSIVE`:
/// it never blocks a reader or the writer) every [`CHECKPOINT_EVERY`], so
/// that commits never wait for a checkpoint under the write lock and the
/// WAL stays short. SQLite fsyncs the WAL before a checkpoint copies it and
/// the database after, so a checkpoint changes nothing of what is durable.
/// Stopped (and its connection closed) when dropped.
struct Checkpointer {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Checkpointer {
    fn start(path: &Path) -> Result<Self, StorageError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(CHECKPOINT_EVERY)
                {
                    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                        tracing::warn!(error = %e, "WAL checkpoint failed; tried again in 50 ms");
                    }
                }
            })
            .map_err(|e| StorageError::Database(format!("cannot start the checkpointer: {e}")))?;
        Ok(Checkpointer { stop: Some(stop), thread: Some(thread) })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A queued write: run on the writer thread, it commits (or not) and says
/// what it committed and how to answer once that is durable.
type Job = Box<dyn FnOnce(&Shared) -> Done + Send>;

/// A job that has run: its commit, if it wrote, and its answer, sent once
/// an fsync has covered the commit (or at once if it wrote nothing).
struct Done {
    commit: Option<u64>,
    answer: Box<dyn FnOnce(Result<(), StorageError>) + Send>,
}

impl Done {
    /// Answer, given how the fsync meant to cover the commit went.
    fn answer(self, synced: Result<(), StorageError>) {
        (self.answer)(if self.commit.is_some() { synced } else { Ok(()) });
    }
}

/// Jobs answered after one fsync at most (more wait for the next).
const SYNC_BATCH: usize = 256;

/// Two threads for queued writes ([`Engine::submit`]): the writer runs the
/// jobs one after another, each its own transaction, and hands each done
/// job to the syncer, which fsyncs once for every job waiting and then
/// answers them. A caller that awaits its answer holds no thread while its
/// write waits for the lock and the disk; under load the two threads go from
/// one job to the next without sleeping, and the writer commits the next
/// jobs while the syncer waits on the disk. Writers on callers' threads
/// ([`Engine::transaction`], and [`Engine::run`] when nothing else is being
/// written or synced) take the same write lock and share the same fsyncs,
/// so both kinds interleave safely.
struct WriterThread {
    jobs: Option<std::sync::mpsc::Sender<Job>>,
    /// Jobs queued and not yet run.
    busy: Arc<std::sync::atomic::AtomicUsize>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl WriterThread {
    fn start(shared: Arc<Shared>) -> Result<Self, StorageError> {
        let (jobs, queue) = std::sync::mpsc::channel::<Job>();
        let (done, finished) = std::sync::mpsc::channel::<Done>();
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .map_err(|e| StorageError::Database(format!("cannot start the {name} thread: {e}")))
        };
        let on_writer = Arc::clone(&shared);
        let busy = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let running = Arc::clone(&busy);
        let writer = spawn(
            "sqlite-writer",
            Box::new(move || {
                for job in queue {
                    // A job that panics (a bug) loses only itself: its
                    // transaction was rolled back with its connection, and
                    // its caller's answer channel closes.
                    let finished = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&on_writer)));
                    running.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
                    if let Ok(finished) = finished
                        && done.send(finished).is_err()
                    {
                        break;
                    }
                }
            }),
        )?;
        let syncer = spawn(
            "sqlite-syncer",
            Box::new(move || {
                while let Ok(first) = finished.recv() {
                    let mut batch = vec![first];
                    batch.extend(finished.try_iter().take(SYNC_BATCH - 1));
                    let synced = shared.sync(batch.iter().filter_map(|d| d.commit).max());
                    for job in batch {
                        job.answer(synced.clone());
                    }
                }
            }),
        )?;
        Ok(WriterThread { jobs: Some(jobs), busy, threads: vec![writer, syncer] })
    }

    /// Queue a job; `false` if the writer thread is gone (the job dropped).
    fn send(&self, job: Job) -> bool {
        self.busy.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let sent = self.jobs.as_ref().is_some_and(|jobs| jobs.send(job).is_ok());
        if !sent {
            self.busy.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        }
        sent
    }

    /// Whether no job is queued or running.
    fn idle(&self) -> bool {
        self.busy.load(std::sync::atomic::Ordering::Acquire) == 0
    }
}

impl Drop for WriterThread {
    /// The jobs already queued run and are answered; then both threads end.
    fn drop(&mut self) {
        drop(self.jobs.take());
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Read connections kept open for reuse; more are opened when needed.
const IDLE_READERS: usize = 16;

impl Shared {
    fn connect(path: &Path) -> Result<Connection, StorageError> {
        let mut conn = Connection::open(path)?;
        // WAL; commits are made durable by a shared fsync (group commit,
        // `Shared::sync`) before any writer returns. SQLite still
        // fsyncs the WAL before every checkpoint and the database after.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        // Checkpoints are the checkpointer's (below), not the writer's,
        // which would hold the write lock while it copies and fsyncs; this
        // is only a backstop should the checkpointer fall far behind.
        conn.pragma_update(None, "wal_autocheckpoint", WRITER_CHECKPOINT_PAGES)?;
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
    /// number, to wait for with [`Shared::sync`].
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

    /// Whether every commit is on disk and no fsync is under way.
    fn all_synced(&self) -> bool {
        self.durability.synced.try_lock().is_ok_and(|synced| {
            *synced == self.durability.committed.load(std::sync::atomic::Ordering::Acquire)
        })
    }

    fn idle_reader(&self) -> Option<Connection> {
        self.readers.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }

    /// End a read transaction and keep the connection for the next read.
    fn recycle_reader(&self, conn: Connection) {
        if !conn.is_autocommit() && conn.execute_batch("COMMIT").is_err() {
            return; // dropped: closing it ends the transaction
        }
        let mut idle = self.readers.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < IDLE_READERS {
            idle.push(conn);
        }
    }

    /// One write transaction, committed but not yet synced: what `body`
    /// returned, and the commit's number if it wrote anything.
    fn transact<T>(
        &self,
        body: impl FnOnce(&mut Lender<Connection>) -> Result<Ending<T>, StorageError>,
    ) -> (Result<T, StorageError>, Option<u64>) {
        let (mut slot, conn) = match self.writer() {
            Ok(writer) => writer,
            Err(e) => return (Err(e), None),
        };
        if let Err(e) = self.usable() {
            *slot = Some(conn);
            return (Err(e), None);
        }
        let before = conn.total_changes();
        if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
            *slot = Some(conn);
            return (Err(e.into()), None);
        }
        let mut lender = Lender::new(conn);
        let result = body(&mut lender);
        // A lost connection (a panic while lent) is dropped, which rolls
        // its transaction back; the next writer reconnects.
        let (conn, result) = match lender.reclaim(result) {
            Ok(reclaimed) => reclaimed,
            Err(e) => return (Err(e), None),
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
        (result, commit)
    }
}

impl Engine for SqliteEngine {
    type Conn = Connection;
    const QUICK_READS: bool = true;
    const QUEUED_WRITES: bool = true;

    fn begin_read(&self) -> Result<Connection, StorageError> {
        let conn = self.shared.idle_reader().map_or_else(|| self.shared.connect_reader(), Ok)?;
        conn.execute_batch("BEGIN")?;
        Ok(conn)
    }

    fn end_read(&self, conn: Connection) {
        self.shared.recycle_reader(conn);
    }

    fn transaction<T>(
        &self,
        body: impl FnOnce(&mut Lender<Connection>) -> Result<Ending<T>, StorageError>,
    ) -> Result<T, StorageError> {
        let (result, commit) = self.shared.transact(body);
        let value = result?;
        self.shared.sync(commit)?;
        Ok(value)
    }

    /// On this thread when nothing else is being written or synced (a
    /// queue would only add thread hand-offs to the write's latency);
    /// otherwise queued behind the others, to share their fsync.
    fn run<T: Send + 'static>(&self, body: WriteJob<Connection, T>) -> Result<T, StorageError> {
        if self.writer.idle() && self.shared.all_synced() {
            return self.transaction(body);
        }
        self.submit(body).blocking_recv().map_err(|_| {
            StorageError::Database("a queued write was lost (its writer thread failed)".into())
        })?
    }

    fn submit<T: Send + 'static>(&self, body: WriteJob<Connection, T>) -> Answer<T> {
        let (answer, answered) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |shared: &Shared| {
            let (result, commit) = shared.transact(body);
            Done { commit, answer: Box::new(move |synced| drop(answer.send(synced.and(result)))) }
        });
        if !self.writer.send(job) {
            tracing::error!("the SQLite writer thread is gone: a queued write was refused");
        }
        // A job refused or lost closes the channel: the caller sees an error.
        answered
    }
}

impl rusqlite::ToSql for Arg<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match *self {
            Arg::Null => ValueRef::Null,
            Arg::Int(i) => ValueRef::Integer(i),
            Arg::Text(s) => ValueRef::Text(s.as_bytes()),
            Arg::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

/// Every statement goes through the connection's cache of prepared
/// statements: the same SQL is parsed once per connection.
impl Conn for Connection {
    fn rows(&self, sql: &str, args: &[Arg<'_>]) -> Result<Vec<Row>, StorageError> {
        let mut stmt = self.prepare_cached(sql)?;
        let width = stmt.column_count();
        let mut rows = stmt.query(rusqlite::params_from_iter(args))?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            let mut values = Vec::with_capacity(width);
            for i in 0..width {
                values.push(match row.get_ref(i)? {
                    ValueRef::Null => Value::Null,
                    ValueRef::Integer(i) => Value::Int(i),
                    ValueRef::Text(t) => Value::Text(
                        std::str::from_utf8(t)
                            .map_err(|e| StorageError::Database(format!("column {i}: {e}")))?
                            .to_owned(),
                    ),
                    ValueRef::Blob(b) => Value::Blob(b.to_vec()),
                    ValueRef::Real(r) => {
                        return Err(StorageError::Database(format!(
                            "column {i} holds a float ({r}), never stored"
                        )));
                    }
                });
            }
            out.push(Row(values));
        }
        Ok(out)
    }

    fn execute(&self, sql: &str, args: &[Arg<'_>]) -> Result<u64, StorageError> {
        let changed = self.prepare_cached(sql)?.execute(rusqlite::params_from_iter(args))?;
        Ok(changed as u64)
    }
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::history::HistoryScope;
    use crate::money::Amount;
    use crate::policy::SpendFilter;
    use crate::storage::Storage;
    use crate::storage::sql::EXPIRY_DUE_SQL;
    use crate::storage::sql::args;
    use crate::storage::sql::cards::CARD_COLUMNS;
    use crate::storage::sql::history::summarize_query;
    use crate::storage::sql::ledger::BALANCE_SQL;
    use crate::storage::sql::registry::{
        AGENT_SQL, ATTACHMENTS_SQL, NEXT_SET_SQL, NEXT_VERSION_SQL, TOKEN_SQL,
    };
    use crate::storage::sql::spends::IDEMPOTENT_SPEND_SQL;

    /// The plan SQLite chose, one line per step.
    fn plan(conn: &Connection, sql: &str, args: &[&dyn rusqlite::ToSql]) -> String {
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
        let conn = storage.engine.shared.conn.lock().unwrap();
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
                mandate_id: None,
            };
            let (sql, args) = summarize_query(&scope, &filter, &0);
            let args: Vec<&dyn rusqlite::ToSql> = args.iter().map(|a| a as &dyn rusqlite::ToSql).collect();
            let plan = plan(conn, &sql, &args);
            assert!(plan.contains(&format!("USING COVERING INDEX {index}")), "{filter:?}:\n{plan}");
            assert!(!plan.contains("SCAN h"), "{filter:?}:\n{plan}");
        }
        let card = format!(
            "SELECT {CARD_COLUMNS} FROM cards c LEFT JOIN hold_resolutions r ON r.hold_id = c.hold_id WHERE c.pan_hash = ?1"
        );
        let p = plan(conn, &card, &[&"x"]);
        assert!(p.contains("SEARCH c USING INDEX sqlite_autoindex_cards"), "{p}");
        let p = plan(conn, BALANCE_SQL, &[&1]);
        assert!(p.contains("entries_account"), "{p}");
        let p = plan(conn, EXPIRY_DUE_SQL, &[&0, &1]);
        assert!(p.contains("SEARCH h USING INDEX holds_expiry"), "{p}");
        let p = plan(conn, IDEMPOTENT_SPEND_SQL, &[&"a", &"k"]);
        assert!(p.contains("spends_idempotency"), "{p}");
    }

    #[test]
    fn every_write_is_fsynced_before_it_returns_and_concurrent_writes_share_fsyncs() {
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir().unwrap();
        let storage = Arc::new(SqliteStorage::open(&dir.path().join("db")).unwrap());
        let usd = |u| Amount::from_units(u, "USD").unwrap();
        let durability = &storage.engine.shared.durability;
        // One at a time: an fsync each, covering exactly what was committed.
        for i in 1..=5 {
            storage.deposit(&usd(100), None, &crate::storage::Actor::System, 1_000).unwrap();
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
                        storage.deposit(&usd(1), None, &crate::storage::Actor::System, 1_000).unwrap();
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

    /// Writes queued for the writer thread (the daemon's authorizations)
    /// commit without waiting for the disk, are answered only once an fsync
    /// covers them, share that fsync, and a failing or panicking job loses
    /// only itself.
    #[test]
    #[allow(clippy::panic)]
    fn queued_writes_are_answered_once_durable_and_share_fsyncs() {
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir().unwrap();
        let storage = SqliteStorage::open(&dir.path().join("db")).unwrap();
        let durability = &storage.engine.shared.durability;
        let sweep = |i: i64| -> WriteJob<Connection, i64> {
            Box::new(move |lender| {
                Conn::execute(
                    lender.conn()?,
                    "INSERT INTO expiry_sweeps (swept_to_ms) VALUES (?1)",
                    args![i],
                )?;
                Ok(Ending::Commit(i))
            })
        };
        // While no fsync can finish (the syncer waits for this lock), all 50
        // commit, and none is answered.
        let held = durability.synced.lock().unwrap();
        let (committed, fsyncs) =
            (durability.committed.load(Ordering::Acquire), durability.fsyncs.load(Ordering::Relaxed));
        let mut answers: Vec<_> = (0..50).map(|i| storage.engine.submit(sweep(i))).collect();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while durability.committed.load(Ordering::Acquire) < committed + 50 {
            assert!(std::time::Instant::now() < deadline, "the writer thread did not commit");
            std::thread::sleep(Duration::from_millis(1));
        }
        for answer in &mut answers {
            assert_eq!(answer.try_recv(), Err(tokio::sync::oneshot::error::TryRecvError::Empty));
        }
        drop(held);
        for (i, answer) in answers.into_iter().enumerate() {
            assert_eq!(answer.blocking_recv().unwrap(), Ok(i as i64));
        }
        assert_eq!(*durability.synced.lock().unwrap(), committed + 50);
        assert_eq!(durability.fsyncs.load(Ordering::Relaxed), fsyncs + 1, "one fsync for the 50");
        // A job's error is its answer; a panic closes its channel; the
        // writer thread goes on, and neither wrote anything.
        let refused = storage.engine.submit::<i64>(Box::new(|_| {
            Err(StorageError::Conflict(crate::storage::Conflict::AlreadyExists, "no".into()))
        }));
        assert_eq!(
            refused.blocking_recv().unwrap(),
            Err(StorageError::Conflict(crate::storage::Conflict::AlreadyExists, "no".into()))
        );
        let lost = storage.engine.submit::<i64>(Box::new(|lender| {
            Conn::execute(lender.conn()?, "INSERT INTO expiry_sweeps (swept_to_ms) VALUES (-1)", &[])?;
            panic!("a bug in a queued write")
        }));
        assert!(lost.blocking_recv().is_err());
        assert_eq!(storage.engine.submit(sweep(99)).blocking_recv().unwrap(), Ok(99));
        let sweeps =
            storage.read(|c| c.one("SELECT count(*), min(swept_to_ms) FROM expiry_sweeps", &[])).unwrap();
        assert_eq!((sweeps.get::<i64>(0).unwrap(), sweeps.get::<i64>(1).unwrap()), (51, 0));
    }

    /// Commits go to the WAL; the checkpointer, not the writer, copies them
    /// into the database file (the writer's own threshold is far above what
    /// this test writes).
    #[test]
    fn the_checkpointer_copies_the_wal_into_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let storage = SqliteStorage::open(&path).unwrap();
        let usd = |u| Amount::from_units(u, "USD").unwrap();
        storage.deposit(&usd(1), None, &crate::storage::Actor::System, 1_000).unwrap();
        std::thread::sleep(CHECKPOINT_EVERY * 4);
        let before = std::fs::metadata(&path).unwrap().len();
        for _ in 0..300 {
            storage.deposit(&usd(1), None, &crate::storage::Actor::System, 1_000).unwrap();
        }
        let wal = std::fs::metadata(dir.path().join("db-wal")).unwrap().len();
        assert!(
            wal < WRITER_CHECKPOINT_PAGES as u64 * 4096,
            "the writer's own checkpoint is not what this tests"
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::fs::metadata(&path).unwrap().len() <= before {
            assert!(std::time::Instant::now() < deadline, "nothing was checkpointed into the database");
            std::thread::sleep(CHECKPOINT_EVERY);
        }
        drop(storage);
        // Opened again, it holds every deposit.
        let storage = SqliteStorage::open(&path).unwrap();
        assert_eq!(storage.balances().unwrap()[0].available, 301);
    }

    /// Every request looks its token up, and every proposal its agent and
    /// attachments: these stay index lookups however many there are.
    #[test]
    fn registry_lookups_use_their_indexes() {
        let dir = tempfile::tempdir().unwrap();
        let storage = SqliteStorage::open(&dir.path().join("db")).unwrap();
        let conn = storage.engine.shared.conn.lock().unwrap();
        let conn = conn.as_ref().unwrap();
        // Each takes one text key: a token hash, an agent id or a policy name.
        for sql in [TOKEN_SQL, AGENT_SQL, ATTACHMENTS_SQL, NEXT_SET_SQL, NEXT_VERSION_SQL] {
            let p = plan(conn, sql, &[&"x"]);
            assert!(!p.contains("SCAN"), "{sql}:\n{p}");
            assert!(p.contains("SEARCH"), "{sql}:\n{p}");
        }
    }
}
