//! `spendguard mandate create | request | list | show | approve | deny |
//! revoke`: task-scoped spend authority. The operator grants an agent a
//! narrow lane (a budget, merchants, categories, a count, an end), or answers
//! the agent's request for one.

use std::io::Write;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde::Deserialize;
use serde_json::{Value, json};

use super::client::{self, Client, ConnArgs, OutputArgs};
use super::input;
use super::render::{self, Table};

#[derive(Debug, Subcommand)]
pub enum MandateCommand {
    /// Grant an agent a mandate, active at once (operator).
    Create(CreateArgs),
    /// Ask the operator for a mandate for this agent (agent token); it waits
    /// for the operator's approval.
    Request(RequestArgs),
    /// Mandates: every agent's (operator) or your own (agent).
    List(ListArgs),
    /// Show one mandate: its status, and what it has spent, holds and has left.
    Show(IdArgs),
    /// Approve a mandate an agent asked for (operator).
    Approve(IdArgs),
    /// Deny a mandate an agent asked for (operator).
    Deny(IdArgs),
    /// Revoke a mandate: its open cards are voided and their holds released
    /// (operator, or the agent for its own).
    Revoke(IdArgs),
}

pub fn run(cmd: MandateCommand, conn: &ConnArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    match cmd {
        MandateCommand::Create(args) => {
            let body = args.lane.body(Some(&args.agent))?;
            post(conn, "/v1/mandates", Some(&body), args.lane.output, out)
        }
        MandateCommand::Request(args) => {
            let body = args.lane.body(None)?;
            post(conn, "/v1/mandates", Some(&body), args.lane.output, out)
        }
        MandateCommand::List(args) => list(conn, args, out),
        MandateCommand::Show(args) => {
            let reply =
                Client::new(conn)?.get(&format!("/v1/mandates/{}", client::segment(&args.id)), &[])?;
            if args.output.json {
                return reply.print(out);
            }
            write_mandate(out, &reply.parse()?)?;
            Ok(ExitCode::SUCCESS)
        }
        MandateCommand::Approve(args) => act(conn, &args, "approve", out),
        MandateCommand::Deny(args) => act(conn, &args, "deny", out),
        MandateCommand::Revoke(args) => act(conn, &args, "revoke", out),
    }
}

/// What a mandate allows, as `create` and `request` take it.
#[derive(Debug, Args)]
pub struct Lane {
    /// The budget, a decimal (`20.00`).
    #[arg(long)]
    amount: String,
    /// Its currency (`USD`); spends under the mandate are in it.
    #[arg(long)]
    currency: String,
    /// The task the mandate is for.
    #[arg(long, value_name = "TEXT", value_parser = input::not_blank)]
    purpose: String,
    /// A merchant the mandate may be spent at (repeat for more; none: any).
    #[arg(long = "merchant-id", value_name = "ID", value_parser = input::not_blank)]
    merchant_ids: Vec<String>,
    /// A merchant category code the mandate may be spent at (repeat for
    /// more; none: any).
    #[arg(long = "mcc", value_name = "MCC", value_parser = input::mcc)]
    mccs: Vec<String>,
    /// At most this many purchases (none: no count limit).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    max_spends: Option<u32>,
    /// How long it lasts: `90s`, `30m`, `1h`, `7d` (at most 30 days; an
    /// hour when left out).
    #[arg(long, value_name = "DURATION", value_parser = duration_seconds)]
    expires_in: Option<u64>,
    #[command(flatten)]
    output: OutputArgs,
}

impl Lane {
    /// The body of `POST /v1/mandates`.
    fn body(&self, agent_id: Option<&str>) -> anyhow::Result<Value> {
        let (amount, currency) = input::money(&self.amount, &self.currency)?;
        let mut body = json!({ "amount": amount, "currency": currency, "purpose": self.purpose });
        if let Some(agent_id) = agent_id {
            body["agent_id"] = json!(agent_id);
        }
        if !self.merchant_ids.is_empty() {
            body["merchant_ids"] = json!(self.merchant_ids);
        }
        if !self.mccs.is_empty() {
            body["mccs"] = json!(self.mccs);
        }
        if let Some(n) = self.max_spends {
            body["max_spends"] = json!(n);
        }
        if let Some(seconds) = self.expires_in {
            body["expires_in_seconds"] = json!(seconds);
        }
        Ok(body)
    }
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The agent the mandate is for.
    #[arg(long, value_name = "ID")]
    agent: String,
    #[command(flatten)]
    lane: Lane,
}

#[derive(Debug, Args)]
pub struct RequestArgs {
    #[command(flatten)]
    lane: Lane,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only this agent's (operator).
    #[arg(long, value_name = "ID")]
    agent: Option<String>,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Args)]
pub struct IdArgs {
    /// The mandate's id.
    id: String,
    #[command(flatten)]
    output: OutputArgs,
}

/// `--expires-in`: whole seconds, or a number with `s`, `m`, `h` or `d`.
fn duration_seconds(arg: &str) -> Result<u64, String> {
    let arg = arg.trim();
    let (digits, unit) = match arg.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => arg.split_at(i),
        None => (arg, "s"),
    };
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("`{arg}` is not a duration: expected `90s`, `30m`, `1h` or `7d`")),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{arg}` is not a duration: expected `90s`, `30m`, `1h` or `7d`"))?;
    match n.checked_mul(scale) {
        Some(seconds) if seconds > 0 => Ok(seconds),
        _ => Err(format!("`{arg}` must be at least one second")),
    }
}

/// A mandate as the daemon shows it.
#[derive(Debug, Deserialize)]
pub struct Mandate {
    pub id: String,
    pub status: String,
    #[serde(default)]
    pub agent_id: Option<String>,
    #[serde(default)]
    pub purpose: Option<String>,
    #[serde(default)]
    pub amount: Option<String>,
    #[serde(default)]
    pub currency: Option<String>,
    #[serde(default)]
    pub merchant_ids: Vec<String>,
    #[serde(default)]
    pub mccs: Vec<String>,
    #[serde(default)]
    pub max_spends: Option<u32>,
    #[serde(default)]
    pub expires_at: Option<String>,
    #[serde(default)]
    pub spent: Option<String>,
    #[serde(default)]
    pub held: Option<String>,
    #[serde(default)]
    pub remaining: Option<String>,
    #[serde(default)]
    pub spend_count: Option<u32>,
    #[serde(default)]
    pub created_by: Option<String>,
}

impl Mandate {
    fn money(&self, units: Option<&str>) -> String {
        render::money(units, self.currency.as_deref())
    }
}

fn any(list: &[String]) -> String {
    if list.is_empty() { "any".to_owned() } else { list.join(", ") }
}

fn write_mandate(out: &mut dyn Write, m: &Mandate) -> anyhow::Result<()> {
    writeln!(out, "{}  {}", render::clean(&m.status), render::clean(&m.id))?;
    if let Some(agent) = &m.agent_id {
        render::labelled(out, "agent", agent)?;
    }
    if let Some(purpose) = &m.purpose {
        render::labelled(out, "purpose", purpose)?;
    }
    render::labelled(out, "budget", &m.money(m.amount.as_deref()))?;
    render::labelled(out, "spent", &m.money(m.spent.as_deref()))?;
    render::labelled(out, "held", &m.money(m.held.as_deref()))?;
    render::labelled(out, "left", &m.money(m.remaining.as_deref()))?;
    let count = m.spend_count.map_or_else(|| render::MISSING.to_owned(), |n| n.to_string());
    let spends = match m.max_spends {
        Some(max) => format!("{count} of {max}"),
        None => count,
    };
    render::labelled(out, "spends", &spends)?;
    render::labelled(out, "merchants", &any(&m.merchant_ids))?;
    render::labelled(out, "mccs", &any(&m.mccs))?;
    render::labelled(out, "expires", &render::or_missing(m.expires_at.as_deref()))?;
    if let Some(by) = &m.created_by {
        render::labelled(out, "made by", by)?;
    }
    Ok(())
}

fn post(
    conn: &ConnArgs,
    path: &str,
    body: Option<&Value>,
    output: OutputArgs,
    out: &mut dyn Write,
) -> anyhow::Result<ExitCode> {
    let reply = Client::new(conn)?.post(path, body, None)?;
    if output.json {
        return reply.print(out);
    }
    write_mandate(out, &reply.parse()?)?;
    Ok(ExitCode::SUCCESS)
}

fn act(conn: &ConnArgs, args: &IdArgs, verb: &str, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    let path = format!("/v1/mandates/{}/{verb}", client::segment(&args.id));
    post(conn, &path, None, args.output, out)
}

#[derive(Debug, Deserialize)]
struct Mandates {
    mandates: Vec<Mandate>,
}

fn list(conn: &ConnArgs, args: ListArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    let query: Vec<_> = args.agent.map(|a| ("agent_id", a)).into_iter().collect();
    let reply = Client::new(conn)?.get("/v1/mandates", &query)?;
    if args.output.json {
        return reply.print(out);
    }
    let mandates: Mandates = reply.parse()?;
    if mandates.mandates.is_empty() {
        writeln!(out, "no mandates")?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut table = Table::new(&["ID", "STATUS", "AGENT", "BUDGET", "LEFT", "SPENDS", "EXPIRES"]);
    for m in &mandates.mandates {
        table.row(vec![
            m.id.clone(),
            m.status.clone(),
            render::or_missing(m.agent_id.as_deref()),
            m.money(m.amount.as_deref()),
            m.money(m.remaining.as_deref()),
            match (m.spend_count, m.max_spends) {
                (Some(n), Some(max)) => format!("{n}/{max}"),
                (Some(n), None) => n.to_string(),
                _ => render::MISSING.to_owned(),
            },
            render::or_missing(m.expires_at.as_deref()),
        ]);
    }
    table.write(out)?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::super::client::responder::{conn, serve_once, text};
    use super::*;

    const ACTIVE: &str = r#"{"id":"md_1","agent_id":"ag_1","status":"active","purpose":"books",
        "amount":"20.00","currency":"USD","merchant_ids":["shop.example"],"mccs":[],"max_spends":3,
        "expires_at":"2026-11-24T13:00:00Z","spent":"5.00","held":"2.50","remaining":"12.50",
        "spend_count":2,"created_at":"2026-11-24T12:00:00Z","created_by":"operator",
        "approved_at":"2026-11-24T12:00:00Z"}"#;

    #[test]
    fn durations_take_a_unit() {
        assert_eq!(duration_seconds("90s"), Ok(90));
        assert_eq!(duration_seconds("30m"), Ok(1800));
        assert_eq!(duration_seconds("1h"), Ok(3600));
        assert_eq!(duration_seconds("7d"), Ok(604_800));
        assert_eq!(duration_seconds("120"), Ok(120));
        assert!(duration_seconds("0h").is_err());
        assert!(duration_seconds("1w").is_err());
        assert!(duration_seconds("h").is_err());
    }

    #[test]
    fn create_sends_the_lane_and_prints_what_is_left() {
        let (url, request) = serve_once(201, ACTIVE);
        let args = CreateArgs {
            agent: "ag_1".into(),
            lane: Lane {
                amount: "20.00".into(),
                currency: "usd".into(),
                purpose: "books".into(),
                merchant_ids: vec!["shop.example".into()],
                mccs: vec![],
                max_spends: Some(3),
                expires_in: Some(3600),
                output: OutputArgs { json: false },
            },
        };
        let mut out = Vec::new();
        let body = args.lane.body(Some(&args.agent)).unwrap();
        post(&conn(&url), "/v1/mandates", Some(&body), args.lane.output, &mut out).unwrap();
        let request = request.join().unwrap();
        assert_eq!((request.method.as_str(), request.target.as_str()), ("POST", "/v1/mandates"));
        assert_eq!(
            request.json(),
            json!({"agent_id": "ag_1", "amount": "20.00", "currency": "USD", "purpose": "books",
                   "merchant_ids": ["shop.example"], "max_spends": 3, "expires_in_seconds": 3600})
        );
        let out = text(out);
        assert!(out.starts_with("active  md_1\n"), "{out}");
        assert!(out.contains("12.50 USD"), "{out}");
        assert!(out.contains("2 of 3"), "{out}");
    }
}
