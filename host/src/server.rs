//! The daemon: wallet control and spend access over HTTP (SPEC §9).
//!
//! `app(state)` builds the router, so tests can drive it without a socket;
//! `serve` binds it, runs the expiry sweeper, and shuts down gracefully on
//! SIGINT/SIGTERM, finishing requests in flight.

mod auth;
mod error;
mod json;
mod metrics;
mod routes;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post, put};

pub use auth::Caller;
pub use error::ApiError;
pub use metrics::Metrics;

use crate::cards::{CardKey, Issuer, SimulatedIssuer};
use crate::config::ServeConfig;
use crate::datadir::now_ms;
use crate::sandbox::{LoadedPolicy, Sandbox};
use crate::storage::Backend;

/// Everything a request handler needs.
pub struct AppState {
    pub backend: Arc<dyn Backend>,
    pub sandbox: Arc<Sandbox>,
    pub key: Arc<CardKey>,
    pub issuer: Arc<dyn Issuer>,
    pub config: ServeConfig,
    pub metrics: Metrics,
    /// Policies compiled once, by (name, version).
    policies: RwLock<HashMap<(String, u32), Arc<LoadedPolicy>>>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").field("config", &self.config).finish_non_exhaustive()
    }
}

impl AppState {
    pub fn new(backend: Arc<dyn Backend>, key: Arc<CardKey>, config: ServeConfig) -> anyhow::Result<Self> {
        Ok(AppState {
            backend,
            sandbox: Arc::new(Sandbox::new(config.sandbox.clone())?),
            key,
            issuer: Arc::new(SimulatedIssuer::new()),
            config,
            metrics: Metrics::new(),
            policies: RwLock::new(HashMap::new()),
        })
    }

    /// A policy version, compiled: from the cache, or loaded from storage and
    /// compiled once.
    pub fn policy(&self, name: &str, version: u32) -> Result<Arc<LoadedPolicy>, ApiError> {
        let key = (name.to_owned(), version);
        if let Some(p) = self.policies.read().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return Ok(Arc::clone(p));
        }
        let module = self
            .backend
            .policy_module(name, version)?
            .ok_or_else(|| ApiError::not_found(format!("policy `{name}@{version}`")))?;
        let loaded = Arc::new(self.sandbox.load(&module).map_err(|e| {
            ApiError::internal(format!("stored policy `{name}@{version}` no longer loads: {e}"))
        })?);
        self.policies.write().unwrap_or_else(|p| p.into_inner()).insert(key, Arc::clone(&loaded));
        Ok(loaded)
    }

    fn remember(&self, name: &str, version: u32, policy: Arc<LoadedPolicy>) {
        self.policies.write().unwrap_or_else(|p| p.into_inner()).insert((name.to_owned(), version), policy);
    }

    fn card_issuance(&self) -> crate::storage::CardIssuance<'_> {
        crate::storage::CardIssuance {
            issuer: self.issuer.as_ref(),
            key: &self.key,
            default_ttl_seconds: self.config.card_ttl_seconds,
        }
    }

    fn approval_ttl_ms(&self) -> u64 {
        self.config.approval_ttl_seconds.saturating_mul(1000)
    }
}

/// The router of every route in SPEC §9.
pub fn app(state: Arc<AppState>) -> Router {
    let max_module = state.config.sandbox.max_module_bytes;
    let max_body = state.config.max_body_bytes;
    let uploads = Router::new()
        .route("/v1/policies", post(routes::upload_policy).get(routes::list_policies))
        .layer(DefaultBodyLimit::max(max_module));
    Router::new()
        .route("/healthz", get(routes::healthz))
        .route("/metrics", get(routes::metrics))
        .route("/v1/spends", post(routes::propose).get(routes::list_spends))
        .route("/v1/spends/{id}", get(routes::get_spend))
        .route("/v1/approvals", get(routes::list_approvals))
        .route("/v1/approvals/{id}/approve", post(routes::approve))
        .route("/v1/approvals/{id}/deny", post(routes::deny))
        .route("/v1/wallet", get(routes::wallet))
        .route("/v1/wallet/deposits", post(routes::deposit))
        .route("/v1/agents", post(routes::create_agent).get(routes::list_agents))
        .route("/v1/agents/{id}/revoke", post(routes::revoke_agent))
        .route("/v1/agents/{id}/policies", put(routes::set_policies))
        .route("/v1/cards", get(routes::list_cards))
        .route("/v1/cards/{id}/void", post(routes::void_card))
        .route("/v1/network/authorizations", post(routes::authorize))
        .route("/v1/audit", get(routes::audit))
        .route("/v1/audit/verify", get(routes::audit_verify))
        .layer(DefaultBodyLimit::max(max_body))
        .merge(uploads)
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .with_state(state)
}

/// Release expired cards and approvals once.
pub fn sweep(state: &AppState) {
    let now = now_ms();
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
}

/// Serve until SIGINT or SIGTERM, then finish what is in flight.
pub async fn serve(state: Arc<AppState>, listener: tokio::net::TcpListener) -> anyhow::Result<()> {
    let addr: SocketAddr = listener.local_addr()?;
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
    tracing::info!(%addr, "spendguard listening");
    // On stdout too, for scripts and tests that asked for port 0.
    println!("spendguard listening on http://{addr}");
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    axum::serve(listener, app(state)).with_graceful_shutdown(shutdown_signal()).await?;
    sweeper.abort();
    tracing::info!("spendguard stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutting down: finishing requests in flight");
}
