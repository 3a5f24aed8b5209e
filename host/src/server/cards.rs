//! The card routes: cards are listed (an agent sees its own) and voided by
//! the operator; a merchant's charge reaches `POST /v1/network/authorizations`
//! with a network token.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use serde_json::json;

use super::extract::PathId;
use super::json;
use super::parse::parse_authorization;
use super::{ApiError, AppState, Caller, Reply, blocking, ok};
use crate::datadir::now_ms;

/// The response header of an authorization answered from an earlier one
/// with the same `Idempotency-Key`.
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";

pub async fn list_cards(State(state): State<Arc<AppState>>, caller: Caller) -> Reply {
    let reader = caller.reader()?.map(str::to_owned);
    let s = Arc::clone(&state);
    let cards = blocking(move || Ok(s.backend.cards(reader.as_deref())?)).await?;
    ok(json!({ "cards": cards.iter().map(json::card).collect::<Vec<_>>() }))
}

pub async fn void_card(State(state): State<Arc<AppState>>, caller: Caller, PathId(id): PathId) -> Reply {
    caller.operator()?;
    let s = Arc::clone(&state);
    let actor = caller.actor();
    let card = blocking(move || Ok(s.backend.void_card(&id, &actor, now_ms())?)).await?;
    ok(json::card(&card))
}

// ---- network ---------------------------------------------------------------

pub async fn authorize(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, ApiError> {
    caller.network()?;
    let request = parse_authorization(&json::body(body)?, &headers)?;
    // On SQLite the write is queued for its writer thread and awaited here:
    // no thread is held while it waits for the lock and the fsync.
    let actor = caller.actor();
    let outcome =
        match state.backend.authorize_queued(request, Arc::clone(&state.key), actor.clone(), now_ms()) {
            Ok(answer) => {
                answer.await.map_err(|_| ApiError::internal("the authorization's write was lost"))??
            }
            Err(request) => {
                let s = Arc::clone(&state);
                blocking(move || Ok(s.backend.authorize(&request, &s.key, &actor, now_ms())?)).await?
            }
        };
    let replayed = outcome.replayed;
    state.metrics.authorization(if replayed {
        "replayed"
    } else {
        outcome.decline_code.map_or("approved", |c| c.as_str())
    });
    let body =
        json!({ "approved": outcome.approved, "decline_code": outcome.decline_code.map(|c| c.as_str()) });
    // A retry answered from the first authorization says so.
    let replay_header = replayed.then_some([(IDEMPOTENT_REPLAYED, "true")]);
    Ok((StatusCode::OK, replay_header, Json(body)))
}
