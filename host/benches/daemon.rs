//! End-to-end throughput: the real `spendguard serve` on 127.0.0.1, driven
//! by a load generator in this process (keep-alive HTTP/1.1 connections,
//! all driven by one thread), every proposal durable before it is answered.
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

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use serde_json::{Value, json};
use support::{Daemon, env, post};

fn agent() -> ureq::Agent {
    support::http(Duration::from_secs(30))
}

/// One keep-alive HTTP/1.1 connection of the load generator.
struct Client {
    authority: String,
    sender: SendRequest<Full<Bytes>>,
}

impl Client {
    async fn connect(authority: &str) -> Client {
        let stream = tokio::net::TcpStream::connect(authority).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let (sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
        tokio::spawn(connection);
        Client { authority: authority.to_owned(), sender }
    }

    /// POST a JSON body as `token`: the status and the JSON answer.
    async fn post(&mut self, path: &str, token: &str, body: Bytes) -> (u16, Value) {
        self.sender.ready().await.unwrap();
        let request = hyper::Request::post(path)
            .header(hyper::header::HOST, &self.authority)
            .header(hyper::header::AUTHORIZATION, format!("Bearer {token}"))
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .unwrap();
        let response = self.sender.send_request(request).await.unwrap();
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&body).unwrap())
    }
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

    // The load generator: one thread, every connection a task on it (as
    // `wrk` does), so that it takes as little of the two cores as it can.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let authority = daemon.url.trim_start_matches("http://").to_owned();
    let connect = || {
        runtime.block_on(async {
            let mut clients = Vec::new();
            for _ in 0..connections {
                clients.push(Client::connect(&authority).await);
            }
            clients
        })
    };

    // Proposals: each approved, each a hold and a card, each fsync'd.
    let clients = connect();
    let proposal: Bytes = json!({"amount": "1.00", "currency": "USD",
        "merchant": {"id": "api.openai.com", "name": "OpenAI", "mcc": "5734", "country": "US"},
        "purpose": "load"})
    .to_string()
    .into();
    let cpu = cpus(&daemon);
    let started = Instant::now();
    let runs = runtime.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for (c, mut client) in clients.into_iter().enumerate() {
            // This connection's agents in turn: c, c + connections, …
            let mine: Vec<String> =
                agents.iter().skip(c % agents.len()).step_by(connections).cloned().collect();
            let body = proposal.clone();
            tasks.spawn(async move {
                let (mut latencies, mut issued) = (Vec::new(), Vec::new());
                let mut turn = 0;
                while started.elapsed() < seconds {
                    let token = &mine[turn % mine.len()];
                    turn += 1;
                    let t = Instant::now();
                    let (status, spend) = client.post("/v1/spends", token, body.clone()).await;
                    latencies.push(t.elapsed());
                    assert_eq!((status, spend["status"].as_str()), (201, Some("approved")), "{spend}");
                    issued.push(spend["card"].clone());
                }
                (latencies, issued)
            });
        }
        tasks.join_all().await
    });
    let elapsed = started.elapsed();
    let cpu = minus(cpus(&daemon), cpu);
    let (latencies, cards): (Vec<Vec<Duration>>, Vec<Vec<Value>>) = runs.into_iter().unzip();
    report("proposals", latencies.concat(), elapsed, cpu);

    // Authorizations: every card charged once, as fast as the network can.
    let bodies: Vec<Bytes> = cards
        .concat()
        .iter()
        .map(|card| {
            json!({"pan": card["pan"], "cvv": card["cvv"], "exp_month": card["exp_month"],
                "exp_year": card["exp_year"], "amount": "1.00", "currency": "USD",
                "merchant_id": "api.openai.com"})
            .to_string()
            .into()
        })
        .collect();
    let bodies = Arc::new(bodies);
    let next = Arc::new(AtomicUsize::new(0));
    let clients = connect();
    let cpu = cpus(&daemon);
    let started = Instant::now();
    let latencies = runtime.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for mut client in clients {
            let (bodies, next, network) = (Arc::clone(&bodies), Arc::clone(&next), network.clone());
            tasks.spawn(async move {
                let mut latencies = Vec::new();
                while let Some(body) = bodies.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let t = Instant::now();
                    let (status, out) =
                        client.post("/v1/network/authorizations", &network, body.clone()).await;
                    latencies.push(t.elapsed());
                    assert_eq!((status, &out["approved"]), (200, &json!(true)), "{out}");
                }
                latencies
            });
        }
        tasks.join_all().await
    });
    report("authorizations", latencies.concat(), started.elapsed(), minus(cpus(&daemon), cpu));
    drop(daemon);
}
