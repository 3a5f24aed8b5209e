//! The mandate routes (docs/contract/api.md, "Mandates"): the operator creates
//! a mandate for an agent, or answers one the agent asked for; the agent
//! asks, reads its own, and may give one up; either may revoke.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::extract::PathId;
use super::json::{self, parse_bytes};
use super::parse::{MAX_NAME_CHARS, MAX_PURPOSE_CHARS, QueryResult, amount, merchant_id, query, text};
use super::{ApiError, AppState, Caller, blocking};
use crate::cases::check_mcc;
use crate::datadir::now_ms;
use crate::mandates::{
    Creator, DEFAULT_MANDATE_SECONDS, MAX_MANDATE_SCOPE, MAX_MANDATE_SECONDS, MandateRecord, NewMandate,
};
use crate::money::{Amount, format_units};
use crate::storage::{Role, new_ordered_id};

type Reply = Result<(StatusCode, Json<Value>), ApiError>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MandateBody {
    #[serde(default)]
    agent_id: Option<String>,
    amount: String,
    currency: String,
    purpose: String,
    #[serde(default)]
    merchant_ids: Vec<String>,
    #[serde(default)]
    mccs: Vec<String>,
    #[serde(default)]
    max_spends: Option<u32>,
    #[serde(default)]
    expires_in_seconds: Option<u64>,
}

/// A mandate as `POST /v1/mandates` asks for it, checked without storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MandateRequest {
    /// Given by the operator; `None` when an agent asks for itself.
    pub agent_id: Option<String>,
    pub amount: Amount,
    pub purpose: String,
    pub merchant_ids: Vec<String>,
    pub mccs: Vec<String>,
    pub max_spends: Option<u32>,
    pub expires_in_seconds: u64,
}

/// Validate the body of `POST /v1/mandates`: a positive amount valid for a
/// known currency, a purpose, merchant ids checked as a proposal's merchant
/// id is, four-digit categories, `max_spends` of at least 1, and a life of 1
/// second to 30 days (an hour when not given).
pub fn parse_new_mandate(body: &[u8]) -> Result<MandateRequest, ApiError> {
    let body: MandateBody = parse_bytes(body)?;
    if let Some(agent_id) = &body.agent_id {
        text("agent_id", agent_id, MAX_NAME_CHARS, true)?;
    }
    let amount = amount(&body.amount, &body.currency)?;
    text("purpose", &body.purpose, MAX_PURPOSE_CHARS, true)?;
    for (field, list) in [("merchant_ids", &body.merchant_ids), ("mccs", &body.mccs)] {
        if list.len() > MAX_MANDATE_SCOPE {
            return Err(ApiError::invalid(
                "invalid_field",
                format!("`{field}` names more than {MAX_MANDATE_SCOPE} entries"),
            ));
        }
    }
    for (i, id) in body.merchant_ids.iter().enumerate() {
        merchant_id(&format!("merchant_ids[{i}]"), id)?;
    }
    for (i, mcc) in body.mccs.iter().enumerate() {
        check_mcc(&format!("mccs[{i}]"), mcc)
            .map_err(|e| ApiError::invalid("invalid_field", e.to_string()))?;
    }
    if body.max_spends == Some(0) {
        return Err(ApiError::invalid(
            "invalid_field",
            "`max_spends` must be at least 1 (leave it out for no limit)",
        ));
    }
    let expires_in_seconds = body.expires_in_seconds.unwrap_or(DEFAULT_MANDATE_SECONDS);
    if !(1..=MAX_MANDATE_SECONDS).contains(&expires_in_seconds) {
        return Err(ApiError::invalid(
            "invalid_field",
            format!("`expires_in_seconds` must be 1 to {MAX_MANDATE_SECONDS} (30 days)"),
        ));
    }
    Ok(MandateRequest {
        agent_id: body.agent_id,
        amount,
        purpose: body.purpose,
        merchant_ids: body.merchant_ids,
        mccs: body.mccs,
        max_spends: body.max_spends,
        expires_in_seconds,
    })
}

/// A mandate as the API shows it, its status and amounts as of `now_ms`.
pub fn mandate_json(m: &MandateRecord, now_ms: u64, approval_ttl_ms: u64) -> Value {
    let d = &m.mandate;
    let exponent = d.amount.exponent();
    json!({
        "id": d.id,
        "agent_id": d.agent_id,
        "status": m.status(now_ms, approval_ttl_ms).as_str(),
        "purpose": d.purpose,
        "amount": d.amount.to_decimal().to_string(),
        "currency": d.amount.currency(),
        "merchant_ids": d.merchant_ids,
        "mccs": d.mccs,
        "max_spends": d.max_spends,
        "expires_at": json::time(d.expires_at_ms),
        "spent": format_units(m.spent_units, exponent),
        "held": format_units(m.held_units, exponent),
        "remaining": format_units(m.remaining_units(), exponent),
        "spend_count": m.spend_count,
        "created_at": json::time(d.created_at_ms),
        "created_by": d.created_by.as_str(),
        "approved_at": m.approved_at_ms().map(json::time),
    })
}

fn reply(state: &AppState, status: StatusCode, m: &MandateRecord) -> Reply {
    Ok((status, Json(mandate_json(m, now_ms(), state.approval_ttl_ms()))))
}

/// A mandate the caller may see: any for the operator, its own for an
/// agent (another's is not found, as if it did not exist).
fn visible(state: &AppState, caller: &Caller, id: &str) -> Result<MandateRecord, ApiError> {
    let reader = caller.reader()?;
    state
        .backend
        .mandate(id)?
        .filter(|m| reader.is_none_or(|agent| agent == m.mandate.agent_id))
        .ok_or_else(|| ApiError::not_found(format!("mandate `{id}`")))
}

pub async fn create(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Reply {
    // The network token is refused before the body is read.
    caller.reader()?;
    let request = parse_new_mandate(&json::body(body)?)?;
    let (agent_id, created_by) = match (&caller.role, &request.agent_id) {
        (Role::Operator, Some(agent_id)) => (agent_id.clone(), Creator::Operator),
        (Role::Operator, None) => {
            return Err(ApiError::invalid(
                "invalid_field",
                "the operator names the agent the mandate is for: `agent_id`",
            ));
        }
        (Role::Agent(own), None) => (own.clone(), Creator::Agent),
        _ => {
            return Err(ApiError::invalid(
                "invalid_field",
                "an agent asks for a mandate for itself: leave out `agent_id`",
            ));
        }
    };
    let s = Arc::clone(&state);
    let actor = caller.actor();
    let record = blocking(move || {
        let now = now_ms();
        let mandate = NewMandate {
            id: new_ordered_id("md", now),
            agent_id,
            amount: request.amount,
            purpose: request.purpose,
            merchant_ids: request.merchant_ids,
            mccs: request.mccs,
            max_spends: request.max_spends,
            expires_at_ms: now.saturating_add(request.expires_in_seconds.saturating_mul(1000)),
            created_by,
            created_at_ms: now,
        };
        Ok(s.backend.create_mandate(&mandate, &actor, now)?)
    })
    .await?;
    reply(&state, StatusCode::CREATED, &record)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    #[serde(default)]
    agent_id: Option<String>,
}

pub async fn list(State(state): State<Arc<AppState>>, caller: Caller, q: QueryResult<ListQuery>) -> Reply {
    let reader = caller.reader()?.map(str::to_owned);
    let q = query(q)?;
    let agent_id = match (reader, q.agent_id) {
        (Some(own), Some(asked)) if own != asked => {
            return Err(ApiError::forbidden("an agent may list only its own mandates"));
        }
        (Some(own), _) => Some(own),
        (None, asked) => asked,
    };
    let s = Arc::clone(&state);
    let list = blocking(move || Ok(s.backend.mandates(agent_id.as_deref())?)).await?;
    let (now, ttl) = (now_ms(), state.approval_ttl_ms());
    Ok((
        StatusCode::OK,
        Json(json!({ "mandates": list.iter().map(|m| mandate_json(m, now, ttl)).collect::<Vec<_>>() })),
    ))
}

pub async fn get(State(state): State<Arc<AppState>>, caller: Caller, PathId(id): PathId) -> Reply {
    let s = Arc::clone(&state);
    let record = blocking(move || visible(&s, &caller, &id)).await?;
    reply(&state, StatusCode::OK, &record)
}

async fn answer(state: Arc<AppState>, caller: Caller, id: String, approve: bool) -> Reply {
    caller.operator()?;
    let s = Arc::clone(&state);
    let actor = caller.actor();
    let record = blocking(move || {
        Ok(s.backend.answer_mandate(&id, approve, s.approval_ttl_ms(), &actor, now_ms())?)
    })
    .await?;
    reply(&state, StatusCode::OK, &record)
}

pub async fn approve(State(state): State<Arc<AppState>>, caller: Caller, PathId(id): PathId) -> Reply {
    answer(state, caller, id, true).await
}

pub async fn deny(State(state): State<Arc<AppState>>, caller: Caller, PathId(id): PathId) -> Reply {
    answer(state, caller, id, false).await
}

pub async fn revoke(State(state): State<Arc<AppState>>, caller: Caller, PathId(id): PathId) -> Reply {
    let s = Arc::clone(&state);
    let record = blocking(move || {
        // The agent may give up its own; another's is not found.
        visible(&s, &caller, &id)?;
        Ok(s.backend.revoke_mandate(&id, &caller.actor(), now_ms())?)
    })
    .await?;
    reply(&state, StatusCode::OK, &record)
}
