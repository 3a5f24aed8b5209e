//! Races on one wallet, through the example policies built from source and
//! run in the real sandbox: many threads proposing at once against a
//! rolling-window limit, a wallet-wide limit and a nearly empty wallet, and
//! an operator's approve, deny and expiry racing on one pending spend.
//!
//! Every run is seeded (`SPENDGUARD_SEED` replays one) and checked to the
//! cent: what was committed never exceeds the limit or the balance, and no
//! proposal was denied that still fitted (the history only grows here, so a
//! denied amount must exceed what is left at the end). Written against the
//! `Storage` trait, like `storage.rs`, so every backend runs them.

use std::collections::BTreeMap;
use std::sync::{Arc, Barrier, OnceLock};

use spendguard::decide::Tally;
use spendguard::history::History;
use spendguard::money::Amount;
use spendguard::policy::{Agent, Merchant, SpendRequest};
use spendguard::sandbox::{Limits, LoadedPolicy, Sandbox};
use spendguard::storage::INSUFFICIENT_FUNDS;
use spendguard::storage::{
    Actor, CardIssuance, Decided, NewSpend, SpendRecord, SpendStatus, Storage, StorageError, new_id,
};

use crate::support::{
    Backend, Kind, XorShift, check_daemon_race, from_cents, guests, on_each_backend, race_daemon, seed,
    simulated_cards,
};

/// 2026-11-24T12:00:00Z.
const T0: u64 = 1_795_521_600_000;

/// Seeded runs per test, each on a fresh wallet.
const RUNS: u64 = 8;
/// Proposals per run, and the threads that send them at once.
const PROPOSALS: usize = 200;
const THREADS: usize = 16;

/// The sandbox and the example policies, compiled once for every test here.
struct Policies {
    sandbox: Sandbox,
    spend_limit: LoadedPolicy,
    approval_threshold: LoadedPolicy,
}

fn policies() -> &'static Policies {
    static POLICIES: OnceLock<Policies> = OnceLock::new();
    POLICIES.get_or_init(|| {
        // A generous deadline: these tests are about races, and sixteen
        // threads on a loaded 2-core machine can be descheduled for longer
        // than the default 100 ms in the middle of an evaluation.
        let limits = Limits { deadline: std::time::Duration::from_secs(10), ..Limits::default() };
        let sandbox = Sandbox::new(limits).unwrap();
        let spend_limit = sandbox.load(&guests::bytes("spend-limit")).unwrap();
        let approval_threshold = sandbox.load(&guests::bytes("approval-threshold")).unwrap();
        Policies { sandbox, spend_limit, approval_threshold }
    })
}

/// Policies attached to an agent: each with its config.
type Attached = Vec<(&'static str, &'static LoadedPolicy, String)>;

fn usd(units: i64) -> Amount {
    Amount::from_units(units, "USD").unwrap()
}

fn request(id: &str, agent_id: &str, amount: &Amount, merchant: &Merchant, at: u64) -> SpendRequest {
    SpendRequest {
        id: id.to_owned(),
        agent: Agent { id: agent_id.to_owned(), name: agent_id.to_owned(), labels: Vec::new() },
        amount: amount.clone(),
        merchant: merchant.clone(),
        purpose: "race".into(),
        received_at_ms: at,
        mandate: None,
    }
}

/// What the daemon does with a request's policies: every one runs, a deny
/// wins, then an escalation; the card gets the narrowest terms.
fn decide(attached: &Attached, request: &SpendRequest, history: Arc<dyn History>) -> Decided {
    let sandbox = &policies().sandbox;
    let mut tally = Tally::default();
    for (name, policy, config) in attached {
        let run = sandbox.evaluate(policy, request, config, Arc::clone(&history));
        tally.add(run.decision(name));
    }
    tally.verdict().into()
}

fn merchant() -> Merchant {
    Merchant { id: "api.openai.com".into(), name: "OpenAI".into(), mcc: "5734".into(), country: "US".into() }
}

/// One proposal through `decide`.
fn propose(
    storage: &dyn Storage,
    cards: &CardIssuance,
    agent: &str,
    attached: &Attached,
    units: i64,
    at: u64,
) -> Result<SpendRecord, StorageError> {
    let spend = NewSpend {
        id: new_id("sp"),
        agent_id: agent.to_owned(),
        idempotency_key: None,
        amount: usd(units),
        merchant: merchant(),
        purpose: "race".into(),
        received_at_ms: at,
        mandate_id: None,
    };
    let req = request(&spend.id, agent, &spend.amount, &spend.merchant, at);
    let mut decide = |history: Arc<dyn History>| decide(attached, &req, history);
    storage.propose(&spend, cards, &Actor::System, at, &mut decide).map(|p| p.spend)
}

/// `PROPOSALS` proposals of seeded amounts (1 cent to `max_units`), from
/// `THREADS` threads released at once; proposal `i` comes from
/// `agents[i % agents.len()]`. Every result, with its amount.
fn race(
    b: &Backend,
    agents: &[(String, Attached)],
    rng: &mut XorShift,
    max_units: i64,
) -> Vec<(i64, SpendRecord)> {
    let amounts: Vec<i64> = (0..PROPOSALS).map(|_| 1 + (rng.next() % max_units as u64) as i64).collect();
    let barrier = Barrier::new(THREADS);
    let cards = simulated_cards();
    let mut results = Vec::new();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let (amounts, barrier, storage, cards) = (&amounts, &barrier, &b.storage, &cards);
                s.spawn(move || {
                    barrier.wait();
                    let mut out = Vec::new();
                    for i in (t..PROPOSALS).step_by(THREADS) {
                        let (agent, attached) = &agents[i % agents.len()];
                        let at = T0 + i as u64;
                        let record = propose(&**storage, cards, agent, attached, amounts[i], at)
                            .unwrap_or_else(|e| panic!("proposal {i} failed: {e}"));
                        out.push((amounts[i], record));
                    }
                    out
                })
            })
            .collect();
        for h in handles {
            results.extend(h.join().unwrap());
        }
    });
    assert_eq!(results.len(), PROPOSALS);
    results
}

fn approved_units(results: &[(i64, SpendRecord)]) -> i64 {
    results.iter().filter(|(_, r)| r.status == SpendStatus::Approved).map(|(u, _)| u).sum()
}

/// The USD balances: available, held, spent.
fn balances(storage: &dyn Storage) -> (i64, i64, i64) {
    let all = storage.balances().unwrap();
    let usd = all.iter().find(|b| b.currency == "USD").expect("a USD balance");
    (usd.available, usd.held, usd.spent)
}

/// A limit of `limit` units: nothing committed past it, and every denied
/// proposal was one that no longer fitted.
#[track_caller]
fn assert_within(what: &str, seed: u64, results: &[(i64, SpendRecord)], limit: i64) {
    let total = approved_units(results);
    assert!(total <= limit, "{what} (seed {seed}): {total} units approved past a limit of {limit}");
    for (units, r) in results {
        if r.status == SpendStatus::Denied {
            assert!(
                *units > limit - total,
                "{what} (seed {seed}): {units} units denied with {} left at the end: {:?}",
                limit - total,
                r.reasons
            );
        }
        assert!(
            r.reasons.iter().all(|reason| !reason.contains("fault") && !reason.contains("exceeded")),
            "{what} (seed {seed}): a policy faulted: {:?}",
            r.reasons
        );
    }
    assert!(total > 0, "{what} (seed {seed}): nothing was approved");
}

fn spend_limit(config: serde_json::Value) -> Attached {
    vec![("spend-limit", &policies().spend_limit, config.to_string())]
}

fn one_agent_racing_a_rolling_window_limit(kind: Kind) {
    let base = seed("one_agent_racing_a_rolling_window_limit");
    for run in 0..RUNS {
        let seed = base.wrapping_add(run);
        let mut rng = XorShift::new(seed);
        let b = kind.fresh();
        b.storage.deposit(&usd(1_000_000), None, &Actor::System, T0 - 7_200_000).unwrap();
        let limit = 2_000 + (rng.next() % 4_000) as i64;
        let attached =
            spend_limit(serde_json::json!({"limit": from_cents(limit), "currency": "USD", "window": "1h"}));
        // Spends before the window hold money but must not count.
        let cards = simulated_cards();
        let early = propose(&*b.storage, &cards, "bot", &attached, limit, T0 - 3_600_001).unwrap();
        assert_eq!(early.status, SpendStatus::Approved, "seed {seed}");

        let results = race(&b, &[("bot".into(), attached)], &mut rng, 500);
        assert_within("one agent, a rolling window", seed, &results, limit);
        let (_, held, _) = balances(&*b.storage);
        assert_eq!(held, limit + approved_units(&results), "seed {seed}: the holds are the approvals");
        b.storage.check_invariants().unwrap();
    }
}

fn agents_racing_a_wallet_wide_limit(kind: Kind) {
    let base = seed("agents_racing_a_wallet_wide_limit");
    for run in 0..RUNS {
        let seed = base.wrapping_add(run);
        let mut rng = XorShift::new(seed);
        let b = kind.fresh();
        b.storage.deposit(&usd(1_000_000), None, &Actor::System, T0).unwrap();
        let limit = 3_000 + (rng.next() % 5_000) as i64;
        let shared = serde_json::json!({"limit": from_cents(limit), "currency": "USD", "wallet_wide": true});
        let agents: Vec<(String, Attached)> =
            (0..6).map(|a| (format!("agent-{a}"), spend_limit(shared.clone()))).collect();
        let results = race(&b, &agents, &mut rng, 500);
        assert_within("six agents, a wallet-wide limit", seed, &results, limit);
        // Each agent's share is whatever it won; together they fit.
        let mut by_agent = BTreeMap::new();
        for (units, r) in results.iter().filter(|(_, r)| r.status == SpendStatus::Approved) {
            *by_agent.entry(r.agent_id.clone()).or_insert(0) += units;
        }
        assert_eq!(by_agent.values().sum::<i64>(), approved_units(&results));
        b.storage.check_invariants().unwrap();
    }
}

fn agents_racing_a_nearly_empty_wallet(kind: Kind) {
    let base = seed("agents_racing_a_nearly_empty_wallet");
    for run in 0..RUNS {
        let seed = base.wrapping_add(run);
        let mut rng = XorShift::new(seed);
        let b = kind.fresh();
        let funds = 500 + (rng.next() % 3_000) as i64;
        b.storage.deposit(&usd(funds), None, &Actor::System, T0).unwrap();
        let generous = serde_json::json!({"limit": "1000.00", "currency": "USD"});
        let agents: Vec<(String, Attached)> =
            (0..4).map(|a| (format!("agent-{a}"), spend_limit(generous.clone()))).collect();
        let results = race(&b, &agents, &mut rng, 300);
        assert_within("four agents, a nearly empty wallet", seed, &results, funds);
        for (_, r) in results.iter().filter(|(_, r)| r.status == SpendStatus::Denied) {
            assert_eq!(r.reasons, [INSUFFICIENT_FUNDS], "seed {seed}: only the funds deny here");
        }
        let total = approved_units(&results);
        assert_eq!(balances(&*b.storage), (funds - total, total, 0), "seed {seed}: to the cent");
        b.storage.check_invariants().unwrap();
    }
}

/// How an operator's action on a pending spend ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resolution {
    Approved,
    Denied,
    Expired,
}

fn approve_deny_and_expiry_race_on_one_pending_spend(kind: Kind) {
    const APPROVAL_TTL_MS: u64 = 600_000;
    const ROUNDS: u64 = 40;
    let base = seed("approve_deny_and_expiry_race_on_one_pending_spend");
    let mut rng = XorShift::new(base);
    let b = kind.fresh();
    b.storage.deposit(&usd(1_000_000), None, &Actor::System, T0).unwrap();
    let attached: Attached = vec![(
        "approval-threshold",
        &policies().approval_threshold,
        r#"{"threshold": "5.00", "currency": "USD"}"#.into(),
    )];
    let cards = simulated_cards();
    let mut seen = BTreeMap::new();
    for round in 0..ROUNDS {
        let at = T0 + round * 1000;
        let pending = propose(&*b.storage, &cards, "bot", &attached, 1_000, at).unwrap();
        assert_eq!(pending.status, SpendStatus::PendingApproval, "round {round}");
        let id = pending.id.as_str();
        // The last moment the approval is open, and the first it has lapsed.
        let (open, lapsed) = (at + APPROVAL_TTL_MS - 1, at + APPROVAL_TTL_MS);
        // Which of the three starts first varies with the seed.
        let order = rng.next() % 6;
        let barrier = Barrier::new(3);
        let outcomes: Vec<Option<Resolution>> = std::thread::scope(|s| {
            let approve = || {
                barrier.wait();
                let mut again = |spend: &SpendRecord, history: Arc<dyn History>| {
                    let req = request(&spend.id, &spend.agent_id, &spend.amount, &spend.merchant, at);
                    decide(&attached, &req, history)
                };
                b.storage
                    .approve(id, 900, APPROVAL_TTL_MS, &Actor::System, open, &mut again)
                    .ok()
                    .map(|_| Resolution::Approved)
            };
            let deny = || {
                barrier.wait();
                b.storage
                    .deny(id, "no", APPROVAL_TTL_MS, &Actor::System, open)
                    .ok()
                    .map(|_| Resolution::Denied)
            };
            let expire = || {
                barrier.wait();
                let n = b.storage.expire_approvals(APPROVAL_TTL_MS, lapsed).unwrap();
                (n == 1).then_some(Resolution::Expired)
            };
            let handles = match order {
                0 => [s.spawn(approve), s.spawn(deny), s.spawn(expire)],
                1 => [s.spawn(approve), s.spawn(expire), s.spawn(deny)],
                2 => [s.spawn(deny), s.spawn(approve), s.spawn(expire)],
                3 => [s.spawn(deny), s.spawn(expire), s.spawn(approve)],
                4 => [s.spawn(expire), s.spawn(approve), s.spawn(deny)],
                _ => [s.spawn(expire), s.spawn(deny), s.spawn(approve)],
            };
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let won: Vec<Resolution> = outcomes.into_iter().flatten().collect();
        assert_eq!(won.len(), 1, "seed {base}, round {round}: exactly one resolution, got {won:?}");
        *seen.entry(format!("{:?}", won[0])).or_insert(0) += 1;

        let record = b.storage.spend(id).unwrap().unwrap();
        let audited = b
            .storage
            .audit_records(0, usize::MAX)
            .unwrap()
            .into_iter()
            .filter(|a| a.kind == "approval" && a.record.contains(id))
            .count();
        assert_eq!(audited, 1, "seed {base}, round {round}: one audit record of the resolution");
        match won[0] {
            Resolution::Approved => assert_eq!(record.status, SpendStatus::Approved, "round {round}"),
            Resolution::Denied | Resolution::Expired => {
                assert_eq!(record.status, SpendStatus::Denied, "round {round}: {record:?}")
            }
        }
        b.storage.check_invariants().unwrap();
    }
    // Every approved spend holds its 10.00; nothing else is held.
    let approved = seen.get("Approved").copied().unwrap_or(0);
    assert_eq!(balances(&*b.storage), (1_000_000 - approved * 1_000, approved * 1_000, 0), "{seen:?}");
    println!("resolutions over {ROUNDS} races: {seen:?}");
}

// ---- the same races through the daemon ------------------------------------------

#[test]
fn through_the_daemon_racing_proposals_never_pass_a_limit_or_the_balance() {
    let seed = seed("through_the_daemon_racing_proposals_never_pass_a_limit_or_the_balance");
    let mut rng = XorShift::new(seed);
    let mut w = crate::support::Wallet::new();
    // As in the in-process races: a deadline no descheduling reaches.
    let config = w.data.with_file_name("serve.toml");
    std::fs::write(&config, format!("{}[sandbox]\ndeadline = 10000\n", crate::support::NO_RATE_LIMIT))
        .unwrap();
    w.stop();
    w.restart_with(&["--config", config.to_str().unwrap()]);
    w.upload("spend-limit", "spend-limit");
    let window = 2_000 + (rng.next() % 3_000) as i64;
    // Above the window's limit: `bot`'s spend counts against it too.
    let shared = window + 1_000 + (rng.next() % 3_000) as i64;
    let slack = 100 + (rng.next() % 1_500) as i64;
    w.deposit(&from_cents(window + shared + slack));

    // Hundreds from one agent, over many connections, against its window.
    let bot = w.create_agent(
        "bot",
        serde_json::json!([{"policy": "spend-limit", "config": {"limit": from_cents(window), "currency": "USD", "window": "1h"}}]),
    );
    let one = race_daemon(&[&w], &[bot], &mut rng, 200, 300);
    let spent_one = check_daemon_race("one agent, a rolling window", seed, &one, window);

    // Several agents sharing a wallet-wide limit.
    let wide = serde_json::json!([{"policy": "spend-limit",
        "config": {"limit": from_cents(shared), "currency": "USD", "window": "1h", "wallet_wide": true}}]);
    let fleet: Vec<_> = (0..4).map(|i| w.create_agent(&format!("fleet-{i}"), wide.clone())).collect();
    // The window's spend by `bot` counts wallet-wide too.
    let several = race_daemon(&[&w], &fleet, &mut rng, 200, 300);
    let spent_fleet =
        check_daemon_race("four agents, a wallet-wide limit", seed, &several, shared - spent_one);

    // And a nearly empty wallet, with limits that do not bind.
    let left = window + shared + slack - spent_one - spent_fleet;
    let free =
        serde_json::json!([{"policy": "spend-limit", "config": {"limit": "100000.00", "currency": "USD"}}]);
    let spenders: Vec<_> = (0..4).map(|i| w.create_agent(&format!("spender-{i}"), free.clone())).collect();
    let last = race_daemon(&[&w], &spenders, &mut rng, 200, 300);
    let spent_last = check_daemon_race("four agents, a nearly empty wallet", seed, &last, left);
    for (_, r) in last.iter().filter(|(_, r)| r["status"] == "denied") {
        assert_eq!(r["reasons"], serde_json::json!([INSUFFICIENT_FUNDS]), "{r}");
    }

    let held = spent_one + spent_fleet + spent_last;
    w.assert_wallet(&from_cents(left - spent_last), &from_cents(held), "0.00");
    assert_eq!(w.read("/v1/audit/verify")["ok"], true);
}

on_each_backend!(
    one_agent_racing_a_rolling_window_limit,
    agents_racing_a_wallet_wide_limit,
    agents_racing_a_nearly_empty_wallet,
    approve_deny_and_expiry_race_on_one_pending_spend,
);
