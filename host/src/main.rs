//! The `spendguard` binary: parse the command line and dispatch. Each
//! subcommand lives in `cli/` as an args struct and one function.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(cli::EXIT_FAILURE)
        }
    }
}
