//! `spendguard network authorize`: play the card network, as a merchant's
//! charge would arrive at the issuer (network token).

use std::fmt;
use std::io::Write;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde::Deserialize;
use serde_json::{Value, json};

use super::client::{Client, ConnArgs, OutputArgs};
use super::{input, render};

#[derive(Debug, Subcommand)]
pub enum NetworkCommand {
    /// Charge a card: prints `approved` or `declined: CODE`, exit 0 either way.
    Authorize(AuthorizeArgs),
}

pub fn run(cmd: NetworkCommand, conn: &ConnArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    match cmd {
        NetworkCommand::Authorize(args) => authorize(conn, args, out),
    }
}

#[derive(Args)]
pub struct AuthorizeArgs {
    /// The card number (spaces allowed, as printed on a card).
    #[arg(long, value_name = "PAN")]
    pan: String,
    /// The card's security code.
    #[arg(long, value_name = "CVV")]
    cvv: String,
    /// Expiry month, 1–12.
    #[arg(long, value_name = "M", value_parser = clap::value_parser!(u8).range(1..=12))]
    exp_month: u8,
    /// Expiry year, four digits.
    #[arg(long, value_name = "YYYY", value_parser = clap::value_parser!(u16).range(2000..=9999))]
    exp_year: u16,
    /// The amount charged, a decimal (`9.99`).
    #[arg(long)]
    amount: String,
    /// Its currency (`USD`).
    #[arg(long)]
    currency: String,
    /// The charging merchant's id.
    #[arg(long, value_name = "ID", value_parser = input::not_blank)]
    merchant_id: String,
    /// Makes a retry safe: the same key gets the first answer, and the
    /// money moves once.
    #[arg(long, value_name = "KEY")]
    idempotency_key: Option<String>,
    #[command(flatten)]
    output: OutputArgs,
}

// Hand-written so that the PAN and CVV never reach a debug print.
impl fmt::Debug for AuthorizeArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthorizeArgs")
            .field("pan", &"<redacted>")
            .field("cvv", &"<redacted>")
            .field("amount", &self.amount)
            .field("currency", &self.currency)
            .field("merchant_id", &self.merchant_id)
            .field("idempotency_key", &self.idempotency_key)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Deserialize)]
struct Authorization {
    approved: bool,
    #[serde(default)]
    decline_code: Option<String>,
}

/// The body of `POST /v1/network/authorizations`.
fn request_body(args: &AuthorizeArgs) -> anyhow::Result<Value> {
    let (amount, currency) = input::money(&args.amount, &args.currency)?;
    let pan: String = args.pan.chars().filter(|c| !c.is_whitespace()).collect();
    Ok(json!({
        "pan": pan,
        "cvv": args.cvv.trim(),
        "exp_month": args.exp_month,
        "exp_year": args.exp_year,
        "amount": amount,
        "currency": currency,
        "merchant_id": args.merchant_id,
    }))
}

fn authorize(conn: &ConnArgs, args: AuthorizeArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    let body = request_body(&args)?;
    let reply = Client::new(conn)?.post(
        "/v1/network/authorizations",
        Some(&body),
        args.idempotency_key.as_deref(),
    )?;
    if args.output.json {
        return reply.print(out);
    }
    let answer: Authorization = reply.parse()?;
    if answer.approved {
        writeln!(out, "approved")?;
    } else {
        writeln!(
            out,
            "declined: {}",
            render::clean(answer.decline_code.as_deref().unwrap_or("unspecified"))
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::super::client::responder::{conn, serve_once, text};
    use super::*;

    fn args() -> AuthorizeArgs {
        AuthorizeArgs {
            pan: "4000 0012 3456 1234".into(),
            cvv: "321".into(),
            exp_month: 11,
            exp_year: 2026,
            amount: "9.99".into(),
            currency: "USD".into(),
            merchant_id: "api.openai.com".into(),
            idempotency_key: None,
            output: OutputArgs { json: false },
        }
    }

    #[test]
    fn authorize_sends_the_card_data_and_prints_the_answer() {
        let (url, request) = serve_once(200, r#"{"approved":true,"decline_code":null}"#);
        let mut out = Vec::new();
        let code = authorize(&conn(&url), args(), &mut out).unwrap();
        let request = request.join().unwrap();
        assert_eq!(request.target, "/v1/network/authorizations");
        assert_eq!(
            request.json(),
            json!({
                "pan": "4000001234561234", "cvv": "321", "exp_month": 11, "exp_year": 2026,
                "amount": "9.99", "currency": "USD", "merchant_id": "api.openai.com",
            })
        );
        assert_eq!((code, text(out)), (ExitCode::SUCCESS, "approved\n".to_owned()));
    }

    #[test]
    fn the_idempotency_key_is_sent_as_its_header() {
        let (url, request) = serve_once(200, r#"{"approved":true,"decline_code":null}"#);
        let mut out = Vec::new();
        let args = AuthorizeArgs { idempotency_key: Some("charge-7".into()), ..args() };
        authorize(&conn(&url), args, &mut out).unwrap();
        assert_eq!(request.join().unwrap().header("idempotency-key"), Some("charge-7"));
    }

    #[test]
    fn a_decline_is_not_a_failure() {
        let (url, request) = serve_once(200, r#"{"approved":false,"decline_code":"card_used"}"#);
        let mut out = Vec::new();
        let code = authorize(&conn(&url), args(), &mut out).unwrap();
        request.join().unwrap();
        assert_eq!((code, text(out)), (ExitCode::SUCCESS, "declined: card_used\n".to_owned()));
    }

    #[test]
    fn a_debug_print_hides_the_card() {
        let debug = format!("{:?}", args());
        assert!(!debug.contains("4000") && !debug.contains("321"), "{debug}");
    }
}
