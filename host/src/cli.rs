//! Command-line interface.

mod agent;
mod approval;
mod audit;
mod card;
mod client;
mod daemon;
mod input;
mod mandate;
mod network;
mod policy;
pub(crate) mod render;
mod spend;
mod token;
mod wallet;

use std::io::Write;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use spendguard::sandbox::Limits;

/// Something failed (a refused module, an unreadable file, a request the
/// daemon refused or a daemon that cannot be reached).
pub const EXIT_FAILURE: u8 = 1;
/// The input itself is invalid (`policy test`, a bad command line).
pub const EXIT_INVALID_INPUT: u8 = 2;

/// A mistake on the command line that clap cannot see (an amount with too
/// many decimals, more `--config` files than `--policy` names, a daemon URL
/// that is not http): exit 2, like clap's own.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

#[derive(Debug, Parser)]
#[command(name = "spendguard", version, about = "Let AI agents spend money safely")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    conn: client::ConnArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a data directory (database, card key) and print the operator
    /// and network tokens, once.
    Init(daemon::InitArgs),
    /// Run the daemon.
    Serve(daemon::ServeArgs),
    /// Tokens: list, make and revoke them; or mint one on the data directory.
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// Policy modules: check, evaluate and test offline; upload to the daemon and list.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// The wallet: balances and deposits.
    #[command(subcommand)]
    Wallet(wallet::WalletCommand),
    /// Agents: create them (printing their token once), attach policies, revoke.
    #[command(subcommand)]
    Agent(agent::AgentCommand),
    /// Spends: propose one (with an agent token), show, list.
    #[command(subcommand)]
    Spend(spend::SpendCommand),
    /// Mandates: task-scoped spend authority for an agent (a budget,
    /// merchants, a count, an end): create, request, list, show, approve,
    /// deny, revoke.
    #[command(subcommand)]
    Mandate(mandate::MandateCommand),
    /// Spends waiting for a human: list, approve, deny.
    #[command(subcommand)]
    Approval(approval::ApprovalCommand),
    /// Single-use cards: list, void.
    #[command(subcommand)]
    Card(card::CardCommand),
    /// The hash-chained audit trail: list records, verify the chain.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Act as the card network: authorize a merchant's charge (network token).
    #[command(subcommand)]
    Network(network::NetworkCommand),
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let mut stdout = std::io::stdout().lock();
    let out: &mut dyn Write = &mut stdout;
    let conn = &cli.conn;
    let result = match cli.command {
        Command::Init(args) => daemon::init(args),
        Command::Serve(args) => daemon::serve(args),
        Command::Token(cmd) => token::run(cmd, conn, out),
        Command::Policy(cmd) => policy::run(cmd, conn, out),
        Command::Wallet(cmd) => wallet::run(cmd, conn, out),
        Command::Agent(cmd) => agent::run(cmd, conn, out),
        Command::Spend(cmd) => spend::run(cmd, conn, out),
        Command::Mandate(cmd) => mandate::run(cmd, conn, out),
        Command::Approval(cmd) => approval::run(cmd, conn, out),
        Command::Card(cmd) => card::run(cmd, conn, out),
        Command::Audit(cmd) => audit::run(cmd, conn, out),
        Command::Network(cmd) => network::run(cmd, conn, out),
    };
    match result {
        Err(err) => match err.downcast::<UsageError>() {
            Ok(usage) => {
                eprintln!("error: {}", render::clean(&usage.to_string()));
                Ok(ExitCode::from(EXIT_INVALID_INPUT))
            }
            Err(err) => Err(err),
        },
        ok => ok,
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
    /// The defaults with the flags given.
    pub fn limits(&self) -> Limits {
        let mut l = self.apply(Limits::default());
        // Offline tools evaluate one policy at a time.
        l.max_concurrent = 4;
        l
    }

    /// `base` with the flags given.
    pub fn apply(&self, base: Limits) -> Limits {
        let mut l = base;
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
        l
    }
}
