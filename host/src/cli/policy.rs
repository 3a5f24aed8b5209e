//! `spendguard policy check | eval | test`: a policy in the real sandbox,
//! with no daemon and no money. `spendguard policy upload | list`: policies
//! on the daemon.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::json;
use spendguard::cases::{self, CasesFile, HistoryEntry, Outcome, RequestDoc};
use spendguard::sandbox::{LoadedPolicy, Sandbox, memory_layout};

use super::client::{Client, ConnArgs, OutputArgs};
use super::render::{self, Table};
use super::{EXIT_FAILURE, EXIT_INVALID_INPUT, LimitArgs};

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Load a module as the host would and describe it, or say why it is refused.
    Check(CheckArgs),
    /// Evaluate one request in the real sandbox and print the decision as JSON.
    Eval(EvalArgs),
    /// Run every case of a cases file in the real sandbox.
    Test(TestArgs),
    /// Register a module with the daemon as the next version of NAME (operator).
    Upload(UploadArgs),
    /// The policies registered with the daemon, every version.
    List(ListArgs),
}

pub fn run(cmd: PolicyCommand, conn: &ConnArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    match cmd {
        PolicyCommand::Check(args) => check(args),
        PolicyCommand::Eval(args) => eval(args),
        PolicyCommand::Test(args) => test(args),
        PolicyCommand::Upload(args) => upload(conn, args, out),
        PolicyCommand::List(args) => list(conn, args, out),
    }
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The policy module (.wasm).
    file: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    limits: LimitArgs,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// The policy module (.wasm).
    file: PathBuf,
    /// A request document (the `request` object of a case).
    #[arg(long, value_name = "REQ.json")]
    request: PathBuf,
    /// The config document attached with the policy (default `{}`).
    #[arg(long, value_name = "CFG.json")]
    config: Option<PathBuf>,
    /// A history list (the `history` array of a case).
    #[arg(long, value_name = "HIST.json")]
    history: Option<PathBuf>,
    /// The policy's name in reasons (default: the file's stem).
    #[arg(long)]
    name: Option<String>,
    #[command(flatten)]
    limits: LimitArgs,
}

#[derive(Debug, Args)]
pub struct TestArgs {
    /// The policy module (.wasm).
    file: PathBuf,
    /// The cases file.
    cases: PathBuf,
    /// The policy's name in reasons (default: the file's stem).
    #[arg(long)]
    name: Option<String>,
    #[command(flatten)]
    limits: LimitArgs,
}

#[derive(Debug, Args)]
pub struct UploadArgs {
    /// The policy module (.wasm), as `cargo build --target wasm32-unknown-unknown` makes it.
    file: PathBuf,
    /// The name agents attach it by (`--policy NAME` or `NAME@VERSION`):
    /// lower-case letters, digits, `-` and `_`.
    #[arg(long, value_parser = super::input::not_blank)]
    name: String,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    output: OutputArgs,
}

fn policy_name(file: &Path, name: Option<String>) -> String {
    name.unwrap_or_else(|| {
        file.file_stem().map_or_else(|| "policy".into(), |s| s.to_string_lossy().into_owned())
    })
}

/// Read and load a module; the error says which file and why.
fn load(sandbox: &Sandbox, file: &Path) -> anyhow::Result<LoadedPolicy> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read `{}`", file.display()))?;
    sandbox.load(&bytes).with_context(|| format!("`{}` refused", file.display()))
}

fn read_json<T: serde::de::DeserializeOwned>(file: &Path) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read `{}`", file.display()))?;
    serde_json::from_str(&text).with_context(|| format!("invalid `{}`", file.display()))
}

fn check(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let sandbox = Sandbox::new(args.limits.limits())?;
    let policy = match load(&sandbox, &args.file) {
        Ok(policy) => policy,
        Err(err) => {
            if args.json {
                println!(
                    "{}",
                    render::json_safe(&json!({ "ok": false, "error": format!("{err:#}") }).to_string())
                );
            } else {
                // The module's own names (a foreign import's) are in it.
                eprintln!("error: {}", render::clean(&format!("{err:#}")));
            }
            return Ok(ExitCode::from(EXIT_FAILURE));
        }
    };
    // Read again for its memory layout: `load` has checked the bytes.
    let layout = std::fs::read(&args.file).ok().and_then(|bytes| memory_layout(&bytes));
    let warnings: Vec<String> = layout.and_then(|l| l.stack_warning()).into_iter().collect();
    if args.json {
        println!(
            "{}",
            json!({
                "ok": true,
                "sha256": policy.sha256(),
                "size": policy.size(),
                "world": policy.world(),
                "imports": policy.imports(),
                "exports": policy.exports(),
                "initial_memory_bytes": layout.map(|l| l.initial_bytes),
                "stack_bytes": layout.and_then(|l| l.stack_bytes),
                "warnings": warnings,
            })
        );
    } else {
        println!("ok: `{}` loads as a spendguard policy", args.file.display());
        println!("sha256:  {}", policy.sha256());
        println!("size:    {} bytes", policy.size());
        println!("world:   {}", policy.world());
        println!("imports: {}", render::clean(&policy.imports().join(", ")));
        println!("exports: {}", render::clean(&policy.exports().join(", ")));
        if let Some(layout) = layout {
            let stack = layout.stack_bytes.map_or_else(|| "unknown".into(), |s| format!("{} KiB", s / 1024));
            println!("memory:  {} KiB at start, stack {stack}", layout.initial_bytes / 1024);
        }
        for warning in &warnings {
            eprintln!("warning: {warning}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn eval(args: EvalArgs) -> anyhow::Result<ExitCode> {
    let name = policy_name(&args.file, args.name);
    let sandbox = Sandbox::new(args.limits.limits())?;
    let policy = load(&sandbox, &args.file)?;
    let request = read_json::<RequestDoc>(&args.request)?
        .to_request()
        .with_context(|| format!("invalid `{}`", args.request.display()))?;
    let config = match &args.config {
        Some(file) => read_json::<serde_json::Value>(file)?.to_string(),
        None => cases::DEFAULT_CONFIG.to_owned(),
    };
    if config.len() > sandbox.limits().max_config_bytes {
        bail!("config is {} bytes, over the limit of {}", config.len(), sandbox.limits().max_config_bytes);
    }
    let history = match &args.history {
        Some(file) => cases::to_history(&read_json::<Vec<HistoryEntry>>(file)?)
            .with_context(|| format!("invalid `{}`", file.display()))?,
        None => Default::default(),
    };
    let outcome = cases::evaluate(&sandbox, &policy, &request, &config, history);
    let decision = outcome.decision(&name);
    let (fuel_used, elapsed, logs, fault) = match &outcome {
        Outcome::Evaluated(run) => (run.fuel_used, run.elapsed, &run.logs, run.outcome.as_ref().err()),
        Outcome::ConfigRefused(run) => (run.fuel_used, run.elapsed, &run.logs, run.outcome.as_ref().err()),
    };
    // A policy's reason and log lines are its author's text: the JSON has
    // no raw control or direction characters (the same value, escaped).
    let report = json!({
            "decision": decision.kind(),
            "reason": decision.reason(),
            "card_terms": decision.card_terms(),
            "fuel_used": fuel_used,
            "elapsed_us": u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
            "logs": logs,
            "fault": fault,
    });
    println!("{}", render::json_safe(&report.to_string()));
    Ok(ExitCode::SUCCESS)
}

fn test(args: TestArgs) -> anyhow::Result<ExitCode> {
    let name = policy_name(&args.file, args.name);
    let invalid = |err: anyhow::Error| {
        eprintln!("error: {}", render::clean(&format!("{err:#}")));
        Ok(ExitCode::from(EXIT_INVALID_INPUT))
    };
    let file: CasesFile = match read_json(&args.cases) {
        Ok(file) => file,
        Err(err) => return invalid(err),
    };
    // Every case must be well-formed before any runs: a typo is not a failure
    // of the policy.
    for case in &file.cases {
        let checked = case
            .request
            .to_request()
            .and_then(|_| cases::to_history(&case.history))
            .with_context(|| format!("case {:?} in `{}`", case.name, args.cases.display()));
        if let Err(err) = checked {
            return invalid(err);
        }
    }
    let sandbox = Sandbox::new(args.limits.limits())?;
    let policy = match load(&sandbox, &args.file) {
        Ok(policy) => policy,
        Err(err) => return invalid(err),
    };
    let (mut passed, mut failed) = (0usize, 0usize);
    for case in &file.cases {
        match case.run(&sandbox, &policy, &name) {
            Ok(_) => {
                passed += 1;
                println!("ok    {}", render::clean(&case.name));
            }
            Err(failure) => {
                failed += 1;
                println!("FAIL  {}: {}", render::clean(&case.name), render::clean(&failure.to_string()));
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::from(EXIT_FAILURE) })
}

/// The content type of a policy upload.
const WASM_CONTENT_TYPE: &str = "application/wasm";

/// A registered policy version as the daemon describes it.
#[derive(Debug, serde::Deserialize)]
struct Registered {
    name: String,
    version: serde_json::Value,
    sha256: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    created_at: Option<String>,
}

#[derive(Debug, serde::Deserialize)]
struct Registry {
    policies: Vec<Registered>,
}

/// A version as written after `@`: `3`, not `"3"`.
fn version_text(version: &serde_json::Value) -> String {
    match version {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn upload(conn: &ConnArgs, args: UploadArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    // The client is built first, so a missing token is reported before a
    // large file is read.
    let client = Client::new(conn)?;
    let bytes =
        std::fs::read(&args.file).with_context(|| format!("cannot read `{}`", args.file.display()))?;
    let reply = client.post_bytes("/v1/policies", &[("name", args.name)], WASM_CONTENT_TYPE, &bytes)?;
    // Uploaded all the same: a large stack costs memory, not correctness.
    if let Some(warning) = memory_layout(&bytes).and_then(|l| l.stack_warning()) {
        eprintln!("warning: {warning}");
    }
    if args.output.json {
        return reply.print(out);
    }
    let policy: Registered = reply.parse()?;
    writeln!(
        out,
        "uploaded {}@{}",
        render::clean(&policy.name),
        render::clean(&version_text(&policy.version))
    )?;
    render::labelled(out, "sha256", &policy.sha256)?;
    Ok(ExitCode::SUCCESS)
}

fn list(conn: &ConnArgs, args: ListArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    let reply = Client::new(conn)?.get("/v1/policies", &[])?;
    if args.output.json {
        return reply.print(out);
    }
    let registry: Registry = reply.parse()?;
    if registry.policies.is_empty() {
        writeln!(out, "no policies: upload one with `spendguard policy upload FILE.wasm --name NAME`")?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut table = Table::new(&["POLICY", "SIZE", "CREATED", "SHA256"]);
    for p in registry.policies {
        table.row(vec![
            format!("{}@{}", p.name, version_text(&p.version)),
            p.size.map_or_else(|| render::MISSING.to_owned(), |size| format!("{size} B")),
            render::or_missing(p.created_at.as_deref()),
            p.sha256,
        ]);
    }
    table.write(out)?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::super::client::responder::{conn, serve_once, text};
    use super::*;

    #[test]
    fn upload_posts_the_module_bytes_under_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("daily_limit.wasm");
        std::fs::write(&file, b"\0asm\x01\0\0\0").unwrap();
        let (url, request) = serve_once(201, r#"{"name":"daily limit","version":2,"sha256":"ab12"}"#);
        let args = UploadArgs { file, name: "daily limit".into(), output: OutputArgs { json: false } };
        let mut out = Vec::new();
        upload(&conn(&url), args, &mut out).unwrap();
        let request = request.join().unwrap();
        assert_eq!(request.method, "POST");
        assert!(
            request.target == "/v1/policies?name=daily%20limit"
                || request.target == "/v1/policies?name=daily+limit",
            "{}",
            request.target
        );
        assert_eq!(request.header("content-type"), Some("application/wasm"));
        assert_eq!(request.body, b"\0asm\x01\0\0\0");
        assert_eq!(text(out), "uploaded daily limit@2\nsha256:   ab12\n");
    }

    #[test]
    fn an_unreadable_module_is_named() {
        let args = UploadArgs {
            file: "/nonexistent/x.wasm".into(),
            name: "x".into(),
            output: OutputArgs { json: false },
        };
        let err = upload(&conn("http://127.0.0.1:9"), args, &mut Vec::new()).unwrap_err();
        assert!(format!("{err:#}").starts_with("cannot read `/nonexistent/x.wasm`"), "{err:#}");
    }

    #[test]
    fn list_shows_name_at_version() {
        let (url, request) = serve_once(
            200,
            r#"{"policies":[{"name":"daily-limit","version":"1","sha256":"ff","size":2048,
                "created_at":"2026-11-24T09:00:00Z"}]}"#,
        );
        let mut out = Vec::new();
        list(&conn(&url), ListArgs { output: OutputArgs { json: false } }, &mut out).unwrap();
        assert_eq!(request.join().unwrap().target, "/v1/policies");
        assert_eq!(
            text(out),
            "POLICY         SIZE    CREATED               SHA256\n\
             daily-limit@1  2048 B  2026-11-24T09:00:00Z  ff\n"
        );
    }
}
