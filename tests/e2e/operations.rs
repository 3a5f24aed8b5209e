//! Operating the daemon: its metrics, and a graceful shutdown that keeps
//! what was committed.

use std::collections::BTreeMap;

use serde_json::json;

use crate::support::{Body, Reply, Wallet};

/// The samples of a Prometheus text exposition: (name, labels) → value.
fn samples(text: &str) -> BTreeMap<(String, BTreeMap<String, String>), f64> {
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("a sample: {line}"));
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, rest.strip_suffix('}').unwrap_or_else(|| panic!("labels: {line}"))),
            None => (series, ""),
        };
        let labels = labels
            .split(',')
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (k, v) = l.split_once('=').unwrap_or_else(|| panic!("a label: {line}"));
                (k.to_owned(), v.trim_matches('"').to_owned())
            })
            .collect();
        out.insert((name.to_owned(), labels), value.parse().unwrap_or_else(|_| panic!("a value: {line}")));
    }
    out
}

#[test]
fn metrics_count_outcomes() {
    let w = Wallet::new();
    w.deposit("100.00");
    w.upload("merchant-rules", "merchant-rules");
    w.upload("approval-threshold", "approval-threshold");
    let bot = w.create_agent(
        "bot",
        json!([
            {"policy": "merchant-rules", "config": {"block_mcc": ["7995"]}},
            {"policy": "approval-threshold", "config": {"threshold": "50.00", "currency": "USD"}},
        ]),
    );
    let unguarded = w.create_agent("unguarded", json!([]));
    let status = |r: Reply| r.expect(201, "propose")["status"].clone();
    assert_eq!(status(w.propose(&bot, "10.00", "api.openai.com", "5734")), "approved");
    assert_eq!(status(w.propose(&bot, "10.00", "bets.example.com", "7995")), "denied");
    assert_eq!(status(w.propose(&unguarded, "10.00", "api.openai.com", "5734")), "denied");
    assert_eq!(status(w.propose(&bot, "60.00", "api.openai.com", "5734")), "pending_approval");

    let reply = w.send("GET", "/metrics", None, &[], Body::None);
    assert_eq!(reply.status, 200, "{}", reply.text);
    let samples = samples(&reply.text);
    let get = |name: &str, labels: &[(&str, &str)]| {
        let labels = labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        samples.get(&(name.to_owned(), labels)).copied()
    };
    for (outcome, n) in [("approved", 1.0), ("denied", 2.0), ("pending_approval", 1.0)] {
        assert_eq!(get("spendguard_proposals_total", &[("outcome", outcome)]), Some(n), "{}", reply.text);
    }
    for (balance, v) in [("available", 90.0), ("held", 10.0), ("spent", 0.0)] {
        let got = get("spendguard_wallet_balance", &[("currency", "USD"), ("balance", balance)]);
        assert_eq!(got, Some(v), "{balance}: {}", reply.text);
    }
}

#[test]
fn graceful_shutdown() {
    let mut w = Wallet::new();
    let health = w.send("GET", "/healthz", None, &[], Body::None).expect(200, "healthz");
    assert_eq!(health, json!({"ok": true}));
    w.deposit("10.00");
    w.upload("spend-limit", "spend-limit");
    let bot = w.create_agent(
        "bot",
        json!([{"policy": "spend-limit", "config": {"limit": "50.00", "currency": "USD", "window": "24h"}}]),
    );
    w.stop();
    // What was committed before the stop is there after it.
    w.restart();
    w.assert_wallet("10.00", "0.00", "0.00");
    // A restarted daemon compiles stored policies on first use — while
    // storage is not locked (this once deadlocked).
    let spend = w.propose(&bot, "1.00", "api.openai.com", "5734").expect(201, "propose after a restart");
    assert_eq!(spend["status"], "approved", "{spend}");
    w.assert_wallet("9.00", "1.00", "0.00");
}
