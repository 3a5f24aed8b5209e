#![cfg_attr(target_arch = "wasm32", allow(dead_code))]
//! Unit-test a policy natively, with `cargo test` and a fake history.
//!
//! ```
//! use spendguard_sdk::testing::{request, PastSpend, TestHost, HOUR_MS};
//! # use spendguard_sdk::{Decision, Policy, NoConfig, SpendRequest, SpendFilter, history};
//! # struct Under100;
//! # impl Policy for Under100 {
//! #     type Config = NoConfig;
//! #     fn evaluate(r: &SpendRequest, _: &NoConfig) -> Decision {
//! #         let day = history::summarize(&SpendFilter::since_ms(r.received_at_ms - 24 * HOUR_MS));
//! #         if day.total.amount + r.amount.amount > 100.into() { Decision::deny("over") } else { Decision::allow() }
//! #     }
//! # }
//! let host = TestHost::with_history(vec![PastSpend::new("95.00", "USD", 0).hours_before_request(2)]);
//! let outcome = host.evaluate::<Under100>(&request("10.00", "USD"), "{}");
//! assert_eq!(outcome.decision, Decision::deny("over"));
//! ```
//!
//! The fake history answers [`crate::history::summarize`] exactly as the
//! host does: same currency as the request only, at or after `since_ms`,
//! merchant, category and mandate when the filter sets them, and other
//! agents' spends only for wallet-wide filters.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::str::FromStr;

use rust_decimal::Decimal;

use crate::bindings;
use crate::log::Level;
use crate::{Agent, Decision, Mandate, Merchant, Money, Policy, SpendFilter, SpendRequest, SpendSummary};

/// One hour in milliseconds.
pub const HOUR_MS: u64 = 3_600_000;
/// One day in milliseconds.
pub const DAY_MS: u64 = 24 * HOUR_MS;
/// When [`request`]'s proposal is received: 2026-11-24T12:00:00Z.
pub const DEFAULT_RECEIVED_AT_MS: u64 = 1_795_521_600_000;
/// The agent id of [`request`]'s proposal.
pub const DEFAULT_AGENT_ID: &str = "test-agent";

/// A committed spend in the fake history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PastSpend {
    /// How much was spent.
    pub amount: Money,
    /// At which merchant.
    pub merchant_id: String,
    /// The merchant's category code.
    pub mcc: String,
    /// When it was received, ms since the epoch.
    pub at_ms: u64,
    /// `None` for the requesting agent, `Some(id)` for another agent of the
    /// wallet (it counts only for wallet-wide filters).
    pub agent: Option<String>,
    /// The mandate it was made under, if any.
    pub mandate_id: Option<String>,
}

impl PastSpend {
    /// A spend by the requesting agent at `example.com` (category 5734).
    ///
    /// # Panics
    /// If `amount` is not a decimal number: this is a test helper.
    #[allow(clippy::panic)]
    pub fn new(amount: &str, currency: &str, at_ms: u64) -> Self {
        let amount =
            Decimal::from_str(amount).unwrap_or_else(|e| panic!("`{amount}` is not a decimal amount: {e}"));
        PastSpend {
            amount: Money::new(amount, currency),
            merchant_id: "example.com".into(),
            mcc: "5734".into(),
            at_ms,
            agent: None,
            mandate_id: None,
        }
    }

    /// Move it to `hours` before [`DEFAULT_RECEIVED_AT_MS`].
    pub fn hours_before_request(mut self, hours: u64) -> Self {
        self.at_ms = DEFAULT_RECEIVED_AT_MS - hours * HOUR_MS;
        self
    }

    /// At this merchant and category.
    pub fn at_merchant(mut self, merchant_id: &str, mcc: &str) -> Self {
        self.merchant_id = merchant_id.into();
        self.mcc = mcc.into();
        self
    }

    /// Made by another agent of the same wallet.
    pub fn by_agent(mut self, agent_id: &str) -> Self {
        self.agent = Some(agent_id.into());
        self
    }

    /// Made under this mandate.
    pub fn in_mandate(mut self, mandate_id: &str) -> Self {
        self.mandate_id = Some(mandate_id.into());
        self
    }
}

/// A mandate the operator created, with a budget of `budget` `currency` of
/// which nothing is spent yet, no count limit, ending an hour after
/// [`DEFAULT_RECEIVED_AT_MS`]. Change any field, then put it on a request:
///
/// ```
/// use spendguard_sdk::testing::{mandate, request};
/// let mut r = request("5.00", "USD");
/// r.mandate = Some(mandate("mdt_test", "20.00", "USD"));
/// assert!(r.mandate().is_some_and(|m| m.covers(&r.amount)));
/// ```
///
/// # Panics
/// If `budget` is not a decimal number: this is a test helper.
#[allow(clippy::panic)]
pub fn mandate(id: &str, budget: &str, currency: &str) -> Mandate {
    let budget =
        Decimal::from_str(budget).unwrap_or_else(|e| panic!("`{budget}` is not a decimal amount: {e}"));
    Mandate {
        id: id.into(),
        purpose: "a test task".into(),
        budget: Money::new(budget, currency),
        remaining: Money::new(budget, currency),
        max_spends: None,
        spend_count: 0,
        expires_at_ms: DEFAULT_RECEIVED_AT_MS + HOUR_MS,
        created_by_operator: true,
    }
}

/// A proposal of `amount` `currency` by [`DEFAULT_AGENT_ID`] at
/// `example.com`, received at [`DEFAULT_RECEIVED_AT_MS`]. Change any field
/// before evaluating.
///
/// # Panics
/// If `amount` is not a decimal number: this is a test helper.
#[allow(clippy::panic)]
pub fn request(amount: &str, currency: &str) -> SpendRequest {
    let amount =
        Decimal::from_str(amount).unwrap_or_else(|e| panic!("`{amount}` is not a decimal amount: {e}"));
    SpendRequest {
        id: "spend-test".into(),
        agent: Agent { id: DEFAULT_AGENT_ID.into(), name: "test agent".into(), labels: BTreeMap::new() },
        amount: Money::new(amount, currency),
        merchant: Merchant {
            id: "example.com".into(),
            name: "Example".into(),
            mcc: "5734".into(),
            country: "US".into(),
        },
        purpose: "a test purchase".into(),
        received_at_ms: DEFAULT_RECEIVED_AT_MS,
        mandate: None,
    }
}

/// What one evaluation decided and logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// What the policy decided (a config it refused is a deny).
    pub decision: Decision,
    /// The lines it logged, in order.
    pub logs: Vec<(Level, String)>,
    /// How many history queries the policy made.
    pub history_calls: u32,
}

/// A fake host: evaluates a policy natively against a fake history, through
/// the same config handling as the compiled module.
#[derive(Debug, Clone, Default)]
pub struct TestHost {
    history: Vec<PastSpend>,
}

impl TestHost {
    /// A host with an empty history.
    pub fn new() -> Self {
        TestHost::default()
    }

    /// A host whose history holds these committed spends.
    pub fn with_history(history: Vec<PastSpend>) -> Self {
        TestHost { history }
    }

    /// Evaluate `P` on `request` with `config` (a JSON document), as the
    /// host's `evaluate` call would.
    pub fn evaluate<P: Policy>(&self, request: &SpendRequest, config: &str) -> Outcome {
        let previous = CONTEXT.with(|c| {
            c.borrow_mut().replace(Context {
                agent_id: request.agent.id.clone(),
                currency: request.amount.currency.clone(),
                history: self.history.clone(),
                logs: Vec::new(),
                history_calls: 0,
            })
        });
        let decision = bindings::evaluate::<P>(request, config);
        let context = CONTEXT.with(|c| std::mem::replace(&mut *c.borrow_mut(), previous));
        let (logs, history_calls) = context.map(|c| (c.logs, c.history_calls)).unwrap_or_default();
        Outcome { decision, logs, history_calls }
    }

    /// `validate-config` of `P`, as the host calls it when the policy is
    /// attached.
    pub fn validate_config<P: Policy>(config: &str) -> Result<(), String> {
        bindings::validate_config::<P>(config)
    }
}

struct Context {
    agent_id: String,
    currency: String,
    history: Vec<PastSpend>,
    logs: Vec<(Level, String)>,
    history_calls: u32,
}

thread_local! {
    static CONTEXT: RefCell<Option<Context>> = const { RefCell::new(None) };
}

#[allow(clippy::panic)]
pub(crate) fn summarize(filter: &SpendFilter) -> SpendSummary {
    CONTEXT.with(|c| {
        let mut guard = c.borrow_mut();
        let Some(context) = guard.as_mut() else {
            panic!("history::summarize called outside TestHost::evaluate");
        };
        context.history_calls += 1;
        let mut total = Decimal::ZERO;
        let mut count = 0u32;
        for spend in &context.history {
            // The host's rule, from spendguard-types: the same spends count here.
            let query = spendguard_types::history::Query {
                currency: &context.currency,
                agent_id: &context.agent_id,
                since_ms: filter.since_ms,
                merchant_id: filter.merchant_id.as_deref(),
                mcc: filter.mcc.as_deref(),
                wallet_wide: filter.wallet_wide,
                mandate_id: filter.mandate_id.as_deref(),
            };
            let seen = spendguard_types::history::Spend {
                currency: &spend.amount.currency,
                at_ms: spend.at_ms,
                merchant_id: &spend.merchant_id,
                mcc: &spend.mcc,
                agent_id: spend.agent.as_deref(),
                mandate_id: spend.mandate_id.as_deref(),
            };
            if query.counts(&seen) {
                total += spend.amount.amount;
                count += 1;
            }
        }
        SpendSummary { total: Money::new(total, context.currency.clone()), count }
    })
}

pub(crate) fn record_log(level: Level, message: &str) {
    CONTEXT.with(|c| {
        if let Some(context) = c.borrow_mut().as_mut() {
            context.logs.push((level, message.to_owned()));
        }
    });
}
