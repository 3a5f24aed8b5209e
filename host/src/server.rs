//! The daemon: wallet control and spend access over HTTP (docs/contract/api.md).
//!
//! `app(state)` builds the router, so tests can drive it without a socket;
//! `serve` serves it (over TLS when configured, with the timeouts and the
//! connection cap of [`transport`]), runs the expiry sweeper, and shuts down
//! gracefully on SIGINT/SIGTERM, giving requests in flight a deadline.

mod agents;
mod approvals;
mod audit;
mod auth;
mod cards;
mod error;
mod extract;
mod json;
mod mandates;
mod metrics;
pub mod parse;
mod policies;
mod preview;
mod service;
mod spends;
mod tokens;
pub mod transport;
mod wallet;
mod whoami;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde_json::Value;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use auth::{Caller, ClientAddr};
pub use error::ApiError;
pub use metrics::Metrics;

use crate::cards::{CardKey, Issuer, SimulatedIssuer};
use crate::config::ServeConfig;
use crate::datadir::now_ms;
use crate::sandbox::{ArtifactCache, LoadedPolicy, Sandbox};
use crate::storage::Backend;

/// What a handler answers: a status and a JSON body, or an error.
type Reply = Result<(StatusCode, Json<Value>), ApiError>;

fn ok(value: Value) -> Reply {
    Ok((StatusCode::OK, Json(value)))
}

fn created(value: Value) -> Reply {
    Ok((StatusCode::CREATED, Json(value)))
}

/// Run blocking work (storage, policies) off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await?
}

/// Everything a request handler needs.
pub struct AppState {
    pub backend: Arc<dyn Backend>,
    pub sandbox: Arc<Sandbox>,
    pub key: Arc<CardKey>,
    pub issuer: Arc<dyn Issuer>,
    pub config: ServeConfig,
    pub metrics: Metrics,
    /// Compiled policies by (name, version), at most `policy_cache`.
    policies: RwLock<HashMap<(String, u32), Cached>>,
    /// The clock of `Cached::used`.
    uses: AtomicU64,
    /// Each agent's turn at evaluation (see [`AppState::agent_turn`]).
    turns: Mutex<HashMap<String, Arc<Turns>>>,
    /// When each token was last used, by token id, and how much of that is
    /// written (see [`AppState::token_used`]).
    token_uses: Mutex<HashMap<String, TokenUse>>,
    /// Each agent's proposal rate (see [`AppState::admit_proposal`]).
    rates: AgentRates,
    /// What this daemon last counted of each agent's quota (see
    /// [`AppState::admit_proposal`]).
    quotas: Mutex<HashMap<String, QuotaSeen>>,
}

/// How long an agent's count of proposals in its quota window is trusted
/// before it is counted again in storage. Counting walks an index entry per
/// proposal in the window (up to `agent_quota`, about 2.5 ms at the default
/// 20,000): at most once a second per agent keeps that off the hot path,
/// while another daemon's proposals are seen within a second.
pub const QUOTA_RECOUNT: Duration = Duration::from_secs(1);

/// An agent's quota as this daemon last counted it.
#[derive(Debug, Clone, Copy)]
struct QuotaSeen {
    /// When storage was last asked (ms).
    counted_at_ms: u64,
    /// The proposals on record in the window then, plus those admitted here
    /// since: never fewer than are on record, as long as it is fresh.
    estimate: u64,
    /// Found at its quota in storage: refused until its oldest proposal in
    /// the window ages out (ms), without counting again.
    full_until_ms: Option<u64>,
}

/// How often the tokens' uses are written to the database: a token's
/// `last_used_at` there is at most this late (this daemon shows its own
/// uses at once), and each token gets at most one row per interval.
pub const TOKEN_USE_FLUSH: Duration = Duration::from_secs(60);

/// A token's last use, and the last use written.
#[derive(Debug, Clone, Copy)]
struct TokenUse {
    last_ms: u64,
    written_ms: u64,
}

type AgentRates = governor::RateLimiter<
    String,
    governor::state::keyed::DefaultKeyedStateStore<String>,
    governor::clock::DefaultClock,
>;

/// A compiled policy in memory, with when it was last used.
struct Cached {
    policy: Arc<LoadedPolicy>,
    used: AtomicU64,
}

/// A proposal counted among its agent's waiting ones until dropped.
struct Waiting<'a>(&'a AtomicU32);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One agent's evaluations in progress and proposals waiting.
#[derive(Debug)]
struct Turns {
    running: Arc<Semaphore>,
    waiting: AtomicU32,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").field("config", &self.config).finish_non_exhaustive()
    }
}

/// One agent's proposal rate, as governor counts it.
fn agent_rate(config: &ServeConfig) -> governor::Quota {
    let one = std::num::NonZeroU32::MIN;
    let rate = std::num::NonZeroU32::new(config.agent_rate_per_second).unwrap_or(one);
    let burst = std::num::NonZeroU32::new(config.agent_burst).unwrap_or(one);
    governor::Quota::per_second(rate).allow_burst(burst)
}

impl AppState {
    pub fn new(backend: Arc<dyn Backend>, key: Arc<CardKey>, config: ServeConfig) -> anyhow::Result<Self> {
        let mut sandbox = Sandbox::new(config.sandbox.clone())?;
        // Compiled policies are kept in the data directory, so a restart
        // does not compile them again; without it, they are compiled.
        let cache_dir = config.data_dir.join(crate::datadir::CACHE_DIR);
        match ArtifactCache::open(&cache_dir, key.as_bytes()) {
            Ok(cache) => sandbox = sandbox.with_cache(cache),
            Err(e) => tracing::warn!(dir = %cache_dir.display(), error = %e, "no compiled-policy cache"),
        }
        let rates = governor::RateLimiter::keyed(agent_rate(&config));
        Ok(AppState {
            backend,
            sandbox: Arc::new(sandbox),
            key,
            issuer: Arc::new(SimulatedIssuer::new()),
            config,
            metrics: Metrics::new(),
            policies: RwLock::new(HashMap::new()),
            uses: AtomicU64::new(0),
            turns: Mutex::new(HashMap::new()),
            token_uses: Mutex::new(HashMap::new()),
            rates,
            quotas: Mutex::new(HashMap::new()),
        })
    }

    /// Note that a token was just used. Kept in memory: no request waits
    /// for a database write for this; [`AppState::flush_token_uses`]
    /// writes the uses in one transaction every [`TOKEN_USE_FLUSH`].
    pub fn token_used(&self, token_id: &str) {
        let now = now_ms();
        let mut uses = self.token_uses.lock().unwrap_or_else(|p| p.into_inner());
        match uses.get_mut(token_id) {
            Some(used) => used.last_ms = used.last_ms.max(now),
            None => {
                uses.insert(token_id.to_owned(), TokenUse { last_ms: now, written_ms: 0 });
            }
        }
    }

    /// This daemon's last use of a token, written yet or not.
    pub fn token_last_used(&self, token_id: &str) -> Option<u64> {
        self.token_uses.lock().unwrap_or_else(|p| p.into_inner()).get(token_id).map(|u| u.last_ms)
    }

    /// Write the uses not yet written: one row per token used since the
    /// last flush. On failure they stay, for the next flush.
    pub fn flush_token_uses(&self) {
        let due: Vec<(String, u64)> = {
            let uses = self.token_uses.lock().unwrap_or_else(|p| p.into_inner());
            uses.iter()
                .filter(|(_, u)| u.last_ms > u.written_ms)
                .map(|(id, u)| (id.clone(), u.last_ms))
                .collect()
        };
        if due.is_empty() {
            return;
        }
        if let Err(e) = self.backend.record_token_uses(&due) {
            tracing::warn!(error = %e, "recording when tokens were last used failed; tried again later");
            return;
        }
        let now = now_ms();
        let mut uses = self.token_uses.lock().unwrap_or_else(|p| p.into_inner());
        for (id, at) in due {
            if let Some(used) = uses.get_mut(&id) {
                used.written_ms = used.written_ms.max(at);
            }
        }
        // Forget tokens idle for an hour whose last use is written: the
        // database has it.
        uses.retain(|_, u| u.last_ms > u.written_ms || now.saturating_sub(u.last_ms) < 3_600_000);
    }

    /// Whether `agent_id` may propose now: within its rate
    /// (`agent_rate_per_second`, `agent_burst`), else 429 `rate_limited`;
    /// within its quota (`agent_quota` spends on record in the last
    /// `agent_quota_window_seconds`, counted in storage so it holds across
    /// restarts and daemons), else 429 `quota_exceeded`. Both with
    /// `Retry-After`. Checked before the body is read or a policy runs;
    /// a refusal records nothing.
    pub async fn admit_proposal(&self, agent_id: &str) -> Result<(), ApiError> {
        let clock = governor::clock::DefaultClock::default();
        if let Err(not_until) = self.rates.check_key(&agent_id.to_owned()) {
            use governor::clock::Clock as _;
            let wait = not_until.wait_time_from(clock.now());
            self.metrics.proposal("rate_limited");
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!(
                    "this agent may propose {} times a second (bursts of {}); retry later",
                    self.config.agent_rate_per_second, self.config.agent_burst
                ),
            )
            .retry_after(wait));
        }
        let now = now_ms();
        let quota = self.config.agent_quota;
        let refuse = |free_at: u64| {
            self.metrics.proposal("quota_exceeded");
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "quota_exceeded",
                format!(
                    "this agent has made its {quota} proposals of the last {} seconds; retry later",
                    self.config.agent_quota_window_seconds
                ),
            )
            .retry_after(Duration::from_millis(free_at.saturating_sub(now)))
        };
        // Spends only leave the window by ageing out: an agent found full
        // stays full at least until its oldest one does. Below its quota by
        // a fresh count, an agent is admitted on the count kept here; only
        // a stale count, or one that reaches the quota, is taken again from
        // storage, so a refusal always rests on storage's count.
        if let Some(seen) = self.quotas.lock().unwrap_or_else(|p| p.into_inner()).get_mut(agent_id) {
            if let Some(free_at) = seen.full_until_ms.filter(|&free_at| now < free_at) {
                return Err(refuse(free_at));
            }
            let fresh = now.saturating_sub(seen.counted_at_ms) < QUOTA_RECOUNT.as_millis() as u64;
            if fresh && seen.full_until_ms.is_none() && seen.estimate < quota {
                seen.estimate += 1;
                return Ok(());
            }
        }
        let window_ms = self.config.agent_quota_window_seconds.saturating_mul(1000);
        let since = now.saturating_sub(window_ms);
        let backend = Arc::clone(&self.backend);
        let agent = agent_id.to_owned();
        let (count, oldest) = if backend.quick_reads() {
            backend.spends_since(&agent, since, quota)?
        } else {
            tokio::task::spawn_blocking(move || backend.spends_since(&agent, since, quota)).await??
        };
        let mut quotas = self.quotas.lock().unwrap_or_else(|p| p.into_inner());
        if count >= quota {
            // Once the oldest spend in the window ages out, one more fits.
            let free_at = oldest.unwrap_or(now).saturating_add(window_ms);
            quotas.insert(
                agent_id.to_owned(),
                QuotaSeen { counted_at_ms: now, estimate: count, full_until_ms: Some(free_at) },
            );
            return Err(refuse(free_at));
        }
        quotas.insert(
            agent_id.to_owned(),
            QuotaSeen { counted_at_ms: now, estimate: count + 1, full_until_ms: None },
        );
        Ok(())
    }

    /// Wait for `agent_id`'s turn to have a proposal evaluated: at most
    /// `agent_concurrency` of an agent's proposals run at once, so an agent
    /// whose policies burn their whole budget (or that floods the daemon)
    /// takes that many cores at most, and other agents keep theirs. The
    /// turn lasts as long as the permit: hand it to the evaluation, so that
    /// a client hanging up frees nothing early. Refused with 429 when
    /// `agent_queue` proposals already wait.
    pub async fn agent_turn(&self, agent_id: &str) -> Result<OwnedSemaphorePermit, ApiError> {
        let turns = {
            let mut all = self.turns.lock().unwrap_or_else(|p| p.into_inner());
            let concurrency = self.config.agent_concurrency.max(1) as usize;
            Arc::clone(all.entry(agent_id.to_owned()).or_insert_with(|| {
                Arc::new(Turns { running: Arc::new(Semaphore::new(concurrency)), waiting: AtomicU32::new(0) })
            }))
        };
        if let Ok(permit) = Arc::clone(&turns.running).try_acquire_owned() {
            return Ok(permit);
        }
        if turns.waiting.fetch_add(1, Ordering::AcqRel) >= self.config.agent_queue {
            turns.waiting.fetch_sub(1, Ordering::AcqRel);
            self.metrics.proposal("throttled");
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_requests",
                format!(
                    "{} proposals of this agent are already waiting; retry when earlier ones are answered",
                    self.config.agent_queue
                ),
            )
            .retry_after(Duration::from_secs(1)));
        }
        // Counted out however the wait ends, a client hanging up included.
        let _waiting = Waiting(&turns.waiting);
        Arc::clone(&turns.running)
            .acquire_owned()
            .await
            .map_err(|_| ApiError::internal("the agent's turn was closed"))
    }

    /// A policy version, compiled: from memory, or loaded from storage (its
    /// compiled form from the cache on disk, or compiled).
    pub fn policy(&self, name: &str, version: u32) -> Result<Arc<LoadedPolicy>, ApiError> {
        let key = (name.to_owned(), version);
        if let Some(c) = self.policies.read().unwrap_or_else(|p| p.into_inner()).get(&key) {
            c.used.store(self.uses.fetch_add(1, Ordering::Relaxed), Ordering::Relaxed);
            return Ok(Arc::clone(&c.policy));
        }
        let module = self
            .backend
            .policy_module(name, version)?
            .ok_or_else(|| ApiError::not_found(format!("policy `{name}@{version}`")))?;
        let loaded = Arc::new(self.sandbox.load(&module).map_err(|e| {
            ApiError::internal(format!("stored policy `{name}@{version}` no longer loads: {e}"))
        })?);
        self.metrics.policy_load(loaded.from_cache());
        self.remember(name, version, Arc::clone(&loaded));
        Ok(loaded)
    }

    /// Keep a compiled policy in memory; beyond `policy_cache`, drop the
    /// least recently used (an evaluation still running keeps its own).
    fn remember(&self, name: &str, version: u32, policy: Arc<LoadedPolicy>) {
        let used = AtomicU64::new(self.uses.fetch_add(1, Ordering::Relaxed));
        let mut all = self.policies.write().unwrap_or_else(|p| p.into_inner());
        all.insert((name.to_owned(), version), Cached { policy, used });
        while all.len() > self.config.policy_cache.max(1) as usize {
            let Some(oldest) =
                all.iter().min_by_key(|(_, c)| c.used.load(Ordering::Relaxed)).map(|(k, _)| k.clone())
            else {
                break;
            };
            all.remove(&oldest);
        }
    }

    fn card_issuance(&self) -> crate::storage::CardIssuance {
        crate::storage::CardIssuance {
            issuer: Arc::clone(&self.issuer),
            key: Arc::clone(&self.key),
            default_ttl_seconds: self.config.card_ttl_seconds,
        }
    }

    fn approval_ttl_ms(&self) -> u64 {
        self.config.approval_ttl_seconds.saturating_mul(1000)
    }
}

/// The router of every route in docs/contract/api.md, and MCP at `/mcp`.
pub fn app(state: Arc<AppState>) -> Router {
    let max_module = state.config.sandbox.max_module_bytes;
    let max_body = state.config.max_body_bytes;
    let uploads = Router::new()
        .route("/v1/policies", post(policies::upload_policy).get(policies::list_policies))
        .layer(DefaultBodyLimit::max(max_module));
    let api = Router::new()
        .route("/healthz", get(service::healthz))
        .route("/metrics", get(service::metrics))
        .route("/v1/spends", post(spends::propose).get(spends::list_spends))
        .route("/v1/spends/preview", post(preview::preview))
        .route("/v1/spends/{id}", get(spends::get_spend))
        .route("/v1/mandates", post(mandates::create).get(mandates::list))
        .route("/v1/mandates/{id}", get(mandates::get))
        .route("/v1/mandates/{id}/approve", post(mandates::approve))
        .route("/v1/mandates/{id}/deny", post(mandates::deny))
        .route("/v1/mandates/{id}/revoke", post(mandates::revoke))
        .route("/v1/approvals", get(approvals::list_approvals))
        .route("/v1/approvals/{id}/approve", post(approvals::approve))
        .route("/v1/approvals/{id}/deny", post(approvals::deny))
        .route("/v1/wallet", get(wallet::wallet))
        .route("/v1/wallet/deposits", post(wallet::deposit))
        .route("/v1/agents", post(agents::create_agent).get(agents::list_agents))
        .route("/v1/agents/{id}/revoke", post(agents::revoke_agent))
        .route("/v1/agents/{id}/policies", put(agents::set_policies))
        .route("/v1/cards", get(cards::list_cards))
        .route("/v1/cards/{id}/void", post(cards::void_card))
        .route("/v1/network/authorizations", post(cards::authorize))
        .route("/v1/audit", get(audit::audit))
        .route("/v1/audit/verify", get(audit::audit_verify))
        .route("/v1/tokens", get(tokens::list_tokens).post(tokens::create_token))
        .route("/v1/tokens/{id}/revoke", post(tokens::revoke_token))
        .route("/v1/whoami", get(whoami::whoami))
        .layer(DefaultBodyLimit::max(max_body))
        .merge(uploads)
        .route_layer(axum::middleware::from_fn(extract::no_query))
        .fallback(service::not_found)
        .method_not_allowed_fallback(service::method_not_allowed)
        .with_state(Arc::clone(&state));
    // MCP for agents: each tool call is a request of `api` itself.
    api.clone().merge(crate::mcp::http::route(state, api))
}

/// Release expired cards and approvals once.
pub fn sweep(state: &AppState) {
    // Agents whose rate is back to full burst need no state.
    state.rates.retain_recent();
    let now = now_ms();
    // Counts no longer fresh nor full are taken again when needed.
    state.quotas.lock().unwrap_or_else(|p| p.into_inner()).retain(|_, seen| {
        seen.full_until_ms.is_some_and(|free_at| free_at > now)
            || now.saturating_sub(seen.counted_at_ms) < QUOTA_RECOUNT.as_millis() as u64
    });
    match state.backend.expire_cards(now) {
        Ok(0) => {}
        Ok(n) => tracing::info!(cards = n, "released the holds of expired cards"),
        Err(e) => tracing::error!(error = %e, "expiring cards failed"),
    }
    match state.backend.expire_approvals(state.approval_ttl_ms(), now) {
        Ok(0) => {}
        Ok(n) => tracing::info!(spends = n, "approvals expired"),
        Err(e) => tracing::error!(error = %e, "expiring approvals failed"),
    }
    match state.backend.expire_mandates(state.approval_ttl_ms(), now) {
        Ok(0) => {}
        Ok(n) => tracing::info!(mandates = n, "mandates expired"),
        Err(e) => tracing::error!(error = %e, "expiring mandates failed"),
    }
}

/// Serve until SIGINT or SIGTERM, then give requests in flight
/// `shutdown_timeout_ms` to finish.
pub async fn serve(state: Arc<AppState>, listener: tokio::net::TcpListener) -> anyhow::Result<()> {
    let addr: SocketAddr = listener.local_addr()?;
    let tls = state.config.tls.as_ref().map(transport::tls_acceptor).transpose()?;
    if tls.is_none() && !addr.ip().is_loopback() {
        // Only with `allow_insecure_http` (the config's check refuses it
        // otherwise).
        state.config.check_transport()?;
        tracing::warn!(
            %addr,
            "serving plain HTTP beyond loopback (`allow_insecure_http`): tokens, card numbers and CVVs \
             cross the network in clear unless a TLS proxy fronts this address"
        );
    }
    // Whatever expired while nothing ran is released before the first request.
    let first = Arc::clone(&state);
    tokio::task::spawn_blocking(move || sweep(&first)).await?;
    let sweeper_state = Arc::clone(&state);
    let interval = Duration::from_millis(state.config.sweep_interval_ms.max(10));
    let sweeper = tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        loop {
            tick.tick().await;
            let s = Arc::clone(&sweeper_state);
            if tokio::task::spawn_blocking(move || sweep(&s)).await.is_err() {
                tracing::error!("the expiry sweep panicked");
            }
        }
    });
    let flusher_state = Arc::clone(&state);
    let flusher = tokio::spawn(async move {
        let mut tick = tokio::time::interval(TOKEN_USE_FLUSH);
        tick.tick().await;
        loop {
            tick.tick().await;
            let s = Arc::clone(&flusher_state);
            if tokio::task::spawn_blocking(move || s.flush_token_uses()).await.is_err() {
                tracing::error!("the flush of last-use times panicked");
            }
        }
    });
    let stopped = shutdown_signal()?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(%addr, scheme, "spendguard listening");
    // On stdout too, for scripts and tests that asked for port 0.
    println!("spendguard listening on {scheme}://{addr}");
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    let limits = transport::Limits::of(&state.config);
    transport::serve_connections(listener, app(Arc::clone(&state)), tls, limits, stopped).await;
    sweeper.abort();
    flusher.abort();
    // The uses of the last minute, before the process ends.
    tokio::task::spawn_blocking(move || state.flush_token_uses()).await?;
    tracing::info!("spendguard stopped");
    Ok(())
}

/// SIGINT or SIGTERM. The handlers are installed when this is called, not
/// when the future is first polled: a signal sent as soon as the daemon says
/// it listens is a clean stop, never the default action (death).
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    let stopped = {
        use tokio::signal::unix::{SignalKind, signal};
        let mut terminate = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        async move {
            tokio::select! {
                _ = terminate.recv() => {},
                _ = interrupt.recv() => {},
            }
        }
    };
    #[cfg(not(unix))]
    let stopped = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    Ok(stopped)
}
