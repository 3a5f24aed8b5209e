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
            // Errors may quote what the daemon or a file said: no raw
            // control or direction characters reach the terminal.
            eprintln!("error: {}", cli::render::clean(&format!("{err:#}")));
            ExitCode::from(cli::EXIT_FAILURE)
        }
    }
}
