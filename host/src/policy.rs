//! What a policy sees and decides, in the host's own types. Nothing here
//! depends on the Wasm engine: the sandbox converts at its edge.

use serde::Serialize;

use crate::money::Amount;

/// The agent that proposed a spend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Agent {
    pub id: String,
    pub name: String,
    pub labels: Vec<(String, String)>,
}

/// Where the money would go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Merchant {
    pub id: String,
    pub name: String,
    /// ISO 18245 merchant category code, four digits.
    pub mcc: String,
    /// ISO 3166-1 alpha-2, empty when unknown.
    pub country: String,
}

/// One proposed spend, as policies see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SpendRequest {
    pub id: String,
    pub agent: Agent,
    pub amount: Amount,
    pub merchant: Merchant,
    pub purpose: String,
    /// When the host received it, ms since the Unix epoch: the policies' only clock.
    pub received_at_ms: u64,
    /// The mandate the spend is proposed under, as it stood when received.
    pub mandate: Option<RequestMandate>,
}

/// The mandate a spend is proposed under, as policies see it (contract 0.2.0
/// on; a 0.1.0 policy does not see it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RequestMandate {
    pub id: String,
    pub purpose: String,
    pub budget: Amount,
    /// The budget less captured amounts and open holds, before this spend.
    pub remaining: Amount,
    pub max_spends: Option<u32>,
    /// Spends made under it before this one.
    pub spend_count: u32,
    pub expires_at_ms: u64,
    pub created_by_operator: bool,
}

/// How a policy narrows the card: an allowing policy's, or the one an
/// approved escalation leads to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CardTerms {
    pub ttl_seconds: Option<u32>,
    pub max_amount: Option<Amount>,
}

impl CardTerms {
    /// The narrowest of two sets of terms: the shorter life, the lower cap.
    pub fn narrowest(self, other: CardTerms) -> CardTerms {
        let ttl_seconds = match (self.ttl_seconds, other.ttl_seconds) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let max_amount = match (self.max_amount, other.max_amount) {
            (Some(a), Some(b)) => Some(if a.units() <= b.units() { a } else { b }),
            (a, b) => a.or(b),
        };
        CardTerms { ttl_seconds, max_amount }
    }
}

/// One policy's decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow(CardTerms),
    Deny(String),
    /// Ask the operator; should they approve, the card gets `terms` (a 0.1.0
    /// policy's escalation has the default terms).
    RequireApproval {
        reason: String,
        terms: CardTerms,
    },
}

impl Decision {
    /// `allow`, `deny` or `require_approval`, as the CLI and the API print it.
    pub fn kind(&self) -> &'static str {
        match self {
            Decision::Allow(_) => "allow",
            Decision::Deny(_) => "deny",
            Decision::RequireApproval { .. } => "require_approval",
        }
    }

    pub fn reason(&self) -> Option<&str> {
        match self {
            Decision::Allow(_) => None,
            Decision::Deny(r) | Decision::RequireApproval { reason: r, .. } => Some(r),
        }
    }

    /// The card an allow leads to, or an escalation should it be approved.
    pub fn card_terms(&self) -> Option<&CardTerms> {
        match self {
            Decision::Allow(terms) | Decision::RequireApproval { terms, .. } => Some(terms),
            Decision::Deny(_) => None,
        }
    }
}

/// Which committed spend a policy's history query adds up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpendFilter {
    pub since_ms: u64,
    pub merchant_id: Option<String>,
    pub mcc: Option<String>,
    pub wallet_wide: bool,
    /// Only spends made under this mandate (contract 0.2.0 on).
    pub mandate_id: Option<String>,
}

/// The answer to a history query: units of the request's currency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpendSummary {
    pub total_units: i64,
    pub count: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_narrowest_terms_win() {
        let usd = |a: &str| Some(Amount::parse(a, "USD").unwrap());
        let a = CardTerms { ttl_seconds: Some(300), max_amount: usd("20.00") };
        let b = CardTerms { ttl_seconds: Some(600), max_amount: usd("15.00") };
        let c = CardTerms::default();
        let got = a.clone().narrowest(b).narrowest(c.clone());
        assert_eq!(got, CardTerms { ttl_seconds: Some(300), max_amount: usd("15.00") });
        assert_eq!(c.clone().narrowest(c.clone()), c);
        assert_eq!(CardTerms::default().narrowest(a.clone()), a);
    }
}

/// A log line's level, as the policy chose it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogLevel {
    Debug,
    Info,
    Warn,
}

/// A line a policy logged while it decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogLine {
    pub level: LogLevel,
    pub message: String,
}
