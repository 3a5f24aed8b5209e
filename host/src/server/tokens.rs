//! The token routes: the operator lists tokens, makes an operator or
//! network token (an agent's is made with the agent) and revokes one.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use serde_json::{Value, json};

use super::extract::PathId;
use super::json;
use super::parse::{NewToken, parse_new_token};
use super::{AppState, Caller, Reply, blocking, created, ok};
use crate::datadir::{new_token, now_ms, token_hash};
use crate::storage::{Role, TokenRecord};

fn token_json(state: &AppState, t: &TokenRecord) -> Value {
    // This daemon's own uses are shown at once; the database has those of
    // every daemon, each up to a minute late.
    let last_used = t.last_used_at_ms.max(state.token_last_used(&t.id));
    let mut v = json!({
        "id": t.id,
        "role": t.role.name(),
        "label": t.label,
        "created_at": json::time(t.created_at_ms),
        "last_used_at": last_used.map(json::time),
        "revoked_at": t.revoked_at_ms.map(json::time),
    });
    if let Role::Agent(agent_id) = &t.role {
        v["agent_id"] = json!(agent_id);
    }
    v
}

pub async fn list_tokens(State(state): State<Arc<AppState>>, caller: Caller) -> Reply {
    caller.operator()?;
    let s = Arc::clone(&state);
    let tokens = blocking(move || Ok(s.backend.tokens()?)).await?;
    ok(json!({ "tokens": tokens.iter().map(|t| token_json(&state, t)).collect::<Vec<_>>() }))
}

pub async fn create_token(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Reply {
    caller.operator()?;
    let NewToken { role, label } = parse_new_token(&json::body(body)?)?;
    let s = Arc::clone(&state);
    let actor = caller.actor();
    let (id, token) = blocking(move || {
        let token = new_token(&role);
        let id = s.backend.add_token(&role, &token_hash(&token), &label, &actor, now_ms())?;
        Ok((id, token))
    })
    .await?;
    created(json!({ "id": id, "token": token }))
}

pub async fn revoke_token(State(state): State<Arc<AppState>>, caller: Caller, PathId(id): PathId) -> Reply {
    caller.operator()?;
    let s = Arc::clone(&state);
    let actor = caller.actor();
    let token = blocking(move || Ok(s.backend.revoke_token(&id, &actor, now_ms())?)).await?;
    ok(token_json(&state, &token))
}
