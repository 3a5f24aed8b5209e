use crate::Money;

/// What a policy decides about one spend. Across all attached policies deny
/// wins over require-approval, which wins over allow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Allow, optionally narrowing the card the host will issue.
    Allow(CardTerms),
    /// Refuse, with a reason the agent and the operator will read.
    Deny(String),
    /// Hold the spend until an operator approves or denies it.
    RequireApproval(String),
}

impl Decision {
    /// Allow with the host's default card terms.
    pub fn allow() -> Self {
        Decision::Allow(CardTerms::default())
    }

    /// Refuse, saying why.
    pub fn deny(reason: impl Into<String>) -> Self {
        Decision::Deny(reason.into())
    }

    /// Escalate to the operator, saying why.
    pub fn require_approval(reason: impl Into<String>) -> Self {
        Decision::RequireApproval(reason.into())
    }

    /// True for `Allow`, whatever its terms.
    pub fn is_allow(&self) -> bool {
        matches!(self, Decision::Allow(_))
    }

    /// The reason of a deny or require-approval.
    pub fn reason(&self) -> Option<&str> {
        match self {
            Decision::Allow(_) => None,
            Decision::Deny(reason) | Decision::RequireApproval(reason) => Some(reason),
        }
    }
}

/// How an allowing policy narrows the card. A policy can only narrow: the
/// host issues the card with the shortest life and the lowest cap that any
/// allowing policy set, and never more than the requested amount.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CardTerms {
    /// A shorter life than the host's default (15 minutes), in seconds.
    pub ttl_seconds: Option<u32>,
    /// A lower cap than the requested amount, in the request's currency. A
    /// cap with more decimals than the currency has is rounded down.
    pub max_amount: Option<Money>,
}

impl CardTerms {
    /// Card terms with a shorter life.
    pub fn ttl_seconds(mut self, seconds: u32) -> Self {
        self.ttl_seconds = Some(seconds);
        self
    }

    /// Card terms with a lower cap.
    pub fn max_amount(mut self, cap: Money) -> Self {
        self.max_amount = Some(cap);
        self
    }
}
