//! `spendguard wallet show | deposit`: the wallet's balances, and money in.

use std::io::Write;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde::Deserialize;
use serde_json::json;

use super::client::{Client, ConnArgs, OutputArgs};
use super::input;
use super::render::{self, Table};

#[derive(Debug, Subcommand)]
pub enum WalletCommand {
    /// Balances per currency: available, held by open cards, spent.
    Show(ShowArgs),
    /// Add money to the wallet (operator).
    Deposit(DepositArgs),
}

pub fn run(cmd: WalletCommand, conn: &ConnArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    match cmd {
        WalletCommand::Show(args) => show(conn, args, out),
        WalletCommand::Deposit(args) => deposit(conn, args, out),
    }
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Args)]
pub struct DepositArgs {
    /// The amount, a decimal (`100.00`).
    amount: String,
    /// Its currency (`USD`, `EUR`, `USDC`…).
    currency: String,
    /// Makes a retry safe: the same key returns the first deposit instead of
    /// depositing twice.
    #[arg(long, value_name = "KEY")]
    idempotency_key: Option<String>,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Deserialize)]
struct Wallet {
    balances: Vec<Balance>,
}

#[derive(Debug, Deserialize)]
struct Balance {
    currency: String,
    available: String,
    held: String,
    spent: String,
}

#[derive(Debug, Deserialize)]
struct Deposit {
    id: String,
    amount: String,
    currency: String,
}

fn show(conn: &ConnArgs, args: ShowArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    let reply = Client::new(conn)?.get("/v1/wallet", &[])?;
    if args.output.json {
        return reply.print(out);
    }
    let wallet: Wallet = reply.parse()?;
    if wallet.balances.is_empty() {
        writeln!(out, "the wallet is empty: add money with `spendguard wallet deposit AMOUNT CURRENCY`")?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut table = Table::new(&["CURRENCY", "AVAILABLE", "HELD", "SPENT"]);
    for b in wallet.balances {
        table.row(vec![b.currency, b.available, b.held, b.spent]);
    }
    table.write(out)?;
    Ok(ExitCode::SUCCESS)
}

fn deposit(conn: &ConnArgs, args: DepositArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    let (amount, currency) = input::money(&args.amount, &args.currency)?;
    let body = json!({ "amount": amount, "currency": currency });
    let reply =
        Client::new(conn)?.post("/v1/wallet/deposits", Some(&body), args.idempotency_key.as_deref())?;
    if args.output.json {
        return reply.print(out);
    }
    let deposit: Deposit = reply.parse()?;
    writeln!(
        out,
        "deposited {}  {}",
        render::money(Some(&deposit.amount), Some(&deposit.currency)),
        deposit.id
    )?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::super::client::responder::{conn, serve_once, text};
    use super::*;

    fn output(json: bool) -> OutputArgs {
        OutputArgs { json }
    }

    #[test]
    fn deposit_posts_the_amount_as_typed() {
        let (url, request) = serve_once(201, r#"{"id":"dep_1","amount":"100.00","currency":"USD"}"#);
        let args = DepositArgs {
            amount: "100.00".into(),
            currency: "usd".into(),
            idempotency_key: Some("monthly-2026-11".into()),
            output: output(false),
        };
        let mut out = Vec::new();
        deposit(&conn(&url), args, &mut out).unwrap();
        let request = request.join().unwrap();
        assert_eq!((request.method.as_str(), request.target.as_str()), ("POST", "/v1/wallet/deposits"));
        assert_eq!(request.header("idempotency-key"), Some("monthly-2026-11"));
        assert_eq!(request.json(), json!({"amount": "100.00", "currency": "USD"}));
        assert_eq!(text(out), "deposited 100.00 USD  dep_1\n");
    }

    #[test]
    fn a_bad_amount_is_refused_before_sending() {
        let args = DepositArgs {
            amount: "1.005".into(),
            currency: "USD".into(),
            idempotency_key: None,
            output: output(false),
        };
        // Port 9 (discard) is never contacted: the check comes first.
        let err = deposit(&conn("http://127.0.0.1:9"), args, &mut Vec::new()).unwrap_err();
        assert!(err.downcast_ref::<super::super::UsageError>().is_some(), "{err}");
    }

    #[test]
    fn show_prints_a_table_or_the_json_as_sent() {
        let body = r#"{"balances":[{"currency":"USD","available":"90.00","held":"10.00","spent":"0.00"}]}"#;
        let (url, request) = serve_once(200, body);
        let mut out = Vec::new();
        show(&conn(&url), ShowArgs { output: output(false) }, &mut out).unwrap();
        let request = request.join().unwrap();
        assert_eq!((request.method.as_str(), request.target.as_str()), ("GET", "/v1/wallet"));
        assert_eq!(text(out), "CURRENCY  AVAILABLE  HELD   SPENT\nUSD       90.00      10.00  0.00\n");

        let (url, request) = serve_once(200, body);
        let mut out = Vec::new();
        show(&conn(&url), ShowArgs { output: output(true) }, &mut out).unwrap();
        request.join().unwrap();
        assert_eq!(text(out), format!("{body}\n"));
    }
}
