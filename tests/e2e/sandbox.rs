//! Hostile guests against the real sandbox: each is refused at load or
//! denied at evaluation with the right reason, promptly, and the sandbox
//! goes on evaluating normally.

use std::sync::Arc;
use std::time::{Duration, Instant};

use spendguard::cases::RequestDoc;
use spendguard::history::{PastSpend, StaticHistory};
use spendguard::money::Amount;
use spendguard::policy::{Decision, SpendRequest};
use spendguard::sandbox::{Fault, Limits, LoadError, LoadedPolicy, Sandbox};

use crate::support::{XorShift, guests, seed};

/// Far above what any attack here needs to be stopped: a test that hangs
/// instead of failing would be worse.
const PROMPT: Duration = Duration::from_secs(5);

fn request() -> SpendRequest {
    let doc: RequestDoc = serde_json::from_value(serde_json::json!({
        "amount": "10.00", "currency": "USD",
        "merchant": { "id": "api.openai.com", "name": "OpenAI", "mcc": "5734", "country": "US" },
        "purpose": "API credits"
    }))
    .unwrap();
    doc.to_request().unwrap()
}

fn history() -> Arc<StaticHistory> {
    Arc::new(StaticHistory(vec![PastSpend {
        amount: Amount::parse("1.00", "USD").unwrap(),
        merchant_id: "api.openai.com".into(),
        mcc: "5734".into(),
        at_ms: 0,
        agent: None,
        mandate_id: None,
    }]))
}

fn attack(attack: &str) -> String {
    format!(r#"{{"attack":"{attack}"}}"#)
}

fn hostile(sandbox: &Sandbox) -> LoadedPolicy {
    sandbox.load(&guests::bytes("guest-hostile")).expect("the hostile guest loads: it is well-formed")
}

/// After any attack, the same sandbox still evaluates a well-behaved call.
fn assert_still_works(sandbox: &Sandbox, policy: &LoadedPolicy) {
    let run = sandbox.evaluate(policy, &request(), &attack("none"), history());
    assert_eq!(
        run.outcome,
        Ok(Decision::Allow(Default::default())),
        "the sandbox no longer evaluates normally"
    );
}

#[test]
fn every_attack_is_denied_with_its_fault_and_the_sandbox_carries_on() {
    let sandbox = Sandbox::new(Limits::default()).unwrap();
    let policy = hostile(&sandbox);
    let table: &[(&str, &str, &str)] = &[
        ("loop", "out_of_fuel", "out of fuel"),
        ("memory", "memory_limit", "memory limit"),
        ("recursion", "stack_overflow", "stack overflow"),
        ("panic", "panic", "panic: the policy gave up on api.openai.com"),
        ("huge_reason", "oversize_output", "oversize output: reason of 3145728 bytes"),
        ("huge_log", "oversize_output", "oversize output: log line of 1048576 bytes"),
        ("log_flood", "oversize_output", "oversize output: more than 64 log lines"),
        ("history_flood", "too_many_history_calls", "too many history calls"),
        ("foreign_cap", "invalid_card_terms", "invalid card terms: cap in `EUR` for a spend in USD"),
        // An escalation's terms are checked like an allow's (contract 0.2.0).
        (
            "escalation_foreign_cap",
            "invalid_card_terms",
            "invalid card terms: cap in `EUR` for a spend in USD",
        ),
        ("escalation_zero_ttl", "invalid_card_terms", "invalid card terms: ttl-seconds must be at least 1"),
        ("huge_escalation", "oversize_output", "oversize output: reason of 3145728 bytes"),
    ];
    for (name, kind, reason) in table {
        let started = Instant::now();
        let run = sandbox.evaluate(&policy, &request(), &attack(name), history());
        let took = started.elapsed();
        let fault = run.outcome.as_ref().expect_err(&format!("attack `{name}` was not stopped"));
        assert_eq!(fault.kind(), *kind, "attack `{name}`: {fault}");
        match run.decision("hostile") {
            Decision::Deny(why) => {
                assert!(why.starts_with("policy `hostile` failed: "), "attack `{name}`: {why}");
                assert!(why.contains(reason), "attack `{name}`: reason {why:?} lacks {reason:?}");
            }
            other => panic!("attack `{name}` was not denied: {other:?}"),
        }
        assert!(took < PROMPT, "attack `{name}` took {took:?}");
        assert_still_works(&sandbox, &policy);
    }
}

#[test]
fn a_policy_past_its_deadline_is_stopped_by_the_clock() {
    // Fuel effectively unlimited: only the wall-clock deadline can stop it.
    let limits = Limits { fuel: u64::MAX / 2, deadline: Duration::from_millis(50), ..Limits::default() };
    let sandbox = Sandbox::new(limits).unwrap();
    let policy = hostile(&sandbox);
    let started = Instant::now();
    let run = sandbox.evaluate(&policy, &request(), &attack("loop"), history());
    assert_eq!(run.outcome, Err(Fault::DeadlineExceeded));
    assert!(run.elapsed >= Duration::from_millis(50), "stopped before its deadline: {:?}", run.elapsed);
    assert!(started.elapsed() < PROMPT);
    assert_still_works(&sandbox, &policy);
}

#[test]
fn limits_are_configurable() {
    let tight = Limits { fuel: 1_000, max_history_calls: 0, ..Limits::default() };
    let sandbox = Sandbox::new(tight).unwrap();
    let policy = hostile(&sandbox);
    let run = sandbox.evaluate(&policy, &request(), &attack("none"), history());
    assert_eq!(run.outcome, Err(Fault::OutOfFuel), "a 1000-instruction budget cannot parse a config");

    let small_output = Limits { max_output_bytes: 8, ..Limits::default() };
    let sandbox = Sandbox::new(small_output).unwrap();
    let policy = hostile(&sandbox);
    let run = sandbox.evaluate(&policy, &request(), &attack("count"), history());
    assert_eq!(run.outcome.unwrap_err().kind(), "oversize_output", "`call number 1` is over 8 bytes");

    // The module's own minimum memory, read from it: with exactly that as the
    // cap it loads and evaluates (the SDK's arena is part of that memory, and
    // a well-behaved evaluation stays in it), and the first allocation past
    // the arena hits the cap.
    let bytes = guests::bytes("guest-hostile");
    let minimum = minimum_memory_bytes(&bytes);
    let sandbox = Sandbox::new(Limits { max_memory_bytes: minimum, ..Limits::default() }).unwrap();
    let policy = sandbox.load(&bytes).expect("the module fits its own minimum");
    let run = sandbox.evaluate(&policy, &request(), &attack("none"), history());
    assert_eq!(run.outcome, Ok(Decision::Allow(Default::default())), "the arena needs no growth");
    let run = sandbox.evaluate(&policy, &request(), &attack("big_heap"), history());
    assert_eq!(run.outcome, Err(Fault::MemoryLimit));
    // One page less, and it is refused at load.
    let sandbox = Sandbox::new(Limits { max_memory_bytes: minimum - 65536, ..Limits::default() }).unwrap();
    assert_eq!(
        sandbox.load(&bytes).unwrap_err(),
        LoadError::MemoryTooLarge { needs: minimum as u64, max: minimum - 65536 }
    );
}

fn minimum_memory_bytes(module: &[u8]) -> usize {
    for payload in wasmparser::Parser::new(0).parse_all(module) {
        if let wasmparser::Payload::MemorySection(section) = payload.unwrap() {
            let memory = section.into_iter().next().unwrap().unwrap();
            return memory.initial as usize * 65536;
        }
    }
    panic!("the module has no memory");
}

/// The SDK's bump allocator past its 1 MiB arena: more memory is grown,
/// blocks never overlap, and a block grown by pushes keeps its contents
/// (the guest checks every byte and denies naming what was overwritten).
#[test]
fn a_policy_may_use_more_memory_than_the_sdk_arena() {
    // Checking every byte of 2 MiB costs more fuel than a policy gets.
    let sandbox = Sandbox::new(Limits { fuel: 500_000_000, ..Limits::default() }).unwrap();
    let policy = hostile(&sandbox);
    for _ in 0..2 {
        let run = sandbox.evaluate(&policy, &request(), &attack("big_heap"), history());
        assert_eq!(run.outcome, Ok(Decision::Allow(Default::default())), "{:?}", run.logs);
    }
    assert_still_works(&sandbox, &policy);
}

#[test]
fn two_evaluations_never_share_an_instance() {
    let sandbox = Sandbox::new(Limits::default()).unwrap();
    let policy = hostile(&sandbox);
    for _ in 0..3 {
        let check = sandbox.validate_config(&policy, &attack("count"));
        assert_eq!(check.outcome, Ok(Ok(())));
        let run = sandbox.evaluate(&policy, &request(), &attack("count"), history());
        assert_eq!(run.outcome, Ok(Decision::Deny("call number 1".into())), "state survived an evaluation");
    }
}

#[test]
fn attacks_in_parallel_do_not_stall_well_behaved_evaluations() {
    let sandbox = Arc::new(Sandbox::new(Limits::default()).unwrap());
    let policy = Arc::new(hostile(&sandbox));
    let attackers: Vec<_> = ["loop", "memory", "recursion", "huge_reason"]
        .into_iter()
        .map(|name| {
            let (sandbox, policy) = (Arc::clone(&sandbox), Arc::clone(&policy));
            std::thread::spawn(move || {
                for _ in 0..5 {
                    let run = sandbox.evaluate(&policy, &request(), &attack(name), history());
                    assert!(run.outcome.is_err(), "attack `{name}` was not stopped");
                }
            })
        })
        .collect();
    for _ in 0..50 {
        assert_still_works(&sandbox, &policy);
    }
    for attacker in attackers {
        attacker.join().expect("no attacker thread panicked");
    }
}

#[test]
fn modules_outside_the_contract_are_refused_at_load() {
    let sandbox = Sandbox::new(Limits::default()).unwrap();

    let err = sandbox.load(&guests::bytes("guest-wasi-import")).unwrap_err();
    assert_eq!(err, LoadError::ForeignImport("wasi_snapshot_preview1::random_get".into()));
    assert!(err.to_string().contains("outside the spendguard:policy world"), "{err}");

    let err = sandbox.load(&guests::bytes("guest-wrong-exports")).unwrap_err();
    assert!(matches!(err, LoadError::WrongExports(_)), "{err}");
    assert!(err.to_string().contains("evaluate"), "{err}");

    // A valid, empty core module: nothing says it implements the contract.
    let empty = b"\0asm\x01\0\0\0";
    assert_eq!(sandbox.load(empty).unwrap_err(), LoadError::NoComponentType);

    let tiny = Sandbox::new(Limits { max_module_bytes: 1024, ..Limits::default() }).unwrap();
    let bytes = guests::bytes("guest-hostile");
    assert_eq!(tiny.load(&bytes).unwrap_err(), LoadError::TooLarge { size: bytes.len(), max: 1024 });
}

#[test]
fn a_ready_component_loads_and_decides_like_its_core_module() {
    let sandbox = Sandbox::new(Limits::default()).unwrap();
    let core = guests::bytes("guest-hostile");
    let component = wit_component::ComponentEncoder::default().module(&core).unwrap().encode().unwrap();
    let policy = sandbox.load(&component).expect("a component of the contract loads");
    assert_still_works(&sandbox, &policy);
    let run = sandbox.evaluate(&policy, &request(), &attack("loop"), history());
    assert_eq!(run.outcome, Err(Fault::OutOfFuel));
}

#[test]
fn random_bytes_are_refused_cleanly() {
    let seed = seed("random_bytes_are_refused_cleanly");

    let mut rng = XorShift::new(seed);
    let sandbox = Sandbox::new(Limits::default()).unwrap();
    let real = guests::bytes("guest-hostile");
    for i in 0..300 {
        let len = (rng.next() % 4096) as usize;
        let mut bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        match i % 3 {
            // Pure noise.
            0 => {}
            // Noise behind a valid header: the parser's problem, not ours.
            1 => {
                bytes.splice(0..0, *b"\0asm\x01\0\0\0");
            }
            // A real module, cut short or with bytes flipped.
            _ => {
                bytes = real.clone();
                let cut = (rng.next() as usize) % bytes.len();
                if rng.next().is_multiple_of(2) {
                    bytes.truncate(cut);
                } else {
                    for _ in 0..8 {
                        let at = (rng.next() as usize) % bytes.len();
                        bytes[at] ^= 1 << (rng.next() % 8);
                    }
                }
            }
        }
        // Either refused, or (a flip in a name, say) still a valid policy
        // that then evaluates within its bounds.
        if let Ok(policy) = sandbox.load(&bytes) {
            let run = sandbox.evaluate(&policy, &request(), &attack("none"), history());
            let _ = run.decision("mutant");
        }
    }
    assert_still_works(&sandbox, &hostile(&sandbox));
}
