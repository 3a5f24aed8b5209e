//! The handlers. Each checks the caller's role first, validates its input
//! completely before touching storage, and runs storage and policies on a
//! blocking thread.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::extract::PathId;
use super::json::{self, parse_bytes};
use super::transport::body_error;
use super::{ApiError, AppState, Caller};
use crate::audit::Checkpoint;
use crate::cards::AuthorizationRequest;
use crate::cases::{check_country, check_mcc};
use crate::datadir::{new_token, now_ms, token_hash};
use crate::history::History;
use crate::mandates::MandateRecord;
use crate::money::Amount;
use crate::policy::{self, CardTerms, Decision};
use crate::sandbox::{LoadedPolicy, fault_reason};
use crate::storage::{
    AgentRecord, Attachment, Decided, NewSpend, Role, SpendRecord, SpendStatus, TokenRecord, Verdict, new_id,
    new_ordered_id,
};

type Reply = Result<(StatusCode, Json<Value>), ApiError>;

/// Longest merchant id, merchant name, agent name or label accepted.
pub const MAX_NAME_CHARS: usize = 200;
/// Longest purpose accepted.
pub const MAX_PURPOSE_CHARS: usize = 1000;
/// Longest idempotency key accepted.
pub const MAX_IDEMPOTENCY_KEY_CHARS: usize = 200;
/// The response header of an authorization answered from an earlier one
/// with the same `Idempotency-Key`.
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";
/// Most policies attached to one agent.
pub const MAX_ATTACHMENTS: usize = 32;

fn ok(value: Value) -> Reply {
    Ok((StatusCode::OK, Json(value)))
}

fn created(value: Value) -> Reply {
    Ok((StatusCode::CREATED, Json(value)))
}

/// Run blocking work (storage, policies) off the async threads.
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await?
}

/// Text a person typed: bounded, and no control characters (they hide
/// things in logs and terminals), nor what reorders or breaks the text around
/// it unseen: direction embeddings, overrides and isolates ("Trojan Source"),
/// line and paragraph separators. Any other character is taken as sent,
/// unnormalized: accents, other scripts, emoji and their joiners.
pub(super) fn text(field: &str, value: &str, max: usize, required: bool) -> Result<(), ApiError> {
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
pub(super) fn merchant_id(field: &str, value: &str) -> Result<(), ApiError> {
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

pub(super) fn amount(amount: &str, currency: &str) -> Result<Amount, ApiError> {
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

pub(super) type QueryResult<T> = Result<Query<T>, axum::extract::rejection::QueryRejection>;

/// A query string, or a 422 saying what is wrong with it.
pub(super) fn query<T>(q: QueryResult<T>) -> Result<T, ApiError> {
    // Not the parser's message: it may repeat what the query held.
    q.map(|Query(q)| q).map_err(|_| {
        ApiError::invalid(
            "invalid_query",
            "the query string has a parameter this route does not take, or an invalid value",
        )
    })
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method",
    )
}

pub async fn healthz() -> Json<Value> {
    Json(json!({ "ok": true }))
}

pub async fn not_found() -> ApiError {
    ApiError::not_found("route")
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> Result<impl IntoResponse, ApiError> {
    let s = Arc::clone(&state);
    let balances = blocking(move || Ok(s.backend.balances()?)).await?;
    Ok((
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        state.metrics.render(&balances),
    ))
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

pub async fn propose(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Reply {
    let agent_id = caller.agent()?.to_owned();
    state.admit_proposal(&agent_id).await?;
    let proposal = parse_proposal(&json::body(body)?, &headers)?;
    let received_at_ms = now_ms();
    let spend = NewSpend {
        id: new_ordered_id("sp", received_at_ms),
        agent_id: agent_id.clone(),
        idempotency_key: proposal.idempotency_key,
        amount: proposal.amount,
        merchant: proposal.merchant,
        purpose: proposal.purpose,
        received_at_ms,
        mandate_id: proposal.mandate_id,
    };
    let turn = state.agent_turn(&agent_id).await?;
    let s = Arc::clone(&state);
    let actor = caller.actor();
    let proposed = blocking(move || {
        let _turn = turn;
        // Revoked since its token was checked: refused before its policies
        // run (and storage checks again in the transaction that would commit).
        let agent = s
            .backend
            .agent(&agent_id)?
            .filter(|a| !a.revoked)
            .ok_or_else(|| ApiError::unauthorized("revoked_token", "this agent was revoked"))?;
        // A mandate that is not the agent's own is not found, and nothing
        // is recorded (storage checks again in the committing transaction).
        // The policies see the mandate as it stands now (contract 0.2.0).
        let mandate = match &spend.mandate_id {
            Some(mandate_id) => Some(
                s.backend
                    .mandate(mandate_id)?
                    .filter(|m| m.mandate.agent_id == agent_id)
                    .ok_or_else(|| ApiError::not_found(format!("mandate `{mandate_id}`")))?,
            ),
            None => None,
        };
        let request = policy::SpendRequest {
            id: spend.id.clone(),
            agent: policy_agent(&agent),
            amount: spend.amount.clone(),
            merchant: spend.merchant.clone(),
            purpose: spend.purpose.clone(),
            received_at_ms,
            mandate: mandate.as_ref().and_then(MandateRecord::for_policy),
        };
        let policies = load_policies(&s, &agent);
        let mut decide = |history: Arc<dyn History>| evaluate_all(&s, &policies, &request, history);
        Ok(s.backend.propose(&spend, &s.card_issuance(), &actor, now_ms(), &mut decide)?)
    })
    .await?;
    state.metrics.proposal(if proposed.replayed { "replayed" } else { proposed.spend.status.as_str() });
    let card = proposed.card.as_ref().map(json::new_card);
    let mut v = json!({
        "id": proposed.spend.id,
        "status": proposed.spend.status.as_str(),
        "reasons": proposed.spend.reasons,
    });
    if let Some(card) = card {
        v["card"] = card;
    } else if proposed.replayed && proposed.spend.card_id.is_some() {
        v["card"] = json!({ "id": proposed.spend.card_id, "secrets": "shown once, in the first response" });
    }
    created(v)
}

fn policy_agent(agent: &AgentRecord) -> policy::Agent {
    policy::Agent {
        id: agent.id.clone(),
        name: agent.name.clone(),
        labels: agent.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
    }
}

/// The request the policies saw when the spend was proposed, rebuilt from
/// the record (same id, amount, merchant, purpose and time), with its
/// mandate as it stands now.
fn policy_request(
    spend: &SpendRecord,
    agent: &AgentRecord,
    mandate: Option<policy::RequestMandate>,
) -> policy::SpendRequest {
    policy::SpendRequest {
        id: spend.id.clone(),
        agent: policy_agent(agent),
        amount: spend.amount.clone(),
        merchant: spend.merchant.clone(),
        purpose: spend.purpose.clone(),
        received_at_ms: spend.received_at_ms,
        mandate,
    }
}

/// Every attached policy, each in a fresh sandbox, combined: deny wins over
/// require-approval over allow; any fault denies; no policy denies.
/// An agent's attachments with their compiled modules, or why one cannot
/// be loaded. Resolved before the storage transaction: the evaluation runs
/// while storage is write-locked, and must not ask storage for anything else.
type Loaded = Vec<(Attachment, Result<Arc<LoadedPolicy>, String>)>;

fn load_policies(state: &AppState, agent: &AgentRecord) -> Loaded {
    agent
        .attachments
        .iter()
        .map(|a| (a.clone(), state.policy(&a.policy, a.version).map_err(|e| e.message)))
        .collect()
}

fn evaluate_all(
    state: &AppState,
    policies: &Loaded,
    request: &policy::SpendRequest,
    history: Arc<dyn History>,
) -> Decided {
    if policies.is_empty() {
        return Verdict::Deny(vec!["no policy attached".into()]).into();
    }
    let mut evaluations = Vec::new();
    let (mut denies, mut escalations, mut terms) = (Vec::new(), Vec::new(), CardTerms::default());
    for (attachment, policy) in policies {
        let label = format!("{}@{}", attachment.policy, attachment.version);
        let policy = match policy {
            Ok(p) => p,
            Err(message) => {
                denies.push(format!("policy `{label}` could not be loaded: {message}"));
                evaluations.push(json!({ "policy": label, "decision": "deny", "error": message }));
                continue;
            }
        };
        let run = state.sandbox.evaluate(policy, request, &attachment.config, Arc::clone(&history));
        let fault = run.outcome.as_ref().err();
        state.metrics.evaluation(run.elapsed.as_secs_f64(), fault.map(|f| f.kind()));
        let decision = run.decision(&attachment.policy);
        match &decision {
            Decision::Allow(t) => terms = terms.narrowest(t.clone()),
            Decision::Deny(reason) => denies.push(match fault {
                Some(_) => reason.clone(),
                None => format!("{}: {reason}", attachment.policy),
            }),
            // Should the operator approve, the card is no wider than any
            // escalation asked, nor than any allowing policy's.
            Decision::RequireApproval { reason, terms: t } => {
                escalations.push(format!("{}: {reason}", attachment.policy));
                terms = terms.narrowest(t.clone());
            }
        }
        evaluations.push(json!({
            "policy": attachment.policy,
            "version": attachment.version,
            "module_sha256": policy.sha256(),
            "config_sha256": hex::encode(Sha256::digest(attachment.config.as_bytes())),
            "decision": decision.kind(),
            "reason": decision.reason(),
            "card_terms": decision.card_terms(),
            "fault": fault.map(|f| json!({ "kind": f.kind(), "detail": f.to_string() })),
            "fuel_used": run.fuel_used,
            "elapsed_us": u64::try_from(run.elapsed.as_micros()).unwrap_or(u64::MAX),
            "logs": run.logs,
        }));
    }
    Decided { verdict: Verdict::combine(denies, escalations, terms), evaluations: Value::Array(evaluations) }
}

pub async fn get_spend(State(state): State<Arc<AppState>>, caller: Caller, PathId(id): PathId) -> Reply {
    let reader = caller.reader()?.map(str::to_owned);
    let s = Arc::clone(&state);
    let value = blocking(move || {
        let spend = s.backend.spend(&id)?.filter(|sp| reader.as_ref().is_none_or(|a| *a == sp.agent_id));
        let spend = spend.ok_or_else(|| ApiError::not_found(format!("spend `{id}`")))?;
        // The proposing agent collects the card of a spend approved after
        // escalation: made now, its PAN and CVV shown this once.
        let mut secrets = None;
        if reader.is_some() && spend.status == SpendStatus::Approved && spend.card_id.is_none() {
            secrets = s.backend.claim_card(&spend.id, &s.card_issuance(), now_ms())?;
        }
        // Read again only when a card was just made for it.
        let spend = match &secrets {
            Some(_) => s.backend.spend(&id)?.ok_or_else(|| ApiError::not_found(format!("spend `{id}`")))?,
            None => spend,
        };
        let card = match &spend.card_id {
            Some(card_id) => s.backend.card(card_id)?,
            None => None,
        };
        let card_json = match (&card, &secrets) {
            (Some(record), Some(issued)) => Some(json::card_with_secrets(issued, record)),
            (Some(record), None) => Some(json::card(record)),
            _ => None,
        };
        Ok(json::spend(&spend, card_json))
    })
    .await?;
    ok(value)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    #[serde(default)]
    limit: Option<usize>,
}

/// Most records one listing returns.
pub const MAX_LIST: usize = 1000;

pub async fn list_spends(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    q: QueryResult<ListQuery>,
) -> Reply {
    let reader = caller.reader()?.map(str::to_owned);
    let q = query(q)?;
    let limit = q.limit.unwrap_or(100).min(MAX_LIST);
    let s = Arc::clone(&state);
    let spends = blocking(move || Ok(s.backend.spends(reader.as_deref(), limit)?)).await?;
    ok(json!({ "spends": spends.iter().map(|sp| json::spend(sp, None)).collect::<Vec<_>>() }))
}

// ---- approvals -------------------------------------------------------------

pub async fn list_approvals(State(state): State<Arc<AppState>>, caller: Caller) -> Reply {
    caller.operator()?;
    let s = Arc::clone(&state);
    let pending = blocking(move || Ok(s.backend.pending_approvals(s.approval_ttl_ms(), now_ms())?)).await?;
    ok(json!({ "approvals": pending.iter().map(|sp| json::spend(sp, None)).collect::<Vec<_>>() }))
}

pub async fn approve(State(state): State<Arc<AppState>>, caller: Caller, PathId(id): PathId) -> Reply {
    caller.operator()?;
    let s = Arc::clone(&state);
    let actor = caller.actor();
    let spend = blocking(move || {
        // Everything the policies need is read first: storage is locked
        // while they run.
        let pending = s.backend.spend(&id)?.ok_or_else(|| ApiError::not_found(format!("spend `{id}`")))?;
        let agent = s.backend.agent(&pending.agent_id)?.filter(|a| !a.revoked);
        let policies = agent.as_ref().map(|a| load_policies(&s, a));
        let mandate = match &pending.mandate_id {
            Some(mandate_id) => s.backend.mandate(mandate_id)?.as_ref().and_then(MandateRecord::for_policy),
            None => None,
        };
        let mut decide = |spend: &SpendRecord, history: Arc<dyn History>| match (&agent, &policies) {
            (Some(agent), Some(policies)) if agent.id == spend.agent_id => {
                evaluate_all(&s, policies, &policy_request(spend, agent, mandate.clone()), history)
            }
            _ => Verdict::Deny(vec!["the agent was revoked".into()]).into(),
        };
        Ok(s.backend.approve(
            &id,
            s.config.card_ttl_seconds,
            s.approval_ttl_ms(),
            &actor,
            now_ms(),
            &mut decide,
        )?)
    })
    .await?;
    state.metrics.proposal("approved_by_operator");
    ok(json::spend(&spend, None))
}

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

pub async fn deny(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    PathId(id): PathId,
    body: Result<Bytes, BytesRejection>,
) -> Reply {
    caller.operator()?;
    let reason = parse_deny(&json::body(body)?)?;
    let s = Arc::clone(&state);
    let actor = caller.actor();
    let spend =
        blocking(move || Ok(s.backend.deny(&id, &reason, s.approval_ttl_ms(), &actor, now_ms())?)).await?;
    state.metrics.proposal("denied_by_operator");
    ok(json::spend(&spend, None))
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

pub async fn deposit(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Reply {
    caller.operator()?;
    let Deposit { amount, idempotency_key: key } = parse_deposit(&json::body(body)?, &headers)?;
    let s = Arc::clone(&state);
    let actor = caller.actor();
    let d = blocking(move || Ok(s.backend.deposit(&amount, key.as_deref(), &actor, now_ms())?)).await?;
    created(
        json!({ "id": d.id, "amount": d.amount.to_decimal().to_string(), "currency": d.amount.currency() }),
    )
}

pub async fn wallet(State(state): State<Arc<AppState>>, caller: Caller) -> Reply {
    caller.operator()?;
    let s = Arc::clone(&state);
    let balances = blocking(move || Ok(s.backend.balances()?)).await?;
    ok(json!({ "balances": balances }))
}

// ---- policies --------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UploadQuery {
    name: String,
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

pub async fn upload_policy(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    query: Result<Query<UploadQuery>, axum::extract::rejection::QueryRejection>,
    // Read only once the caller and the name are checked: a refusal comes
    // from the head alone, before a byte of the module is taken in.
    request: axum::extract::Request,
) -> Reply {
    caller.operator()?;
    let Query(q) =
        query.map_err(|_| ApiError::invalid("invalid_name", "give the policy's name as `?name=NAME`"))?;
    policy_name(&q.name)?;
    let max = state.config.sandbox.max_module_bytes;
    let module = Bytes::from_request(request, &state)
        .await
        .map_err(|e| body_error(&e, || ApiError::too_large(format!("policy module over {max} bytes"))))?;
    let s = Arc::clone(&state);
    let actor = caller.actor();
    let record = blocking(move || {
        // Compiled (and so checked) before it is stored: a module that does
        // not load is refused and nothing is written.
        let loaded = Arc::new(
            s.sandbox.load(&module).map_err(|e| ApiError::invalid("invalid_policy", e.to_string()))?,
        );
        let record = s.backend.add_policy(&q.name, &module, loaded.sha256(), &actor, now_ms())?;
        s.metrics.policy_load(loaded.from_cache());
        s.remember(&record.name, record.version, loaded);
        Ok(record)
    })
    .await?;
    created(json!({ "name": record.name, "version": record.version, "sha256": record.sha256 }))
}

pub async fn list_policies(State(state): State<Arc<AppState>>, caller: Caller) -> Reply {
    caller.operator()?;
    let s = Arc::clone(&state);
    let policies = blocking(move || Ok(s.backend.policies()?)).await?;
    let list: Vec<Value> = policies
        .iter()
        .map(|p| {
            json!({ "name": p.name, "version": p.version, "sha256": p.sha256, "size": p.size,
                    "created_at": json::time(p.created_at_ms) })
        })
        .collect();
    ok(json!({ "policies": list }))
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

/// Resolve each attachment's version (the latest when none is named), and
/// have each policy accept its config (its `validate-config`), before
/// anything is stored.
fn resolve_attachments(state: &AppState, list: Vec<AttachmentRef>) -> Result<Vec<Attachment>, ApiError> {
    let mut out = Vec::with_capacity(list.len());
    for AttachmentRef { policy: name, version, config } in list {
        let version = match version {
            Some(v) => v,
            None => state
                .backend
                .latest_policy_version(&name)?
                .ok_or_else(|| ApiError::invalid("unknown_policy", format!("no policy named `{name}`")))?,
        };
        let loaded = state.policy(&name, version).map_err(|e| {
            if e.status == StatusCode::NOT_FOUND { ApiError::invalid("unknown_policy", e.message) } else { e }
        })?;
        let check = state.sandbox.validate_config(&loaded, &config);
        match check.outcome {
            Ok(Ok(())) => {}
            Ok(Err(message)) => {
                return Err(ApiError::invalid(
                    "invalid_config",
                    format!("policy `{name}@{version}` refused its config: {message}"),
                ));
            }
            Err(fault) => return Err(ApiError::invalid("invalid_config", fault_reason(&name, &fault))),
        }
        out.push(Attachment { policy: name, version, config });
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

pub async fn create_agent(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Reply {
    caller.operator()?;
    let body = parse_new_agent(&json::body(body)?, state.config.sandbox.max_config_bytes)?;
    let s = Arc::clone(&state);
    let actor = caller.actor();
    let (agent, token) = blocking(move || {
        let attachments = resolve_attachments(&s, body.policies)?;
        let id = new_id("ag");
        let token = new_token(&Role::Agent(id.clone()));
        let record = AgentRecord {
            id,
            name: body.name,
            labels: body.labels,
            attachments,
            revoked: false,
            created_at_ms: now_ms(),
        };
        let agent = s.backend.create_agent(&record, &token_hash(&token), &actor, now_ms())?;
        Ok((agent, token))
    })
    .await?;
    created(json!({ "id": agent.id, "name": agent.name, "token": token }))
}

pub async fn list_agents(State(state): State<Arc<AppState>>, caller: Caller) -> Reply {
    caller.operator()?;
    let s = Arc::clone(&state);
    let agents = blocking(move || Ok(s.backend.agents()?)).await?;
    ok(json!({ "agents": agents.iter().map(json::agent).collect::<Vec<_>>() }))
}

pub async fn revoke_agent(State(state): State<Arc<AppState>>, caller: Caller, PathId(id): PathId) -> Reply {
    caller.operator()?;
    let s = Arc::clone(&state);
    let actor = caller.actor();
    let agent = blocking(move || Ok(s.backend.revoke_agent(&id, &actor, now_ms())?)).await?;
    ok(json::agent(&agent))
}

pub async fn set_policies(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    PathId(id): PathId,
    body: Result<Bytes, BytesRejection>,
) -> Reply {
    caller.operator()?;
    let list = parse_attachments(&json::body(body)?, state.config.sandbox.max_config_bytes)?;
    let s = Arc::clone(&state);
    let actor = caller.actor();
    let agent = blocking(move || {
        if s.backend.agent(&id)?.is_none() {
            return Err(ApiError::not_found(format!("agent `{id}`")));
        }
        let attachments = resolve_attachments(&s, list)?;
        Ok(s.backend.set_attachments(&id, &attachments, &actor, now_ms())?)
    })
    .await?;
    ok(json::agent(&agent))
}

// ---- cards -----------------------------------------------------------------

pub async fn list_cards(State(state): State<Arc<AppState>>, caller: Caller) -> Reply {
    let reader = caller.reader()?.map(str::to_owned);
    let s = Arc::clone(&state);
    let cards = blocking(move || Ok(s.backend.cards(reader.as_deref())?)).await?;
    ok(json!({ "cards": cards.iter().map(json::card).collect::<Vec<_>>() }))
}

pub async fn void_card(State(state): State<Arc<AppState>>, caller: Caller, PathId(id): PathId) -> Reply {
    caller.operator()?;
    let s = Arc::clone(&state);
    let actor = caller.actor();
    let card = blocking(move || Ok(s.backend.void_card(&id, &actor, now_ms())?)).await?;
    ok(json::card(&card))
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

pub async fn authorize(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, ApiError> {
    caller.network()?;
    let request = parse_authorization(&json::body(body)?, &headers)?;
    // On SQLite the write is queued for its writer thread and awaited here:
    // no thread is held while it waits for the lock and the fsync.
    let actor = caller.actor();
    let outcome =
        match state.backend.authorize_queued(request, Arc::clone(&state.key), actor.clone(), now_ms()) {
            Ok(answer) => {
                answer.await.map_err(|_| ApiError::internal("the authorization's write was lost"))??
            }
            Err(request) => {
                let s = Arc::clone(&state);
                blocking(move || Ok(s.backend.authorize(&request, &s.key, &actor, now_ms())?)).await?
            }
        };
    let replayed = outcome.replayed;
    state.metrics.authorization(if replayed {
        "replayed"
    } else {
        outcome.decline_code.map_or("approved", |c| c.as_str())
    });
    let body =
        json!({ "approved": outcome.approved, "decline_code": outcome.decline_code.map(|c| c.as_str()) });
    // A retry answered from the first authorization says so.
    let replay_header = replayed.then_some([(IDEMPOTENT_REPLAYED, "true")]);
    Ok((StatusCode::OK, replay_header, Json(body)))
}

// ---- audit -----------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    #[serde(default)]
    after: u64,
    #[serde(default)]
    limit: Option<usize>,
}

pub async fn audit(State(state): State<Arc<AppState>>, caller: Caller, q: QueryResult<AuditQuery>) -> Reply {
    caller.operator()?;
    let q = query(q)?;
    let limit = q.limit.unwrap_or(100).min(MAX_LIST);
    let s = Arc::clone(&state);
    let records = blocking(move || Ok(s.backend.audit_records(q.after, limit)?)).await?;
    let list: Vec<Value> = records
        .iter()
        .map(|r| {
            json!({
                "seq": r.seq,
                "at": json::time(r.at_ms),
                "kind": r.kind,
                "record": serde_json::from_str::<Value>(&r.record).unwrap_or(Value::String(r.record.clone())),
                "prev_hash": r.prev_hash,
                "hash": r.hash,
            })
        })
        .collect();
    ok(json!({ "records": list }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyQuery {
    #[serde(default)]
    checkpoint: Option<String>,
}

/// A checkpoint as `?checkpoint=SEQ:HASH` gives it.
pub fn parse_checkpoint(text: &str) -> Result<Checkpoint, ApiError> {
    text.parse()
        .map_err(|e: crate::audit::BadCheckpoint| ApiError::invalid("invalid_checkpoint", e.to_string()))
}

pub async fn audit_verify(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    q: QueryResult<VerifyQuery>,
) -> Reply {
    caller.operator()?;
    // Never echoed: a query string may hold anything, a token included.
    let q = q
        .map(|Query(q)| q)
        .map_err(|_| ApiError::invalid("invalid_query", "this route takes only `?checkpoint=SEQ:HASH`"))?;
    let checkpoint = q.checkpoint.as_deref().map(parse_checkpoint).transpose()?;
    let s = Arc::clone(&state);
    let result = blocking(move || Ok(s.backend.verify_audit(checkpoint.as_ref())?)).await?;
    ok(match result {
        Ok(head) => json!({
            "ok": true,
            "records": head.records,
            "head": { "seq": head.seq, "hash": head.hash },
        }),
        Err(broken) => {
            json!({ "ok": false, "seq": broken.seq, "error": format!("record {}: {}", broken.seq, broken.error) })
        }
    })
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

fn token_json(state: &AppState, t: &TokenRecord) -> Value {
    // This daemon's own uses are shown at once; the database has those of
    // every daemon, each up to a minute late.
    let last_used = t.last_used_at_ms.max(state.token_last_used(&t.id));
    let mut v = json!({
        "id": t.id,
        "role": t.role.name(),
        "label": t.label,
        "created_at": json::time(t.created_at_ms),
        "last_used_at": last_used.map(json::time),
        "revoked_at": t.revoked_at_ms.map(json::time),
    });
    if let Role::Agent(agent_id) = &t.role {
        v["agent_id"] = json!(agent_id);
    }
    v
}

pub async fn list_tokens(State(state): State<Arc<AppState>>, caller: Caller) -> Reply {
    caller.operator()?;
    let s = Arc::clone(&state);
    let tokens = blocking(move || Ok(s.backend.tokens()?)).await?;
    ok(json!({ "tokens": tokens.iter().map(|t| token_json(&state, t)).collect::<Vec<_>>() }))
}

pub async fn create_token(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Reply {
    caller.operator()?;
    let NewToken { role, label } = parse_new_token(&json::body(body)?)?;
    let s = Arc::clone(&state);
    let actor = caller.actor();
    let (id, token) = blocking(move || {
        let token = new_token(&role);
        let id = s.backend.add_token(&role, &token_hash(&token), &label, &actor, now_ms())?;
        Ok((id, token))
    })
    .await?;
    created(json!({ "id": id, "token": token }))
}

pub async fn revoke_token(State(state): State<Arc<AppState>>, caller: Caller, PathId(id): PathId) -> Reply {
    caller.operator()?;
    let s = Arc::clone(&state);
    let actor = caller.actor();
    let token = blocking(move || Ok(s.backend.revoke_token(&id, &actor, now_ms())?)).await?;
    ok(token_json(&state, &token))
}
