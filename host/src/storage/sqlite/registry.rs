//! The registry in SQLite: tokens, agents, policy modules and which policies
//! run for whom. Append-only like the ledger: a revocation is a new row, and
//! replacing an agent's attachments writes a new set (the highest in force),
//! so the audit trail and the tables always agree on what was in force when.

use std::collections::BTreeMap;

use rusqlite::{Connection, OptionalExtension, params};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::{SqliteStorage, append_audit, from_ms, ms};
use crate::storage::{
    AgentRecord, Attachment, PolicyRecord, Registry, Role, StorageError, TokenInfo, new_id,
};

/// A token by its hash (the `UNIQUE` index on `hash`), revoked when the
/// token or its agent is.
const TOKEN_SQL: &str = "SELECT t.id, t.role, t.agent_id,
        EXISTS (SELECT 1 FROM token_revocations r WHERE r.token_id = t.id)
        OR EXISTS (SELECT 1 FROM agent_revocations a WHERE a.agent_id = t.agent_id),
        t.hash
     FROM tokens t WHERE t.hash = ?1";

/// An agent by id (its primary key).
const AGENT_SQL: &str = "SELECT a.id, a.name, a.labels, a.created_at_ms,
        EXISTS (SELECT 1 FROM agent_revocations r WHERE r.agent_id = a.id)
     FROM agents a WHERE a.id = ?1";

/// Every agent, oldest first.
const AGENTS_SQL: &str = "SELECT a.id, a.name, a.labels, a.created_at_ms,
        EXISTS (SELECT 1 FROM agent_revocations r WHERE r.agent_id = a.id)
     FROM agents a ORDER BY a.created_at_ms, a.id";

/// The attachments in force: the agent's highest set, in order. Both steps
/// are primary-key lookups.
const ATTACHMENTS_SQL: &str = "SELECT policy_name, policy_version, config FROM attachments
     WHERE agent_id = ?1 AND set_no = (SELECT MAX(set_no) FROM attachment_sets WHERE agent_id = ?1)
     ORDER BY position";

const NEXT_SET_SQL: &str = "SELECT COALESCE(MAX(set_no), 0) + 1 FROM attachment_sets WHERE agent_id = ?1";

const NEXT_VERSION_SQL: &str = "SELECT COALESCE(MAX(version), 0) + 1 FROM policies WHERE name = ?1";

/// Revoke every token of an agent not revoked already.
// `tokens.agent_id` has no index, so this scans `tokens`; it runs once per
// revoked agent, over a table of one row per token ever issued.
const REVOKE_TOKENS_SQL: &str = "INSERT INTO token_revocations (token_id, revoked_at_ms)
     SELECT t.id, ?2 FROM tokens t
     WHERE t.agent_id = ?1 AND NOT EXISTS (SELECT 1 FROM token_revocations r WHERE r.token_id = t.id)";

fn insert_token(conn: &Connection, role: &Role, token_hash: &str, now: i64) -> Result<String, StorageError> {
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
    conn.prepare_cached(
        "INSERT INTO tokens (id, role, agent_id, hash, created_at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![id, role.name(), agent_id, token_hash, now])?;
    Ok(id)
}

fn agent_exists(conn: &Connection, id: &str) -> Result<bool, StorageError> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM agents WHERE id = ?1")?
        .query_row(params![id], |_| Ok(()))
        .optional()?
        .is_some())
}

/// An agent row, before its attachments are read.
struct AgentRow {
    id: String,
    name: String,
    labels: String,
    created_at_ms: i64,
    revoked: bool,
}

fn agent_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AgentRow> {
    Ok(AgentRow {
        id: r.get(0)?,
        name: r.get(1)?,
        labels: r.get(2)?,
        created_at_ms: r.get(3)?,
        revoked: r.get(4)?,
    })
}

impl AgentRow {
    fn into_record(self, conn: &Connection) -> Result<AgentRecord, StorageError> {
        let labels: BTreeMap<String, String> = serde_json::from_str(&self.labels)
            .map_err(|e| StorageError::Invariant(format!("stored labels of agent `{}`: {e}", self.id)))?;
        let attachments = attachments_in_force(conn, &self.id)?;
        Ok(AgentRecord {
            id: self.id,
            name: self.name,
            labels,
            attachments,
            revoked: self.revoked,
            created_at_ms: from_ms(self.created_at_ms),
        })
    }
}

fn agent_by_id(conn: &Connection, id: &str) -> Result<Option<AgentRecord>, StorageError> {
    match conn.query_row(AGENT_SQL, params![id], agent_row).optional()? {
        Some(row) => Ok(Some(row.into_record(conn)?)),
        None => Ok(None),
    }
}

fn attachments_in_force(conn: &Connection, agent_id: &str) -> Result<Vec<Attachment>, StorageError> {
    let mut stmt = conn.prepare_cached(ATTACHMENTS_SQL)?;
    let rows = stmt.query_map(params![agent_id], |r| {
        Ok(Attachment { policy: r.get(0)?, version: r.get(1)?, config: r.get(2)? })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Write `attachments` as the agent's next set, which puts it in force.
/// Every policy version must exist: checked here for a clear error (the
/// foreign key would refuse it too, without saying which).
fn insert_set(
    conn: &Connection,
    agent_id: &str,
    attachments: &[Attachment],
    now: i64,
) -> Result<(), StorageError> {
    for a in attachments {
        let exists = conn
            .query_row(
                "SELECT 1 FROM policies WHERE name = ?1 AND version = ?2",
                params![a.policy, a.version],
                |_| Ok(()),
            )
            .optional()?
            .is_some();
        if !exists {
            return Err(StorageError::NotFound(format!("policy `{}@{}`", a.policy, a.version)));
        }
    }
    let set_no: i64 = conn.query_row(NEXT_SET_SQL, params![agent_id], |r| r.get(0))?;
    conn.prepare_cached("INSERT INTO attachment_sets (agent_id, set_no, created_at_ms) VALUES (?1, ?2, ?3)")?
        .execute(params![agent_id, set_no, now])?;
    let mut insert = conn.prepare_cached(
        "INSERT INTO attachments (agent_id, set_no, position, policy_name, policy_version, config)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    for (position, a) in (0_i64..).zip(attachments) {
        insert.execute(params![agent_id, set_no, position, a.policy, a.version, a.config])?;
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

impl Registry for SqliteStorage {
    fn add_token(&self, role: &Role, token_hash: &str, now_ms: u64) -> Result<String, StorageError> {
        let now = ms(now_ms)?;
        self.write(|tx| {
            let id = insert_token(tx, role, token_hash, now)?;
            let agent = match role {
                Role::Agent(agent_id) => Some(agent_id.as_str()),
                _ => None,
            };
            append_audit(
                tx,
                "token_created",
                &serde_json::json!({ "token_id": id, "role": role.name(), "agent_id": agent }),
                now,
            )?;
            Ok(id)
        })
    }

    fn token(&self, token_hash: &str) -> Result<Option<TokenInfo>, StorageError> {
        self.read(|conn| {
            let row = conn
                .query_row(TOKEN_SQL, params![token_hash], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, Option<String>>(2)?,
                        r.get::<_, bool>(3)?,
                        r.get::<_, String>(4)?,
                    ))
                })
                .optional()?;
            match row {
                Some((id, role, agent_id, revoked, hash)) => {
                    let role = parse_role(&id, &role, agent_id)?;
                    Ok(Some(TokenInfo { id, hash, role, revoked }))
                }
                None => Ok(None),
            }
        })
    }

    fn add_policy(
        &self,
        name: &str,
        module: &[u8],
        sha256: &str,
        now_ms: u64,
    ) -> Result<PolicyRecord, StorageError> {
        let now = ms(now_ms)?;
        self.write(|tx| {
            // Inside the write lock: two uploads under one name get two versions.
            let version: u32 = tx.query_row(NEXT_VERSION_SQL, params![name], |r| r.get(0))?;
            tx.prepare_cached("INSERT INTO policies (name, version, sha256, module, created_at_ms) VALUES (?1, ?2, ?3, ?4, ?5)")?.execute(params![name, version, sha256, module, now],
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
                now,
            )?;
            Ok(record)
        })
    }

    fn policies(&self) -> Result<Vec<PolicyRecord>, StorageError> {
        self.read(|conn| {
            let mut stmt = conn.prepare(
                "SELECT name, version, sha256, length(module), created_at_ms FROM policies ORDER BY name, version",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(PolicyRecord {
                    name: r.get(0)?,
                    version: r.get(1)?,
                    sha256: r.get(2)?,
                    size: r.get(3)?,
                    created_at_ms: from_ms(r.get(4)?),
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn policy_module(&self, name: &str, version: u32) -> Result<Option<Vec<u8>>, StorageError> {
        self.read(|conn| {
            Ok(conn
                .query_row(
                    "SELECT module FROM policies WHERE name = ?1 AND version = ?2",
                    params![name, version],
                    |r| r.get(0),
                )
                .optional()?)
        })
    }

    fn latest_policy_version(&self, name: &str) -> Result<Option<u32>, StorageError> {
        self.read(|conn| {
            Ok(conn
                .prepare_cached("SELECT MAX(version) FROM policies WHERE name = ?1")?
                .query_row(params![name], |r| r.get(0))?)
        })
    }

    fn create_agent(
        &self,
        agent: &AgentRecord,
        token_hash: &str,
        now_ms: u64,
    ) -> Result<AgentRecord, StorageError> {
        let now = ms(now_ms)?;
        let labels = serde_json::to_string(&agent.labels)
            .map_err(|e| StorageError::InvalidState(format!("labels of agent `{}`: {e}", agent.id)))?;
        self.write(|tx| {
            if agent_exists(tx, &agent.id)? {
                return Err(StorageError::InvalidState(format!("agent `{}` already exists", agent.id)));
            }
            tx.prepare_cached(
                "INSERT INTO agents (id, name, labels, created_at_ms) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![agent.id, agent.name, labels, now])?;
            insert_set(tx, &agent.id, &agent.attachments, now)?;
            insert_token(tx, &Role::Agent(agent.id.clone()), token_hash, now)?;
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
                now,
            )?;
            agent_by_id(tx, &agent.id)?.ok_or_else(|| {
                StorageError::Invariant(format!("agent `{}` vanished in its own transaction", agent.id))
            })
        })
    }

    fn agents(&self) -> Result<Vec<AgentRecord>, StorageError> {
        self.read(|conn| {
            let mut stmt = conn.prepare(AGENTS_SQL)?;
            let rows = stmt.query_map([], agent_row)?.collect::<Result<Vec<_>, _>>()?;
            rows.into_iter().map(|row| row.into_record(conn)).collect()
        })
    }

    fn agent(&self, id: &str) -> Result<Option<AgentRecord>, StorageError> {
        self.read(|conn| agent_by_id(conn, id))
    }

    fn revoke_agent(&self, id: &str, now_ms: u64) -> Result<AgentRecord, StorageError> {
        let now = ms(now_ms)?;
        self.write(|tx| {
            let agent =
                agent_by_id(tx, id)?.ok_or_else(|| StorageError::NotFound(format!("agent `{id}`")))?;
            if agent.revoked {
                return Err(StorageError::InvalidState(format!("agent `{id}` is already revoked")));
            }
            tx.prepare_cached("INSERT INTO agent_revocations (agent_id, revoked_at_ms) VALUES (?1, ?2)")?
                .execute(params![id, now])?;
            tx.execute(REVOKE_TOKENS_SQL, params![id, now])?;
            append_audit(tx, "agent_revoked", &json!({ "agent_id": id }), now)?;
            Ok(AgentRecord { revoked: true, ..agent })
        })
    }

    fn set_attachments(
        &self,
        id: &str,
        attachments: &[Attachment],
        now_ms: u64,
    ) -> Result<AgentRecord, StorageError> {
        let now = ms(now_ms)?;
        self.write(|tx| {
            let agent =
                agent_by_id(tx, id)?.ok_or_else(|| StorageError::NotFound(format!("agent `{id}`")))?;
            if agent.revoked {
                return Err(StorageError::InvalidState(format!("agent `{id}` is revoked")));
            }
            insert_set(tx, id, attachments, now)?;
            append_audit(
                tx,
                "attachments_set",
                &json!({ "agent_id": id, "policies": audit_policies(attachments) }),
                now,
            )?;
            Ok(AgentRecord { attachments: attachments.to_vec(), ..agent })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::storage::sqlite::tests::plan;

    /// Every request looks its token up, and every proposal its agent and
    /// attachments: these stay index lookups however many there are.
    #[test]
    fn registry_lookups_use_their_indexes() {
        let dir = tempfile::tempdir().unwrap();
        let storage = SqliteStorage::open(&dir.path().join("db")).unwrap();
        let conn = storage.conn.lock().unwrap();
        let conn = conn.as_ref().unwrap();
        // Each takes one text key: a token hash, an agent id or a policy name.
        for sql in [TOKEN_SQL, AGENT_SQL, ATTACHMENTS_SQL, NEXT_SET_SQL, NEXT_VERSION_SQL] {
            let p = plan(conn, sql, &[&"x"]);
            assert!(!p.contains("SCAN"), "{sql}:\n{p}");
            assert!(p.contains("SEARCH"), "{sql}:\n{p}");
        }
    }
}
