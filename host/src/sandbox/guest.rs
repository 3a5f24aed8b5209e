//! What every evaluation shares, whatever the contract version of its
//! policy: the state the host functions see, the host functions' bodies, the
//! check of a policy's decision, and the pool slots.

use std::sync::{Arc, Condvar, Mutex};

use wasmtime::{ResourceLimiter, Trap};

use super::{Fault, Limits, LogLevel, LogLine};
use crate::history::{History, HistoryScope};
use crate::money::Amount;
use crate::policy::{CardTerms, Decision, SpendFilter, SpendRequest, SpendSummary};

/// Card terms as the guest returned them, before the host checks them.
#[derive(Debug, Default)]
pub(super) struct RawTerms {
    pub ttl_seconds: Option<u32>,
    /// `(units, scale, currency)`.
    pub max_amount: Option<(i64, u8, String)>,
}

/// A decision as the guest returned it, in every contract version's terms
/// (a 0.1.0 escalation has default terms).
pub(super) enum RawDecision {
    Allow(RawTerms),
    Deny(String),
    RequireApproval { reason: String, terms: RawTerms },
}

/// A policy's own output, checked before the host trusts it.
pub(super) fn check_decision(
    decision: RawDecision,
    request: &SpendRequest,
    limits: &Limits,
) -> Result<Decision, Fault> {
    let oversize = |what: &str, len: usize| {
        Fault::OversizeOutput(format!("{what} of {len} bytes, over the cap of {}", limits.max_output_bytes))
    };
    match decision {
        RawDecision::Deny(r) if r.len() > limits.max_output_bytes => Err(oversize("reason", r.len())),
        RawDecision::Deny(r) => Ok(Decision::Deny(r)),
        RawDecision::RequireApproval { reason, .. } if reason.len() > limits.max_output_bytes => {
            Err(oversize("reason", reason.len()))
        }
        RawDecision::RequireApproval { reason, terms } => {
            Ok(Decision::RequireApproval { reason, terms: check_terms(terms, request)? })
        }
        RawDecision::Allow(terms) => Ok(Decision::Allow(check_terms(terms, request)?)),
    }
}

/// Terms a policy set: a life of at least a second, a cap in the request's
/// currency that is a valid amount of it.
fn check_terms(terms: RawTerms, request: &SpendRequest) -> Result<CardTerms, Fault> {
    let RawTerms { ttl_seconds, max_amount } = terms;
    if ttl_seconds == Some(0) {
        return Err(Fault::InvalidCardTerms("ttl-seconds must be at least 1".into()));
    }
    let max_amount = match max_amount {
        None => None,
        Some((units, scale, currency)) => {
            if currency != request.amount.currency() {
                return Err(Fault::InvalidCardTerms(format!(
                    "cap in `{}` for a spend in {}",
                    currency.chars().take(16).collect::<String>(),
                    request.amount.currency()
                )));
            }
            let cap = Amount::from_units_scale(units, scale, &currency)
                .map_err(|e| Fault::InvalidCardTerms(format!("max-amount: {e}")))?;
            Some(cap)
        }
    };
    Ok(CardTerms { ttl_seconds, max_amount })
}

/// Turn a trap or host error into the fault the operator should read.
pub(super) fn classify(err: wasmtime::Error, state: &GuestState) -> Fault {
    if let Some(fault) = &state.fault {
        return fault.clone();
    }
    match err.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => Fault::OutOfFuel,
        Some(Trap::Interrupt) => Fault::DeadlineExceeded,
        Some(Trap::StackOverflow) => Fault::StackOverflow,
        Some(_) | None if state.memory_refused => Fault::MemoryLimit,
        Some(Trap::UnreachableCodeReached) => match panic_message(&state.logs) {
            Some(message) => Fault::Panic(message.to_owned()),
            None => Fault::Trap("unreachable instruction executed".into()),
        },
        Some(Trap::MemoryOutOfBounds) => Fault::Trap(
            "out of bounds memory access (a policy that overflows its own Wasm stack ends here too)".into(),
        ),
        Some(trap) => Fault::Trap(trap.to_string().trim_start_matches("wasm trap: ").to_owned()),
        None => Fault::HostError(format!("{err:#}")),
    }
}

/// The SDK logs a panic's message as a warning just before the module traps.
fn panic_message(logs: &[LogLine]) -> Option<&str> {
    let last = logs.last()?;
    (last.level == LogLevel::Warn).then_some(())?;
    last.message.strip_prefix("panic: ")
}

/// A history that has nothing: `validate-config` runs without a request.
pub(super) struct NoHistory;

impl History for NoHistory {
    fn summarize(
        &self,
        _: &HistoryScope,
        _: &SpendFilter,
    ) -> Result<SpendSummary, crate::history::HistoryError> {
        Err(crate::history::HistoryError("no history while validating a config".into()))
    }
}

/// Per-evaluation state the host functions see.
pub(super) struct GuestState {
    pub history: Arc<dyn History>,
    pub scope: HistoryScope,
    pub exponent: u8,
    pub limits: Limits,
    pub history_calls: u32,
    pub logs: Vec<LogLine>,
    /// Set by a host function just before it traps, so the trap reports why.
    pub fault: Option<Fault>,
    /// A memory growth was refused: the trap that usually follows is the cap.
    pub memory_refused: bool,
}

impl GuestState {
    /// Record why a host function is about to trap, and make the trap.
    fn fail(&mut self, fault: Fault) -> wasmtime::Error {
        let err = wasmtime::Error::msg(fault.to_string());
        self.fault = Some(fault);
        err
    }

    /// `history.summarize`, whatever the version that asked: bounded in
    /// calls and in the size of the filter's strings.
    pub(super) fn summarize(&mut self, filter: SpendFilter) -> wasmtime::Result<SpendSummary> {
        self.history_calls += 1;
        if self.history_calls > self.limits.max_history_calls {
            return Err(self.fail(Fault::TooManyHistoryCalls));
        }
        for field in [&filter.merchant_id, &filter.mcc, &filter.mandate_id].into_iter().flatten() {
            if field.len() > self.limits.max_output_bytes {
                return Err(self.fail(Fault::OversizeOutput(format!(
                    "history filter field of {} bytes, over the cap of {}",
                    field.len(),
                    self.limits.max_output_bytes
                ))));
            }
        }
        match self.history.summarize(&self.scope, &filter) {
            Ok(summary) => Ok(summary),
            Err(e) => Err(self.fail(Fault::HostError(format!("history: {e}")))),
        }
    }

    /// `log.log`, whatever the version that asked: bounded in lines and size.
    pub(super) fn log(&mut self, level: LogLevel, message: String) -> wasmtime::Result<()> {
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
        self.logs.push(LogLine { level, message });
        Ok(())
    }
}

impl ResourceLimiter for GuestState {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.limits.max_memory_bytes {
            self.memory_refused = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

pub(super) const WASM_PAGE_BYTES: u64 = 64 * 1024;

/// Function-table entries per instance: Rust policies use a few hundred.
const MAX_TABLE_ELEMENTS: usize = 10_000;

/// Bounds how many evaluations hold a pool slot at once; a caller over the
/// bound waits instead of failing.
pub(super) struct Slots {
    free: Mutex<u32>,
    freed: Condvar,
}

pub(super) struct Slot<'a>(&'a Slots);

impl Slots {
    pub(super) fn new(n: u32) -> Self {
        Slots { free: Mutex::new(n), freed: Condvar::new() }
    }

    pub(super) fn acquire(&self) -> Slot<'_> {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        while *free == 0 {
            free = self.freed.wait(free).unwrap_or_else(|p| p.into_inner());
        }
        *free -= 1;
        Slot(self)
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut free = self.0.free.lock().unwrap_or_else(|p| p.into_inner());
        *free += 1;
        self.0.freed.notify_one();
    }
}
