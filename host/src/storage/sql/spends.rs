//! Spends and approvals in SQL: the spend rows and their outcome, the
//! commit of the policies' verdict on a proposal, and the operator's answer
//! to one waiting for approval.

use serde_json::json;

use super::audit::append_audit;
use super::cards::issue_card;
use super::ledger::{balance, place_hold};
use super::mandates::check_mandate;
use super::{Conn, INSUFFICIENT_FUNDS, Row, amount, args, from_ms, ms, resolve_once};
use crate::decide::card_terms;
use crate::ledger::AccountKind;
use crate::mandates::clip_ttl;
use crate::policy::{CardTerms, Merchant};
use crate::storage::{
    Actor, CardIssuance, Conflict, Decided, NewSpend, Proposed, SpendRecord, SpendStatus, StorageError,
    Verdict,
};

/// The columns of a spend with its outcome: the first decision, overridden
/// by the operator's for a spend that waited for approval.
pub(super) const SPEND_SELECT: &str =
    "SELECT s.id, s.agent_id, s.units, s.currency, s.merchant_id, s.merchant_name, s.mcc,
        s.country, s.purpose, s.received_at_ms, s.status, s.reasons, c.id, a.decision, a.reason, s.mandate_id
     FROM spends s
     LEFT JOIN cards c ON c.spend_id = s.id
     LEFT JOIN approval_resolutions a ON a.spend_id = s.id";

pub(super) fn spend_record(r: &Row) -> Result<SpendRecord, StorageError> {
    let reasons: String = r.get(11)?;
    let mut reasons: Vec<String> =
        serde_json::from_str(&reasons).map_err(|e| StorageError::Invariant(format!("spend reasons: {e}")))?;
    let status: String = r.get(10)?;
    let mut status = SpendStatus::parse(&status)
        .ok_or_else(|| StorageError::Invariant(format!("unknown spend status `{status}`")))?;
    match r.get::<Option<String>>(13)?.as_deref() {
        None => {}
        Some("approved") => status = SpendStatus::Approved,
        Some(_) => {
            status = SpendStatus::Denied;
            reasons.push(r.get::<Option<String>>(14)?.unwrap_or_default());
        }
    }
    let currency: String = r.get(3)?;
    Ok(SpendRecord {
        id: r.get(0)?,
        agent_id: r.get(1)?,
        amount: amount(r.get(2)?, &currency)?,
        merchant: Merchant { id: r.get(4)?, name: r.get(5)?, mcc: r.get(6)?, country: r.get(7)? },
        purpose: r.get(8)?,
        received_at_ms: from_ms(r.get(9)?),
        status,
        reasons,
        card_id: r.get(12)?,
        mandate_id: r.get(15)?,
    })
}

pub(super) fn spend_by_id(conn: &dyn Conn, id: &str) -> Result<Option<SpendRecord>, StorageError> {
    conn.row(&format!("{SPEND_SELECT} WHERE s.id = ?1"), args![id])?.as_ref().map(spend_record).transpose()
}

pub(super) fn insert_spend(
    conn: &dyn Conn,
    spend: &NewSpend,
    status: SpendStatus,
    reasons: &[String],
    pending_terms: Option<(u32, i64)>,
    now_ms: i64,
) -> Result<(), StorageError> {
    let reasons = serde_json::to_string(reasons).map_err(|e| StorageError::Invariant(e.to_string()))?;
    let fingerprint = spend.fingerprint();
    conn.execute(
        "INSERT INTO spends (id, agent_id, idempotency_key, fingerprint, units, currency, merchant_id, merchant_name,
                             mcc, country, purpose, received_at_ms, status, reasons, card_ttl_seconds,
                             card_cap_units, created_at_ms, mandate_id)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)",
        args![
            &spend.id,
            &spend.agent_id,
            &spend.idempotency_key,
            &fingerprint,
            spend.amount.units(),
            spend.amount.currency(),
            &spend.merchant.id,
            &spend.merchant.name,
            &spend.merchant.mcc,
            &spend.merchant.country,
            &spend.purpose,
            ms(spend.received_at_ms)?,
            status.as_str(),
            &reasons,
            pending_terms.map(|(ttl, _)| ttl),
            pending_terms.map(|(_, cap)| cap),
            now_ms,
            &spend.mandate_id,
        ],
    )?;
    Ok(())
}

/// The outcome of the part of a proposal that runs after the policies.
pub(super) fn commit_verdict(
    conn: &dyn Conn,
    spend: &NewSpend,
    decided: Decided,
    cards: &CardIssuance,
    actor: &Actor,
    now_ms: u64,
) -> Result<Proposed, StorageError> {
    let now = ms(now_ms)?;
    // The mandate, checked here, under the write lock: what it has left is
    // what the spends committed before this one left. A card under it lives
    // no longer than it does.
    let mandate = check_mandate(
        conn,
        spend.mandate_id.as_deref(),
        &spend.agent_id,
        &spend.amount,
        &spend.merchant,
        now_ms,
    )?;
    let (mandate_ttl, verdict) = crate::mandates::bound(&decided.verdict, mandate);
    let ttl_of = |terms: &CardTerms| {
        let (cap, ttl) = card_terms(&spend.amount, terms, cards.default_ttl_seconds);
        (cap, clip_ttl(ttl, mandate_ttl))
    };
    let (status, reasons, approved, pending) = match &verdict {
        Verdict::Deny(reasons) => (SpendStatus::Denied, reasons.clone(), None, None),
        Verdict::RequireApproval { reasons, terms } => {
            let (cap, ttl) = ttl_of(terms);
            (SpendStatus::PendingApproval, reasons.clone(), None, Some((ttl, cap.units())))
        }
        Verdict::Approve(terms) => {
            let (cap, ttl) = ttl_of(terms);
            if balance(conn, cap.currency(), AccountKind::Available)? < cap.units() {
                (SpendStatus::Denied, vec![INSUFFICIENT_FUNDS.to_owned()], None, None)
            } else {
                (SpendStatus::Approved, Vec::new(), Some((cap, ttl)), None)
            }
        }
    };
    insert_spend(conn, spend, status, &reasons, pending, now)?;
    let mut issued = None;
    if let Some((cap, ttl_seconds)) = approved {
        let expires = now + i64::from(ttl_seconds) * 1000;
        let received = ms(spend.received_at_ms)?;
        let hold_id =
            place_hold(conn, &spend.id, &spend.agent_id, &cap, &spend.merchant, received, expires, now)?;
        issued = Some(issue_card(
            conn,
            &spend.id,
            &spend.agent_id,
            &spend.merchant.id,
            cards,
            hold_id,
            &cap,
            ttl_seconds,
            now_ms,
        )?);
    }
    let record = spend_by_id(conn, &spend.id)?
        .ok_or_else(|| StorageError::Invariant("the spend just written is missing".into()))?;
    append_audit(
        conn,
        "spend",
        &json!({
            "spend_id": record.id,
            "agent_id": record.agent_id,
            "request": {
                "amount": spend.amount.to_decimal().to_string(),
                "currency": spend.amount.currency(),
                "merchant": spend.merchant,
                "purpose": spend.purpose,
                "received_at_ms": spend.received_at_ms,
            },
            "policies": decided.evaluations,
            "decision": record.status.as_str(),
            "reasons": record.reasons,
            "card_id": record.card_id,
        }),
        actor,
        now,
    )?;
    Ok(Proposed { spend: record, card: issued, replayed: false })
}

/// Whether the agent was revoked (a primary-key lookup).
pub(crate) fn agent_revoked(conn: &dyn Conn, agent_id: &str) -> Result<bool, StorageError> {
    Ok(conn.row("SELECT 1 FROM agent_revocations WHERE agent_id = ?1", args![agent_id])?.is_some())
}

/// Refuse whatever a revoked agent asked for.
pub(super) fn refuse_revoked(conn: &dyn Conn, agent_id: &str) -> Result<(), StorageError> {
    if agent_revoked(conn, agent_id)? {
        return Err(StorageError::Revoked(format!("agent `{agent_id}` was revoked")));
    }
    Ok(())
}

/// A spend waiting for approval, write-locked: refuses anything else.
pub(super) fn pending_spend(
    conn: &dyn Conn,
    spend_id: &str,
    approval_ttl_ms: u64,
    now_ms: u64,
) -> Result<SpendRecord, StorageError> {
    let spend =
        spend_by_id(conn, spend_id)?.ok_or_else(|| StorageError::NotFound(format!("spend `{spend_id}`")))?;
    if spend.status != SpendStatus::PendingApproval {
        return Err(StorageError::Conflict(
            Conflict::NotPendingApproval,
            format!("spend `{spend_id}` is {}, not waiting for approval", spend.status.as_str()),
        ));
    }
    if spend.received_at_ms.saturating_add(approval_ttl_ms) <= now_ms {
        return Err(StorageError::Conflict(
            Conflict::ApprovalExpired,
            format!("the approval of spend `{spend_id}` has expired"),
        ));
    }
    Ok(spend)
}

pub(super) fn resolve_approval(
    conn: &dyn Conn,
    spend_id: &str,
    decision: &str,
    reason: &str,
    actor: &Actor,
    now: i64,
) -> Result<(), StorageError> {
    resolve_once(
        conn,
        "INSERT INTO approval_resolutions (spend_id, decision, reason, resolved_at_ms) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT DO NOTHING",
        args![spend_id, decision, reason, now],
        Conflict::AlreadyResolved,
        || format!("spend `{spend_id}` is already resolved"),
    )?;
    append_audit(
        conn,
        "approval",
        &json!({ "spend_id": spend_id, "decision": decision, "reason": reason }),
        actor,
        now,
    )
}

pub(crate) const IDEMPOTENT_SPEND_SQL: &str =
    "SELECT id, fingerprint FROM spends WHERE agent_id = ?1 AND idempotency_key = ?2";

/// The answer already given to a proposal with this idempotency key, if any.
pub(super) fn replay(conn: &dyn Conn, spend: &NewSpend) -> Result<Option<Proposed>, StorageError> {
    let Some(key) = &spend.idempotency_key else {
        return Ok(None);
    };
    let Some(earlier) = conn.row(IDEMPOTENT_SPEND_SQL, args![&spend.agent_id, key])? else {
        return Ok(None);
    };
    if earlier.get::<String>(1)? != spend.fingerprint() {
        return Err(StorageError::IdempotencyConflict(key.clone()));
    }
    let spend = spend_by_id(conn, &earlier.get::<String>(0)?)?
        .ok_or_else(|| StorageError::Invariant("replayed spend vanished".into()))?;
    Ok(Some(Proposed { spend, card: None, replayed: true }))
}

/// The operator's approval of a pending spend, once its policies have run
/// again: a deny still wins; otherwise the hold is placed (the card is made
/// when the agent collects it).
pub(super) fn commit_approval(
    tx: &dyn Conn,
    spend: &SpendRecord,
    decided: Decided,
    default_ttl_seconds: u32,
    actor: &Actor,
    now_ms: u64,
) -> Result<SpendRecord, StorageError> {
    let now = ms(now_ms)?;
    let spend_id = spend.id.as_str();
    // The operator answers the escalation, not the other policies: a deny
    // (a limit used up since, say) still wins.
    let terms = match decided.verdict {
        Verdict::Deny(reasons) => {
            return Err(StorageError::Conflict(
                Conflict::PoliciesDeny,
                format!("the policies now deny spend `{spend_id}`: {}", reasons.join("; ")),
            ));
        }
        Verdict::Approve(terms) | Verdict::RequireApproval { terms, .. } => terms,
    };
    let row = tx.one("SELECT card_ttl_seconds, card_cap_units FROM spends WHERE id = ?1", args![spend_id])?;
    let (ttl, cap_units): (Option<u32>, Option<i64>) = (row.get(0)?, row.get(1)?);
    let recorded = CardTerms {
        ttl_seconds: ttl,
        max_amount: cap_units.map(|u| amount(u, spend.amount.currency())).transpose()?,
    };
    let (cap, ttl) = card_terms(&spend.amount, &recorded.narrowest(terms), default_ttl_seconds);
    // The mandate is checked again, as of now: it may have been spent,
    // revoked or run out while the spend waited.
    let mandate = check_mandate(
        tx,
        spend.mandate_id.as_deref(),
        &spend.agent_id,
        &spend.amount,
        &spend.merchant,
        now_ms,
    )?;
    let ttl = match mandate {
        Ok(left) => clip_ttl(ttl, left),
        Err(reason) => {
            return Err(StorageError::Conflict(
                Conflict::MandateRefused,
                format!("spend `{spend_id}` no longer fits its {reason}"),
            ));
        }
    };
    if balance(tx, cap.currency(), AccountKind::Available)? < cap.units() {
        return Err(StorageError::Conflict(
            Conflict::InsufficientFunds,
            format!("{INSUFFICIENT_FUNDS}: spend `{spend_id}` needs {cap}"),
        ));
    }
    resolve_approval(tx, spend_id, "approved", "approved by the operator", actor, now)?;
    let received = ms(spend.received_at_ms)?;
    let expires = now + i64::from(ttl) * 1000;
    place_hold(tx, spend_id, &spend.agent_id, &cap, &spend.merchant, received, expires, now)?;
    append_audit(
        tx,
        "approval_policies",
        &json!({ "spend_id": spend_id, "policies": decided.evaluations }),
        actor,
        now,
    )?;
    spend_by_id(tx, spend_id)?.ok_or_else(|| StorageError::Invariant("approved spend vanished".into()))
}
