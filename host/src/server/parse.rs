//! Request parsing: each request body and query string the handlers take,
//! parsed and validated completely with no state, before anything is read
//! or written. Bad input is a 4xx [`ApiError`] naming what is wrong. The
//! fuzz target `api_requests` drives these very functions.

use std::collections::BTreeMap;

use axum::extract::Query;
use axum::http::HeaderMap;
use serde::Deserialize;
use serde_json::{Value, json};

use super::ApiError;
use super::json::{self, parse_bytes};
use crate::audit::Checkpoint;
use crate::cards::AuthorizationRequest;
use crate::cases::{check_country, check_mcc};
use crate::money::Amount;
use crate::policy;
use crate::storage::Role;

/// Longest merchant id, merchant name, agent name or label accepted.
pub const MAX_NAME_CHARS: usize = 200;
/// Longest purpose accepted.
pub const MAX_PURPOSE_CHARS: usize = 1000;
/// Longest idempotency key accepted.
pub const MAX_IDEMPOTENCY_KEY_CHARS: usize = 200;
/// Most policies attached to one agent.
pub const MAX_ATTACHMENTS: usize = 32;

/// Most records one listing returns.
pub const MAX_LIST: usize = 1000;

/// Text a person typed: bounded, and no control characters (they hide
/// things in logs and terminals), nor what reorders or breaks the text around
/// it unseen: direction embeddings, overrides and isolates ("Trojan Source"),
/// line and paragraph separators. Any other character is taken as sent,
/// unnormalized: accents, other scripts, emoji and their joiners.
pub fn text(field: &str, value: &str, max: usize, required: bool) -> Result<(), ApiError> {
    if required && value.trim().is_empty() {
        return Err(ApiError::invalid("invalid_field", format!("`{field}` must not be empty")));
    }
    if value.chars().count() > max {
        return Err(ApiError::invalid("invalid_field", format!("`{field}` is longer than {max} characters")));
    }
    let hidden = |c: char| {
        c.is_control()
            || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{2028}' | '\u{2029}')
    };
    if value.chars().any(hidden) {
        return Err(ApiError::invalid(
            "invalid_field",
            format!("`{field}` contains control, direction override or line separator characters"),
        ));
    }
    Ok(())
}

/// A merchant id: the card's lock, compared as it is. Besides what [`text`]
/// refuses, no white space and no invisible character (Unicode's default
/// ignorable code points: zero-width spaces and joiners, soft hyphens, byte
/// order marks, variation selectors, tags), which make two ids that look the
/// same differ; and no lookalike of another id (mixed scripts, compatibility
/// forms, letters confusable with ASCII: [`crate::lookalike`]), refused as
/// `confusable_merchant`.
pub fn merchant_id(field: &str, value: &str) -> Result<(), ApiError> {
    /// Default_Ignorable_Code_Point, from Unicode's DerivedCoreProperties.txt.
    const INVISIBLE: [(char, char); 17] = [
        ('\u{ad}', '\u{ad}'),
        ('\u{34f}', '\u{34f}'),
        ('\u{61c}', '\u{61c}'),
        ('\u{115f}', '\u{1160}'),
        ('\u{17b4}', '\u{17b5}'),
        ('\u{180b}', '\u{180f}'),
        ('\u{200b}', '\u{200f}'),
        ('\u{202a}', '\u{202e}'),
        ('\u{2060}', '\u{206f}'),
        ('\u{3164}', '\u{3164}'),
        ('\u{fe00}', '\u{fe0f}'),
        ('\u{feff}', '\u{feff}'),
        ('\u{ffa0}', '\u{ffa0}'),
        ('\u{fff0}', '\u{fff8}'),
        ('\u{1bca0}', '\u{1bca3}'),
        ('\u{1d173}', '\u{1d17a}'),
        ('\u{e0000}', '\u{e0fff}'),
    ];
    text(field, value, MAX_NAME_CHARS, true)?;
    let invisible =
        |c: char| c.is_whitespace() || INVISIBLE.iter().any(|&(from, to)| (from..=to).contains(&c));
    if value.chars().any(invisible) {
        return Err(ApiError::invalid(
            "invalid_field",
            format!("`{field}` contains white space or invisible characters"),
        ));
    }
    crate::lookalike::check_merchant_id(value).map_err(|why| {
        ApiError::invalid("confusable_merchant", format!("`{field}` {why}: {}", crate::lookalike::INSTEAD))
    })
}

pub fn amount(amount: &str, currency: &str) -> Result<Amount, ApiError> {
    Amount::parse(amount, currency).map_err(|e| ApiError::invalid("invalid_amount", e.to_string()))
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else { return Ok(None) };
    let key = value.to_str().map_err(|_| {
        ApiError::invalid("invalid_idempotency_key", "`Idempotency-Key` must be printable ASCII")
    })?;
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_CHARS || key.chars().any(|c| c.is_control()) {
        return Err(ApiError::invalid(
            "invalid_idempotency_key",
            format!("`Idempotency-Key` must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} printable characters"),
        ));
    }
    Ok(Some(key.to_owned()))
}

pub type QueryResult<T> = Result<Query<T>, axum::extract::rejection::QueryRejection>;

/// A query string, or a 422 saying what is wrong with it.
pub fn query<T>(q: QueryResult<T>) -> Result<T, ApiError> {
    // Not the parser's message: it may repeat what the query held.
    q.map(|Query(q)| q).map_err(|_| {
        ApiError::invalid(
            "invalid_query",
            "the query string has a parameter this route does not take, or an invalid value",
        )
    })
}

// ---- spends ----------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProposeBody {
    amount: String,
    currency: String,
    #[serde(deserialize_with = "json::object")]
    merchant: MerchantBody,
    #[serde(default)]
    purpose: String,
    #[serde(default)]
    mandate_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MerchantBody {
    id: String,
    name: String,
    mcc: String,
    #[serde(default)]
    country: String,
}

/// A proposal as `POST /v1/spends` accepts it, before anything is read or
/// written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proposal {
    pub amount: Amount,
    pub merchant: policy::Merchant,
    pub purpose: String,
    pub idempotency_key: Option<String>,
    /// The mandate the agent spends under, if any.
    pub mandate_id: Option<String>,
}

/// Validate a proposal's body and `Idempotency-Key` header, as
/// `POST /v1/spends` does.
pub fn parse_proposal(body: &[u8], headers: &HeaderMap) -> Result<Proposal, ApiError> {
    let body: ProposeBody = parse_bytes(body)?;
    let amount = amount(&body.amount, &body.currency)?;
    merchant_id("merchant.id", &body.merchant.id)?;
    text("merchant.name", &body.merchant.name, MAX_NAME_CHARS, false)?;
    text("purpose", &body.purpose, MAX_PURPOSE_CHARS, false)?;
    check_mcc("merchant.mcc", &body.merchant.mcc)
        .map_err(|e| ApiError::invalid("invalid_field", e.to_string()))?;
    check_country("merchant.country", &body.merchant.country)
        .map_err(|e| ApiError::invalid("invalid_field", e.to_string()))?;
    if let Some(mandate_id) = &body.mandate_id {
        text("mandate_id", mandate_id, MAX_NAME_CHARS, true)?;
    }
    let idempotency_key = idempotency_key(headers)?;
    Ok(Proposal {
        amount,
        merchant: policy::Merchant {
            id: body.merchant.id,
            name: body.merchant.name,
            mcc: body.merchant.mcc,
            country: body.merchant.country,
        },
        purpose: body.purpose,
        idempotency_key,
        mandate_id: body.mandate_id,
    })
}

/// The query of `GET /v1/spends`: `?limit=N`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    #[serde(default)]
    pub limit: Option<usize>,
}

// ---- approvals -------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DenyBody {
    #[serde(default)]
    reason: Option<String>,
}

/// The reason of an operator's deny: an empty body, or `{"reason": "…"}`.
pub fn parse_deny(body: &[u8]) -> Result<String, ApiError> {
    let body: DenyBody = if body.is_empty() { DenyBody::default() } else { parse_bytes(body)? };
    let reason = body.reason.unwrap_or_else(|| "denied by the operator".into());
    text("reason", &reason, MAX_PURPOSE_CHARS, false)?;
    Ok(reason)
}

// ---- wallet ----------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DepositBody {
    amount: String,
    currency: String,
}

/// A deposit as `POST /v1/wallet/deposits` accepts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deposit {
    pub amount: Amount,
    pub idempotency_key: Option<String>,
}

/// Validate a deposit's body and `Idempotency-Key` header.
pub fn parse_deposit(body: &[u8], headers: &HeaderMap) -> Result<Deposit, ApiError> {
    let body: DepositBody = parse_bytes(body)?;
    let amount = amount(&body.amount, &body.currency)?;
    let idempotency_key = idempotency_key(headers)?;
    Ok(Deposit { amount, idempotency_key })
}

// ---- policies --------------------------------------------------------------

/// The query of `POST /v1/policies`: `?name=NAME`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UploadQuery {
    pub name: String,
}

/// Policy names: what an operator types in attachments (`spend-limit@2`).
pub fn policy_name(name: &str) -> Result<(), ApiError> {
    let fine = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if fine {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "invalid_name",
            format!("policy name `{name}` must be 1 to 64 of a-z, 0-9, `-` and `_`"),
        ))
    }
}

// ---- agents ----------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachmentBody {
    policy: String,
    #[serde(default)]
    config: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentBody {
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "json::objects")]
    policies: Vec<AttachmentBody>,
}

/// `PUT /v1/agents/{id}/policies` as an object (it may be the bare list too).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachmentsBody {
    #[serde(deserialize_with = "json::objects")]
    policies: Vec<AttachmentBody>,
}

/// An attachment as a request names it: checked, not yet looked up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachmentRef {
    pub policy: String,
    /// `None`: the latest version.
    pub version: Option<u32>,
    /// The config document, serialized.
    pub config: String,
}

/// Check a list of attachments without storage: at most [`MAX_ATTACHMENTS`],
/// each `NAME` or `NAME@VERSION`, each config within `max_config_bytes`.
pub fn attachment_refs(
    list: Vec<AttachmentBody>,
    max_config_bytes: usize,
) -> Result<Vec<AttachmentRef>, ApiError> {
    if list.len() > MAX_ATTACHMENTS {
        return Err(ApiError::invalid(
            "too_many_policies",
            format!("at most {MAX_ATTACHMENTS} policies per agent"),
        ));
    }
    let mut out = Vec::with_capacity(list.len());
    for item in list {
        let (name, version) = match item.policy.split_once('@') {
            Some((name, v)) => {
                let v: u32 = v.parse().map_err(|_| {
                    ApiError::invalid(
                        "invalid_policy_ref",
                        format!("`{}`: the version must be a number", item.policy),
                    )
                })?;
                (name.to_owned(), Some(v))
            }
            None => (item.policy, None),
        };
        policy_name(&name)?;
        let config = item.config.unwrap_or_else(|| json!({})).to_string();
        if config.len() > max_config_bytes {
            return Err(ApiError::too_large(format!(
                "the config of `{name}` is over {max_config_bytes} bytes"
            )));
        }
        out.push(AttachmentRef { policy: name, version, config });
    }
    Ok(out)
}

fn labels(labels: &BTreeMap<String, String>) -> Result<(), ApiError> {
    if labels.len() > MAX_ATTACHMENTS {
        return Err(ApiError::invalid("invalid_field", format!("at most {MAX_ATTACHMENTS} labels")));
    }
    for (k, v) in labels {
        text("labels", k, MAX_NAME_CHARS, true)?;
        text("labels", v, MAX_NAME_CHARS, false)?;
    }
    Ok(())
}

/// An agent as `POST /v1/agents` accepts it, its attachments not yet
/// looked up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewAgent {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub policies: Vec<AttachmentRef>,
}

/// Validate the body of `POST /v1/agents`.
pub fn parse_new_agent(body: &[u8], max_config_bytes: usize) -> Result<NewAgent, ApiError> {
    let body: AgentBody = parse_bytes(body)?;
    text("name", &body.name, MAX_NAME_CHARS, true)?;
    labels(&body.labels)?;
    let policies = attachment_refs(body.policies, max_config_bytes)?;
    Ok(NewAgent { name: body.name, labels: body.labels, policies })
}

/// Validate the body of `PUT /v1/agents/{id}/policies`: `{"policies": […]}`
/// or the bare list.
pub fn parse_attachments(body: &[u8], max_config_bytes: usize) -> Result<Vec<AttachmentRef>, ApiError> {
    let list = if body.trim_ascii_start().starts_with(b"[") {
        let list = json::parse_json::<Vec<json::Object<AttachmentBody>>>(body)?;
        list.into_iter().map(|json::Object(item)| item).collect()
    } else {
        parse_bytes::<AttachmentsBody>(body)?.policies
    };
    attachment_refs(list, max_config_bytes)
}

// ---- network ---------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizeBody {
    pan: String,
    cvv: String,
    exp_month: u8,
    exp_year: u16,
    amount: String,
    currency: String,
    merchant_id: String,
}

impl std::fmt::Debug for AuthorizeBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthorizeBody").field("merchant_id", &self.merchant_id).finish_non_exhaustive()
    }
}

/// Validate the body and `Idempotency-Key` header of
/// `POST /v1/network/authorizations`.
pub fn parse_authorization(body: &[u8], headers: &HeaderMap) -> Result<AuthorizationRequest, ApiError> {
    let body: AuthorizeBody = json::parse_secret_bytes(body)?;
    let digits = |s: &str, n: std::ops::RangeInclusive<usize>| {
        n.contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit())
    };
    if !digits(&body.pan, 12..=19) || !digits(&body.cvv, 3..=4) || !(1..=12).contains(&body.exp_month) {
        return Err(ApiError::invalid("invalid_card_data", "`pan`, `cvv` or `exp_month` is malformed"));
    }
    merchant_id("merchant_id", &body.merchant_id)?;
    let idempotency_key = idempotency_key(headers)?;
    Ok(AuthorizationRequest {
        idempotency_key,
        amount: amount(&body.amount, &body.currency)?,
        pan: body.pan,
        cvv: body.cvv,
        exp_month: body.exp_month,
        exp_year: body.exp_year,
        merchant_id: body.merchant_id,
    })
}

// ---- audit -----------------------------------------------------------------

/// The query of `GET /v1/audit`: `?after=SEQ&limit=N`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    #[serde(default)]
    pub after: u64,
    #[serde(default)]
    pub limit: Option<usize>,
}

/// The query of `GET /v1/audit/verify`: `?checkpoint=SEQ:HASH`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyQuery {
    #[serde(default)]
    pub checkpoint: Option<String>,
}

/// A checkpoint as `?checkpoint=SEQ:HASH` gives it.
pub fn parse_checkpoint(text: &str) -> Result<Checkpoint, ApiError> {
    text.parse()
        .map_err(|e: crate::audit::BadCheckpoint| ApiError::invalid("invalid_checkpoint", e.to_string()))
}

// ---- tokens ----------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewTokenBody {
    role: String,
    label: String,
}

/// A token as `POST /v1/tokens` asks for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewToken {
    pub role: Role,
    pub label: String,
}

/// Validate the body of `POST /v1/tokens`: an operator or network token
/// (an agent's token is made by creating the agent), with a label of
/// 1 to [`MAX_NAME_CHARS`] characters and no control characters.
pub fn parse_new_token(body: &[u8]) -> Result<NewToken, ApiError> {
    let body: NewTokenBody = parse_bytes(body)?;
    let role = match body.role.as_str() {
        "operator" => Role::Operator,
        "network" => Role::Network,
        "agent" => {
            return Err(ApiError::invalid(
                "invalid_role",
                "an agent's token is made by creating the agent (POST /v1/agents)",
            ));
        }
        _ => return Err(ApiError::invalid("invalid_role", "`role` must be `operator` or `network`")),
    };
    token_label(&body.label)?;
    Ok(NewToken { role, label: body.label })
}

/// A token's label: 1 to [`MAX_NAME_CHARS`] characters, none of them
/// control, direction override or line separator characters.
pub fn token_label(label: &str) -> Result<(), ApiError> {
    text("label", label, MAX_NAME_CHARS, true)
}
