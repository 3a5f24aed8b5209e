//! The floor: the same rules as plain Rust functions, configs already
//! parsed, history asked directly. Nothing a sandbox or a policy language
//! adds; what is left is the rules and the history lookup.

use spendguard::history::History;
use spendguard::money::Amount;
use spendguard::policy::{CardTerms, Decision, SpendRequest};

use crate::rules::{Rule, Verdict, scope};

/// Every rule, in order, combined as the daemon combines policies.
pub fn decide(rules: &[Rule], request: &SpendRequest, history: &dyn History) -> Verdict {
    Verdict::combine(rules.iter().map(|rule| check(rule, request, history)))
}

fn check(rule: &Rule, request: &SpendRequest, history: &dyn History) -> Decision {
    let amount = &request.amount;
    let merchant = &request.merchant;
    match rule {
        Rule::SpendLimit { limit, currency, merchant_id, mcc, .. } => {
            let covers =
                merchant_id.is_none_or(|m| m == merchant.id) && mcc.is_none_or(|m| m == merchant.mcc);
            if !covers {
                return Decision::Allow(CardTerms::default());
            }
            if amount.currency() != *currency {
                return Decision::Deny(format!(
                    "this spend is in {}, the limit in {currency}",
                    amount.currency()
                ));
            }
            let Some(filter) = rule.spend_filter(request) else {
                return Decision::Deny("no history filter".into());
            };
            let spent = match history.summarize(&scope(request), &filter) {
                Ok(summary) => summary.total_units,
                Err(e) => return Decision::Deny(format!("history: {e}")),
            };
            match spent.checked_add(amount.units()) {
                Some(total) if total <= *limit => Decision::Allow(CardTerms::default()),
                _ => Decision::Deny(format!(
                    "over the spend limit: {spent} spent, {} requested",
                    amount.units()
                )),
            }
        }
        Rule::MerchantRules { allow_merchants, block_mcc } => {
            if block_mcc.contains(&merchant.mcc.as_str()) {
                return Decision::Deny(format!("merchant category {} is blocked", merchant.mcc));
            }
            if allow_merchants.is_empty() || allow_merchants.iter().any(|p| matches(p, &merchant.id)) {
                Decision::Allow(CardTerms::default())
            } else {
                Decision::Deny(format!("merchant `{}` is not on the allowlist", merchant.id))
            }
        }
        Rule::ApprovalThreshold { threshold, currency } => {
            if amount.currency() != *currency || amount.units() > *threshold {
                Decision::RequireApproval {
                    reason: format!("{amount} needs an operator's approval"),
                    terms: CardTerms::default(),
                }
            } else {
                Decision::Allow(CardTerms::default())
            }
        }
        Rule::PurchaseCap { cap, currency, ttl_seconds } => {
            if amount.currency() != *currency {
                Decision::Deny(format!("this spend is in {}, the cap in {currency}", amount.currency()))
            } else if amount.units() > *cap {
                Decision::Deny(format!("{amount} is over the per-purchase cap of {}", show(*cap, currency)))
            } else {
                Decision::Allow(CardTerms { ttl_seconds: *ttl_seconds, max_amount: None })
            }
        }
    }
}

fn show(units: i64, currency: &str) -> String {
    Amount::from_units(units, currency).map_or_else(|_| units.to_string(), |a| a.to_string())
}

/// merchant-rules' own matching (`policies/merchant-rules/src/lib.rs`):
/// `*.example.com` matches one or more domain labels before `.example.com`.
fn matches(pattern: &str, merchant: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some(suffix) => merchant.strip_suffix(suffix).is_some_and(|labels| {
            labels
                .split('.')
                .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
        }),
        None => pattern == merchant,
    }
}
