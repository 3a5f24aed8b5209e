//! Cards in SQL: the card rows with their hold's state, issuing a card for
//! a hold (hashes only), and a merchant's charge against one.

use super::audit::append_event;
use super::ledger::resolve_hold;
use super::{Conn, Row, amount, args, from_ms, ms};
use crate::audit::AuditEvent;
use crate::cards::{
    AuthorizationRequest, CardKey, CardRequest, CardState, CardView, DeclineCode, IssuedCard, MAX_WRONG_CVV,
    charge_outcome,
};
use crate::money::Amount;
use crate::storage::{Actor, AuthorizationOutcome, CardIssuance, CardRecord, StorageError, new_ordered_id};

/// How many times a card is drawn again when its PAN is already taken. One
/// test BIN leaves 10^9 numbers, so a collision is rare but real.
pub(super) const PAN_ATTEMPTS: usize = 8;

pub(crate) const CARD_COLUMNS: &str =
    "c.id, c.spend_id, c.agent_id, c.issuer, c.last4, c.exp_month, c.exp_year, c.cap_units,
     c.currency, c.merchant_id, c.expires_at_ms, c.hold_id, c.cvv_hash, r.kind, r.captured_units";

/// A card row with its hold's resolution, as read by [`CARD_COLUMNS`].
pub(super) struct CardRow {
    pub(super) record: CardRecord,
    pub(super) hold_id: i64,
    pub(super) cvv_hash: String,
}

pub(super) fn card_row(row: &Row) -> Result<CardRow, StorageError> {
    let resolution: Option<String> = row.get(13)?;
    let state = match resolution.as_deref() {
        None => CardState::Open,
        Some("captured") => CardState::Used,
        Some("voided") => CardState::Voided,
        Some("expired") => CardState::Expired,
        Some(other) => {
            return Err(StorageError::Invariant(format!("unknown resolution `{other}`")));
        }
    };
    let captured_units: Option<i64> = row.get(14)?;
    let currency: String = row.get(8)?;
    Ok(CardRow {
        record: CardRecord {
            id: row.get(0)?,
            spend_id: row.get(1)?,
            agent_id: row.get(2)?,
            issuer: row.get(3)?,
            last4: row.get(4)?,
            exp_month: row.get(5)?,
            exp_year: row.get(6)?,
            cap: amount(row.get(7)?, &currency)?,
            merchant_id: row.get(9)?,
            expires_at_ms: from_ms(row.get(10)?),
            state,
            captured_units: (state == CardState::Used).then_some(captured_units).flatten(),
        },
        hold_id: row.get(11)?,
        cvv_hash: row.get(12)?,
    })
}

pub(super) fn find_card(conn: &dyn Conn, column: &str, value: &str) -> Result<Option<CardRow>, StorageError> {
    let sql = format!(
        "SELECT {CARD_COLUMNS} FROM cards c LEFT JOIN hold_resolutions r ON r.hold_id = c.hold_id WHERE c.{column} = ?1"
    );
    conn.row(&sql, args![value])?.as_ref().map(card_row).transpose()
}

/// Issue a card for a hold and store it (hashes only), drawing a new PAN
/// should the issuer hand out one already in use.
#[allow(clippy::too_many_arguments)]
pub(super) fn issue_card(
    conn: &dyn Conn,
    spend_id: &str,
    agent_id: &str,
    merchant_id: &str,
    cards: &CardIssuance,
    hold_id: i64,
    cap: &Amount,
    ttl_seconds: u32,
    now_ms: u64,
) -> Result<IssuedCard, StorageError> {
    let now = ms(now_ms)?;
    for _ in 0..PAN_ATTEMPTS {
        let card_id = new_ordered_id("card", now_ms);
        let request = CardRequest {
            card_id: card_id.clone(),
            cap: cap.clone(),
            merchant_id: merchant_id.to_owned(),
            ttl_seconds,
            now_ms,
        };
        let card = cards.issuer.issue(&request).map_err(|e| StorageError::Issuer(e.to_string()))?;
        let pan_hash = cards.key.hash_pan(&card.secrets.pan);
        if conn.row("SELECT 1 FROM cards WHERE pan_hash = ?1", args![&pan_hash])?.is_some() {
            continue;
        }
        let cvv_hash = cards.key.hash_cvv(&card_id, &card.secrets.cvv);
        conn.execute(
            "INSERT INTO cards (id, hold_id, spend_id, agent_id, issuer, pan_hash, cvv_hash, last4, exp_month, exp_year,
                                cap_units, currency, merchant_id, expires_at_ms, created_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
            args![
                &card_id,
                hold_id,
                spend_id,
                agent_id,
                cards.issuer.name(),
                &pan_hash,
                &cvv_hash,
                &card.last4,
                card.exp_month,
                card.exp_year,
                cap.units(),
                cap.currency(),
                merchant_id,
                ms(card.expires_at_ms)?,
                now
            ],
        )?;
        return Ok(card);
    }
    Err(StorageError::Issuer(format!("no unused card number after {PAN_ATTEMPTS} attempts")))
}

/// The answer already given to an authorization with this idempotency
/// key, if any; the same key with another charge is a conflict.
pub(super) fn replay_authorization(
    tx: &dyn Conn,
    key: &str,
    fingerprint: &str,
) -> Result<Option<AuthorizationOutcome>, StorageError> {
    let Some(earlier) = tx.row(IDEMPOTENT_AUTHORIZATION_SQL, args![key])? else {
        return Ok(None);
    };
    if earlier.get::<Option<String>>(0)?.as_deref() != Some(fingerprint) {
        return Err(StorageError::IdempotencyConflict(key.to_owned()));
    }
    let decline_code = earlier
        .get::<Option<String>>(3)?
        .map(|code| code.parse::<DeclineCode>())
        .transpose()
        .map_err(|e| StorageError::Invariant(format!("stored authorization: {e}")))?;
    Ok(Some(AuthorizationOutcome {
        approved: earlier.get(2)?,
        decline_code,
        card_id: earlier.get(1)?,
        replayed: true,
    }))
}

pub(crate) const IDEMPOTENT_AUTHORIZATION_SQL: &str =
    "SELECT fingerprint, card_id, approved, decline_code FROM authorizations WHERE idempotency_key = ?1";

/// How many authorizations of a card were declined `wrong_cvv`, and whether
/// its agent was revoked.
pub(crate) const CARD_STANDING_SQL: &str = "SELECT
        (SELECT CAST(COUNT(*) AS BIGINT) FROM authorizations WHERE card_id = ?1 AND decline_code = 'wrong_cvv'),
        EXISTS (SELECT 1 FROM agent_revocations WHERE agent_id = ?2)";

/// A merchant's charge, inside the caller's write transaction: see
/// [`Storage::authorize`]. With an idempotency key, a retry gets the first
/// answer and writes nothing. The lockout counts in the same transaction
/// as the wrong try that reaches it, so racing probes cannot overshoot it.
pub(super) fn authorize(
    tx: &dyn Conn,
    request: &AuthorizationRequest,
    key: &CardKey,
    actor: &Actor,
    now_ms: u64,
) -> Result<AuthorizationOutcome, StorageError> {
    let now = ms(now_ms)?;
    let fingerprint = request.idempotency_key.as_ref().map(|_| key.authorization_fingerprint(request));
    if let (Some(idempotency_key), Some(fingerprint)) = (&request.idempotency_key, &fingerprint)
        && let Some(earlier) = replay_authorization(tx, idempotency_key, fingerprint)?
    {
        return Ok(earlier);
    }
    // The card as the charge sees it, and the hold it resolves.
    let card = match find_card(tx, "pan_hash", &key.hash_pan(&request.pan))? {
        Some(CardRow { record, hold_id, cvv_hash }) => {
            let standing = tx.one(CARD_STANDING_SQL, args![&record.id, &record.agent_id])?;
            let tries: i64 = standing.get(0)?;
            let view = CardView {
                record,
                cvv_hash,
                wrong_cvv_tries: u32::try_from(tries).unwrap_or(u32::MAX),
                agent_revoked: standing.get(1)?,
            };
            Some((view, hold_id))
        }
        None => None,
    };
    let decision = charge_outcome(key, card.as_ref().map(|(view, _)| view), request, now_ms);
    // Why this authorization voided the card, if it did.
    let mut voided = None;
    if let Some((view, hold_id)) = &card {
        let hold_id = *hold_id;
        let cap = view.record.cap.units();
        let currency = view.record.cap.currency();
        let open = view.record.state == CardState::Open;
        match decision {
            Ok(()) => resolve_hold(tx, hold_id, "captured", currency, cap, request.amount.units(), now)?,
            // The last wrong try the card allows: voided now, its hold released.
            Err(DeclineCode::WrongCvv) if open && view.wrong_cvv_tries + 1 >= MAX_WRONG_CVV => {
                resolve_hold(tx, hold_id, "voided", currency, cap, 0, now)?;
                voided = Some(format!("{MAX_WRONG_CVV} authorizations with a wrong CVV"));
            }
            // Locked out or its agent revoked, yet still open: voided now.
            Err(DeclineCode::CardVoided) if open => {
                resolve_hold(tx, hold_id, "voided", currency, cap, 0, now)?;
                voided = Some(if view.agent_revoked {
                    "the agent was revoked".to_owned()
                } else {
                    format!("{MAX_WRONG_CVV} authorizations with a wrong CVV")
                });
            }
            // Seen past its life before the sweep got to it: expire it now.
            Err(DeclineCode::CardExpired) if open => {
                resolve_hold(tx, hold_id, "expired", currency, cap, 0, now)?
            }
            Err(_) => {}
        }
    }
    let card_id = card.as_ref().map(|(view, _)| view.record.id.clone());
    let code = decision.err().map(DeclineCode::as_str);
    tx.execute(
        "INSERT INTO authorizations (card_id, units, currency, merchant_id, approved, decline_code, created_at_ms,
                                     idempotency_key, fingerprint)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        args![
            &card_id,
            request.amount.units(),
            request.amount.currency(),
            &request.merchant_id,
            decision.is_ok(),
            code,
            now,
            &request.idempotency_key,
            &fingerprint
        ],
    )?;
    let authorization = AuditEvent::Authorization {
        card_id: card_id.as_deref(),
        amount: &request.amount,
        merchant_id: &request.merchant_id,
        approved: decision.is_ok(),
        decline_code: decision.err(),
    };
    append_event(tx, &authorization, actor, now)?;
    if let Some(reason) = voided {
        let void = AuditEvent::CardVoid { card_id: card_id.as_deref(), reason: Some(&reason) };
        append_event(tx, &void, actor, now)?;
    }
    Ok(AuthorizationOutcome {
        approved: decision.is_ok(),
        decline_code: decision.err(),
        card_id,
        replayed: false,
    })
}
