//! The tools: their names, descriptions written for a model, input schemas,
//! and the API request each one makes.

use std::sync::Arc;

use rmcp::model::Tool;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

use super::{ApiCall, Method, Refusal};

/// Every tool, in the order they are listed.
pub const TOOL_NAMES: [&str; 7] = [
    "propose_spend",
    "check_spend",
    "get_spend",
    "list_spends",
    "request_mandate",
    "list_mandates",
    "get_mandate",
];

/// Most spends the API lists at once; `list_spends` with a `status` reads
/// this many and keeps those in that status.
const MAX_LIST: usize = 1000;

const PROPOSE: &str = "Ask to spend money, before paying anything. The operator's policies decide at once: \
`approved` comes with a single-use virtual card (`card`: pan, cvv, exp_month, exp_year) that works only \
at this merchant, for at most this amount, until `expires_at`, once. Pay with it right away. The card \
number and CVV are shown ONLY in this result: keep them for the payment and never repeat them to the \
user. `denied` gives the reasons: do not retry the same spend. `pending_approval` means a human must \
answer: tell the user, and call `get_spend` with the spend's id later; once approved, that call shows \
the card once. Give `mandate_id` to spend inside a mandate (a budget approved for one task), and an \
`idempotency_key` to make a retry safe (the same key returns the first answer).";

const CHECK: &str = "Ask what the policies (and the mandate, when `mandate_id` is given) would decide on \
a spend now, without committing anything: nothing is held, no card is made, no spend is recorded (the \
check itself is in the audit trail). Returns `decision` (`allow`, `deny` or `require_approval`), the \
`reasons` and the `card_terms` a card would get. A later `propose_spend` decides again.";

const GET_SPEND: &str = "One of your spends by its id: its `status` (`approved`, `denied`, \
`pending_approval`) and reasons. When a human approved a spend that was `pending_approval`, the first \
call after the approval returns its single-use card with the card number and CVV, shown that once.";

const LIST_SPENDS: &str = "Your spends, newest first, with their status. Card numbers are never listed.";

const REQUEST_MANDATE: &str = "Ask a human for a mandate: a budget for one task (an amount in one \
currency, optionally limited to some merchants or merchant category codes, a number of purchases and a \
time). It starts `pending_approval`: a human approves or denies it; tell the user, and check it with \
`get_mandate`. Once `active`, pass its id as `mandate_id` to `propose_spend` for that task.";

const LIST_MANDATES: &str = "Your mandates with their status, budget and what `remaining` of it.";

const GET_MANDATE: &str = "One of your mandates by its id: its status (`pending_approval`, `active`, \
`denied`, `revoked`, `expired`, `exhausted`), budget, `spent`, `held`, `remaining` and `spend_count`.";

fn schema(value: Value) -> Arc<Map<String, Value>> {
    match value {
        Value::Object(map) => Arc::new(map),
        _ => Arc::new(Map::new()),
    }
}

fn money_properties() -> Map<String, Value> {
    let props = json!({
        "amount": {
            "type": "string",
            "description": "The amount as a decimal string, e.g. \"12.50\" (never a JSON number)",
            "pattern": "^[0-9]+(\\.[0-9]+)?$"
        },
        "currency": {
            "type": "string",
            "description": "ISO 4217 currency code, e.g. \"USD\"",
            "pattern": "^[A-Z]{3}$"
        }
    });
    match props {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

fn spend_schema(with_key: bool) -> Arc<Map<String, Value>> {
    let mut props = money_properties();
    props.insert(
        "merchant".into(),
        json!({
            "type": "object",
            "description": "Where the money goes; the card works only at this merchant id",
            "properties": {
                "id": { "type": "string", "description": "The merchant's stable id: its domain (\"api.openai.com\") or acquirer merchant id" },
                "name": { "type": "string", "description": "The merchant's name" },
                "mcc": { "type": "string", "description": "Merchant category code, four digits (\"5734\": software)", "pattern": "^[0-9]{4}$" },
                "country": { "type": "string", "description": "Two-letter country code (\"US\"), if known", "pattern": "^[A-Z]{2}$" }
            },
            "required": ["id", "name", "mcc"],
            "additionalProperties": false
        }),
    );
    props.insert(
        "purpose".into(),
        json!({ "type": "string", "description": "What it buys and why, for the human who reviews it" }),
    );
    props.insert(
        "mandate_id".into(),
        json!({ "type": "string", "description": "Spend inside this active mandate of yours" }),
    );
    if with_key {
        props.insert(
            "idempotency_key".into(),
            json!({ "type": "string", "description": "Makes a retry safe: the same key returns the first answer instead of spending twice" }),
        );
    }
    schema(json!({
        "type": "object",
        "properties": props,
        "required": ["amount", "currency", "merchant", "purpose"],
        "additionalProperties": false
    }))
}

fn id_schema(what: &str) -> Arc<Map<String, Value>> {
    schema(json!({
        "type": "object",
        "properties": { "id": { "type": "string", "description": format!("The {what}'s id") } },
        "required": ["id"],
        "additionalProperties": false
    }))
}

/// The tools as `tools/list` shows them.
pub fn all() -> Vec<Tool> {
    let mut mandate = money_properties();
    mandate.insert(
        "purpose".into(),
        json!({ "type": "string", "description": "The task this budget is for, for the human who approves it" }),
    );
    mandate.insert(
        "merchant_ids".into(),
        json!({ "type": "array", "items": { "type": "string" }, "description": "Only these merchants (all when left out)" }),
    );
    mandate.insert(
        "mccs".into(),
        json!({ "type": "array", "items": { "type": "string", "pattern": "^[0-9]{4}$" }, "description": "Only these merchant category codes (all when left out)" }),
    );
    mandate.insert(
        "max_spends".into(),
        json!({ "type": "integer", "minimum": 1, "description": "At most this many purchases" }),
    );
    mandate.insert(
        "expires_in_seconds".into(),
        json!({ "type": "integer", "minimum": 1, "maximum": 2_592_000, "description": "How long the mandate lasts once made (default one hour, at most 30 days)" }),
    );
    let list_spends = schema(json!({
        "type": "object",
        "properties": {
            "status": { "type": "string", "enum": ["approved", "denied", "pending_approval"], "description": "Only spends in this status" },
            "limit": { "type": "integer", "minimum": 1, "maximum": MAX_LIST, "description": "At most this many, newest first (default 100)" }
        },
        "additionalProperties": false
    }));
    let nothing = schema(json!({ "type": "object", "properties": {}, "additionalProperties": false }));
    vec![
        Tool::new("propose_spend", PROPOSE, spend_schema(true)),
        Tool::new("check_spend", CHECK, spend_schema(false)),
        Tool::new("get_spend", GET_SPEND, id_schema("spend")),
        Tool::new("list_spends", LIST_SPENDS, list_spends),
        Tool::new(
            "request_mandate",
            REQUEST_MANDATE,
            schema(json!({
                "type": "object",
                "properties": mandate,
                "required": ["amount", "currency", "purpose"],
                "additionalProperties": false
            })),
        ),
        Tool::new("list_mandates", LIST_MANDATES, nothing),
        Tool::new("get_mandate", GET_MANDATE, id_schema("mandate")),
    ]
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Merchant {
    id: String,
    name: String,
    mcc: String,
    #[serde(default)]
    country: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Propose {
    amount: String,
    currency: String,
    merchant: Merchant,
    purpose: String,
    #[serde(default)]
    mandate_id: Option<String>,
    #[serde(default)]
    idempotency_key: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Check {
    amount: String,
    currency: String,
    merchant: Merchant,
    purpose: String,
    #[serde(default)]
    mandate_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ById {
    id: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListSpends {
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    limit: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestMandate {
    amount: String,
    currency: String,
    purpose: String,
    #[serde(default)]
    merchant_ids: Option<Vec<String>>,
    #[serde(default)]
    mccs: Option<Vec<String>>,
    #[serde(default)]
    max_spends: Option<u64>,
    #[serde(default)]
    expires_in_seconds: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Nothing {}

/// A tool's call of the API, and for `list_spends` with a status, which
/// status to keep and how many.
#[derive(Debug)]
pub struct ToolCall {
    pub api: ApiCall,
    pub status_filter: Option<(String, usize)>,
}

fn invalid(message: impl Into<String>) -> Refusal {
    Refusal::new("invalid_arguments", message)
}

fn args<T: DeserializeOwned>(tool: &str, arguments: Value) -> Result<T, Refusal> {
    serde_json::from_value(arguments).map_err(|e| {
        // serde's message names the field and what was expected; a value
        // of the wrong type is not quoted.
        let what = e.to_string();
        let what = what.split(" at line").next().unwrap_or(&what);
        invalid(format!("the arguments of `{tool}` do not fit its input schema: {what}"))
    })
}

/// `s` as one path segment: an id with a `/` or `?` in it must not reach
/// another route.
fn segment(s: &str) -> String {
    let mut encoded = String::with_capacity(s.len());
    for byte in s.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'~') {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

fn nonempty_id(what: &str, id: &str) -> Result<(), Refusal> {
    if id.trim().is_empty() {
        return Err(invalid(format!("`id` must be the {what}'s id")));
    }
    Ok(())
}

fn spend_body(
    amount: String,
    currency: String,
    merchant: Merchant,
    purpose: String,
    mandate: Option<String>,
) -> Value {
    let mut merchant_json = json!({ "id": merchant.id, "name": merchant.name, "mcc": merchant.mcc });
    if let Some(country) = merchant.country {
        merchant_json["country"] = json!(country);
    }
    let mut body =
        json!({ "amount": amount, "currency": currency, "merchant": merchant_json, "purpose": purpose });
    if let Some(mandate) = mandate {
        body["mandate_id"] = json!(mandate);
    }
    body
}

fn get(path: String, query: Vec<(&'static str, String)>) -> ApiCall {
    ApiCall { method: Method::Get, path, query, body: None, idempotency_key: None }
}

fn post(path: &str, body: Value, idempotency_key: Option<String>) -> ApiCall {
    ApiCall {
        method: Method::Post,
        path: path.to_owned(),
        query: Vec::new(),
        body: Some(body),
        idempotency_key,
    }
}

/// The API call a tool's arguments make, or `invalid_arguments`.
pub fn request(tool: &str, arguments: Value) -> Result<ToolCall, Refusal> {
    let api = match tool {
        "propose_spend" => {
            let a: Propose = args(tool, arguments)?;
            // A header carries the key: what it cannot carry is refused
            // here as the API would refuse it.
            if let Some(key) = &a.idempotency_key
                && (key.is_empty() || !key.chars().all(|c| c.is_ascii_graphic() || c == ' '))
            {
                return Err(Refusal::new(
                    "invalid_idempotency_key",
                    "`idempotency_key` must be 1 to 200 printable ASCII characters",
                ));
            }
            let body = spend_body(a.amount, a.currency, a.merchant, a.purpose, a.mandate_id);
            post("/v1/spends", body, a.idempotency_key)
        }
        "check_spend" => {
            let a: Check = args(tool, arguments)?;
            post(
                "/v1/spends/preview",
                spend_body(a.amount, a.currency, a.merchant, a.purpose, a.mandate_id),
                None,
            )
        }
        "get_spend" => {
            let a: ById = args(tool, arguments)?;
            nonempty_id("spend", &a.id)?;
            get(format!("/v1/spends/{}", segment(&a.id)), Vec::new())
        }
        "list_spends" => {
            let a: ListSpends = args(tool, arguments)?;
            let limit = a.limit.unwrap_or(100);
            if !(1..=MAX_LIST).contains(&limit) {
                return Err(invalid(format!("`limit` must be 1 to {MAX_LIST}")));
            }
            if let Some(status) = a.status {
                if !["approved", "denied", "pending_approval"].contains(&status.as_str()) {
                    return Err(invalid("`status` must be `approved`, `denied` or `pending_approval`"));
                }
                let call = get("/v1/spends".into(), vec![("limit", MAX_LIST.to_string())]);
                return Ok(ToolCall { api: call, status_filter: Some((status, limit)) });
            }
            get("/v1/spends".into(), vec![("limit", limit.to_string())])
        }
        "request_mandate" => {
            let a: RequestMandate = args(tool, arguments)?;
            let mut body = json!({ "amount": a.amount, "currency": a.currency, "purpose": a.purpose });
            if let Some(v) = a.merchant_ids {
                body["merchant_ids"] = json!(v);
            }
            if let Some(v) = a.mccs {
                body["mccs"] = json!(v);
            }
            if let Some(v) = a.max_spends {
                body["max_spends"] = json!(v);
            }
            if let Some(v) = a.expires_in_seconds {
                body["expires_in_seconds"] = json!(v);
            }
            post("/v1/mandates", body, None)
        }
        "list_mandates" => {
            let _: Nothing = args(tool, arguments)?;
            get("/v1/mandates".into(), Vec::new())
        }
        "get_mandate" => {
            let a: ById = args(tool, arguments)?;
            nonempty_id("mandate", &a.id)?;
            get(format!("/v1/mandates/{}", segment(&a.id)), Vec::new())
        }
        other => return Err(invalid(format!("no tool `{other}`"))),
    };
    Ok(ToolCall { api, status_filter: None })
}

/// `{"spends": [...]}` with only the spends in `status`, at most `limit`.
pub fn keep_status(mut value: Value, status: &str, limit: usize) -> Value {
    if let Some(spends) = value.get_mut("spends").and_then(Value::as_array_mut) {
        spends.retain(|s| s["status"] == status);
        spends.truncate(limit);
    }
    value
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

fn reasons(v: &Value) -> String {
    let list: Vec<String> = v
        .get("reasons")
        .and_then(Value::as_array)
        .map(|r| r.iter().map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_owned)).collect())
        .unwrap_or_default();
    if list.is_empty() { String::new() } else { format!(" ({})", list.join("; ")) }
}

fn spend_line(v: &Value) -> String {
    let id = str_of(v, "id");
    match str_of(v, "status") {
        "approved" => match v.get("card").filter(|c| c.is_object()) {
            Some(card) if card.get("pan").is_some() => format!(
                "approved: spend {id}; single-use card {} for up to {} {} at {}, valid until {}. Its card \
                 number and CVV are in this result and will not be shown again.",
                str_of(card, "id"),
                str_of(card, "limit"),
                str_of(card, "currency"),
                str_of(card, "merchant_id"),
                str_of(card, "expires_at"),
            ),
            Some(card) => format!(
                "approved: spend {id}; its card {} was already shown (card numbers are shown once).",
                str_of(card, "id")
            ),
            None => format!("approved: spend {id}"),
        },
        "denied" => format!("denied: spend {id}{}", reasons(v)),
        "pending_approval" => format!(
            "pending_approval: spend {id} waits for a human{}; tell the user, and call get_spend later",
            reasons(v)
        ),
        other => format!("{other}: spend {id}"),
    }
}

fn mandate_line(v: &Value) -> String {
    let line = format!(
        "mandate {}: {}, budget {} {}, remaining {}",
        str_of(v, "id"),
        str_of(v, "status"),
        str_of(v, "amount"),
        str_of(v, "currency"),
        str_of(v, "remaining"),
    );
    if str_of(v, "status") == "pending_approval" {
        format!("{line}; it waits for a human: tell the user, and call get_mandate later")
    } else {
        line
    }
}

/// One line for the model about a tool's result.
pub fn summary(tool: &str, v: &Value) -> String {
    match tool {
        "propose_spend" | "get_spend" => spend_line(v),
        "check_spend" => format!("{}{} (nothing was held or committed)", str_of(v, "decision"), reasons(v)),
        "list_spends" => {
            let n = v.get("spends").and_then(Value::as_array).map_or(0, Vec::len);
            format!("{n} spends")
        }
        "list_mandates" => {
            let all = v.get("mandates").and_then(Value::as_array).cloned().unwrap_or_default();
            let mut lines = vec![format!("{} mandates", all.len())];
            lines.extend(all.iter().map(mandate_line));
            lines.join("\n")
        }
        "request_mandate" | "get_mandate" => mandate_line(v),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_tool_has_an_object_schema_and_a_description() {
        let tools = all();
        let names: Vec<&str> = tools.iter().map(|t| t.name.as_ref()).collect();
        assert_eq!(names, TOOL_NAMES);
        for tool in &tools {
            assert_eq!(tool.input_schema.get("type"), Some(&json!("object")), "{}", tool.name);
            assert!(tool.description.as_ref().is_some_and(|d| d.len() > 40), "{}", tool.name);
        }
    }

    #[test]
    fn arguments_that_do_not_fit_are_refused_before_any_call() {
        let bad = [
            (
                "propose_spend",
                json!({"amount": 12.5, "currency": "USD", "merchant": {"id": "a", "name": "A", "mcc": "5734"}, "purpose": "p"}),
            ),
            (
                "propose_spend",
                json!({"amount": "1", "currency": "USD", "merchant": {"id": "a", "name": "A", "mcc": "5734"}, "purpose": "p", "approve": true}),
            ),
            (
                "check_spend",
                json!({"amount": "1", "currency": "USD", "merchant": {"id": "a", "name": "A", "mcc": "5734"}, "purpose": "p", "idempotency_key": "k"}),
            ),
            ("get_spend", json!({})),
            ("get_spend", json!({"id": " "})),
            ("list_spends", json!({"limit": 0})),
            ("list_spends", json!({"status": "open"})),
            ("list_mandates", json!({"agent_id": "other"})),
        ];
        for (tool, arguments) in bad {
            let Err(err) = request(tool, arguments.clone()) else { panic!("{tool} {arguments} is refused") };
            assert_eq!(err.code, "invalid_arguments", "{tool} {arguments}: {err:?}");
        }
    }

    #[test]
    fn ids_stay_one_path_segment() {
        let call = request("get_spend", json!({"id": "../wallet"})).unwrap();
        assert_eq!(call.api.path, "/v1/spends/%2E%2E%2Fwallet");
    }
}
