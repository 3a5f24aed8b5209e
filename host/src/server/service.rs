//! The routes about the daemon itself: its health, its metrics, and the
//! answers to an unknown route or method.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde_json::{Value, json};

use super::{ApiError, AppState, blocking};

pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method",
    )
}

pub async fn healthz() -> Json<Value> {
    Json(json!({ "ok": true }))
}

pub async fn not_found() -> ApiError {
    ApiError::not_found("route")
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> Result<impl IntoResponse, ApiError> {
    let s = Arc::clone(&state);
    let balances = blocking(move || Ok(s.backend.balances()?)).await?;
    Ok((
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        state.metrics.render(&balances),
    ))
}
