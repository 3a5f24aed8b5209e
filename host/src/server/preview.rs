//! `POST /v1/spends/preview`: what the agent's policies would decide on a
//! spend now, on the current history, with nothing held, no card made and
//! no spend recorded. The preview itself is in the audit trail
//! (`spend_preview`). It takes the agent's turn and counts against its rate
//! like a proposal, so previews cannot be used to run policies for free.
//! With a `mandate_id` the mandate is checked as a proposal's is (the same
//! rule, [`crate::mandates::bound`]), and the card terms shown are the ones
//! the card would get. The wallet's balance is not consulted.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::HeaderMap;
use serde_json::{Value, json};

use super::spends::{Opening, evaluate_all, live_agent, load_policies, open, own_mandate, policy_agent};
use super::{ApiError, AppState, Caller, blocking};
use crate::datadir::now_ms;
use crate::decide::card_terms;
use crate::mandates::{MandateRecord, bound, clip_ttl};
use crate::money::Amount;
use crate::policy::{self, CardTerms};
use crate::storage::{Verdict, new_ordered_id};

/// The card a spend would get under these terms: the narrowest cap and the
/// shortest life, cut to what its mandate has left.
fn card(amount: &Amount, terms: &CardTerms, default_ttl_seconds: u32, mandate_left: Option<u32>) -> Value {
    let (cap, ttl) = card_terms(amount, terms, default_ttl_seconds);
    json!({
        "ttl_seconds": clip_ttl(ttl, mandate_left),
        "max_amount": cap.to_decimal().to_string(),
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
        // As a proposal: a mandate that is not the agent's own is not
        // found, and nothing is recorded; the policies see the mandate as
        // it stands now, and the mandate's own check bounds their verdict.
        let mandate = own_mandate(&s, &agent_id, proposal.mandate_id.as_deref())?;
        let request = policy::SpendRequest {
            id: new_ordered_id("pv", received_at_ms),
            agent: policy_agent(&agent),
            amount: proposal.amount.clone(),
            merchant: proposal.merchant.clone(),
            purpose: proposal.purpose.clone(),
            received_at_ms,
            mandate: mandate.as_ref().and_then(MandateRecord::for_policy),
        };
        let policies = load_policies(&s, &agent);
        let decided = s.backend.preview(&mut |history| evaluate_all(&s, &policies, &request, history))?;
        let admitted = match &mandate {
            Some(m) => m.admits(&proposal.amount, &proposal.merchant, now_ms()).map(Some),
            None => Ok(None),
        };
        let (mandate_left, verdict) = bound(&decided.verdict, admitted);
        let default_ttl = s.config.card_ttl_seconds;
        let terms = |t: &CardTerms| card(&proposal.amount, t, default_ttl, mandate_left);
        let (decision, reasons, card_terms) = match &verdict {
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
        let mut record = record;
        if let Some(mandate_id) = &proposal.mandate_id {
            record["request"]["mandate_id"] = json!(mandate_id);
        }
        s.backend.audit("spend_preview", &record, &actor, now_ms())?;
        Ok(answer)
    })
    .await?;
    state.metrics.proposal("previewed");
    Ok(Json(answer))
}
