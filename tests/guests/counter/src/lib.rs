//! Keeps a call counter in a static and reports it in the deny reason. If
//! the host ever reused an instance, the second evaluation would say 2.

use std::sync::atomic::{AtomicU32, Ordering};

use spendguard_sdk::{Decision, NoConfig, Policy, SpendRequest};

static CALLS: AtomicU32 = AtomicU32::new(0);

struct Counter;

impl Policy for Counter {
    type Config = NoConfig;

    fn evaluate(_: &SpendRequest, _: &NoConfig) -> Decision {
        let n = CALLS.fetch_add(1, Ordering::SeqCst) + 1;
        Decision::deny(format!("call number {n}"))
    }
}

spendguard_sdk::export_policy!(Counter);
