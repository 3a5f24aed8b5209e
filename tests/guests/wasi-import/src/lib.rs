//! A well-formed policy in every respect but one: it reads randomness from
//! WASI, outside the spendguard:policy world. The host must refuse it.

use spendguard_sdk::{Decision, NoConfig, Policy, SpendRequest};

#[link(wasm_import_module = "wasi_snapshot_preview1")]
unsafe extern "C" {
    fn random_get(buf: *mut u8, len: usize) -> u16;
}

struct Random;

impl Policy for Random {
    type Config = NoConfig;

    fn evaluate(_: &SpendRequest, _: &NoConfig) -> Decision {
        let mut byte = 0u8;
        // SAFETY: one writable byte; the host refuses this module anyway.
        let _ = unsafe { random_get(&mut byte, 1) };
        if byte.is_multiple_of(2) { Decision::allow() } else { Decision::deny("coin toss") }
    }
}

spendguard_sdk::export_policy!(Random);
