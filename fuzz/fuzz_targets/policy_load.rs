//! Any bytes as a policy module, through the real load path
//! (`Sandbox::load`: size cap, core-module checks, componentizing, compiling,
//! import and export checks). A bad module must be refused with an error,
//! never a panic; a module that loads is then run once, `validate-config`
//! and `evaluate`, in the same bounded sandbox, and must fail closed.
//!
//! The corpus starts from the compiled example policies and test guests,
//! so mutations are mostly of real modules.

#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};
use spendguard::history::StaticHistory;
use spendguard::money::Amount;
use spendguard::policy::{Agent, Merchant, SpendRequest};
use spendguard::sandbox::{Limits, Sandbox};

/// Small bounds, so each input is quick; big enough for the example policies.
fn sandbox() -> &'static Sandbox {
    static SANDBOX: OnceLock<Sandbox> = OnceLock::new();
    SANDBOX.get_or_init(|| {
        let limits = Limits {
            max_module_bytes: 1024 * 1024,
            fuel: 2_000_000,
            deadline: Duration::from_millis(50),
            max_memory_bytes: 4 * 1024 * 1024,
            max_concurrent: 1,
            ..Limits::default()
        };
        Sandbox::new(limits).expect("the sandbox starts")
    })
}

fn request() -> SpendRequest {
    SpendRequest {
        id: "sp_fuzz".into(),
        agent: Agent {
            id: "ag_fuzz".into(),
            name: "fuzz".into(),
            labels: vec![("team".into(), "qa".into())],
        },
        amount: Amount::parse("10.00", "USD").expect("a valid amount"),
        merchant: Merchant {
            id: "api.openai.com".into(),
            name: "OpenAI".into(),
            mcc: "5734".into(),
            country: "US".into(),
        },
        purpose: "fuzzing".into(),
        received_at_ms: 1_795_000_000_000,
        mandate: None,
    }
}

fuzz_target!(|data: &[u8]| {
    let sandbox = sandbox();
    let Ok(policy) = sandbox.load(data) else { return };
    assert_eq!(policy.size(), data.len());
    assert_eq!(policy.sha256(), hex(&Sha256::digest(data)));
    for export in ["validate-config", "evaluate"] {
        assert!(policy.exports().iter().any(|e| e == export), "{:?}", policy.exports());
    }
    for import in policy.imports() {
        assert!(import.starts_with("spendguard:policy/"), "{import}");
    }
    // Whatever the module does, each call returns (a decision or a fault).
    let limits = sandbox.limits();
    for config in ["{}", r#"{"limit": "50.00", "currency": "USD"}"#] {
        let run = sandbox.validate_config(&policy, config);
        assert!(run.fuel_used <= limits.fuel);
        assert!(run.logs.len() <= limits.max_log_lines);
        let run = sandbox.evaluate(&policy, &request(), config, Arc::new(StaticHistory::default()));
        assert!(run.fuel_used <= limits.fuel);
        assert!(run.logs.len() <= limits.max_log_lines);
        // The call over the cap is counted, then refused.
        assert!(run.history_calls <= limits.max_history_calls + 1);
        if let Ok(decision) = &run.outcome
            && let Some(reason) = decision.reason()
        {
            assert!(reason.len() <= limits.max_output_bytes);
        }
    }
});

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
