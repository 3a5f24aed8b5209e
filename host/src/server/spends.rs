//! The spend routes: an agent proposes a spend (its policies decide, and an
//! approved spend's card is made in the same transaction), and reads its
//! spends; the operator reads them all.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::HeaderMap;
use serde_json::json;
use tokio::sync::OwnedSemaphorePermit;

use super::extract::PathId;
use super::json;
use super::parse::{ListQuery, MAX_LIST, Proposal, QueryResult, parse_proposal, query};
use super::{ApiError, AppState, Caller, Reply, blocking, created, ok};
use crate::datadir::now_ms;
use crate::decide::{self, Loaded};
use crate::history::History;
use crate::mandates::MandateRecord;
use crate::policy;
use crate::storage::{AgentRecord, Decided, NewSpend, SpendRecord, SpendStatus, new_ordered_id};

pub async fn propose(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Reply {
    let Opening { agent_id, proposal, received_at_ms, turn } = open(&state, &caller, body, &headers).await?;
    let spend = NewSpend {
        id: new_ordered_id("sp", received_at_ms),
        agent_id: agent_id.clone(),
        idempotency_key: proposal.idempotency_key,
        amount: proposal.amount,
        merchant: proposal.merchant,
        purpose: proposal.purpose,
        received_at_ms,
        mandate_id: proposal.mandate_id,
    };
    let s = Arc::clone(&state);
    let actor = caller.actor();
    let proposed = blocking(move || {
        let _turn = turn;
        let agent = live_agent(&s, &agent_id)?;
        // A mandate that is not the agent's own is not found, and nothing
        // is recorded (storage checks again in the committing transaction).
        // The policies see the mandate as it stands now (contract 0.2.0).
        let mandate = own_mandate(&s, &agent_id, spend.mandate_id.as_deref())?;
        let request = policy::SpendRequest {
            id: spend.id.clone(),
            agent: policy_agent(&agent),
            amount: spend.amount.clone(),
            merchant: spend.merchant.clone(),
            purpose: spend.purpose.clone(),
            received_at_ms,
            mandate: mandate.as_ref().and_then(MandateRecord::for_policy),
        };
        let policies = load_policies(&s, &agent);
        let mut decide = |history: Arc<dyn History>| evaluate_all(&s, &policies, &request, history);
        Ok(s.backend.propose(&spend, &s.card_issuance(), &actor, now_ms(), &mut decide)?)
    })
    .await?;
    state.metrics.proposal(if proposed.replayed { "replayed" } else { proposed.spend.status.as_str() });
    let card = proposed.card.as_ref().map(json::new_card);
    let mut v = json!({
        "id": proposed.spend.id,
        "status": proposed.spend.status.as_str(),
        "reasons": proposed.spend.reasons,
    });
    if let Some(card) = card {
        v["card"] = card;
    } else if proposed.replayed && proposed.spend.card_id.is_some() {
        v["card"] = json!({ "id": proposed.spend.card_id, "secrets": "shown once, in the first response" });
    }
    created(v)
}

/// What a proposal and a preview share before their policies run.
pub(super) struct Opening {
    pub agent_id: String,
    pub proposal: Proposal,
    /// When the request arrived (ms): the time the policies see.
    pub received_at_ms: u64,
    /// The agent's turn ([`AppState::agent_turn`]): hold it until the
    /// policies have run.
    pub turn: OwnedSemaphorePermit,
}

/// The opening of a proposal or a preview: an agent's token; the agent
/// admitted (its rate and quota) before its body is read; the body parsed;
/// then the agent's turn. A refusal records nothing.
pub(super) async fn open(
    state: &AppState,
    caller: &Caller,
    body: Result<Bytes, BytesRejection>,
    headers: &HeaderMap,
) -> Result<Opening, ApiError> {
    let agent_id = caller.agent()?.to_owned();
    state.admit_proposal(&agent_id).await?;
    let proposal = parse_proposal(&json::body(body)?, headers)?;
    let received_at_ms = now_ms();
    let turn = state.agent_turn(&agent_id).await?;
    Ok(Opening { agent_id, proposal, received_at_ms, turn })
}

/// The agent as it stands: revoked since its token was checked, it is
/// refused before its policies run (and storage checks again in the
/// transaction that would commit).
pub(super) fn live_agent(state: &AppState, agent_id: &str) -> Result<AgentRecord, ApiError> {
    state
        .backend
        .agent(agent_id)?
        .filter(|a| !a.revoked)
        .ok_or_else(|| ApiError::unauthorized("revoked_token", "this agent was revoked"))
}

pub(super) fn policy_agent(agent: &AgentRecord) -> policy::Agent {
    policy::Agent {
        id: agent.id.clone(),
        name: agent.name.clone(),
        labels: agent.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
    }
}

/// The request the policies saw when the spend was proposed, rebuilt from
/// the record (same id, amount, merchant, purpose and time), with its
/// mandate as it stands now.
pub(super) fn policy_request(
    spend: &SpendRecord,
    agent: &AgentRecord,
    mandate: Option<policy::RequestMandate>,
) -> policy::SpendRequest {
    policy::SpendRequest {
        id: spend.id.clone(),
        agent: policy_agent(agent),
        amount: spend.amount.clone(),
        merchant: spend.merchant.clone(),
        purpose: spend.purpose.clone(),
        received_at_ms: spend.received_at_ms,
        mandate,
    }
}

/// The agent's attached policies, compiled (from memory, the compiled
/// cache, or compiled), before the storage transaction.
pub(super) fn load_policies(state: &AppState, agent: &AgentRecord) -> Loaded {
    decide::load_policies(&agent.attachments, |name, version| {
        state.policy(name, version).map_err(|e| e.message)
    })
}

/// Every attached policy evaluated and combined ([`decide::evaluate_all`]),
/// each evaluation counted in the metrics.
pub(super) fn evaluate_all(
    state: &AppState,
    policies: &Loaded,
    request: &policy::SpendRequest,
    history: Arc<dyn History>,
) -> Decided {
    decide::evaluate_all(&state.sandbox, policies, request, history, &mut |run| {
        state.metrics.evaluation(run.elapsed.as_secs_f64(), run.outcome.as_ref().err().map(|f| f.kind()));
    })
}

pub async fn get_spend(State(state): State<Arc<AppState>>, caller: Caller, PathId(id): PathId) -> Reply {
    let reader = caller.reader()?.map(str::to_owned);
    let s = Arc::clone(&state);
    let value = blocking(move || {
        let spend = s.backend.spend(&id)?.filter(|sp| reader.as_ref().is_none_or(|a| *a == sp.agent_id));
        let spend = spend.ok_or_else(|| ApiError::not_found(format!("spend `{id}`")))?;
        // The proposing agent collects the card of a spend approved after
        // escalation: made now, its PAN and CVV shown this once.
        let mut secrets = None;
        if reader.is_some() && spend.status == SpendStatus::Approved && spend.card_id.is_none() {
            secrets = s.backend.claim_card(&spend.id, &s.card_issuance(), now_ms())?;
        }
        // Read again only when a card was just made for it.
        let spend = match &secrets {
            Some(_) => s.backend.spend(&id)?.ok_or_else(|| ApiError::not_found(format!("spend `{id}`")))?,
            None => spend,
        };
        let card = match &spend.card_id {
            Some(card_id) => s.backend.card(card_id)?,
            None => None,
        };
        let card_json = match (&card, &secrets) {
            (Some(record), Some(issued)) => Some(json::card_with_secrets(issued, record)),
            (Some(record), None) => Some(json::card(record)),
            _ => None,
        };
        Ok(json::spend(&spend, card_json))
    })
    .await?;
    ok(value)
}

pub async fn list_spends(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    q: QueryResult<ListQuery>,
) -> Reply {
    let reader = caller.reader()?.map(str::to_owned);
    let q = query(q)?;
    let limit = q.limit.unwrap_or(100).min(MAX_LIST);
    let s = Arc::clone(&state);
    let spends = blocking(move || Ok(s.backend.spends(reader.as_deref(), limit)?)).await?;
    ok(json!({ "spends": spends.iter().map(|sp| json::spend(sp, None)).collect::<Vec<_>>() }))
}

/// The mandate a proposal or a preview names, if it is the agent's own;
/// another agent's (or none by that id) is not found, before anything is
/// recorded.
pub(super) fn own_mandate(
    state: &AppState,
    agent_id: &str,
    mandate_id: Option<&str>,
) -> Result<Option<MandateRecord>, ApiError> {
    let Some(mandate_id) = mandate_id else { return Ok(None) };
    let mandate = state
        .backend
        .mandate(mandate_id)?
        .filter(|m| m.mandate.agent_id == agent_id)
        .ok_or_else(|| ApiError::not_found(format!("mandate `{mandate_id}`")))?;
    Ok(Some(mandate))
}
