//! Issuing: what the host asks an issuer for, what it gets back (the
//! secrets shown once), and the built-in simulated issuer.

use std::fmt;

use rand::Rng;
use zeroize::{Zeroize, ZeroizeOnDrop};

use super::luhn::luhn_check_digit;
use super::{CardError, MAX_CARD_TTL_SECONDS, TEST_BIN};
use crate::money::Amount;

/// Digits in a PAN: the BIN, the account digits, one check digit.
const PAN_LEN: usize = 16;

/// Digits in a CVV.
const CVV_LEN: usize = 3;

/// A card's PAN and CVV in clear: shown once to the proposing agent, never
/// stored or logged. Wiped on drop; `Debug` shows only the last four digits.
///
/// Deliberately not `Serialize`: the one place that shows them writes them
/// out explicitly.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct CardSecrets {
    pub pan: String,
    pub cvv: String,
}

impl CardSecrets {
    /// The last four digits of the PAN, which may be stored and shown.
    pub fn last4(&self) -> &str {
        self.pan.get(self.pan.len().saturating_sub(4)..).unwrap_or("")
    }
}

impl fmt::Debug for CardSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CardSecrets").field("pan", &masked_pan(&self.pan)).field("cvv", &"***").finish()
    }
}

/// A PAN as a receipt shows it: `**** 1234`. Only a full-length all-digit
/// number shows its last four; on anything shorter or odd (as an untrusted
/// authorization request may carry) the last four could be most of it.
pub(super) fn masked_pan(pan: &str) -> String {
    if pan.len() >= 12 && pan.bytes().all(|b| b.is_ascii_digit()) {
        format!("**** {}", pan.get(pan.len() - 4..).unwrap_or(""))
    } else {
        "****".to_owned()
    }
}

/// What the host asks an issuer for: one card bound to one purchase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CardRequest {
    pub card_id: String,
    pub cap: Amount,
    pub merchant_id: String,
    /// Between 1 and [`MAX_CARD_TTL_SECONDS`].
    pub ttl_seconds: u32,
    /// The clock of the issue, in Unix milliseconds.
    pub now_ms: u64,
}

/// A card as issued. `secrets` go to the agent once; everything else may be
/// stored.
#[derive(Debug)]
pub struct IssuedCard {
    pub card_id: String,
    pub secrets: CardSecrets,
    pub last4: String,
    /// Calendar month (1–12, UTC) of `expires_at_ms`.
    pub exp_month: u8,
    /// Calendar year (UTC) of `expires_at_ms`.
    pub exp_year: u16,
    /// The instant the card stops authorizing, in Unix milliseconds.
    pub expires_at_ms: u64,
    /// The most it may be charged, in its currency.
    pub cap: Amount,
    /// The only merchant it works at.
    pub merchant_id: String,
}

/// Something that issues cards: the built-in [`SimulatedIssuer`] today, real
/// issuers (Stripe Issuing, Lithic) later.
pub trait Issuer: Send + Sync {
    /// A short stable name, for the audit trail and logs.
    fn name(&self) -> &'static str;

    /// Issue one card for `request`.
    fn issue(&self, request: &CardRequest) -> Result<IssuedCard, CardError>;
}

/// The local simulated card network: cards from [`TEST_BIN`] with random
/// digits, authorized by [`charge_outcome`](super::charge_outcome).
#[derive(Debug, Clone, Copy, Default)]
pub struct SimulatedIssuer;

impl SimulatedIssuer {
    pub fn new() -> SimulatedIssuer {
        SimulatedIssuer
    }
}

impl Issuer for SimulatedIssuer {
    fn name(&self) -> &'static str {
        "simulated"
    }

    fn issue(&self, request: &CardRequest) -> Result<IssuedCard, CardError> {
        if request.ttl_seconds == 0 || request.ttl_seconds > MAX_CARD_TTL_SECONDS {
            return Err(CardError::Ttl(request.ttl_seconds));
        }
        let expires_at_ms = request
            .now_ms
            .checked_add(u64::from(request.ttl_seconds) * 1000)
            .ok_or(CardError::ExpiryOutOfRange(request.now_ms))?;
        let (exp_month, exp_year) = expiry_month_year(expires_at_ms)?;

        let mut rng = rand::rng();
        let secrets = CardSecrets { pan: random_pan(&mut rng), cvv: random_digits(&mut rng, CVV_LEN) };
        Ok(IssuedCard {
            card_id: request.card_id.clone(),
            last4: secrets.last4().to_owned(),
            secrets,
            exp_month,
            exp_year,
            expires_at_ms,
            cap: request.cap.clone(),
            merchant_id: request.merchant_id.clone(),
        })
    }
}

/// [`TEST_BIN`], random account digits, the Luhn check digit.
///
/// Only 10^9 account numbers exist under one BIN, so two cards share a PAN
/// with probability n²/2·10⁻⁹ after n cards: storage must keep PAN hashes
/// unique and have a clash reissued.
pub(super) fn random_pan(rng: &mut impl Rng) -> String {
    // Built in place at its final capacity: growing a String would leave
    // unwiped copies of the digits in freed memory.
    let mut pan = String::with_capacity(PAN_LEN);
    pan.push_str(TEST_BIN);
    for _ in 0..PAN_LEN - TEST_BIN.len() - 1 {
        pan.push(random_digit(rng));
    }
    let check = luhn_check_digit(&pan);
    pan.push(char::from(b'0' + check));
    pan
}

fn random_digits(rng: &mut impl Rng, len: usize) -> String {
    let mut digits = String::with_capacity(len);
    for _ in 0..len {
        digits.push(random_digit(rng));
    }
    digits
}

fn random_digit(rng: &mut impl Rng) -> char {
    char::from(b'0' + rng.random_range(0..10u8))
}

/// The calendar month and year (UTC) of an instant in Unix milliseconds.
fn expiry_month_year(at_ms: u64) -> Result<(u8, u16), CardError> {
    let out_of_range = || CardError::ExpiryOutOfRange(at_ms);
    let seconds = i64::try_from(at_ms / 1000).map_err(|_| out_of_range())?;
    let at = time::OffsetDateTime::from_unix_timestamp(seconds).map_err(|_| out_of_range())?;
    let year = u16::try_from(at.year()).map_err(|_| out_of_range())?;
    Ok((u8::from(at.month()), year))
}
