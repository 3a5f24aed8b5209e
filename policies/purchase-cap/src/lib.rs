//! # purchase-cap
//!
//! A cap on any single purchase, and tighter cards. A proposal at or under
//! `cap` is allowed; the card the host issues for it lives `ttl_seconds`
//! when that is set (instead of the host's default of 900 s, 15 minutes).
//! A proposal over the cap is, depending on `over_cap`:
//!
//! - `"deny"` (the default): denied, with the cap in the reason;
//! - `"narrow"`: allowed, but the card is capped at `cap` instead of the
//!   requested amount, so the merchant can charge at most `cap`. Use it for
//!   agents that propose generous estimates (a cloud bill, a top-up) where a
//!   smaller charge is still useful.
//!
//! A proposal in another currency than `currency` is denied: amounts are
//! never converted, so a cap in USD cannot bound a spend in EUR.
//!
//! A policy can only narrow a card, never widen it: across policies the host
//! issues the card with the shortest life and the lowest cap any allowing
//! policy set, and never above the requested amount.
//!
//! ## Config
//!
//! ```json
//! { "cap": "100.00", "currency": "USD", "ttl_seconds": 300, "over_cap": "narrow" }
//! ```
//!
//! - `cap` (required): the most one purchase may cost, a positive decimal
//!   string. In `narrow` mode a cap with more decimals than the currency has
//!   is rounded down for the card (`"9.999"` USD caps the card at 9.99).
//! - `currency` (required): the cap's currency, an upper-case code (`"USD"`,
//!   `"EUR"`, `"USDC"`).
//! - `ttl_seconds` (optional): the card's life in seconds, 1 to 900. The
//!   host's default is 900; a policy can only shorten it.
//! - `over_cap` (optional): `"deny"` (default) or `"narrow"`.
//!
//! Unknown fields are refused, so a typo is caught when the policy is
//! attached.

use serde::Deserialize;
use spendguard_sdk::{CardTerms, Decimal, Decision, Money, Policy, SpendRequest, log};

/// The policy. Register it with the host by building this crate for
/// `wasm32-unknown-unknown`.
#[derive(Debug)]
pub struct PurchaseCap;

/// The host's default card life, which a policy can only shorten.
pub const HOST_DEFAULT_TTL_SECONDS: u32 = 900;

/// The operator's config; see the crate documentation.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub cap: Decimal,
    pub currency: String,
    #[serde(default)]
    pub ttl_seconds: Option<u32>,
    #[serde(default)]
    pub over_cap: OverCap,
}

/// What to do with a proposal over the cap.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OverCap {
    /// Deny it.
    #[default]
    Deny,
    /// Allow it with a card capped at `cap`.
    Narrow,
}

impl Policy for PurchaseCap {
    type Config = Config;

    fn check_config(config: &Config) -> Result<(), String> {
        if config.cap <= Decimal::ZERO {
            return Err(format!("`cap` must be positive, got `{}`", config.cap));
        }
        let currency = &config.currency;
        if !spendguard_sdk::types::is_currency_code(currency) {
            return Err(format!(
                "`currency` must be an upper-case currency code like `USD`, got `{currency}`"
            ));
        }
        if let Some(ttl) = config.ttl_seconds
            && !(1..=HOST_DEFAULT_TTL_SECONDS).contains(&ttl)
        {
            return Err(format!(
                "`ttl_seconds` must be between 1 and {HOST_DEFAULT_TTL_SECONDS} (a policy can \
                 only shorten the host's default card life of {HOST_DEFAULT_TTL_SECONDS} s), \
                 got `{ttl}`"
            ));
        }
        Ok(())
    }

    fn evaluate(request: &SpendRequest, config: &Config) -> Decision {
        let amount = &request.amount;
        if amount.currency != config.currency {
            return Decision::deny(format!(
                "this spend is in {}, but the purchase cap is in {}: spends in other currencies \
                 are not allowed",
                amount.currency, config.currency
            ));
        }
        let mut terms = CardTerms::default();
        if let Some(ttl) = config.ttl_seconds {
            terms = terms.ttl_seconds(ttl);
        }
        if amount.amount <= config.cap {
            return Decision::Allow(terms);
        }
        match config.over_cap {
            OverCap::Deny => Decision::deny(format!(
                "{amount} is over the per-purchase cap of {} {}",
                config.cap, config.currency
            )),
            OverCap::Narrow => {
                // The request's amount carries the currency's number of
                // decimals; the card cannot be more precise than that.
                let card_cap = config.cap.trunc_with_scale(amount.amount.scale());
                if card_cap <= Decimal::ZERO {
                    return Decision::deny(format!(
                        "the per-purchase cap of {} {} is less than the smallest amount of {}",
                        config.cap, config.currency, config.currency
                    ));
                }
                log::info(&format!(
                    "{amount} is over the per-purchase cap: the card is capped at {card_cap} {}",
                    config.currency
                ));
                Decision::Allow(terms.max_amount(Money::new(card_cap, config.currency.clone())))
            }
        }
    }
}

spendguard_sdk::export_policy!(PurchaseCap);

#[cfg(test)]
mod tests {
    use super::*;
    use spendguard_sdk::testing::{TestHost, request};

    fn decide(amount: &str, currency: &str, config: &str) -> Decision {
        TestHost::new().evaluate::<PurchaseCap>(&request(amount, currency), config).decision
    }

    fn usd(amount: i64, scale: u32) -> Money {
        Money::new(Decimal::new(amount, scale), "USD")
    }

    const DENY: &str = r#"{ "cap": "100.00", "currency": "USD" }"#;
    const NARROW: &str =
        r#"{ "cap": "100.00", "currency": "USD", "ttl_seconds": 300, "over_cap": "narrow" }"#;

    #[test]
    fn at_or_under_the_cap_is_allowed_with_default_terms() {
        assert_eq!(decide("99.99", "USD", DENY), Decision::allow());
        assert_eq!(decide("100.00", "USD", DENY), Decision::allow());
    }

    #[test]
    fn over_the_cap_is_denied_by_default() {
        assert_eq!(
            decide("100.01", "USD", DENY),
            Decision::deny("100.01 USD is over the per-purchase cap of 100.00 USD")
        );
        let explicit = r#"{ "cap": "100.00", "currency": "USD", "over_cap": "deny" }"#;
        assert!(!decide("100.01", "USD", explicit).is_allow());
    }

    #[test]
    fn the_card_life_is_narrowed_when_set() {
        assert_eq!(decide("20.00", "USD", NARROW), Decision::Allow(CardTerms::default().ttl_seconds(300)));
    }

    #[test]
    fn narrow_mode_caps_the_card_instead_of_denying() {
        assert_eq!(
            decide("120.00", "USD", NARROW),
            Decision::Allow(CardTerms::default().ttl_seconds(300).max_amount(usd(10000, 2)))
        );
    }

    #[test]
    fn narrow_mode_rounds_a_too_precise_cap_down() {
        let config = r#"{ "cap": "9.999", "currency": "USD", "over_cap": "narrow" }"#;
        assert_eq!(
            decide("10.00", "USD", config),
            Decision::Allow(CardTerms::default().max_amount(usd(999, 2)))
        );
        let tiny = r#"{ "cap": "0.001", "currency": "USD", "over_cap": "narrow" }"#;
        assert!(matches!(decide("1.00", "USD", tiny), Decision::Deny(_)));
    }

    #[test]
    fn another_currency_is_denied() {
        let decision = decide("5.00", "EUR", NARROW);
        assert!(
            matches!(&decision, Decision::Deny(r) if r.contains("EUR") && r.contains("USD")),
            "{decision:?}"
        );
    }

    #[test]
    fn good_configs_are_accepted() {
        for config in [
            DENY,
            NARROW,
            r#"{ "cap": "5", "currency": "USDC", "ttl_seconds": 900 }"#,
            r#"{ "cap": "5", "currency": "EUR", "ttl_seconds": 1 }"#,
        ] {
            assert_eq!(TestHost::validate_config::<PurchaseCap>(config), Ok(()), "{config}");
        }
    }

    #[test]
    fn bad_configs_are_refused_with_a_message() {
        let cases = [
            (r#"{ "cap": "0", "currency": "USD" }"#, "`cap` must be positive"),
            (r#"{ "cap": "-1", "currency": "USD" }"#, "`cap` must be positive"),
            (r#"{ "cap": "10", "currency": "Usd" }"#, "`currency` must be"),
            (
                r#"{ "cap": "10", "currency": "USD", "ttl_seconds": 0 }"#,
                "`ttl_seconds` must be between 1 and 900",
            ),
            (r#"{ "cap": "10", "currency": "USD", "ttl_seconds": 3600 }"#, "got `3600`"),
            (r#"{ "cap": "10", "currency": "USD", "ttl_seconds": -5 }"#, "invalid config"),
            (r#"{ "cap": "10", "currency": "USD", "over_cap": "allow" }"#, "unknown variant `allow`"),
            (r#"{ "cap": "10", "currency": "USD", "ttl": 60 }"#, "unknown field"),
        ];
        for (config, fragment) in cases {
            let result = TestHost::validate_config::<PurchaseCap>(config);
            assert!(matches!(&result, Err(message) if message.contains(fragment)), "{config}: {result:?}");
        }
    }
}
