//! Cards: the engine-free logic of the built-in simulated issuer.
//!
//! A card is a 16-digit Luhn-valid PAN from a test BIN range, a CVV, an
//! expiry month/year, a cap, a merchant lock and a time to live. Its PAN and
//! CVV exist in clear only in [`CardSecrets`], handed to the proposing agent
//! once; at rest the host keeps keyed hashes ([`CardKey::hash_pan`],
//! [`CardKey::hash_cvv`]) and the last four digits.
//!
//! A merchant's charge is answered by [`charge_outcome`], a pure function of
//! the stored card ([`CardView`]), the [`AuthorizationRequest`] and the clock.
//! Storage finds the card (by the PAN's keyed hash) and records the outcome.
//!
//! One file per concern: `luhn` (the check digit, [`luhn_valid`]), `key`
//! (the [`CardKey`] and its file), `issuing` (the [`Issuer`] trait and the
//! [`SimulatedIssuer`]) and `authorizing` ([`charge_outcome`] and the
//! [`DeclineCode`]s). The stored card, [`CardRecord`], and its [`CardState`]
//! are here.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::str::FromStr;

use serde::Serialize;

use crate::money::Amount;

mod authorizing;
mod issuing;
mod key;
mod luhn;
#[cfg(test)]
mod tests;

pub use authorizing::{AuthorizationRequest, CardView, DeclineCode, MAX_WRONG_CVV, charge_outcome};
pub use issuing::{CardRequest, CardSecrets, IssuedCard, Issuer, SimulatedIssuer};
pub(crate) use key::write_durably;
pub use key::{CARD_KEY_LEN, CardKey};
pub use luhn::luhn_valid;

/// The issuer identification number of every simulated card: the first six
/// digits of each PAN. `400000` lies in the range card networks and issuer
/// sandboxes reserve for testing, so a simulated card can never be confused
/// with, or charged as, a real one.
pub const TEST_BIN: &str = "400000";

/// A card's time to live when no policy narrows it: 15 minutes, long enough
/// for an agent to finish one checkout, short enough that a leaked card is
/// soon worthless.
pub const DEFAULT_CARD_TTL_SECONDS: u32 = 900;

/// The longest time to live a card may have. Equal to the default on purpose:
/// policies may only narrow a card's terms, never widen them.
pub const MAX_CARD_TTL_SECONDS: u32 = DEFAULT_CARD_TTL_SECONDS;

/// Why a card operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CardError {
    #[error("a card key must be {CARD_KEY_LEN} bytes, got {0}")]
    KeyLength(usize),
    #[error(
        "card key file `{}` holds {len} bytes, expected {CARD_KEY_LEN}; it is left untouched",
        .path.display()
    )]
    KeyFileLength { path: PathBuf, len: usize },
    #[error("cannot {action} card key file `{}`: {source}", .path.display())]
    KeyFile {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("card time to live must be between 1 and {MAX_CARD_TTL_SECONDS} seconds, got {0}")]
    Ttl(u32),
    #[error("card expiry time `{0}` ms is out of range")]
    ExpiryOutOfRange(u64),
    #[error("unknown card state `{0}`")]
    UnknownState(String),
    #[error("unknown decline code `{0}`")]
    UnknownDeclineCode(String),
}

/// Where a card is in its life. Only an `Open` card can be charged; the
/// other states are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CardState {
    Open,
    Used,
    Voided,
    Expired,
}

impl CardState {
    pub fn as_str(self) -> &'static str {
        match self {
            CardState::Open => "open",
            CardState::Used => "used",
            CardState::Voided => "voided",
            CardState::Expired => "expired",
        }
    }
}

impl fmt::Display for CardState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CardState {
    type Err = CardError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "open" => Ok(CardState::Open),
            "used" => Ok(CardState::Used),
            "voided" => Ok(CardState::Voided),
            "expired" => Ok(CardState::Expired),
            other => Err(CardError::UnknownState(other.to_owned())),
        }
    }
}

/// A card as stored: never its PAN or CVV.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CardRecord {
    pub id: String,
    pub spend_id: String,
    pub agent_id: String,
    pub issuer: String,
    pub last4: String,
    pub exp_month: u8,
    pub exp_year: u16,
    pub cap: Amount,
    pub merchant_id: String,
    pub expires_at_ms: u64,
    pub state: CardState,
    /// What a charge captured, once it has.
    pub captured_units: Option<i64>,
}
