//! Authorizing: a merchant's charge against a stored card, answered by a
//! pure function, and the decline codes it answers with.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;
use zeroize::Zeroize;

use super::issuing::masked_pan;
use super::{CardError, CardKey, CardRecord, CardState};
use crate::money::Amount;

/// Why an authorization was declined. The strings are a stable contract
/// with merchants (docs/contract/money.md, "Authorizations").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeclineCode {
    /// No card has this PAN.
    CardNotFound,
    /// The CVV or the expiry month/year does not match the card.
    WrongCvv,
    /// The card's time to live has passed.
    CardExpired,
    /// The card has already been charged.
    CardUsed,
    /// The operator voided the card.
    CardVoided,
    /// The amount is above the card's cap.
    OverLimit,
    /// The amount is not in the card's currency.
    WrongCurrency,
    /// The charging merchant is not the one the card is locked to.
    WrongMerchant,
}

impl DeclineCode {
    /// Every code, in the order [`charge_outcome`] checks them (a locked-out card
    /// declines `card_voided` before its CVV is checked).
    pub const ALL: [DeclineCode; 8] = [
        DeclineCode::CardNotFound,
        DeclineCode::WrongCvv,
        DeclineCode::CardUsed,
        DeclineCode::CardVoided,
        DeclineCode::CardExpired,
        DeclineCode::WrongCurrency,
        DeclineCode::WrongMerchant,
        DeclineCode::OverLimit,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeclineCode::CardNotFound => "card_not_found",
            DeclineCode::WrongCvv => "wrong_cvv",
            DeclineCode::CardExpired => "card_expired",
            DeclineCode::CardUsed => "card_used",
            DeclineCode::CardVoided => "card_voided",
            DeclineCode::OverLimit => "over_limit",
            DeclineCode::WrongCurrency => "wrong_currency",
            DeclineCode::WrongMerchant => "wrong_merchant",
        }
    }
}

impl FromStr for DeclineCode {
    type Err = CardError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DeclineCode::ALL
            .into_iter()
            .find(|code| code.as_str() == s)
            .ok_or_else(|| CardError::UnknownDeclineCode(s.to_owned()))
    }
}

impl fmt::Display for DeclineCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A stored card as [`charge_outcome`] needs it: what storage hands over
/// after looking a card up by the keyed hash of the request's PAN. The
/// card's terms and state are its [`CardRecord`]; beside it, what only an
/// authorization reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CardView {
    pub record: CardRecord,
    /// The keyed hash of its CVV ([`CardKey::hash_cvv`]).
    pub cvv_hash: String,
    /// How many authorizations of this card were declined `wrong_cvv`
    /// before this one.
    pub wrong_cvv_tries: u32,
    /// The card's agent was revoked.
    pub agent_revoked: bool,
}

/// After this many authorizations with a wrong CVV (or expiry) a card is
/// voided and its hold released: a probe gets this many guesses of a
/// 3-digit CVV, never a thousand.
pub const MAX_WRONG_CVV: u32 = 3;

/// A merchant's charge as the card network delivers it. The PAN and CVV are
/// wiped on drop and never shown by `Debug`.
pub struct AuthorizationRequest {
    pub pan: String,
    pub cvv: String,
    pub exp_month: u8,
    pub exp_year: u16,
    pub amount: Amount,
    pub merchant_id: String,
    /// The network's `Idempotency-Key`: a retry with the same key gets the
    /// first answer and moves no money twice.
    pub idempotency_key: Option<String>,
}

impl Drop for AuthorizationRequest {
    fn drop(&mut self) {
        self.pan.zeroize();
        self.cvv.zeroize();
    }
}

impl fmt::Debug for AuthorizationRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthorizationRequest")
            .field("pan", &masked_pan(&self.pan))
            .field("cvv", &"***")
            .field("exp_month", &self.exp_month)
            .field("exp_year", &self.exp_year)
            .field("amount", &self.amount)
            .field("merchant_id", &self.merchant_id)
            .field("idempotency_key", &self.idempotency_key)
            .finish()
    }
}

/// Approve or decline a charge of `card` (`None`: no card has the request's
/// PAN) at `now_ms`. Pure: the caller captures the charge and closes the
/// card on approval.
///
/// The checks run in this order, and the first failing one is the answer:
///
/// 1. `card_not_found`: no card has this PAN.
/// 2. `card_voided` once the card has had [`MAX_WRONG_CVV`] authorizations
///    with a wrong CVV, whatever this one's CVV: the lockout is checked
///    before the CVV, so once it is reached no answer tells a right CVV from
///    a wrong one.
/// 3. `wrong_cvv`: the card data. A wrong expiry month/year counts as wrong
///    card data and is reported (and counted towards the lockout) as
///    `wrong_cvv`, as a real network declines a mistyped expiry, and without
///    a code of its own the expiry is no easier to guess than the CVV.
///    Checking card data before anything else means that someone holding
///    only a PAN learns nothing about the card's state, agent, currency,
///    merchant or cap, and every wrong guess counts: a later decline
///    (`wrong_merchant`, say) can tell a right CVV only to a probe that has
///    guessed it within its [`MAX_WRONG_CVV`] tries.
/// 4. `card_voided` when the card's agent was revoked (revoking voids its
///    open cards; this holds even for one that escaped).
/// 5. `card_used`, `card_voided`, `card_expired`: the card's life. A closed
///    card says so whatever the amount, so a merchant knows a retry is futile.
///    A card still `Open` in storage but past `expires_at_ms` is expired.
/// 6. `wrong_currency`, `wrong_merchant`, `over_limit`: the purchase.
///    Currency first, since amounts in different currencies cannot be
///    compared; merchant before the cap, so only the merchant the card is
///    locked to can probe the cap.
pub fn charge_outcome(
    key: &CardKey,
    card: Option<&CardView>,
    request: &AuthorizationRequest,
    now_ms: u64,
) -> Result<(), DeclineCode> {
    let Some(view) = card else {
        return Err(DeclineCode::CardNotFound);
    };
    if view.wrong_cvv_tries >= MAX_WRONG_CVV {
        return Err(DeclineCode::CardVoided);
    }
    let card = &view.record;
    let cvv_ok = key.verify_cvv(&card.id, &request.cvv, &view.cvv_hash);
    let expiry_ok = card.exp_month == request.exp_month && card.exp_year == request.exp_year;
    // Non-short-circuiting `&`: the CVV is always checked, whatever the expiry.
    if !(cvv_ok & expiry_ok) {
        return Err(DeclineCode::WrongCvv);
    }
    if view.agent_revoked {
        return Err(DeclineCode::CardVoided);
    }
    match card.state {
        CardState::Used => return Err(DeclineCode::CardUsed),
        CardState::Voided => return Err(DeclineCode::CardVoided),
        CardState::Expired => return Err(DeclineCode::CardExpired),
        CardState::Open if now_ms >= card.expires_at_ms => return Err(DeclineCode::CardExpired),
        CardState::Open => {}
    }
    if request.amount.currency() != card.cap.currency() {
        return Err(DeclineCode::WrongCurrency);
    }
    if request.merchant_id != card.merchant_id {
        return Err(DeclineCode::WrongMerchant);
    }
    if request.amount.units() > card.cap.units() {
        return Err(DeclineCode::OverLimit);
    }
    Ok(())
}
