//! A policy that tells what it sees of the mandate: every field, and the
//! history of spends under it, as the reason of an escalation whose card is
//! capped at what remains of the mandate and lives 60 seconds. Without a
//! mandate it allows.

use spendguard_sdk::{Decision, NoConfig, Policy, SpendFilter, SpendRequest, history};

struct MandateProbe;

impl Policy for MandateProbe {
    type Config = NoConfig;

    fn evaluate(request: &SpendRequest, _: &NoConfig) -> Decision {
        let Some(m) = request.mandate() else {
            return Decision::allow();
        };
        let under = history::summarize(&SpendFilter::since_ms(0).mandate(m.id.clone()));
        Decision::require_approval(format!(
            "mandate {} ({}): budget {}, remaining {}, max spends {:?}, spend count {}, expires at {} ms, \
             created by the operator: {}; history under it: {} in {} spends",
            m.id,
            m.purpose,
            m.budget,
            m.remaining,
            m.max_spends,
            m.spend_count,
            m.expires_at_ms,
            m.created_by_operator,
            under.total,
            under.count
        ))
        .with_ttl_seconds(60)
        .with_max_amount(m.remaining.clone())
    }
}

spendguard_sdk::export_policy!(MandateProbe);
