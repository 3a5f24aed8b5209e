//! Who is calling: the bearer token's role, checked on every route.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use subtle::ConstantTimeEq;

use super::{ApiError, AppState};
use crate::datadir::token_hash;
use crate::storage::Role;

/// The authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller(pub Role);

impl Caller {
    pub fn operator(&self) -> Result<(), ApiError> {
        match self.0 {
            Role::Operator => Ok(()),
            _ => Err(ApiError::forbidden(format!("the {} token may not do this", self.0.name()))),
        }
    }

    pub fn agent(&self) -> Result<&str, ApiError> {
        match &self.0 {
            Role::Agent(id) => Ok(id),
            _ => Err(ApiError::forbidden(format!(
                "only an agent token may do this, not the {} token",
                self.0.name()
            ))),
        }
    }

    pub fn network(&self) -> Result<(), ApiError> {
        match self.0 {
            Role::Network => Ok(()),
            _ => Err(ApiError::forbidden(format!(
                "only the network token may do this, not the {} token",
                self.0.name()
            ))),
        }
    }

    /// `Some(agent)` for an agent (who may see only its own), `None` for the
    /// operator (who sees everything); the network token sees nothing.
    pub fn reader(&self) -> Result<Option<&str>, ApiError> {
        match &self.0 {
            Role::Operator => Ok(None),
            Role::Agent(id) => Ok(Some(id)),
            Role::Network => Err(ApiError::forbidden("the network token may only authorize charges")),
        }
    }
}

impl FromRequestParts<Arc<AppState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, ApiError> {
        let mut headers = parts.headers.get_all(AUTHORIZATION).iter();
        let header = headers
            .next()
            .ok_or_else(|| ApiError::unauthorized("missing_token", "send `Authorization: Bearer TOKEN`"))?;
        // Two credentials are one too many: which one would count depends
        // on who reads the request (a proxy may check one, the daemon use
        // the other).
        if headers.next().is_some() {
            return Err(ApiError::new(
                axum::http::StatusCode::BAD_REQUEST,
                "duplicate_authorization",
                "send exactly one `Authorization` header",
            ));
        }
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty() && t.len() <= 256)
            .ok_or_else(|| {
                ApiError::unauthorized("invalid_token", "the Authorization header is not `Bearer TOKEN`")
            })?;
        // Found by its SHA-256 (the index lookup's timing depends on the
        // hash, which tells nothing usable about any stored token), then
        // compared in constant time.
        let hash = token_hash(token);
        let found = if state.backend.quick_reads() {
            state.backend.token(&hash)?
        } else {
            let backend = Arc::clone(&state.backend);
            let lookup = hash.clone();
            tokio::task::spawn_blocking(move || backend.token(&lookup)).await??
        };
        let Some(info) = found.filter(|info| bool::from(info.hash.as_bytes().ct_eq(hash.as_bytes()))) else {
            return Err(ApiError::unauthorized("invalid_token", "unknown token"));
        };
        if info.revoked {
            return Err(ApiError::unauthorized("revoked_token", "this token was revoked"));
        }
        Ok(Caller(info.role))
    }
}
