//! Mandates in SQL (see [`crate::mandates`]): the rows, the amounts computed
//! from the ledger, and the check a proposal under a mandate passes in the
//! transaction that commits it.
//!
//! The check runs inside the write transaction, where the wallet's one write
//! lock serializes every commit (SQLite's single writer; PostgreSQL's
//! advisory lock, across daemons): what the mandate has left when a spend
//! commits is exactly what the spends committed before it left, so
//! concurrent proposals never take a mandate past its budget or its count.

use serde_json::json;

use super::{Conn, Engine, SqlStore, append_audit, args, from_ms, ms, resolve_once};
use crate::mandates::{Answer, Creator, End, MandateRecord, Mandates, NewMandate};
use crate::money::Amount;
use crate::storage::{Actor, Conflict, StorageError};

const MANDATE_SELECT: &str =
    "SELECT m.id, m.agent_id, m.units, m.currency, m.purpose, m.merchant_ids, m.mccs,
        m.max_spends, m.expires_at_ms, m.created_by, m.created_at_ms, a.decision, a.answered_at_ms, e.kind,
        e.ended_at_ms
     FROM mandates m
     LEFT JOIN mandate_answers a ON a.mandate_id = m.id
     LEFT JOIN mandate_ends e ON e.mandate_id = m.id";

/// What a mandate's spends have captured, hold, and how many count: one
/// walk of `spends_mandate` and a primary-key lookup per spend.
pub(crate) const MANDATE_USE_SQL: &str = "SELECT
        CAST(COALESCE(SUM(CASE WHEN r.kind = 'captured' THEN r.captured_units ELSE 0 END), 0) AS BIGINT),
        CAST(COALESCE(SUM(CASE WHEN r.hold_id IS NULL THEN h.units ELSE 0 END), 0) AS BIGINT),
        COUNT(CASE WHEN r.hold_id IS NULL OR r.kind = 'captured' THEN 1 END)
     FROM spends s JOIN holds h ON h.spend_id = s.id LEFT JOIN hold_resolutions r ON r.hold_id = h.id
     WHERE s.mandate_id = ?1";

/// The open holds of a mandate's spends, with their cards if made.
const OPEN_HOLDS_OF_MANDATE_SQL: &str = "SELECT h.id, h.currency, h.units, c.id
     FROM spends s JOIN holds h ON h.spend_id = s.id
     LEFT JOIN hold_resolutions r ON r.hold_id = h.id LEFT JOIN cards c ON c.hold_id = h.id
     WHERE s.mandate_id = ?1 AND r.hold_id IS NULL";

/// A mandate's spends still waiting for the operator.
const PENDING_OF_MANDATE_SQL: &str = "SELECT s.id FROM spends s
     LEFT JOIN approval_resolutions a ON a.spend_id = s.id
     WHERE s.mandate_id = ?1 AND s.status = 'pending_approval' AND a.spend_id IS NULL";

fn strings(field: &str, text: &str) -> Result<Vec<String>, StorageError> {
    serde_json::from_str(text).map_err(|e| StorageError::Invariant(format!("stored mandate {field}: {e}")))
}

fn mandate_row(conn: &dyn Conn, r: &super::Row) -> Result<MandateRecord, StorageError> {
    let id: String = r.get(0)?;
    let currency: String = r.get(3)?;
    let created_by: String = r.get(9)?;
    let answer = match r.get::<Option<String>>(11)? {
        Some(d) => Some((
            Answer::parse(&d).ok_or_else(|| StorageError::Invariant(format!("mandate answer `{d}`")))?,
            from_ms(r.get(12)?),
        )),
        None => None,
    };
    let end = match r.get::<Option<String>>(13)? {
        Some(k) => Some((
            End::parse(&k).ok_or_else(|| StorageError::Invariant(format!("mandate end `{k}`")))?,
            from_ms(r.get(14)?),
        )),
        None => None,
    };
    let used = conn.one(MANDATE_USE_SQL, args![&id])?;
    let (spent_units, held_units, count): (i64, i64, i64) = (used.get(0)?, used.get(1)?, used.get(2)?);
    let merchant_ids: String = r.get(5)?;
    let mccs: String = r.get(6)?;
    Ok(MandateRecord {
        mandate: NewMandate {
            agent_id: r.get(1)?,
            amount: Amount::from_units(r.get(2)?, &currency)
                .map_err(|e| StorageError::Invariant(format!("stored mandate amount: {e}")))?,
            purpose: r.get(4)?,
            merchant_ids: strings("merchant ids", &merchant_ids)?,
            mccs: strings("categories", &mccs)?,
            max_spends: r.get(7)?,
            expires_at_ms: from_ms(r.get(8)?),
            created_by: Creator::parse(&created_by)
                .ok_or_else(|| StorageError::Invariant(format!("mandate creator `{created_by}`")))?,
            created_at_ms: from_ms(r.get(10)?),
            id,
        },
        answer,
        end,
        spent_units,
        held_units,
        spend_count: u32::try_from(count).unwrap_or(u32::MAX),
    })
}

pub(crate) fn mandate_by_id(conn: &dyn Conn, id: &str) -> Result<Option<MandateRecord>, StorageError> {
    match conn.row(&format!("{MANDATE_SELECT} WHERE m.id = ?1"), args![id])? {
        Some(r) => mandate_row(conn, &r).map(Some),
        None => Ok(None),
    }
}

/// The mandate check of a spend about to hold money, in the write
/// transaction that will commit it: `Ok(None)` without a mandate,
/// `Ok(Some(seconds))` when the mandate admits it (a card under it lives no
/// longer), `Err(reason)` when it does not.
pub(crate) fn check_mandate(
    conn: &dyn Conn,
    mandate_id: Option<&str>,
    agent_id: &str,
    amount: &Amount,
    merchant: &crate::policy::Merchant,
    now_ms: u64,
) -> Result<Result<Option<u32>, String>, StorageError> {
    let Some(id) = mandate_id else { return Ok(Ok(None)) };
    let mandate = mandate_by_id(conn, id)?
        .filter(|m| m.mandate.agent_id == agent_id)
        .ok_or_else(|| StorageError::NotFound(format!("mandate `{id}`")))?;
    Ok(mandate.admits(amount, merchant, now_ms).map(Some))
}

fn audit_mandate(
    conn: &dyn Conn,
    event: &str,
    m: &MandateRecord,
    extra: serde_json::Value,
    actor: &Actor,
    now: i64,
) -> Result<(), StorageError> {
    let mut record = json!({
        "event": event,
        "mandate_id": m.id(),
        "agent_id": m.mandate.agent_id,
    });
    if let (Some(fields), serde_json::Value::Object(more)) = (record.as_object_mut(), extra) {
        fields.extend(more);
    }
    append_audit(conn, "mandate", &record, actor, now)
}

/// End a mandate (revoked, or expired) and take back what it holds: its
/// open holds released (cards voided), its spends waiting for approval
/// denied. Inside the caller's write transaction.
pub(crate) fn end_mandate(
    tx: &dyn Conn,
    m: &MandateRecord,
    end: End,
    reason: &str,
    actor: &Actor,
    now: i64,
) -> Result<(), StorageError> {
    let id = m.id();
    resolve_once(
        tx,
        "INSERT INTO mandate_ends (mandate_id, kind, ended_at_ms) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
        args![id, end.as_str(), now],
        Conflict::MandateEnded,
        || format!("mandate `{id}` has already ended"),
    )?;
    let mut cards_voided = Vec::new();
    let mut holds_released = 0_usize;
    for hold in tx.rows(OPEN_HOLDS_OF_MANDATE_SQL, args![id])? {
        let currency: String = hold.get(1)?;
        super::resolve_hold(tx, hold.get(0)?, "voided", &currency, hold.get(2)?, 0, now)?;
        holds_released += 1;
        if let Some(card_id) = hold.get::<Option<String>>(3)? {
            cards_voided.push(card_id);
        }
    }
    let pending = tx.rows(PENDING_OF_MANDATE_SQL, args![id])?;
    let denied = format!("mandate `{id}` {}", end.as_str());
    for spend in &pending {
        super::resolve_approval(tx, &spend.get::<String>(0)?, "denied", &denied, actor, now)?;
    }
    audit_mandate(
        tx,
        end.as_str(),
        m,
        json!({
            "reason": reason,
            "cards_voided": cards_voided,
            "holds_released": holds_released,
            "approvals_denied": pending.len(),
        }),
        actor,
        now,
    )
}

/// Revoke every mandate of an agent still in force or waiting, inside the
/// agent's revocation (its cards and holds are taken back there).
pub(crate) fn revoke_mandates_of_agent(
    tx: &dyn Conn,
    agent_id: &str,
    actor: &Actor,
    now_ms: u64,
) -> Result<usize, StorageError> {
    let now = ms(now_ms)?;
    let rows = tx.rows(
        &format!("{MANDATE_SELECT} WHERE m.agent_id = ?1 AND e.mandate_id IS NULL ORDER BY m.created_at_ms"),
        args![agent_id],
    )?;
    let mut revoked = 0;
    for row in &rows {
        let m = mandate_row(tx, row)?;
        let answered_no = matches!(m.answer, Some((Answer::Denied | Answer::Expired, _)));
        if answered_no || now_ms >= m.mandate.expires_at_ms {
            continue;
        }
        end_mandate(tx, &m, End::Revoked, "the agent was revoked", actor, now)?;
        revoked += 1;
    }
    Ok(revoked)
}

impl<E: Engine> Mandates for SqlStore<E> {
    fn create_mandate(
        &self,
        mandate: &NewMandate,
        actor: &Actor,
        now_ms: u64,
    ) -> Result<MandateRecord, StorageError> {
        let now = ms(now_ms)?;
        self.write(|tx| {
            let agent_id = &mandate.agent_id;
            if tx.row("SELECT 1 FROM agents WHERE id = ?1", args![agent_id])?.is_none() {
                return Err(StorageError::NotFound(format!("agent `{agent_id}`")));
            }
            if super::agent_revoked(tx, agent_id)? {
                return Err(StorageError::Conflict(
                    Conflict::AgentRevoked,
                    format!("agent `{agent_id}` is revoked"),
                ));
            }
            let list =
                |l: &[String]| serde_json::to_string(l).map_err(|e| StorageError::Invariant(e.to_string()));
            tx.execute(
                "INSERT INTO mandates (id, agent_id, units, currency, purpose, merchant_ids, mccs, max_spends,
                                       expires_at_ms, created_by, created_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                args![
                    &mandate.id,
                    agent_id,
                    mandate.amount.units(),
                    mandate.amount.currency(),
                    &mandate.purpose,
                    &list(&mandate.merchant_ids)?,
                    &list(&mandate.mccs)?,
                    mandate.max_spends,
                    ms(mandate.expires_at_ms)?,
                    mandate.created_by.as_str(),
                    ms(mandate.created_at_ms)?,
                ],
            )?;
            let m = mandate_by_id(tx, &mandate.id)?
                .ok_or_else(|| StorageError::Invariant("the mandate just written is missing".into()))?;
            let event = match mandate.created_by {
                Creator::Operator => "created",
                Creator::Agent => "requested",
            };
            audit_mandate(
                tx,
                event,
                &m,
                json!({
                    "amount": mandate.amount.to_decimal().to_string(),
                    "currency": mandate.amount.currency(),
                    "purpose": mandate.purpose,
                    "merchant_ids": mandate.merchant_ids,
                    "mccs": mandate.mccs,
                    "max_spends": mandate.max_spends,
                    "expires_at_ms": mandate.expires_at_ms,
                }),
                actor,
                now,
            )?;
            Ok(m)
        })
    }

    fn mandate(&self, id: &str) -> Result<Option<MandateRecord>, StorageError> {
        self.read(|conn| mandate_by_id(conn, id))
    }

    fn mandates(&self, agent_id: Option<&str>) -> Result<Vec<MandateRecord>, StorageError> {
        self.read(|conn| {
            let rows = match agent_id {
                Some(agent_id) => conn.rows(
                    &format!("{MANDATE_SELECT} WHERE m.agent_id = ?1 ORDER BY m.created_at_ms DESC, m.id"),
                    args![agent_id],
                )?,
                None => conn.rows(&format!("{MANDATE_SELECT} ORDER BY m.created_at_ms DESC, m.id"), &[])?,
            };
            rows.iter().map(|r| mandate_row(conn, r)).collect()
        })
    }

    fn answer_mandate(
        &self,
        id: &str,
        approve: bool,
        approval_ttl_ms: u64,
        actor: &Actor,
        now_ms: u64,
    ) -> Result<MandateRecord, StorageError> {
        let now = ms(now_ms)?;
        self.write(|tx| {
            let m =
                mandate_by_id(tx, id)?.ok_or_else(|| StorageError::NotFound(format!("mandate `{id}`")))?;
            let status = m.status(now_ms, approval_ttl_ms);
            if status != crate::mandates::MandateStatus::PendingApproval {
                return Err(StorageError::Conflict(
                    Conflict::NotPendingApproval,
                    format!("mandate `{id}` is {}, not waiting for approval", status.as_str()),
                ));
            }
            if super::agent_revoked(tx, &m.mandate.agent_id)? {
                return Err(StorageError::Conflict(
                    Conflict::AgentRevoked,
                    format!("the agent of mandate `{id}` was revoked"),
                ));
            }
            let answer = if approve { Answer::Approved } else { Answer::Denied };
            resolve_once(
                tx,
                "INSERT INTO mandate_answers (mandate_id, decision, answered_at_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT DO NOTHING",
                args![id, answer.as_str(), now],
                Conflict::MandateAnswered,
                || format!("mandate `{id}` is already answered"),
            )?;
            audit_mandate(tx, answer.as_str(), &m, json!({}), actor, now)?;
            Ok(MandateRecord { answer: Some((answer, now_ms)), ..m })
        })
    }

    fn revoke_mandate(&self, id: &str, actor: &Actor, now_ms: u64) -> Result<MandateRecord, StorageError> {
        let now = ms(now_ms)?;
        self.write(|tx| {
            let m =
                mandate_by_id(tx, id)?.ok_or_else(|| StorageError::NotFound(format!("mandate `{id}`")))?;
            // Giving authority up is always allowed while there is any to
            // give up: in force, exhausted, or waiting for the operator.
            let status = m.status(now_ms, u64::MAX);
            use crate::mandates::MandateStatus as S;
            if !matches!(status, S::Active | S::Exhausted | S::PendingApproval) {
                return Err(StorageError::Conflict(
                    Conflict::MandateEnded,
                    format!("mandate `{id}` is already {}", status.as_str()),
                ));
            }
            let by = match actor {
                Actor::Token { role: crate::storage::Role::Agent(_), .. } => "revoked by its agent",
                _ => "revoked by the operator",
            };
            end_mandate(tx, &m, End::Revoked, by, actor, now)?;
            mandate_by_id(tx, id)?.ok_or_else(|| StorageError::Invariant("revoked mandate vanished".into()))
        })
    }

    fn expire_mandates(&self, approval_ttl_ms: u64, now_ms: u64) -> Result<usize, StorageError> {
        let now = ms(now_ms)?;
        let cutoff = ms(now_ms.saturating_sub(approval_ttl_ms))?;
        // Looked for on a snapshot first: the write lock is taken only when
        // something is due, not on every sweep.
        let (unanswered, ended) = self.read(|conn| due_mandates(conn, cutoff, now))?;
        if unanswered.is_empty() && ended.is_empty() {
            return Ok(0);
        }
        self.write(|tx| {
            let (unanswered, ended) = due_mandates(tx, cutoff, now)?;
            for row in &unanswered {
                let m = mandate_row(tx, row)?;
                tx.execute(
                    "INSERT INTO mandate_answers (mandate_id, decision, answered_at_ms) VALUES (?1, 'expired', ?2)",
                    args![m.id(), now],
                )?;
                audit_mandate(tx, "expired", &m, json!({ "reason": "not answered in time" }), &Actor::System, now)?;
            }
            // Their cards never outlive them, so nothing of theirs is still
            // open; a hold left (an approved spend's card never collected)
            // is released here.
            for row in &ended {
                let m = mandate_row(tx, row)?;
                end_mandate(tx, &m, End::Expired, "its time ran out", &Actor::System, now)?;
            }
            Ok(unanswered.len() + ended.len())
        })
    }
}

/// Requests nobody answered by `cutoff` (or before their end), and
/// mandates in force whose end came by `now`.
fn due_mandates(
    conn: &dyn Conn,
    cutoff: i64,
    now: i64,
) -> Result<(Vec<super::Row>, Vec<super::Row>), StorageError> {
    let unanswered = conn.rows(
        &format!(
            "{MANDATE_SELECT} WHERE m.created_by = 'agent' AND a.mandate_id IS NULL AND e.mandate_id IS NULL
             AND (m.created_at_ms <= ?1 OR m.expires_at_ms <= ?2)"
        ),
        args![cutoff, now],
    )?;
    let ended = conn.rows(
        &format!(
            "{MANDATE_SELECT} WHERE m.expires_at_ms <= ?1 AND e.mandate_id IS NULL
             AND (m.created_by = 'operator' OR a.decision = 'approved')"
        ),
        args![now],
    )?;
    Ok((unanswered, ended))
}
