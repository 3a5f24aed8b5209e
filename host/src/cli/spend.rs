//! `spendguard spend propose | show | list`: what an agent asks for, and what
//! became of it.

use std::io::Write;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde::Deserialize;
use serde_json::{Value, json};

use super::card::Card;
use super::client::{self, Client, ConnArgs, OutputArgs};
use super::input;
use super::render::{self, Table};

#[derive(Debug, Subcommand)]
pub enum SpendCommand {
    /// Propose a spend (agent token); exit 0 whatever the decision.
    ///
    /// Approved: prints the single-use card, its PAN and CVV shown this once.
    /// Denied or waiting for approval: prints why.
    Propose(ProposeArgs),
    /// Show one spend.
    ///
    /// The agent collects the card of a spend an operator approved here: its
    /// PAN and CVV are shown this once.
    Show(ShowArgs),
    /// Spends: every agent's (operator) or your own (agent).
    List(ListArgs),
}

pub fn run(cmd: SpendCommand, conn: &ConnArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    match cmd {
        SpendCommand::Propose(args) => propose(conn, args, out),
        SpendCommand::Show(args) => show(conn, args, out),
        SpendCommand::List(args) => list(conn, args, out),
    }
}

#[derive(Debug, Args)]
pub struct ProposeArgs {
    /// The amount, a decimal (`12.50`).
    #[arg(long)]
    amount: String,
    /// Its currency (`USD`).
    #[arg(long)]
    currency: String,
    /// The merchant's stable id: the acquirer's merchant id or the site's
    /// domain. The card works there only.
    #[arg(long, value_name = "ID", value_parser = input::not_blank)]
    merchant_id: String,
    /// The merchant's name.
    #[arg(long, value_name = "NAME", value_parser = input::not_blank)]
    merchant_name: String,
    /// The merchant category code, four digits (`5734`: computer software stores).
    #[arg(long, value_name = "MCC", value_parser = input::mcc)]
    mcc: String,
    /// The merchant's country, two letters (`US`); unknown when left out.
    #[arg(long, value_name = "CC", value_parser = input::country)]
    country: Option<String>,
    /// What it buys and why, in the agent's own words.
    #[arg(long, value_name = "TEXT", value_parser = input::not_blank)]
    purpose: String,
    /// Makes a retry safe: the same key returns the first answer (and card)
    /// instead of proposing twice.
    #[arg(long, value_name = "KEY")]
    idempotency_key: Option<String>,
    /// Spend under this mandate (`spendguard mandate list`): checked against
    /// its budget, merchants, categories, count and end.
    #[arg(long = "mandate", value_name = "ID")]
    mandate_id: Option<String>,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The spend's id.
    id: String,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// At most this many, newest first (the daemon's default is 100).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    limit: Option<u32>,
    #[command(flatten)]
    output: OutputArgs,
}

/// A spend: the answer to a proposal (`id`, `status`, `reasons`, `card`) or
/// the whole record.
#[derive(Debug, Deserialize)]
pub struct Spend {
    pub id: String,
    pub status: String,
    #[serde(default)]
    pub reasons: Vec<Value>,
    #[serde(default)]
    pub agent_id: Option<String>,
    #[serde(default)]
    pub amount: Option<String>,
    #[serde(default)]
    pub currency: Option<String>,
    #[serde(default)]
    pub merchant: Option<Merchant>,
    #[serde(default)]
    pub purpose: Option<String>,
    /// When the daemon received the proposal.
    #[serde(default, alias = "created_at")]
    pub received_at: Option<String>,
    #[serde(default)]
    pub card: Option<Card>,
    /// The mandate it was proposed under.
    #[serde(default)]
    pub mandate_id: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct Merchant {
    pub id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub mcc: String,
    #[serde(default)]
    pub country: String,
}

impl Merchant {
    /// `OpenAI (api.openai.com, mcc 5734, US)`.
    fn describe(&self) -> String {
        let mut details = vec![self.id.clone()];
        if !self.mcc.is_empty() {
            details.push(format!("mcc {}", self.mcc));
        }
        if !self.country.is_empty() {
            details.push(self.country.clone());
        }
        format!("{} ({})", self.name, details.join(", "))
    }

    /// A warning for whoever decides on the spend: when a word of the
    /// merchant's name mixes scripts (a Cyrillic letter among Latin ones),
    /// as a name imitating another merchant's does — names are free text, so
    /// such a name is accepted, and flagged here — or when the merchant id
    /// is a lookalike the daemon would refuse now (a record from before it
    /// checked).
    pub fn warning(&self) -> Option<String> {
        if let Err(why) = spendguard::lookalike::check_merchant_id(&self.id) {
            return Some(format!("the merchant id {why}"));
        }
        spendguard::lookalike::mixed_scripts(&self.name).map(|scripts| {
            format!(
                "the merchant's name mixes scripts ({}): it may imitate another merchant's",
                scripts.join(", ")
            )
        })
    }
}

impl Spend {
    pub fn amount(&self) -> String {
        render::money(self.amount.as_deref(), self.currency.as_deref())
    }
}

/// One reason as a line: the daemon's text, or `policy: reason` when it
/// sends them apart.
pub fn reason_text(reason: &Value) -> String {
    match reason {
        Value::String(text) => text.clone(),
        Value::Object(fields) => {
            let field = |name: &str| fields.get(name).and_then(Value::as_str);
            match (field("policy"), field("reason").or_else(|| field("message"))) {
                (Some(policy), Some(text)) => format!("{policy}: {text}"),
                (None, Some(text)) => text.to_owned(),
                _ => reason.to_string(),
            }
        }
        other => other.to_string(),
    }
}

/// A spend in short aligned lines: `STATUS  ID [card …]`, the card's PAN and
/// CVV when the daemon sent them, then whatever else it sent.
pub fn write_spend(out: &mut dyn Write, spend: &Spend) -> anyhow::Result<()> {
    match &spend.card {
        Some(card) => writeln!(
            out,
            "{}  {} card {}",
            render::clean(&spend.status),
            render::clean(&spend.id),
            render::clean(&card.summary())
        )?,
        None => writeln!(out, "{}  {}", render::clean(&spend.status), render::clean(&spend.id))?,
    }
    if let Some(card) = &spend.card {
        if let Some(pan) = &card.pan {
            render::labelled(out, "pan", pan)?;
        }
        if let Some(cvv) = &card.cvv {
            render::labelled(out, "cvv", cvv)?;
        }
        if let Some(note) = &card.secrets {
            render::labelled(out, "pan/cvv", note)?;
        }
        if let Some(at) = &card.expires_at {
            render::labelled(out, "expires", at)?;
        }
        if let Some(state) = &card.state {
            render::labelled(out, "card", state)?;
        }
    }
    if spend.amount.is_some() {
        render::labelled(out, "amount", &spend.amount())?;
    }
    if let Some(merchant) = &spend.merchant {
        render::labelled(out, "merchant", &merchant.describe())?;
        if let Some(warning) = merchant.warning() {
            render::labelled(out, "warning", &warning)?;
        }
    }
    if let Some(purpose) = &spend.purpose {
        render::labelled(out, "purpose", purpose)?;
    }
    if let Some(agent) = &spend.agent_id {
        render::labelled(out, "agent", agent)?;
    }
    if let Some(mandate) = &spend.mandate_id {
        render::labelled(out, "mandate", mandate)?;
    }
    if let Some(at) = &spend.received_at {
        render::labelled(out, "received", at)?;
    }
    for reason in &spend.reasons {
        render::labelled(out, "reason", &reason_text(reason))?;
    }
    Ok(())
}

fn propose(conn: &ConnArgs, args: ProposeArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    let body = proposal(&args)?;
    let reply = Client::new(conn)?.post("/v1/spends", Some(&body), args.idempotency_key.as_deref())?;
    if args.output.json {
        return reply.print(out);
    }
    write_spend(out, &reply.parse()?)?;
    Ok(ExitCode::SUCCESS)
}

/// The body of `POST /v1/spends`.
fn proposal(args: &ProposeArgs) -> anyhow::Result<Value> {
    let (amount, currency) = input::money(&args.amount, &args.currency)?;
    let mut body = json!({
        "amount": amount,
        "currency": currency,
        "merchant": {
            "id": args.merchant_id,
            "name": args.merchant_name,
            "mcc": args.mcc,
            "country": args.country.as_deref().unwrap_or(""),
        },
        "purpose": args.purpose,
    });
    if let Some(mandate_id) = &args.mandate_id {
        body["mandate_id"] = json!(mandate_id);
    }
    Ok(body)
}

fn show(conn: &ConnArgs, args: ShowArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    let path = format!("/v1/spends/{}", client::segment(&args.id));
    let reply = Client::new(conn)?.get(&path, &[])?;
    if args.output.json {
        return reply.print(out);
    }
    write_spend(out, &reply.parse()?)?;
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Deserialize)]
struct Spends {
    spends: Vec<Spend>,
}

fn list(conn: &ConnArgs, args: ListArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    let query: Vec<_> = args.limit.map(|n| ("limit", n.to_string())).into_iter().collect();
    let reply = Client::new(conn)?.get("/v1/spends", &query)?;
    if args.output.json {
        return reply.print(out);
    }
    let spends: Spends = reply.parse()?;
    if spends.spends.is_empty() {
        writeln!(out, "no spends")?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut table = Table::new(&["ID", "STATUS", "AMOUNT", "MERCHANT", "AGENT", "RECEIVED"]);
    for spend in &spends.spends {
        table.row(vec![
            spend.id.clone(),
            spend.status.clone(),
            spend.amount(),
            render::or_missing(spend.merchant.as_ref().map(|m| m.id.as_str())),
            render::or_missing(spend.agent_id.as_deref()),
            render::or_missing(spend.received_at.as_deref()),
        ]);
    }
    table.write(out)?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::super::client::responder::{conn, serve_once, text};
    use super::*;

    fn args() -> ProposeArgs {
        ProposeArgs {
            amount: "10.00".into(),
            currency: "usd".into(),
            merchant_id: "api.openai.com".into(),
            merchant_name: "OpenAI".into(),
            mcc: "5734".into(),
            country: None,
            purpose: "API credits for the nightly eval run".into(),
            idempotency_key: Some("run-42".into()),
            mandate_id: None,
            output: OutputArgs { json: false },
        }
    }

    #[test]
    fn an_approved_proposal_prints_the_card_with_pan_and_cvv_on_their_own_lines() {
        let (url, request) = serve_once(
            201,
            r#"{"id":"sp_1","status":"approved","reasons":[],"card":{"id":"card_9",
                "pan":"4000001234561234","cvv":"321","exp_month":11,"exp_year":2026,"limit":"10.00",
                "currency":"USD","merchant_id":"api.openai.com","expires_at":"2026-11-24T12:15:00Z"}}"#,
        );
        let mut out = Vec::new();
        propose(&conn(&url), args(), &mut out).unwrap();
        let request = request.join().unwrap();
        assert_eq!((request.method.as_str(), request.target.as_str()), ("POST", "/v1/spends"));
        assert_eq!(request.header("idempotency-key"), Some("run-42"));
        assert_eq!(
            request.json(),
            json!({
                "amount": "10.00",
                "currency": "USD",
                "merchant": {"id": "api.openai.com", "name": "OpenAI", "mcc": "5734", "country": ""},
                "purpose": "API credits for the nightly eval run",
            })
        );
        assert_eq!(
            text(out),
            "approved  sp_1 card card_9 4000 00•• •••• 1234 exp 11/2026 limit 10.00 USD\n\
             pan:      4000001234561234\n\
             cvv:      321\n\
             expires:  2026-11-24T12:15:00Z\n"
        );
    }

    #[test]
    fn a_denied_proposal_prints_its_reasons() {
        let (url, request) = serve_once(
            201,
            r#"{"id":"sp_2","status":"denied","reasons":["daily-limit@1: over the daily limit",
                {"policy":"mcc-allowlist@2","reason":"mcc 7995 is not allowed"}]}"#,
        );
        let mut out = Vec::new();
        let mut a = args();
        a.country = Some("US".into());
        propose(&conn(&url), a, &mut out).unwrap();
        assert_eq!(request.join().unwrap().json()["merchant"]["country"], "US");
        assert_eq!(
            text(out),
            "denied  sp_2\n\
             reason:   daily-limit@1: over the daily limit\n\
             reason:   mcc-allowlist@2: mcc 7995 is not allowed\n"
        );
    }

    #[test]
    fn a_refused_proposal_is_an_error_with_the_daemons_code() {
        let (url, request) = serve_once(
            409,
            r#"{"error":{"code":"idempotency_conflict","message":"key `run-42` was used with other parameters"}}"#,
        );
        let err = propose(&conn(&url), args(), &mut Vec::new()).unwrap_err();
        request.join().unwrap();
        assert_eq!(err.to_string(), "idempotency_conflict: key `run-42` was used with other parameters");
    }

    #[test]
    fn show_prints_the_whole_spend_with_the_last_four_only() {
        let (url, request) = serve_once(
            200,
            r#"{"id":"sp_1","agent_id":"ag_1","status":"approved","reasons":[],"amount":"10.00",
                "currency":"USD","merchant":{"id":"api.openai.com","name":"OpenAI","mcc":"5734",
                "country":"US"},"purpose":"credits","received_at":"2026-11-24T12:00:00Z",
                "card":{"id":"card_9","pan":null,"cvv":null,"last4":"1234","exp_month":11,
                "exp_year":2026,"limit":"10.00","currency":"USD","merchant_id":"api.openai.com",
                "expires_at":"2026-11-24T12:15:00Z"}}"#,
        );
        let mut out = Vec::new();
        show(&conn(&url), ShowArgs { id: "sp_1".into(), output: OutputArgs { json: false } }, &mut out)
            .unwrap();
        assert_eq!(request.join().unwrap().target, "/v1/spends/sp_1");
        assert_eq!(
            text(out),
            "approved  sp_1 card card_9 •••• •••• •••• 1234 exp 11/2026 limit 10.00 USD\n\
             expires:  2026-11-24T12:15:00Z\n\
             amount:   10.00 USD\n\
             merchant: OpenAI (api.openai.com, mcc 5734, US)\n\
             purpose:  credits\n\
             agent:    ag_1\n\
             received: 2026-11-24T12:00:00Z\n"
        );
    }

    /// What a policy or an agent wrote reaches the terminal escaped, and a
    /// lookalike merchant id kept from before the daemon checked is flagged.
    #[test]
    fn show_escapes_what_others_wrote_and_flags_lookalikes() {
        let body = json!({"id": "sp_3", "status": "denied", "amount": "10.00", "currency": "USD",
            "merchant": {"id": "\u{430}pi.openai.com", "name": "OpenAI", "mcc": "5734", "country": "US"},
            "purpose": "a\u{1b}[2Jb\rc",
            "reasons": [{"policy": "p@1", "reason": "\u{1b}[31mok\u{1b}[0m\nforged \u{202e}txt"}]});
        let (url, request) = serve_once(200, &body.to_string());
        let mut out = Vec::new();
        show(&conn(&url), ShowArgs { id: "sp_3".into(), output: OutputArgs { json: false } }, &mut out)
            .unwrap();
        request.join().unwrap();
        assert_eq!(
            text(out),
            "denied  sp_3\n\
             amount:   10.00 USD\n\
             merchant: OpenAI (\u{430}pi.openai.com, mcc 5734, US)\n\
             warning:  the merchant id mixes the scripts Cyrillic, Latin, as a lookalike of another \
             merchant's id does\n\
             purpose:  a\\u{1b}[2Jb\\u{d}c\n\
             reason:   p@1: \\u{1b}[31mok\\u{1b}[0m\\u{a}forged \\u{202e}txt\n"
        );

        let (url, request) = serve_once(200, &body.to_string());
        let mut out = Vec::new();
        show(&conn(&url), ShowArgs { id: "sp_3".into(), output: OutputArgs { json: true } }, &mut out)
            .unwrap();
        request.join().unwrap();
        let printed = text(out);
        assert!(!printed.contains('\u{202e}') && printed.contains("\\u202e"), "{printed}");
        assert_eq!(serde_json::from_str::<serde_json::Value>(&printed).unwrap(), body);
    }

    #[test]
    fn a_bad_amount_never_leaves_the_machine() {
        let mut a = args();
        a.amount = "0".into();
        let err = proposal(&a).unwrap_err();
        assert_eq!(err.to_string(), "amount `0` must be positive");
    }
}
