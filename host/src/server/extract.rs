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
            Err(e) => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no such id: {}", e.body_text()),
            )),
        }
    }
}

/// The routes that read a query string.
fn takes_query(method: &Method, path: &str) -> bool {
    matches!(
        (method, path),
        (&Method::GET, "/v1/spends" | "/v1/audit" | "/v1/audit/verify")
            | (&Method::POST, "/v1/policies")
            | (_, "/healthz" | "/metrics")
    )
}

/// Middleware: every other route refuses a query string, as a body with an
/// unknown field is refused: `/v1/cards?limit=5` is not five cards, and
/// `POST /v1/wallet/deposits?dry_run=true` is not a dry run.
pub async fn no_query(request: Request, next: Next) -> Response {
    let query = request.uri().query().unwrap_or_default();
    if !query.is_empty() {
        let path = request.extensions().get::<MatchedPath>().map_or("", MatchedPath::as_str);
        if !takes_query(request.method(), path) {
            return ApiError::invalid(
                "invalid_query",
                format!("{} {path} takes no query string, got `?{query}`", request.method()),
            )
            .into_response();
        }
    }
    next.run(request).await
}
