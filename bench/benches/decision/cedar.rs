//! The same rules in Cedar. The policy set is parsed once; each decision
//! builds the Cedar request from the spend request (entities, context, and
//! the history totals the host must look up in advance, since a Cedar
//! policy cannot ask the ledger), then runs `Authorizer::is_authorized`.
//!
//! How the rules map:
//! - one `permit` for every spend, and a `forbid` per way a rule denies;
//! - amounts are `Long`s in units of the currency (Cedar's `decimal` has 4
//!   places, too few for USDC or BTC);
//! - require-approval is a `forbid` annotated `@outcome("require_approval")`:
//!   a deny whose determining policies are all so annotated escalates;
//! - a spend-limit rule `i` reads `context.spent_i`, what the host found in
//!   history for that rule's window and filter;
//! - merchant-rules' `*.example.com` is Cedar's `like "*.example.com"`, which
//!   is looser (it also matches `.example.com` and `x/.example.com`); the
//!   requests here are well-formed domains, where the two agree;
//! - a Cedar policy that errors (an overflow) is skipped by Cedar; the host
//!   must then deny, as it does for a faulting Wasm policy.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;

use anyhow::Context as _;
use cedar_policy::{
    Authorizer, Context, Decision, Entities, Entity, EntityId, EntityTypeName, EntityUid, PolicyId,
    PolicySet, Request, RestrictedExpression,
};
use spendguard::history::History;
use spendguard::policy::SpendRequest;

use crate::rules::{Outcome, Rule, scope};

/// A case's rules, compiled to a Cedar policy set once.
pub struct CedarRules {
    rules: Vec<Rule>,
    policies: PolicySet,
    /// The `forbid`s that escalate rather than deny.
    escalations: HashSet<PolicyId>,
    authorizer: Authorizer,
    agent_type: EntityTypeName,
    merchant_type: EntityTypeName,
    action: EntityUid,
}

impl CedarRules {
    pub fn new(rules: &[Rule]) -> anyhow::Result<Self> {
        let text = policy_text(rules);
        let policies = PolicySet::from_str(&text).map_err(|e| anyhow::anyhow!("{e}\n{text}"))?;
        let escalations = policies
            .policies()
            .filter(|p| p.annotation("outcome") == Some("require_approval"))
            .map(|p| p.id().clone())
            .collect();
        Ok(CedarRules {
            rules: rules.to_vec(),
            policies,
            escalations,
            authorizer: Authorizer::new(),
            agent_type: EntityTypeName::from_str("Agent")?,
            merchant_type: EntityTypeName::from_str("Merchant")?,
            action: EntityUid::from_str(r#"Action::"spend""#)?,
        })
    }

    /// One decision, request construction included.
    pub fn decide(&self, request: &SpendRequest, history: &dyn History) -> anyhow::Result<Outcome> {
        let (cedar_request, entities) = self.build(request, history)?;
        let response = self.authorizer.is_authorized(&cedar_request, &self.policies, &entities);
        let diagnostics = response.diagnostics();
        // Fail closed: Cedar skips a policy that errors.
        if diagnostics.errors().next().is_some() {
            return Ok(Outcome::Deny);
        }
        Ok(match response.decision() {
            Decision::Allow => Outcome::Allow,
            Decision::Deny => {
                let mut reasons = diagnostics.reason().peekable();
                if reasons.peek().is_some() && reasons.all(|id| self.escalations.contains(id)) {
                    Outcome::RequireApproval
                } else {
                    Outcome::Deny
                }
            }
        })
    }

    /// The Cedar request and entities for a spend request: the agent and
    /// the merchant as entities with their attributes, the amount and the
    /// history totals in the context.
    fn build(&self, request: &SpendRequest, history: &dyn History) -> anyhow::Result<(Request, Entities)> {
        let agent_uid =
            EntityUid::from_type_name_and_id(self.agent_type.clone(), EntityId::new(&request.agent.id));
        let labels = RestrictedExpression::new_record(
            request
                .agent
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), RestrictedExpression::new_string(v.clone()))),
        )?;
        let agent = Entity::new(
            agent_uid.clone(),
            HashMap::from([
                ("name".to_owned(), RestrictedExpression::new_string(request.agent.name.clone())),
                ("labels".to_owned(), labels),
            ]),
            HashSet::new(),
        )?;
        let merchant = &request.merchant;
        let merchant_uid =
            EntityUid::from_type_name_and_id(self.merchant_type.clone(), EntityId::new(&merchant.id));
        let merchant = Entity::new(
            merchant_uid.clone(),
            HashMap::from([
                ("id".to_owned(), RestrictedExpression::new_string(merchant.id.clone())),
                ("name".to_owned(), RestrictedExpression::new_string(merchant.name.clone())),
                ("mcc".to_owned(), RestrictedExpression::new_string(merchant.mcc.clone())),
                ("country".to_owned(), RestrictedExpression::new_string(merchant.country.clone())),
            ]),
            HashSet::new(),
        )?;
        let entities = Entities::from_entities([agent, merchant], None)?;

        let amount = &request.amount;
        let mut context = vec![
            ("amount".to_owned(), RestrictedExpression::new_long(amount.units())),
            ("currency".to_owned(), RestrictedExpression::new_string(amount.currency().to_owned())),
            ("purpose".to_owned(), RestrictedExpression::new_string(request.purpose.clone())),
            (
                "received_at_ms".to_owned(),
                RestrictedExpression::new_long(i64::try_from(request.received_at_ms)?),
            ),
        ];
        // Cedar cannot call back into the host: every history question a
        // rule may ask is answered before the decision, whether the rule
        // ends up needing it or not.
        let scope = scope(request);
        for (i, rule) in self.rules.iter().enumerate() {
            if let Some(filter) = rule.spend_filter(request) {
                let spent = history.summarize(&scope, &filter).context("history")?;
                context.push((format!("spent_{i}"), RestrictedExpression::new_long(spent.total_units)));
            }
        }
        let context = Context::from_pairs(context)?;
        let cedar_request = Request::new(agent_uid, self.action.clone(), merchant_uid, context, None)?;
        Ok((cedar_request, entities))
    }
}

/// The Cedar source of a case's rules.
pub fn policy_text(rules: &[Rule]) -> String {
    let mut text = String::from("permit (principal, action == Action::\"spend\", resource);\n");
    let mut forbid = |i: usize, outcome: &str, condition: String| {
        text.push_str(&format!(
            "@rule(\"{i}\")\n@outcome(\"{outcome}\")\nforbid (principal, action == Action::\"spend\", resource)\nwhen {{ {condition} }};\n"
        ));
    };
    for (i, rule) in rules.iter().enumerate() {
        match rule {
            Rule::SpendLimit { limit, currency, merchant_id, mcc, .. } => {
                let mut covers = String::new();
                if let Some(m) = merchant_id {
                    covers.push_str(&format!("resource.id == {} && ", quote(m)));
                }
                if let Some(m) = mcc {
                    covers.push_str(&format!("resource.mcc == {} && ", quote(m)));
                }
                let currency = quote(currency);
                forbid(i, "deny", format!("{covers}context.currency != {currency}"));
                forbid(
                    i,
                    "deny",
                    format!(
                        "{covers}context.currency == {currency} && context.amount + context.spent_{i} > {limit}"
                    ),
                );
            }
            Rule::MerchantRules { allow_merchants, block_mcc } => {
                if !block_mcc.is_empty() {
                    forbid(i, "deny", format!("{}.contains(resource.mcc)", set(block_mcc)));
                }
                if !allow_merchants.is_empty() {
                    let (wildcards, exact): (Vec<&str>, Vec<&str>) =
                        allow_merchants.iter().partition(|p| p.starts_with("*."));
                    let mut allowed = vec![format!("{}.contains(resource.id)", set(&exact))];
                    allowed.extend(wildcards.iter().map(|w| format!("resource.id like {}", quote(w))));
                    forbid(i, "deny", format!("!({})", allowed.join(" || ")));
                }
            }
            Rule::ApprovalThreshold { threshold, currency } => {
                forbid(
                    i,
                    "require_approval",
                    format!("context.currency != {} || context.amount > {threshold}", quote(currency)),
                );
            }
            Rule::PurchaseCap { cap, currency, .. } => {
                forbid(
                    i,
                    "deny",
                    format!("context.currency != {} || context.amount > {cap}", quote(currency)),
                );
            }
        }
    }
    text
}

fn quote(s: &str) -> String {
    format!("{s:?}")
}

fn set(items: &[&str]) -> String {
    format!("[{}]", items.iter().map(|s| quote(s)).collect::<Vec<_>>().join(", "))
}
