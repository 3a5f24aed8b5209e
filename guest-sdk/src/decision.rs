use crate::Money;

/// What a policy decides about one spend. Across all attached policies deny
/// wins over require-approval, which wins over allow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Allow, optionally narrowing the card the host will issue.
    Allow(CardTerms),
    /// Refuse, with a reason the agent and the operator will read.
    Deny(String),
    /// Hold the spend until an operator approves or denies it; should they
    /// approve, the card gets `terms` (narrowed like an allow's).
    RequireApproval {
        /// Why, for the operator who answers.
        reason: String,
        /// The card an approval leads to.
        terms: CardTerms,
    },
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

    /// Escalate to the operator, saying why. The card an approval leads to
    /// has the host's default terms unless narrowed with
    /// [`Decision::with_ttl_seconds`] or [`Decision::with_max_amount`]:
    ///
    /// ```
    /// # use spendguard_sdk::Decision;
    /// // Ask a human; if they agree, the card lives 5 minutes.
    /// let d = Decision::require_approval("above 100.00 USD").with_ttl_seconds(300);
    /// ```
    pub fn require_approval(reason: impl Into<String>) -> Self {
        Decision::RequireApproval { reason: reason.into(), terms: CardTerms::default() }
    }

    /// The card of an allow, or of an escalation should it be approved, lives
    /// at most `seconds`. A deny is unchanged.
    pub fn with_ttl_seconds(mut self, seconds: u32) -> Self {
        if let Decision::Allow(terms) | Decision::RequireApproval { terms, .. } = &mut self {
            terms.ttl_seconds = Some(seconds);
        }
        self
    }

    /// The card of an allow, or of an escalation should it be approved, is
    /// capped at `cap` (in the request's currency). A deny is unchanged.
    pub fn with_max_amount(mut self, cap: Money) -> Self {
        if let Decision::Allow(terms) | Decision::RequireApproval { terms, .. } = &mut self {
            terms.max_amount = Some(cap);
        }
        self
    }

    /// True for `Allow`, whatever its terms.
    pub fn is_allow(&self) -> bool {
        matches!(self, Decision::Allow(_))
    }

    /// The reason of a deny or require-approval.
    pub fn reason(&self) -> Option<&str> {
        match self {
            Decision::Allow(_) => None,
            Decision::Deny(reason) | Decision::RequireApproval { reason, .. } => Some(reason),
        }
    }

    /// The card terms of an allow or an escalation.
    pub fn card_terms(&self) -> Option<&CardTerms> {
        match self {
            Decision::Allow(terms) | Decision::RequireApproval { terms, .. } => Some(terms),
            Decision::Deny(_) => None,
        }
    }
}

/// How a policy narrows the card: an allow's, or the one an approved
/// escalation leads to. A policy can only narrow: the host issues the card
/// with the shortest life and the lowest cap that any policy set, and never
/// more than the requested amount.
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
