//! The decision on a spend: the one rule that combines the attached
//! policies' decisions into a [`Verdict`], the card terms an approved spend
//! gets, and what the audit trail records of each policy's part
//! ([`PolicyResult`]). This module holds domain types only, so storage
//! depends on it and not on the sandbox; running the policies in the
//! sandbox is [`evaluate`], the one part that uses it.

pub mod evaluate;

pub use evaluate::{Loaded, evaluate_all, load_policies};

use serde::Serialize;

use crate::money::Amount;
use crate::policy::{CardTerms, Decision, LogLine};

/// The combined decision of the policies on one proposal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every policy allowed; the card gets these (narrowest) terms.
    Approve(CardTerms),
    Deny(Vec<String>),
    /// Wait for the operator; should they approve, the card gets `terms`
    /// (the narrowest the allowing policies and the escalations set).
    RequireApproval {
        reasons: Vec<String>,
        terms: CardTerms,
    },
}

impl Verdict {
    /// The combined decision of every attached policy: any deny wins, then
    /// any escalation; otherwise approved with the narrowest terms.
    pub fn combine(denies: Vec<String>, escalations: Vec<String>, terms: CardTerms) -> Verdict {
        if !denies.is_empty() {
            Verdict::Deny(denies)
        } else if !escalations.is_empty() {
            Verdict::RequireApproval { reasons: escalations, terms }
        } else {
            Verdict::Approve(terms)
        }
    }
}

/// The combining rule, one decision at a time: every attached policy's
/// decision is added, and [`Tally::verdict`] gives the strictest (deny wins
/// over require-approval over allow) with the narrowest card terms any
/// allowing policy or escalation set. Should the operator approve an
/// escalation, the card is no wider than any escalation asked, nor than any
/// allowing policy's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    denies: Vec<String>,
    escalations: Vec<String>,
    terms: CardTerms,
}

impl Tally {
    /// Add one policy's decision, its reason as it is.
    pub fn add(&mut self, decision: Decision) {
        match decision {
            Decision::Allow(terms) => self.terms = std::mem::take(&mut self.terms).narrowest(terms),
            Decision::Deny(reason) => self.denies.push(reason),
            Decision::RequireApproval { reason, terms } => {
                self.escalations.push(reason);
                self.terms = std::mem::take(&mut self.terms).narrowest(terms);
            }
        }
    }

    /// The verdict so far.
    pub fn verdict(self) -> Verdict {
        Verdict::combine(self.denies, self.escalations, self.terms)
    }

    /// What the verdict would be, without its reasons: for callers that
    /// count outcomes only.
    pub fn kind(&self) -> &'static str {
        if !self.denies.is_empty() {
            "deny"
        } else if !self.escalations.is_empty() {
            "require_approval"
        } else {
            "allow"
        }
    }

    /// The narrowest terms so far.
    pub fn terms(&self) -> &CardTerms {
        &self.terms
    }
}

/// A verdict with what the audit trail records of how it was reached (each
/// policy's decision, fuel, time and logs).
#[derive(Debug, Clone, PartialEq)]
pub struct Decided {
    pub verdict: Verdict,
    pub evaluations: Vec<PolicyResult>,
}

impl From<Verdict> for Decided {
    fn from(verdict: Verdict) -> Self {
        Decided { verdict, evaluations: Vec::new() }
    }
}

/// One attached policy's part in a decision, as the audit trail records it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum PolicyResult {
    /// The policy ran (or faulted).
    Ran(PolicyRun),
    /// The policy version could not be loaded: a deny.
    Unloaded {
        /// `NAME@VERSION`.
        policy: String,
        /// Always `deny`.
        decision: &'static str,
        error: String,
    },
}

/// An evaluation of one attached policy.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PolicyRun {
    pub policy: String,
    pub version: u32,
    pub module_sha256: String,
    pub config_sha256: String,
    /// `allow`, `deny` or `require_approval` (a fault is a deny).
    pub decision: &'static str,
    pub reason: Option<String>,
    pub card_terms: Option<CardTerms>,
    pub fault: Option<FaultEntry>,
    pub fuel_used: u64,
    pub elapsed_us: u64,
    pub logs: Vec<LogLine>,
}

/// Why an evaluation stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FaultEntry {
    pub kind: &'static str,
    pub detail: String,
}

/// The card a spend may get: the narrowest cap any policy set, never above
/// the requested amount nor in another currency; the shortest life, never
/// above the default.
pub fn card_terms(amount: &Amount, terms: &CardTerms, default_ttl_seconds: u32) -> (Amount, u32) {
    let cap = match &terms.max_amount {
        Some(cap) if cap.currency() == amount.currency() && cap.units() < amount.units() => cap.clone(),
        _ => amount.clone(),
    };
    let ttl = terms.ttl_seconds.unwrap_or(default_ttl_seconds).clamp(1, default_ttl_seconds.max(1));
    (cap, ttl)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap(amount: &str, ttl_seconds: Option<u32>) -> CardTerms {
        CardTerms { ttl_seconds, max_amount: Amount::parse(amount, "USD").ok() }
    }

    #[test]
    fn deny_wins_then_escalation_and_terms_are_the_narrowest() {
        let mut tally = Tally::default();
        tally.add(Decision::Allow(cap("50.00", Some(600))));
        tally.add(Decision::RequireApproval { reason: "big".into(), terms: cap("20.00", None) });
        assert_eq!(tally.kind(), "require_approval");
        assert_eq!(
            tally.clone().verdict(),
            Verdict::RequireApproval { reasons: vec!["big".into()], terms: cap("20.00", Some(600)) }
        );
        tally.add(Decision::Deny("no".into()));
        assert_eq!(tally.kind(), "deny");
        assert_eq!(tally.verdict(), Verdict::Deny(vec!["no".into()]));
        assert_eq!(Tally::default().verdict(), Verdict::Approve(CardTerms::default()));
    }

    #[test]
    fn a_card_is_never_above_the_request_nor_longer_than_the_default() {
        let usd = |amount: &str| Amount::parse(amount, "USD").unwrap_or_else(|e| panic!("{e}"));
        let amount = usd("30.00");
        assert_eq!(card_terms(&amount, &cap("20.00", Some(60)), 900), (usd("20.00"), 60));
        assert_eq!(card_terms(&amount, &cap("40.00", Some(5000)), 900), (amount.clone(), 900));
        let euros = CardTerms { ttl_seconds: Some(0), max_amount: Amount::parse("1.00", "EUR").ok() };
        assert_eq!(card_terms(&amount, &euros, 900), (amount.clone(), 1));
    }
}
