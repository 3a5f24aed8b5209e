//! Growth: does a decision or a proposal get slower as the ledger grows, and
//! how much memory does the daemon take per policy loaded?
//!
//! `cargo bench -p spendguard --bench growth` (after `make policies`) runs
//! both parts; `-- ledger` or `-- rss` runs one. Method and results:
//! BENCHMARKS.md.
//!
//! **Ledger.** One SQLite store (`SqliteStorage`, as the daemon opens it)
//! filled through the storage API with what the daemon writes for a steady
//! wallet: 20 agents, one proposal every 90 s in turn (960 a day, so a 24 h
//! window holds about 48 of an agent's spends at any size), each approved
//! (a hold, a card, the audit record with its evaluation), 70 % of the cards
//! then charged (captured) and the rest left to the expiry sweep, which runs
//! every 500 spends. At each size (`SG_GROWTH_SIZES`, default
//! `1000,100000,1000000` spends) it measures:
//! - decision latency: `spend-limit` (24 h per-agent limit) evaluated in the
//!   sandbox against the store's own history (a read snapshot, as in
//!   `Storage::propose`), `SG_GROWTH_DECISIONS` times (default 2000) in the
//!   same snapshot, so its pages are read once and then cached;
//! - proposal latency: `Storage::propose` with that evaluation inside,
//!   approved, durable, `SG_GROWTH_PROPOSALS` times (default 300), the
//!   agents in turn (these proposals stay in the ledger); and the
//!   evaluation inside each ("in a proposal"): the first of a fresh
//!   snapshot after a commit, which reads its pages again.
//!
//! Beside each, the read system calls per decision or proposal (`syscr`
//! of `/proc/self/io`): SQLite reads each page missing from a connection's
//! own cache with one `pread`, so this counts the pages read again.
//!
//! The store goes in `SG_GROWTH_DIR` (default: a temporary directory in the
//! system's, on disk here); filling 1 million spends takes a while.
//!
//! **RSS.** A real `spendguard serve`: its resident memory (VmRSS and the
//! high-water mark VmHWM from `/proc`) at start, then with 1, 100 and 1000
//! (`SG_GROWTH_POLICIES`) distinct policies uploaded, each attached to an
//! agent of its own and evaluated once by a proposal, so each is compiled
//! and loaded. The policies are `spend-limit` with a custom section naming
//! each, so every one has its own sha256 and is compiled on its own.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a bench: stop on any failure

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use spendguard::cards::{AuthorizationRequest, CardKey, SimulatedIssuer};
use spendguard::decide::{PolicyResult, PolicyRun};
use spendguard::history::{History, HistoryScope};
use spendguard::money::Amount;
use spendguard::policy::{Agent, CardTerms, Decision, Merchant, SpendFilter, SpendRequest};
use spendguard::sandbox::{Limits, LoadedPolicy, Sandbox};
use spendguard::storage::sqlite::SqliteStorage;
use spendguard::storage::{Actor, CardIssuance, Decided, NewSpend, Storage, Verdict, new_ordered_id};
use support::{Daemon, env, post, send, spend_limit_module};

const AGENTS: u64 = 20;
/// One proposal every 90 s, the agents in turn: 960 a day.
const SPEND_EVERY_MS: u64 = 90_000;
/// 2026-01-01T00:00:00Z: the first spend.
const START_MS: u64 = 1_767_225_600_000;
const CARD_TTL_SECONDS: u32 = 900;
const SWEEP_EVERY: u64 = 500;
const MERCHANTS: &[(&str, &str, &str)] = &[
    ("api.openai.com", "OpenAI", "5734"),
    ("api.anthropic.com", "Anthropic", "5734"),
    ("aws.amazon.com", "AWS", "7372"),
    ("github.com", "GitHub", "5817"),
    ("www.delta.com", "Delta", "3058"),
];
const LIMIT_CONFIG: &str = r#"{"limit":"1000000000.00","currency":"USD"}"#;

fn env_list(name: &str, default: &[u64]) -> Vec<u64> {
    match std::env::var(name) {
        Ok(v) => v.split(',').map(|s| s.trim().parse().unwrap()).collect(),
        Err(_) => default.to_vec(),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let rank = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].as_secs_f64() * 1e6
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn main() {
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let runs = |part: &str| filter.as_deref().is_none_or(|f| part.contains(f));
    println!("# spendguard growth\n");
    println!("Load average at start: {}\n", load_average());
    if runs("ledger") {
        ledger();
    }
    if runs("rss") {
        rss();
    }
    println!("Load average at end: {}", load_average());
}

/// The `i`-th spend of the steady wallet.
fn nth_spend(i: u64) -> NewSpend {
    let (id, name, mcc) = MERCHANTS[(i % MERCHANTS.len() as u64) as usize];
    let received_at_ms = START_MS + i * SPEND_EVERY_MS;
    NewSpend {
        id: new_ordered_id("sp", received_at_ms),
        agent_id: format!("agent-{}", i % AGENTS),
        idempotency_key: None,
        // 1.00 to 49.99 USD.
        amount: Amount::from_units(100 + (i * 7919 % 4900) as i64, "USD").unwrap(),
        merchant: Merchant { id: id.into(), name: name.into(), mcc: mcc.into(), country: "US".into() },
        purpose: "growth benchmark".into(),
        received_at_ms,
        mandate_id: None,
    }
}

fn request_for(spend: &NewSpend) -> SpendRequest {
    SpendRequest {
        id: spend.id.clone(),
        agent: Agent { id: spend.agent_id.clone(), name: spend.agent_id.clone(), labels: Vec::new() },
        amount: spend.amount.clone(),
        merchant: spend.merchant.clone(),
        purpose: spend.purpose.clone(),
        received_at_ms: spend.received_at_ms,
        mandate: None,
    }
}

/// What `evaluate_all` in the daemon records for one allowing policy.
fn evaluation_record(policy: &LoadedPolicy, fuel: u64, elapsed: Duration) -> Vec<PolicyResult> {
    vec![PolicyResult::Ran(PolicyRun {
        policy: "spend-limit".into(),
        version: 1,
        module_sha256: policy.sha256().to_owned(),
        config_sha256: "9d7f4c1a0e8b2d3f5a6c7e9b1d2f4a6c8e0b2d4f6a8c0e2b4d6f8a0c2e4b6d8f".into(),
        decision: "allow",
        reason: None,
        card_terms: Some(CardTerms::default()),
        fault: None,
        fuel_used: fuel,
        elapsed_us: elapsed.as_micros() as u64,
        logs: Vec::new(),
    })]
}

/// The store being filled, and how to make and charge cards.
struct Ledger {
    store: SqliteStorage,
    key: Arc<CardKey>,
    issuer: Arc<SimulatedIssuer>,
    /// Spends proposed so far (the next one's index).
    spends: u64,
}

type Decide<'a> = dyn FnMut(&SpendRequest, Arc<dyn History>) -> Decided + 'a;

impl Ledger {
    fn issuance(&self) -> CardIssuance {
        CardIssuance {
            issuer: self.issuer.clone(),
            key: self.key.clone(),
            default_ttl_seconds: CARD_TTL_SECONDS,
        }
    }

    /// Propose the next spend as the daemon would, deciding with `decide`;
    /// an approved spend's card is then charged (70 %) or left to expire.
    /// Returns how long `Storage::propose` took.
    fn propose(&mut self, decide: &mut Decide<'_>) -> Duration {
        let i = self.spends;
        self.spends += 1;
        let spend = nth_spend(i);
        let request = request_for(&spend);
        let now = spend.received_at_ms;
        let started = Instant::now();
        let proposed = self
            .store
            .propose(&spend, &self.issuance(), &Actor::System, now, &mut |history| decide(&request, history))
            .unwrap();
        let took = started.elapsed();
        if let Some(card) = proposed.card
            && i % 10 < 7
        {
            let charge = AuthorizationRequest {
                pan: card.secrets.pan.clone(),
                cvv: card.secrets.cvv.clone(),
                exp_month: card.exp_month,
                exp_year: card.exp_year,
                amount: spend.amount.clone(),
                merchant_id: spend.merchant.id.clone(),
                idempotency_key: None,
            };
            let outcome = self.store.authorize(&charge, &self.key, &Actor::System, now + 5_000).unwrap();
            assert!(outcome.approved, "{outcome:?}");
        }
        if i % SWEEP_EVERY == SWEEP_EVERY - 1 {
            self.store.expire_cards(now).unwrap();
        }
        took
    }

    /// Fill up to `n` spends, each approved without running a policy (its
    /// audit record still carries an evaluation like the daemon's).
    fn fill_to(&mut self, n: u64, policy: &LoadedPolicy) {
        let record = evaluation_record(policy, 16_000, Duration::from_micros(20));
        let started = Instant::now();
        let from = self.spends;
        while self.spends < n {
            self.propose(&mut |_, _| Decided {
                verdict: Verdict::Approve(CardTerms::default()),
                evaluations: record.clone(),
            });
            if self.spends.is_multiple_of(100_000) {
                eprintln!(
                    "  filled {} spends ({:.0}/s)",
                    self.spends,
                    (self.spends - from) as f64 / started.elapsed().as_secs_f64()
                );
            }
        }
    }
}

/// Read system calls this process has made (`syscr` in `/proc/self/io`):
/// SQLite reads a page it does not hold in its own cache with one `pread`.
fn read_syscalls() -> u64 {
    let io = std::fs::read_to_string("/proc/self/io").unwrap();
    io.lines().find_map(|l| l.strip_prefix("syscr:")).and_then(|v| v.trim().parse().ok()).unwrap()
}

/// The agent's holds in spend-limit's 24 h window, as its history sees them.
fn window_count(history: &Arc<dyn History>, request: &SpendRequest) -> u32 {
    let scope = HistoryScope { agent_id: request.agent.id.clone(), currency: "USD".into() };
    let filter = SpendFilter {
        since_ms: request.received_at_ms - 24 * 3_600_000,
        merchant_id: None,
        mcc: None,
        wallet_wide: false,
        mandate_id: None,
    };
    history.summarize(&scope, &filter).unwrap().count
}

fn ledger() {
    let dir = match std::env::var_os("SG_GROWTH_DIR") {
        Some(d) => tempfile::tempdir_in(d).unwrap(),
        None => tempfile::tempdir().unwrap(),
    };
    let path = dir.path().join("spendguard.sqlite3");
    let store = SqliteStorage::open(&path).unwrap();
    store
        .deposit(&Amount::parse("1000000000.00", "USD").unwrap(), None, &Actor::System, START_MS - 1)
        .unwrap();
    let sandbox = Sandbox::new(Limits::default()).unwrap();
    let policy = sandbox.load(&spend_limit_module()).unwrap();
    assert_eq!(sandbox.validate_config(&policy, LIMIT_CONFIG).outcome, Ok(Ok(())));
    let mut ledger = Ledger {
        store,
        key: Arc::new(CardKey::generate()),
        issuer: Arc::new(SimulatedIssuer::new()),
        spends: 0,
    };
    let decisions = env("SG_GROWTH_DECISIONS", 2000) as usize;
    let proposals = env("SG_GROWTH_PROPOSALS", 300) as usize;

    println!("## Ledger growth\n");
    println!(
        "Store: {} (SQLite as the daemon opens it). Per size: {decisions} decisions, then {proposals} proposals. \
         Latencies in µs.\n",
        path.display()
    );
    println!(
        "| spends | holds in the window | database MiB | fill s | decision p50 | p90 | p99 | reads | in a proposal p50 | p99 | proposal p50 | p90 | p99 | reads |"
    );
    println!(
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    let mut rows: Vec<(u64, f64, f64)> = Vec::new();
    for size in env_list("SG_GROWTH_SIZES", &[1_000, 100_000, 1_000_000]) {
        let started = Instant::now();
        ledger.fill_to(size, &policy);
        let fill = started.elapsed();

        // Decisions: the next spend's evaluation, again and again, inside
        // one proposal's read snapshot; that proposal is then denied (a deny
        // moves no money).
        let mut timings = Vec::with_capacity(decisions);
        let reads_before = read_syscalls();
        let mut window = 0;
        ledger.propose(&mut |request, history| {
            for _ in 0..decisions {
                let t = Instant::now();
                let run = sandbox.evaluate(&policy, request, LIMIT_CONFIG, Arc::clone(&history));
                timings.push(t.elapsed());
                assert_eq!(run.outcome, Ok(Decision::Allow(CardTerms::default())), "{:?}", run.logs);
            }
            window = window_count(&history, request);
            Verdict::Deny(vec!["growth bench: measuring decisions".into()]).into()
        });
        timings.sort();
        let decision = [0.5, 0.9, 0.99].map(|p| percentile(&timings, p));
        let decision_reads = (read_syscalls() - reads_before) as f64 / decisions as f64;

        // Proposals: each decided by the policy in the sandbox, approved,
        // durable.
        let reads_before = read_syscalls();
        let mut in_proposals = Vec::with_capacity(proposals);
        let mut timings: Vec<Duration> = (0..proposals)
            .map(|_| {
                ledger.propose(&mut |request, history| {
                    let t = Instant::now();
                    let run = sandbox.evaluate(&policy, request, LIMIT_CONFIG, history);
                    let elapsed = t.elapsed();
                    in_proposals.push(elapsed);
                    assert_eq!(run.outcome, Ok(Decision::Allow(CardTerms::default())), "{:?}", run.logs);
                    Decided {
                        verdict: Verdict::Approve(CardTerms::default()),
                        evaluations: evaluation_record(&policy, run.fuel_used, elapsed),
                    }
                })
            })
            .collect();
        timings.sort();
        let proposal = [0.5, 0.9, 0.99].map(|p| percentile(&timings, p));
        // Charging 70 % of the cards and the sweeps read too: counted in.
        let proposal_reads = (read_syscalls() - reads_before) as f64 / proposals as f64;
        // The same decision as the first of its snapshot, inside each proposal.
        in_proposals.sort();
        let first = [0.5, 0.99].map(|p| percentile(&in_proposals, p));
        let mib = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0) as f64 / (1024.0 * 1024.0);
        println!(
            "| {size} | {window} | {mib:.0} | {:.0} | {:.1} | {:.1} | {:.1} | {decision_reads:.1} | {:.1} | {:.1} | {:.0} | {:.0} | {:.0} | {proposal_reads:.1} |",
            fill.as_secs_f64(),
            decision[0],
            decision[1],
            decision[2],
            first[0],
            first[1],
            proposal[0],
            proposal[1],
            proposal[2]
        );
        rows.push((size, decision[0], proposal[0]));
    }
    if let (Some(first), Some(last)) = (rows.first(), rows.last())
        && rows.len() > 1
    {
        println!(
            "\nFrom {} to {} spends: decision p50 ×{:.2}, proposal p50 ×{:.2} (target: flat within 20 %).\n",
            first.0,
            last.0,
            last.1 / first.1,
            last.2 / first.2
        );
    }
    query_plan(&path);
    ledger.store.check_invariants().unwrap();
}

/// How SQLite runs spend-limit's history query on the filled store.
fn query_plan(path: &Path) {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let plan: Vec<String> = conn
        .prepare(
            "EXPLAIN QUERY PLAN
             SELECT COALESCE(SUM(CASE WHEN r.hold_id IS NULL THEN h.units ELSE r.captured_units END), 0),
                    COUNT(CASE WHEN r.hold_id IS NULL OR r.kind = 'captured' THEN 1 END)
             FROM holds h LEFT JOIN hold_resolutions r ON r.hold_id = h.id
             WHERE h.currency = ?1 AND h.received_at_ms >= ?2 AND h.agent_id = ?3",
        )
        .unwrap()
        .query_map(rusqlite::params!["USD", 0, "agent-0"], |r| r.get::<_, String>(3))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    println!("Query plan of the history query (a copy of `summarize_query`'s SQL): {}\n", plan.join("; "));
    let counts: Vec<String> =
        ["spends", "holds", "hold_resolutions", "transfers", "entries", "cards", "authorizations", "audit"]
            .iter()
            .map(|t| {
                let n: i64 = conn.query_row(&format!("SELECT COUNT(*) FROM {t}"), [], |r| r.get(0)).unwrap();
                format!("{t} {n}")
            })
            .collect();
    println!("Rows at the end: {}\n", counts.join(", "));
}

/// (VmRSS, VmHWM) of a process, in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// `module` with a custom section naming it `i`: another sha256, the same code.
fn distinct(module: &[u8], i: u64) -> Vec<u8> {
    let name = b"spendguard-bench";
    let payload = format!("policy {i}");
    let size = 1 + name.len() + payload.len();
    assert!(size < 128, "one-byte LEB128 sizes");
    let mut out = module.to_vec();
    out.extend([0, size as u8, name.len() as u8]);
    out.extend(name);
    out.extend(payload.as_bytes());
    out
}

fn rss() {
    let module = spend_limit_module();
    let daemon = Daemon::start();
    let operator = daemon.operator.clone();
    let pid = daemon.child.id();
    let http = support::http(Duration::from_secs(120));
    daemon.deposit(&http, "1000000.00");

    println!("## Daemon memory with policies loaded\n");
    println!(
        "`spendguard serve`, pid {pid}; each policy uploaded, attached to an agent of its own and evaluated once.\n"
    );
    println!(
        "| policies | VmRSS MiB | VmHWM MiB | per policy since start KiB | upload + attach + propose s |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: |");
    let (start_rss, start_hwm) = memory_kib(pid);
    println!("| 0 | {:.1} | {:.1} | | |", start_rss as f64 / 1024.0, start_hwm as f64 / 1024.0);
    let mut loaded = 0u64;
    for target in env_list("SG_GROWTH_POLICIES", &[1, 100, 1000]) {
        let started = Instant::now();
        while loaded < target {
            let name = format!("limit-{loaded}");
            let (s, v) = send(
                &http,
                &format!("{}/v1/policies?name={name}", daemon.url),
                &operator,
                "application/wasm",
                &distinct(&module, loaded),
            );
            assert_eq!(s, 201, "{v}");
            let (s, agent) = post(
                &http,
                &format!("{}/v1/agents", daemon.url),
                &operator,
                &json!({"name": format!("agent-{loaded}"), "labels": {},
                       "policies": [{"policy": name, "config": {"limit": "1000.00", "currency": "USD"}}]}),
            );
            assert_eq!(s, 201, "{agent}");
            let (s, spend) = post(
                &http,
                &format!("{}/v1/spends", daemon.url),
                agent["token"].as_str().unwrap(),
                &json!({"amount": "1.00", "currency": "USD",
                       "merchant": {"id": "api.openai.com", "name": "OpenAI", "mcc": "5734", "country": "US"},
                       "purpose": "rss"}),
            );
            assert_eq!((s, spend["status"].as_str()), (201, Some("approved")), "{spend}");
            loaded += 1;
        }
        let (rss, hwm) = memory_kib(pid);
        println!(
            "| {target} | {:.1} | {:.1} | {:.0} | {:.1} |",
            rss as f64 / 1024.0,
            hwm as f64 / 1024.0,
            rss.saturating_sub(start_rss) as f64 / target as f64,
            started.elapsed().as_secs_f64()
        );
    }
    println!();
    drop(daemon);
}
