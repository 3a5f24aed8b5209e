//! Who is calling: the bearer token's role, checked on every route, and
//! the client's address, for the audit trail.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use subtle::ConstantTimeEq;

use super::{ApiError, AppState};
use crate::datadir::token_hash;
use crate::storage::{Actor, Role};

/// The client's IP address, as the connection gave it; `unknown` when the
/// server was not told (served without connection info).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientAddr(pub String);

impl ClientAddr {
    fn of(parts: &Parts) -> ClientAddr {
        ClientAddr(match parts.extensions.get::<ConnectInfo<SocketAddr>>() {
            Some(ConnectInfo(addr)) => addr.ip().to_string(),
            None => "unknown".to_owned(),
        })
    }
}

impl<S: Send + Sync> FromRequestParts<S> for ClientAddr {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Infallible> {
        Ok(ClientAddr::of(parts))
    }
}

/// The authenticated caller: the token's role and id, and where it called from.
#[derive(Debug, Clone)]
pub struct Caller {
    pub role: Role,
    pub token_id: String,
    pub address: ClientAddr,
}

impl Caller {
    /// Who the audit record of what this caller changes names.
    pub fn actor(&self) -> Actor {
        Actor::Token {
            token_id: self.token_id.clone(),
            role: self.role.clone(),
            address: self.address.0.clone(),
        }
    }

    pub fn operator(&self) -> Result<(), ApiError> {
        match self.role {
            Role::Operator => Ok(()),
            _ => Err(ApiError::forbidden(format!("the {} token may not do this", self.role.name()))),
        }
    }

    pub fn agent(&self) -> Result<&str, ApiError> {
        match &self.role {
            Role::Agent(id) => Ok(id),
            _ => Err(ApiError::forbidden(format!(
                "only an agent token may do this, not the {} token",
                self.role.name()
            ))),
        }
    }

    pub fn network(&self) -> Result<(), ApiError> {
        match self.role {
            Role::Network => Ok(()),
            _ => Err(ApiError::forbidden(format!(
                "only the network token may do this, not the {} token",
                self.role.name()
            ))),
        }
    }

    /// `Some(agent)` for an agent (who may see only its own), `None` for the
    /// operator (who sees everything); the network token sees nothing.
    pub fn reader(&self) -> Result<Option<&str>, ApiError> {
        match &self.role {
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
        state.token_used(&info.id);
        Ok(Caller { role: info.role, token_id: info.id, address: ClientAddr::of(parts) })
    }
}
