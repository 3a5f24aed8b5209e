//! # spend-limit
//!
//! A rolling-window spend limit. An agent may spend at most `limit` in any
//! `window` (the last 24 hours by default): a proposal is allowed when what
//! was already spent in the window plus the proposed amount is at most the
//! limit — reaching the limit exactly is allowed, going one cent over is not.
//!
//! "Already spent" is what the host reports as committed: captured charges
//! plus the holds of cards still open, received at or after
//! `request time - window`. A spend made exactly at the start of the window
//! counts; one made a millisecond earlier does not. The host answers this
//! question and commits the decision atomically, so concurrent proposals
//! cannot together slip over the limit.
//!
//! ## Config
//!
//! ```json
//! {
//!   "limit": "50.00",
//!   "currency": "USD",
//!   "window": "24h",
//!   "merchant_id": "api.openai.com",
//!   "mcc": "5734",
//!   "wallet_wide": false
//! }
//! ```
//!
//! - `limit` (required): the most that may be spent in the window, a
//!   positive decimal string.
//! - `currency` (required): the limit's currency, an upper-case code
//!   (`"USD"`, `"EUR"`, `"USDC"`). A proposal the limit covers (see
//!   `merchant_id` and `mcc`) in any other currency is denied: amounts are
//!   never converted, so a limit in USD cannot bound a spend in EUR. Past
//!   spend in other currencies is not counted.
//! - `window` (default `"24h"`): how far back to count, a whole number
//!   followed by `s` (seconds), `m` (minutes), `h` (hours) or `d` (days):
//!   `"90m"`, `"24h"`, `"7d"`, `"30d"`.
//! - `merchant_id` (optional): limit only spend at this merchant. Only that
//!   merchant's past spend counts, and proposals at other merchants are not
//!   this policy's concern (it allows them).
//! - `mcc` (optional): the same for one merchant category code (four digits,
//!   ISO 18245). With both `merchant_id` and `mcc` set, both must match.
//! - `wallet_wide` (default `false`): count the spend of every agent of the
//!   wallet, not only the requesting agent's — a shared budget.
//!
//! Unknown fields are refused, so a typo (`"limt"`) is caught when the policy
//! is attached rather than silently ignored.

use serde::Deserialize;
use spendguard_sdk::{Decimal, Decision, Policy, SpendFilter, SpendRequest, history, log};

/// The policy. Register it with the host by building this crate for
/// `wasm32-unknown-unknown`.
#[derive(Debug)]
pub struct SpendLimit;

/// The operator's config; see the crate documentation.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub limit: Decimal,
    pub currency: String,
    #[serde(default = "default_window")]
    pub window: String,
    #[serde(default)]
    pub merchant_id: Option<String>,
    #[serde(default)]
    pub mcc: Option<String>,
    #[serde(default)]
    pub wallet_wide: bool,
}

fn default_window() -> String {
    "24h".into()
}

/// The length of a window like `"24h"`, `"7d"`, `"90m"` or `"30s"`, in
/// milliseconds.
pub fn parse_window(window: &str) -> Result<u64, String> {
    let bad = || {
        format!(
            "`window` must be a whole number followed by `s`, `m`, `h` or `d` \
             (like `24h`, `7d` or `90m`), got `{window}`"
        )
    };
    let Some(unit) = window.chars().last() else {
        return Err(bad());
    };
    let unit_ms: u64 = match unit {
        's' => 1_000,
        'm' => 60_000,
        'h' => 3_600_000,
        'd' => 86_400_000,
        _ => return Err(bad()),
    };
    let digits = &window[..window.len() - unit.len_utf8()];
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let count: u64 = digits.parse().map_err(|_| bad())?;
    if count == 0 {
        return Err(format!("`window` must be longer than zero, got `{window}`"));
    }
    count.checked_mul(unit_ms).ok_or_else(|| format!("`window` `{window}` is too long"))
}

fn check_currency(currency: &str) -> Result<(), String> {
    if spendguard_sdk::types::is_currency_code(currency) {
        Ok(())
    } else {
        Err(format!("`currency` must be an upper-case currency code like `USD`, got `{currency}`"))
    }
}

impl Config {
    /// Whose and which spend the limit covers, for reasons and logs.
    fn scope(&self) -> String {
        let mut scope =
            if self.wallet_wide { "for the whole wallet".to_owned() } else { "for this agent".to_owned() };
        if let Some(merchant) = &self.merchant_id {
            scope.push_str(&format!(" at `{merchant}`"));
        }
        if let Some(mcc) = &self.mcc {
            scope.push_str(&format!(" in category {mcc}"));
        }
        scope
    }

    /// Whether the limit applies to this proposal at all.
    fn covers(&self, request: &SpendRequest) -> bool {
        self.merchant_id.as_ref().is_none_or(|m| *m == request.merchant.id)
            && self.mcc.as_ref().is_none_or(|m| *m == request.merchant.mcc)
    }

    fn filter(&self, since_ms: u64) -> SpendFilter {
        let mut filter = SpendFilter::since_ms(since_ms);
        if let Some(merchant) = &self.merchant_id {
            filter = filter.merchant(merchant.clone());
        }
        if let Some(mcc) = &self.mcc {
            filter = filter.mcc(mcc.clone());
        }
        if self.wallet_wide {
            filter = filter.wallet_wide();
        }
        filter
    }
}

impl Policy for SpendLimit {
    type Config = Config;

    fn check_config(config: &Config) -> Result<(), String> {
        if config.limit <= Decimal::ZERO {
            return Err(format!("`limit` must be positive, got `{}`", config.limit));
        }
        check_currency(&config.currency)?;
        parse_window(&config.window)?;
        if let Some(merchant) = &config.merchant_id {
            if merchant.trim().is_empty() {
                return Err("`merchant_id` must not be empty; remove it to count every merchant".into());
            }
            if merchant.trim() != merchant {
                return Err(format!("`merchant_id` must not start or end with spaces, got `{merchant}`"));
            }
        }
        if let Some(mcc) = &config.mcc
            && !spendguard_sdk::types::is_mcc(mcc)
        {
            return Err(format!(
                "`mcc` must be a four-digit merchant category code like `5734`, got `{mcc}`"
            ));
        }
        Ok(())
    }

    fn evaluate(request: &SpendRequest, config: &Config) -> Decision {
        if !config.covers(request) {
            log::debug(&format!(
                "the limit applies only {}; `{}` (category {}) is outside it",
                config.scope(),
                request.merchant.id,
                request.merchant.mcc
            ));
            return Decision::allow();
        }
        if request.amount.currency != config.currency {
            return Decision::deny(format!(
                "this spend is in {}, but the spend limit is in {}: spends in other currencies are not allowed",
                request.amount.currency, config.currency
            ));
        }
        let window_ms = match parse_window(&config.window) {
            Ok(ms) => ms,
            // check_config ran first; fail closed if it somehow did not.
            Err(message) => return Decision::deny(message),
        };
        let since_ms = request.received_at_ms.saturating_sub(window_ms);
        let spent = history::summarize(&config.filter(since_ms));
        let currency = &config.currency;
        let (limit, window) = (config.limit, &config.window);
        log::info(&format!(
            "{} {currency} spent in {} spend(s) in the last {window} {}; limit {limit} {currency}",
            spent.total.amount,
            spent.count,
            config.scope()
        ));
        let Some(total) = spent.total.amount.checked_add(request.amount.amount) else {
            return Decision::deny("the spend in the window cannot be added up");
        };
        if total <= limit {
            return Decision::allow();
        }
        let left = (limit - spent.total.amount).max(Decimal::ZERO);
        Decision::deny(format!(
            "over the spend limit of {limit} {currency} per {window} {}: {} {currency} already spent, \
             {} {currency} requested, {left} {currency} left",
            config.scope(),
            spent.total.amount,
            request.amount.amount,
        ))
    }
}

spendguard_sdk::export_policy!(SpendLimit);

#[cfg(test)]
mod tests {
    use super::*;
    use spendguard_sdk::testing::{DEFAULT_RECEIVED_AT_MS, HOUR_MS, Outcome, PastSpend, TestHost, request};

    const DAILY_50: &str = r#"{ "limit": "50.00", "currency": "USD" }"#;

    fn eval(history: Vec<PastSpend>, amount: &str, config: &str) -> Outcome {
        TestHost::with_history(history).evaluate::<SpendLimit>(&request(amount, "USD"), config)
    }

    fn spent(amount: &str, hours_ago: u64) -> PastSpend {
        PastSpend::new(amount, "USD", 0).hours_before_request(hours_ago)
    }

    fn reason(outcome: &Outcome) -> &str {
        outcome.decision.reason().unwrap_or_default()
    }

    #[test]
    fn under_the_limit_is_allowed() {
        let outcome = eval(vec![spent("30.00", 3)], "10.00", DAILY_50);
        assert_eq!(outcome.decision, Decision::allow());
        assert_eq!(outcome.history_calls, 1);
    }

    #[test]
    fn reaching_the_limit_exactly_is_allowed() {
        let outcome = eval(vec![spent("45.00", 3)], "5.00", DAILY_50);
        assert!(outcome.decision.is_allow());
    }

    #[test]
    fn one_cent_over_the_limit_is_denied_with_what_is_left() {
        let outcome = eval(vec![spent("45.00", 3)], "5.01", DAILY_50);
        assert!(matches!(outcome.decision, Decision::Deny(_)));
        let reason = reason(&outcome);
        assert!(reason.contains("spend limit of 50.00 USD per 24h"), "{reason}");
        assert!(reason.contains("45.00 USD already spent"), "{reason}");
        assert!(reason.contains("5.00 USD left"), "{reason}");
    }

    #[test]
    fn a_single_purchase_over_the_limit_is_denied() {
        let outcome = eval(vec![], "50.01", DAILY_50);
        assert!(matches!(outcome.decision, Decision::Deny(_)));
    }

    #[test]
    fn a_spend_exactly_at_the_window_start_counts() {
        let at_start = PastSpend::new("45.00", "USD", DEFAULT_RECEIVED_AT_MS - 24 * HOUR_MS);
        let outcome = eval(vec![at_start], "10.00", DAILY_50);
        assert!(matches!(outcome.decision, Decision::Deny(_)));
    }

    #[test]
    fn a_spend_one_millisecond_before_the_window_does_not_count() {
        let before = PastSpend::new("45.00", "USD", DEFAULT_RECEIVED_AT_MS - 24 * HOUR_MS - 1);
        let outcome = eval(vec![before], "10.00", DAILY_50);
        assert!(outcome.decision.is_allow());
    }

    #[test]
    fn the_window_is_configurable() {
        let config = r#"{ "limit": "50.00", "currency": "USD", "window": "90m" }"#;
        // Two hours ago is outside a 90-minute window, one hour ago is inside.
        assert!(eval(vec![spent("45.00", 2)], "10.00", config).decision.is_allow());
        assert!(!eval(vec![spent("45.00", 1)], "10.00", config).decision.is_allow());

        let weekly = r#"{ "limit": "50.00", "currency": "USD", "window": "7d" }"#;
        assert!(!eval(vec![spent("45.00", 6 * 24)], "10.00", weekly).decision.is_allow());
        assert!(eval(vec![spent("45.00", 8 * 24)], "10.00", weekly).decision.is_allow());
    }

    #[test]
    fn other_agents_count_only_wallet_wide() {
        let history = vec![spent("45.00", 3).by_agent("other-agent")];
        assert!(eval(history.clone(), "10.00", DAILY_50).decision.is_allow());

        let shared = r#"{ "limit": "50.00", "currency": "USD", "wallet_wide": true }"#;
        let outcome = eval(history, "10.00", shared);
        assert!(matches!(outcome.decision, Decision::Deny(_)));
        assert!(reason(&outcome).contains("for the whole wallet"));
    }

    #[test]
    fn a_merchant_scoped_limit_counts_only_that_merchant() {
        let config = r#"{ "limit": "20.00", "currency": "USD", "merchant_id": "api.openai.com" }"#;
        let history = vec![
            spent("15.00", 2).at_merchant("api.openai.com", "5734"),
            spent("100.00", 2).at_merchant("aws.amazon.com", "5734"),
        ];
        let mut at_openai = request("5.00", "USD");
        at_openai.merchant.id = "api.openai.com".into();
        let host = TestHost::with_history(history.clone());
        assert!(host.evaluate::<SpendLimit>(&at_openai, config).decision.is_allow());
        at_openai.amount.amount = Decimal::new(501, 2);
        let outcome = host.evaluate::<SpendLimit>(&at_openai, config);
        assert!(matches!(outcome.decision, Decision::Deny(_)));
        assert!(reason(&outcome).contains("at `api.openai.com`"));

        // Another merchant is outside the limit altogether.
        let mut elsewhere = request("500.00", "USD");
        elsewhere.merchant.id = "aws.amazon.com".into();
        let outcome = host.evaluate::<SpendLimit>(&elsewhere, config);
        assert!(outcome.decision.is_allow());
        assert_eq!(outcome.history_calls, 0);
    }

    #[test]
    fn a_category_scoped_limit_counts_only_that_category() {
        let config = r#"{ "limit": "30.00", "currency": "USD", "mcc": "5812" }"#;
        let history = vec![
            spent("25.00", 2).at_merchant("diner.example", "5812"),
            spent("100.00", 2).at_merchant("example.com", "5734"),
        ];
        let host = TestHost::with_history(history);
        let mut meal = request("10.00", "USD");
        meal.merchant.mcc = "5812".into();
        assert!(!host.evaluate::<SpendLimit>(&meal, config).decision.is_allow());
        meal.amount.amount = Decimal::new(500, 2);
        assert!(host.evaluate::<SpendLimit>(&meal, config).decision.is_allow());
        // Software (5734) is not limited by a restaurant limit.
        assert!(host.evaluate::<SpendLimit>(&request("80.00", "USD"), config).decision.is_allow());
    }

    #[test]
    fn another_currency_is_denied() {
        let outcome = TestHost::new().evaluate::<SpendLimit>(&request("1.00", "EUR"), DAILY_50);
        assert!(matches!(outcome.decision, Decision::Deny(_)));
        let reason = reason(&outcome);
        assert!(reason.contains("EUR") && reason.contains("USD"), "{reason}");
        assert_eq!(outcome.history_calls, 0);
    }

    #[test]
    fn spend_in_other_currencies_is_not_counted() {
        let history = vec![PastSpend::new("45.00", "EUR", 0).hours_before_request(1)];
        assert!(eval(history, "50.00", DAILY_50).decision.is_allow());
    }

    #[test]
    fn good_configs_are_accepted() {
        for config in [
            DAILY_50,
            r#"{ "limit": "0.01", "currency": "USD", "window": "30s" }"#,
            r#"{ "limit": "1000", "currency": "USDC", "window": "30d", "wallet_wide": true }"#,
            r#"{ "limit": "20", "currency": "EUR", "merchant_id": "api.openai.com", "mcc": "5734" }"#,
        ] {
            assert_eq!(TestHost::validate_config::<SpendLimit>(config), Ok(()), "{config}");
        }
    }

    #[test]
    fn bad_configs_are_refused_with_a_message() {
        let cases = [
            (r#"{ "limit": "0", "currency": "USD" }"#, "`limit` must be positive"),
            (r#"{ "limit": "-5.00", "currency": "USD" }"#, "`limit` must be positive"),
            (r#"{ "limit": "50.00", "currency": "usd" }"#, "`currency` must be"),
            (r#"{ "limit": "50.00", "currency": "USD", "window": "0h" }"#, "longer than zero"),
            (r#"{ "limit": "50.00", "currency": "USD", "window": "24" }"#, "got `24`"),
            (r#"{ "limit": "50.00", "currency": "USD", "window": "1w" }"#, "got `1w`"),
            (r#"{ "limit": "50.00", "currency": "USD", "window": "-1h" }"#, "got `-1h`"),
            (r#"{ "limit": "50.00", "currency": "USD", "window": "" }"#, "got ``"),
            (r#"{ "limit": "50.00", "currency": "USD", "mcc": "57" }"#, "`mcc` must be"),
            (r#"{ "limit": "50.00", "currency": "USD", "merchant_id": "" }"#, "`merchant_id`"),
            (r#"{ "limit": "50.00", "currency": "USD", "limt": "1" }"#, "unknown field"),
            (r#"{ "limit": 50.0, "currency": "USD" }"#, "invalid config"),
            (r#"{ "currency": "USD" }"#, "missing field `limit`"),
        ];
        for (config, fragment) in cases {
            let result = TestHost::validate_config::<SpendLimit>(config);
            assert!(matches!(&result, Err(message) if message.contains(fragment)), "{config}: {result:?}");
        }
    }

    #[test]
    fn windows_parse() {
        assert_eq!(parse_window("30s"), Ok(30_000));
        assert_eq!(parse_window("90m"), Ok(90 * 60_000));
        assert_eq!(parse_window("24h"), Ok(24 * HOUR_MS));
        assert_eq!(parse_window("7d"), Ok(7 * 24 * HOUR_MS));
        assert!(parse_window("99999999999999999999d").is_err());
        assert!(parse_window("h").is_err());
        assert!(parse_window("1.5h").is_err());
        assert!(parse_window("24 h").is_err());
        assert!(parse_window("24H").is_err());
    }
}
