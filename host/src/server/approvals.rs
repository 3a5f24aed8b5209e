//! The approval routes: the operator lists the spends waiting, and approves
//! one (its agent's policies run again, and the money is held) or denies it.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use serde_json::json;

use super::extract::PathId;
use super::json;
use super::parse::parse_deny;
use super::spends::{evaluate_all, load_policies, policy_request};
use super::{ApiError, AppState, Caller, Reply, blocking, ok};
use crate::datadir::now_ms;
use crate::history::History;
use crate::mandates::MandateRecord;
use crate::storage::{SpendRecord, Verdict};

pub async fn list_approvals(State(state): State<Arc<AppState>>, caller: Caller) -> Reply {
    caller.operator()?;
    let s = Arc::clone(&state);
    let pending = blocking(move || Ok(s.backend.pending_approvals(s.approval_ttl_ms(), now_ms())?)).await?;
    ok(json!({ "approvals": pending.iter().map(|sp| json::spend(sp, None)).collect::<Vec<_>>() }))
}

pub async fn approve(State(state): State<Arc<AppState>>, caller: Caller, PathId(id): PathId) -> Reply {
    caller.operator()?;
    let s = Arc::clone(&state);
    let actor = caller.actor();
    let spend = blocking(move || {
        // Everything the policies need is read first: storage is locked
        // while they run.
        let pending = s.backend.spend(&id)?.ok_or_else(|| ApiError::not_found(format!("spend `{id}`")))?;
        let agent = s.backend.agent(&pending.agent_id)?.filter(|a| !a.revoked);
        let policies = agent.as_ref().map(|a| load_policies(&s, a));
        let mandate = match &pending.mandate_id {
            Some(mandate_id) => s.backend.mandate(mandate_id)?.as_ref().and_then(MandateRecord::for_policy),
            None => None,
        };
        let mut decide = |spend: &SpendRecord, history: Arc<dyn History>| match (&agent, &policies) {
            (Some(agent), Some(policies)) if agent.id == spend.agent_id => {
                evaluate_all(&s, policies, &policy_request(spend, agent, mandate.clone()), history)
            }
            _ => Verdict::Deny(vec!["the agent was revoked".into()]).into(),
        };
        Ok(s.backend.approve(
            &id,
            s.config.card_ttl_seconds,
            s.approval_ttl_ms(),
            &actor,
            now_ms(),
            &mut decide,
        )?)
    })
    .await?;
    state.metrics.proposal("approved_by_operator");
    ok(json::spend(&spend, None))
}

pub async fn deny(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    PathId(id): PathId,
    body: Result<Bytes, BytesRejection>,
) -> Reply {
    caller.operator()?;
    let reason = parse_deny(&json::body(body)?)?;
    let s = Arc::clone(&state);
    let actor = caller.actor();
    let spend =
        blocking(move || Ok(s.backend.deny(&id, &reason, s.approval_ttl_ms(), &actor, now_ms())?)).await?;
    state.metrics.proposal("denied_by_operator");
    ok(json::spend(&spend, None))
}
