//! # merchant-rules
//!
//! Where an agent may spend: a merchant allowlist plus a merchant-category
//! blocklist.
//!
//! - A proposal at a merchant whose category code is in `block_mcc` is
//!   denied, naming the code (checked first: a blocked category stays blocked
//!   even at an allowed merchant).
//! - When `allow_merchants` is not empty, a proposal at a merchant that no
//!   entry matches is denied, naming the merchant. An empty or absent list
//!   allows any merchant.
//! - Everything else is allowed with the host's default card terms.
//!
//! The card the host issues is locked to the proposal's merchant id, so an
//! agent cannot propose at an allowed merchant and pay another one.
//!
//! ## Config
//!
//! ```json
//! {
//!   "allow_merchants": ["api.openai.com", "*.anthropic.com", "acq-4471-0093"],
//!   "block_mcc": ["7995", "6051", "4829"]
//! }
//! ```
//!
//! - `allow_merchants` (optional): merchant ids, compared exactly (case
//!   matters). An entry `*.example.com` matches every subdomain at any depth
//!   (`api.example.com`, `eu.api.example.com`) but not `example.com` itself
//!   (list both to allow both), and only when what comes before
//!   `.example.com` is made of domain labels (letters, digits, `-`, dots
//!   between them). `*` may only appear as that leading `*.`.
//! - `block_mcc` (optional): ISO 18245 merchant category codes, four digits
//!   each (`"7995"` betting, `"6051"` quasi-cash and crypto, `"4829"` money
//!   transfer).
//!
//! Unknown fields are refused, so a typo (`"allow_merchant"`) is caught when
//! the policy is attached rather than silently allowing every merchant.

use serde::Deserialize;
use spendguard_sdk::{Decision, Policy, SpendRequest, log};

/// The policy. Register it with the host by building this crate for
/// `wasm32-unknown-unknown`.
#[derive(Debug)]
pub struct MerchantRules;

/// The operator's config; see the crate documentation.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub allow_merchants: Vec<String>,
    #[serde(default)]
    pub block_mcc: Vec<String>,
}

/// Whether allowlist entry `pattern` matches merchant id `merchant`.
///
/// `*.example.com` matches `<labels>.example.com` where `<labels>` is one or
/// more non-empty domain labels (letters, digits, `-`), so `a.example.com`
/// and `b.a.example.com` match but `example.com`, `.example.com`,
/// `evilexample.com` and `x/.example.com` do not.
pub fn matches(pattern: &str, merchant: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some(suffix) => merchant.strip_suffix(suffix).is_some_and(|labels| {
            labels
                .split('.')
                .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
        }),
        None => pattern == merchant,
    }
}

fn check_entry(entry: &str) -> Result<(), String> {
    if entry.is_empty() {
        return Err("`allow_merchants` has an empty entry".into());
    }
    if entry == "*" || entry == "*." {
        return Err("`allow_merchants` entry `*` would allow every merchant: leave the list empty \
             (or remove it) to allow any merchant"
            .into());
    }
    if entry.chars().any(char::is_whitespace) {
        return Err(format!("`allow_merchants` entry `{entry}` must not contain spaces"));
    }
    let rest = match entry.strip_prefix("*.") {
        Some(domain) => domain,
        None if entry.starts_with('*') => {
            return Err(format!(
                "`allow_merchants` entry `{entry}` must start with `*.` to match subdomains, \
                 like `*.example.com`"
            ));
        }
        None => entry,
    };
    if rest.contains('*') {
        return Err(format!(
            "`allow_merchants` entry `{entry}`: `*` is only allowed as a leading `*.`, \
             like `*.example.com`"
        ));
    }
    if entry.starts_with("*.") && rest.split('.').any(str::is_empty) {
        return Err(format!("`allow_merchants` entry `{entry}` is not a domain, like `*.example.com`"));
    }
    Ok(())
}

impl Policy for MerchantRules {
    type Config = Config;

    fn check_config(config: &Config) -> Result<(), String> {
        for entry in &config.allow_merchants {
            check_entry(entry)?;
        }
        for mcc in &config.block_mcc {
            if !spendguard_sdk::types::is_mcc(mcc) {
                return Err(format!(
                    "`block_mcc` entry `{mcc}` is not a four-digit merchant category code \
                     (like `7995`)"
                ));
            }
        }
        Ok(())
    }

    fn evaluate(request: &SpendRequest, config: &Config) -> Decision {
        let merchant = &request.merchant;
        if config.block_mcc.contains(&merchant.mcc) {
            return Decision::deny(format!(
                "merchant category {} is blocked (merchant `{}`)",
                merchant.mcc, merchant.id
            ));
        }
        if config.allow_merchants.is_empty() {
            return Decision::allow();
        }
        match config.allow_merchants.iter().find(|pattern| matches(pattern, &merchant.id)) {
            Some(pattern) => {
                log::debug(&format!("merchant `{}` allowed by entry `{pattern}`", merchant.id));
                Decision::allow()
            }
            None => Decision::deny(format!("merchant `{}` is not on the allowlist", merchant.id)),
        }
    }
}

spendguard_sdk::export_policy!(MerchantRules);

#[cfg(test)]
mod tests {
    use super::*;
    use spendguard_sdk::testing::{TestHost, request};

    const CONFIG: &str = r#"{
        "allow_merchants": ["api.openai.com", "*.anthropic.com"],
        "block_mcc": ["7995", "6051"]
    }"#;

    fn at(merchant: &str, mcc: &str, config: &str) -> Decision {
        let mut request = request("10.00", "USD");
        request.merchant.id = merchant.into();
        request.merchant.mcc = mcc.into();
        TestHost::new().evaluate::<MerchantRules>(&request, config).decision
    }

    #[test]
    fn an_allowed_merchant_is_allowed() {
        assert_eq!(at("api.openai.com", "5734", CONFIG), Decision::allow());
    }

    #[test]
    fn a_wildcard_matches_subdomains_at_any_depth() {
        assert!(at("api.anthropic.com", "5734", CONFIG).is_allow());
        assert!(at("eu.api.anthropic.com", "5734", CONFIG).is_allow());
    }

    #[test]
    fn a_wildcard_does_not_match_the_bare_domain_or_lookalikes() {
        for merchant in [
            "anthropic.com",
            "evilanthropic.com",
            "anthropic.com.evil.net",
            ".anthropic.com",
            "x..anthropic.com",
            "evil.net/.anthropic.com",
        ] {
            let decision = at(merchant, "5734", CONFIG);
            assert_eq!(
                decision,
                Decision::deny(format!("merchant `{merchant}` is not on the allowlist")),
                "{merchant}"
            );
        }
    }

    #[test]
    fn exact_entries_match_exactly() {
        assert!(!at("API.openai.com", "5734", CONFIG).is_allow());
        assert!(!at("sub.api.openai.com", "5734", CONFIG).is_allow());
        assert!(!at("api.openai.co", "5734", CONFIG).is_allow());
    }

    #[test]
    fn a_blocked_category_is_denied_naming_the_code() {
        let decision = at("api.openai.com", "7995", CONFIG);
        assert!(matches!(&decision, Decision::Deny(r) if r.contains("category 7995")));
    }

    #[test]
    fn without_an_allowlist_any_merchant_is_allowed_but_blocks_hold() {
        let config = r#"{ "block_mcc": ["7995"] }"#;
        assert!(at("anything.example", "5734", config).is_allow());
        assert!(!at("casino.example", "7995", config).is_allow());
        assert!(at("anything.example", "7995", "{}").is_allow());
        assert!(at("anything.example", "5734", r#"{ "allow_merchants": [] }"#).is_allow());
    }

    #[test]
    fn good_configs_are_accepted() {
        for config in [
            CONFIG,
            "{}",
            r#"{ "allow_merchants": [] , "block_mcc": [] }"#,
            r#"{ "allow_merchants": ["acq-4471-0093", "*.eu.example.com"] }"#,
        ] {
            assert_eq!(TestHost::validate_config::<MerchantRules>(config), Ok(()), "{config}");
        }
    }

    #[test]
    fn bad_configs_are_refused_with_a_message() {
        let cases = [
            (r#"{ "block_mcc": ["799"] }"#, "`block_mcc` entry `799`"),
            (r#"{ "block_mcc": ["79955"] }"#, "`block_mcc` entry `79955`"),
            (r#"{ "block_mcc": ["abcd"] }"#, "`block_mcc` entry `abcd`"),
            (r#"{ "block_mcc": [7995] }"#, "invalid config"),
            (r#"{ "allow_merchants": ["*"] }"#, "leave the list empty"),
            (r#"{ "allow_merchants": [""] }"#, "empty entry"),
            (r#"{ "allow_merchants": ["*example.com"] }"#, "must start with `*.`"),
            (r#"{ "allow_merchants": ["api.*.com"] }"#, "only allowed as a leading"),
            (r#"{ "allow_merchants": ["*..com"] }"#, "is not a domain"),
            (r#"{ "allow_merchants": [" api.openai.com"] }"#, "spaces"),
            (r#"{ "allow_merchant": ["api.openai.com"] }"#, "unknown field"),
        ];
        for (config, fragment) in cases {
            let result = TestHost::validate_config::<MerchantRules>(config);
            assert!(matches!(&result, Err(message) if message.contains(fragment)), "{config}: {result:?}");
        }
    }
}
