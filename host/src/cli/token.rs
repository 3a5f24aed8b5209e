//! `spendguard token list | new | revoke`: the operator and network tokens
//! (and agents' tokens, listed and revoked), through the daemon; and
//! `token new --data-dir DIR`, which mints one on the data directory itself
//! for an operator who lost every token.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand, ValueEnum};
use serde::Deserialize;
use serde_json::json;

use super::UsageError;
use super::client::{self, Client, ConnArgs, OutputArgs};
use super::daemon::{self, DatabaseArgs};
use super::render::{self, Table};

/// The label of a token minted on the data directory without `--label`.
pub const RECOVERY_LABEL: &str = "recovery";

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Every token: role, label, agent, when made, last used and revoked (operator).
    List(ListArgs),
    /// Make an operator or network token, printed once (operator). With
    /// `--data-dir`, mint it on the data directory's files instead, without
    /// the daemon: the way back in for an operator who lost every token.
    New(NewArgs),
    /// Revoke a token: it is refused from the next request on (operator).
    /// The last operator token cannot be revoked.
    Revoke(RevokeArgs),
}

pub fn run(cmd: TokenCommand, conn: &ConnArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    match cmd {
        TokenCommand::List(args) => list(conn, args, out),
        TokenCommand::New(args) => new(conn, args, out),
        TokenCommand::Revoke(args) => revoke(conn, args, out),
    }
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TokenRole {
    Operator,
    Network,
    /// Only with `--data-dir` (through the daemon an agent's token is made
    /// by creating the agent).
    Agent,
}

#[derive(Debug, Args)]
pub struct NewArgs {
    #[arg(long, value_enum)]
    role: TokenRole,
    /// What to call it (shown by `token list`): 1 to 200 characters, no
    /// control characters. Required through the daemon; on the data
    /// directory it defaults to `recovery`.
    #[arg(long, value_name = "LABEL")]
    label: Option<String>,
    /// Mint the token on this data directory (it needs its files, not the
    /// daemon), instead of asking the daemon.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    #[command(flatten)]
    database: DatabaseArgs,
    /// The agent, for `--role agent` (with `--data-dir` only).
    #[arg(long, value_name = "ID")]
    agent: Option<String>,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// The token's id (`spendguard token list`), not the token.
    id: String,
    #[command(flatten)]
    output: OutputArgs,
}

/// A token as the daemon lists it.
#[derive(Debug, Deserialize)]
struct Token {
    id: String,
    role: String,
    #[serde(default)]
    label: Option<String>,
    #[serde(default)]
    agent_id: Option<String>,
    #[serde(default)]
    created_at: Option<String>,
    #[serde(default)]
    last_used_at: Option<String>,
    #[serde(default)]
    revoked_at: Option<String>,
}

fn list(conn: &ConnArgs, args: ListArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    let reply = Client::new(conn)?.get("/v1/tokens", &[])?;
    if args.output.json {
        return reply.print(out);
    }
    #[derive(Deserialize)]
    struct Tokens {
        tokens: Vec<Token>,
    }
    let tokens: Tokens = reply.parse()?;
    let mut table = Table::new(&["ID", "ROLE", "LABEL", "AGENT", "CREATED", "LAST USED", "REVOKED"]);
    for t in &tokens.tokens {
        table.row(vec![
            t.id.clone(),
            t.role.clone(),
            render::or_missing(t.label.as_deref()),
            render::or_missing(t.agent_id.as_deref()),
            render::or_missing(t.created_at.as_deref()),
            render::or_missing(t.last_used_at.as_deref()),
            render::or_missing(t.revoked_at.as_deref()),
        ]);
    }
    table.write(out)?;
    Ok(ExitCode::SUCCESS)
}

fn new(conn: &ConnArgs, args: NewArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    if let Some(dir) = args.data_dir {
        let label = args.label.unwrap_or_else(|| RECOVERY_LABEL.to_owned());
        let minted = daemon::mint(&dir, args.database, args.role, args.agent, &label)?;
        if args.output.json {
            writeln!(out, "{}", json!({ "id": minted.id, "token": minted.token, "role": minted.role }))?;
        } else {
            writeln!(out, "{} token {}: {}", minted.role, minted.id, minted.token)?;
            writeln!(out, "Shown once and stored only as a hash: keep it now.")?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    if args.database.given() {
        return Err(
            UsageError("`--database-url` and `--database-pool-size` go with `--data-dir`".into()).into()
        );
    }
    let role = match args.role {
        TokenRole::Operator => "operator",
        TokenRole::Network => "network",
        TokenRole::Agent => {
            return Err(UsageError(
                "an agent's token is made by creating the agent (`spendguard agent create`), or on the data \
                 directory with `--data-dir DIR --agent ID`"
                    .into(),
            )
            .into());
        }
    };
    if args.agent.is_some() {
        return Err(UsageError("`--agent` goes only with `--role agent` and `--data-dir`".into()).into());
    }
    let Some(label) = args.label else {
        return Err(UsageError("give the token a `--label` (what it is for)".into()).into());
    };
    let reply =
        Client::new(conn)?.post("/v1/tokens", Some(&json!({ "role": role, "label": label })), None)?;
    if args.output.json {
        return reply.print(out);
    }
    #[derive(Deserialize)]
    struct Made {
        id: String,
        token: String,
    }
    let made: Made = reply.parse()?;
    writeln!(out, "{role} token {}: {}", made.id, made.token)?;
    writeln!(out, "Shown once and stored only as a hash: keep it now.")?;
    Ok(ExitCode::SUCCESS)
}

fn revoke(conn: &ConnArgs, args: RevokeArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    let path = format!("/v1/tokens/{}/revoke", client::segment(&args.id));
    let reply = Client::new(conn)?.post(&path, None, None)?;
    if args.output.json {
        return reply.print(out);
    }
    let token: Token = reply.parse()?;
    writeln!(
        out,
        "revoked {} token {} ({}) at {}",
        token.role,
        token.id,
        render::or_missing(token.label.as_deref()),
        render::or_missing(token.revoked_at.as_deref())
    )?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::super::client::responder::{conn, serve_once, text};
    use super::*;

    #[test]
    fn list_shows_every_token_without_secrets() {
        let (url, request) = serve_once(
            200,
            r#"{"tokens":[{"id":"tok_1","role":"operator","label":"init","created_at":"2026-11-24T09:00:00Z",
                "last_used_at":null,"revoked_at":null},
               {"id":"tok_2","role":"agent","label":"bot","agent_id":"ag_1","created_at":"2026-11-24T09:01:00Z",
                "last_used_at":"2026-11-24T09:02:00Z","revoked_at":"2026-11-24T09:03:00Z"}]}"#,
        );
        let mut out = Vec::new();
        list(&conn(&url), ListArgs { output: OutputArgs { json: false } }, &mut out).unwrap();
        assert_eq!(request.join().unwrap().target, "/v1/tokens");
        assert_eq!(
            text(out),
            "ID     ROLE      LABEL  AGENT  CREATED               LAST USED             REVOKED\n\
             tok_1  operator  init   -      2026-11-24T09:00:00Z  -                     -\n\
             tok_2  agent     bot    ag_1   2026-11-24T09:01:00Z  2026-11-24T09:02:00Z  2026-11-24T09:03:00Z\n"
        );
    }
}
