//! `spendguard audit list | verify`: the hash-chained record of every
//! proposal and operator action.

use std::io::Write;
use std::process::ExitCode;

use anyhow::anyhow;
use clap::{Args, Subcommand};
use serde::Deserialize;
use serde_json::Value;

use super::EXIT_FAILURE;
use super::client::{Client, ConnArgs, OutputArgs};
use super::render::{self, Table};

/// The leading characters of a hash shown in a list: enough to tell records
/// apart by eye; `--json` has the whole hash.
const SHORT_HASH_CHARS: usize = 12;

/// The widest DETAIL column of a list.
const MAX_DETAIL_CHARS: usize = 80;

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Audit records in order (operator). Page with `--after` the last SEQ seen.
    List(ListArgs),
    /// Recompute the hash chain and print its head (keep it: it is a
    /// checkpoint); exit 1 if any record was altered, or, with
    /// `--checkpoint`, if the trail no longer holds that record (operator).
    Verify(VerifyArgs),
}

pub fn run(cmd: AuditCommand, conn: &ConnArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    match cmd {
        AuditCommand::List(args) => list(conn, args, out),
        AuditCommand::Verify(args) => verify(conn, args, out),
    }
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only records after this sequence number.
    #[arg(long, value_name = "SEQ")]
    after: Option<u64>,
    /// At most this many records (the daemon caps it too).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    limit: Option<u32>,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// A head printed by an earlier `audit verify` (`SEQ:HASH`): the trail
    /// must still hold that record with that hash, so records removed or
    /// rewritten since are found.
    #[arg(long, value_name = "SEQ:HASH", value_parser = checkpoint)]
    checkpoint: Option<String>,
    #[command(flatten)]
    output: OutputArgs,
}

/// A checkpoint, checked before anything is sent.
fn checkpoint(arg: &str) -> Result<String, String> {
    arg.parse::<spendguard::audit::Checkpoint>().map(|c| c.to_string()).map_err(|e| e.to_string())
}

#[derive(Debug, Deserialize)]
struct Records {
    records: Vec<Record>,
}

#[derive(Debug, Deserialize)]
struct Record {
    seq: u64,
    at: String,
    kind: String,
    hash: String,
    #[serde(default)]
    record: Value,
}

#[derive(Debug, Deserialize)]
struct Verified {
    ok: bool,
    #[serde(default)]
    records: Option<u64>,
    #[serde(default)]
    head: Option<Head>,
    #[serde(default)]
    error: Value,
}

#[derive(Debug, Deserialize)]
struct Head {
    seq: u64,
    hash: String,
}

/// The record's top-level plain fields as `key=value`, for a one-line
/// overview; nested ones (the request, each policy's verdict) are in `--json`.
fn detail(record: &Value) -> String {
    let Value::Object(fields) = record else {
        return String::new();
    };
    let parts: Vec<String> = fields
        .iter()
        .filter_map(|(key, value)| match value {
            Value::String(s) => Some(format!("{key}={s}")),
            Value::Number(n) => Some(format!("{key}={n}")),
            Value::Bool(b) => Some(format!("{key}={b}")),
            _ => None,
        })
        .collect();
    render::truncate(&parts.join(" "), MAX_DETAIL_CHARS)
}

fn list(conn: &ConnArgs, args: ListArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    let mut query = Vec::new();
    if let Some(after) = args.after {
        query.push(("after", after.to_string()));
    }
    if let Some(limit) = args.limit {
        query.push(("limit", limit.to_string()));
    }
    let reply = Client::new(conn)?.get("/v1/audit", &query)?;
    if args.output.json {
        return reply.print(out);
    }
    let records: Records = reply.parse()?;
    if records.records.is_empty() {
        writeln!(out, "no records")?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut table = Table::new(&["SEQ", "AT", "KIND", "HASH", "DETAIL"]);
    for r in &records.records {
        table.row(vec![
            r.seq.to_string(),
            r.at.clone(),
            r.kind.clone(),
            r.hash.chars().take(SHORT_HASH_CHARS).collect(),
            detail(&r.record),
        ]);
    }
    table.write(out)?;
    Ok(ExitCode::SUCCESS)
}

fn verify(conn: &ConnArgs, args: VerifyArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    let query: Vec<(&str, String)> = args.checkpoint.iter().map(|c| ("checkpoint", c.clone())).collect();
    let reply = Client::new(conn)?.get("/v1/audit/verify", &query)?;
    let verified: Verified = reply.parse()?;
    if args.output.json {
        reply.print(out)?;
        // A broken chain fails a script's check even when it reads JSON.
        return Ok(if verified.ok { ExitCode::SUCCESS } else { ExitCode::from(EXIT_FAILURE) });
    }
    if verified.ok {
        match verified.records {
            Some(n) => writeln!(out, "ok: {n} records, the hash chain is intact")?,
            None => writeln!(out, "ok: the hash chain is intact")?,
        }
        if let Some(cp) = &args.checkpoint {
            writeln!(out, "checkpoint {cp}: still in the trail")?;
        }
        if let Some(head) = &verified.head {
            writeln!(out, "head: {}:{}", head.seq, head.hash)?;
            writeln!(
                out,
                "Keep the head somewhere this machine cannot write; `audit verify --checkpoint` with it \
                 later finds records removed or rewritten since."
            )?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let why = match &verified.error {
        Value::String(s) => s.clone(),
        Value::Null => "no reason given".to_owned(),
        other => other.to_string(),
    };
    Err(anyhow!("the audit trail does not verify: {why}"))
}

#[cfg(test)]
mod tests {
    use super::super::client::responder::{conn, serve_once, text};
    use super::*;

    #[test]
    fn list_pages_with_after_and_limit() {
        let (url, request) = serve_once(
            200,
            r#"{"records":[{"seq":8,"at":"2026-11-24T12:00:00Z","kind":"spend.proposed",
                "hash":"0123456789abcdef0123","prev_hash":"ffff",
                "record":{"spend_id":"sp_1","decision":"allow","policies":[{"name":"a"}],"fuel_used":1200}}]}"#,
        );
        let args = ListArgs { after: Some(7), limit: Some(50), output: OutputArgs { json: false } };
        let mut out = Vec::new();
        list(&conn(&url), args, &mut out).unwrap();
        assert_eq!(request.join().unwrap().target, "/v1/audit?after=7&limit=50");
        assert_eq!(
            text(out),
            "SEQ  AT                    KIND            HASH          DETAIL\n\
             8    2026-11-24T12:00:00Z  spend.proposed  0123456789ab  \
             decision=allow fuel_used=1200 spend_id=sp_1\n"
        );
    }

    #[test]
    fn list_without_paging_sends_no_query() {
        let (url, request) = serve_once(200, r#"{"records":[]}"#);
        let args = ListArgs { after: None, limit: None, output: OutputArgs { json: false } };
        let mut out = Vec::new();
        list(&conn(&url), args, &mut out).unwrap();
        assert_eq!(request.join().unwrap().target, "/v1/audit");
        assert_eq!(text(out), "no records\n");
    }

    #[test]
    fn verify_fails_on_a_broken_chain_even_with_json() {
        let broken = r#"{"ok":false,"seq":7,"error":"record 7: hash mismatch"}"#;
        let (url, request) = serve_once(200, broken);
        let err = verify(
            &conn(&url),
            VerifyArgs { checkpoint: None, output: OutputArgs { json: false } },
            &mut Vec::new(),
        )
        .unwrap_err();
        request.join().unwrap();
        assert_eq!(err.to_string(), "the audit trail does not verify: record 7: hash mismatch");

        let (url, request) = serve_once(200, broken);
        let mut out = Vec::new();
        let code =
            verify(&conn(&url), VerifyArgs { checkpoint: None, output: OutputArgs { json: true } }, &mut out)
                .unwrap();
        request.join().unwrap();
        assert_eq!(code, ExitCode::from(EXIT_FAILURE));
        assert_eq!(text(out), format!("{broken}\n"));

        let (url, request) = serve_once(200, r#"{"ok":true,"records":12}"#);
        let mut out = Vec::new();
        let code = verify(
            &conn(&url),
            VerifyArgs { checkpoint: None, output: OutputArgs { json: false } },
            &mut out,
        )
        .unwrap();
        request.join().unwrap();
        assert_eq!(code, ExitCode::SUCCESS);
        assert_eq!(text(out), "ok: 12 records, the hash chain is intact\n");
    }
}
