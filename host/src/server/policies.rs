//! The policy routes: the operator uploads a policy module (compiled, and so
//! checked, before it is stored, as the next version of its name) and lists
//! the versions stored.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequest, Query, State};
use serde_json::{Value, json};

use super::json;
use super::parse::{UploadQuery, policy_name};
use super::transport::body_error;
use super::{ApiError, AppState, Caller, Reply, blocking, created, ok};
use crate::datadir::now_ms;

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
