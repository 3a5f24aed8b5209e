//! The audit trail in SQL: records appended to the hash chain inside the
//! transaction they describe, and read back in order.

use super::{Conn, args, from_ms};
use crate::audit::AuditEvent;
use crate::storage::{AUDIT_GENESIS, Actor, AuditRecord, StorageError, audit_hash};

/// Append one record to the audit chain, inside the caller's transaction
/// (whose write lock orders the chain; `seq` being the primary key, two
/// records could never share a place in it anyway).
///
/// The record names its `actor` (see [`Actor::to_json`]) and, from where
/// the store's audit key begins, its hash is that key's MAC.
pub(crate) fn append_audit(
    conn: &dyn Conn,
    kind: &str,
    record: &serde_json::Value,
    actor: &Actor,
    now: i64,
) -> Result<(), StorageError> {
    let key = conn.audit_key()?;
    let (seq, prev_hash) = match conn.row("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1", &[])? {
        Some(last) => (last.get::<i64>(0)? + 1, last.get::<String>(1)?),
        None => (1, AUDIT_GENESIS.to_owned()),
    };
    let mut record = record.clone();
    match &mut record {
        serde_json::Value::Object(fields) => {
            fields.insert("actor".into(), actor.to_json());
        }
        other => {
            return Err(StorageError::Invariant(format!("an audit record must be an object, not {other}")));
        }
    }
    let text = record.to_string();
    let seq_u = u64::try_from(seq).map_err(|_| StorageError::Invariant("audit sequence".into()))?;
    // With a key, every new record is MAC'd, even one placed before where
    // the key file says keyed records begin (a trail cut back to before
    // that place): such a record never verifies, so the cut stays visible.
    let hash = match key {
        Some(key) => key.record_hash(&prev_hash, seq_u, from_ms(now), kind, &text),
        None => audit_hash(&prev_hash, seq_u, from_ms(now), kind, &text),
    };
    conn.execute(
        "INSERT INTO audit (seq, at_ms, kind, record, prev_hash, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        args![seq, now, kind, &text, &prev_hash, &hash],
    )?;
    Ok(())
}

/// Append a typed [`AuditEvent`], as [`append_audit`] does.
pub(crate) fn append_event(
    conn: &dyn Conn,
    event: &AuditEvent<'_>,
    actor: &Actor,
    now: i64,
) -> Result<(), StorageError> {
    append_audit(conn, event.kind(), &event.record(), actor, now)
}

pub(super) fn read_audit(
    conn: &dyn Conn,
    after: u64,
    limit: usize,
) -> Result<Vec<AuditRecord>, StorageError> {
    let after = i64::try_from(after).unwrap_or(i64::MAX);
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    conn.rows(
        "SELECT seq, at_ms, kind, record, prev_hash, hash FROM audit WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        args![after, limit],
    )?
    .iter()
    .map(|r| {
        Ok(AuditRecord {
            seq: from_ms(r.get(0)?),
            at_ms: from_ms(r.get(1)?),
            kind: r.get(2)?,
            record: r.get(3)?,
            prev_hash: r.get(4)?,
            hash: r.get(5)?,
        })
    })
    .collect()
}
