//! Where the wallet lives. One trait, so the embedded SQLite store and
//! PostgreSQL share the same behaviour and the same test suite; both are
//! the same SQL ([`sql`]) on two engines.
//!
//! The trait is synchronous: the daemon calls it from blocking threads. Every
//! method is one transaction: it happens entirely or not at all.

mod error;
pub mod postgres;
pub mod sql;
pub mod sqlite;

pub use error::{Conflict, StorageError};
pub use sql::{INSUFFICIENT_FUNDS, OPTIMISTIC_ATTEMPTS, SWEEP_OVERLAP};

use std::sync::Arc;

use serde::Serialize;
use sha2::{Digest, Sha256};

pub use crate::audit::{AUDIT_GENESIS, AuditBreak, AuditRecord, audit_hash, verify_chain};
use crate::audit::{AuditHead, AuditKey, Checkpoint};
pub use crate::cards::CardRecord;
use crate::cards::{AuthorizationRequest, CardKey, DeclineCode, IssuedCard, Issuer};
pub use crate::decide::{Decided, Verdict};
use crate::history::History;
use crate::ledger::Balance;
use crate::money::Amount;
use crate::policy::Merchant;

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
    /// The mandate the agent proposes it under, if any.
    pub mandate_id: Option<String>,
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
        // Only when given, so a proposal without one hashes as before
        // mandates existed.
        if let Some(mandate_id) = &self.mandate_id {
            h.update(b"mandate");
            h.update((mandate_id.len() as u64).to_le_bytes());
            h.update(mandate_id.as_bytes());
        }
        hex::encode(h.finalize())
    }
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
    /// The mandate it was proposed under, if any.
    pub mandate_id: Option<String>,
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
#[derive(Clone)]
pub struct CardIssuance {
    pub issuer: Arc<dyn Issuer>,
    pub key: Arc<CardKey>,
    pub default_ttl_seconds: u32,
}

impl std::fmt::Debug for CardIssuance {
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
    /// True when an earlier authorization with the same idempotency key
    /// answered (nothing was written this time).
    pub replayed: bool,
}

/// The wallet's storage. Every method is one atomic transaction.
pub trait Storage: Send + Sync {
    /// Fund the wallet. The same idempotency key returns the first deposit;
    /// with another amount it is a conflict.
    fn deposit(
        &self,
        amount: &Amount,
        idempotency_key: Option<&str>,
        actor: &Actor,
        now_ms: u64,
    ) -> Result<DepositRecord, StorageError>;

    /// Balances per currency, sorted by currency.
    fn balances(&self) -> Result<Vec<Balance>, StorageError>;

    /// Record a proposal and its outcome in one transaction: look up the
    /// idempotency key, let `decide` run the policies, then — on approval —
    /// check the funds, place the hold and issue the card.
    ///
    /// The decision commits as if the policies had run inside the commit's
    /// transaction (docs/contract/money.md, "Decisions"): no other proposal can commit between what the
    /// policies saw and this commit. A backend may run `decide` outside its
    /// write lock against a snapshot, provided it commits only when every
    /// history query the policies made still has the same answer (policies
    /// are deterministic, so they would decide the same), and otherwise
    /// runs `decide` again; `decide` may therefore be called more than once.
    fn propose(
        &self,
        spend: &NewSpend,
        cards: &CardIssuance,
        actor: &Actor,
        now_ms: u64,
        decide: &mut dyn FnMut(Arc<dyn History>) -> Decided,
    ) -> Result<Proposed, StorageError>;

    /// What `decide` (the policies) says on one read snapshot of history,
    /// with nothing written: a spend's preview. Nothing is held and no
    /// spend is recorded; the caller appends the preview's audit record.
    fn preview(&self, decide: &mut dyn FnMut(Arc<dyn History>) -> Decided) -> Result<Decided, StorageError>;

    /// The operator approves a spend waiting for approval: `decide` runs the
    /// agent's policies again, as for [`Storage::propose`] (a deny still wins, a
    /// require-approval is what the operator just answered), funds are
    /// checked again and the money held; the card is made when the agent first reads
    /// the spend ([`Storage::claim_card`]), and lives until the hold lapses.
    /// Refused once the spend is resolved or waited longer than `approval_ttl_ms`.
    fn approve(
        &self,
        spend_id: &str,
        default_ttl_seconds: u32,
        approval_ttl_ms: u64,
        actor: &Actor,
        now_ms: u64,
        decide: &mut dyn FnMut(&SpendRecord, Arc<dyn History>) -> Decided,
    ) -> Result<SpendRecord, StorageError>;

    /// The operator denies a spend waiting for approval.
    fn deny(
        &self,
        spend_id: &str,
        reason: &str,
        approval_ttl_ms: u64,
        actor: &Actor,
        now_ms: u64,
    ) -> Result<SpendRecord, StorageError>;

    /// Resolve as expired every spend that waited longer than `approval_ttl_ms`
    /// (a sweep: the system is the actor).
    fn expire_approvals(&self, approval_ttl_ms: u64, now_ms: u64) -> Result<usize, StorageError>;

    /// Spends waiting for approval (and not yet past `approval_ttl_ms`), oldest first.
    fn pending_approvals(&self, approval_ttl_ms: u64, now_ms: u64) -> Result<Vec<SpendRecord>, StorageError>;

    /// The card of an approved-after-escalation spend, made now, with its
    /// PAN and CVV: `None` when it was made before (they are shown once),
    /// or the spend has no money held for it.
    fn claim_card(
        &self,
        spend_id: &str,
        cards: &CardIssuance,
        now_ms: u64,
    ) -> Result<Option<IssuedCard>, StorageError>;

    /// Spends, newest first; only `agent_id`'s when given.
    fn spends(&self, agent_id: Option<&str>, limit: usize) -> Result<Vec<SpendRecord>, StorageError>;

    /// How many spends `agent_id` has on record since `since_ms`, counting
    /// no further than `at_most` (an index range of that length at most:
    /// what a proposal quota needs to know), and when the oldest of them
    /// was recorded.
    fn spends_since(
        &self,
        agent_id: &str,
        since_ms: u64,
        at_most: u64,
    ) -> Result<(u64, Option<u64>), StorageError>;

    /// Append a record to the audit trail, in its own transaction.
    fn audit(
        &self,
        kind: &str,
        record: &serde_json::Value,
        actor: &Actor,
        now_ms: u64,
    ) -> Result<(), StorageError>;

    /// Audit records with `seq` above `after`, oldest first, at most `limit`.
    fn audit_records(&self, after: u64, limit: usize) -> Result<Vec<AuditRecord>, StorageError>;

    /// Recompute the audit chain (keyed from where the store's audit key
    /// says, see [`Backend::set_audit_key`]); with a checkpoint, also check
    /// that the trail still holds that record with that hash. The head when
    /// everything holds.
    fn verify_audit(
        &self,
        checkpoint: Option<&Checkpoint>,
    ) -> Result<Result<AuditHead, AuditBreak>, StorageError>;

    /// Decide a merchant's charge: approve and capture, or decline with a
    /// stable code. A card is captured at most once, however charges race.
    /// With `request.idempotency_key`, a retry gets the first answer and
    /// writes nothing; the same key with another charge is a conflict. The
    /// third authorization with a wrong CVV voids the card and releases its
    /// hold in the same transaction.
    fn authorize(
        &self,
        request: &AuthorizationRequest,
        key: &CardKey,
        actor: &Actor,
        now_ms: u64,
    ) -> Result<AuthorizationOutcome, StorageError>;

    /// Void an open card and release its hold.
    fn void_card(&self, card_id: &str, actor: &Actor, now_ms: u64) -> Result<CardRecord, StorageError>;

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

/// A fresh id for a row made on every proposal (spends, cards): the
/// milliseconds since the epoch (48 bits, 12 hex digits), then 80 random
/// bits. Ids made later sort later, so the unique indexes on them grow at
/// their right edge: an insert finds its leaf page already in the writer's
/// cache instead of reading a random one from a large file, and consecutive
/// commits write the same few pages, which a checkpoint then copies once.
/// The time it shows is the spend's own, which its record shows anyway.
pub fn new_ordered_id(prefix: &str, now_ms: u64) -> String {
    let random: [u8; 10] = rand::random();
    format!("{prefix}_{:012x}{}", now_ms & 0xffff_ffff_ffff, hex::encode(random))
}

/// Who a bearer token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Controls the wallet: deposits, policies, agents, approvals, cards, audit.
    Operator,
    /// May only propose spends and read its own spends and cards.
    Agent(String),
    /// May only send authorization requests.
    Network,
}

impl Role {
    pub fn name(&self) -> &'static str {
        match self {
            Role::Operator => "operator",
            Role::Agent(_) => "agent",
            Role::Network => "network",
        }
    }
}

/// Who made a change: what the audit record of it names (never a token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    /// A request with a bearer token: the token's id and role, and the
    /// client's address (`unknown` when the server could not tell).
    Token { token_id: String, role: Role, address: String },
    /// The daemon on its own: the expiry sweeps.
    System,
    /// A command run on the data directory's files rather than through the
    /// daemon (`spendguard init`, `spendguard token new --data-dir`): whoever
    /// holds those files.
    DataDirectory,
}

impl Actor {
    /// As an audit record holds it: `{"token_id", "role", "address"}` (and
    /// `"agent_id"` for an agent); the token id and address are null when no
    /// token acted.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Actor::Token { token_id, role, address } => {
                let mut v =
                    serde_json::json!({ "token_id": token_id, "role": role.name(), "address": address });
                if let Role::Agent(agent_id) = role {
                    v["agent_id"] = serde_json::json!(agent_id);
                }
                v
            }
            Actor::System => serde_json::json!({ "token_id": null, "role": "system", "address": null }),
            Actor::DataDirectory => {
                serde_json::json!({ "token_id": null, "role": "data_directory", "address": null })
            }
        }
    }
}

/// A token as listed: never the token nor its hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    pub id: String,
    pub role: Role,
    /// What the operator called it; `None` for tokens made before labels.
    pub label: Option<String>,
    pub created_at_ms: u64,
    /// The last use recorded in the database (see [`Registry::record_token_uses`]).
    pub last_used_at_ms: Option<u64>,
    /// When the token was revoked, or its agent (whichever came first).
    pub revoked_at_ms: Option<u64>,
}

/// A token as stored: its role, never the token itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInfo {
    pub id: String,
    /// The stored hash, for the caller's constant-time comparison.
    pub hash: String,
    pub role: Role,
    /// The token, or its agent, was revoked.
    pub revoked: bool,
}

/// An uploaded policy module's identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyRecord {
    pub name: String,
    pub version: u32,
    pub sha256: String,
    pub size: usize,
    pub created_at_ms: u64,
}

/// One policy attached to an agent, at a fixed version, with its config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub policy: String,
    pub version: u32,
    /// The config document, as JSON text.
    pub config: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentRecord {
    pub id: String,
    pub name: String,
    pub labels: std::collections::BTreeMap<String, String>,
    /// The attachments in force, in order.
    pub attachments: Vec<Attachment>,
    pub revoked: bool,
    pub created_at_ms: u64,
}

/// Tokens, agents, policy modules and attachments. Append-only like the
/// ledger: revocations and new attachment sets are new rows.
pub trait Registry: Send + Sync {
    /// Store a token's hash for `role` under `label`; returns the token's id.
    fn add_token(
        &self,
        role: &Role,
        token_hash: &str,
        label: &str,
        actor: &Actor,
        now_ms: u64,
    ) -> Result<String, StorageError>;
    /// The token with this hash, if any.
    fn token(&self, token_hash: &str) -> Result<Option<TokenInfo>, StorageError>;
    /// Every token ever made, oldest first.
    fn tokens(&self) -> Result<Vec<TokenRecord>, StorageError>;
    /// Revoke one token. Revoking twice is a conflict, and so is revoking the
    /// last operator token not revoked ([`StorageError::LastOperatorToken`]).
    fn revoke_token(&self, id: &str, actor: &Actor, now_ms: u64) -> Result<TokenRecord, StorageError>;
    /// Record that each token was used at that time (coalesced by the
    /// caller: one row per token per flush). Uses of unknown tokens are
    /// ignored.
    fn record_token_uses(&self, uses: &[(String, u64)]) -> Result<(), StorageError>;

    /// Store a module under `name` as its next version (1 for a new name).
    fn add_policy(
        &self,
        name: &str,
        module: &[u8],
        sha256: &str,
        actor: &Actor,
        now_ms: u64,
    ) -> Result<PolicyRecord, StorageError>;
    /// Every version of every policy, by name then version.
    fn policies(&self) -> Result<Vec<PolicyRecord>, StorageError>;
    fn policy_module(&self, name: &str, version: u32) -> Result<Option<Vec<u8>>, StorageError>;
    fn latest_policy_version(&self, name: &str) -> Result<Option<u32>, StorageError>;

    /// Create an agent with its attachments and its token's hash, in one
    /// transaction (and an audit record).
    fn create_agent(
        &self,
        agent: &AgentRecord,
        token_hash: &str,
        actor: &Actor,
        now_ms: u64,
    ) -> Result<AgentRecord, StorageError>;
    fn agents(&self) -> Result<Vec<AgentRecord>, StorageError>;
    fn agent(&self, id: &str) -> Result<Option<AgentRecord>, StorageError>;
    /// Revoke an agent and every token it has, and take back all it holds,
    /// in one transaction: void its open cards and release every hold of
    /// its spends (each exactly once), deny its spends waiting for
    /// approval, and record it all in one audit record. From then on no
    /// proposal of the agent commits, none of its spends is approved and
    /// none of its cards authorizes. Revoking twice is a conflict.
    fn revoke_agent(&self, id: &str, actor: &Actor, now_ms: u64) -> Result<AgentRecord, StorageError>;
    /// Replace an agent's attachments (a new set; the old stays on record).
    fn set_attachments(
        &self,
        id: &str,
        attachments: &[Attachment],
        actor: &Actor,
        now_ms: u64,
    ) -> Result<AgentRecord, StorageError>;
}

/// What the daemon needs of a backend.
pub trait Backend: Storage + Registry + crate::mandates::Mandates {
    /// Whether a read is quick and never waits: on local files, and for
    /// nothing another connection holds (SQLite in WAL mode: a reader
    /// never waits for the writer, and checkpoints are passive). The
    /// daemon then makes the one read every request starts with, its
    /// token's lookup, on the async worker itself instead of handing it to
    /// a blocking thread and back. `false` when a read crosses a network.
    fn quick_reads(&self) -> bool;

    /// [`Storage::authorize`] without holding the caller's thread: queued
    /// for the backend's own writer thread, the answer arriving on the
    /// channel once durable (SQLite). A backend without one hands the
    /// request back, to be authorized on a blocking thread (PostgreSQL).
    fn authorize_queued(
        &self,
        request: AuthorizationRequest,
        key: Arc<CardKey>,
        actor: Actor,
        now_ms: u64,
    ) -> Result<sql::Answer<AuthorizationOutcome>, Box<AuthorizationRequest>>;

    /// Key the audit chain from now on: every record this store appends is
    /// MAC'd with `key`, and [`Storage::verify_audit`] checks records from
    /// its [`AuditKey::keyed_from`] on against it. Set once, before use;
    /// a second, different key is refused.
    fn set_audit_key(&self, key: Arc<AuditKey>) -> Result<(), StorageError>;
}

impl<E: sql::Engine> Backend for sql::SqlStore<E> {
    fn quick_reads(&self) -> bool {
        E::QUICK_READS
    }

    fn authorize_queued(
        &self,
        request: AuthorizationRequest,
        key: Arc<CardKey>,
        actor: Actor,
        now_ms: u64,
    ) -> Result<sql::Answer<AuthorizationOutcome>, Box<AuthorizationRequest>> {
        sql::SqlStore::authorize_queued(self, request, key, actor, now_ms)
    }

    fn set_audit_key(&self, key: Arc<AuditKey>) -> Result<(), StorageError> {
        sql::SqlStore::set_audit_key(self, key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordered_ids_sort_by_time_and_stay_unique_within_a_millisecond() {
        let (early, late) =
            (new_ordered_id("sp", 1_764_000_000_000), new_ordered_id("sp", 1_764_000_000_001));
        assert!(early < late, "{early} !< {late}");
        assert!(new_ordered_id("card", 9) < new_ordered_id("card", 10), "hex digits sort as numbers");
        // 3 + 12 hex digits of time + 20 of randomness.
        assert_eq!(early.len(), 3 + 12 + 20, "{early}");
        assert!(early.starts_with("sp_019") && early[3..].bytes().all(|b| b.is_ascii_hexdigit()), "{early}");
        let same_ms: std::collections::HashSet<String> = (0..1000).map(|_| new_ordered_id("sp", 7)).collect();
        assert_eq!(same_ms.len(), 1000);
    }
}
