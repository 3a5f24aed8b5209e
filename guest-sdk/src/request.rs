use std::collections::BTreeMap;

use rust_decimal::Decimal;

/// An exact amount of money. Never a float: `amount` is a decimal with the
/// currency's precision (12.50 USD has two decimals, 1000 JPY none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Money {
    /// The exact amount, with the currency's precision.
    pub amount: Decimal,
    /// ISO 4217 code or token ticker, upper case ("USD", "EUR", "USDC").
    pub currency: String,
}

impl Money {
    /// `Money::new(dec!(12.50), "USD")`.
    pub fn new(amount: Decimal, currency: impl Into<String>) -> Self {
        Money { amount, currency: currency.into() }
    }
}

impl std::fmt::Display for Money {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.amount, self.currency)
    }
}

/// Where the money would go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Merchant {
    /// Stable merchant id: the acquirer's merchant id or the site's domain.
    pub id: String,
    /// The merchant's display name.
    pub name: String,
    /// ISO 18245 merchant category code, four digits ("5734").
    pub mcc: String,
    /// ISO 3166-1 alpha-2 country ("US"), empty when unknown.
    pub country: String,
}

/// The agent that proposed the spend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agent {
    /// The agent's id, stable for its life.
    pub id: String,
    /// The name the operator gave it.
    pub name: String,
    /// The operator's labels on the agent (`team = research`).
    pub labels: BTreeMap<String, String>,
}

impl Agent {
    /// The value of one label, if the operator set it.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.get(key).map(String::as_str)
    }
}

/// One proposed spend, as the host received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpendRequest {
    /// The id the host gave this proposal.
    pub id: String,
    /// Who proposes the spend.
    pub agent: Agent,
    /// How much, in which currency.
    pub amount: Money,
    /// Where the money would go.
    pub merchant: Merchant,
    /// The agent's own words: what it buys and why.
    pub purpose: String,
    /// When the host received the proposal, in ms since the Unix epoch (UTC).
    /// The only clock a policy sees, so evaluation is deterministic: measure
    /// windows back from here, never from a system clock.
    pub received_at_ms: u64,
    /// The mandate the agent proposes this spend under, if it names one. See
    /// [`SpendRequest::mandate`].
    pub mandate: Option<Mandate>,
}

impl SpendRequest {
    /// The mandate the agent proposes this spend under, if it names one: a
    /// task-scoped grant ("up to 20.00 USD at these merchants, for the next
    /// hour"). The host has already checked the spend against it (the
    /// agent's own, active, unexpired, merchant and category in scope, amount
    /// within `remaining`, count under `max_spends`); a policy decides what
    /// the mandate means for its own rules.
    pub fn mandate(&self) -> Option<&Mandate> {
        self.mandate.as_ref()
    }
}

/// A task-scoped grant of spend authority, as it stood when the spend was
/// received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mandate {
    /// The mandate's id.
    pub id: String,
    /// What the task is, in the words of whoever created the mandate.
    pub purpose: String,
    /// The whole budget.
    pub budget: Money,
    /// The budget less captured amounts and the holds of open cards of the
    /// mandate's spends, before this spend.
    pub remaining: Money,
    /// At most this many spends, when set.
    pub max_spends: Option<u32>,
    /// Spends already made under it, before this one.
    pub spend_count: u32,
    /// When it ends, ms since the Unix epoch (UTC).
    pub expires_at_ms: u64,
    /// The operator created it; `false` when the agent requested it and the
    /// operator approved the request.
    pub created_by_operator: bool,
}

impl Mandate {
    /// Whether `amount` fits in what is left of the budget (same currency,
    /// at most `remaining`).
    pub fn covers(&self, amount: &Money) -> bool {
        amount.currency == self.remaining.currency && amount.amount <= self.remaining.amount
    }
}
