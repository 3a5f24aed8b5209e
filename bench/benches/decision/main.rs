//! Decision latency, in-process: one spend decided by the example policies
//! in the sandbox (a fresh instance per policy per evaluation, as the
//! daemon does), by the same rules in Cedar (request construction
//! included), and by the same rules as plain Rust (the floor).
//!
//! Before timing, the three engines must agree on a set of requests (allow,
//! deny, require-approval and the edges). Then each engine decides the same
//! allowed request many times, interleaved in blocks so a change of load on
//! the machine touches all three alike; every iteration is timed on its own
//! and the report gives p50, p90, p99 and the mean, and the ratios.
//!
//! `make bench`, or `cargo bench -p spendguard-bench [-- CASE]`, where CASE
//! selects cases whose name contains it. Environment:
//! `SPENDGUARD_BENCH_ITERATIONS` (timed iterations per engine and case,
//! default 20000), `SPENDGUARD_BENCH_WARMUP` (default 2000),
//! `SPENDGUARD_BENCH_ENGINES` (a comma-separated subset of
//! `wasm,cedar,native`, for profiling one), `SPENDGUARD_BENCH_SHOW_CEDAR=1`
//! (print the Cedar policy sets).

mod cedar;
// The guests built from source exactly as the end-to-end tests build them.
#[path = "../../../tests/e2e/support/guests.rs"]
#[allow(dead_code, clippy::expect_used, clippy::panic)]
mod guests;
mod native;
mod rules;
mod wasm;

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context as _, bail, ensure};
use spendguard::history::History;
use spendguard::policy::SpendRequest;

use crate::cedar::CedarRules;
use crate::rules::Outcome;
use crate::wasm::WasmPolicies;

/// Iterations run back to back per engine before switching to the next: long
/// enough to keep caches warm, short enough to interleave load changes.
const BLOCK: usize = 500;
const DEFAULT_ITERATIONS: usize = 20_000;
const DEFAULT_WARMUP: usize = 2_000;
/// The issue's latency target for one example policy alone, in µs.
const P99_TARGET_US: f64 = 50.0;

struct Settings {
    iterations: usize,
    warmup: usize,
    engines: Vec<String>,
    filter: Option<String>,
    show_cedar: bool,
}

impl Settings {
    fn read() -> anyhow::Result<Self> {
        let number = |var: &str, default: usize| -> anyhow::Result<usize> {
            match std::env::var(var) {
                Ok(v) => v.parse().with_context(|| format!("`{var}` must be a whole number, got `{v}`")),
                Err(_) => Ok(default),
            }
        };
        let engines = std::env::var("SPENDGUARD_BENCH_ENGINES")
            .unwrap_or_else(|_| "wasm,cedar,native".into())
            .split(',')
            .map(|e| e.trim().to_owned())
            .collect();
        // `cargo bench` passes `--bench`; the first other argument selects cases.
        let filter = std::env::args().skip(1).find(|a| !a.starts_with("--"));
        Ok(Settings {
            iterations: number("SPENDGUARD_BENCH_ITERATIONS", DEFAULT_ITERATIONS)?.max(BLOCK),
            warmup: number("SPENDGUARD_BENCH_WARMUP", DEFAULT_WARMUP)?,
            engines,
            filter,
            show_cedar: std::env::var("SPENDGUARD_BENCH_SHOW_CEDAR").is_ok_and(|v| v == "1"),
        })
    }

    fn runs(&self, engine: &str) -> bool {
        self.engines.iter().any(|e| e == engine)
    }
}

/// What one timed decision gave: the outcome, or a fault of the engine (a
/// Wasm policy past its wall-clock deadline on a loaded machine). A fault
/// is timed and counted like any decision, not dropped.
type Timed = Result<Outcome, String>;

/// One engine deciding the timed request, for the timing loop.
struct Engine<'a> {
    name: &'static str,
    decide: Box<dyn FnMut() -> Timed + 'a>,
    samples: Vec<u64>,
    faults: Vec<String>,
}

impl<'a> Engine<'a> {
    fn new(name: &'static str, decide: impl FnMut() -> Timed + 'a) -> Self {
        Engine { name, decide: Box::new(decide), samples: Vec::new(), faults: Vec::new() }
    }
}

/// More faults than this share of the timed iterations stops the run: the
/// figures would describe failures, not decisions.
const MAX_FAULT_SHARE: f64 = 0.01;

/// Latency percentiles of one engine on one case, in nanoseconds.
#[derive(Debug, Clone, Copy)]
struct Summary {
    p50: u64,
    p90: u64,
    p99: u64,
    mean: u64,
    faults: usize,
}

impl Summary {
    fn of(samples: &mut [u64], faults: usize) -> Summary {
        samples.sort_unstable();
        // Nearest rank: the smallest sample with at least p% at or below it.
        let rank = |p: usize| samples[(samples.len() * p).div_ceil(100).saturating_sub(1)];
        let total: u128 = samples.iter().map(|&s| u128::from(s)).sum();
        let mean = u64::try_from(total / samples.len().max(1) as u128).unwrap_or(u64::MAX);
        Summary { p50: rank(50), p90: rank(90), p99: rank(99), mean, faults }
    }
}

/// One row of the report.
struct Row {
    case: String,
    policies: usize,
    fuel: Option<u64>,
    wasm: Option<Summary>,
    cedar: Option<Summary>,
    native: Option<Summary>,
}

fn main() -> anyhow::Result<()> {
    let settings = Settings::read()?;
    let history: Arc<dyn History> = rules::history()?;
    let timed = rules::timed_request()?;
    let requests = rules::agreement_requests()?;
    let wasm = WasmPolicies::load()?;
    let cases: Vec<_> = rules::cases()
        .into_iter()
        .filter(|c| settings.filter.as_ref().is_none_or(|f| c.name.contains(f.as_str())))
        .collect();

    println!("# spendguard decision latency");
    println!();
    println!(
        "{} timed iterations per engine and case after {} warm-up, interleaved in blocks of {BLOCK}.",
        settings.iterations, settings.warmup
    );
    println!("Load average at start: {}", load_average());
    println!(
        "Timer overhead (Instant::now + elapsed), p50: {} ns, included in every figure.",
        timer_overhead()
    );
    println!();

    println!("## Agreement (before timing)");
    println!();
    let mut prepared = Vec::new();
    for case in &cases {
        let wasm_rules = wasm.attach(&case.rules)?;
        let cedar_rules = CedarRules::new(&case.rules)?;
        if settings.show_cedar {
            println!(
                "Cedar policies of `{}`:\n```cedar\n{}```\n",
                case.name,
                cedar::policy_text(&case.rules)
            );
        }
        let mut seen = [0usize; 3];
        for request in &requests {
            let w = wasm_rules.decide(request, &history);
            let n = native::decide(&case.rules, request, &*history);
            let c = cedar_rules.decide(request, &*history)?;
            ensure!(
                w == n && w.outcome == c,
                "`{}` on {}: Wasm {w:?}, native {n:?}, Cedar {c:?}",
                case.name,
                describe(request)
            );
            seen[w.outcome as usize] += 1;
        }
        let verdict = wasm_rules.decide(&timed, &history);
        ensure!(
            verdict.outcome == Outcome::Allow,
            "`{}` does not allow the timed request: {verdict:?}",
            case.name
        );
        println!(
            "- `{}`: Wasm, Cedar and native agree on {} requests ({} allow, {} require approval, {} deny)",
            case.name,
            requests.len(),
            seen[0],
            seen[1],
            seen[2]
        );
        prepared.push((case, wasm_rules, cedar_rules));
    }
    println!();

    let mut rows = Vec::new();
    for (case, wasm_rules, cedar_rules) in &prepared {
        let mut engines = Vec::new();
        if settings.runs("wasm") {
            engines.push(Engine::new("wasm", || wasm_rules.decide_timed(&timed, &history)));
        }
        if settings.runs("cedar") {
            engines.push(Engine::new("cedar", || {
                cedar_rules.decide(&timed, &*history).map_err(|e| format!("{e:#}"))
            }));
        }
        if settings.runs("native") {
            engines
                .push(Engine::new("native", || Ok(native::decide(&case.rules, &timed, &*history).outcome)));
        }
        measure(&mut engines, &settings, Outcome::Allow).with_context(|| format!("case `{}`", case.name))?;
        let mut row = Row {
            case: case.name.to_owned(),
            policies: case.rules.len(),
            fuel: Some(wasm_rules.fuel(&timed, &history)?),
            wasm: None,
            cedar: None,
            native: None,
        };
        for engine in &mut engines {
            let summary = Some(Summary::of(&mut engine.samples, engine.faults.len()));
            match engine.name {
                "wasm" => row.wasm = summary,
                "cedar" => row.cedar = summary,
                _ => row.native = summary,
            }
        }
        rows.push(row);
    }

    // The baseline: an evaluation in the sandbox with next to no policy in
    // it, to tell the sandbox's own cost from the policies'.
    if settings.runs("wasm") && settings.filter.as_ref().is_none_or(|f| "baseline".contains(f.as_str())) {
        let policy = wasm.module(wasm::BASELINE)?;
        let sandbox = &wasm.sandbox;
        let mut engines = vec![Engine::new("wasm", || {
            let run = sandbox.evaluate(policy, &timed, wasm::BASELINE_CONFIG, Arc::clone(&history));
            match run.outcome {
                Ok(decision) if decision.kind() == "allow" => Ok(Outcome::Allow),
                Ok(_) => Ok(Outcome::Deny),
                Err(fault) => Err(format!("fault after {:?}: {fault}", run.elapsed)),
            }
        })];
        measure(&mut engines, &settings, Outcome::Allow).context("baseline")?;
        let fuel = sandbox.evaluate(policy, &timed, wasm::BASELINE_CONFIG, Arc::clone(&history)).fuel_used;
        rows.push(Row {
            case: "baseline: allow-only guest".into(),
            policies: 1,
            fuel: Some(fuel),
            wasm: engines.first_mut().map(|e| Summary::of(&mut e.samples, e.faults.len())),
            cedar: None,
            native: None,
        });
    }

    report(&rows);
    println!();
    println!("Load average at end: {}", load_average());
    Ok(())
}

/// Warm every engine up, then time them in turns of [`BLOCK`] iterations
/// until each has `settings.iterations` samples.
fn measure(engines: &mut [Engine<'_>], settings: &Settings, expected: Outcome) -> anyhow::Result<()> {
    for engine in engines.iter_mut() {
        for _ in 0..settings.warmup {
            let _ = black_box((engine.decide)());
        }
        engine.samples.reserve(settings.iterations);
    }
    let mut done = 0;
    while done < settings.iterations {
        let block = BLOCK.min(settings.iterations - done);
        for engine in engines.iter_mut() {
            for _ in 0..block {
                let started = Instant::now();
                let timed = black_box((engine.decide)());
                let took = started.elapsed();
                match timed {
                    Ok(outcome) if outcome == expected => {}
                    Ok(outcome) => {
                        bail!("{} decided {outcome:?} while timed, expected {expected:?}", engine.name)
                    }
                    Err(fault) => engine.faults.push(fault),
                }
                engine.samples.push(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX));
            }
        }
        done += block;
    }
    for engine in engines.iter() {
        if engine.faults.len() as f64 > settings.iterations as f64 * MAX_FAULT_SHARE {
            bail!(
                "{} faulted {} times in {} iterations, first: {}",
                engine.name,
                engine.faults.len(),
                settings.iterations,
                engine.faults[0]
            );
        }
        if let Some(first) = engine.faults.first() {
            println!(
                "note: {} faulted {} times in {} timed iterations (timed and counted), first: {first}",
                engine.name,
                engine.faults.len(),
                settings.iterations
            );
        }
    }
    Ok(())
}

fn report(rows: &[Row]) {
    let us = |ns: u64| format!("{:.2}", ns as f64 / 1000.0);
    let cell = |s: Option<Summary>, f: fn(&Summary) -> u64| s.map_or_else(|| "–".to_owned(), |s| us(f(&s)));
    let ratio = |a: Option<Summary>, b: Option<Summary>, f: fn(&Summary) -> u64, digits: usize| match (a, b) {
        (Some(a), Some(b)) if f(&b) > 0 => format!("{:.*}", digits, f(&a) as f64 / f(&b) as f64),
        _ => "–".to_owned(),
    };

    println!("## Latency per decision, µs");
    println!();
    println!("| case | policies | Wasm fuel | engine | p50 | p90 | p99 | mean | faults |");
    println!("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |");
    for row in rows {
        for (engine, s) in [("wasm", row.wasm), ("cedar", row.cedar), ("native", row.native)] {
            if s.is_none() {
                continue;
            }
            let fuel = if engine == "wasm" {
                row.fuel.map_or_else(String::new, |f| f.to_string())
            } else {
                String::new()
            };
            println!(
                "| {} | {} | {fuel} | {engine} | {} | {} | {} | {} | {} |",
                row.case,
                row.policies,
                cell(s, |s| s.p50),
                cell(s, |s| s.p90),
                cell(s, |s| s.p99),
                cell(s, |s| s.mean),
                s.map_or(0, |s| s.faults),
            );
        }
    }
    println!();
    println!("## Ratios");
    println!();
    println!("| case | Wasm/Cedar p50 | Wasm/Cedar p99 | Wasm/native p50 | Wasm/native p99 |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for row in rows.iter().filter(|r| r.cedar.is_some() || r.native.is_some()) {
        println!(
            "| {} | {} | {} | {} | {} |",
            row.case,
            ratio(row.wasm, row.cedar, |s| s.p50, 2),
            ratio(row.wasm, row.cedar, |s| s.p99, 2),
            ratio(row.wasm, row.native, |s| s.p50, 0),
            ratio(row.wasm, row.native, |s| s.p99, 0),
        );
    }
    println!();
    println!("## Targets: one example policy alone, Wasm p50 ≤ Cedar p50 and Wasm p99 ≤ {P99_TARGET_US} µs");
    println!();
    println!("| policy | Wasm/Cedar p50 | ≤ 1.0 | Wasm p99 µs | ≤ {P99_TARGET_US} µs |");
    println!("| --- | ---: | --- | ---: | --- |");
    for row in rows.iter().filter(|r| r.policies == 1 && r.cedar.is_some()) {
        let (Some(w), Some(c)) = (row.wasm, row.cedar) else { continue };
        let r = w.p50 as f64 / c.p50.max(1) as f64;
        let p99 = w.p99 as f64 / 1000.0;
        println!(
            "| {} | {r:.2} | {} | {p99:.2} | {} |",
            row.case,
            if r <= 1.0 { "met" } else { "missed" },
            if p99 <= P99_TARGET_US { "met" } else { "missed" },
        );
    }
}

/// What it costs to time an iteration at all.
fn timer_overhead() -> u64 {
    let mut samples: Vec<u64> = (0..100_000)
        .map(|_| {
            let started = Instant::now();
            let took = black_box(started).elapsed();
            u64::try_from(took.as_nanos()).unwrap_or(u64::MAX)
        })
        .collect();
    Summary::of(&mut samples, 0).p50
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map_or_else(|_| "unknown".into(), |s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
}

fn describe(request: &SpendRequest) -> String {
    format!("{} at `{}` ({})", request.amount, request.merchant.id, request.merchant.mcc)
}
