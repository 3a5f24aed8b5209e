//! Bindings for `spendguard:policy@0.2.0`, frozen with that contract: the request
//! carries the mandate, history filters by it, and an escalation carries the
//! terms of the card it leads to.

use wasmtime::Store;
use wasmtime::component::{HasSelf, Linker};

use super::LogLevel;
use super::guest::{GuestState, RawDecision, RawTerms};
use crate::policy as domain;

wasmtime::component::bindgen!({
    path: "../wit/v0.2.0/policy.wit",
    world: "spend-policy",
    imports: { default: trappable },
});

use self::spendguard::policy::{history, log, types};

/// The contract these bindings are for.
pub(super) const WORLD: &str = "spendguard:policy@0.2.0";

pub(super) fn add_to_linker(linker: &mut Linker<GuestState>) -> wasmtime::Result<()> {
    SpendPolicy::add_to_linker::<GuestState, HasSelf<GuestState>>(linker, |state| state)
}

fn money(amount: &crate::money::Amount) -> types::Money {
    types::Money { units: amount.units(), scale: amount.exponent(), currency: amount.currency().to_owned() }
}

fn raw_terms(terms: types::CardTerms) -> RawTerms {
    RawTerms {
        ttl_seconds: terms.ttl_seconds,
        max_amount: terms.max_amount.map(|m| (m.units, m.scale, m.currency)),
    }
}

/// Evaluate: the request with its mandate; an escalation with its terms.
pub(super) fn evaluate(
    pre: &SpendPolicyPre<GuestState>,
    store: &mut Store<GuestState>,
    request: &domain::SpendRequest,
    config: &str,
) -> wasmtime::Result<RawDecision> {
    let policy = pre.instantiate(&mut *store)?;
    let request = types::SpendRequest {
        id: request.id.clone(),
        agent: types::Agent {
            id: request.agent.id.clone(),
            name: request.agent.name.clone(),
            labels: request.agent.labels.clone(),
        },
        amount: money(&request.amount),
        merchant: types::Merchant {
            id: request.merchant.id.clone(),
            name: request.merchant.name.clone(),
            mcc: request.merchant.mcc.clone(),
            country: request.merchant.country.clone(),
        },
        purpose: request.purpose.clone(),
        received_at_ms: request.received_at_ms,
        mandate: request.mandate.as_ref().map(|m| types::Mandate {
            id: m.id.clone(),
            purpose: m.purpose.clone(),
            budget: money(&m.budget),
            remaining: money(&m.remaining),
            max_spends: m.max_spends,
            spend_count: m.spend_count,
            expires_at_ms: m.expires_at_ms,
            created_by_operator: m.created_by_operator,
        }),
    };
    Ok(match policy.call_evaluate(&mut *store, &request, config)? {
        types::Decision::Allow(terms) => RawDecision::Allow(raw_terms(terms)),
        types::Decision::Deny(reason) => RawDecision::Deny(reason),
        types::Decision::RequireApproval(types::Escalation { reason, terms }) => {
            RawDecision::RequireApproval { reason, terms: raw_terms(terms) }
        }
    })
}

pub(super) fn validate_config(
    pre: &SpendPolicyPre<GuestState>,
    store: &mut Store<GuestState>,
    config: &str,
) -> wasmtime::Result<Result<(), String>> {
    let policy = pre.instantiate(&mut *store)?;
    policy.call_validate_config(&mut *store, config)
}

impl types::Host for GuestState {}

impl history::Host for GuestState {
    fn summarize(&mut self, filter: types::SpendFilter) -> wasmtime::Result<types::SpendSummary> {
        let filter = domain::SpendFilter {
            since_ms: filter.since_ms,
            merchant_id: filter.merchant_id,
            mcc: filter.mcc,
            wallet_wide: filter.wallet_wide,
            mandate_id: filter.mandate_id,
        };
        let summary = GuestState::summarize(self, filter)?;
        Ok(types::SpendSummary {
            total: types::Money {
                units: summary.total_units,
                scale: self.exponent,
                currency: self.scope.currency.clone(),
            },
            count: summary.count,
        })
    }
}

impl log::Host for GuestState {
    fn log(&mut self, level: log::Level, message: String) -> wasmtime::Result<()> {
        let level = match level {
            log::Level::Debug => LogLevel::Debug,
            log::Level::Info => LogLevel::Info,
            log::Level::Warn => LogLevel::Warn,
        };
        GuestState::log(self, level, message)
    }
}
