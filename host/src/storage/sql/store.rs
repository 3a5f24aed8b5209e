//! [`Storage`] for every SQL engine, from the parts in the sibling modules.

use std::sync::Arc;

use serde_json::json;

use super::audit::{append_audit, append_event, read_audit};
use super::cards::{CARD_COLUMNS, authorize, card_row, find_card, issue_card};
use super::invariants::check_invariants;
use super::ledger::{balance, ensure_accounts, resolve_hold, transfer};
use super::optimistic::Lender;
use super::spends::{
    SPEND_SELECT, agent_revoked, commit_approval, commit_verdict, pending_spend, refuse_revoked, replay,
    resolve_approval, spend_by_id, spend_record,
};
use super::{EXPIRY_DUE_SQL, Engine, SWEEP_OVERLAP, SqlStore, amount, args, ms};
use crate::audit::AuditEvent;
use crate::audit::{AuditHead, Checkpoint};
use crate::cards::{AuthorizationRequest, CardKey, CardState, IssuedCard};
use crate::history::History;
use crate::ledger::{AccountKind, Balance, TransferKind};
use crate::money::{self, Amount};
use crate::storage::{
    Actor, AuditBreak, AuditRecord, AuthorizationOutcome, CardIssuance, CardRecord, Conflict, Decided,
    DepositRecord, NewSpend, Proposed, SpendRecord, Storage, StorageError, new_id, verify_chain,
};

impl<E: Engine> Storage for SqlStore<E> {
    fn deposit(
        &self,
        amount: &Amount,
        idempotency_key: Option<&str>,
        actor: &Actor,
        now_ms: u64,
    ) -> Result<DepositRecord, StorageError> {
        self.write(|tx| {
            if let Some(key) = idempotency_key {
                let earlier = tx.row(
                    "SELECT d.id, t.units, t.currency FROM deposits d JOIN transfers t ON t.id = d.transfer_id
                     WHERE d.idempotency_key = ?1",
                    args![key],
                )?;
                if let Some(earlier) = earlier {
                    let (units, currency): (i64, String) = (earlier.get(1)?, earlier.get(2)?);
                    if units != amount.units() || currency != amount.currency() {
                        return Err(StorageError::IdempotencyConflict(key.to_owned()));
                    }
                    return Ok(DepositRecord { id: earlier.get(0)?, amount: amount.clone(), replayed: true });
                }
            }
            let now = ms(now_ms)?;
            ensure_accounts(tx, amount.currency())?;
            let transfer_id = transfer(tx, TransferKind::Deposit, amount.currency(), amount.units(), None, now)?;
            let id = new_id("dep");
            tx.execute(
                "INSERT INTO deposits (id, transfer_id, idempotency_key, created_at_ms) VALUES (?1, ?2, ?3, ?4)",
                args![&id, transfer_id, idempotency_key, now],
            )?;
            append_audit(
                tx,
                "deposit",
                &json!({
                    "deposit_id": id,
                    "amount": amount.to_decimal().to_string(),
                    "currency": amount.currency(),
                }),
                actor,
                now,
            )?;
            Ok(DepositRecord { id, amount: amount.clone(), replayed: false })
        })
    }

    fn balances(&self) -> Result<Vec<Balance>, StorageError> {
        self.read(|conn| {
            let currencies = conn.rows("SELECT DISTINCT currency FROM accounts ORDER BY currency", &[])?;
            currencies
                .iter()
                .map(|row| {
                    let currency: String = row.get(0)?;
                    Ok(Balance {
                        exponent: money::exponent(&currency).ok_or_else(|| {
                            StorageError::Invariant(format!("unknown currency `{currency}`"))
                        })?,
                        available: balance(conn, &currency, AccountKind::Available)?,
                        held: balance(conn, &currency, AccountKind::Held)?,
                        spent: balance(conn, &currency, AccountKind::Spent)?,
                        currency,
                    })
                })
                .collect()
        })
    }

    fn propose(
        &self,
        spend: &NewSpend,
        cards: &CardIssuance,
        actor: &Actor,
        now_ms: u64,
        decide: &mut dyn FnMut(Arc<dyn History>) -> Decided,
    ) -> Result<Proposed, StorageError> {
        // The idempotency key first, in every transaction: a retry never
        // runs the policies again, and never commits twice.
        // One copy of the spend, shared by `check` and `commit` (which are
        // cloned into each attempt's write job).
        let (spend, cards, actor) = (Arc::new(spend.clone()), cards.clone(), actor.clone());
        let again = Arc::clone(&spend);
        self.decide_and_commit(
            // The agent first: a proposal of a revoked agent commits nothing,
            // however long ago its request arrived (re-checked in the write
            // transaction that would commit it).
            move |conn| {
                refuse_revoked(conn, &spend.agent_id)?;
                Ok(replay(conn, &spend)?.map_or(Ok(()), Err))
            },
            &mut |(), history| decide(history),
            move |tx, (), decided| commit_verdict(tx, &again, decided, &cards, &actor, now_ms),
        )
    }

    fn preview(&self, decide: &mut dyn FnMut(Arc<dyn History>) -> Decided) -> Result<Decided, StorageError> {
        let mut lender = Lender::new(self.engine.begin_read()?);
        let decided = lender.lend(decide).map(|(decided, _)| decided);
        if let Some(conn) = lender.into_inner() {
            self.engine.end_read(conn);
        }
        decided
    }

    fn approve(
        &self,
        spend_id: &str,
        default_ttl_seconds: u32,
        approval_ttl_ms: u64,
        actor: &Actor,
        now_ms: u64,
        decide: &mut dyn FnMut(&SpendRecord, Arc<dyn History>) -> Decided,
    ) -> Result<SpendRecord, StorageError> {
        // As a proposal: the policies run again, and their decision commits
        // only if the spend still waits and what they read still holds.
        let (spend_id, actor) = (spend_id.to_owned(), actor.clone());
        self.decide_and_commit(
            move |conn| {
                let spend = pending_spend(conn, &spend_id, approval_ttl_ms, now_ms)?;
                if agent_revoked(conn, &spend.agent_id)? {
                    return Err(StorageError::Conflict(
                        Conflict::AgentRevoked,
                        format!("the agent of spend `{spend_id}` was revoked"),
                    ));
                }
                Ok(Ok(spend))
            },
            decide,
            move |tx, spend, decided| {
                commit_approval(tx, spend, decided, default_ttl_seconds, &actor, now_ms)
            },
        )
    }

    fn deny(
        &self,
        spend_id: &str,
        reason: &str,
        approval_ttl_ms: u64,
        actor: &Actor,
        now_ms: u64,
    ) -> Result<SpendRecord, StorageError> {
        self.write(|tx| {
            pending_spend(tx, spend_id, approval_ttl_ms, now_ms)?;
            resolve_approval(tx, spend_id, "denied", reason, actor, ms(now_ms)?)?;
            spend_by_id(tx, spend_id)?.ok_or_else(|| StorageError::Invariant("denied spend vanished".into()))
        })
    }

    fn expire_approvals(&self, approval_ttl_ms: u64, now_ms: u64) -> Result<usize, StorageError> {
        self.write(|tx| {
            let now = ms(now_ms)?;
            let cutoff = ms(now_ms.saturating_sub(approval_ttl_ms))?;
            let due = tx.rows(
                "SELECT s.id FROM spends s LEFT JOIN approval_resolutions a ON a.spend_id = s.id
                 WHERE s.status = 'pending_approval' AND s.received_at_ms <= ?1 AND a.spend_id IS NULL",
                args![cutoff],
            )?;
            for row in &due {
                resolve_approval(
                    tx,
                    &row.get::<String>(0)?,
                    "expired",
                    "approval expired",
                    &Actor::System,
                    now,
                )?;
            }
            Ok(due.len())
        })
    }

    fn pending_approvals(&self, approval_ttl_ms: u64, now_ms: u64) -> Result<Vec<SpendRecord>, StorageError> {
        self.read(|conn| {
            let cutoff = ms(now_ms.saturating_sub(approval_ttl_ms))?;
            conn.rows(
                &format!(
                    "{SPEND_SELECT} WHERE s.status = 'pending_approval' AND s.received_at_ms > ?1 AND a.spend_id IS NULL
                     ORDER BY s.received_at_ms, s.id"
                ),
                args![cutoff],
            )?
            .iter()
            .map(spend_record)
            .collect()
        })
    }

    fn claim_card(
        &self,
        spend_id: &str,
        cards: &CardIssuance,
        now_ms: u64,
    ) -> Result<Option<IssuedCard>, StorageError> {
        self.write(|tx| {
            let hold = tx.row(
                "SELECT h.id, h.agent_id, h.units, h.currency, h.expires_at_ms, c.id, r.kind, s.merchant_id
                 FROM holds h JOIN spends s ON s.id = h.spend_id LEFT JOIN cards c ON c.hold_id = h.id
                 LEFT JOIN hold_resolutions r ON r.hold_id = h.id WHERE h.spend_id = ?1",
                args![spend_id],
            )?;
            let Some(hold) = hold else { return Ok(None) };
            // Made already, or the hold is resolved: nothing to show.
            if hold.get::<Option<String>>(5)?.is_some() || hold.get::<Option<String>>(6)?.is_some() {
                return Ok(None);
            }
            let left_ms = hold.get::<i64>(4)? - ms(now_ms)?;
            if left_ms < 1000 {
                return Ok(None);
            }
            let (agent_id, merchant_id): (String, String) = (hold.get(1)?, hold.get(7)?);
            // Revoking releases the hold anyway; a revoked agent never gets a card.
            if agent_revoked(tx, &agent_id)? {
                return Ok(None);
            }
            let ttl = u32::try_from(left_ms / 1000).unwrap_or(u32::MAX).min(cards.default_ttl_seconds);
            let cap = amount(hold.get(2)?, &hold.get::<String>(3)?)?;
            let card =
                issue_card(tx, spend_id, &agent_id, &merchant_id, cards, hold.get(0)?, &cap, ttl, now_ms)?;
            Ok(Some(card))
        })
    }

    fn spends(&self, agent_id: Option<&str>, limit: usize) -> Result<Vec<SpendRecord>, StorageError> {
        self.read(|conn| {
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let rows = match agent_id {
                Some(agent_id) => conn.rows(
                    &format!(
                        "{SPEND_SELECT} WHERE s.agent_id = ?1 ORDER BY s.created_at_ms DESC, s.id LIMIT ?2"
                    ),
                    args![agent_id, limit],
                )?,
                None => conn.rows(
                    &format!("{SPEND_SELECT} ORDER BY s.created_at_ms DESC, s.id LIMIT ?1"),
                    args![limit],
                )?,
            };
            rows.iter().map(spend_record).collect()
        })
    }

    fn spends_since(
        &self,
        agent_id: &str,
        since_ms: u64,
        at_most: u64,
    ) -> Result<(u64, Option<u64>), StorageError> {
        let since = ms(since_ms)?;
        let at_most = i64::try_from(at_most).unwrap_or(i64::MAX);
        self.read(|conn| {
            // Walks the `spends_agent` index from `since` on, `at_most`
            // entries at most.
            let row = conn.one(
                "SELECT COUNT(*), MIN(created_at_ms) FROM (
                     SELECT created_at_ms FROM spends WHERE agent_id = ?1 AND created_at_ms >= ?2
                     ORDER BY created_at_ms LIMIT ?3
                 ) AS recent",
                args![agent_id, since, at_most],
            )?;
            Ok((row.get(0)?, row.get(1)?))
        })
    }

    fn authorize(
        &self,
        request: &AuthorizationRequest,
        key: &CardKey,
        actor: &Actor,
        now_ms: u64,
    ) -> Result<AuthorizationOutcome, StorageError> {
        self.write(|tx| authorize(tx, request, key, actor, now_ms))
    }

    fn void_card(&self, card_id: &str, actor: &Actor, now_ms: u64) -> Result<CardRecord, StorageError> {
        self.write(|tx| {
            let card = find_card(tx, "id", card_id)?
                .ok_or_else(|| StorageError::NotFound(format!("card `{card_id}`")))?;
            if card.record.state != CardState::Open {
                return Err(StorageError::Conflict(
                    Conflict::CardNotOpen,
                    format!("card `{card_id}` is already {}", card.record.state.as_str()),
                ));
            }
            let now = ms(now_ms)?;
            let cap = &card.record.cap;
            resolve_hold(tx, card.hold_id, "voided", cap.currency(), cap.units(), 0, now)?;
            append_event(tx, &AuditEvent::CardVoid { card_id: Some(card_id), reason: None }, actor, now)?;
            find_card(tx, "id", card_id)?
                .map(|c| c.record)
                .ok_or_else(|| StorageError::Invariant("voided card vanished".into()))
        })
    }

    fn expire_cards(&self, now_ms: u64) -> Result<usize, StorageError> {
        self.write(|tx| {
            let now = ms(now_ms)?;
            let swept_to: i64 = tx
                .one("SELECT CAST(COALESCE(MAX(swept_to_ms), 0) AS BIGINT) FROM expiry_sweeps", &[])?
                .get(0)?;
            let overlap = i64::try_from(SWEEP_OVERLAP.as_millis()).unwrap_or(i64::MAX);
            let due = tx.rows(EXPIRY_DUE_SQL, args![swept_to.saturating_sub(overlap), now])?;
            for row in &due {
                let currency: String = row.get(1)?;
                resolve_hold(tx, row.get(0)?, "expired", &currency, row.get(2)?, 0, now)?;
            }
            // Move the mark on when it is worth a row: after a release, or a
            // minute on. Between marks a sweep rescans at most that much.
            if now > swept_to && (!due.is_empty() || now - swept_to >= 60_000) {
                tx.execute("INSERT INTO expiry_sweeps (swept_to_ms) VALUES (?1)", args![now])?;
            }
            Ok(due.len())
        })
    }

    fn spend(&self, id: &str) -> Result<Option<SpendRecord>, StorageError> {
        self.read(|conn| spend_by_id(conn, id))
    }

    fn card(&self, id: &str) -> Result<Option<CardRecord>, StorageError> {
        self.read(|conn| Ok(find_card(conn, "id", id)?.map(|c| c.record)))
    }

    fn cards(&self, agent_id: Option<&str>) -> Result<Vec<CardRecord>, StorageError> {
        self.read(|conn| {
            let select = format!(
                "SELECT {CARD_COLUMNS} FROM cards c LEFT JOIN hold_resolutions r ON r.hold_id = c.hold_id"
            );
            let rows = match agent_id {
                Some(agent_id) => conn.rows(
                    &format!("{select} WHERE c.agent_id = ?1 ORDER BY c.created_at_ms DESC, c.id"),
                    args![agent_id],
                )?,
                None => conn.rows(&format!("{select} ORDER BY c.created_at_ms DESC, c.id"), &[])?,
            };
            rows.iter().map(|r| card_row(r).map(|c| c.record)).collect()
        })
    }

    fn audit(
        &self,
        kind: &str,
        record: &serde_json::Value,
        actor: &Actor,
        now_ms: u64,
    ) -> Result<(), StorageError> {
        self.write(|tx| append_audit(tx, kind, record, actor, ms(now_ms)?))
    }

    fn audit_records(&self, after: u64, limit: usize) -> Result<Vec<AuditRecord>, StorageError> {
        self.read(|conn| read_audit(conn, after, limit))
    }

    fn verify_audit(
        &self,
        checkpoint: Option<&Checkpoint>,
    ) -> Result<Result<AuditHead, AuditBreak>, StorageError> {
        let key = self.audit_key.get().map(Arc::as_ref);
        self.read(|conn| Ok(verify_chain(&read_audit(conn, 0, usize::MAX)?, key, checkpoint)))
    }

    fn check_invariants(&self) -> Result<(), String> {
        self.read(|conn| Ok(check_invariants(conn))).map_err(|e| e.to_string())?
    }
}
