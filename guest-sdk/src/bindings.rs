//! The generated WIT bindings and the bridge between them and the SDK's
//! idiomatic types. Nothing here is for policy authors: `export_policy!`
//! expands to code that calls into this module.

use std::collections::BTreeMap;

use rust_decimal::{Decimal, RoundingStrategy};

use crate as sdk;
use crate::{Agent, CardTerms, Mandate, Merchant, Money, Policy};

wit_bindgen::generate!({
    path: "../wit/v0.2.0",
    world: "spend-policy",
    runtime_path: "::spendguard_sdk::__private::wit_bindgen::rt",
    default_bindings_module: "::spendguard_sdk::__private::bindings",
    export_macro_name: "__export_spend_policy",
    pub_export_macro: true,
});

pub use spendguard::policy::types as wit;

/// `validate-config` for policy `P`: the config must deserialize into
/// `P::Config` and pass `P::check_config`.
pub fn validate_config<P: Policy>(config: &str) -> Result<(), String> {
    parse_config::<P>(config).map(|_| ())
}

fn parse_config<P: Policy>(config: &str) -> Result<P::Config, String> {
    let parsed: P::Config = serde_json::from_str(config).map_err(|e| format!("invalid config: {e}"))?;
    P::check_config(&parsed)?;
    Ok(parsed)
}

/// `evaluate` for policy `P`, on SDK types. A config that does not parse
/// denies: the host validates configs when they are attached, so this only
/// happens when something upstream went wrong, and failing closed is right.
pub fn evaluate<P: Policy>(request: &sdk::SpendRequest, config: &str) -> sdk::Decision {
    match parse_config::<P>(config) {
        Ok(config) => P::evaluate(request, &config),
        Err(message) => sdk::Decision::Deny(message),
    }
}

/// The WIT entry point: convert, evaluate, convert back.
pub fn evaluate_wit<P: Policy>(request: wit::SpendRequest, config: String) -> wit::Decision {
    install_panic_hook();
    let scale = request.amount.scale;
    let request = match sdk::SpendRequest::try_from(request) {
        Ok(request) => request,
        Err(message) => return wit::Decision::Deny(message),
    };
    decision_to_wit(evaluate::<P>(&request, &config), scale)
}

pub fn validate_config_wit<P: Policy>(config: String) -> Result<(), String> {
    install_panic_hook();
    validate_config::<P>(&config)
}

/// Route a panic's message into the audit log before the module traps, so the
/// operator sees why a policy failed rather than only "unreachable".
fn install_panic_hook() {
    #[cfg(target_arch = "wasm32")]
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload_as_str().unwrap_or("(no message)");
        let mut message = match info.location() {
            Some(at) => format!("panic: {payload} (at {}:{})", at.file(), at.line()),
            None => format!("panic: {payload}"),
        };
        if message.len() > crate::log::PANIC_MESSAGE_MAX {
            let mut end = crate::log::PANIC_MESSAGE_MAX;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        spendguard::policy::log::log(spendguard::policy::log::Level::Warn, &message);
    }));
}

impl TryFrom<wit::Money> for Money {
    type Error = String;
    fn try_from(m: wit::Money) -> Result<Self, String> {
        let amount = Decimal::try_from_i128_with_scale(i128::from(m.units), u32::from(m.scale))
            .map_err(|e| format!("invalid amount from host: {e}"))?;
        Ok(Money { amount, currency: m.currency })
    }
}

impl TryFrom<wit::SpendRequest> for sdk::SpendRequest {
    type Error = String;
    fn try_from(r: wit::SpendRequest) -> Result<Self, String> {
        Ok(sdk::SpendRequest {
            id: r.id,
            agent: Agent {
                id: r.agent.id,
                name: r.agent.name,
                labels: r.agent.labels.into_iter().collect::<BTreeMap<_, _>>(),
            },
            amount: Money::try_from(r.amount)?,
            merchant: Merchant {
                id: r.merchant.id,
                name: r.merchant.name,
                mcc: r.merchant.mcc,
                country: r.merchant.country,
            },
            purpose: r.purpose,
            received_at_ms: r.received_at_ms,
            mandate: match r.mandate {
                None => None,
                Some(m) => Some(Mandate {
                    id: m.id,
                    purpose: m.purpose,
                    budget: Money::try_from(m.budget)?,
                    remaining: Money::try_from(m.remaining)?,
                    max_spends: m.max_spends,
                    spend_count: m.spend_count,
                    expires_at_ms: m.expires_at_ms,
                    created_by_operator: m.created_by_operator,
                }),
            },
        })
    }
}

/// Amounts leave the guest with at most the request's scale: a cap with more
/// decimals is rounded toward zero, which only ever narrows the card.
pub(crate) fn money_to_wit(money: &Money, max_scale: u8) -> Option<wit::Money> {
    let mut amount = money.amount;
    if amount.scale() > u32::from(max_scale) {
        amount = amount.round_dp_with_strategy(u32::from(max_scale), RoundingStrategy::ToZero);
    }
    let units = i64::try_from(amount.mantissa()).ok()?;
    let scale = u8::try_from(amount.scale()).ok()?;
    Some(wit::Money { units, scale, currency: money.currency.clone() })
}

fn terms_to_wit(terms: CardTerms, scale: u8) -> Result<wit::CardTerms, String> {
    let CardTerms { ttl_seconds, max_amount } = terms;
    let max_amount = match max_amount {
        None => None,
        Some(cap) => match money_to_wit(&cap, scale) {
            Some(cap) => Some(cap),
            None => return Err(format!("card cap {} {} cannot be represented", cap.amount, cap.currency)),
        },
    };
    Ok(wit::CardTerms { ttl_seconds, max_amount })
}

fn decision_to_wit(decision: sdk::Decision, scale: u8) -> wit::Decision {
    match decision {
        sdk::Decision::Allow(terms) => match terms_to_wit(terms, scale) {
            Ok(terms) => wit::Decision::Allow(terms),
            Err(message) => wit::Decision::Deny(message),
        },
        sdk::Decision::Deny(reason) => wit::Decision::Deny(reason),
        sdk::Decision::RequireApproval { reason, terms } => match terms_to_wit(terms, scale) {
            Ok(terms) => wit::Decision::RequireApproval(wit::Escalation { reason, terms }),
            Err(message) => wit::Decision::Deny(message),
        },
    }
}
