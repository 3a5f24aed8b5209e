//! A policy that misbehaves on purpose. Its config picks the attack:
//! `{"attack": "loop"}`. With `"none"` it behaves and allows, so the same
//! module also shows the host still works after an attack.

use std::hint::black_box;
use std::sync::atomic::{AtomicU32, Ordering};

use serde::Deserialize;
use spendguard_sdk::{CardTerms, Decimal, Decision, Money, Policy, SpendFilter, SpendRequest, history, log};

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum Attack {
    /// Behave: allow.
    None,
    /// Spin forever.
    Loop,
    /// Allocate until memory runs out.
    Memory,
    /// Recurse without end.
    Recursion,
    /// Panic with a message.
    Panic,
    /// Deny with a 3 MiB reason.
    HugeReason,
    /// Log one 1 MiB line.
    HugeLog,
    /// Log a short line, a thousand times.
    LogFlood,
    /// Ask history a million times.
    HistoryFlood,
    /// Allow with a card cap in another currency.
    ForeignCap,
    /// Escalate, the approved card capped in another currency.
    EscalationForeignCap,
    /// Escalate, the approved card living zero seconds.
    EscalationZeroTtl,
    /// Escalate with a 3 MiB reason.
    HugeEscalation,
    /// Count calls in a static: a fresh instance always says 1.
    Count,
    /// Use twice the SDK's 1 MiB arena in blocks of many sizes, grow a
    /// string and two interleaved vectors by pushes, then check every byte:
    /// allow only if nothing was overwritten.
    BigHeap,
    /// Deny with a reason, and log lines, that carry terminal escapes, CR/LF
    /// and a right-to-left override: what would repaint or reorder a
    /// terminal printing them raw.
    Escapes,
}

/// What [`Attack::Escapes`] writes: an ANSI colour, a forged second line,
/// and U+202E (RIGHT-TO-LEFT OVERRIDE).
const ESCAPES: &str = "\u{1b}[31mAPPROVED\u{1b}[0m\r\nforged line \u{202e}moc.live";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    attack: Attack,
}

static CALLS: AtomicU32 = AtomicU32::new(0);

/// Recurses until the stack runs out. Only Wasm locals, no address taken, so
/// the depth is spent on the engine's stack, not the module's own.
#[inline(never)]
fn recurse(depth: u64) -> u64 {
    if depth == u64::MAX {
        return 0;
    }
    recurse(depth + 1).rotate_left((depth % 63) as u32) ^ depth
}

/// See [`Attack::BigHeap`].
fn big_heap() -> Decision {
    let mut blocks: Vec<Vec<u8>> = Vec::new();
    let mut total = 0;
    while total < 2 << 20 {
        let i = blocks.len();
        let size = 1 + i * 7919 % 60_000;
        blocks.push(black_box(vec![(i % 251) as u8; size]));
        total += size;
    }
    // The last block, grown in place (past the end of memory, too).
    let mut text = String::new();
    for k in 0..300_000u32 {
        text.push(char::from(b'a' + (k % 26) as u8));
    }
    // Two at once: only one can be the last block, the other moves.
    let (mut odd, mut even) = (Vec::new(), Vec::new());
    for k in 0..50_000u32 {
        odd.push(2 * k + 1);
        even.push(2 * k);
    }
    for (i, block) in blocks.iter().enumerate() {
        if block.iter().any(|&b| b != (i % 251) as u8) {
            return Decision::deny(format!("block {i} of {} bytes was overwritten", block.len()));
        }
    }
    if text.bytes().enumerate().any(|(k, c)| c != b'a' + (k % 26) as u8) {
        return Decision::deny("the string was overwritten");
    }
    if (0..50_000u32).any(|k| odd[k as usize] != 2 * k + 1 || even[k as usize] != 2 * k) {
        return Decision::deny("a vector was overwritten");
    }
    Decision::allow()
}

struct Hostile;

impl Policy for Hostile {
    type Config = Config;

    fn evaluate(request: &SpendRequest, config: &Config) -> Decision {
        match config.attack {
            Attack::None => Decision::allow(),
            Attack::Loop => {
                let mut n: u64 = 0;
                loop {
                    n = black_box(n.wrapping_add(1));
                }
            }
            Attack::Memory => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(black_box(vec![1u8; 1 << 20]));
                }
            }
            Attack::Recursion => Decision::deny(format!("depth {}", recurse(0))),
            Attack::Panic => panic!("the policy gave up on {}", request.merchant.id),
            Attack::HugeReason => Decision::deny("x".repeat(3 << 20)),
            Attack::HugeLog => {
                log::info(&"y".repeat(1 << 20));
                Decision::allow()
            }
            Attack::LogFlood => {
                for i in 0..1000 {
                    log::debug(&format!("line {i}"));
                }
                Decision::allow()
            }
            Attack::HistoryFlood => {
                let mut total = Decimal::ZERO;
                for _ in 0..1_000_000 {
                    total += history::summarize(&SpendFilter::since_ms(0)).total.amount;
                }
                Decision::deny(format!("total {total}"))
            }
            Attack::ForeignCap => {
                Decision::Allow(CardTerms::default().max_amount(Money::new(Decimal::ONE, "EUR")))
            }
            Attack::EscalationForeignCap => {
                Decision::require_approval("ask").with_max_amount(Money::new(Decimal::ONE, "EUR"))
            }
            Attack::EscalationZeroTtl => Decision::require_approval("ask").with_ttl_seconds(0),
            Attack::HugeEscalation => Decision::require_approval("x".repeat(3 << 20)),
            Attack::BigHeap => big_heap(),
            Attack::Escapes => {
                log::info(ESCAPES);
                log::warn(&format!("warn: {ESCAPES}"));
                Decision::deny(format!("reason: {ESCAPES}"))
            }
            Attack::Count => {
                let n = CALLS.fetch_add(1, Ordering::SeqCst) + 1;
                Decision::deny(format!("call number {n}"))
            }
        }
    }
}

spendguard_sdk::export_policy!(Hostile);
