//! The data directory: the database, the card key, and nothing else. Tokens
//! live in the database as hashes; the clear tokens are printed once.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use sha2::{Digest, Sha256};

use crate::cards::CardKey;
use crate::storage::sqlite::SqliteStorage;
use crate::storage::{Registry, Role};

/// The SQLite database inside the data directory.
pub const DB_FILE: &str = "spendguard.db";
/// The key of the PAN and CVV hashes (32 random bytes, mode 0600).
pub const CARD_KEY_FILE: &str = "card.key";
/// Compiled policies, in the data directory (see [`crate::sandbox::ArtifactCache`]).
pub const CACHE_DIR: &str = "cache";
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

/// Create a data directory: refuses one that exists.
pub fn init(dir: &Path, now_ms: u64) -> anyhow::Result<InitTokens> {
    if dir.exists() {
        bail!("data directory `{}` already exists; refusing to overwrite it", dir.display());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create `{}`", dir.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot restrict `{}` to its owner", dir.display()))?;
    }
    CardKey::load_or_create(&dir.join(CARD_KEY_FILE)).context("cannot create the card key")?;
    let storage = SqliteStorage::open(&dir.join(DB_FILE)).context("cannot create the database")?;
    let operator_token = new_token(&Role::Operator);
    let network_token = new_token(&Role::Network);
    storage.add_token(&Role::Operator, &token_hash(&operator_token), now_ms)?;
    storage.add_token(&Role::Network, &token_hash(&network_token), now_ms)?;
    Ok(InitTokens { operator_token, network_token })
}

/// An opened data directory.
#[derive(Debug)]
pub struct Opened {
    pub path: PathBuf,
    pub storage: Arc<SqliteStorage>,
    pub key: Arc<CardKey>,
}

/// Open an initialised data directory (it must have its database and key).
pub fn open(dir: &Path) -> anyhow::Result<Opened> {
    let db = dir.join(DB_FILE);
    let key = dir.join(CARD_KEY_FILE);
    if !db.exists() || !key.exists() {
        bail!("`{}` is not a spendguard data directory (run `spendguard init` first)", dir.display());
    }
    let key = CardKey::load_or_create(&key).context("cannot read the card key")?;
    let storage = SqliteStorage::open(&db).with_context(|| format!("cannot open `{}`", db.display()))?;
    Ok(Opened { path: dir.to_path_buf(), storage: Arc::new(storage), key: Arc::new(key) })
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
