//! The registry in SQL: tokens, agents, policy modules and which policies
//! run for whom. Append-only like the ledger: a revocation is a new row, and
//! replacing an agent's attachments writes a new set (the highest in force),
//! so the audit trail and the tables always agree on what was in force when.

use std::collections::BTreeMap;

use serde_json::json;
use sha2::{Digest, Sha256};

use super::audit::append_audit;
use super::ledger::resolve_hold;
use super::spends::resolve_approval;
use super::{Conn, Engine, Row, SqlStore, args, from_ms, ms};
use crate::storage::{
    Actor, AgentRecord, Attachment, Conflict, PolicyRecord, Registry, Role, StorageError, TokenInfo,
    TokenRecord, new_id,
};

/// A token by its hash (the `UNIQUE` index on `hash`), revoked when the
/// token or its agent is.
pub(crate) const TOKEN_SQL: &str = "SELECT t.id, t.role, t.agent_id,
        EXISTS (SELECT 1 FROM token_revocations r WHERE r.token_id = t.id)
        OR EXISTS (SELECT 1 FROM agent_revocations a WHERE a.agent_id = t.agent_id),
        t.hash
     FROM tokens t WHERE t.hash = ?1";

/// An agent by id (its primary key).
pub(crate) const AGENT_SQL: &str = "SELECT a.id, a.name, a.labels, a.created_at_ms,
        EXISTS (SELECT 1 FROM agent_revocations r WHERE r.agent_id = a.id)
     FROM agents a WHERE a.id = ?1";

/// Every agent, oldest first.
pub(crate) const AGENTS_SQL: &str = "SELECT a.id, a.name, a.labels, a.created_at_ms,
        EXISTS (SELECT 1 FROM agent_revocations r WHERE r.agent_id = a.id)
     FROM agents a ORDER BY a.created_at_ms, a.id";

/// The attachments in force: the agent's highest set, in order. Both steps
/// are primary-key lookups.
pub(crate) const ATTACHMENTS_SQL: &str = "SELECT policy_name, policy_version, config FROM attachments
     WHERE agent_id = ?1 AND set_no = (SELECT MAX(set_no) FROM attachment_sets WHERE agent_id = ?1)
     ORDER BY position";

pub(crate) const NEXT_SET_SQL: &str =
    "SELECT COALESCE(MAX(set_no), 0) + 1 FROM attachment_sets WHERE agent_id = ?1";

pub(crate) const NEXT_VERSION_SQL: &str =
    "SELECT COALESCE(MAX(version), 0) + 1 FROM policies WHERE name = ?1";

/// Revoke every token of an agent not revoked already.
// `tokens.agent_id` has no index, so this scans `tokens`; it runs once per
// revoked agent, over a table of one row per token ever issued.
pub(crate) const REVOKE_TOKENS_SQL: &str = "INSERT INTO token_revocations (token_id, revoked_at_ms)
     SELECT t.id, CAST(?2 AS BIGINT) FROM tokens t
     WHERE t.agent_id = ?1 AND NOT EXISTS (SELECT 1 FROM token_revocations r WHERE r.token_id = t.id)";

/// The holds of an agent not yet resolved, with their card if one was made
/// (a spend approved after escalation has its hold before its card). A
/// range of `holds_agent_time`: every hold the agent ever had, read once
/// per revocation.
pub(crate) const OPEN_HOLDS_OF_AGENT_SQL: &str = "SELECT h.id, h.currency, h.units, c.id
     FROM holds h LEFT JOIN hold_resolutions r ON r.hold_id = h.id LEFT JOIN cards c ON c.hold_id = h.id
     WHERE h.agent_id = ?1 AND r.hold_id IS NULL ORDER BY h.id";

/// An agent's spends still waiting for the operator.
pub(crate) const PENDING_OF_AGENT_SQL: &str = "SELECT s.id FROM spends s
     LEFT JOIN approval_resolutions a ON a.spend_id = s.id
     WHERE s.agent_id = ?1 AND s.status = 'pending_approval' AND a.spend_id IS NULL ORDER BY s.id";

/// Why a revoked agent's spends waiting for approval were denied.
pub const REVOKED_REASON: &str = "the agent was revoked";

/// Every token with its label, last recorded use and revocation, oldest first.
pub(crate) const TOKENS_SQL: &str = "SELECT t.id, t.role, t.agent_id, t.label, t.created_at_ms,
        (SELECT MAX(u.used_at_ms) FROM token_uses u WHERE u.token_id = t.id),
        COALESCE((SELECT r.revoked_at_ms FROM token_revocations r WHERE r.token_id = t.id),
                 (SELECT a.revoked_at_ms FROM agent_revocations a WHERE a.agent_id = t.agent_id))
     FROM tokens t";

/// Operator tokens neither revoked nor of a revoked agent (operators have none).
pub(crate) const LIVE_OPERATORS_SQL: &str = "SELECT CAST(COUNT(*) AS BIGINT) FROM tokens t
     WHERE t.role = 'operator' AND NOT EXISTS (SELECT 1 FROM token_revocations r WHERE r.token_id = t.id)";

/// A use of a token, at most one row per token and millisecond; a token
/// that does not exist (a use from another wallet's daemon) is skipped.
pub(crate) const TOKEN_USE_SQL: &str = "INSERT INTO token_uses (token_id, used_at_ms)
     SELECT CAST(?1 AS TEXT), CAST(?2 AS BIGINT) WHERE EXISTS (SELECT 1 FROM tokens WHERE id = ?1)
     ON CONFLICT DO NOTHING";

fn token_record(r: &Row) -> Result<TokenRecord, StorageError> {
    let (id, role): (String, String) = (r.get(0)?, r.get(1)?);
    let role = parse_role(&id, &role, r.get(2)?)?;
    Ok(TokenRecord {
        role,
        label: r.get(3)?,
        created_at_ms: from_ms(r.get(4)?),
        last_used_at_ms: r.get::<Option<i64>>(5)?.map(from_ms),
        revoked_at_ms: r.get::<Option<i64>>(6)?.map(from_ms),
        id,
    })
}

fn token_by_id(conn: &dyn Conn, id: &str) -> Result<Option<TokenRecord>, StorageError> {
    conn.row(&format!("{TOKENS_SQL} WHERE t.id = ?1"), args![id])?.as_ref().map(token_record).transpose()
}

fn insert_token(
    conn: &dyn Conn,
    role: &Role,
    token_hash: &str,
    label: &str,
    now: i64,
) -> Result<String, StorageError> {
    let agent_id = match role {
        Role::Agent(agent_id) => {
            if !agent_exists(conn, agent_id)? {
                return Err(StorageError::NotFound(format!("agent `{agent_id}`")));
            }
            Some(agent_id.as_str())
        }
        Role::Operator | Role::Network => None,
    };
    let id = new_id("tok");
    conn.execute(
        "INSERT INTO tokens (id, role, agent_id, hash, label, created_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        args![&id, role.name(), agent_id, token_hash, label, now],
    )?;
    Ok(id)
}

fn agent_exists(conn: &dyn Conn, id: &str) -> Result<bool, StorageError> {
    Ok(conn.row("SELECT 1 FROM agents WHERE id = ?1", args![id])?.is_some())
}

/// An agent from a row of [`AGENT_SQL`] or [`AGENTS_SQL`], with the
/// attachments in force.
fn agent_record(conn: &dyn Conn, r: &Row) -> Result<AgentRecord, StorageError> {
    let id: String = r.get(0)?;
    let labels: String = r.get(2)?;
    let labels: BTreeMap<String, String> = serde_json::from_str(&labels)
        .map_err(|e| StorageError::Invariant(format!("stored labels of agent `{id}`: {e}")))?;
    let attachments = attachments_in_force(conn, &id)?;
    Ok(AgentRecord {
        name: r.get(1)?,
        labels,
        attachments,
        revoked: r.get(4)?,
        created_at_ms: from_ms(r.get(3)?),
        id,
    })
}

fn agent_by_id(conn: &dyn Conn, id: &str) -> Result<Option<AgentRecord>, StorageError> {
    conn.row(AGENT_SQL, args![id])?.map(|r| agent_record(conn, &r)).transpose()
}

fn attachments_in_force(conn: &dyn Conn, agent_id: &str) -> Result<Vec<Attachment>, StorageError> {
    conn.rows(ATTACHMENTS_SQL, args![agent_id])?
        .iter()
        .map(|r| Ok(Attachment { policy: r.get(0)?, version: r.get(1)?, config: r.get(2)? }))
        .collect()
}

/// Write `attachments` as the agent's next set, which puts it in force.
/// Every policy version must exist: checked here for a clear error (the
/// foreign key would refuse it too, without saying which).
fn insert_set(
    conn: &dyn Conn,
    agent_id: &str,
    attachments: &[Attachment],
    now: i64,
) -> Result<(), StorageError> {
    for a in attachments {
        let exists = conn
            .row("SELECT 1 FROM policies WHERE name = ?1 AND version = ?2", args![&a.policy, a.version])?
            .is_some();
        if !exists {
            return Err(StorageError::NotFound(format!("policy `{}@{}`", a.policy, a.version)));
        }
    }
    let set_no: i64 = conn.one(NEXT_SET_SQL, args![agent_id])?.get(0)?;
    conn.execute(
        "INSERT INTO attachment_sets (agent_id, set_no, created_at_ms) VALUES (?1, ?2, ?3)",
        args![agent_id, set_no, now],
    )?;
    for (position, a) in (0_i64..).zip(attachments) {
        conn.execute(
            "INSERT INTO attachments (agent_id, set_no, position, policy_name, policy_version, config)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            args![agent_id, set_no, position, &a.policy, a.version, &a.config],
        )?;
    }
    Ok(())
}

/// What the audit trail records of attachments: which policy at which
/// version, and a hash of its config (the config itself may be long, and
/// the hash is enough to tell which one was in force).
fn audit_policies(attachments: &[Attachment]) -> serde_json::Value {
    attachments
        .iter()
        .map(|a| {
            json!({
                "policy": format!("{}@{}", a.policy, a.version),
                "config_sha256": hex::encode(Sha256::digest(a.config.as_bytes())),
            })
        })
        .collect()
}

fn parse_role(id: &str, role: &str, agent_id: Option<String>) -> Result<Role, StorageError> {
    match (role, agent_id) {
        ("operator", None) => Ok(Role::Operator),
        ("network", None) => Ok(Role::Network),
        ("agent", Some(agent_id)) => Ok(Role::Agent(agent_id)),
        (role, _) => Err(StorageError::Invariant(format!("token `{id}` has an unknown role `{role}`"))),
    }
}

impl<E: Engine> Registry for SqlStore<E> {
    fn add_token(
        &self,
        role: &Role,
        token_hash: &str,
        label: &str,
        actor: &Actor,
        now_ms: u64,
    ) -> Result<String, StorageError> {
        let now = ms(now_ms)?;
        self.write(|tx| {
            let id = insert_token(tx, role, token_hash, label, now)?;
            let agent = match role {
                Role::Agent(agent_id) => Some(agent_id.as_str()),
                _ => None,
            };
            append_audit(
                tx,
                "token_created",
                &json!({ "token_id": id, "role": role.name(), "agent_id": agent, "label": label }),
                actor,
                now,
            )?;
            Ok(id)
        })
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>, StorageError> {
        self.read(|conn| {
            conn.rows(&format!("{TOKENS_SQL} ORDER BY t.created_at_ms, t.id"), &[])?
                .iter()
                .map(token_record)
                .collect()
        })
    }

    fn revoke_token(&self, id: &str, actor: &Actor, now_ms: u64) -> Result<TokenRecord, StorageError> {
        let now = ms(now_ms)?;
        self.write(|tx| {
            let token = token_by_id(tx, id)?.ok_or_else(|| StorageError::NotFound(format!("token `{id}`")))?;
            if token.revoked_at_ms.is_some() {
                return Err(StorageError::Conflict(Conflict::AlreadyRevoked, format!("token `{id}` is already revoked")));
            }
            // Under the write lock: two revocations racing for the last two
            // operator tokens cannot both pass this check.
            if token.role == Role::Operator && tx.one(LIVE_OPERATORS_SQL, &[])?.get::<i64>(0)? <= 1 {
                return Err(StorageError::LastOperatorToken(id.to_owned()));
            }
            tx.execute("INSERT INTO token_revocations (token_id, revoked_at_ms) VALUES (?1, ?2)", args![id, now])?;
            let agent = match &token.role {
                Role::Agent(agent_id) => Some(agent_id.as_str()),
                _ => None,
            };
            append_audit(
                tx,
                "token_revoked",
                &json!({ "token_id": id, "role": token.role.name(), "agent_id": agent, "label": token.label }),
                actor,
                now,
            )?;
            token_by_id(tx, id)?.ok_or_else(|| StorageError::Invariant(format!("token `{id}` vanished")))
        })
    }

    fn record_token_uses(&self, uses: &[(String, u64)]) -> Result<(), StorageError> {
        if uses.is_empty() {
            return Ok(());
        }
        self.write(|tx| {
            for (id, at_ms) in uses {
                tx.execute(TOKEN_USE_SQL, args![id, ms(*at_ms)?])?;
            }
            Ok(())
        })
    }

    fn token(&self, token_hash: &str) -> Result<Option<TokenInfo>, StorageError> {
        self.read(|conn| {
            let Some(r) = conn.row(TOKEN_SQL, args![token_hash])? else { return Ok(None) };
            let (id, role): (String, String) = (r.get(0)?, r.get(1)?);
            let role = parse_role(&id, &role, r.get(2)?)?;
            Ok(Some(TokenInfo { id, hash: r.get(4)?, role, revoked: r.get(3)? }))
        })
    }

    fn add_policy(
        &self,
        name: &str,
        module: &[u8],
        sha256: &str,
        actor: &Actor,
        now_ms: u64,
    ) -> Result<PolicyRecord, StorageError> {
        let now = ms(now_ms)?;
        self.write(|tx| {
            // Inside the write lock: two uploads under one name get two versions.
            let version: u32 = tx.one(NEXT_VERSION_SQL, args![name])?.get(0)?;
            tx.execute(
                "INSERT INTO policies (name, version, sha256, module, created_at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
                args![name, version, sha256, module, now],
            )?;
            let record = PolicyRecord {
                name: name.to_owned(),
                version,
                sha256: sha256.to_owned(),
                size: module.len(),
                created_at_ms: now_ms,
            };
            append_audit(
                tx,
                "policy_uploaded",
                &json!({ "name": name, "version": version, "sha256": sha256, "size": module.len() }),
                actor,
                now,
            )?;
            Ok(record)
        })
    }

    fn policies(&self) -> Result<Vec<PolicyRecord>, StorageError> {
        self.read(|conn| {
            conn.rows(
                "SELECT name, version, sha256, CAST(length(module) AS BIGINT), created_at_ms FROM policies
                 ORDER BY name, version",
                &[],
            )?
            .iter()
            .map(|r| {
                Ok(PolicyRecord {
                    name: r.get(0)?,
                    version: r.get(1)?,
                    sha256: r.get(2)?,
                    size: r.get(3)?,
                    created_at_ms: from_ms(r.get(4)?),
                })
            })
            .collect()
        })
    }

    fn policy_module(&self, name: &str, version: u32) -> Result<Option<Vec<u8>>, StorageError> {
        self.read(|conn| {
            conn.row("SELECT module FROM policies WHERE name = ?1 AND version = ?2", args![name, version])?
                .map(|r| r.get(0))
                .transpose()
        })
    }

    fn latest_policy_version(&self, name: &str) -> Result<Option<u32>, StorageError> {
        self.read(|conn| conn.one("SELECT MAX(version) FROM policies WHERE name = ?1", args![name])?.get(0))
    }

    fn create_agent(
        &self,
        agent: &AgentRecord,
        token_hash: &str,
        actor: &Actor,
        now_ms: u64,
    ) -> Result<AgentRecord, StorageError> {
        let now = ms(now_ms)?;
        let labels = serde_json::to_string(&agent.labels)
            .map_err(|e| StorageError::Invariant(format!("labels of agent `{}`: {e}", agent.id)))?;
        self.write(|tx| {
            if agent_exists(tx, &agent.id)? {
                return Err(StorageError::Conflict(
                    Conflict::AlreadyExists,
                    format!("agent `{}` already exists", agent.id),
                ));
            }
            tx.execute(
                "INSERT INTO agents (id, name, labels, created_at_ms) VALUES (?1, ?2, ?3, ?4)",
                args![&agent.id, &agent.name, &labels, now],
            )?;
            insert_set(tx, &agent.id, &agent.attachments, now)?;
            // The agent's token is labelled with its name.
            insert_token(tx, &Role::Agent(agent.id.clone()), token_hash, &agent.name, now)?;
            // Never the token or its hash: the trail is readable by whoever
            // audits, and a hash of a token is as good as the token to look it up.
            append_audit(
                tx,
                "agent_created",
                &json!({
                    "agent_id": agent.id,
                    "name": agent.name,
                    "labels": agent.labels,
                    "policies": audit_policies(&agent.attachments),
                }),
                actor,
                now,
            )?;
            agent_by_id(tx, &agent.id)?.ok_or_else(|| {
                StorageError::Invariant(format!("agent `{}` vanished in its own transaction", agent.id))
            })
        })
    }

    fn agents(&self) -> Result<Vec<AgentRecord>, StorageError> {
        self.read(|conn| conn.rows(AGENTS_SQL, &[])?.iter().map(|r| agent_record(conn, r)).collect())
    }

    fn agent(&self, id: &str) -> Result<Option<AgentRecord>, StorageError> {
        self.read(|conn| agent_by_id(conn, id))
    }

    fn revoke_agent(&self, id: &str, actor: &Actor, now_ms: u64) -> Result<AgentRecord, StorageError> {
        let now = ms(now_ms)?;
        self.write(|tx| {
            let agent =
                agent_by_id(tx, id)?.ok_or_else(|| StorageError::NotFound(format!("agent `{id}`")))?;
            if agent.revoked {
                return Err(StorageError::Conflict(
                    Conflict::AlreadyRevoked,
                    format!("agent `{id}` is already revoked"),
                ));
            }
            tx.execute(
                "INSERT INTO agent_revocations (agent_id, revoked_at_ms) VALUES (?1, ?2)",
                args![id, now],
            )?;
            tx.execute(REVOKE_TOKENS_SQL, args![id, now])?;
            // Everything the agent holds, taken back in the same transaction:
            // a card of it never authorizes after this commits, and no
            // proposal or approval of it commits after this (each re-checks
            // the revocation in its own write transaction).
            let mut cards_voided = Vec::new();
            let mut holds_released = 0_usize;
            for hold in tx.rows(OPEN_HOLDS_OF_AGENT_SQL, args![id])? {
                let currency: String = hold.get(1)?;
                resolve_hold(tx, hold.get(0)?, "voided", &currency, hold.get(2)?, 0, now)?;
                holds_released += 1;
                if let Some(card_id) = hold.get::<Option<String>>(3)? {
                    cards_voided.push(card_id);
                }
            }
            // Its mandates too, each with its own audit record.
            super::mandates::revoke_mandates_of_agent(tx, id, actor, now_ms)?;
            let pending = tx.rows(PENDING_OF_AGENT_SQL, args![id])?;
            for spend in &pending {
                resolve_approval(tx, &spend.get::<String>(0)?, "denied", REVOKED_REASON, actor, now)?;
            }
            append_audit(
                tx,
                "agent_revoked",
                &json!({
                    "agent_id": id,
                    "cards_voided": cards_voided.len(),
                    "card_ids": cards_voided,
                    "holds_released": holds_released,
                    "approvals_denied": pending.len(),
                }),
                actor,
                now,
            )?;
            Ok(AgentRecord { revoked: true, ..agent })
        })
    }

    fn set_attachments(
        &self,
        id: &str,
        attachments: &[Attachment],
        actor: &Actor,
        now_ms: u64,
    ) -> Result<AgentRecord, StorageError> {
        let now = ms(now_ms)?;
        self.write(|tx| {
            let agent =
                agent_by_id(tx, id)?.ok_or_else(|| StorageError::NotFound(format!("agent `{id}`")))?;
            if agent.revoked {
                return Err(StorageError::Conflict(
                    Conflict::AgentRevoked,
                    format!("agent `{id}` is revoked"),
                ));
            }
            insert_set(tx, id, attachments, now)?;
            append_audit(
                tx,
                "attachments_set",
                &json!({ "agent_id": id, "policies": audit_policies(attachments) }),
                actor,
                now,
            )?;
            Ok(AgentRecord { attachments: attachments.to_vec(), ..agent })
        })
    }
}
