//! The audit routes: the operator reads the audit trail and verifies its
//! hash chain, from the start or from a checkpoint.

use std::sync::Arc;

use axum::extract::{Query, State};
use serde_json::{Value, json};

use super::json;
use super::parse::{AuditQuery, MAX_LIST, QueryResult, VerifyQuery, parse_checkpoint, query};
use super::{ApiError, AppState, Caller, Reply, blocking, ok};

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
