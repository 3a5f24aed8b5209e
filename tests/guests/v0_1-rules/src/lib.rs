//! A policy built with wit-bindgen straight from the frozen contract 0.1.0
//! (`wit/v0.1.0`), not with the SDK (which builds the newest contract). It
//! uses every part of that contract: allow with card terms, deny,
//! require-approval, a history query and a log line, so a test can prove the
//! host still decides with a 0.1.0 module exactly as it always did.
//!
//! Rules, in the request's currency (amounts in its smallest unit):
//! - a config containing `"refuse"` is refused;
//! - merchant `blocked.example` is denied;
//! - above 100 requires approval;
//! - above 150 spent at this merchant in the last 24 hours, this spend
//!   included, is denied;
//! - anything else is allowed, the card living 120 seconds, capped at the
//!   amount.

wit_bindgen::generate!({
    path: "../../../wit/v0.1.0",
    world: "spend-policy",
});

use spendguard::policy::types::{CardTerms, SpendFilter};
use spendguard::policy::{history, log};

const DAY_MS: u64 = 24 * 60 * 60 * 1000;

struct Rules;

/// `whole` units of a currency with `scale` decimals.
fn units(whole: i64, scale: u8) -> i64 {
    whole.saturating_mul(10i64.saturating_pow(u32::from(scale)))
}

impl Guest for Rules {
    fn validate_config(config: String) -> Result<(), String> {
        if config.contains("\"refuse\"") {
            return Err("this config asks to be refused".into());
        }
        Ok(())
    }

    fn evaluate(request: SpendRequest, _config: String) -> Decision {
        log::log(log::Level::Info, &format!("0.1.0 rules on {}", request.id));
        let amount = &request.amount;
        if request.merchant.id == "blocked.example" {
            return Decision::Deny(format!("merchant {} is blocked", request.merchant.id));
        }
        if amount.units > units(100, amount.scale) {
            return Decision::RequireApproval(format!(
                "{} units of {} is above 100 {}",
                amount.units, amount.currency, amount.currency
            ));
        }
        let day = history::summarize(&SpendFilter {
            since_ms: request.received_at_ms.saturating_sub(DAY_MS),
            merchant_id: Some(request.merchant.id.clone()),
            mcc: None,
            wallet_wide: false,
        });
        if day.total.units.saturating_add(amount.units) > units(150, amount.scale) {
            return Decision::Deny(format!(
                "{} units already spent at {} today ({} spends): this one would pass 150 {}",
                day.total.units, request.merchant.id, day.count, amount.currency
            ));
        }
        Decision::Allow(CardTerms { ttl_seconds: Some(120), max_amount: Some(amount.clone()) })
    }
}

export!(Rules);
