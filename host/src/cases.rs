//! The cases file of `spendguard policy test`, and the request, config and
//! history documents of `spendguard policy eval` (the same objects).
//!
//! Every object refuses unknown fields, and amounts are decimal strings, so a
//! typo or a float is an error instead of a silently different test.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::history::{PastSpend, StaticHistory};
use crate::money::{Amount, MoneyError};
use crate::policy::{Agent, Decision, Merchant, RequestMandate, SpendRequest};
use crate::sandbox::{Evaluation, LoadedPolicy, Run, Sandbox, fault_reason};

/// When a request without `at` is received: 2026-11-24T12:00:00Z. Fixed, so
/// a case decides the same way whenever it runs.
pub const DEFAULT_RECEIVED_AT: &str = "2026-11-24T12:00:00Z";
/// The agent of a request without `agent`.
pub const DEFAULT_AGENT_ID: &str = "test-agent";
/// The config of a case or an evaluation without one.
pub const DEFAULT_CONFIG: &str = "{}";

/// A cases file: `{"cases": [...]}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CasesFile {
    pub cases: Vec<Case>,
}

/// One case: a config, a history and a request, and what the policy should decide.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub name: String,
    #[serde(default)]
    pub config: Option<serde_json::Value>,
    #[serde(default)]
    pub history: Vec<HistoryEntry>,
    pub request: RequestDoc,
    pub expect: Expect,
}

/// A committed spend in a case's history.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryEntry {
    pub amount: String,
    pub currency: String,
    #[serde(default)]
    pub merchant_id: String,
    #[serde(default)]
    pub mcc: String,
    /// RFC 3339 (`2026-11-24T09:00:00Z`).
    pub at: String,
    /// `"self"` (the requesting agent, the default) or another agent's id.
    #[serde(default = "self_agent")]
    pub agent: String,
    /// The mandate it was made under, if any.
    #[serde(default)]
    pub mandate_id: Option<String>,
}

fn self_agent() -> String {
    "self".into()
}

/// A proposed spend. Only amount, currency and merchant are required.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestDoc {
    pub amount: String,
    pub currency: String,
    pub merchant: MerchantDoc,
    #[serde(default)]
    pub purpose: String,
    /// RFC 3339; defaults to [`DEFAULT_RECEIVED_AT`].
    #[serde(default)]
    pub at: Option<String>,
    #[serde(default)]
    pub agent: Option<AgentDoc>,
    /// The proposal id; defaults to `spend-test`.
    #[serde(default)]
    pub id: Option<String>,
    /// The mandate the spend is proposed under (seen by 0.2.0 policies).
    #[serde(default)]
    pub mandate: Option<MandateDoc>,
}

/// The mandate of a request, in the request's currency.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MandateDoc {
    pub id: String,
    #[serde(default)]
    pub purpose: String,
    /// The budget, a decimal string.
    pub budget: String,
    /// What is left of it before this spend; defaults to the budget.
    #[serde(default)]
    pub remaining: Option<String>,
    #[serde(default)]
    pub max_spends: Option<u32>,
    /// Spends made under it before this one.
    #[serde(default)]
    pub spend_count: u32,
    /// RFC 3339; defaults to an hour after the request is received.
    #[serde(default)]
    pub expires_at: Option<String>,
    /// `"operator"` (the default) or `"agent"` (requested by the agent,
    /// then approved).
    #[serde(default)]
    pub created_by: CreatedBy,
}

/// Who created a mandate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CreatedBy {
    #[default]
    Operator,
    Agent,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MerchantDoc {
    pub id: String,
    /// Defaults to the id.
    #[serde(default)]
    pub name: Option<String>,
    pub mcc: String,
    #[serde(default)]
    pub country: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentDoc {
    pub id: String,
    /// Defaults to the id.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// What a case expects.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    pub decision: DecisionKind,
    #[serde(default)]
    pub reason_contains: Option<String>,
    /// The card's life as the policy narrowed it (an allow's, or an escalation's should it be approved).
    #[serde(default)]
    pub ttl_seconds: Option<u32>,
    /// The card's cap as the policy narrowed it, a decimal string in the
    /// request's currency.
    #[serde(default)]
    pub max_amount: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecisionKind {
    Allow,
    Deny,
    RequireApproval,
}

impl DecisionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DecisionKind::Allow => "allow",
            DecisionKind::Deny => "deny",
            DecisionKind::RequireApproval => "require_approval",
        }
    }
}

/// Input that cannot be turned into a request or a history.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    #[error("{field}: {source}")]
    Money { field: String, source: MoneyError },
    #[error("{field}: `{value}` is not an RFC 3339 time (like `2026-11-24T12:00:00Z`)")]
    Time { field: String, value: String },
    #[error("{field}: {message}")]
    Field { field: String, message: String },
}

fn parse_time_ms(field: &str, value: &str) -> Result<u64, InputError> {
    let time_err = || InputError::Time { field: field.into(), value: value.into() };
    let t = OffsetDateTime::parse(value, &Rfc3339).map_err(|_| time_err())?;
    u64::try_from(t.unix_timestamp_nanos() / 1_000_000).map_err(|_| time_err())
}

fn parse_amount(field: &str, amount: &str, currency: &str) -> Result<Amount, InputError> {
    Amount::parse(amount, currency).map_err(|source| InputError::Money { field: field.into(), source })
}

/// A merchant category code is four digits (ISO 18245).
pub fn check_mcc(field: &str, mcc: &str) -> Result<(), InputError> {
    if spendguard_types::is_mcc(mcc) {
        Ok(())
    } else {
        Err(InputError::Field {
            field: field.into(),
            message: format!("`{mcc}` is not a four-digit merchant category code"),
        })
    }
}

/// A country is empty or two upper-case letters (ISO 3166-1 alpha-2).
pub fn check_country(field: &str, country: &str) -> Result<(), InputError> {
    if spendguard_types::is_country(country) {
        Ok(())
    } else {
        Err(InputError::Field {
            field: field.into(),
            message: format!("`{country}` is not a two-letter country code"),
        })
    }
}

/// A merchant id the daemon would take: no lookalike of another id (see
/// [`crate::lookalike`]), so a case never tests what cannot happen.
pub fn check_merchant_id(field: &str, id: &str) -> Result<(), InputError> {
    crate::lookalike::check_merchant_id(id).map_err(|why| InputError::Field {
        field: field.into(),
        message: format!("{why}: {}", crate::lookalike::INSTEAD),
    })
}

impl RequestDoc {
    pub fn to_request(&self) -> Result<SpendRequest, InputError> {
        let amount = parse_amount("request.amount", &self.amount, &self.currency)?;
        check_mcc("request.merchant.mcc", &self.merchant.mcc)?;
        check_country("request.merchant.country", &self.merchant.country)?;
        if self.merchant.id.is_empty() {
            return Err(InputError::Field {
                field: "request.merchant.id".into(),
                message: "must not be empty".into(),
            });
        }
        check_merchant_id("request.merchant.id", &self.merchant.id)?;
        let received_at_ms = parse_time_ms("request.at", self.at.as_deref().unwrap_or(DEFAULT_RECEIVED_AT))?;
        let agent = match &self.agent {
            Some(a) => Agent {
                id: a.id.clone(),
                name: a.name.clone().unwrap_or_else(|| a.id.clone()),
                labels: a.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            },
            None => Agent { id: DEFAULT_AGENT_ID.into(), name: "test agent".into(), labels: Vec::new() },
        };
        let mandate = match &self.mandate {
            Some(m) => Some(m.to_mandate(&self.currency, received_at_ms)?),
            None => None,
        };
        Ok(SpendRequest {
            id: self.id.clone().unwrap_or_else(|| "spend-test".into()),
            agent,
            amount,
            merchant: Merchant {
                id: self.merchant.id.clone(),
                name: self.merchant.name.clone().unwrap_or_else(|| self.merchant.id.clone()),
                mcc: self.merchant.mcc.clone(),
                country: self.merchant.country.clone(),
            },
            purpose: self.purpose.clone(),
            received_at_ms,
            mandate,
        })
    }
}

impl MandateDoc {
    fn to_mandate(&self, currency: &str, received_at_ms: u64) -> Result<RequestMandate, InputError> {
        let field = |name: &str, message: String| InputError::Field {
            field: format!("request.mandate.{name}"),
            message,
        };
        if self.id.is_empty() {
            return Err(field("id", "must not be empty".into()));
        }
        let budget = parse_amount("request.mandate.budget", &self.budget, currency)?;
        if budget.units() <= 0 {
            return Err(field("budget", format!("must be positive, got `{}`", self.budget)));
        }
        let remaining = match &self.remaining {
            Some(r) => parse_amount("request.mandate.remaining", r, currency)?,
            None => budget.clone(),
        };
        if remaining.units() < 0 || remaining.units() > budget.units() {
            return Err(field(
                "remaining",
                format!("must be between 0 and the budget {budget}, got `{remaining}`"),
            ));
        }
        if self.max_spends.is_some_and(|max| self.spend_count > max) {
            return Err(field("spend_count", "must not be above max_spends".into()));
        }
        let expires_at_ms = match &self.expires_at {
            Some(at) => parse_time_ms("request.mandate.expires_at", at)?,
            None => received_at_ms.saturating_add(3_600_000),
        };
        Ok(RequestMandate {
            id: self.id.clone(),
            purpose: self.purpose.clone(),
            budget,
            remaining,
            max_spends: self.max_spends,
            spend_count: self.spend_count,
            expires_at_ms,
            created_by_operator: self.created_by == CreatedBy::Operator,
        })
    }
}

/// Turn history entries into a history the sandbox can query.
pub fn to_history(entries: &[HistoryEntry]) -> Result<StaticHistory, InputError> {
    let mut spends = Vec::with_capacity(entries.len());
    for (i, e) in entries.iter().enumerate() {
        check_merchant_id(&format!("history[{i}].merchant_id"), &e.merchant_id)?;
        spends.push(PastSpend {
            amount: parse_amount(&format!("history[{i}].amount"), &e.amount, &e.currency)?,
            merchant_id: e.merchant_id.clone(),
            mcc: e.mcc.clone(),
            at_ms: parse_time_ms(&format!("history[{i}].at"), &e.at)?,
            agent: (e.agent != "self").then(|| e.agent.clone()),
            mandate_id: e.mandate_id.clone(),
        });
    }
    Ok(StaticHistory(spends))
}

/// What an offline evaluation decided: the policy refused its config, or
/// it evaluated the request.
#[derive(Debug, Clone)]
pub enum Outcome {
    ConfigRefused(Run<Result<(), String>>),
    Evaluated(Evaluation),
}

impl Outcome {
    /// The decision as it counts (a fault or a refused config is a deny).
    pub fn decision(&self, policy_name: &str) -> Decision {
        match self {
            Outcome::Evaluated(e) => e.decision(policy_name),
            Outcome::ConfigRefused(run) => match &run.outcome {
                Ok(Err(message)) => {
                    Decision::Deny(format!("config refused by policy `{policy_name}`: {message}"))
                }
                Err(fault) => Decision::Deny(fault_reason(policy_name, fault)),
                // INVARIANT: only refusals and faults are stored here.
                Ok(Ok(())) => Decision::Deny(format!("config refused by policy `{policy_name}`")),
            },
        }
    }
}

/// Evaluate like the daemon: the config is validated first (the daemon does
/// it when the policy is attached), then the request is evaluated.
pub fn evaluate(
    sandbox: &Sandbox,
    policy: &LoadedPolicy,
    request: &SpendRequest,
    config: &str,
    history: StaticHistory,
) -> Outcome {
    let check = sandbox.validate_config(policy, config);
    if !matches!(check.outcome, Ok(Ok(()))) {
        return Outcome::ConfigRefused(check);
    }
    Outcome::Evaluated(sandbox.evaluate(policy, request, config, Arc::new(history)))
}

impl Case {
    /// The config document as the policy receives it.
    pub fn config_json(&self) -> String {
        self.config.as_ref().map_or_else(|| DEFAULT_CONFIG.to_owned(), |v| v.to_string())
    }

    /// Run the case; `Ok` holds the decision when it met the expectation,
    /// `Err` says what was expected and what came instead.
    pub fn run(
        &self,
        sandbox: &Sandbox,
        policy: &LoadedPolicy,
        policy_name: &str,
    ) -> Result<Decision, CaseFailure> {
        let request = self.request.to_request().map_err(CaseFailure::Input)?;
        let history = to_history(&self.history).map_err(CaseFailure::Input)?;
        let decision =
            evaluate(sandbox, policy, &request, &self.config_json(), history).decision(policy_name);
        self.expect.check(&decision, &request).map_err(CaseFailure::Mismatch)?;
        Ok(decision)
    }
}

/// Why a case did not pass.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CaseFailure {
    #[error("invalid case: {0}")]
    Input(InputError),
    #[error("{0}")]
    Mismatch(String),
}

impl Expect {
    /// Compare a decision with the expectation; the error reads
    /// "expected …, got …".
    pub fn check(&self, got: &Decision, request: &SpendRequest) -> Result<(), String> {
        let describe = |d: &Decision| {
            let mut s = d.kind().to_owned();
            if let Some(reason) = d.reason() {
                s.push_str(&format!(" ({reason:?})"));
            }
            let terms = d.card_terms().cloned().unwrap_or_default();
            if let Some(ttl) = terms.ttl_seconds {
                s.push_str(&format!(" (ttl {ttl}s)"));
            }
            if let Some(cap) = &terms.max_amount {
                s.push_str(&format!(" (cap {cap})"));
            }
            s
        };
        let kind = self.decision.as_str();
        let mismatch = |what: String| Err(format!("expected {what}, got {}", describe(got)));
        if got.kind() != self.decision.as_str() {
            return mismatch(kind.to_owned());
        }
        if let Some(fragment) = &self.reason_contains
            && !got.reason().unwrap_or_default().contains(fragment.as_str())
        {
            return mismatch(format!("{kind} with a reason containing {fragment:?}"));
        }
        let terms = got.card_terms().cloned().unwrap_or_default();
        if let Some(ttl) = self.ttl_seconds
            && terms.ttl_seconds != Some(ttl)
        {
            return mismatch(format!("{kind} with ttl {ttl}s"));
        }
        if let Some(cap) = &self.max_amount {
            let want = Amount::parse(cap, request.amount.currency())
                .map_err(|e| format!("invalid expect.max_amount: {e}"))?;
            if terms.max_amount.as_ref() != Some(&want) {
                return mismatch(format!("{kind} with cap {want}"));
            }
        }
        Ok(())
    }
}
