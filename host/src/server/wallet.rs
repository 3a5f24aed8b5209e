//! The wallet routes: the operator deposits money and reads the balances.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::HeaderMap;
use serde_json::json;

use super::json;
use super::parse::{Deposit, parse_deposit};
use super::{AppState, Caller, Reply, blocking, created, ok};
use crate::datadir::now_ms;

pub async fn deposit(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Reply {
    caller.operator()?;
    let Deposit { amount, idempotency_key: key } = parse_deposit(&json::body(body)?, &headers)?;
    let s = Arc::clone(&state);
    let actor = caller.actor();
    let d = blocking(move || Ok(s.backend.deposit(&amount, key.as_deref(), &actor, now_ms())?)).await?;
    created(
        json!({ "id": d.id, "amount": d.amount.to_decimal().to_string(), "currency": d.amount.currency() }),
    )
}

pub async fn wallet(State(state): State<Arc<AppState>>, caller: Caller) -> Reply {
    caller.operator()?;
    let s = Arc::clone(&state);
    let balances = blocking(move || Ok(s.backend.balances()?)).await?;
    ok(json!({ "balances": balances }))
}
