//! Known attacks, reproduced against the real daemon and
//! the real CLI, each of which must now fail: a compiled policy swapped in
//! for another, merchant ids that imitate others, and policy or agent text
//! that would rewrite the terminal printing it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::support::{Body, Wallet, bearer, guests, loads, proposal};

// ---- the compiled-policy cache ----------------------------------------------------

/// The compiled artifacts in the data directory's cache.
fn artifacts(data: &Path) -> BTreeSet<PathBuf> {
    std::fs::read_dir(data.join(spendguard::datadir::CACHE_DIR))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "cwasm"))
        .collect()
}

/// The one artifact that `action` added to the cache.
fn new_artifact(w: &Wallet, action: impl FnOnce()) -> PathBuf {
    let before = artifacts(&w.data);
    action();
    let added: Vec<PathBuf> = artifacts(&w.data).difference(&before).cloned().collect();
    assert_eq!(added.len(), 1, "one new compiled artifact: {added:?}");
    added[0].clone()
}

/// The newest `spend` record of the audit trail.
fn last_spend_record(w: &Wallet) -> Value {
    let records = w.read("/v1/audit?limit=1000")["records"].as_array().unwrap().clone();
    records.into_iter().rev().find(|r| r["kind"] == "spend").expect("a spend record")
}

/// After its artifact was swapped or spoiled and the daemon restarted, the
/// restrictive policy (50 USD a day) is what decides: a spend over its
/// limit is denied, the audit trail names the module that ran, the bad file
/// was a miss (compiled again, logged) and not an error, and it is replaced.
#[track_caller]
fn restrictive_still_decides(w: &mut Wallet, bot: &crate::support::AgentToken, what: &str) {
    let restrictive_sha = hex::encode(Sha256::digest(guests::bytes("spend-limit")));
    let log_before = w.daemon.log().len();
    w.stop();
    w.restart();
    let over = w.propose(bot, "60.00", "api.openai.com", "5734").expect(201, what);
    assert_eq!(over["status"], "denied", "{what}: the swapped-in policy decided: {over}");
    assert!(over.get("card").is_none_or(Value::is_null), "{what}: no card: {over}");
    assert!(over["reasons"].to_string().contains("limit"), "{what}: denied by the spend limit: {over}");
    let record = last_spend_record(w);
    let text = record.to_string();
    assert!(text.contains(&restrictive_sha), "{what}: the trail names the module that ran: {record}");
    assert!(!text.contains("allow-all allows"), "{what}: the permissive module's log in the trail: {record}");
    assert_eq!(loads(w), (1, 0), "{what}: the artifact was refused and the module compiled again");
    let log = w.daemon.log();
    assert!(log[log_before..].contains("fails its MAC"), "{what}: the miss is logged");
    // Replaced by a good one: the next start loads it.
    w.stop();
    w.restart();
    let small = w.propose(bot, "1.00", "api.openai.com", "5734").expect(201, what);
    assert_eq!(small["status"], "approved", "{what}: {small}");
    assert_eq!(loads(w), (0, 1), "{what}: the replaced artifact loads");
}

#[test]
fn a_compiled_policy_runs_only_for_the_module_engine_and_limits_it_was_made_for() {
    let mut w = Wallet::new();
    w.deposit("100000.00");
    let permissive = new_artifact(&w, || {
        w.upload("permissive", "guest-allow-all");
    });
    let restrictive = new_artifact(&w, || {
        w.upload("restrictive", "spend-limit");
    });
    let bot = w.create_agent(
        "bot",
        json!([{"policy": "restrictive", "config": {"limit": "50.00", "currency": "USD"}}]),
    );
    let other = w.create_agent("other", json!([{"policy": "permissive", "config": {}}]));
    assert_eq!(
        w.propose(&other, "60.00", "api.openai.com", "5734").expect(201, "permissive")["status"],
        "approved"
    );

    // The attack: another policy's artifact, valid and MACed, copied over
    // the restrictive policy's file name.
    std::fs::copy(&permissive, &restrictive).unwrap();
    restrictive_still_decides(&mut w, &bot, "the permissive policy's artifact swapped in");

    // One byte changed.
    let mut bytes = std::fs::read(&restrictive).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&restrictive, &bytes).unwrap();
    restrictive_still_decides(&mut w, &bot, "a tampered byte");

    // An artifact the same daemon made under other limits (the permissive
    // module's), copied over the restrictive one's name for these limits.
    let config = w.data.with_file_name("other-limits.toml");
    std::fs::write(&config, "[sandbox]\nfuel = 30000000\n").unwrap();
    w.stop();
    w.restart_with(&["--config", config.to_str().unwrap()]);
    let other_limits = new_artifact(&w, || {
        let reply = w.propose(&other, "1.00", "api.openai.com", "5734").expect(201, "other limits");
        assert_eq!(reply["status"], "approved", "{reply}");
    });
    assert_ne!(other_limits, permissive, "other limits, another file");
    std::fs::copy(&other_limits, &restrictive).unwrap();
    restrictive_still_decides(&mut w, &bot, "the permissive artifact made under other limits");
}

// ---- merchant ids that imitate others ------------------------------------------

/// `аpi.openai.com` with a Cyrillic `а`, and `api．openai．com` with
/// full-width dots: shown to an approver, each reads as OpenAI's id.
const LOOKALIKES: [&str; 4] = [
    "\u{430}pi.openai.com",
    "api\u{ff0e}openai\u{ff0e}com",
    // Every letter Cyrillic, looking like `scope.co`.
    "\u{455}\u{441}\u{43e}\u{440}\u{435}.\u{441}\u{43e}",
    // A Latin alpha for the `a`.
    "\u{251}pi.openai.com",
];

#[test]
fn merchant_ids_that_imitate_others_are_refused_everywhere_they_enter() {
    let w = Wallet::new();
    w.deposit("1000.00");
    w.upload("permissive", "guest-allow-all");
    let bot = w.create_agent("bot", json!([{"policy": "permissive", "config": {}}]));
    let genuine = w.propose(&bot, "10.00", "api.openai.com", "5734").expect(201, "a plain ASCII id");
    assert_eq!(genuine["status"], "approved", "{genuine}");
    let card = genuine["card"].clone();

    let before = crate::support::db_dump(&w.data);
    for id in LOOKALIKES {
        let reply = w.post("/v1/spends", &bot.token, proposal("10.00", id, "5734"));
        reply.refused(422, "confusable_merchant", &format!("a proposal at {id:?}"));
        let message = reply.json["error"]["message"].as_str().unwrap();
        assert!(message.contains("merchant.id") && message.contains("xn--"), "says what to send: {message}");
        // The same id from the card network: refused, the card untouched.
        let body = json!({
            "pan": card["pan"], "cvv": card["cvv"], "exp_month": card["exp_month"],
            "exp_year": card["exp_year"], "amount": "10.00", "currency": "USD", "merchant_id": id,
        });
        w.post("/v1/network/authorizations", &w.network, body).refused(
            422,
            "confusable_merchant",
            &format!("an authorization at {id:?}"),
        );
    }
    // With an idempotency key too, and through the CLI.
    let reply = w.send(
        "POST",
        "/v1/spends",
        Some(&bearer(&bot.token)),
        &[("Idempotency-Key", "k1")],
        Body::Json(proposal("10.00", LOOKALIKES[0], "5734")),
    );
    reply.refused(422, "confusable_merchant", "with an idempotency key");
    let out = w.cli(
        &bot.token,
        &[
            "spend",
            "propose",
            "--amount",
            "10.00",
            "--currency",
            "USD",
            "--merchant-id",
            LOOKALIKES[1],
            "--merchant-name",
            "OpenAI",
            "--mcc",
            "5734",
            "--purpose",
            "credits",
        ],
    );
    assert_ne!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("A-label"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(crate::support::db_dump(&w.data), before, "a refused id records nothing");

    // The genuine card still pays the genuine merchant.
    assert_eq!(w.charge(&card, "10.00", "api.openai.com"), crate::support::approved());
    // An international id that imitates nothing is taken as sent.
    let intl = w.propose(&bot, "1.00", "bücher.de", "5942").expect(201, "an international id");
    assert_eq!(intl["card"]["merchant_id"], "bücher.de", "{intl}");
}

#[test]
fn policy_eval_and_test_refuse_a_lookalike_merchant_id_as_the_daemon_does() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = guests::wasm("guest-allow-all");
    let request = dir.path().join("request.json");
    std::fs::write(
        &request,
        json!({"amount": "1.00", "currency": "USD", "merchant": {"id": LOOKALIKES[0], "mcc": "5734"}})
            .to_string(),
    )
    .unwrap();
    let out = crate::support::spendguard()
        .args(["policy", "eval", wasm.to_str().unwrap(), "--request", request.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stdout));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("request.merchant.id") && err.contains("Cyrillic"), "{err}");
}

/// A merchant's *name* is free text (a shop may be called "Café 東京"), so one
/// that mixes scripts is accepted, and flagged to whoever reads it.
#[test]
fn a_merchant_name_mixing_scripts_is_flagged_to_the_approver() {
    let w = Wallet::new();
    w.deposit("1000.00");
    w.upload("threshold", "approval-threshold");
    let bot = w.create_agent(
        "bot",
        json!([{"policy": "threshold", "config": {"threshold": "5.00", "currency": "USD"}}]),
    );
    let mut body = proposal("10.00", "api.openai.com", "5734");
    body["merchant"]["name"] = json!("\u{41e}penAI");
    let spend = w.post("/v1/spends", &bot.token, body).expect(201, "a lookalike name");
    assert_eq!(spend["status"], "pending_approval", "{spend}");
    let id = spend["id"].as_str().unwrap();
    for args in [vec!["approval", "list"], vec!["spend", "show", id]] {
        let out = w.cli(&w.operator, &args);
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(text.contains("mixes scripts (Cyrillic, Latin)"), "{args:?} flags it: {text}");
    }
    let mut plain = proposal("10.00", "api.openai.com", "5734");
    plain["merchant"]["name"] = json!("Café 東京");
    let spend = w.post("/v1/spends", &bot.token, plain).expect(201, "a plain name");
    let out = w.cli(&w.operator, &["spend", "show", spend["id"].as_str().unwrap()]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("mixes scripts"), "a name in one script per word");
}

// ---- text a policy or an agent wrote, on the operator's terminal ----------------

/// What the hostile guest's `escapes` attack writes, raw: an ANSI colour, a
/// CR/LF forging a line, a right-to-left override.
const RAW: [char; 4] = ['\u{1b}', '\r', '\n', '\u{202e}'];

/// `out` holds none of [`RAW`] except the line breaks between its own lines,
/// and shows the policy's escapes escaped.
#[track_caller]
fn shows_escaped(what: &str, out: &std::process::Output) {
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{what}: {err}");
    for line in text.lines() {
        assert!(!line.contains(RAW), "{what}: a raw control or override in {line:?}");
    }
    assert!(!err.contains(RAW), "{what}: a raw control or override on stderr: {err:?}");
    assert!(!text.contains("\r"), "{what}");
    assert!(!text.lines().any(|l| l.starts_with("forged line")), "{what}: a forged line: {text}");
    assert!(
        text.contains("\\u{1b}[31mAPPROVED\\u{1b}[0m\\u{d}\\u{a}forged line \\u{202e}moc.live"),
        "{what}: the escapes are shown escaped: {text}"
    );
}

/// `--json` output: valid JSON, the same value, no raw override or control.
#[track_caller]
fn json_without_raw(what: &str, out: &std::process::Output) -> Value {
    assert_eq!(out.status.code(), Some(0), "{what}: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout.clone()).unwrap();
    assert!(!text.trim_end().contains(RAW), "{what}: a raw character in {text:?}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {text}"))
}

#[test]
fn the_cli_prints_escapes_from_a_policy_escaped() {
    // Offline: `policy eval` prints JSON; `policy test` prints lines.
    let dir = tempfile::tempdir().unwrap();
    let wasm = guests::wasm("guest-hostile");
    let request = dir.path().join("request.json");
    std::fs::write(
        &request,
        r#"{"amount": "1.00", "currency": "USD", "merchant": {"id": "api.openai.com", "mcc": "5734"}}"#,
    )
    .unwrap();
    let config = dir.path().join("config.json");
    std::fs::write(&config, r#"{"attack": "escapes"}"#).unwrap();
    let out = crate::support::spendguard()
        .args(["policy", "eval", wasm.to_str().unwrap()])
        .args(["--request", request.to_str().unwrap(), "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    let json = json_without_raw("policy eval", &out);
    assert_eq!(json["decision"], "deny", "{json}");
    let reason = json["reason"].as_str().unwrap();
    assert!(
        reason.contains("\u{1b}[31m") && reason.contains("\r\n") && reason.contains('\u{202e}'),
        "{reason:?}"
    );
    assert_eq!(json["logs"].as_array().unwrap().len(), 2, "{json}");

    let cases = dir.path().join("cases.json");
    std::fs::write(
        &cases,
        json!({"cases": [{"name": "escapes", "config": {"attack": "escapes"},
            "request": {"amount": "1.00", "currency": "USD", "merchant": {"id": "api.openai.com", "mcc": "5734"}},
            "expect": {"decision": "allow"}}]})
        .to_string(),
    )
    .unwrap();
    let out = crate::support::spendguard()
        .args(["policy", "test", wasm.to_str().unwrap(), cases.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("FAIL  escapes"), "{text}");
    assert!(!text.contains('\r') && !text.lines().any(|l| l.contains(RAW)), "{text:?}");
    assert_eq!(text.lines().last(), Some("0 passed, 1 failed"), "{text}");

    // Through the daemon: the deny reason and the log lines are stored as
    // the policy wrote them, and printed escaped.
    let w = Wallet::new();
    w.deposit("100.00");
    w.upload("hostile", "guest-hostile");
    let bot = w.create_agent("bot", json!([{"policy": "hostile", "config": {"attack": "escapes"}}]));
    let spend = w.propose(&bot, "10.00", "api.openai.com", "5734").expect(201, "propose");
    assert_eq!(spend["status"], "denied", "{spend}");
    let id = spend["id"].as_str().unwrap();
    shows_escaped("spend show (operator)", &w.cli(&w.operator, &["spend", "show", id]));
    shows_escaped("spend show (agent)", &w.cli(&bot.token, &["spend", "show", id]));
    let out = w.cli(&w.operator, &["audit", "list"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    for line in text.lines() {
        assert!(!line.contains(RAW), "audit list: a raw control or override in {line:?}");
    }
    let shown = json_without_raw("spend show --json", &w.cli(&w.operator, &["spend", "show", "--json", id]));
    assert_eq!(shown["reasons"], spend["reasons"], "the same value");
    let audit = json_without_raw("audit list --json", &w.cli(&w.operator, &["audit", "list", "--json"]));
    let spend_record =
        audit["records"].as_array().unwrap().iter().rev().find(|r| r["kind"] == "spend").unwrap();
    assert!(
        spend_record.to_string().contains("\\u001b[31m"),
        "the record keeps what the policy wrote: {spend_record}"
    );
}
