//! Mandates: task-scoped spend authority (docs/contract/api.md, "Mandates").
//!
//! An agent token is standing authority, bounded by policies. A mandate is a
//! narrower lane for one task: a budget in one currency, optionally a list of
//! merchants and of categories, optionally a number of purchases, and an end.
//! A proposal made under a mandate is checked against it in the transaction
//! that commits the proposal, so concurrent proposals never take a mandate
//! past its budget or its count.
//!
//! What a mandate has spent, holds and has left is never stored: it is
//! computed from the ledger each time, from the holds of the mandate's spends
//! (a captured amount counts as spent, an open hold as held; a hold voided or
//! expired unused gives its money and its place in the count back).
//!
//! Nothing here depends on the storage engine or the server.

use serde::Serialize;

use crate::money::{Amount, format_units};
use crate::policy::Merchant;
use crate::storage::{Actor, StorageError, Verdict};

/// How long a mandate may last: 30 days.
pub const MAX_MANDATE_SECONDS: u64 = 30 * 24 * 3600;
/// How long a mandate lasts when its creator does not say: an hour.
pub const DEFAULT_MANDATE_SECONDS: u64 = 3600;
/// Most merchant ids, and most categories, one mandate may name.
pub const MAX_MANDATE_SCOPE: usize = 64;
/// The prefix of every reason a mandate gives for denying a spend.
pub const MANDATE_REASON: &str = "mandate:";

/// Who made a mandate: the operator (active at once), or the agent for
/// itself (waiting for the operator's approval).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Creator {
    Operator,
    Agent,
}

impl Creator {
    pub fn as_str(self) -> &'static str {
        match self {
            Creator::Operator => "operator",
            Creator::Agent => "agent",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "operator" => Some(Creator::Operator),
            "agent" => Some(Creator::Agent),
            _ => None,
        }
    }
}

/// Where a mandate stands.
///
/// - `pending_approval`: an agent asked for it; the operator has not
///   answered, and `approval_ttl_seconds` have not passed since.
/// - `active`: spends may be made under it.
/// - `denied`: the operator refused the agent's request.
/// - `revoked`: the operator or its agent took it back (or the agent was
///   revoked); its open cards were voided and their holds released.
/// - `expired`: its end came, or the operator never answered the request.
/// - `exhausted`: still in force, but nothing can be spent under it now:
///   nothing of the budget remains (captured amounts and open holds use it
///   all), or its spends reached `max_spends`. Computed, like the amounts: a
///   card voided or expired unused gives its hold back, and the mandate is
///   `active` again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MandateStatus {
    PendingApproval,
    Active,
    Denied,
    Revoked,
    Expired,
    Exhausted,
}

impl MandateStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            MandateStatus::PendingApproval => "pending_approval",
            MandateStatus::Active => "active",
            MandateStatus::Denied => "denied",
            MandateStatus::Revoked => "revoked",
            MandateStatus::Expired => "expired",
            MandateStatus::Exhausted => "exhausted",
        }
    }
}

/// A mandate as its creator asked for it, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMandate {
    /// The id the host gave it (`md_…`).
    pub id: String,
    pub agent_id: String,
    /// The budget.
    pub amount: Amount,
    pub purpose: String,
    /// Empty: any merchant.
    pub merchant_ids: Vec<String>,
    /// Empty: any category.
    pub mccs: Vec<String>,
    pub max_spends: Option<u32>,
    pub expires_at_ms: u64,
    pub created_by: Creator,
    pub created_at_ms: u64,
}

/// How the operator answered an agent's request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Approved,
    Denied,
    /// Not answered in time.
    Expired,
}

impl Answer {
    pub fn as_str(self) -> &'static str {
        match self {
            Answer::Approved => "approved",
            Answer::Denied => "denied",
            Answer::Expired => "expired",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "approved" => Some(Answer::Approved),
            "denied" => Some(Answer::Denied),
            "expired" => Some(Answer::Expired),
            _ => None,
        }
    }
}

/// How a mandate ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    Revoked,
    Expired,
}

impl End {
    pub fn as_str(self) -> &'static str {
        match self {
            End::Revoked => "revoked",
            End::Expired => "expired",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "revoked" => Some(End::Revoked),
            "expired" => Some(End::Expired),
            _ => None,
        }
    }
}

/// A mandate as stored, with what the ledger says of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MandateRecord {
    pub mandate: NewMandate,
    /// The operator's answer to an agent's request, and when.
    pub answer: Option<(Answer, u64)>,
    /// How it ended before its time, or that its time ran out, and when.
    pub end: Option<(End, u64)>,
    /// Captured by charges on the mandate's cards (units of its currency).
    pub spent_units: i64,
    /// Held for the mandate's open cards (and approved spends whose card
    /// is not yet collected).
    pub held_units: i64,
    /// Spends holding money or captured: what counts against `max_spends`.
    pub spend_count: u32,
}

impl MandateRecord {
    pub fn id(&self) -> &str {
        &self.mandate.id
    }

    /// The budget less what is spent and held (never below zero).
    pub fn remaining_units(&self) -> i64 {
        (self.mandate.amount.units() - self.spent_units - self.held_units).max(0)
    }

    /// When the operator approved it (an agent's request), or when it was
    /// made (the operator's own).
    pub fn approved_at_ms(&self) -> Option<u64> {
        match (self.mandate.created_by, self.answer) {
            (Creator::Operator, _) => Some(self.mandate.created_at_ms),
            (Creator::Agent, Some((Answer::Approved, at))) => Some(at),
            _ => None,
        }
    }

    /// When a request not yet answered is no longer answerable.
    pub fn answer_by_ms(&self, approval_ttl_ms: u64) -> u64 {
        self.mandate.created_at_ms.saturating_add(approval_ttl_ms).min(self.mandate.expires_at_ms)
    }

    /// Where the mandate stands at `now_ms`.
    pub fn status(&self, now_ms: u64, approval_ttl_ms: u64) -> MandateStatus {
        match self.end {
            Some((End::Revoked, _)) => return MandateStatus::Revoked,
            Some((End::Expired, _)) => return MandateStatus::Expired,
            None => {}
        }
        match (self.mandate.created_by, self.answer) {
            (Creator::Agent, None) => {
                return if now_ms < self.answer_by_ms(approval_ttl_ms) {
                    MandateStatus::PendingApproval
                } else {
                    MandateStatus::Expired
                };
            }
            (Creator::Agent, Some((Answer::Denied, _))) => return MandateStatus::Denied,
            (Creator::Agent, Some((Answer::Expired, _))) => return MandateStatus::Expired,
            (Creator::Agent, Some((Answer::Approved, _))) | (Creator::Operator, _) => {}
        }
        if now_ms >= self.mandate.expires_at_ms {
            MandateStatus::Expired
        } else if self.remaining_units() == 0 || self.count_reached() {
            MandateStatus::Exhausted
        } else {
            MandateStatus::Active
        }
    }

    fn count_reached(&self) -> bool {
        self.mandate.max_spends.is_some_and(|max| self.spend_count >= max)
    }

    fn money(&self, units: i64) -> String {
        format!("{} {}", format_units(units, self.mandate.amount.exponent()), self.mandate.amount.currency())
    }

    /// Whether `amount` at `merchant` may be spent under this mandate at
    /// `now_ms`: `Ok` with the seconds the mandate has left (a card issued
    /// under it lives no longer), or why not, a reason beginning
    /// [`MANDATE_REASON`]. The caller has checked that the mandate is the
    /// agent's own.
    pub fn admits(&self, amount: &Amount, merchant: &Merchant, now_ms: u64) -> Result<u32, String> {
        let id = self.id();
        let refuse = |why: String| Err(format!("{MANDATE_REASON} {why}"));
        match self.status(now_ms, u64::MAX) {
            MandateStatus::PendingApproval => {
                return refuse(format!("`{id}` waits for the operator's approval"));
            }
            MandateStatus::Denied => return refuse(format!("`{id}` was denied by the operator")),
            MandateStatus::Revoked => return refuse(format!("`{id}` was revoked")),
            MandateStatus::Expired => return refuse(format!("`{id}` has expired")),
            MandateStatus::Active | MandateStatus::Exhausted => {}
        }
        // A card lives whole seconds: one that would outlive the mandate by
        // any part of a second is not made.
        let left_seconds = (self.mandate.expires_at_ms - now_ms) / 1000;
        if left_seconds == 0 {
            return refuse(format!("`{id}` expires in less than a second"));
        }
        let m = &self.mandate;
        if amount.currency() != m.amount.currency() {
            return refuse(format!("`{id}` is in {}, not {}", m.amount.currency(), amount.currency()));
        }
        if !m.merchant_ids.is_empty() && !m.merchant_ids.contains(&merchant.id) {
            return refuse(format!("merchant `{}` is not one of `{id}`'s merchants", merchant.id));
        }
        if !m.mccs.is_empty() && !m.mccs.contains(&merchant.mcc) {
            return refuse(format!("category `{}` is not one of `{id}`'s categories", merchant.mcc));
        }
        if let Some(max) = m.max_spends.filter(|_| self.count_reached()) {
            return refuse(format!("`{id}` allows {max} spends, and all are used"));
        }
        if amount.units() > self.remaining_units() {
            return refuse(format!(
                "{} is more than the {} left of `{id}`'s {}",
                self.money(amount.units()),
                self.money(self.remaining_units()),
                self.money(m.amount.units())
            ));
        }
        Ok(u32::try_from(left_seconds).unwrap_or(u32::MAX))
    }
}

/// The policies' verdict bounded by the mandate's check (`admitted`, from
/// [`MandateRecord::admits`], `Ok(None)` for a spend under no mandate): a
/// mandate that refuses the spend denies it, with its reason after any of
/// the policies'; otherwise the verdict stands and a card under the mandate
/// lives at most the returned seconds. One rule for proposals and previews.
pub fn bound(verdict: &Verdict, admitted: Result<Option<u32>, String>) -> (Option<u32>, Verdict) {
    match admitted {
        Ok(left) => (left, verdict.clone()),
        Err(reason) => {
            let mut reasons = match verdict {
                Verdict::Deny(reasons) => reasons.clone(),
                _ => Vec::new(),
            };
            reasons.push(reason);
            (None, Verdict::Deny(reasons))
        }
    }
}

/// A card's life cut to what its mandate has left, if it has one.
pub fn clip_ttl(ttl_seconds: u32, mandate_left: Option<u32>) -> u32 {
    mandate_left.map_or(ttl_seconds, |left| ttl_seconds.min(left))
}

impl MandateRecord {
    /// The mandate as a policy sees it (contract 0.2.0 on), before the
    /// spend being decided: `None` when nothing of it remains (the host's
    /// own check denies such a spend whatever the policies say).
    pub fn for_policy(&self) -> Option<crate::policy::RequestMandate> {
        let m = &self.mandate;
        let remaining = Amount::from_units(self.remaining_units(), m.amount.currency()).ok()?;
        Some(crate::policy::RequestMandate {
            id: m.id.clone(),
            purpose: m.purpose.clone(),
            budget: m.amount.clone(),
            remaining,
            max_spends: m.max_spends,
            spend_count: self.spend_count,
            expires_at_ms: m.expires_at_ms,
            created_by_operator: m.created_by == Creator::Operator,
        })
    }
}

/// Mandates in storage. Every method is one transaction; every change
/// appends its audit record (kind `mandate`, with the `event` and the actor)
/// in the same transaction.
pub trait Mandates: Send + Sync {
    /// Store a new mandate: `created` by the operator, `requested` by its
    /// agent. Refused (nothing written) when the agent is unknown or revoked.
    fn create_mandate(
        &self,
        mandate: &NewMandate,
        actor: &Actor,
        now_ms: u64,
    ) -> Result<MandateRecord, StorageError>;

    fn mandate(&self, id: &str) -> Result<Option<MandateRecord>, StorageError>;

    /// Mandates, newest first; only `agent_id`'s when given.
    fn mandates(&self, agent_id: Option<&str>) -> Result<Vec<MandateRecord>, StorageError>;

    /// The operator answers an agent's request. Refused once answered, past
    /// `approval_ttl_ms`, or when the mandate was made by the operator.
    fn answer_mandate(
        &self,
        id: &str,
        approve: bool,
        approval_ttl_ms: u64,
        actor: &Actor,
        now_ms: u64,
    ) -> Result<MandateRecord, StorageError>;

    /// Revoke a mandate: void its open cards and release every open hold of
    /// its spends (each exactly once), deny its spends waiting for
    /// approval. Refused when it already ended, was denied or expired.
    fn revoke_mandate(&self, id: &str, actor: &Actor, now_ms: u64) -> Result<MandateRecord, StorageError>;

    /// Record as expired every request not answered within
    /// `approval_ttl_ms` and every mandate past its end (a sweep: the system
    /// is the actor). Returns how many.
    fn expire_mandates(&self, approval_ttl_ms: u64, now_ms: u64) -> Result<usize, StorageError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(created_by: Creator) -> MandateRecord {
        MandateRecord {
            mandate: NewMandate {
                id: "md_1".into(),
                agent_id: "ag_1".into(),
                amount: Amount::parse("20.00", "USD").unwrap(),
                purpose: "books".into(),
                merchant_ids: vec!["shop.example".into()],
                mccs: vec![],
                max_spends: Some(2),
                expires_at_ms: 10_000,
                created_by,
                created_at_ms: 0,
            },
            answer: None,
            end: None,
            spent_units: 0,
            held_units: 0,
            spend_count: 0,
        }
    }

    fn merchant(id: &str) -> Merchant {
        Merchant { id: id.into(), name: id.into(), mcc: "5942".into(), country: "US".into() }
    }

    #[test]
    fn a_mandate_admits_only_what_fits_its_lane() {
        let mut m = record(Creator::Operator);
        let usd = |a: &str| Amount::parse(a, "USD").unwrap();
        assert_eq!(m.admits(&usd("20.00"), &merchant("shop.example"), 1_000), Ok(9));
        let why = m.admits(&usd("20.01"), &merchant("shop.example"), 1_000).unwrap_err();
        assert!(why.starts_with("mandate: 20.01 USD is more than the 20.00 USD left"), "{why}");
        assert!(m.admits(&usd("1.00"), &merchant("other.example"), 1_000).unwrap_err().contains("merchant"));
        let eur = Amount::parse("1.00", "EUR").unwrap();
        assert!(m.admits(&eur, &merchant("shop.example"), 1_000).unwrap_err().contains("in USD"));
        assert!(m.admits(&usd("1.00"), &merchant("shop.example"), 9_500).unwrap_err().contains("second"));
        assert!(m.admits(&usd("1.00"), &merchant("shop.example"), 10_000).unwrap_err().contains("expired"));
        m.spent_units = 1500;
        m.held_units = 400;
        assert_eq!(m.remaining_units(), 100);
        assert!(m.admits(&usd("1.01"), &merchant("shop.example"), 0).is_err());
        assert!(m.admits(&usd("1.00"), &merchant("shop.example"), 0).is_ok());
        m.spend_count = 2;
        assert_eq!(m.status(0, 0), MandateStatus::Exhausted);
        assert!(m.admits(&usd("0.01"), &merchant("shop.example"), 0).unwrap_err().contains("2 spends"));
        m.end = Some((End::Revoked, 5));
        assert_eq!(m.status(0, 0), MandateStatus::Revoked);
    }

    #[test]
    fn a_request_waits_for_the_operator_then_expires() {
        let mut m = record(Creator::Agent);
        assert_eq!(m.status(0, 600), MandateStatus::PendingApproval);
        assert_eq!(m.status(600, 600), MandateStatus::Expired);
        assert!(m.admits(&m.mandate.amount.clone(), &merchant("shop.example"), 0).is_err());
        m.answer = Some((Answer::Approved, 100));
        assert_eq!(m.status(600, 600), MandateStatus::Active);
        assert_eq!(m.approved_at_ms(), Some(100));
        m.answer = Some((Answer::Denied, 100));
        assert_eq!(m.status(0, 600), MandateStatus::Denied);
    }
}
