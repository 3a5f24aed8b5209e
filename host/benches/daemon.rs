//! End-to-end throughput: the real `spendguard serve` on 127.0.0.1, driven
//! by a load generator in this process (one keep-alive connection per
//! thread), every proposal durable before it is answered.
//!
//! `cargo bench -p spendguard --bench daemon` (after `make policies`).
//! Settings: `SG_BENCH_SECONDS` (default 10) per phase, `SG_BENCH_CONNECTIONS`
//! (default 32), `SG_BENCH_AGENTS` (default 32): connection `c` proposes
//! as agents `c`, `c + connections`, … in turn, so no two connections share
//! an agent and the per-agent turn never serializes the load; with as many
//! agents as connections each agent proposes nonstop (every spend lands in
//! its window, so its history query grows through the run), with many more
//! the load is a fleet. `SG_BENCH_WINDOW` (default `24h`): `spend-limit`'s
//! window.
//!
//! Phases: proposals (each approved by `spend-limit`, so each places a hold
//! and issues a card), then authorizations (each charging one of the cards
//! just issued, once). Prints throughput, p50, p90, p99 and max for each.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a bench: stop on any failure

mod support;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::json;
use support::{Daemon, env, post};

fn agent() -> ureq::Agent {
    support::http(Duration::from_secs(30))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// CPU used so far by the daemon and by this process (the load generator).
fn cpus(daemon: &Daemon) -> (Duration, Duration) {
    (daemon.cpu(), support::cpu_of("self"))
}

fn minus((a, b): (Duration, Duration), (c, d): (Duration, Duration)) -> (Duration, Duration) {
    (a - c, b - d)
}

fn report(what: &str, mut latencies: Vec<Duration>, elapsed: Duration, (daemon, load): (Duration, Duration)) {
    latencies.sort();
    let n = latencies.len();
    println!(
        "{what:<16} {n:>7} in {:>5.2} s = {:>7.0}/s   p50 {:>8.2?}  p90 {:>8.2?}  p99 {:>8.2?}  max {:>8.2?}   CPU each: daemon {:>4.0} µs, load generator {:>4.0} µs",
        elapsed.as_secs_f64(),
        n as f64 / elapsed.as_secs_f64(),
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.90),
        percentile(&latencies, 0.99),
        latencies[n - 1],
        daemon.as_secs_f64() * 1e6 / n as f64,
        load.as_secs_f64() * 1e6 / n as f64,
    );
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let seconds = Duration::from_secs(env("SG_BENCH_SECONDS", 10));
    let connections = env("SG_BENCH_CONNECTIONS", 32) as usize;
    let agents_n = env("SG_BENCH_AGENTS", 32) as usize;
    let window = std::env::var("SG_BENCH_WINDOW").unwrap_or_else(|_| "24h".into());
    let module = support::spend_limit_module();
    let daemon = Daemon::start();
    let (operator, network) = (daemon.operator.clone(), daemon.network.clone());

    let http = agent();
    daemon.deposit(&http, "1000000000.00");
    let (s, v) = support::send(
        &http,
        &format!("{}/v1/policies?name=spend-limit", daemon.url),
        &operator,
        "application/wasm",
        &module,
    );
    assert_eq!(s, 201, "{v}");
    let agents: Vec<String> = (0..agents_n)
        .map(|i| {
            let (s, a) = post(
                &http,
                &format!("{}/v1/agents", daemon.url),
                &operator,
                &json!({"name": format!("load-{i}"), "labels": {},
                        "policies": [{"policy": "spend-limit", "config": {"limit": "1000000000.00", "currency": "USD", "window": window}}]}),
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
    let cpu = cpus(&daemon);
    let started = Instant::now();
    let latencies: Vec<Duration> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..connections)
            .map(|c| {
                let (agents, daemon, cards) = (&agents, &daemon, &cards);
                s.spawn(move || {
                    let http = agent();
                    // This connection's agents in turn: c, c + connections, …
                    let mine_agents: Vec<&String> = agents.iter().skip(c % agents.len()).step_by(connections).collect();
                    let mut turn = 0;
                    let url = format!("{}/v1/spends", daemon.url);
                    let body = json!({"amount": "1.00", "currency": "USD",
                        "merchant": {"id": "api.openai.com", "name": "OpenAI", "mcc": "5734", "country": "US"},
                        "purpose": "load"});
                    let (mut mine, mut issued) = (Vec::new(), Vec::new());
                    while started.elapsed() < seconds {
                        let token = mine_agents[turn % mine_agents.len()];
                        turn += 1;
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
    report("proposals", latencies, started.elapsed(), minus(cpus(&daemon), cpu));

    // Authorizations: every card charged once, as fast as the network can.
    let cards = cards.into_inner().unwrap();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let cpu = cpus(&daemon);
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
    report("authorizations", latencies, started.elapsed(), minus(cpus(&daemon), cpu));
    drop(daemon);
}
