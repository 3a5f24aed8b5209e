//! Tokens, agents, policy modules and attachments against real SQLite and
//! a real PostgreSQL server: every test runs on both backends.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};
use spendguard::storage::{Actor, AgentRecord, Attachment, Backend, Conflict, Role, StorageError};

use crate::support::{Kind, on_each_backend};

const T0: u64 = 1_795_521_600_000; // 2026-11-24T12:00:00Z

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A fresh bearer token and the hash the store keeps of it.
fn token() -> (String, String) {
    let token = hex::encode(rand::random::<[u8; 32]>());
    let hash = sha256_hex(token.as_bytes());
    (token, hash)
}

fn upload(b: &dyn Backend, name: &str, module: &[u8], at: u64) -> u32 {
    b.add_policy(name, module, &sha256_hex(module), &Actor::System, at).unwrap().version
}

fn attach(policy: &str, version: u32, config: &str) -> Attachment {
    Attachment { policy: policy.into(), version, config: config.into() }
}

fn new_agent(id: &str, attachments: Vec<Attachment>) -> AgentRecord {
    AgentRecord {
        id: id.into(),
        name: format!("{id} the bot"),
        labels: BTreeMap::from([("team".to_owned(), "research".to_owned())]),
        attachments,
        revoked: false,
        created_at_ms: 0,
    }
}

/// Every attachment ever written for `agent_id`, by set then position: what
/// stays on record after a replacement.
fn attachment_history(f: &crate::support::Backend, agent_id: &str) -> Vec<(i64, String, u32, String)> {
    f.rows(&format!(
        "SELECT set_no, policy_name, policy_version, config FROM attachments
         WHERE agent_id = '{agent_id}' ORDER BY set_no, position"
    ))
    .into_iter()
    .map(|r| (r[0].parse().unwrap(), r[1].clone(), r[2].parse().unwrap(), r[3].clone()))
    .collect()
}

fn audit_kinds(b: &dyn Backend) -> Vec<String> {
    b.audit_records(0, usize::MAX).unwrap().into_iter().map(|r| r.kind).collect()
}

fn tokens_carry_their_role_and_revoking_an_agent_revokes_its_tokens(kind: Kind) {
    let f = kind.fresh();
    let b = f.storage.as_ref();
    let (_, operator) = token();
    let (_, network) = token();
    let operator_id = b.add_token(&Role::Operator, &operator, "test", &Actor::System, T0).unwrap();
    let network_id = b.add_token(&Role::Network, &network, "test", &Actor::System, T0).unwrap();
    assert!(operator_id.starts_with("tok_"), "{operator_id}");
    assert_ne!(operator_id, network_id);

    let (_, first) = token();
    let (_, other) = token();
    b.create_agent(&new_agent("ag_one", vec![]), &first, &Actor::System, T0).unwrap();
    b.create_agent(&new_agent("ag_two", vec![]), &other, &Actor::System, T0).unwrap();
    let (_, second) = token();
    b.add_token(&Role::Agent("ag_one".into()), &second, "test", &Actor::System, T0 + 1).unwrap();

    let info = b.token(&operator).unwrap().unwrap();
    assert_eq!((info.id.as_str(), &info.role, info.revoked), (operator_id.as_str(), &Role::Operator, false));
    assert_eq!(b.token(&network).unwrap().unwrap().role, Role::Network);
    for hash in [&first, &second] {
        let info = b.token(hash).unwrap().unwrap();
        assert_eq!((info.role, info.revoked), (Role::Agent("ag_one".into()), false));
    }
    assert_eq!(b.token(&other).unwrap().unwrap().role, Role::Agent("ag_two".into()));
    assert_eq!(b.token(&sha256_hex(b"no such token")).unwrap(), None);
    // A token for an agent that does not exist is refused, and not stored.
    let (_, stray) = token();
    assert_eq!(
        b.add_token(&Role::Agent("ag_nobody".into()), &stray, "test", &Actor::System, T0),
        Err(StorageError::NotFound("agent `ag_nobody`".into()))
    );
    assert_eq!(b.token(&stray).unwrap(), None);

    let revoked = b.revoke_agent("ag_one", &Actor::System, T0 + 2).unwrap();
    assert!(revoked.revoked);
    assert!(b.token(&first).unwrap().unwrap().revoked);
    assert!(b.token(&second).unwrap().unwrap().revoked);
    assert!(!b.token(&other).unwrap().unwrap().revoked, "another agent's token");
    assert!(!b.token(&operator).unwrap().unwrap().revoked);
    assert!(!b.token(&network).unwrap().unwrap().revoked);
    // A token added for a revoked agent is born revoked.
    let (_, late) = token();
    b.add_token(&Role::Agent("ag_one".into()), &late, "test", &Actor::System, T0 + 3).unwrap();
    assert!(b.token(&late).unwrap().unwrap().revoked);
}

fn policy_versions_count_per_name_and_modules_round_trip(kind: Kind) {
    let f = kind.fresh();
    let b = f.storage.as_ref();
    let v1: &[u8] = b"\0asm\x01\0\0\0 limits one";
    let v2: &[u8] = b"\0asm\x01\0\0\0 limits two \xff\xfe";
    let other: &[u8] = b"\0asm\x01\0\0\0 allowlist";
    assert_eq!(b.latest_policy_version("limits").unwrap(), None);
    assert!(b.policies().unwrap().is_empty());

    let first = b.add_policy("limits", v1, &sha256_hex(v1), &Actor::System, T0).unwrap();
    assert_eq!((first.name.as_str(), first.version, first.size), ("limits", 1, v1.len()));
    assert_eq!(upload(b, "limits", v2, T0 + 1), 2);
    assert_eq!(upload(b, "allowlist", other, T0 + 2), 1);
    // The same bytes again are still a new version: versions name uploads.
    assert_eq!(upload(b, "limits", v1, T0 + 3), 3);

    let listed: Vec<_> = b
        .policies()
        .unwrap()
        .into_iter()
        .map(|p| (p.name, p.version, p.sha256, p.size, p.created_at_ms))
        .collect();
    assert_eq!(
        listed,
        vec![
            ("allowlist".into(), 1, sha256_hex(other), other.len(), T0 + 2),
            ("limits".into(), 1, sha256_hex(v1), v1.len(), T0),
            ("limits".into(), 2, sha256_hex(v2), v2.len(), T0 + 1),
            ("limits".into(), 3, sha256_hex(v1), v1.len(), T0 + 3),
        ]
    );
    assert_eq!(b.policy_module("limits", 1).unwrap().as_deref(), Some(v1));
    assert_eq!(b.policy_module("limits", 2).unwrap().as_deref(), Some(v2));
    assert_eq!(b.policy_module("allowlist", 1).unwrap().as_deref(), Some(other));
    assert_eq!(b.policy_module("limits", 4).unwrap(), None);
    assert_eq!(b.policy_module("nothing", 1).unwrap(), None);
    assert_eq!(b.latest_policy_version("limits").unwrap(), Some(3));
    assert_eq!(b.latest_policy_version("allowlist").unwrap(), Some(1));
    assert_eq!(b.latest_policy_version("nothing").unwrap(), None);
}

fn agents_list_with_their_attachments_and_replacing_them_keeps_the_old_set(kind: Kind) {
    let f = kind.fresh();
    let b = f.storage.as_ref();
    upload(b, "limits", b"limits v1", T0);
    upload(b, "limits", b"limits v2", T0);
    upload(b, "allowlist", b"allowlist v1", T0);
    let first_set =
        vec![attach("limits", 1, r#"{"max":"50.00"}"#), attach("allowlist", 1, r#"{"m":["a.com"]}"#)];

    let created =
        b.create_agent(&new_agent("ag_b", first_set.clone()), &token().1, &Actor::System, T0 + 10).unwrap();
    assert_eq!(created.attachments, first_set);
    assert_eq!((created.created_at_ms, created.revoked), (T0 + 10, false));
    assert_eq!(created.labels.get("team").map(String::as_str), Some("research"));
    assert_eq!(b.agent("ag_b").unwrap(), Some(created.clone()));
    // Listed by creation time, then id.
    b.create_agent(&new_agent("ag_c", vec![]), &token().1, &Actor::System, T0 + 5).unwrap();
    b.create_agent(&new_agent("ag_a", vec![]), &token().1, &Actor::System, T0 + 10).unwrap();
    let ids: Vec<_> = b.agents().unwrap().into_iter().map(|a| a.id).collect();
    assert_eq!(ids, ["ag_c", "ag_a", "ag_b"]);
    assert_eq!(b.agent("ag_nobody").unwrap(), None);

    // Replace: the new set is in force, in its order, and the old stays on record.
    let second_set = vec![attach("allowlist", 1, r#"{"m":["b.com"]}"#), attach("limits", 2, "{}")];
    let replaced = b.set_attachments("ag_b", &second_set, &Actor::System, T0 + 20).unwrap();
    assert_eq!(replaced.attachments, second_set);
    let read = b.agent("ag_b").unwrap().unwrap();
    assert_eq!(read, AgentRecord { attachments: second_set.clone(), ..created.clone() });
    assert_eq!(replaced, read);
    let listed = b.agents().unwrap().into_iter().find(|a| a.id == "ag_b").unwrap();
    assert_eq!(listed.attachments, second_set);
    // An empty set detaches every policy.
    b.set_attachments("ag_b", &[], &Actor::System, T0 + 30).unwrap();
    assert!(b.agent("ag_b").unwrap().unwrap().attachments.is_empty());

    let history = attachment_history(&f, "ag_b");
    let expect = |set: i64, a: &Attachment| (set, a.policy.clone(), a.version, a.config.clone());
    let mut expected: Vec<_> = first_set.iter().map(|a| expect(1, a)).collect();
    expected.extend(second_set.iter().map(|a| expect(2, a)));
    assert_eq!(history, expected);

    assert_eq!(
        b.set_attachments("ag_nobody", &second_set, &Actor::System, T0),
        Err(StorageError::NotFound("agent `ag_nobody`".into()))
    );
}

fn an_unknown_policy_version_is_refused_and_nothing_is_written(kind: Kind) {
    let f = kind.fresh();
    let b = f.storage.as_ref();
    upload(b, "limits", b"limits v1", T0);
    let audited = b.audit_records(0, usize::MAX).unwrap().len();

    let (_, hash) = token();
    let agent = new_agent("ag_x", vec![attach("limits", 1, "{}"), attach("limits", 2, "{}")]);
    assert_eq!(
        b.create_agent(&agent, &hash, &Actor::System, T0),
        Err(StorageError::NotFound("policy `limits@2`".into()))
    );
    let agent = new_agent("ag_x", vec![attach("nothing", 1, "{}")]);
    assert_eq!(
        b.create_agent(&agent, &hash, &Actor::System, T0),
        Err(StorageError::NotFound("policy `nothing@1`".into()))
    );
    assert_eq!(b.agent("ag_x").unwrap(), None);
    assert!(b.agents().unwrap().is_empty());
    assert_eq!(b.token(&hash).unwrap(), None, "the agent's token was not kept");
    assert!(attachment_history(&f, "ag_x").is_empty());
    assert_eq!(b.audit_records(0, usize::MAX).unwrap().len(), audited);

    // Replacing attachments with an unknown version leaves the old in force.
    let created = b
        .create_agent(&new_agent("ag_x", vec![attach("limits", 1, "{}")]), &hash, &Actor::System, T0)
        .unwrap();
    assert_eq!(
        b.set_attachments(
            "ag_x",
            &[attach("limits", 1, "{}"), attach("limits", 7, "{}")],
            &Actor::System,
            T0 + 1
        ),
        Err(StorageError::NotFound("policy `limits@7`".into()))
    );
    assert_eq!(b.agent("ag_x").unwrap(), Some(created));
    assert_eq!(attachment_history(&f, "ag_x").len(), 1);
}

fn an_agent_id_is_created_once_and_revoked_once(kind: Kind) {
    let f = kind.fresh();
    let b = f.storage.as_ref();
    let (_, hash) = token();
    b.create_agent(&new_agent("ag_x", vec![]), &hash, &Actor::System, T0).unwrap();
    let (_, again) = token();
    assert!(matches!(
        b.create_agent(&new_agent("ag_x", vec![]), &again, &Actor::System, T0 + 1),
        Err(StorageError::Conflict(Conflict::AlreadyExists, _))
    ));
    assert_eq!(b.token(&again).unwrap(), None);

    b.revoke_agent("ag_x", &Actor::System, T0 + 2).unwrap();
    assert!(b.agent("ag_x").unwrap().unwrap().revoked);
    assert_eq!(
        b.revoke_agent("ag_x", &Actor::System, T0 + 3),
        Err(StorageError::Conflict(Conflict::AlreadyRevoked, "agent `ag_x` is already revoked".into()))
    );
    assert_eq!(
        b.revoke_agent("ag_nobody", &Actor::System, T0 + 3),
        Err(StorageError::NotFound("agent `ag_nobody`".into()))
    );
    assert!(matches!(
        b.set_attachments("ag_x", &[], &Actor::System, T0 + 4),
        Err(StorageError::Conflict(Conflict::AgentRevoked, _))
    ));
    assert_eq!(audit_kinds(b), ["agent_created", "agent_revoked"]);
}

fn the_audit_chain_records_every_change_and_never_a_token(kind: Kind) {
    let f = kind.fresh();
    let b = f.storage.as_ref();
    let mut secrets = Vec::new();
    let mut remember = |(token, hash): (String, String)| {
        secrets.push(token);
        secrets.push(hash.clone());
        hash
    };
    b.add_token(&Role::Operator, &remember(token()), "test", &Actor::System, T0).unwrap();
    let module = b"limits module";
    upload(b, "limits", module, T0 + 1);
    upload(b, "limits", b"limits module v2", T0 + 2);
    let config = r#"{"max":"50.00"}"#;
    let agent = new_agent("ag_x", vec![attach("limits", 1, config)]);
    b.create_agent(&agent, &remember(token()), &Actor::System, T0 + 3).unwrap();
    b.add_token(&Role::Agent("ag_x".into()), &remember(token()), "test", &Actor::System, T0 + 4).unwrap();
    b.set_attachments("ag_x", &[attach("limits", 2, "{}")], &Actor::System, T0 + 5).unwrap();
    b.revoke_agent("ag_x", &Actor::System, T0 + 6).unwrap();
    // Refused operations leave no record.
    b.create_agent(
        &new_agent("ag_y", vec![attach("limits", 9, "{}")]),
        &remember(token()),
        &Actor::System,
        T0 + 7,
    )
    .unwrap_err();
    b.revoke_agent("ag_x", &Actor::System, T0 + 8).unwrap_err();

    let records = b.audit_records(0, usize::MAX).unwrap();
    assert_eq!(b.verify_audit(None).unwrap().map(|head| head.records), Ok(records.len() as u64));
    assert_eq!(
        audit_kinds(b),
        [
            "token_created",
            "policy_uploaded",
            "policy_uploaded",
            "agent_created",
            "token_created",
            "attachments_set",
            "agent_revoked"
        ]
    );
    let json = |i: usize| serde_json::from_str::<serde_json::Value>(&records[i].record).unwrap();
    // Each names who acted.
    let actor = Actor::System.to_json();
    assert_eq!(
        json(1),
        serde_json::json!({
            "actor": actor,
            "name": "limits", "version": 1, "sha256": sha256_hex(module), "size": module.len(),
        })
    );
    assert_eq!(
        json(3),
        serde_json::json!({
            "actor": actor,
            "agent_id": "ag_x",
            "name": "ag_x the bot",
            "labels": { "team": "research" },
            "policies": [{ "policy": "limits@1", "config_sha256": sha256_hex(config.as_bytes()) }],
        })
    );
    assert_eq!(
        json(5),
        serde_json::json!({
            "actor": actor,
            "agent_id": "ag_x",
            "policies": [{ "policy": "limits@2", "config_sha256": sha256_hex(b"{}") }],
        })
    );
    // The revocation names what it took back (here: nothing was open).
    assert_eq!(
        json(6),
        serde_json::json!({
            "actor": actor, "agent_id": "ag_x", "cards_voided": 0, "card_ids": [], "holds_released": 0, "approvals_denied": 0,
        })
    );
    assert_eq!(json(4)["role"], "agent");
    assert_eq!(json(4)["agent_id"], "ag_x");
    assert_eq!(
        records.iter().map(|r| r.at_ms).collect::<Vec<_>>(),
        [T0, T0 + 1, T0 + 2, T0 + 3, T0 + 4, T0 + 5, T0 + 6]
    );

    assert_eq!(secrets.len(), 8);
    for record in &records {
        let text = serde_json::to_string(record).unwrap();
        for secret in &secrets {
            assert!(!text.contains(secret.as_str()), "audit record {} holds a token or its hash", record.seq);
        }
    }
}

on_each_backend!(
    tokens_carry_their_role_and_revoking_an_agent_revokes_its_tokens,
    policy_versions_count_per_name_and_modules_round_trip,
    agents_list_with_their_attachments_and_replacing_them_keeps_the_old_set,
    an_unknown_policy_version_is_refused_and_nothing_is_written,
    an_agent_id_is_created_once_and_revoked_once,
    the_audit_chain_records_every_change_and_never_a_token,
);
