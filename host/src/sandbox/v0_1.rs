//! Bindings for `spendguard:policy@0.1.0`, frozen with that contract. A new
//! WIT version gets a module of its own beside this one.

use wasmtime::Store;
use wasmtime::component::{HasSelf, Linker};

use super::{Fault, GuestState, LogLevel, LogLine};
use crate::policy as domain;

wasmtime::component::bindgen!({
    path: "../wit/v0.1.0/policy.wit",
    world: "spend-policy",
    imports: { default: trappable },
});

use self::spendguard::policy::{history, log, types};

pub(super) fn add_to_linker(linker: &mut Linker<GuestState>) -> wasmtime::Result<()> {
    SpendPolicy::add_to_linker::<GuestState, HasSelf<GuestState>>(linker, |state| state)
}

/// A decision as the guest returned it, before the host checks it.
pub(super) enum RawDecision {
    Allow { ttl_seconds: Option<u32>, max_amount: Option<(i64, u8, String)> },
    Deny(String),
    RequireApproval(String),
}

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
        amount: types::Money {
            units: request.amount.units(),
            scale: request.amount.exponent(),
            currency: request.amount.currency().to_owned(),
        },
        merchant: types::Merchant {
            id: request.merchant.id.clone(),
            name: request.merchant.name.clone(),
            mcc: request.merchant.mcc.clone(),
            country: request.merchant.country.clone(),
        },
        purpose: request.purpose.clone(),
        received_at_ms: request.received_at_ms,
    };
    Ok(match policy.call_evaluate(&mut *store, &request, config)? {
        types::Decision::Allow(terms) => RawDecision::Allow {
            ttl_seconds: terms.ttl_seconds,
            max_amount: terms.max_amount.map(|m| (m.units, m.scale, m.currency)),
        },
        types::Decision::Deny(reason) => RawDecision::Deny(reason),
        types::Decision::RequireApproval(reason) => RawDecision::RequireApproval(reason),
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
        self.history_calls += 1;
        if self.history_calls > self.limits.max_history_calls {
            return Err(self.fail(Fault::TooManyHistoryCalls));
        }
        for field in [&filter.merchant_id, &filter.mcc].into_iter().flatten() {
            if field.len() > self.limits.max_output_bytes {
                return Err(self.fail(Fault::OversizeOutput(format!(
                    "history filter field of {} bytes, over the cap of {}",
                    field.len(),
                    self.limits.max_output_bytes
                ))));
            }
        }
        let filter = domain::SpendFilter {
            since_ms: filter.since_ms,
            merchant_id: filter.merchant_id,
            mcc: filter.mcc,
            wallet_wide: filter.wallet_wide,
        };
        match self.history.summarize(&self.scope, &filter) {
            Ok(summary) => Ok(types::SpendSummary {
                total: types::Money {
                    units: summary.total_units,
                    scale: self.exponent,
                    currency: self.scope.currency.clone(),
                },
                count: summary.count,
            }),
            Err(e) => Err(self.fail(Fault::HostError(format!("history: {e}")))),
        }
    }
}

impl log::Host for GuestState {
    fn log(&mut self, level: log::Level, message: String) -> wasmtime::Result<()> {
        if self.logs.len() >= self.limits.max_log_lines {
            let max = self.limits.max_log_lines;
            return Err(self.fail(Fault::OversizeOutput(format!("more than {max} log lines"))));
        }
        if message.len() > self.limits.max_output_bytes {
            return Err(self.fail(Fault::OversizeOutput(format!(
                "log line of {} bytes, over the cap of {}",
                message.len(),
                self.limits.max_output_bytes
            ))));
        }
        let level = match level {
            log::Level::Debug => LogLevel::Debug,
            log::Level::Info => LogLevel::Info,
            log::Level::Warn => LogLevel::Warn,
        };
        self.logs.push(LogLine { level, message });
        Ok(())
    }
}
