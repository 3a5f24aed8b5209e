//! `/metrics` in the Prometheus text format.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::ledger::Balance;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Kind {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Bucket {
    currency: String,
    balance: String,
}

/// The daemon's counters.
pub struct Metrics {
    registry: Registry,
    proposals: Family<Outcome, Counter>,
    evaluation_seconds: Histogram,
    faults: Family<Kind, Counter>,
    authorizations: Family<Outcome, Counter>,
    balances: Family<Bucket, Gauge<f64, AtomicU64>>,
    policy_loads: Family<Source, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Source {
    source: String,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("spendguard");
        let proposals = Family::<Outcome, Counter>::default();
        registry.register("proposals", "Spend proposals by outcome", proposals.clone());
        // 5 µs to about 80 ms: a decision takes microseconds, a fault up to the deadline.
        let evaluation_seconds = Histogram::new(exponential_buckets(0.000_005, 2.0, 15));
        registry.register(
            "policy_evaluation_seconds",
            "Time of one policy evaluation",
            evaluation_seconds.clone(),
        );
        let faults = Family::<Kind, Counter>::default();
        registry.register("policy_faults", "Policy evaluations that faulted, by kind", faults.clone());
        let authorizations = Family::<Outcome, Counter>::default();
        registry.register(
            "authorizations",
            "Card authorizations by outcome (approved or the decline code)",
            authorizations.clone(),
        );
        let balances = Family::<Bucket, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "wallet_balance",
            "Wallet balances in major units, by currency and balance",
            balances.clone(),
        );
        let policy_loads = Family::<Source, Counter>::default();
        registry.register(
            "policy_loads",
            "Policy modules made ready to run, by source: compiled, or from the compiled cache",
            policy_loads.clone(),
        );
        Metrics { registry, proposals, evaluation_seconds, faults, authorizations, balances, policy_loads }
    }

    pub fn proposal(&self, outcome: &str) {
        self.proposals.get_or_create(&Outcome { outcome: outcome.to_owned() }).inc();
    }

    pub fn evaluation(&self, seconds: f64, fault: Option<&str>) {
        self.evaluation_seconds.observe(seconds);
        if let Some(kind) = fault {
            self.faults.get_or_create(&Kind { kind: kind.to_owned() }).inc();
        }
    }

    pub fn policy_load(&self, from_cache: bool) {
        let source = if from_cache { "cache" } else { "compiled" };
        self.policy_loads.get_or_create(&Source { source: source.to_owned() }).inc();
    }

    pub fn authorization(&self, outcome: &str) {
        self.authorizations.get_or_create(&Outcome { outcome: outcome.to_owned() }).inc();
    }

    /// The text exposition, with balances as of now.
    pub fn render(&self, balances: &[Balance]) -> String {
        for b in balances {
            let scale = 10f64.powi(i32::from(b.exponent));
            for (name, units) in [("available", b.available), ("held", b.held), ("spent", b.spent)] {
                let bucket = Bucket { currency: b.currency.clone(), balance: name.to_owned() };
                #[allow(clippy::cast_precision_loss)] // a gauge for dashboards, not the ledger
                self.balances.get_or_create(&bucket).set(units as f64 / scale);
            }
        }
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
