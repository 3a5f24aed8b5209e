//! `spendguard approval list | approve | deny`: the spends a policy escalated
//! to a human.

use std::io::Write;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde::Deserialize;
use serde_json::json;

use super::client::{self, Client, ConnArgs, OutputArgs};
use super::render;
use super::spend::{self, Spend};

#[derive(Debug, Subcommand)]
pub enum ApprovalCommand {
    /// Spends waiting for a decision, with their purpose and why they wait.
    List(ListArgs),
    /// Approve a waiting spend: the card is issued to its agent (operator).
    Approve(ApproveArgs),
    /// Deny a waiting spend (operator).
    Deny(DenyArgs),
}

pub fn run(cmd: ApprovalCommand, conn: &ConnArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    match cmd {
        ApprovalCommand::List(args) => list(conn, args, out),
        ApprovalCommand::Approve(args) => approve(conn, args, out),
        ApprovalCommand::Deny(args) => deny(conn, args, out),
    }
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Args)]
pub struct ApproveArgs {
    /// The waiting spend's id (`spendguard approval list`).
    spend_id: String,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Args)]
pub struct DenyArgs {
    /// The waiting spend's id (`spendguard approval list`).
    spend_id: String,
    /// Why, recorded with the spend and in the audit trail.
    #[arg(long, value_name = "TEXT")]
    reason: Option<String>,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Deserialize)]
struct Approvals {
    approvals: Vec<Spend>,
}

fn list(conn: &ConnArgs, args: ListArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    let reply = Client::new(conn)?.get("/v1/approvals", &[])?;
    if args.output.json {
        return reply.print(out);
    }
    let approvals: Approvals = reply.parse()?;
    if approvals.approvals.is_empty() {
        writeln!(out, "nothing waits for approval")?;
        return Ok(ExitCode::SUCCESS);
    }
    // A block per spend rather than a table: whoever decides needs the
    // purpose and the reason in full.
    for (i, spend) in approvals.approvals.iter().enumerate() {
        if i > 0 {
            writeln!(out)?;
        }
        let merchant = spend.merchant.as_ref().map_or_else(
            || render::MISSING.to_owned(),
            |m| if m.name.is_empty() { m.id.clone() } else { format!("{} ({})", m.name, m.id) },
        );
        writeln!(
            out,
            "{}  {}  {}  agent {}  {}",
            render::clean(&spend.id),
            render::clean(&spend.amount()),
            render::clean(&merchant),
            render::clean(&render::or_missing(spend.agent_id.as_deref())),
            render::clean(&render::or_missing(spend.received_at.as_deref())),
        )?;
        if let Some(warning) = spend.merchant.as_ref().and_then(spend::Merchant::warning) {
            writeln!(out, "  warning: {}", render::clean(&warning))?;
        }
        if let Some(purpose) = &spend.purpose {
            writeln!(out, "  purpose: {}", render::clean(purpose))?;
        }
        for reason in &spend.reasons {
            writeln!(out, "  reason:  {}", render::clean(&spend::reason_text(reason)))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn approve(conn: &ConnArgs, args: ApproveArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    let path = format!("/v1/approvals/{}/approve", client::segment(&args.spend_id));
    let reply = Client::new(conn)?.post(&path, None, None)?;
    if args.output.json {
        return reply.print(out);
    }
    let approved: Spend = reply.parse()?;
    spend::write_spend(out, &approved)?;
    if approved.card.is_none() {
        // The card is made when its agent collects it, so that only the
        // agent ever sees its PAN and CVV.
        writeln!(
            out,
            "the agent collects its card with `spendguard spend show {}`",
            render::clean(&approved.id)
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

fn deny(conn: &ConnArgs, args: DenyArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    let path = format!("/v1/approvals/{}/deny", client::segment(&args.spend_id));
    let body = args.reason.as_ref().map(|reason| json!({ "reason": reason }));
    let reply = Client::new(conn)?.post(&path, body.as_ref(), None)?;
    if args.output.json {
        return reply.print(out);
    }
    spend::write_spend(out, &reply.parse()?)?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::super::client::responder::{conn, serve_once, text};
    use super::*;

    const DENIED: &str = r#"{"id":"sp_3","agent_id":"ag_1","status":"denied",
        "reasons":["operator: not this month"],"amount":"250.00","currency":"USD",
        "merchant":{"id":"aws.amazon.com","name":"AWS","mcc":"7372","country":"US"},
        "purpose":"GPU hours","received_at":"2026-11-24T12:00:00Z","card":null}"#;

    #[test]
    fn deny_sends_the_reason_when_given() {
        let (url, request) = serve_once(200, DENIED);
        let args = DenyArgs {
            spend_id: "sp_3".into(),
            reason: Some("not this month".into()),
            output: OutputArgs { json: false },
        };
        let mut out = Vec::new();
        deny(&conn(&url), args, &mut out).unwrap();
        let request = request.join().unwrap();
        assert_eq!((request.method.as_str(), request.target.as_str()), ("POST", "/v1/approvals/sp_3/deny"));
        assert_eq!(request.json(), json!({"reason": "not this month"}));
        assert!(text(out).starts_with("denied  sp_3\namount:   250.00 USD\n"));

        let (url, request) = serve_once(200, DENIED);
        let args = DenyArgs { spend_id: "sp_3".into(), reason: None, output: OutputArgs { json: false } };
        deny(&conn(&url), args, &mut Vec::new()).unwrap();
        assert!(request.join().unwrap().body.is_empty());
    }

    #[test]
    fn approve_posts_without_a_body() {
        let (url, request) = serve_once(200, &DENIED.replace("denied", "approved"));
        let args = ApproveArgs { spend_id: "sp_3".into(), output: OutputArgs { json: true } };
        let mut out = Vec::new();
        approve(&conn(&url), args, &mut out).unwrap();
        let request = request.join().unwrap();
        assert_eq!(request.target, "/v1/approvals/sp_3/approve");
        assert!(request.body.is_empty());
        let printed: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(printed["status"], "approved");

        let (url, request) = serve_once(200, &DENIED.replace("denied", "approved"));
        let args = ApproveArgs { spend_id: "sp_3".into(), output: OutputArgs { json: false } };
        let mut out = Vec::new();
        approve(&conn(&url), args, &mut out).unwrap();
        request.join().unwrap();
        let out = text(out);
        assert!(out.starts_with("approved  sp_3\n"), "{out}");
        assert!(out.ends_with("the agent collects its card with `spendguard spend show sp_3`\n"), "{out}");
    }

    #[test]
    fn list_shows_purpose_and_reason_in_full() {
        let pending = DENIED
            .replace("\"denied\"", "\"pending_approval\"")
            .replace("operator: not this month", "big-spend@1: over 100.00 USD needs a human");
        let (url, request) = serve_once(200, &format!(r#"{{"approvals":[{pending}]}}"#));
        let mut out = Vec::new();
        list(&conn(&url), ListArgs { output: OutputArgs { json: false } }, &mut out).unwrap();
        request.join().unwrap();
        assert_eq!(
            text(out),
            "sp_3  250.00 USD  AWS (aws.amazon.com)  agent ag_1  2026-11-24T12:00:00Z\n  \
             purpose: GPU hours\n  \
             reason:  big-spend@1: over 100.00 USD needs a human\n"
        );
    }
}
