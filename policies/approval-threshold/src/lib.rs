//! # approval-threshold
//!
//! A human in the loop for large purchases: a proposal whose amount is above
//! `threshold` is held until an operator approves or denies it; a proposal at
//! or under the threshold is allowed. Pair it with other policies (a spend
//! limit, merchant rules): across policies deny wins over require-approval,
//! which wins over allow, so this policy never lets through what another one
//! denies.
//!
//! **A proposal in another currency than `currency` requires approval.**
//! Amounts are never converted, so this policy cannot tell whether 90 EUR is
//! above a 100 USD threshold. Asking a human is the safe answer that still
//! lets a legitimate foreign purchase through; an operator who wants foreign
//! currencies refused outright should add a policy that denies them (for
//! instance `spend-limit` or `purchase-cap`, which deny a currency mismatch).
//!
//! **Inside a mandate the operator created, no approval is asked.** The
//! operator already said yes to this task's budget, merchants and deadline;
//! the host has checked the spend against the mandate before this policy
//! runs. A mandate the agent requested (and the operator approved) does not
//! skip approval, nor does a spend larger than what is left of the mandate.
//!
//! ## Config
//!
//! ```json
//! { "threshold": "100.00", "currency": "USD", "approved_card_ttl_seconds": 300 }
//! ```
//!
//! - `threshold` (required): a decimal string. Amounts strictly above it
//!   need approval; an amount equal to it does not. `"0"` sends every
//!   proposal to an operator.
//! - `currency` (required): the threshold's currency, an upper-case code
//!   (`"USD"`, `"EUR"`, `"USDC"`).
//! - `approved_card_ttl_seconds` (optional): should the operator approve,
//!   the card lives at most this long (a human answered now; the purchase
//!   should follow soon). Without it the card gets the host's default life.
//! - `trust_operator_mandates` (optional, default `true`): `false` asks for
//!   approval above the threshold inside mandates too.
//!
//! Unknown fields are refused, so a typo is caught when the policy is
//! attached.

use serde::Deserialize;
use spendguard_sdk::{Decimal, Decision, Policy, SpendRequest};

/// The policy. Register it with the host by building this crate for
/// `wasm32-unknown-unknown`.
#[derive(Debug)]
pub struct ApprovalThreshold;

/// The operator's config; see the crate documentation.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub threshold: Decimal,
    pub currency: String,
    #[serde(default)]
    pub approved_card_ttl_seconds: Option<u32>,
    #[serde(default = "yes")]
    pub trust_operator_mandates: bool,
}

fn yes() -> bool {
    true
}

impl Policy for ApprovalThreshold {
    type Config = Config;

    fn check_config(config: &Config) -> Result<(), String> {
        if config.threshold < Decimal::ZERO {
            return Err(format!("`threshold` must not be negative, got `{}`", config.threshold));
        }
        let currency = &config.currency;
        if !spendguard_sdk::types::is_currency_code(currency) {
            return Err(format!(
                "`currency` must be an upper-case currency code like `USD`, got `{currency}`"
            ));
        }
        if config.approved_card_ttl_seconds == Some(0) {
            return Err("`approved_card_ttl_seconds` must be at least 1".into());
        }
        Ok(())
    }

    fn evaluate(request: &SpendRequest, config: &Config) -> Decision {
        let amount = &request.amount;
        if config.trust_operator_mandates
            && request.mandate().is_some_and(|m| m.created_by_operator && m.covers(amount))
        {
            return Decision::allow();
        }
        let escalate = |reason: String| match config.approved_card_ttl_seconds {
            Some(seconds) => Decision::require_approval(reason).with_ttl_seconds(seconds),
            None => Decision::require_approval(reason),
        };
        if amount.currency != config.currency {
            return escalate(format!(
                "this spend is in {}, but the approval threshold is in {}: amounts are not \
                 converted, so an operator must decide",
                amount.currency, config.currency
            ));
        }
        if amount.amount > config.threshold {
            return escalate(format!(
                "{amount} is above the approval threshold of {} {}",
                config.threshold, config.currency
            ));
        }
        Decision::allow()
    }
}

spendguard_sdk::export_policy!(ApprovalThreshold);

#[cfg(test)]
mod tests {
    use super::*;
    use spendguard_sdk::testing::{TestHost, mandate, request};

    const CONFIG: &str = r#"{ "threshold": "100.00", "currency": "USD" }"#;

    fn decide(amount: &str, currency: &str, config: &str) -> Decision {
        TestHost::new().evaluate::<ApprovalThreshold>(&request(amount, currency), config).decision
    }

    #[test]
    fn under_the_threshold_is_allowed() {
        assert_eq!(decide("99.99", "USD", CONFIG), Decision::allow());
    }

    #[test]
    fn exactly_the_threshold_is_allowed() {
        assert_eq!(decide("100.00", "USD", CONFIG), Decision::allow());
        assert_eq!(decide("100", "USD", CONFIG), Decision::allow());
    }

    #[test]
    fn above_the_threshold_requires_approval() {
        assert_eq!(
            decide("100.01", "USD", CONFIG),
            Decision::require_approval("100.01 USD is above the approval threshold of 100.00 USD")
        );
    }

    #[test]
    fn another_currency_requires_approval() {
        let decision = decide("5.00", "EUR", CONFIG);
        assert!(
            matches!(&decision, Decision::RequireApproval { reason: r, .. } if r.contains("EUR") && r.contains("USD")),
            "{decision:?}"
        );
    }

    #[test]
    fn a_zero_threshold_escalates_everything() {
        let config = r#"{ "threshold": "0", "currency": "USD" }"#;
        assert!(matches!(decide("0.01", "USD", config), Decision::RequireApproval { .. }));
    }

    #[test]
    fn an_approved_escalation_card_can_be_given_a_short_life() {
        let config = r#"{ "threshold": "100.00", "currency": "USD", "approved_card_ttl_seconds": 300 }"#;
        assert_eq!(
            decide("150.00", "USD", config),
            Decision::require_approval("150.00 USD is above the approval threshold of 100.00 USD")
                .with_ttl_seconds(300)
        );
        let foreign = decide("1.00", "EUR", config);
        assert_eq!(foreign.card_terms().and_then(|t| t.ttl_seconds), Some(300), "{foreign:?}");
        assert_eq!(decide("50.00", "USD", config), Decision::allow(), "an allow is not narrowed");
    }

    fn in_mandate(amount: &str, budget: &str, by_operator: bool, config: &str) -> Decision {
        let mut r = request(amount, "USD");
        let mut m = mandate("mdt_test", budget, "USD");
        m.created_by_operator = by_operator;
        r.mandate = Some(m);
        TestHost::new().evaluate::<ApprovalThreshold>(&r, config).decision
    }

    #[test]
    fn inside_an_operator_mandate_no_approval_is_asked() {
        assert_eq!(in_mandate("150.00", "500.00", true, CONFIG), Decision::allow());
        assert_eq!(in_mandate("500.00", "500.00", true, CONFIG), Decision::allow());
    }

    #[test]
    fn a_mandate_skips_approval_only_when_the_operator_made_it_and_it_covers_the_spend() {
        let escalated = |d: Decision| matches!(d, Decision::RequireApproval { .. });
        assert!(escalated(in_mandate("150.00", "500.00", false, CONFIG)), "requested by the agent");
        assert!(escalated(in_mandate("600.00", "500.00", true, CONFIG)), "more than remains");
        let strict = r#"{ "threshold": "100.00", "currency": "USD", "trust_operator_mandates": false }"#;
        assert!(escalated(in_mandate("150.00", "500.00", true, strict)), "mandates not trusted");
    }

    #[test]
    fn the_policy_never_reads_history() {
        let outcome = TestHost::new().evaluate::<ApprovalThreshold>(&request("500.00", "USD"), CONFIG);
        assert_eq!(outcome.history_calls, 0);
    }

    #[test]
    fn bad_configs_are_refused_with_a_message() {
        let cases = [
            (r#"{ "threshold": "-1", "currency": "USD" }"#, "`threshold` must not be negative"),
            (r#"{ "threshold": "100", "currency": "dollars" }"#, "`currency` must be"),
            (r#"{ "threshold": "100", "currency": "" }"#, "`currency` must be"),
            (r#"{ "threshold": 100, "currency": "USD" }"#, "invalid config"),
            (r#"{ "threshold": "lots", "currency": "USD" }"#, "invalid config"),
            (r#"{ "threshold": "100" }"#, "missing field `currency`"),
            (r#"{ "threshold": "100", "currency": "USD", "treshold": "5" }"#, "unknown field"),
            (
                r#"{ "threshold": "100", "currency": "USD", "approved_card_ttl_seconds": 0 }"#,
                "`approved_card_ttl_seconds` must be at least 1",
            ),
        ];
        for (config, fragment) in cases {
            let result = TestHost::validate_config::<ApprovalThreshold>(config);
            assert!(matches!(&result, Err(message) if message.contains(fragment)), "{config}: {result:?}");
        }
        assert_eq!(TestHost::validate_config::<ApprovalThreshold>(CONFIG), Ok(()));
    }
}
