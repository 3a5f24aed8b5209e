//! The example policies, built from source, against their own cases files,
//! through the library (the CLI runs the same files in `cli.rs`).

use spendguard::cases::CasesFile;
use spendguard::sandbox::{Limits, Sandbox};

use crate::support::guests;

#[test]
fn every_example_policy_passes_its_cases() {
    let policies = guests::crates("policies");
    // The shipped examples; a policy an author adds (the README's
    // walk-through) is tested too, with whatever cases it has.
    let shipped = ["approval-threshold", "merchant-rules", "purchase-cap", "spend-limit"];
    for name in shipped {
        assert!(policies.iter().any(|(n, _)| n == name), "example policy `{name}` is missing");
    }
    let sandbox = Sandbox::new(Limits::default()).unwrap();
    for (name, dir) in policies {
        let text = std::fs::read_to_string(dir.join("cases.json"))
            .unwrap_or_else(|e| panic!("{name}: every policy here needs a cases.json: {e}"));
        let file: CasesFile =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}/cases.json: {e}"));
        assert!(!file.cases.is_empty(), "{name}: no cases");
        if shipped.contains(&name.as_str()) {
            assert!(file.cases.len() >= 8, "{name}: only {} cases", file.cases.len());
            let kinds: Vec<_> = file.cases.iter().map(|c| c.expect.decision.as_str()).collect();
            assert!(kinds.contains(&"allow"), "{name}: no case allows");
            assert!(kinds.iter().any(|k| *k != "allow"), "{name}: no case refuses");
        }
        let policy = sandbox.load(&guests::bytes(&name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        for case in &file.cases {
            if let Err(failure) = case.run(&sandbox, &policy, &name) {
                panic!("{name}: case {:?}: {failure}", case.name);
            }
        }
    }
}
