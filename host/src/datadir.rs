//! The data directory: the database (or, for a wallet in PostgreSQL, a note
//! that it is there), the card key, and the cache of compiled policies.
//! Tokens live in the database as hashes; the clear tokens are printed once.
//!
//! Several daemons share a wallet in PostgreSQL by each having a copy of
//! the data directory (above all its card key: any daemon must verify any
//! card). The wallet's first audit record holds the key's fingerprint, and
//! a daemon whose key does not match refuses to start.
//!
//! The audit key ([`AUDIT_KEY_FILE`]) is kept and checked the same way: it
//! MACs the audit chain (see [`crate::audit`]), so every daemon of a wallet
//! needs the same one.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use sha2::{Digest, Sha256};

use crate::audit::AuditKey;
use crate::cards::CardKey;
use crate::storage::postgres::PgStorage;
use crate::storage::sqlite::SqliteStorage;
use crate::storage::{Actor, Backend, Role, Storage};

/// The SQLite database inside the data directory.
pub const DB_FILE: &str = "spendguard.db";
/// The key of the PAN and CVV hashes (32 random bytes, mode 0600).
pub const CARD_KEY_FILE: &str = "card.key";
/// Compiled policies, in the data directory (see [`crate::sandbox::ArtifactCache`]).
pub const CACHE_DIR: &str = "cache";
/// Present when the wallet lives in PostgreSQL (it holds no URL: that is a
/// secret the operator passes to each command).
pub const POSTGRES_MARKER: &str = "postgres";
/// The audit record that opens a wallet, with its card key's fingerprint
/// (and, since the trail is keyed, its audit key's).
pub const WALLET_CREATED: &str = "wallet_created";
/// The key of the audit chain's MACs and where they begin (mode 0600).
pub const AUDIT_KEY_FILE: &str = "audit.key";
/// The audit record that begins the keyed part of a trail begun before the
/// audit key existed, with the key's fingerprint.
pub const AUDIT_KEYED: &str = "audit_keyed";
/// The label of the tokens `init` makes.
pub const INIT_LABEL: &str = "init";

/// Which database holds the wallet.
#[derive(Clone, Default)]
pub enum Database {
    /// `spendguard.db` in the data directory.
    #[default]
    Sqlite,
    /// A PostgreSQL database shared by any number of daemons.
    Postgres { url: String, pool_size: u32 },
}

impl std::fmt::Debug for Database {
    /// Never the URL: it may carry a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Database::Sqlite => f.write_str("Sqlite"),
            Database::Postgres { pool_size, .. } => {
                f.debug_struct("Postgres").field("pool_size", pool_size).finish_non_exhaustive()
            }
        }
    }
}

impl Database {
    /// PostgreSQL at `url`, or SQLite when there is none. Refuses a URL
    /// that is not PostgreSQL's and a pool of no connections.
    pub fn from_url(url: Option<String>, pool_size: u32) -> anyhow::Result<Database> {
        if pool_size == 0 {
            bail!("the database pool size must be at least 1");
        }
        match url {
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                Ok(Database::Postgres { url, pool_size })
            }
            Some(_) => bail!("the database URL must be a postgres:// URL"),
            None => Ok(Database::Sqlite),
        }
    }
}

/// The default data directory, relative to where the daemon runs.
pub const DEFAULT_DATA_DIR: &str = "spendguard-data";

/// A fresh bearer token: a role prefix (so a leaked token is recognisable
/// in a scanner) and 256 random bits.
pub fn new_token(role: &Role) -> String {
    let bytes: [u8; 32] = rand::random();
    let prefix = match role {
        Role::Operator => "sg_op",
        Role::Agent(_) => "sg_ag",
        Role::Network => "sg_net",
    };
    format!("{prefix}_{}", hex::encode(bytes))
}

/// What is stored of a token. The tokens are 256-bit random, so a plain
/// SHA-256 cannot be reversed or guessed; a slow password hash would add
/// nothing but latency on every request.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The tokens `init` prints once.
#[derive(Debug)]
pub struct InitTokens {
    pub operator_token: String,
    pub network_token: String,
}

/// Create `dir` (and its missing parents) owner-only (0700) from the
/// start, and make it 0700 if it was there.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        builder.mode(0o700).create(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
    }
    #[cfg(not(unix))]
    builder.create(dir)
}

/// Create a new file, owner read and write only (0600) from its creation
/// (not created open, then restricted), whatever the umask.
pub fn private_file(path: &Path) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)
}

/// Create a data directory: refuses one that exists. With
/// [`Database::Postgres`] the wallet is made in that database, which must
/// not hold one already.
pub fn init(dir: &Path, database: &Database, now_ms: u64) -> anyhow::Result<InitTokens> {
    if dir.exists() {
        bail!("data directory `{}` already exists; refusing to overwrite it", dir.display());
    }
    // The database first: if it is unreachable or taken, no directory is left behind.
    let postgres = match database {
        Database::Sqlite => None,
        Database::Postgres { url, pool_size } => {
            let storage =
                PgStorage::connect(url, *pool_size).context("cannot open the PostgreSQL database")?;
            if !storage.audit_records(0, 1)?.is_empty() {
                bail!(
                    "the PostgreSQL database already holds a wallet; to run another daemon on it, give that \
                     daemon a copy of the first daemon's data directory instead of running `init`"
                );
            }
            Some(storage)
        }
    };
    private_dir(dir).with_context(|| format!("cannot create `{}`", dir.display()))?;
    let key = CardKey::load_or_create(&dir.join(CARD_KEY_FILE)).context("cannot create the card key")?;
    let audit_key =
        Arc::new(AuditKey::create(&dir.join(AUDIT_KEY_FILE), 1).context("cannot create the audit key")?);
    let storage: Box<dyn Backend> = match postgres {
        None => Box::new(SqliteStorage::open(&dir.join(DB_FILE)).context("cannot create the database")?),
        Some(storage) => {
            use std::io::Write as _;
            private_file(&dir.join(POSTGRES_MARKER))
                .and_then(|mut f| f.write_all(b"the wallet's database is PostgreSQL (--database-url)\n"))
                .with_context(|| format!("cannot write `{}`", dir.display()))?;
            Box::new(storage)
        }
    };
    storage.set_audit_key(Arc::clone(&audit_key))?;
    let actor = Actor::DataDirectory;
    storage.audit(
        WALLET_CREATED,
        &serde_json::json!({
            "card_key_fingerprint": key.fingerprint(),
            "audit_key_fingerprint": audit_key.fingerprint(),
        }),
        &actor,
        now_ms,
    )?;
    let operator_token = new_token(&Role::Operator);
    let network_token = new_token(&Role::Network);
    storage.add_token(&Role::Operator, &token_hash(&operator_token), INIT_LABEL, &actor, now_ms)?;
    storage.add_token(&Role::Network, &token_hash(&network_token), INIT_LABEL, &actor, now_ms)?;
    Ok(InitTokens { operator_token, network_token })
}

/// An opened data directory.
pub struct Opened {
    pub path: PathBuf,
    pub storage: Arc<dyn Backend>,
    pub key: Arc<CardKey>,
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opened").field("path", &self.path).finish_non_exhaustive()
    }
}

/// Open an initialised data directory (it must have its key, and its
/// database or the note that the wallet is in PostgreSQL).
pub fn open(dir: &Path, database: &Database) -> anyhow::Result<Opened> {
    let key_file = dir.join(CARD_KEY_FILE);
    let in_postgres = dir.join(POSTGRES_MARKER).exists();
    let db = dir.join(DB_FILE);
    if !key_file.exists() || !(in_postgres || db.exists()) {
        bail!("`{}` is not a spendguard data directory (run `spendguard init` first)", dir.display());
    }
    let key = CardKey::load_or_create(&key_file).context("cannot read the card key")?;
    let storage: Arc<dyn Backend> = match (database, in_postgres) {
        (Database::Sqlite, false) => {
            Arc::new(SqliteStorage::open(&db).with_context(|| format!("cannot open `{}`", db.display()))?)
        }
        (Database::Postgres { url, pool_size }, true) => {
            Arc::new(PgStorage::connect(url, *pool_size).context("cannot open the PostgreSQL database")?)
        }
        (Database::Sqlite, true) => bail!(
            "the wallet of `{}` is in PostgreSQL: pass --database-url (or SPENDGUARD_DATABASE_URL, or \
             `database_url` in the config file)",
            dir.display()
        ),
        (Database::Postgres { .. }, false) => bail!(
            "the wallet of `{}` is in SQLite (`{DB_FILE}`); --database-url is for a data directory made with \
             `spendguard init --database-url`",
            dir.display()
        ),
    };
    check_key(storage.as_ref(), &key)?;
    key_audit_trail(dir, storage.as_ref())?;
    Ok(Opened { path: dir.to_path_buf(), storage, key: Arc::new(key) })
}

/// The fingerprint of the audit key a record opens the keyed trail with:
/// `wallet_created`'s `audit_key_fingerprint`, or `audit_keyed`'s.
fn keyed_fingerprint(record: &crate::storage::AuditRecord) -> Option<String> {
    let field = match record.kind.as_str() {
        WALLET_CREATED => "audit_key_fingerprint",
        AUDIT_KEYED => "fingerprint",
        _ => return None,
    };
    let value: serde_json::Value = serde_json::from_str(&record.record).ok()?;
    value[field].as_str().map(str::to_owned)
}

/// Give the store the data directory's audit key, creating it for a trail
/// begun before keys existed: its records up to now stay plain SHA-256, and
/// an `audit_keyed` record, the first MAC'd one, says so. Refuses an audit
/// key that is not the wallet's, and a data directory without one for a
/// trail that is keyed already (a copy made without `audit.key`).
pub fn key_audit_trail(dir: &Path, storage: &dyn Backend) -> anyhow::Result<()> {
    let path = dir.join(AUDIT_KEY_FILE);
    if path.exists() {
        let key = Arc::new(AuditKey::load(&path)?);
        storage.set_audit_key(Arc::clone(&key))?;
        let start = key.keyed_from();
        match storage.audit_records(start - 1, 1)?.into_iter().next() {
            Some(first) => {
                if first.seq == start
                    && keyed_fingerprint(&first).as_deref() != Some(key.fingerprint().as_str())
                {
                    bail!(
                        "this data directory's audit key is not the wallet's: every daemon of a wallet needs a \
                         copy of the `{AUDIT_KEY_FILE}` its trail was keyed with"
                    );
                }
            }
            // Made, but the record that begins the keyed trail is not
            // there yet (stopped in between): it is written now. A trail
            // even shorter was cut back, which verification reports.
            None if storage.audit_records(start.saturating_sub(2), 1)?.len() == 1 || start == 1 => {
                announce(storage, &key)?;
            }
            None => tracing::error!(
                keyed_from = start,
                "the audit trail is shorter than the audit key says it was: records were removed"
            ),
        }
        return Ok(());
    }
    // No key: the trail must be one begun before keys existed.
    let mut after = 0;
    loop {
        let page = storage.audit_records(after, 1000)?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        if page.iter().any(|r| keyed_fingerprint(r).is_some()) {
            bail!(
                "the wallet's audit trail is keyed, but `{}` has no `{AUDIT_KEY_FILE}`: copy it from the data \
                 directory the wallet was made in",
                dir.display()
            );
        }
    }
    let key = Arc::new(AuditKey::create(&path, after + 1).context("cannot create the audit key")?);
    storage.set_audit_key(Arc::clone(&key))?;
    announce(storage, &key)
}

/// The record that begins the keyed part of a trail.
fn announce(storage: &dyn Backend, key: &AuditKey) -> anyhow::Result<()> {
    storage.audit(
        AUDIT_KEYED,
        &serde_json::json!({ "fingerprint": key.fingerprint(), "keyed_from": key.keyed_from() }),
        &Actor::DataDirectory,
        now_ms(),
    )?;
    Ok(())
}

/// Refuse a card key that is not the wallet's: its cards would not verify,
/// and the cards it made would not verify anywhere else. Wallets made
/// before the fingerprint was recorded have none to check.
fn check_key(storage: &dyn Backend, key: &CardKey) -> anyhow::Result<()> {
    let Some(first) = storage.audit_records(0, 1)?.into_iter().next() else { return Ok(()) };
    if first.kind != WALLET_CREATED {
        return Ok(());
    }
    let record: serde_json::Value =
        serde_json::from_str(&first.record).context("the wallet's first audit record")?;
    if record["card_key_fingerprint"].as_str() != Some(key.fingerprint().as_str()) {
        bail!(
            "this data directory's card key is not the wallet's: every daemon of a wallet needs a copy of the \
             `{CARD_KEY_FILE}` it was made with"
        );
    }
    Ok(())
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
