//! End-to-end throughput: the real `spendguard serve` on 127.0.0.1, driven
//! by a load generator in this process (one keep-alive connection per
//! thread), every proposal durable before it is answered.
//!
//! `cargo bench -p spendguard --bench daemon` (after `make policies`).
//! Settings: `SG_BENCH_SECONDS` (default 10) per phase, `SG_BENCH_CONNECTIONS`
//! (default 32), `SG_BENCH_AGENTS` (default 32; each connection proposes as
//! one agent, so the per-agent turn never serializes the load).
//!
//! Phases: proposals (each approved by `spend-limit`, so each places a hold
//! and issues a card), then authorizations (each charging one of the cards
//! just issued, once). Prints throughput, p50, p90, p99 and max for each.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a bench: stop on any failure

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

struct Daemon {
    child: Child,
    url: String,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

fn post(http: &ureq::Agent, url: &str, token: &str, body: &Value) -> (u16, Value) {
    let mut r = http
        .post(url)
        .header("Authorization", format!("Bearer {token}"))
        .header("Content-Type", "application/json")
        .send(body.to_string())
        .unwrap();
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

fn report(what: &str, mut latencies: Vec<Duration>, elapsed: Duration) {
    latencies.sort();
    let n = latencies.len();
    println!(
        "{what:<16} {n:>7} in {:>5.2} s = {:>7.0}/s   p50 {:>8.2?}  p90 {:>8.2?}  p99 {:>8.2?}  max {:>8.2?}",
        elapsed.as_secs_f64(),
        n as f64 / elapsed.as_secs_f64(),
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.90),
        percentile(&latencies, 0.99),
        latencies[n - 1],
    );
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let seconds = Duration::from_secs(env("SG_BENCH_SECONDS", 10));
    let connections = env("SG_BENCH_CONNECTIONS", 32) as usize;
    let agents_n = env("SG_BENCH_AGENTS", 32) as usize;
    let wasm = root().join("target/wasm32-unknown-unknown/release/spend_limit.wasm");
    let module = std::fs::read(&wasm)
        .unwrap_or_else(|e| panic!("{}: {e} (run `make policies` first)", wasm.display()));

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let bin = env!("CARGO_BIN_EXE_spendguard");
    let out =
        Command::new(bin).args(["init", "--data-dir", data.to_str().unwrap(), "--json"]).output().unwrap();
    assert!(out.status.success(), "init: {}", String::from_utf8_lossy(&out.stderr));
    let tokens: Value = serde_json::from_slice(&out.stdout).unwrap();
    let (operator, network) = (
        tokens["operator_token"].as_str().unwrap().to_owned(),
        tokens["network_token"].as_str().unwrap().to_owned(),
    );
    let mut child = Command::new(bin)
        .args(["serve", "--data-dir", data.to_str().unwrap(), "--listen", "127.0.0.1:0"])
        .env("SPENDGUARD_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let url = line.trim().strip_prefix("spendguard listening on ").expect("the daemon's address").to_owned();
    let daemon = Daemon { child, url };

    let http = agent();
    let (s, _) = post(
        &http,
        &format!("{}/v1/wallet/deposits", daemon.url),
        &operator,
        &json!({"amount": "1000000000.00", "currency": "USD"}),
    );
    assert_eq!(s, 201);
    let mut r = http
        .post(&format!("{}/v1/policies?name=spend-limit", daemon.url))
        .header("Authorization", format!("Bearer {operator}"))
        .header("Content-Type", "application/wasm")
        .send(&module[..])
        .unwrap();
    assert_eq!(r.status().as_u16(), 201, "{}", r.body_mut().read_to_string().unwrap());
    let agents: Vec<String> = (0..agents_n)
        .map(|i| {
            let (s, a) = post(
                &http,
                &format!("{}/v1/agents", daemon.url),
                &operator,
                &json!({"name": format!("load-{i}"), "labels": {},
                        "policies": [{"policy": "spend-limit", "config": {"limit": "1000000000.00", "currency": "USD"}}]}),
            );
            assert_eq!(s, 201, "{a}");
            a["token"].as_str().unwrap().to_owned()
        })
        .collect();
    println!(
        "spendguard end to end: {connections} connections, {agents_n} agents, {} s per phase, on {} cores",
        seconds.as_secs(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    // Proposals: each approved, each a hold and a card, each fsync'd.
    let cards = Mutex::new(Vec::new());
    let started = Instant::now();
    let latencies: Vec<Duration> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..connections)
            .map(|c| {
                let (agents, daemon, cards) = (&agents, &daemon, &cards);
                s.spawn(move || {
                    let http = agent();
                    let token = &agents[c % agents.len()];
                    let url = format!("{}/v1/spends", daemon.url);
                    let body = json!({"amount": "1.00", "currency": "USD",
                        "merchant": {"id": "api.openai.com", "name": "OpenAI", "mcc": "5734", "country": "US"},
                        "purpose": "load"});
                    let (mut mine, mut issued) = (Vec::new(), Vec::new());
                    while started.elapsed() < seconds {
                        let t = Instant::now();
                        let (status, spend) = post(&http, &url, token, &body);
                        mine.push(t.elapsed());
                        assert_eq!((status, spend["status"].as_str()), (201, Some("approved")), "{spend}");
                        issued.push(spend["card"].clone());
                    }
                    cards.lock().unwrap().extend(issued);
                    mine
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    report("proposals", latencies, started.elapsed());

    // Authorizations: every card charged once, as fast as the network can.
    let cards = cards.into_inner().unwrap();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let started = Instant::now();
    let latencies: Vec<Duration> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..connections)
            .map(|_| {
                let (cards, next, daemon, network) = (&cards, &next, &daemon, &network);
                s.spawn(move || {
                    let http = agent();
                    let url = format!("{}/v1/network/authorizations", daemon.url);
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(card) = cards.get(i) else { break };
                        let body = json!({"pan": card["pan"], "cvv": card["cvv"], "exp_month": card["exp_month"],
                            "exp_year": card["exp_year"], "amount": "1.00", "currency": "USD",
                            "merchant_id": "api.openai.com"});
                        let t = Instant::now();
                        let (status, out) = post(&http, &url, network, &body);
                        mine.push(t.elapsed());
                        assert_eq!((status, &out["approved"]), (200, &json!(true)), "{out}");
                    }
                    mine
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    report("authorizations", latencies, started.elapsed());
    drop(daemon);
}
