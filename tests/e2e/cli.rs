//! The offline CLI, `spendguard policy check | eval | test`, as a user runs it.

use std::path::Path;
use std::process::Output;

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::support::{guests, path, spendguard, stderr, stdout};

/// Run `spendguard` with `args` to its end.
fn run(args: &[&str]) -> Output {
    spendguard().args(args).output().expect("the binary runs")
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let file = dir.join(name);
    std::fs::write(&file, text).unwrap();
    file.to_str().unwrap().to_owned()
}

const REQUEST: &str = r#"{"amount": "10.00", "currency": "USD",
    "merchant": {"id": "api.openai.com", "name": "OpenAI", "mcc": "5734", "country": "US"}}"#;

#[test]
fn check_describes_a_policy_or_says_why_it_is_refused() {
    let wasm = guests::wasm("spend-limit");
    let out = run(&["policy", "check", path(&wasm)]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let sha = hex::encode(Sha256::digest(std::fs::read(&wasm).unwrap()));
    let text = stdout(&out);
    assert!(text.contains(&sha), "{text}");
    // The SDK builds the newest contract; a module of the frozen 0.1.0 one
    // is described as such.
    assert!(text.contains("spendguard:policy/history@0.2.0"), "{text}");
    assert!(text.contains("spendguard:policy@0.2.0"), "{text}");
    assert!(text.contains("evaluate"), "{text}");
    let old = run(&["policy", "check", path(&guests::wasm("guest-v0-1-rules"))]);
    assert_eq!(old.status.code(), Some(0), "{}", stderr(&old));
    assert!(stdout(&old).contains("spendguard:policy@0.1.0"), "{}", stdout(&old));

    let out = run(&["policy", "check", "--json", path(&wasm)]);
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["sha256"], sha.as_str());
    assert_eq!(json["size"], std::fs::metadata(&wasm).unwrap().len());
    // Built with the repository's `.cargo/config.toml`, as the SDK's README
    // tells authors: a 64 KiB stack, nothing to warn about.
    assert_eq!(json["stack_bytes"], 65536, "{json}");
    assert_eq!(json["warnings"], serde_json::json!([]), "{json}");
    assert!(text.contains("stack 64 KiB"), "{text}");
    assert!(!stderr(&out).contains("warning"), "{}", stderr(&out));

    let out = run(&["policy", "check", path(&guests::wasm("guest-wasi-import"))]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("`wasi_snapshot_preview1::random_get`"), "{}", stderr(&out));

    let out = run(&["policy", "check", "/nonexistent/policy.wasm"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("cannot read `/nonexistent/policy.wasm`"), "{}", stderr(&out));
}

#[test]
fn eval_prints_the_decision_as_json_whatever_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let req = write(dir.path(), "req.json", REQUEST);
    let cfg = write(dir.path(), "cfg.json", r#"{"limit": "50.00", "currency": "USD", "window": "24h"}"#);
    let hist = write(
        dir.path(),
        "hist.json",
        r#"[{"amount": "45.00", "currency": "USD", "merchant_id": "api.openai.com", "mcc": "5734",
             "at": "2026-11-24T09:00:00Z", "agent": "self"}]"#,
    );
    let wasm = guests::wasm("spend-limit");

    let out = run(&["policy", "eval", path(&wasm), "--request", &req, "--config", &cfg]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["decision"], "allow", "{json}");
    assert!(json["fuel_used"].as_u64().unwrap() > 0);

    let out = run(&["policy", "eval", path(&wasm), "--request", &req, "--config", &cfg, "--history", &hist]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["decision"], "deny", "45 + 10 is over 50: {json}");
    assert!(json["reason"].is_string());
    assert!(json["logs"].is_array());

    // A fault is a decision too: exit 0, deny, and the fault named.
    let attack = write(dir.path(), "attack.json", r#"{"attack": "loop"}"#);
    let out = run(&[
        "policy",
        "eval",
        path(&guests::wasm("guest-hostile")),
        "--request",
        &req,
        "--config",
        &attack,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["decision"], "deny");
    assert_eq!(json["fault"]["kind"], "out_of_fuel");
    assert_eq!(json["reason"], "policy `guest_hostile` failed: out of fuel");

    // Input that cannot be loaded: exit 1 with a message naming the problem.
    let bad = write(
        dir.path(),
        "bad.json",
        r#"{"amount": "10.001", "currency": "USD", "merchant": {"id": "x", "mcc": "5734"}}"#,
    );
    let out = run(&["policy", "eval", path(&wasm), "--request", &bad]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("more decimals than USD allows"), "{}", stderr(&out));
    let unknown = write(dir.path(), "unknown.json", r#"{"amount": "1", "currency": "USD", "merchnat": {}}"#);
    let out = run(&["policy", "eval", path(&wasm), "--request", &unknown]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("merchnat"), "{}", stderr(&out));
    let out = run(&["policy", "eval", path(&guests::wasm("guest-wrong-exports")), "--request", &req]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn test_runs_every_example_policys_cases_file() {
    for (name, dir) in guests::crates("policies") {
        let cases = dir.join("cases.json");
        let out = run(&["policy", "test", path(&guests::wasm(&name)), path(&cases)]);
        let text = stdout(&out);
        assert_eq!(out.status.code(), Some(0), "{name}:\n{text}{}", stderr(&out));
        let n = serde_json::from_str::<Value>(&std::fs::read_to_string(&cases).unwrap()).unwrap()["cases"]
            .as_array()
            .unwrap()
            .len();
        assert_eq!(text.lines().last(), Some(format!("{n} passed, 0 failed").as_str()), "{name}:\n{text}");
        assert_eq!(text.lines().filter(|l| l.starts_with("ok ")).count(), n, "{name}:\n{text}");
    }
}

#[test]
fn test_reports_failures_and_refuses_invalid_input() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = guests::wasm("spend-limit");
    let cases = write(
        dir.path(),
        "cases.json",
        &format!(
            r#"{{"cases": [
                {{"name": "right", "config": {{"limit": "50.00", "currency": "USD"}}, "request": {REQUEST},
                  "expect": {{"decision": "allow"}}}},
                {{"name": "wrong on purpose", "config": {{"limit": "5.00", "currency": "USD"}}, "request": {REQUEST},
                  "expect": {{"decision": "allow"}}}}
            ]}}"#
        ),
    );
    let out = run(&["policy", "test", path(&wasm), &cases]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("ok    right"), "{text}");
    assert!(text.contains("FAIL  wrong on purpose: expected allow, got deny"), "{text}");
    assert_eq!(text.lines().last(), Some("1 passed, 1 failed"));

    let typo = write(
        dir.path(),
        "typo.json",
        &format!(r#"{{"cases": [{{"name": "t", "request": {REQUEST}, "expect": {{"decison": "allow"}}}}]}}"#),
    );
    let out = run(&["policy", "test", path(&wasm), &typo]);
    assert_eq!(out.status.code(), Some(2), "{}", stdout(&out));
    assert!(stderr(&out).contains("decison"), "{}", stderr(&out));

    let bad_amount = write(
        dir.path(),
        "bad.json",
        r#"{"cases": [{"name": "t", "request": {"amount": "-1", "currency": "USD", "merchant": {"id": "x", "mcc": "5734"}},
            "expect": {"decision": "allow"}}]}"#,
    );
    let out = run(&["policy", "test", path(&wasm), &bad_amount]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("must be positive"), "{}", stderr(&out));

    let out = run(&["policy", "test", path(&guests::wasm("guest-wasi-import")), &cases]);
    assert_eq!(out.status.code(), Some(2));
}
