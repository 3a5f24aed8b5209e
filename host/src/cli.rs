//! Command-line interface.

mod policy;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use spendguard::sandbox::Limits;

/// Something failed (a refused module, an unreadable file).
pub const EXIT_FAILURE: u8 = 1;
/// The input itself is invalid (`policy test`).
pub const EXIT_INVALID_INPUT: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "spendguard",
    version,
    about = "Let AI agents spend money safely"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Work with policy modules offline: check, evaluate, test.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Policy(cmd) => policy::run(cmd),
    }
}

/// Sandbox limits, each defaulting to the documented default.
#[derive(Debug, Clone, Args)]
pub struct LimitArgs {
    /// Instructions (fuel) per evaluation.
    #[arg(long, value_name = "N")]
    fuel: Option<u64>,
    /// Wall-clock deadline per evaluation, in milliseconds.
    #[arg(long, value_name = "MS")]
    deadline_ms: Option<u64>,
    /// Linear memory per instance, in bytes.
    #[arg(long, value_name = "BYTES")]
    max_memory_bytes: Option<usize>,
    /// Native stack the policy's Wasm may use, in bytes.
    #[arg(long, value_name = "BYTES")]
    max_stack_bytes: Option<usize>,
    /// Largest reason, config error or log line, in bytes.
    #[arg(long, value_name = "BYTES")]
    max_output_bytes: Option<usize>,
    /// Log lines per evaluation.
    #[arg(long, value_name = "N")]
    max_log_lines: Option<usize>,
    /// History queries per evaluation.
    #[arg(long, value_name = "N")]
    max_history_calls: Option<u32>,
    /// Largest module accepted, in bytes.
    #[arg(long, value_name = "BYTES")]
    max_module_bytes: Option<usize>,
}

impl LimitArgs {
    pub fn limits(&self) -> Limits {
        let mut l = Limits::default();
        if let Some(v) = self.fuel {
            l.fuel = v;
        }
        if let Some(v) = self.deadline_ms {
            l.deadline = std::time::Duration::from_millis(v);
        }
        if let Some(v) = self.max_memory_bytes {
            l.max_memory_bytes = v;
        }
        if let Some(v) = self.max_stack_bytes {
            l.max_stack_bytes = v;
        }
        if let Some(v) = self.max_output_bytes {
            l.max_output_bytes = v;
        }
        if let Some(v) = self.max_log_lines {
            l.max_log_lines = v;
        }
        if let Some(v) = self.max_history_calls {
            l.max_history_calls = v;
        }
        if let Some(v) = self.max_module_bytes {
            l.max_module_bytes = v;
        }
        // Offline tools evaluate one policy at a time.
        l.max_concurrent = 4;
        l
    }
}
