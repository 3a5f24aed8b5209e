//! The rules as the daemon runs them: the example policies built from
//! source for wasm32, loaded once into one `Sandbox` with the default
//! limits, each attached policy evaluated in a fresh instance, in turn.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use spendguard::decide::Tally;
use spendguard::history::History;
use spendguard::policy::SpendRequest;
use spendguard::sandbox::{Limits, LoadedPolicy, Sandbox};

use crate::rules::{Outcome, Rule, Verdict};

/// The example policies, and the test guest that serves as the baseline
/// (`tests/guests/hostile` with `{"attack": "none"}` parses its config and
/// allows: an evaluation with next to no policy in it).
const PACKAGES: &[&str] =
    &["spend-limit", "merchant-rules", "approval-threshold", "purchase-cap", "guest-hostile"];
pub const BASELINE: &str = "guest-hostile";
pub const BASELINE_CONFIG: &str = r#"{"attack":"none"}"#;

/// The sandbox and every module, compiled once.
pub struct WasmPolicies {
    pub sandbox: Sandbox,
    modules: HashMap<&'static str, LoadedPolicy>,
}

impl WasmPolicies {
    pub fn load() -> anyhow::Result<Self> {
        let sandbox = Sandbox::new(Limits::default())?;
        let mut modules = HashMap::new();
        for package in PACKAGES {
            let path = crate::guests::wasm(package);
            let bytes = std::fs::read(&path)
                .with_context(|| format!("reading {} (run `make policies`)", path.display()))?;
            let policy = sandbox.load(&bytes).with_context(|| format!("loading {}", path.display()))?;
            modules.insert(*package, policy);
        }
        Ok(WasmPolicies { sandbox, modules })
    }

    pub fn module(&self, package: &str) -> anyhow::Result<&LoadedPolicy> {
        self.modules.get(package).with_context(|| format!("no module for `{package}`"))
    }

    /// A case's rules as attachments: each policy with its config document.
    pub fn attach(&self, rules: &[Rule]) -> anyhow::Result<WasmRules<'_>> {
        let mut attached = Vec::new();
        for rule in rules {
            let policy = self.module(rule.policy())?;
            let config = rule.config_json();
            // The daemon validates a config when it is attached, not per spend.
            let run = self.sandbox.validate_config(policy, &config);
            match run.outcome {
                Ok(Ok(())) => {}
                Ok(Err(message)) => bail!("{} refuses its config {config}: {message}", rule.policy()),
                Err(fault) => bail!("{} failed validating {config}: {fault}", rule.policy()),
            }
            attached.push((rule.policy(), policy, config));
        }
        Ok(WasmRules { sandbox: &self.sandbox, attached })
    }
}

/// One case's attached policies.
pub struct WasmRules<'a> {
    sandbox: &'a Sandbox,
    attached: Vec<(&'static str, &'a LoadedPolicy, String)>,
}

impl WasmRules<'_> {
    /// Every attached policy in a fresh instance, combined as the daemon's
    /// `evaluate_all` does.
    pub fn decide(&self, request: &SpendRequest, history: &Arc<dyn History>) -> Verdict {
        Verdict::combine(self.attached.iter().map(|(name, policy, config)| {
            self.sandbox.evaluate(policy, request, config, Arc::clone(history)).decision(name)
        }))
    }

    /// [`WasmRules::decide`] for the timing loop: a fault is an error
    /// naming it rather than a deny, so a timed run cannot pass a fault
    /// off as a decision.
    pub fn decide_timed(
        &self,
        request: &SpendRequest,
        history: &Arc<dyn History>,
    ) -> Result<Outcome, String> {
        let mut tally = Tally::default();
        for (name, policy, config) in &self.attached {
            let run = self.sandbox.evaluate(policy, request, config, Arc::clone(history));
            match run.outcome {
                Ok(decision) => tally.add(decision),
                Err(fault) => return Err(format!("{name} faulted after {:?}: {fault}", run.elapsed)),
            }
        }
        Ok(Outcome::of(&tally))
    }

    /// Fuel (Wasm instructions) the attached policies use on `request`;
    /// an error if any of them faults.
    pub fn fuel(&self, request: &SpendRequest, history: &Arc<dyn History>) -> anyhow::Result<u64> {
        let mut fuel = 0;
        for (name, policy, config) in &self.attached {
            let run = self.sandbox.evaluate(policy, request, config, Arc::clone(history));
            if let Err(fault) = &run.outcome {
                bail!("{name} faulted: {fault}");
            }
            fuel += run.fuel_used;
        }
        Ok(fuel)
    }
}
