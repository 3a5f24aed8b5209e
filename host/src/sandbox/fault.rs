//! What can go wrong: why a module is refused at load, why an evaluation
//! failed, and what a policy logged.

use std::fmt;

use serde::Serialize;

pub use crate::policy::{LogLevel, LogLine};

/// Why a module was refused at load.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    #[error("module is {size} bytes, over the limit of {max}")]
    TooLarge { size: usize, max: usize },
    #[error("not a WebAssembly module or component")]
    NotWasm,
    #[error("invalid WebAssembly: {0}")]
    Invalid(String),
    #[error(
        "imports `{0}`, which is outside the spendguard:policy world (policies may import only its history and log interfaces)"
    )]
    ForeignImport(String),
    #[error(
        "core module has no component type: build it with spendguard-sdk (wit-bindgen) for wasm32-unknown-unknown"
    )]
    NoComponentType,
    #[error("cannot turn the module into a component: {0}")]
    Componentize(String),
    #[error(
        "missing export `{0}`: a policy exports `validate-config` and `evaluate` (use spendguard_sdk::export_policy!)"
    )]
    MissingExport(String),
    #[error("exports do not match the spendguard:policy world of its contract version: {0}")]
    WrongExports(String),
    #[error("module needs {needs} bytes of memory at start, over the sandbox's limit of {max}")]
    MemoryTooLarge { needs: u64, max: usize },
    #[error("module does not fit the sandbox's limits: {0}")]
    OverLimits(String),
}

/// Why an evaluation failed. Each makes the spend deny.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "detail", rename_all = "snake_case")]
pub enum Fault {
    OutOfFuel,
    DeadlineExceeded,
    MemoryLimit,
    StackOverflow,
    Panic(String),
    Trap(String),
    OversizeOutput(String),
    TooManyHistoryCalls,
    InvalidCardTerms(String),
    HostError(String),
}

impl Fault {
    /// A stable snake_case name for metrics and scripts.
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::OutOfFuel => "out_of_fuel",
            Fault::DeadlineExceeded => "deadline_exceeded",
            Fault::MemoryLimit => "memory_limit",
            Fault::StackOverflow => "stack_overflow",
            Fault::Panic(_) => "panic",
            Fault::Trap(_) => "trap",
            Fault::OversizeOutput(_) => "oversize_output",
            Fault::TooManyHistoryCalls => "too_many_history_calls",
            Fault::InvalidCardTerms(_) => "invalid_card_terms",
            Fault::HostError(_) => "host_error",
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::OutOfFuel => f.write_str("out of fuel"),
            Fault::DeadlineExceeded => f.write_str("deadline exceeded"),
            Fault::MemoryLimit => f.write_str("memory limit"),
            Fault::StackOverflow => f.write_str("stack overflow"),
            Fault::Panic(m) => write!(f, "panic: {m}"),
            Fault::Trap(m) => write!(f, "trap: {m}"),
            Fault::OversizeOutput(m) => write!(f, "oversize output: {m}"),
            Fault::TooManyHistoryCalls => f.write_str("too many history calls"),
            Fault::InvalidCardTerms(m) => write!(f, "invalid card terms: {m}"),
            Fault::HostError(m) => write!(f, "host error: {m}"),
        }
    }
}

/// The deny reason for a fault of policy `name`.
pub fn fault_reason(name: &str, fault: &Fault) -> String {
    format!("policy `{name}` failed: {fault}")
}
