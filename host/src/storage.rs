//! Where the wallet lives. One trait, so the embedded SQLite store and (later)
//! PostgreSQL share the same behaviour and the same test suite.
//!
//! The trait is synchronous: the daemon calls it from blocking threads. Every
//! method is one transaction: it happens entirely or not at all.

pub mod sqlite;

use std::sync::Arc;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::cards::{AuthorizationRequest, CardKey, CardState, DeclineCode, IssuedCard, Issuer};
use crate::history::History;
use crate::ledger::Balance;
use crate::money::Amount;
use crate::policy::{CardTerms, Merchant};

/// A proposal, as the host received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSpend {
    /// The id the host gave it (`sp_…`).
    pub id: String,
    pub agent_id: String,
    /// The agent's `Idempotency-Key`: the same key returns the first result.
    pub idempotency_key: Option<String>,
    pub amount: Amount,
    pub merchant: Merchant,
    pub purpose: String,
    pub received_at_ms: u64,
}

impl NewSpend {
    /// What must match for a retry with the same idempotency key to be the
    /// same proposal.
    pub fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        for part in [
            self.amount.units().to_string().as_str(),
            self.amount.currency(),
            &self.merchant.id,
            &self.merchant.name,
            &self.merchant.mcc,
            &self.merchant.country,
            &self.purpose,
        ] {
            // Length-prefixed, so no two field lists hash alike.
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        hex::encode(h.finalize())
    }
}

/// The combined decision of the policies on one proposal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every policy allowed; the card gets these (narrowest) terms.
    Approve(CardTerms),
    Deny(Vec<String>),
    RequireApproval(Vec<String>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SpendStatus {
    Approved,
    Denied,
    PendingApproval,
}

impl SpendStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SpendStatus::Approved => "approved",
            SpendStatus::Denied => "denied",
            SpendStatus::PendingApproval => "pending_approval",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "approved" => Some(SpendStatus::Approved),
            "denied" => Some(SpendStatus::Denied),
            "pending_approval" => Some(SpendStatus::PendingApproval),
            _ => None,
        }
    }
}

/// A recorded proposal and its outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpendRecord {
    pub id: String,
    pub agent_id: String,
    pub amount: Amount,
    pub merchant: Merchant,
    pub purpose: String,
    pub received_at_ms: u64,
    pub status: SpendStatus,
    pub reasons: Vec<String>,
    pub card_id: Option<String>,
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

/// What `propose` did.
#[derive(Debug)]
pub struct Proposed {
    pub spend: SpendRecord,
    /// The card with its PAN and CVV: only on the first response, never on
    /// a replay (they are not stored, so they cannot be shown twice).
    pub card: Option<IssuedCard>,
    /// True when an earlier proposal with the same idempotency key answered.
    pub replayed: bool,
}

/// How cards are made: the issuer, the key of the PAN/CVV hashes, and the
/// life of a card when no policy shortens it.
pub struct CardIssuance<'a> {
    pub issuer: &'a dyn Issuer,
    pub key: &'a CardKey,
    pub default_ttl_seconds: u32,
}

impl std::fmt::Debug for CardIssuance<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CardIssuance")
            .field("issuer", &self.issuer.name())
            .field("default_ttl_seconds", &self.default_ttl_seconds)
            .finish_non_exhaustive()
    }
}

/// A recorded deposit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DepositRecord {
    pub id: String,
    pub amount: Amount,
    pub replayed: bool,
}

/// The answer to a merchant's authorization request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorizationOutcome {
    pub approved: bool,
    pub decline_code: Option<DeclineCode>,
    pub card_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorageError {
    #[error("idempotency key `{0}` was used with other parameters")]
    IdempotencyConflict(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    InvalidState(String),
    #[error("card issuer: {0}")]
    Issuer(String),
    #[error("database: {0}")]
    Database(String),
    /// An invariant of the ledger would break: the transaction is rolled back.
    #[error("ledger invariant: {0}")]
    Invariant(String),
}

/// The wallet's storage. Every method is one atomic transaction.
pub trait Storage: Send + Sync {
    /// Fund the wallet. The same idempotency key returns the first deposit;
    /// with another amount it is a conflict.
    fn deposit(
        &self,
        amount: &Amount,
        idempotency_key: Option<&str>,
        now_ms: u64,
    ) -> Result<DepositRecord, StorageError>;

    /// Balances per currency, sorted by currency.
    fn balances(&self) -> Result<Vec<Balance>, StorageError>;

    /// Record a proposal and its outcome in one transaction: look up the
    /// idempotency key, let `decide` run the policies against a history that
    /// reads inside this transaction (so no other proposal can commit between
    /// what the policies saw and this commit), then — on approval — check the
    /// funds, place the hold and issue the card.
    fn propose(
        &self,
        spend: &NewSpend,
        cards: &CardIssuance<'_>,
        now_ms: u64,
        decide: &mut dyn FnMut(Arc<dyn History>) -> Verdict,
    ) -> Result<Proposed, StorageError>;

    /// Decide a merchant's charge: approve and capture, or decline with a
    /// stable code. A card is captured at most once, however charges race.
    fn authorize(
        &self,
        request: &AuthorizationRequest,
        key: &CardKey,
        now_ms: u64,
    ) -> Result<AuthorizationOutcome, StorageError>;

    /// Void an open card and release its hold.
    fn void_card(&self, card_id: &str, now_ms: u64) -> Result<CardRecord, StorageError>;

    /// Void every open card past its life and release its hold; returns how
    /// many. Safe to run at any time, from any number of processes.
    fn expire_cards(&self, now_ms: u64) -> Result<usize, StorageError>;

    fn spend(&self, id: &str) -> Result<Option<SpendRecord>, StorageError>;
    fn card(&self, id: &str) -> Result<Option<CardRecord>, StorageError>;
    /// Cards, newest first; only `agent_id`'s when given.
    fn cards(&self, agent_id: Option<&str>) -> Result<Vec<CardRecord>, StorageError>;

    /// Check every ledger invariant; the error names the first that fails.
    /// Tests call it after every step; operators may too.
    fn check_invariants(&self) -> Result<(), String>;
}

/// A fresh random id with a readable prefix (`sp_3f9a…`): 96 random bits.
pub fn new_id(prefix: &str) -> String {
    let bytes: [u8; 12] = rand::random();
    format!("{prefix}_{}", hex::encode(bytes))
}
