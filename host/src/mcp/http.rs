//! MCP over Streamable HTTP, served by the daemon at `/mcp`.
//!
//! Only an agent's bearer token is let through (401 without a valid token,
//! 403 for the operator's or the network's). Stateless: every POST carries
//! its token and is checked again, so a revoked agent's next call fails, and
//! there is no session to end. Each tool call is a request of the daemon's
//! own router, made in process with the caller's `Authorization` header and
//! address: the same validation, authorization, rate limits and audit trail.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use rmcp::RoleServer;
use rmcp::service::RequestContext;
use rmcp::transport::streamable_http_server::session::never::NeverSessionManager;
use rmcp::transport::{StreamableHttpServerConfig, StreamableHttpService};
use serde_json::Value;
use tower::ServiceExt as _;

use super::{Api, ApiCall, Method, Refusal, SpendTools};
use crate::server::{AppState, Caller};

/// The largest answer of the API read back (a page of spends is far smaller).
const MAX_ANSWER_BYTES: usize = 32 * 1024 * 1024;

/// The daemon's API router, called in process.
#[derive(Clone)]
pub struct InProcess {
    api: Router,
}

impl std::fmt::Debug for InProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcess").finish_non_exhaustive()
    }
}

fn refused_by_api(body: &[u8]) -> Refusal {
    let error = serde_json::from_slice::<Value>(body).ok().map(|v| v["error"].clone());
    match error {
        Some(e) if e["code"].is_string() => {
            Refusal::new(e["code"].as_str().unwrap_or_default(), e["message"].as_str().unwrap_or_default())
        }
        _ => Refusal::new("internal", "the daemon's answer could not be read"),
    }
}

impl Api for InProcess {
    async fn call(&self, call: ApiCall, context: &RequestContext<RoleServer>) -> Result<Value, Refusal> {
        // The MCP request's own parts: its token and where it came from.
        let parts = context
            .extensions
            .get::<Parts>()
            .ok_or_else(|| Refusal::new("internal", "the MCP request's headers are missing"))?;
        let mut uri = call.path;
        if !call.query.is_empty() {
            let query: Vec<String> = call.query.iter().map(|(k, v)| format!("{k}={v}")).collect();
            uri = format!("{uri}?{}", query.join("&"));
        }
        let method = match call.method {
            Method::Get => axum::http::Method::GET,
            Method::Post => axum::http::Method::POST,
        };
        let mut builder = Request::builder().method(method).uri(uri).header(CONTENT_TYPE, "application/json");
        for value in parts.headers.get_all(AUTHORIZATION) {
            builder = builder.header(AUTHORIZATION, value);
        }
        if let Some(key) = &call.idempotency_key {
            builder = builder.header("idempotency-key", key);
        }
        let body = match &call.body {
            Some(body) => Body::from(body.to_string()),
            None => Body::empty(),
        };
        let mut request = builder.body(body).map_err(|_| {
            Refusal::new("invalid_arguments", "the arguments cannot be sent in an HTTP request")
        })?;
        if let Some(address) = parts.extensions.get::<ConnectInfo<SocketAddr>>() {
            request.extensions_mut().insert(*address);
        }
        let response = match self.api.clone().oneshot(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        };
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), MAX_ANSWER_BYTES)
            .await
            .map_err(|_| Refusal::new("internal", "the daemon's answer could not be read"))?;
        if !status.is_success() {
            return Err(refused_by_api(&bytes));
        }
        serde_json::from_slice(&bytes)
            .map_err(|_| Refusal::new("internal", "the daemon's answer is not JSON"))
    }
}

type Service = StreamableHttpService<SpendTools<InProcess>, NeverSessionManager>;

#[derive(Clone)]
struct Endpoint {
    state: Arc<AppState>,
    service: Service,
}

/// The `/mcp` route: `api` (the daemon's router without it) answers the
/// tools' calls.
pub fn route(state: Arc<AppState>, api: Router) -> Router {
    let tools = SpendTools::new(InProcess { api });
    let config = StreamableHttpServerConfig::default()
        .with_legacy_session_mode(false)
        .with_json_response(true)
        .with_sse_keep_alive(None)
        .with_max_request_body_bytes(state.config.max_body_bytes)
        // The Host check guards servers that trust whoever reaches them
        // (DNS rebinding from a browser); this one trusts only a bearer
        // token, which a browser never adds to a cross-site request, and
        // may be served under any name (TLS, a proxy).
        .disable_allowed_hosts();
    let service = StreamableHttpService::new(move || Ok(tools.clone()), Arc::default(), config);
    Router::new().route("/mcp", any(endpoint)).with_state(Endpoint { state, service })
}

async fn endpoint(State(endpoint): State<Endpoint>, request: Request) -> Response {
    let (mut parts, body) = request.into_parts();
    let caller = match Caller::from_request_parts(&mut parts, &endpoint.state).await {
        Ok(caller) => caller,
        Err(refused) => return refused.into_response(),
    };
    if let Err(refused) = caller.agent() {
        return refused.into_response();
    }
    let request = Request::from_parts(parts, body);
    match endpoint.service.oneshot(request).await {
        Ok(response) => response.into_response(),
        Err(never) => match never {},
    }
}
