//! The JSON the API speaks: request bodies (strict) and response shapes.

use std::marker::PhantomData;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use serde::Deserialize;
use serde::de::value::MapAccessDeserializer;
use serde::de::{DeserializeOwned, Deserializer, MapAccess, Visitor};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::ApiError;
use crate::cards::IssuedCard;
use crate::money::format_units;
use crate::storage::{AgentRecord, CardRecord, SpendRecord};

/// A request's body as read: over the limit is 413, not in time 408,
/// unreadable 422.
pub fn body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| super::transport::body_error(&e, || ApiError::too_large("request body too large")))
}

/// Parse a JSON body strictly: anything malformed is 422 with serde's
/// message (which names the field). The body is an object: see [`Object`].
pub fn parse_bytes<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    parse_json::<Object<T>>(body).map(|Object(value)| value)
}

/// [`parse_bytes`] for a body that carries card secrets (a PAN, a CVV):
/// serde's messages quote a value of the wrong type or out of range
/// (`invalid type: integer `4000…`, expected a string`), so those name the
/// problem and its place only.
pub fn parse_secret_bytes<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice::<Object<T>>(body).map(|Object(value)| value).map_err(|e| {
        let message = e.to_string();
        let quotes_a_value = ["invalid type", "invalid value", "invalid length", "unknown variant"]
            .iter()
            .any(|kind| message.starts_with(kind));
        if quotes_a_value {
            ApiError::invalid(
                "invalid_json",
                format!(
                    "a field has the wrong type or an invalid value at line {} column {}",
                    e.line(),
                    e.column()
                ),
            )
        } else {
            ApiError::invalid("invalid_json", message)
        }
    })
}

/// [`parse_bytes`] for a body of any shape (a bare list).
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::invalid("invalid_json", e.to_string()))
}

/// A struct read from a JSON object only. Serde reads a struct from an array
/// too, its fields in order (`["5.00", "USD"]` for a deposit, `[]` for a
/// deny); the API names its fields, so an array in an object's place is the
/// wrong type, like any other.
#[derive(Debug)]
pub struct Object<T>(pub T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Fields<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for Fields<T> {
            type Value = Object<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Object<T>, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map)).map(Object)
            }
        }
        deserializer.deserialize_map(Fields(PhantomData))
    }
}

/// For `#[serde(deserialize_with)]`: a struct field read as an [`Object`].
pub fn object<'de, D: Deserializer<'de>, T: Deserialize<'de>>(deserializer: D) -> Result<T, D::Error> {
    Object::deserialize(deserializer).map(|Object(value)| value)
}

/// For `#[serde(deserialize_with)]`: a list of [`Object`]s.
pub fn objects<'de, D: Deserializer<'de>, T: Deserialize<'de>>(deserializer: D) -> Result<Vec<T>, D::Error> {
    Vec::<Object<T>>::deserialize(deserializer)
        .map(|list| list.into_iter().map(|Object(value)| value).collect())
}

/// RFC 3339 of a time in ms since the epoch.
pub fn time(ms: u64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

pub fn card(card: &CardRecord) -> Value {
    json!({
        "id": card.id,
        "spend_id": card.spend_id,
        "agent_id": card.agent_id,
        "last4": card.last4,
        "exp_month": card.exp_month,
        "exp_year": card.exp_year,
        "limit": card.cap.to_decimal().to_string(),
        "currency": card.cap.currency(),
        "merchant_id": card.merchant_id,
        "expires_at": time(card.expires_at_ms),
        "state": card.state.as_str(),
        "captured": card.captured_units.map(|u| format_units(u, card.cap.exponent())),
    })
}

/// A card just issued, with its PAN and CVV, in the shape of the contract's
/// proposal response: the one time they are shown.
pub fn new_card(issued: &IssuedCard) -> Value {
    json!({
        "id": issued.card_id,
        "pan": issued.secrets.pan,
        "cvv": issued.secrets.cvv,
        "exp_month": issued.exp_month,
        "exp_year": issued.exp_year,
        "limit": issued.cap.to_decimal().to_string(),
        "currency": issued.cap.currency(),
        "merchant_id": issued.merchant_id,
        "expires_at": time(issued.expires_at_ms),
    })
}

/// A stored card with its PAN and CVV: only in the one response that reveals them.
pub fn card_with_secrets(issued: &IssuedCard, record: &CardRecord) -> Value {
    let mut v = card(record);
    v["pan"] = json!(issued.secrets.pan);
    v["cvv"] = json!(issued.secrets.cvv);
    v
}

pub fn spend(spend: &SpendRecord, card_json: Option<Value>) -> Value {
    let mut v = json!({
        "id": spend.id,
        "agent_id": spend.agent_id,
        "status": spend.status.as_str(),
        "reasons": spend.reasons,
        "amount": spend.amount.to_decimal().to_string(),
        "currency": spend.amount.currency(),
        "merchant": spend.merchant,
        "purpose": spend.purpose,
        "received_at": time(spend.received_at_ms),
        "card": card_json,
    });
    if let Some(mandate_id) = &spend.mandate_id {
        v["mandate_id"] = json!(mandate_id);
    }
    v
}

pub fn agent(agent: &AgentRecord) -> Value {
    let policies: Vec<Value> = agent
        .attachments
        .iter()
        .map(|a| {
            json!({
                "policy": format!("{}@{}", a.policy, a.version),
                "config": serde_json::from_str::<Value>(&a.config).unwrap_or(Value::Null),
            })
        })
        .collect();
    json!({
        "id": agent.id,
        "name": agent.name,
        "labels": agent.labels,
        "policies": policies,
        "revoked": agent.revoked,
        "created_at": time(agent.created_at_ms),
    })
}
