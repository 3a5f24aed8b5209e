//! Many proposals at once through one daemon or several, and the check that
//! what was approved never passed a limit.

use std::sync::Barrier;

use crate::support::{AgentToken, Wallet, XorShift};

/// An amount in cents as the API writes it: `1234` is `"12.34"`.
pub(crate) fn from_cents(units: i64) -> String {
    format!("{}.{:02}", units / 100, units % 100)
}

/// An amount as the API writes it, in cents: `"12.34"` is `1234` (USD: at
/// most two decimals).
pub(crate) fn to_cents(amount: &str) -> i64 {
    let (units, fraction) = amount.split_once('.').unwrap_or((amount, ""));
    assert!(fraction.len() <= 2, "a USD amount has at most 2 decimals: {amount}");
    let fraction = format!("{fraction:0<2}");
    units.parse::<i64>().unwrap() * 100 + fraction.parse::<i64>().unwrap()
}

/// `n` proposals of seeded amounts from `CONNECTIONS` connections at once,
/// proposal `i` by `agents[i % len]` through `daemons[i % len]`; each
/// amount in cents with its reply.
pub(crate) fn race_daemon(
    daemons: &[&Wallet],
    agents: &[AgentToken],
    rng: &mut XorShift,
    n: usize,
    max_cents: u64,
) -> Vec<(i64, serde_json::Value)> {
    race(rng, n, max_cents, |i, amount| {
        daemons[i % daemons.len()]
            .propose(&agents[i % agents.len()], amount, "api.openai.com", "5734")
            .expect(201, &format!("proposal {i}"))
    })
}

/// `n` requests of seeded amounts (1 to `max_cents` cents) from
/// `CONNECTIONS` connections released at once: `send(i, amount)` makes
/// request `i` and returns its reply. Each amount in cents with its reply.
pub(crate) fn race(
    rng: &mut XorShift,
    n: usize,
    max_cents: u64,
    send: impl Fn(usize, &str) -> serde_json::Value + Sync,
) -> Vec<(i64, serde_json::Value)> {
    const CONNECTIONS: usize = 16;
    let amounts: Vec<i64> = (0..n).map(|_| 1 + (rng.next() % max_cents) as i64).collect();
    let barrier = Barrier::new(CONNECTIONS);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..CONNECTIONS)
            .map(|c| {
                let (amounts, barrier, send) = (&amounts, &barrier, &send);
                s.spawn(move || {
                    barrier.wait();
                    (c..n)
                        .step_by(CONNECTIONS)
                        .map(|i| (amounts[i], send(i, &from_cents(amounts[i]))))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    })
}

/// Approved cents; every denied amount no longer fitted in `limit`.
#[track_caller]
pub(crate) fn check_daemon_race(
    what: &str,
    seed: u64,
    results: &[(i64, serde_json::Value)],
    limit: i64,
) -> i64 {
    let total: i64 = results.iter().filter(|(_, r)| r["status"] == "approved").map(|(c, _)| c).sum();
    assert!(total <= limit, "{what} (seed {seed}): {total} cents approved past {limit}");
    assert!(total > 0, "{what} (seed {seed}): nothing approved");
    for (c, r) in results {
        assert!(r["status"] == "approved" || r["status"] == "denied", "{what}: {r}");
        if r["status"] == "denied" {
            assert!(*c > limit - total, "{what} (seed {seed}): {c} denied with {} left: {r}", limit - total);
        }
    }
    total
}
