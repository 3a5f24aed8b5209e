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

/// How long a client may take to send a request's head (request line and
/// headers), counted from when the connection is ready for it: a new
/// connection, or a kept-alive one after its last answer. 10 s is ample for
/// any real client and frees a slot held by a slow-header client quickly.
pub const DEFAULT_HEADER_READ_TIMEOUT_MS: u64 = 10_000;
/// How long a client may take to send a request's whole body, from the end
/// of its head: the largest upload (a policy module, at most the sandbox's
/// module size) over a slow link fits; a stalled body is answered 408 and
/// its memory freed.
pub const DEFAULT_BODY_TIMEOUT_MS: u64 = 60_000;
/// A connection on which no byte moves either way for this long, while no
/// request of it is being handled, is closed: an idle kept-alive connection,
/// or a client that stopped reading its answer.
pub const DEFAULT_IDLE_TIMEOUT_MS: u64 = 60_000;
/// Connections served at once. Beyond it, new connections wait in the
/// listen backlog until one closes (never an unbounded number of tasks and
/// buffers): each costs a task and its buffers, a few tens of KiB, and a
/// file descriptor. Half the usual soft limit of 1024 descriptors, so the
/// database and the cache still get theirs.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 512;
/// After SIGINT or SIGTERM, how long requests in flight get to finish
/// before the daemon exits anyway: longer than a policy evaluation and a
/// commit, short enough for a service manager's stop timeout (systemd's
/// default is 90 s).
pub const DEFAULT_SHUTDOWN_TIMEOUT_MS: u64 = 10_000;
/// Proposals per second one agent may make, on average. Far above what an
/// agent doing real work sends (a purchase takes seconds at least) and above
/// the benchmarks' per-agent rate (about 80/s with 32 agents), so it never
/// throttles normal use; a runaway agent is held to it.
pub const DEFAULT_AGENT_RATE_PER_SECOND: u32 = 200;
/// Proposals one agent may send at once above its rate.
pub const DEFAULT_AGENT_BURST: u32 = 400;
/// Proposals one agent may have on record per `agent_quota_window_seconds`
/// (denied ones included): bounds what one agent token can write to the
/// database (a proposal takes about 3 KiB with its audit record, so about
/// 60 MiB a day at most). Checking it counts the agent's spends in the
/// window on an index, up to this many: tens of µs for an agent with a
/// thousand, about 2.5 ms at the full quota.
pub const DEFAULT_AGENT_QUOTA: u64 = 20_000;
/// The rolling window of `agent_quota`: 24 hours.
pub const DEFAULT_AGENT_QUOTA_WINDOW_SECONDS: u64 = 86_400;

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
/// header_read_timeout_ms = 10000
/// body_timeout_ms = 60000
/// idle_timeout_ms = 60000
/// max_connections = 512
/// shutdown_timeout_ms = 10000
/// agent_rate_per_second = 200
/// agent_burst = 400
/// agent_quota = 20000
/// agent_quota_window_seconds = 86400
/// # allow_insecure_http = false  # plain HTTP beyond loopback: never in production
/// # [tls]
/// # cert_chain = "/etc/spendguard/cert.pem"  # PEM: the certificate, then its chain
/// # private_key = "/etc/spendguard/key.pem"  # PEM: PKCS#8, PKCS#1 or SEC1
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
    /// See [`DEFAULT_HEADER_READ_TIMEOUT_MS`].
    pub header_read_timeout_ms: u64,
    /// See [`DEFAULT_BODY_TIMEOUT_MS`].
    pub body_timeout_ms: u64,
    /// See [`DEFAULT_IDLE_TIMEOUT_MS`].
    pub idle_timeout_ms: u64,
    /// See [`DEFAULT_MAX_CONNECTIONS`].
    pub max_connections: u32,
    /// See [`DEFAULT_SHUTDOWN_TIMEOUT_MS`].
    pub shutdown_timeout_ms: u64,
    /// See [`DEFAULT_AGENT_RATE_PER_SECOND`]; past it, 429 `rate_limited`.
    pub agent_rate_per_second: u32,
    /// See [`DEFAULT_AGENT_BURST`].
    pub agent_burst: u32,
    /// See [`DEFAULT_AGENT_QUOTA`]; past it, 429 `quota_exceeded`.
    pub agent_quota: u64,
    /// See [`DEFAULT_AGENT_QUOTA_WINDOW_SECONDS`].
    pub agent_quota_window_seconds: u64,
    /// Serve over TLS with this certificate and key.
    pub tls: Option<TlsFiles>,
    /// Serve plain HTTP on an address beyond loopback. Refused unless set:
    /// tokens, PANs and CVVs would cross the network in clear.
    pub allow_insecure_http: bool,
    pub sandbox: Limits,
}

/// The PEM files of the daemon's TLS certificate.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The certificate, then the intermediates up to (not including) the root.
    pub cert_chain: PathBuf,
    /// Its private key (PKCS#8, PKCS#1 or SEC1), readable by the daemon only.
    pub private_key: PathBuf,
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
            header_read_timeout_ms: DEFAULT_HEADER_READ_TIMEOUT_MS,
            body_timeout_ms: DEFAULT_BODY_TIMEOUT_MS,
            idle_timeout_ms: DEFAULT_IDLE_TIMEOUT_MS,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            shutdown_timeout_ms: DEFAULT_SHUTDOWN_TIMEOUT_MS,
            agent_rate_per_second: DEFAULT_AGENT_RATE_PER_SECOND,
            agent_burst: DEFAULT_AGENT_BURST,
            agent_quota: DEFAULT_AGENT_QUOTA,
            agent_quota_window_seconds: DEFAULT_AGENT_QUOTA_WINDOW_SECONDS,
            tls: None,
            allow_insecure_http: false,
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
        for (field, value) in [
            ("header_read_timeout_ms", self.header_read_timeout_ms),
            ("body_timeout_ms", self.body_timeout_ms),
            ("idle_timeout_ms", self.idle_timeout_ms),
            ("shutdown_timeout_ms", self.shutdown_timeout_ms),
            ("max_connections", u64::from(self.max_connections)),
            ("agent_rate_per_second", u64::from(self.agent_rate_per_second)),
            ("agent_burst", u64::from(self.agent_burst)),
            ("agent_quota", self.agent_quota),
            ("agent_quota_window_seconds", self.agent_quota_window_seconds),
        ] {
            if value == 0 {
                anyhow::bail!("`{field}` must be positive");
            }
        }
        self.check_transport()
    }

    /// Plain HTTP only on loopback, unless explicitly allowed: bearer
    /// tokens, PANs and CVVs cross the connection.
    pub fn check_transport(&self) -> anyhow::Result<()> {
        if self.tls.is_none() && !self.listen.ip().is_loopback() && !self.allow_insecure_http {
            anyhow::bail!(
                "refusing to serve plain HTTP on `{}`, beyond loopback: tokens, card numbers and CVVs \
                 would cross the network in clear. Configure `[tls]` (`cert_chain` and `private_key`), \
                 listen on 127.0.0.1, or set `allow_insecure_http = true` if a TLS proxy on a trusted \
                 network fronts the daemon",
                self.listen
            );
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
    fn plain_http_beyond_loopback_needs_an_explicit_yes() {
        assert!(parsed("listen = \"[::1]:7420\"").is_ok());
        assert!(parsed("listen = \"0.0.0.0:7420\"\nallow_insecure_http = true").is_ok());
        let tls = "listen = \"0.0.0.0:7420\"\n[tls]\ncert_chain = \"c.pem\"\nprivate_key = \"k.pem\"";
        assert!(parsed(tls).is_ok());
    }

    #[test]
    fn impossible_settings_are_refused_by_name() {
        for (text, field) in [
            ("policy_cache = 0", "policy_cache"),
            ("agent_concurrency = 0", "agent_concurrency"),
            ("approval_ttl_seconds = 0", "approval_ttl_seconds"),
            ("card_ttl_seconds = 0", "card_ttl_seconds"),
            ("polcy_cache = 5", "polcy_cache"),
            ("body_timeout_ms = 0", "body_timeout_ms"),
            ("max_connections = 0", "max_connections"),
            ("agent_quota = 0", "agent_quota"),
            ("listen = \"0.0.0.0:7420\"", "allow_insecure_http"),
        ] {
            let e = format!("{:#}", parsed(text).unwrap_err());
            assert!(e.contains(field), "{text}: {e}");
        }
    }
}
