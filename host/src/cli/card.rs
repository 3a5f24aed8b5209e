//! `spendguard card list | void`: the single-use cards, and closing one early.

use std::fmt;
use std::io::Write;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde::Deserialize;

use super::client::{self, Client, ConnArgs, OutputArgs};
use super::render::{self, Table};

#[derive(Debug, Subcommand)]
pub enum CardCommand {
    /// Cards with their state: every card (operator) or your own (agent).
    List(ListArgs),
    /// Close an open card before it is used; its hold goes back to the wallet (operator).
    Void(VoidArgs),
}

pub fn run(cmd: CardCommand, conn: &ConnArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    match cmd {
        CardCommand::List(args) => list(conn, args, out),
        CardCommand::Void(args) => void(conn, args, out),
    }
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Args)]
pub struct VoidArgs {
    /// The card's id (`spendguard card list`).
    id: String,
    #[command(flatten)]
    output: OutputArgs,
}

/// A card as the daemon shows it: in a list, with a spend, or once, to the
/// agent that proposed the spend, with its PAN and CVV.
#[derive(Deserialize)]
pub struct Card {
    pub id: String,
    #[serde(default)]
    pub pan: Option<String>,
    #[serde(default)]
    pub cvv: Option<String>,
    #[serde(default)]
    pub last4: Option<String>,
    #[serde(default)]
    pub exp_month: Option<u8>,
    #[serde(default)]
    pub exp_year: Option<u16>,
    #[serde(default)]
    pub limit: Option<String>,
    #[serde(default)]
    pub currency: Option<String>,
    #[serde(default)]
    pub merchant_id: Option<String>,
    #[serde(default)]
    pub expires_at: Option<String>,
    #[serde(default)]
    pub spend_id: Option<String>,
    #[serde(default)]
    pub agent_id: Option<String>,
    #[serde(default)]
    pub state: Option<String>,
    /// What the merchant charged, once the card is used.
    #[serde(default)]
    pub captured: Option<String>,
    /// Instead of the PAN and CVV when a proposal is replayed: where they were shown.
    #[serde(default)]
    pub secrets: Option<String>,
}

// Hand-written so that the PAN and CVV never reach a debug print.
impl fmt::Debug for Card {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Card")
            .field("id", &self.id)
            .field("pan", &self.pan.as_ref().map(|_| "<redacted>"))
            .field("cvv", &self.cvv.as_ref().map(|_| "<redacted>"))
            .field("last4", &self.last4)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Card {
    /// The number as a receipt shows it: range and last four from the PAN
    /// when the daemon sent it, otherwise the last four only.
    pub fn masked(&self) -> String {
        match (&self.pan, &self.last4) {
            (Some(pan), _) => render::masked_pan(pan),
            (None, Some(last4)) => render::masked_last4(last4),
            (None, None) => "••••".to_owned(),
        }
    }

    /// `11/2026`.
    pub fn expiry(&self) -> String {
        match (self.exp_month, self.exp_year) {
            (Some(month), Some(year)) => format!("{month:02}/{year}"),
            _ => render::MISSING.to_owned(),
        }
    }

    pub fn limit(&self) -> String {
        render::money(self.limit.as_deref(), self.currency.as_deref())
    }

    /// `card_… 4000 00•• •••• 1234 exp 11/2026 limit 10.00 USD`, leaving out
    /// what the daemon did not send.
    pub fn summary(&self) -> String {
        let mut parts = vec![self.id.clone()];
        if self.pan.is_some() || self.last4.is_some() {
            parts.push(self.masked());
        }
        if self.exp_month.is_some() && self.exp_year.is_some() {
            parts.push(format!("exp {}", self.expiry()));
        }
        if self.limit.is_some() {
            parts.push(format!("limit {}", self.limit()));
        }
        parts.join(" ")
    }
}

#[derive(Debug, Deserialize)]
struct Cards {
    cards: Vec<Card>,
}

fn list(conn: &ConnArgs, args: ListArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    let reply = Client::new(conn)?.get("/v1/cards", &[])?;
    if args.output.json {
        return reply.print(out);
    }
    let cards: Cards = reply.parse()?;
    if cards.cards.is_empty() {
        writeln!(out, "no cards")?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut table = Table::new(&[
        "ID", "STATE", "CARD", "EXP", "LIMIT", "CAPTURED", "MERCHANT", "SPEND", "AGENT", "EXPIRES",
    ]);
    for card in &cards.cards {
        table.row(vec![
            card.id.clone(),
            render::or_missing(card.state.as_deref()),
            card.masked(),
            card.expiry(),
            card.limit(),
            card.captured.as_deref().map_or_else(
                || render::MISSING.to_owned(),
                |captured| render::money(Some(captured), card.currency.as_deref()),
            ),
            render::or_missing(card.merchant_id.as_deref()),
            render::or_missing(card.spend_id.as_deref()),
            render::or_missing(card.agent_id.as_deref()),
            render::or_missing(card.expires_at.as_deref()),
        ]);
    }
    table.write(out)?;
    Ok(ExitCode::SUCCESS)
}

fn void(conn: &ConnArgs, args: VoidArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    let path = format!("/v1/cards/{}/void", client::segment(&args.id));
    let reply = Client::new(conn)?.post(&path, None, None)?;
    if args.output.json {
        return reply.print(out);
    }
    let card: Card = reply.parse()?;
    writeln!(
        out,
        "{}  {}",
        render::clean(&render::or_missing(card.state.as_deref())),
        render::clean(&card.summary())
    )?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::super::client::responder::{conn, serve_once, text};
    use super::*;

    #[test]
    fn void_posts_to_the_card_and_prints_its_new_state() {
        let (url, request) = serve_once(
            200,
            r#"{"id":"card_1","spend_id":"sp_1","agent_id":"ag_1","last4":"1234","exp_month":3,
                "exp_year":2027,"limit":"10.00","currency":"USD","merchant_id":"api.openai.com",
                "expires_at":"2026-11-24T12:15:00Z","state":"voided"}"#,
        );
        let args = VoidArgs { id: "card_1".into(), output: OutputArgs { json: false } };
        let mut out = Vec::new();
        void(&conn(&url), args, &mut out).unwrap();
        let request = request.join().unwrap();
        assert_eq!((request.method.as_str(), request.target.as_str()), ("POST", "/v1/cards/card_1/void"));
        assert!(request.body.is_empty());
        assert_eq!(text(out), "voided  card_1 •••• •••• •••• 1234 exp 03/2027 limit 10.00 USD\n");
    }

    #[test]
    fn a_debug_print_hides_pan_and_cvv() {
        let card: Card =
            serde_json::from_str(r#"{"id":"card_1","pan":"4000001234567899","cvv":"987"}"#).unwrap();
        let debug = format!("{card:?}");
        assert!(!debug.contains("4000001234567899") && !debug.contains("987"), "{debug}");
        assert_eq!(card.masked(), "4000 00•• •••• 7899");
    }

    #[test]
    fn a_summary_leaves_out_what_was_not_sent() {
        let card: Card =
            serde_json::from_str(r#"{"id":"card_1","secrets":"shown once, in the first response"}"#).unwrap();
        assert_eq!(card.summary(), "card_1");
    }
}
