//! The two storage backends under test, behind one interface, so that the
//! storage, registry and race suites run the same code against both.
//!
//! PostgreSQL: `SPENDGUARD_TEST_POSTGRES` names a server the tests may
//! create databases on (`postgres://postgres@127.0.0.1:PORT/postgres`);
//! `make test` starts a throwaway one (`scripts/with-postgres.sh`). Each
//! test gets a database of its own, dropped at the end. Without the
//! variable the PostgreSQL tests fail, never skip.

use std::path::PathBuf;
use std::sync::Arc;

use spendguard::cards::{CardKey, SimulatedIssuer};
use spendguard::storage::Backend as Store;
use spendguard::storage::CardIssuance;
use spendguard::storage::postgres::PgStorage;
use spendguard::storage::sqlite::SqliteStorage;

/// Cards as the daemon makes them: a fresh key, the simulated issuer, a
/// 900 s life when no policy shortens it.
pub fn simulated_cards() -> CardIssuance {
    CardIssuance {
        issuer: Arc::new(SimulatedIssuer::new()),
        key: Arc::new(CardKey::generate()),
        default_ttl_seconds: 900,
    }
}

/// Which backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Sqlite,
    Postgres,
}

/// A fresh, empty wallet database and a store open on it.
pub struct Backend {
    pub storage: Arc<dyn Store>,
    place: Place,
}

enum Place {
    Sqlite { path: PathBuf, _dir: tempfile::TempDir },
    Postgres(TestDatabase),
}

impl Kind {
    pub fn fresh(self) -> Backend {
        match self {
            Kind::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("spendguard.db");
                let storage = Arc::new(SqliteStorage::open(&path).unwrap());
                Backend { storage, place: Place::Sqlite { path, _dir: dir } }
            }
            Kind::Postgres => {
                let db = TestDatabase::create();
                let storage = Arc::new(PgStorage::connect(&db.url, 16).unwrap());
                Backend { storage, place: Place::Postgres(db) }
            }
        }
    }
}

impl Backend {
    /// Another store on the same database: what another process (another
    /// daemon) sees.
    pub fn open_again(&self) -> Arc<dyn Store> {
        match &self.place {
            Place::Sqlite { path, .. } => Arc::new(SqliteStorage::open(path).unwrap()),
            Place::Postgres(db) => Arc::new(PgStorage::connect(&db.url, 16).unwrap()),
        }
    }

    /// Run `sql` behind the store's back, as the database's owner would.
    pub fn raw(&self, sql: &str) -> Result<(), String> {
        match &self.place {
            Place::Sqlite { path, .. } => {
                rusqlite::Connection::open(path).unwrap().execute_batch(sql).map_err(|e| e.to_string())
            }
            Place::Postgres(db) => db.client().batch_execute(sql).map_err(|e| match e.as_db_error() {
                Some(db) => db.message().to_owned(),
                None => e.to_string(),
            }),
        }
    }

    /// Every text value (not numbers, not bytes) stored in `table`.
    pub fn text_values(&self, table: &str) -> Vec<String> {
        match &self.place {
            Place::Sqlite { path, .. } => sqlite_rows(path, &format!("SELECT * FROM {table}"))
                .into_iter()
                .flatten()
                .filter_map(|v| match v {
                    rusqlite::types::Value::Text(t) => Some(t),
                    _ => None,
                })
                .collect(),
            Place::Postgres(_) => {
                let columns = self.rows(&format!(
                    "SELECT column_name FROM information_schema.columns
                     WHERE table_schema = 'public' AND table_name = '{table}' AND data_type = 'text'"
                ));
                let mut out = Vec::new();
                for column in columns {
                    out.extend(
                        self.rows(&format!("SELECT {} FROM {table}", column[0]))
                            .into_iter()
                            .map(|r| r[0].clone()),
                    );
                }
                out
            }
        }
    }

    /// Change `table` behind the store's back with its append-only
    /// triggers and foreign keys out of the way: tampering.
    pub fn tamper(&self, table: &str, sql: &str) {
        match &self.place {
            Place::Sqlite { .. } => self.raw(&format!(
                "PRAGMA foreign_keys = OFF; DROP TRIGGER {table}_append_only_u; DROP TRIGGER {table}_append_only_d; {sql};"
            )),
            // A replica session fires no user triggers and checks no foreign keys.
            Place::Postgres(_) => self.raw(&format!("SET session_replication_role = replica; {sql};")),
        }
        .unwrap();
    }

    /// Every row of a query, each column as text (null as "NULL").
    pub fn rows(&self, sql: &str) -> Vec<Vec<String>> {
        match &self.place {
            Place::Sqlite { path, .. } => sqlite_rows(path, sql)
                .into_iter()
                .map(|row| {
                    row.into_iter()
                        .map(|v| match v {
                            rusqlite::types::Value::Null => "NULL".to_owned(),
                            rusqlite::types::Value::Integer(v) => v.to_string(),
                            rusqlite::types::Value::Text(t) => t,
                            rusqlite::types::Value::Blob(b) => hex::encode(b),
                            rusqlite::types::Value::Real(r) => r.to_string(),
                        })
                        .collect()
                })
                .collect(),
            Place::Postgres(db) => {
                // The simple protocol answers every column as text.
                let messages = db.client().simple_query(sql).unwrap();
                messages
                    .into_iter()
                    .filter_map(|m| match m {
                        postgres::SimpleQueryMessage::Row(r) => {
                            Some((0..r.len()).map(|i| r.get(i).unwrap_or("NULL").to_owned()).collect())
                        }
                        _ => None,
                    })
                    .collect()
            }
        }
    }

    /// Everything the store keeps at rest, as bytes to search: SQLite's
    /// files (database, WAL, shared memory), or every row of every table.
    pub fn at_rest(&self) -> Vec<u8> {
        match &self.place {
            Place::Sqlite { path, .. } => {
                let mut bytes = Vec::new();
                for suffix in ["", "-wal", "-shm"] {
                    let mut file = path.as_os_str().to_owned();
                    file.push(suffix);
                    if let Ok(b) = std::fs::read(PathBuf::from(file)) {
                        bytes.extend(b);
                    }
                }
                bytes
            }
            Place::Postgres(_) => {
                let tables = self.rows("SELECT tablename FROM pg_tables WHERE schemaname = 'public'");
                let mut bytes = Vec::new();
                for table in tables {
                    for row in self.rows(&format!("SELECT t::text FROM {} t", table[0])) {
                        bytes.extend(row[0].as_bytes());
                        bytes.push(b'\n');
                    }
                }
                bytes
            }
        }
    }
}

/// Every row of a query on the SQLite file at `path`.
fn sqlite_rows(path: &std::path::Path, sql: &str) -> Vec<Vec<rusqlite::types::Value>> {
    let conn = rusqlite::Connection::open(path).unwrap();
    let mut stmt = conn.prepare(sql).unwrap();
    let n = stmt.column_count();
    stmt.query_map([], |row| (0..n).map(|i| row.get(i)).collect()).unwrap().map(Result::unwrap).collect()
}

/// A database of its own on the test server, dropped when done.
pub struct TestDatabase {
    pub url: String,
    admin: String,
    name: String,
}

/// The server's admin URL, from the environment.
pub fn postgres_server() -> String {
    std::env::var("SPENDGUARD_TEST_POSTGRES").unwrap_or_else(|_| {
        panic!(
            "SPENDGUARD_TEST_POSTGRES is not set: run the tests with `make test`, or \
             `scripts/with-postgres.sh cargo test --release`, which start a throwaway PostgreSQL \
             server, or set it to a server on which these tests may create databases \
             (postgres://USER@HOST:PORT/postgres)"
        )
    })
}

impl TestDatabase {
    pub fn create() -> TestDatabase {
        let admin = postgres_server();
        let name = format!("sg_test_{}", hex::encode(rand::random::<[u8; 8]>()));
        let base = admin.rsplit_once('/').map_or(admin.as_str(), |(base, _)| base);
        let url = format!("{base}/{name}");
        let db = TestDatabase { url, admin, name };
        let mut client = postgres::Client::connect(&db.admin, postgres::NoTls)
            .unwrap_or_else(|e| panic!("cannot reach the test PostgreSQL server: {e}"));
        client.batch_execute(&format!("CREATE DATABASE {}", db.name)).unwrap();
        db
    }

    fn client(&self) -> postgres::Client {
        postgres::Client::connect(&self.url, postgres::NoTls).unwrap()
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if let Ok(mut client) = postgres::Client::connect(&self.admin, postgres::NoTls) {
            let _ = client.batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name));
        }
    }
}

/// `on_each_backend!(a, b, …)`: for each function `fn a(kind: Kind)` of the
/// module, a test per backend, `sqlite::a` and `postgres::a`.
macro_rules! on_each_backend {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[test] fn $name() { super::$name($crate::support::backends::Kind::Sqlite) })*
        }
        mod postgres {
            $(#[test] fn $name() { super::$name($crate::support::backends::Kind::Postgres) })*
        }
    };
}
pub(crate) use on_each_backend;
