//! The agent routes: the operator creates an agent (and its token), lists
//! and revokes agents, and sets the policies attached to one.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use serde_json::json;

use super::extract::PathId;
use super::json;
use super::parse::{AttachmentRef, parse_attachments, parse_new_agent};
use super::{ApiError, AppState, Caller, Reply, blocking, created, ok};
use crate::datadir::{new_token, now_ms, token_hash};
use crate::sandbox::fault_reason;
use crate::storage::{AgentRecord, Attachment, Role, new_id};

/// Resolve each attachment's version (the latest when none is named), and
/// have each policy accept its config (its `validate-config`), before
/// anything is stored.
fn resolve_attachments(state: &AppState, list: Vec<AttachmentRef>) -> Result<Vec<Attachment>, ApiError> {
    let mut out = Vec::with_capacity(list.len());
    for AttachmentRef { policy: name, version, config } in list {
        let version = match version {
            Some(v) => v,
            None => state
                .backend
                .latest_policy_version(&name)?
                .ok_or_else(|| ApiError::invalid("unknown_policy", format!("no policy named `{name}`")))?,
        };
        let loaded = state.policy(&name, version).map_err(|e| {
            if e.status == StatusCode::NOT_FOUND { ApiError::invalid("unknown_policy", e.message) } else { e }
        })?;
        let check = state.sandbox.validate_config(&loaded, &config);
        match check.outcome {
            Ok(Ok(())) => {}
            Ok(Err(message)) => {
                return Err(ApiError::invalid(
                    "invalid_config",
                    format!("policy `{name}@{version}` refused its config: {message}"),
                ));
            }
            Err(fault) => return Err(ApiError::invalid("invalid_config", fault_reason(&name, &fault))),
        }
        out.push(Attachment { policy: name, version, config });
    }
    Ok(out)
}

pub async fn create_agent(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Reply {
    caller.operator()?;
    let body = parse_new_agent(&json::body(body)?, state.config.sandbox.max_config_bytes)?;
    let s = Arc::clone(&state);
    let actor = caller.actor();
    let (agent, token) = blocking(move || {
        let attachments = resolve_attachments(&s, body.policies)?;
        let id = new_id("ag");
        let token = new_token(&Role::Agent(id.clone()));
        let record = AgentRecord {
            id,
            name: body.name,
            labels: body.labels,
            attachments,
            revoked: false,
            created_at_ms: now_ms(),
        };
        let agent = s.backend.create_agent(&record, &token_hash(&token), &actor, now_ms())?;
        Ok((agent, token))
    })
    .await?;
    created(json!({ "id": agent.id, "name": agent.name, "token": token }))
}

pub async fn list_agents(State(state): State<Arc<AppState>>, caller: Caller) -> Reply {
    caller.operator()?;
    let s = Arc::clone(&state);
    let agents = blocking(move || Ok(s.backend.agents()?)).await?;
    ok(json!({ "agents": agents.iter().map(json::agent).collect::<Vec<_>>() }))
}

pub async fn revoke_agent(State(state): State<Arc<AppState>>, caller: Caller, PathId(id): PathId) -> Reply {
    caller.operator()?;
    let s = Arc::clone(&state);
    let actor = caller.actor();
    let agent = blocking(move || Ok(s.backend.revoke_agent(&id, &actor, now_ms())?)).await?;
    ok(json::agent(&agent))
}

pub async fn set_policies(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    PathId(id): PathId,
    body: Result<Bytes, BytesRejection>,
) -> Reply {
    caller.operator()?;
    let list = parse_attachments(&json::body(body)?, state.config.sandbox.max_config_bytes)?;
    let s = Arc::clone(&state);
    let actor = caller.actor();
    let agent = blocking(move || {
        if s.backend.agent(&id)?.is_none() {
            return Err(ApiError::not_found(format!("agent `{id}`")));
        }
        let attachments = resolve_attachments(&s, list)?;
        Ok(s.backend.set_attachments(&id, &attachments, &actor, now_ms())?)
    })
    .await?;
    ok(json::agent(&agent))
}
