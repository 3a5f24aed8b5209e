//! The daemon's configuration: defaults, then a TOML file, then flags.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use serde::Deserialize;

use crate::cards::DEFAULT_CARD_TTL_SECONDS;
use crate::sandbox::Limits;

/// Where the daemon listens by default: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7420";
/// How long a spend waits for an operator's approval: 10 minutes.
pub const DEFAULT_APPROVAL_TTL_SECONDS: u64 = 600;
/// How often expired cards and approvals are swept.
pub const DEFAULT_SWEEP_INTERVAL_MS: u64 = 1_000;
/// Proposals of one agent evaluated at once.
pub const DEFAULT_AGENT_CONCURRENCY: u32 = 1;
/// Proposals of one agent waiting for their turn before more are refused.
pub const DEFAULT_AGENT_QUEUE: u32 = 64;
/// Compiled policy versions kept in the daemon's memory (each takes about
/// 0.7 MiB resident, BENCHMARKS.md); the least recently used beyond this are
/// dropped and, when needed again, loaded from the compiled cache on disk.
pub const DEFAULT_POLICY_CACHE: u32 = 256;
/// Largest JSON body accepted (policy uploads have their own cap, the
/// sandbox's module size).
pub const DEFAULT_MAX_BODY_BYTES: usize = 64 * 1024;

/// `spendguard serve` settings. In a TOML file every field is optional:
///
/// ```toml
/// listen = "127.0.0.1:7420"
/// data_dir = "spendguard-data"
/// # database_url = "postgres://spendguard@db.internal/wallet"  # a wallet in PostgreSQL
/// # database_pool_size = 16
/// card_ttl_seconds = 900
/// approval_ttl_seconds = 600
/// agent_concurrency = 1
/// agent_queue = 64
/// policy_cache = 256
/// [sandbox]
/// fuel = 20000000
/// deadline = 100
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// The PostgreSQL database of a wallet made with `init --database-url`
    /// (none: SQLite in the data directory). Never printed: it may hold a
    /// password.
    pub database_url: Option<DatabaseUrl>,
    /// Connections to PostgreSQL this daemon keeps at most.
    pub database_pool_size: u32,
    /// A card's life when no policy shortens it.
    pub card_ttl_seconds: u32,
    pub approval_ttl_seconds: u64,
    pub sweep_interval_ms: u64,
    pub max_body_bytes: usize,
    /// Proposals of one agent evaluated at once: whatever its policies cost,
    /// one agent can take no more of the machine than this many evaluations.
    pub agent_concurrency: u32,
    /// Proposals of one agent that may wait for their turn; more are
    /// refused (429) until the queue drains.
    pub agent_queue: u32,
    /// Compiled policy versions kept in memory at most.
    pub policy_cache: u32,
    pub sandbox: Limits,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            // INVARIANT: a literal socket address.
            listen: DEFAULT_LISTEN.parse().unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 7420))),
            data_dir: PathBuf::from(crate::datadir::DEFAULT_DATA_DIR),
            database_url: None,
            database_pool_size: crate::storage::postgres::DEFAULT_POOL_SIZE,
            card_ttl_seconds: DEFAULT_CARD_TTL_SECONDS,
            approval_ttl_seconds: DEFAULT_APPROVAL_TTL_SECONDS,
            sweep_interval_ms: DEFAULT_SWEEP_INTERVAL_MS,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            agent_concurrency: DEFAULT_AGENT_CONCURRENCY,
            agent_queue: DEFAULT_AGENT_QUEUE,
            policy_cache: DEFAULT_POLICY_CACHE,
            sandbox: Limits::default(),
        }
    }
}

/// A database URL, which may carry a password: its `Debug` does not show it.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct DatabaseUrl(pub String);

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DatabaseUrl(…)")
    }
}

impl ServeConfig {
    /// Which database holds the wallet.
    pub fn database(&self) -> anyhow::Result<crate::datadir::Database> {
        crate::datadir::Database::from_url(
            self.database_url.as_ref().map(|u| u.0.clone()),
            self.database_pool_size,
        )
    }

    /// Read a TOML file over the defaults.
    pub fn from_file(path: &std::path::Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read `{}`", path.display()))?;
        let config: ServeConfig =
            toml::from_str(&text).with_context(|| format!("invalid `{}`", path.display()))?;
        config.check()?;
        Ok(config)
    }

    pub fn check(&self) -> anyhow::Result<()> {
        if self.card_ttl_seconds == 0 || self.card_ttl_seconds > crate::cards::MAX_CARD_TTL_SECONDS {
            anyhow::bail!(
                "`card_ttl_seconds` must be 1 to {}, got {}",
                crate::cards::MAX_CARD_TTL_SECONDS,
                self.card_ttl_seconds
            );
        }
        self.database()?;
        if self.agent_concurrency == 0 {
            anyhow::bail!("`agent_concurrency` must be at least 1");
        }
        if self.policy_cache == 0 {
            anyhow::bail!("`policy_cache` must be at least 1");
        }
        if self.approval_ttl_seconds == 0 {
            anyhow::bail!("`approval_ttl_seconds` must be positive");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> anyhow::Result<ServeConfig> {
        let config: ServeConfig = toml::from_str(text)?;
        config.check()?;
        Ok(config)
    }

    #[test]
    fn the_defaults_pass_their_own_check() {
        let config = parsed("").unwrap();
        assert_eq!(config.policy_cache, DEFAULT_POLICY_CACHE);
        assert_eq!(parsed("policy_cache = 3").unwrap().policy_cache, 3);
    }

    #[test]
    fn impossible_settings_are_refused_by_name() {
        for (text, field) in [
            ("policy_cache = 0", "policy_cache"),
            ("agent_concurrency = 0", "agent_concurrency"),
            ("approval_ttl_seconds = 0", "approval_ttl_seconds"),
            ("card_ttl_seconds = 0", "card_ttl_seconds"),
            ("polcy_cache = 5", "polcy_cache"),
        ] {
            let e = format!("{:#}", parsed(text).unwrap_err());
            assert!(e.contains(field), "{text}: {e}");
        }
    }
}
