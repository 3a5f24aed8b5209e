//! `spendguard agent create | list | revoke | attach`: the agents that may
//! propose spends, and the policies that decide for each.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde::Deserialize;
use serde_json::{Value, json};

use super::UsageError;
use super::client::{self, Client, ConnArgs, OutputArgs};
use super::input;
use super::render::{self, Table};

#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Create an agent and print its token, shown this once (operator).
    Create(CreateArgs),
    /// Every agent, its policies and labels.
    List(ListArgs),
    /// Revoke an agent: its token stops working at once.
    Revoke(RevokeArgs),
    /// Replace an agent's policies with the ones given (none: every spend is denied).
    Attach(AttachArgs),
}

pub fn run(cmd: AgentCommand, conn: &ConnArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    match cmd {
        AgentCommand::Create(args) => create(conn, args, out),
        AgentCommand::List(args) => list(conn, args, out),
        AgentCommand::Revoke(args) => revoke(conn, args, out),
        AgentCommand::Attach(args) => attach(conn, args, out),
    }
}

/// `--policy` and `--config`, paired by position.
#[derive(Debug, Args)]
pub struct AttachmentArgs {
    /// A policy to attach: NAME (its latest version) or NAME@VERSION. Repeat
    /// for several; every one must allow a spend.
    #[arg(long = "policy", value_name = "NAME[@VERSION]", value_parser = input::policy_ref)]
    policies: Vec<String>,
    /// The JSON config of the policy at the same position: the first
    /// `--config` goes with the first `--policy`, and so on. A policy without
    /// one gets `{}`.
    #[arg(long = "config", value_name = "CFG.json")]
    configs: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// A name for people to recognise it by.
    #[arg(value_parser = input::not_blank)]
    name: String,
    /// A label policies can see (`team=research`). Repeat for several.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = input::label)]
    labels: Vec<(String, String)>,
    #[command(flatten)]
    attachments: AttachmentArgs,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// The agent's id (`spendguard agent list`).
    id: String,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Args)]
pub struct AttachArgs {
    /// The agent's id (`spendguard agent list`).
    id: String,
    #[command(flatten)]
    attachments: AttachmentArgs,
    #[command(flatten)]
    output: OutputArgs,
}

/// An agent as the daemon describes it.
#[derive(Debug, Deserialize)]
struct Agent {
    id: String,
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    policies: Vec<Attachment>,
    #[serde(default)]
    revoked: bool,
    #[serde(default)]
    created_at: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Attachment {
    policy: String,
}

impl Agent {
    fn state(&self) -> &'static str {
        if self.revoked { "revoked" } else { "active" }
    }

    fn policies(&self) -> String {
        if self.policies.is_empty() {
            return "(none)".to_owned();
        }
        self.policies.iter().map(|a| a.policy.as_str()).collect::<Vec<_>>().join(", ")
    }

    fn labels(&self) -> String {
        if self.labels.is_empty() {
            return render::MISSING.to_owned();
        }
        self.labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
    }
}

/// The answer to `POST /v1/agents`: the only time the token is shown.
#[derive(Deserialize)]
struct Created {
    id: String,
    name: String,
    token: String,
}

/// The `labels` object: each key once.
fn labels_body(labels: &[(String, String)]) -> Result<Value, UsageError> {
    let mut map = serde_json::Map::new();
    for (key, value) in labels {
        if map.insert(key.clone(), Value::String(value.clone())).is_some() {
            return Err(UsageError(format!("label `{key}` is given twice")));
        }
    }
    Ok(Value::Object(map))
}

/// The `policies` list: each policy with the config at its position, `{}`
/// for those past the last `--config`. A config file that cannot be read or
/// is not JSON is an error naming the file.
fn policies_body(args: &AttachmentArgs) -> anyhow::Result<Value> {
    if args.configs.len() > args.policies.len() {
        return Err(UsageError(format!(
            "{} `--config` files for {} `--policy` names: each config belongs to the policy at \
             the same position",
            args.configs.len(),
            args.policies.len()
        ))
        .into());
    }
    let mut list = Vec::with_capacity(args.policies.len());
    for (i, policy) in args.policies.iter().enumerate() {
        let config = match args.configs.get(i) {
            Some(file) => {
                let text = std::fs::read_to_string(file)
                    .with_context(|| format!("cannot read `{}`", file.display()))?;
                serde_json::from_str::<Value>(&text)
                    .with_context(|| format!("invalid `{}`", file.display()))?
            }
            None => json!({}),
        };
        list.push(json!({ "policy": policy, "config": config }));
    }
    Ok(Value::Array(list))
}

fn create(conn: &ConnArgs, args: CreateArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    let body = json!({
        "name": args.name,
        "labels": labels_body(&args.labels)?,
        "policies": policies_body(&args.attachments)?,
    });
    let reply = Client::new(conn)?.post("/v1/agents", Some(&body), None)?;
    if args.output.json {
        return reply.print(out);
    }
    let created: Created = reply.parse()?;
    writeln!(out, "created agent {} ({})", render::clean(&created.id), render::clean(&created.name))?;
    writeln!(out)?;
    writeln!(out, "    token: {}", created.token)?;
    writeln!(out)?;
    writeln!(out, "This token is shown this once: store it now, and give it to the agent as")?;
    writeln!(out, "SPENDGUARD_TOKEN. It can only propose spends and read the agent's own.")?;
    Ok(ExitCode::SUCCESS)
}

fn list(conn: &ConnArgs, args: ListArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    let reply = Client::new(conn)?.get("/v1/agents", &[])?;
    if args.output.json {
        return reply.print(out);
    }
    #[derive(Deserialize)]
    struct Agents {
        agents: Vec<Agent>,
    }
    let agents: Agents = reply.parse()?;
    if agents.agents.is_empty() {
        writeln!(out, "no agents: create one with `spendguard agent create NAME --policy NAME`")?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut table = Table::new(&["ID", "NAME", "STATE", "POLICIES", "LABELS", "CREATED"]);
    for agent in &agents.agents {
        table.row(vec![
            agent.id.clone(),
            agent.name.clone(),
            agent.state().to_owned(),
            agent.policies(),
            agent.labels(),
            render::or_missing(agent.created_at.as_deref()),
        ]);
    }
    table.write(out)?;
    Ok(ExitCode::SUCCESS)
}

/// `STATE  ID  NAME  policies: …`, after a change.
fn write_agent(out: &mut dyn Write, agent: &Agent) -> anyhow::Result<()> {
    writeln!(
        out,
        "{}  {}  {}  policies: {}",
        agent.state(),
        render::clean(&agent.id),
        render::clean(&agent.name),
        render::clean(&agent.policies())
    )?;
    Ok(())
}

fn revoke(conn: &ConnArgs, args: RevokeArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    let path = format!("/v1/agents/{}/revoke", client::segment(&args.id));
    let reply = Client::new(conn)?.post(&path, None, None)?;
    if args.output.json {
        return reply.print(out);
    }
    write_agent(out, &reply.parse()?)?;
    Ok(ExitCode::SUCCESS)
}

fn attach(conn: &ConnArgs, args: AttachArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    let body = json!({ "policies": policies_body(&args.attachments)? });
    let path = format!("/v1/agents/{}/policies", client::segment(&args.id));
    let reply = Client::new(conn)?.put(&path, &body)?;
    if args.output.json {
        return reply.print(out);
    }
    write_agent(out, &reply.parse()?)?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::super::client::responder::{conn, serve_once, text};
    use super::*;

    fn attachments(policies: &[&str], configs: &[PathBuf]) -> AttachmentArgs {
        AttachmentArgs {
            policies: policies.iter().map(|p| (*p).to_owned()).collect(),
            configs: configs.to_vec(),
        }
    }

    #[test]
    fn configs_pair_with_policies_by_position() {
        let dir = tempfile::tempdir().unwrap();
        let limit = dir.path().join("limit.json");
        std::fs::write(&limit, r#"{"limit":"50.00","currency":"USD"}"#).unwrap();
        let body = policies_body(&attachments(&["daily-limit@2", "mcc-allowlist"], &[limit])).unwrap();
        assert_eq!(
            body,
            json!([
                {"policy": "daily-limit@2", "config": {"limit": "50.00", "currency": "USD"}},
                {"policy": "mcc-allowlist", "config": {}},
            ])
        );
        assert_eq!(policies_body(&attachments(&[], &[])).unwrap(), json!([]));
    }

    #[test]
    fn more_configs_than_policies_is_a_usage_error() {
        let err = policies_body(&attachments(&["a"], &["x.json".into(), "y.json".into()])).unwrap_err();
        assert!(err.downcast_ref::<UsageError>().is_some());
        assert_eq!(
            err.to_string(),
            "2 `--config` files for 1 `--policy` names: each config belongs to the policy at the same position"
        );
    }

    #[test]
    fn an_unreadable_or_invalid_config_names_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "{limit: 5}").unwrap();
        let err = policies_body(&attachments(&["a"], std::slice::from_ref(&bad))).unwrap_err();
        assert!(err.downcast_ref::<UsageError>().is_none());
        assert_eq!(err.to_string(), format!("invalid `{}`", bad.display()));
        let missing = dir.path().join("missing.json");
        let err = policies_body(&attachments(&["a"], std::slice::from_ref(&missing))).unwrap_err();
        assert_eq!(err.to_string(), format!("cannot read `{}`", missing.display()));
    }

    #[test]
    fn labels_become_an_object_and_a_repeated_key_is_refused() {
        let labels = vec![("team".to_owned(), "research".to_owned()), ("env".to_owned(), "prod".to_owned())];
        assert_eq!(labels_body(&labels).unwrap(), json!({"team": "research", "env": "prod"}));
        let twice = vec![("team".to_owned(), "a".to_owned()), ("team".to_owned(), "b".to_owned())];
        assert_eq!(labels_body(&twice).unwrap_err().to_string(), "label `team` is given twice");
    }

    #[test]
    fn create_sends_name_labels_and_policies_and_shows_the_token_once() {
        let (url, request) = serve_once(201, r#"{"id":"ag_1","name":"research bot","token":"sga_secret"}"#);
        let args = CreateArgs {
            name: "research bot".into(),
            labels: vec![("team".into(), "research".into())],
            attachments: attachments(&["daily-limit"], &[]),
            output: OutputArgs { json: false },
        };
        let mut out = Vec::new();
        create(&conn(&url), args, &mut out).unwrap();
        let request = request.join().unwrap();
        assert_eq!((request.method.as_str(), request.target.as_str()), ("POST", "/v1/agents"));
        assert_eq!(
            request.json(),
            json!({
                "name": "research bot",
                "labels": {"team": "research"},
                "policies": [{"policy": "daily-limit", "config": {}}],
            })
        );
        let out = text(out);
        assert!(out.starts_with("created agent ag_1 (research bot)\n\n    token: sga_secret\n"), "{out}");
        assert!(out.contains("shown this once"));
    }

    #[test]
    fn attach_puts_the_whole_list() {
        let (url, request) = serve_once(
            200,
            r#"{"id":"ag_1","name":"bot","labels":{},"policies":[{"policy":"daily-limit@3","config":{}}],
                "revoked":false,"created_at":"2026-11-24T09:00:00Z"}"#,
        );
        let args = AttachArgs {
            id: "ag_1".into(),
            attachments: attachments(&["daily-limit"], &[]),
            output: OutputArgs { json: false },
        };
        let mut out = Vec::new();
        attach(&conn(&url), args, &mut out).unwrap();
        let request = request.join().unwrap();
        assert_eq!((request.method.as_str(), request.target.as_str()), ("PUT", "/v1/agents/ag_1/policies"));
        assert_eq!(request.json(), json!({"policies": [{"policy": "daily-limit", "config": {}}]}));
        assert_eq!(text(out), "active  ag_1  bot  policies: daily-limit@3\n");
    }

    #[test]
    fn list_shows_state_policies_and_labels() {
        let (url, request) = serve_once(
            200,
            r#"{"agents":[{"id":"ag_1","name":"bot","labels":{"team":"r","env":"p"},
                "policies":[{"policy":"a@1","config":{}},{"policy":"b@2","config":{"x":1}}],
                "revoked":true,"created_at":"2026-11-24T09:00:00Z"}]}"#,
        );
        let mut out = Vec::new();
        list(&conn(&url), ListArgs { output: OutputArgs { json: false } }, &mut out).unwrap();
        request.join().unwrap();
        assert_eq!(
            text(out),
            "ID    NAME  STATE    POLICIES  LABELS        CREATED\n\
             ag_1  bot   revoked  a@1, b@2  env=p,team=r  2026-11-24T09:00:00Z\n"
        );
    }
}
