//! `POST /v1/spends/preview`: what the agent's policies would decide on a
//! spend now, on the current history, with nothing held, no card made and
//! no spend recorded. The preview itself is in the audit trail
//! (`spend_preview`). It takes the agent's turn and counts against its rate
//! like a proposal, so previews cannot be used to run policies for free.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::HeaderMap;
use serde_json::{Value, json};

use super::spends::{Opening, evaluate_all, live_agent, load_policies, open, policy_agent};
use super::{ApiError, AppState, Caller, blocking};
use crate::datadir::now_ms;
use crate::policy::{self, CardTerms};
use crate::storage::{Verdict, new_ordered_id};

fn terms(terms: &CardTerms) -> Value {
    json!({
        "ttl_seconds": terms.ttl_seconds,
        "max_amount": terms.max_amount.as_ref().map(|a| a.to_decimal().to_string()),
    })
}

pub async fn preview(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    // The body of a proposal; an `Idempotency-Key` means nothing here.
    let Opening { agent_id, proposal, received_at_ms, turn } =
        open(&state, &caller, body, &HeaderMap::new()).await?;
    let s = Arc::clone(&state);
    let actor = caller.actor();
    let answer = blocking(move || {
        let _turn = turn;
        let agent = live_agent(&s, &agent_id)?;
        let request = policy::SpendRequest {
            id: new_ordered_id("pv", received_at_ms),
            agent: policy_agent(&agent),
            amount: proposal.amount.clone(),
            merchant: proposal.merchant.clone(),
            purpose: proposal.purpose.clone(),
            received_at_ms,
            // The mandate's own check and view come with mandates.
            mandate: None,
        };
        let policies = load_policies(&s, &agent);
        let decided = s.backend.preview(&mut |history| evaluate_all(&s, &policies, &request, history))?;
        let (decision, reasons, card_terms) = match &decided.verdict {
            Verdict::Approve(t) => ("allow", Vec::new(), terms(t)),
            Verdict::Deny(reasons) => ("deny", reasons.clone(), Value::Null),
            Verdict::RequireApproval { reasons, terms: t } => ("require_approval", reasons.clone(), terms(t)),
        };
        let answer = json!({ "decision": decision, "reasons": reasons, "card_terms": card_terms });
        let record = json!({
            "preview_id": request.id,
            "agent_id": agent.id,
            "request": {
                "amount": proposal.amount.to_decimal().to_string(),
                "currency": proposal.amount.currency(),
                "merchant": proposal.merchant,
                "purpose": proposal.purpose,
            },
            "policies": decided.evaluations,
            "decision": decision,
            "reasons": reasons,
            "card_terms": card_terms,
        });
        s.backend.audit("spend_preview", &record, &actor, now_ms())?;
        Ok(answer)
    })
    .await?;
    state.metrics.proposal("previewed");
    Ok(Json(answer))
}
