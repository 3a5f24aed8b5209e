//! What a request's path and query string may hold, refused as JSON errors
//! (axum's own rejections are plain text).

use axum::extract::{FromRequestParts, MatchedPath, Path, Request};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::ApiError;

/// The `{id}` of a route's path. One that is no UTF-8 once percent-decoded
/// (`/v1/spends/%FF`) names nothing: 404, as any unknown id.
#[derive(Debug, Clone)]
pub struct PathId(pub String);

impl<S: Send + Sync> FromRequestParts<S> for PathId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(id)) => Ok(PathId(id)),
            // Not the parser's message: it repeats the path.
            Err(_) => Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such id")),
        }
    }
}

/// What a route accepts in its query string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Takes {
    Nothing,
    /// These parameters only (their values are the handler's to check).
    Params(&'static [&'static str]),
    Anything,
}

/// The routes that read a query string, and which parameters. A route opts
/// in by its method and path here.
fn takes(method: &Method, path: &str) -> Takes {
    match (method, path) {
        (&Method::GET, "/v1/spends") => Takes::Params(&["limit"]),
        (&Method::GET, "/v1/mandates") => Takes::Params(&["agent_id"]),
        (&Method::GET, "/v1/audit") => Takes::Params(&["after", "limit"]),
        (&Method::GET, "/v1/audit/verify") => Takes::Params(&["checkpoint"]),
        // Its handler refuses anything but `?name=NAME` itself
        // (`invalid_name`, without repeating the query).
        (&Method::POST, "/v1/policies") | (_, "/healthz" | "/metrics") => Takes::Anything,
        _ => Takes::Nothing,
    }
}

/// Middleware: a route refuses a query string, or any parameter it does
/// not name, as a body with an unknown field is refused: `/v1/cards?limit=5`
/// is not five cards, and `POST /v1/wallet/deposits?dry_run=true` is not a
/// dry run. The refusal never repeats the query: it may hold a secret
/// (`?token=…`, sent where a header belongs).
pub async fn no_query(request: Request, next: Next) -> Response {
    let query = request.uri().query().unwrap_or_default();
    if !query.is_empty() {
        let path = request.extensions().get::<MatchedPath>().map_or("", MatchedPath::as_str);
        let method = request.method();
        let refusal = match takes(method, path) {
            Takes::Anything => None,
            Takes::Nothing => Some(format!("{method} {path} takes no query string")),
            Takes::Params(names) => {
                let named = |pair: &str| names.contains(&pair.split_once('=').map_or(pair, |(k, _)| k));
                (!query.split('&').filter(|p| !p.is_empty()).all(named)).then(|| {
                    let names: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
                    format!("{method} {path} takes only {} in its query string", names.join(", "))
                })
            }
        };
        if let Some(message) = refusal {
            return ApiError::invalid("invalid_query", message).into_response();
        }
    }
    next.run(request).await
}
