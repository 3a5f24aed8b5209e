//! `GET /v1/whoami`: which role a token has, and for an agent's, which
//! agent. Any valid token may ask; `spendguard mcp` asks before it starts.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use super::{ApiError, AppState, Caller};
use crate::storage::Role;

pub async fn whoami(State(state): State<Arc<AppState>>, caller: Caller) -> Result<Json<Value>, ApiError> {
    let Role::Agent(agent_id) = &caller.role else {
        return Ok(Json(json!({ "role": caller.role.name() })));
    };
    let backend = Arc::clone(&state.backend);
    let id = agent_id.clone();
    let agent = tokio::task::spawn_blocking(move || backend.agent(&id)).await??;
    let agent = agent
        .filter(|a| !a.revoked)
        .ok_or_else(|| ApiError::unauthorized("revoked_token", "this agent was revoked"))?;
    Ok(Json(json!({ "role": "agent", "agent_id": agent.id, "name": agent.name })))
}
