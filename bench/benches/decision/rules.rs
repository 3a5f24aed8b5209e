//! The rules under test, written once: each attached example policy with its
//! config, from which the Wasm config document, the Cedar policies and the
//! native check are all derived, so the three engines decide on the same
//! rules. Also the spend requests and the history they are decided on.

use std::sync::Arc;

use spendguard::decide::Tally;
use spendguard::history::{HistoryScope, PastSpend, StaticHistory};
use spendguard::money::{Amount, format_units};
use spendguard::policy::{Agent, CardTerms, Decision, Merchant, SpendFilter, SpendRequest};

/// 2026-11-24T12:00:00Z: when every request here is received.
pub const T0: u64 = 1_795_521_600_000;
pub const HOUR_MS: u64 = 3_600_000;
pub const DAY_MS: u64 = 24 * HOUR_MS;

/// The agent every request comes from.
pub const AGENT: &str = "agent-research";

/// One example policy attached with its config. Amounts are in units of
/// the currency (cents for USD), as the host holds them.
#[derive(Debug, Clone)]
pub enum Rule {
    /// `policies/spend-limit`.
    SpendLimit {
        limit: i64,
        currency: &'static str,
        /// As written in the config (`"24h"`), and in milliseconds.
        window: (&'static str, u64),
        merchant_id: Option<&'static str>,
        mcc: Option<&'static str>,
        wallet_wide: bool,
    },
    /// `policies/merchant-rules`.
    MerchantRules { allow_merchants: &'static [&'static str], block_mcc: &'static [&'static str] },
    /// `policies/approval-threshold`.
    ApprovalThreshold { threshold: i64, currency: &'static str },
    /// `policies/purchase-cap`, over-cap mode `deny` (the default): Cedar
    /// cannot narrow a card, so the `narrow` mode has no equivalent there.
    PurchaseCap { cap: i64, currency: &'static str, ttl_seconds: Option<u32> },
}

impl Rule {
    /// The example policy's package name.
    pub fn policy(&self) -> &'static str {
        match self {
            Rule::SpendLimit { .. } => "spend-limit",
            Rule::MerchantRules { .. } => "merchant-rules",
            Rule::ApprovalThreshold { .. } => "approval-threshold",
            Rule::PurchaseCap { .. } => "purchase-cap",
        }
    }

    /// The config document attached with the Wasm policy.
    pub fn config_json(&self) -> String {
        let money = |units: i64, currency: &str| {
            let exponent = spendguard::money::exponent(currency).unwrap_or(2);
            format_units(units, exponent)
        };
        let value = match self {
            Rule::SpendLimit { limit, currency, window, merchant_id, mcc, wallet_wide } => {
                let mut v = serde_json::json!({
                    "limit": money(*limit, currency),
                    "currency": currency,
                    "window": window.0,
                    "wallet_wide": wallet_wide,
                });
                if let Some(m) = merchant_id {
                    v["merchant_id"] = (*m).into();
                }
                if let Some(m) = mcc {
                    v["mcc"] = (*m).into();
                }
                v
            }
            Rule::MerchantRules { allow_merchants, block_mcc } => {
                serde_json::json!({ "allow_merchants": allow_merchants, "block_mcc": block_mcc })
            }
            Rule::ApprovalThreshold { threshold, currency } => {
                serde_json::json!({ "threshold": money(*threshold, currency), "currency": currency })
            }
            Rule::PurchaseCap { cap, currency, ttl_seconds } => {
                let mut v = serde_json::json!({ "cap": money(*cap, currency), "currency": currency });
                if let Some(ttl) = ttl_seconds {
                    v["ttl_seconds"] = (*ttl).into();
                }
                v
            }
        };
        value.to_string()
    }

    /// The history question a spend-limit rule asks for `request`.
    pub fn spend_filter(&self, request: &SpendRequest) -> Option<SpendFilter> {
        match self {
            Rule::SpendLimit { window, merchant_id, mcc, wallet_wide, .. } => Some(SpendFilter {
                since_ms: request.received_at_ms.saturating_sub(window.1),
                merchant_id: merchant_id.map(str::to_owned),
                mcc: mcc.map(str::to_owned),
                wallet_wide: *wallet_wide,
                mandate_id: None,
            }),
            _ => None,
        }
    }
}

/// One benchmarked case: policies attached to an agent.
#[derive(Debug, Clone)]
pub struct Case {
    pub name: &'static str,
    pub rules: Vec<Rule>,
}

/// Whole US dollars in cents.
const fn usd(dollars: i64) -> i64 {
    dollars * 100
}

const DAILY_LIMIT: Rule = Rule::SpendLimit {
    limit: usd(50),
    currency: "USD",
    window: ("24h", DAY_MS),
    merchant_id: None,
    mcc: None,
    wallet_wide: false,
};
const MERCHANT_RULES: Rule = Rule::MerchantRules {
    allow_merchants: &["api.openai.com", "*.anthropic.com", "acq-4471-0093", "aws.amazon.com"],
    block_mcc: &["7995", "6051", "4829"],
};
const APPROVAL: Rule = Rule::ApprovalThreshold { threshold: usd(100), currency: "USD" };
const PURCHASE_CAP: Rule = Rule::PurchaseCap { cap: usd(100), currency: "USD", ttl_seconds: Some(300) };

/// Each example policy alone, then 3 and 10 attached.
pub fn cases() -> Vec<Case> {
    let ten = vec![
        DAILY_LIMIT,
        MERCHANT_RULES,
        APPROVAL,
        PURCHASE_CAP,
        Rule::SpendLimit {
            limit: usd(300),
            currency: "USD",
            window: ("7d", 7 * DAY_MS),
            merchant_id: None,
            mcc: None,
            wallet_wide: true,
        },
        Rule::SpendLimit {
            limit: usd(40),
            currency: "USD",
            window: ("24h", DAY_MS),
            merchant_id: Some("api.openai.com"),
            mcc: None,
            wallet_wide: false,
        },
        Rule::SpendLimit {
            limit: usd(500),
            currency: "USD",
            window: ("30d", 30 * DAY_MS),
            merchant_id: None,
            mcc: Some("5734"),
            wallet_wide: false,
        },
        Rule::MerchantRules { allow_merchants: &[], block_mcc: &["5933", "7273", "7995"] },
        Rule::ApprovalThreshold { threshold: usd(250), currency: "USD" },
        Rule::PurchaseCap { cap: usd(60), currency: "USD", ttl_seconds: None },
    ];
    vec![
        Case { name: "spend-limit", rules: vec![DAILY_LIMIT] },
        Case { name: "merchant-rules", rules: vec![MERCHANT_RULES] },
        Case { name: "approval-threshold", rules: vec![APPROVAL] },
        Case { name: "purchase-cap", rules: vec![PURCHASE_CAP] },
        Case { name: "3 attached", rules: vec![DAILY_LIMIT, MERCHANT_RULES, APPROVAL] },
        Case { name: "10 attached", rules: ten },
    ]
}

/// A spend request as the daemon builds it for its policies.
pub fn request(amount: &str, currency: &str, merchant_id: &str, mcc: &str) -> anyhow::Result<SpendRequest> {
    Ok(SpendRequest {
        id: "spend-0193f2a4".into(),
        agent: Agent {
            id: AGENT.into(),
            name: "research assistant".into(),
            labels: vec![("team".into(), "research".into())],
        },
        amount: Amount::parse(amount, currency)?,
        merchant: Merchant {
            id: merchant_id.into(),
            name: merchant_id.into(),
            mcc: mcc.into(),
            country: "US".into(),
        },
        purpose: "API credits for the nightly evaluation run".into(),
        received_at_ms: T0,
        mandate: None,
    })
}

/// The request that is timed: allowed by every case, so every policy runs
/// to its end (and spend-limit asks history its question).
pub fn timed_request() -> anyhow::Result<SpendRequest> {
    request("10.00", "USD", "api.openai.com", "5734")
}

/// Requests on which the three engines must agree before anything is timed:
/// allows, denies and escalations of every rule, and the edges (exactly at
/// the limit, one cent over, a wildcard merchant, another currency).
pub fn agreement_requests() -> anyhow::Result<Vec<SpendRequest>> {
    Ok(vec![
        timed_request()?,
        request("15.00", "USD", "api.openai.com", "5734")?,
        request("15.01", "USD", "api.openai.com", "5734")?,
        request("20.00", "USD", "api.openai.com", "5734")?,
        request("5.00", "USD", "casino.example", "7995")?,
        request("5.00", "USD", "shop.example", "5999")?,
        request("3.00", "USD", "console.anthropic.com", "5734")?,
        request("150.00", "USD", "api.openai.com", "5734")?,
        request("90.00", "USD", "aws.amazon.com", "4816")?,
        request("10.00", "EUR", "api.openai.com", "5734")?,
        request("2.00", "USD", "acq-4471-0093", "5933")?,
    ])
}

/// The agent's committed spend: 35.00 USD of its own in the last 24 hours
/// (20.00 of it at api.openai.com), older and other agents' spend, and
/// spend in another currency that never counts for USD.
pub fn history() -> anyhow::Result<Arc<StaticHistory>> {
    let spend =
        |amount: &str, currency: &str, merchant: &str, mcc: &str, ago_ms: u64, agent: Option<&str>| {
            Ok::<_, anyhow::Error>(PastSpend {
                amount: Amount::parse(amount, currency)?,
                merchant_id: merchant.into(),
                mcc: mcc.into(),
                at_ms: T0 - ago_ms,
                agent: agent.map(str::to_owned),
                mandate_id: None,
            })
        };
    Ok(Arc::new(StaticHistory(vec![
        spend("12.00", "USD", "api.openai.com", "5734", HOUR_MS, None)?,
        spend("8.00", "USD", "api.openai.com", "5734", 5 * HOUR_MS, None)?,
        spend("15.00", "USD", "aws.amazon.com", "4816", 20 * HOUR_MS, None)?,
        spend("40.00", "EUR", "api.openai.com", "5734", 2 * HOUR_MS, None)?,
        spend("25.00", "USD", "api.openai.com", "5734", 3 * HOUR_MS, Some("agent-ops"))?,
        spend("30.00", "USD", "api.openai.com", "5734", 2 * DAY_MS, None)?,
        spend("18.50", "USD", "console.anthropic.com", "5734", 3 * DAY_MS, None)?,
        spend("60.00", "USD", "aws.amazon.com", "4816", 10 * DAY_MS, Some("agent-ops"))?,
        spend("9.99", "USD", "api.openai.com", "5734", 12 * DAY_MS, None)?,
        spend("42.00", "USD", "acq-4471-0093", "5933", 25 * DAY_MS, None)?,
        spend("7.25", "USD", "api.openai.com", "5734", 40 * DAY_MS, None)?,
        spend("100.00", "USD", "aws.amazon.com", "4816", 45 * DAY_MS, None)?,
    ])))
}

/// Whose history a request's questions are about, as the sandbox scopes it.
pub fn scope(request: &SpendRequest) -> HistoryScope {
    HistoryScope { agent_id: request.agent.id.clone(), currency: request.amount.currency().to_owned() }
}

/// The three outcomes, strictest last: combining attached policies keeps
/// the strictest (deny wins over require-approval, which wins over allow).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    Allow,
    RequireApproval,
    Deny,
}

impl Outcome {
    /// The outcome of the decisions tallied so far.
    pub fn of(tally: &Tally) -> Outcome {
        match tally.kind() {
            "deny" => Outcome::Deny,
            "require_approval" => Outcome::RequireApproval,
            _ => Outcome::Allow,
        }
    }
}

/// What the attached policies decided together, combined by the daemon's
/// own rule ([`Tally`]): every policy runs, deny wins, and the card gets the
/// narrowest terms any allowing policy or escalation set. The reasons are
/// left out: each engine words its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub outcome: Outcome,
    pub terms: CardTerms,
}

impl Verdict {
    /// Every decision, in order, combined.
    pub fn combine(decisions: impl IntoIterator<Item = Decision>) -> Verdict {
        let mut tally = Tally::default();
        for decision in decisions {
            tally.add(decision);
        }
        Verdict { outcome: Outcome::of(&tally), terms: tally.terms().clone() }
    }
}
