//! Every token can be listed, made and revoked, and every change names who
//! made it: the registry on both backends, then the real daemon and CLI.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use spendguard::storage::{Actor, Backend, Conflict, Role, StorageError};

use crate::support::{
    Body, Kind, Reply, Wallet, bearer, on_each_backend, path, proposal, spendguard, stdout,
};

const T0: u64 = 1_764_000_000_000;

fn hash(n: u8) -> String {
    spendguard::datadir::token_hash(&format!("token-{n}"))
}

fn labels(b: &dyn Backend) -> BTreeMap<String, (String, Option<String>, Option<u64>)> {
    b.tokens()
        .unwrap()
        .into_iter()
        .map(|t| (t.id, (t.role.name().to_owned(), t.label, t.revoked_at_ms)))
        .collect()
}

fn tokens_are_listed_revoked_one_at_a_time_and_the_last_operator_token_stays(kind: Kind) {
    let f = kind.fresh();
    let b = f.storage.as_ref();
    let op1 = b.add_token(&Role::Operator, &hash(1), "laptop", &Actor::System, T0).unwrap();
    let op2 = b.add_token(&Role::Operator, &hash(2), "ci", &Actor::System, T0 + 1).unwrap();
    let net = b.add_token(&Role::Network, &hash(3), "network", &Actor::System, T0 + 2).unwrap();
    let agent = spendguard::storage::AgentRecord {
        id: "ag_1".into(),
        name: "research bot".into(),
        labels: BTreeMap::new(),
        attachments: vec![],
        revoked: false,
        created_at_ms: T0,
    };
    b.create_agent(&agent, &hash(4), &Actor::System, T0 + 3).unwrap();

    let listed = b.tokens().unwrap();
    assert_eq!(listed.len(), 4);
    assert_eq!(listed[0].id, op1, "oldest first");
    assert_eq!(listed[3].role, Role::Agent("ag_1".into()));
    assert_eq!(
        listed[3].label.as_deref(),
        Some("research bot"),
        "an agent's token is labelled with its name"
    );
    assert!(listed.iter().all(|t| t.revoked_at_ms.is_none() && t.last_used_at_ms.is_none()));

    let revoked = b.revoke_token(&op1, &Actor::System, T0 + 10).unwrap();
    assert_eq!(revoked.revoked_at_ms, Some(T0 + 10));
    assert!(b.token(&hash(1)).unwrap().unwrap().revoked, "refused from now on");
    assert!(matches!(
        b.revoke_token(&op1, &Actor::System, T0 + 11),
        Err(StorageError::Conflict(Conflict::AlreadyRevoked, _))
    ));
    assert_eq!(
        b.revoke_token(&op2, &Actor::System, T0 + 12),
        Err(StorageError::LastOperatorToken(op2.clone())),
        "the last operator token cannot be revoked"
    );
    assert!(!b.token(&hash(2)).unwrap().unwrap().revoked);
    b.revoke_token(&net, &Actor::System, T0 + 13).unwrap();
    assert!(matches!(b.revoke_token("tok_nobody", &Actor::System, T0), Err(StorageError::NotFound(_))));
    assert_eq!(labels(b)[&op2], ("operator".to_owned(), Some("ci".to_owned()), None));
    assert_eq!(labels(b)[&net], ("network".to_owned(), Some("network".to_owned()), Some(T0 + 13)));

    // Uses are recorded as given (the daemon coalesces them); a repeated
    // one and one of an unknown token change nothing.
    let uses = [(op2.clone(), T0 + 100), (op2.clone(), T0 + 100), ("tok_nobody".to_owned(), T0)];
    b.record_token_uses(&uses).unwrap();
    b.record_token_uses(&[(op2.clone(), T0 + 50)]).unwrap();
    let last = |id: &str| b.tokens().unwrap().into_iter().find(|t| t.id == id).unwrap().last_used_at_ms;
    assert_eq!(last(&op2), Some(T0 + 100), "the latest use");
    assert_eq!(last(&op1), None);

    let kinds: Vec<String> = b.audit_records(0, usize::MAX).unwrap().into_iter().map(|r| r.kind).collect();
    assert_eq!(kinds.iter().filter(|k| *k == "token_revoked").count(), 2, "{kinds:?}");
    b.check_invariants().unwrap();
}

on_each_backend!(tokens_are_listed_revoked_one_at_a_time_and_the_last_operator_token_stays);

// ---- through the daemon ----------------------------------------------------

fn tokens(w: &Wallet, token: &str) -> Vec<Value> {
    w.get("/v1/tokens", token).expect(200, "GET /v1/tokens")["tokens"].as_array().unwrap().clone()
}

fn find<'a>(list: &'a [Value], id: &str) -> &'a Value {
    list.iter().find(|t| t["id"] == id).unwrap_or_else(|| panic!("token {id} is listed: {list:?}"))
}

fn new_token(w: &Wallet, by: &str, role: &str, label: &str) -> (String, String) {
    let made = w.post("/v1/tokens", by, json!({"role": role, "label": label})).expect(201, "POST /v1/tokens");
    (made["id"].as_str().unwrap().to_owned(), made["token"].as_str().unwrap().to_owned())
}

/// A `POST` without a body.
fn post_empty(w: &Wallet, path: &str, token: &str) -> Reply {
    w.send("POST", path, Some(&bearer(token)), &[], Body::None)
}

#[test]
fn operator_and_network_tokens_are_made_listed_and_revoked_at_once() {
    let started = Instant::now();
    let mut w = Wallet::new();
    let list = tokens(&w, &w.operator);
    assert_eq!(list.len(), 2, "{list:?}");
    for t in &list {
        assert_eq!(t["label"], "init", "{t}");
        assert!(t["created_at"].is_string() && t["revoked_at"].is_null(), "{t}");
        assert!(t.get("agent_id").is_none(), "{t}");
        let fields: Vec<&String> = t.as_object().unwrap().keys().collect();
        assert_eq!(fields, ["created_at", "id", "label", "last_used_at", "revoked_at", "role"], "{t}");
    }
    let text = w.get("/v1/tokens", &w.operator).text;
    assert!(!text.contains(&w.operator) && !text.contains(&w.network), "no token is ever listed");
    let init_op = list.iter().find(|t| t["role"] == "operator").unwrap()["id"].as_str().unwrap().to_owned();
    let init_net = list.iter().find(|t| t["role"] == "network").unwrap()["id"].as_str().unwrap().to_owned();
    assert!(find(&list, &init_op)["last_used_at"].is_string(), "the listing's own token was just used");
    assert!(find(&list, &init_net)["last_used_at"].is_null(), "never used");

    // Only the operator lists and makes tokens.
    let bot = w.create_agent("bot", json!([]));
    for token in [&w.network, &bot.token] {
        w.get("/v1/tokens", token).refused(403, "forbidden", "GET /v1/tokens");
        w.post("/v1/tokens", token, json!({"role": "operator", "label": "x"})).refused(
            403,
            "forbidden",
            "POST",
        );
    }
    let agent_entry = tokens(&w, &w.operator).into_iter().find(|t| t["role"] == "agent").unwrap();
    assert_eq!((&agent_entry["agent_id"], &agent_entry["label"]), (&json!(bot.id), &json!("bot")));

    // Bad requests change nothing.
    let before = tokens(&w, &w.operator).len();
    let long = "x".repeat(201);
    for (body, code) in [
        (json!({"role": "agent", "label": "x"}), "invalid_role"),
        (json!({"role": "admin", "label": "x"}), "invalid_role"),
        (json!({"role": "operator", "label": ""}), "invalid_field"),
        (json!({"role": "operator", "label": "  "}), "invalid_field"),
        (json!({"role": "operator", "label": "a\u{7}b"}), "invalid_field"),
        (json!({"role": "operator", "label": "a\nb"}), "invalid_field"),
        (json!({"role": "operator", "label": "a\u{202e}b"}), "invalid_field"),
        (json!({"role": "operator", "label": long}), "invalid_field"),
        (json!({"role": "operator"}), ""),
        (json!({"role": "operator", "label": "x", "agent_id": "ag_1"}), ""),
    ] {
        w.post("/v1/tokens", &w.operator, body.clone()).refused(422, code, &format!("{body}"));
    }
    assert_eq!(tokens(&w, &w.operator).len(), before);

    // A new operator token works at once; revoking the old one refuses it at once.
    let (ci, ci_token) = new_token(&w, &w.operator, "operator", "ci");
    w.get("/v1/wallet", &ci_token).expect(200, "the new token");
    let revoked = post_empty(&w, &format!("/v1/tokens/{init_op}/revoke"), &ci_token);
    let revoked = revoked.expect(200, "revoke the init token");
    assert_eq!((&revoked["id"], &revoked["role"]), (&json!(init_op), &json!("operator")));
    assert!(revoked["revoked_at"].is_string(), "{revoked}");
    w.get("/v1/wallet", &w.operator).refused(401, "revoked_token", "a revoked operator token");
    post_empty(&w, &format!("/v1/tokens/{init_op}/revoke"), &ci_token).refused(
        409,
        "already_revoked",
        "twice",
    );
    post_empty(&w, "/v1/tokens/tok_nobody/revoke", &ci_token).refused(404, "not_found", "unknown");

    // The last operator token cannot be revoked; it keeps working.
    post_empty(&w, &format!("/v1/tokens/{ci}/revoke"), &ci_token).refused(
        409,
        "last_operator_token",
        "the last operator token",
    );
    w.get("/v1/wallet", &ci_token).expect(200, "still works");

    // The network token is rotated: the new one charges, the old one is refused.
    let (net2, net2_token) = new_token(&w, &ci_token, "network", "network 2");
    post_empty(&w, &format!("/v1/tokens/{init_net}/revoke"), &ci_token).expect(200, "revoke network");
    let charge = json!({"pan": "4000000000000002", "cvv": "123", "exp_month": 1, "exp_year": 2030,
                        "amount": "1.00", "currency": "USD", "merchant_id": "m.com"});
    w.post("/v1/network/authorizations", &w.network, charge.clone()).refused(
        401,
        "revoked_token",
        "old network",
    );
    w.post("/v1/network/authorizations", &net2_token, charge).expect(200, "the new network token");
    let used = find(&tokens(&w, &ci_token), &net2)["last_used_at"].clone();
    assert!(used.is_string(), "{used}");

    // The CLI: list, new, revoke.
    let out = w.cli(&ci_token, &["token", "list"]);
    assert!(out.status.success(), "{out:?}");
    let listing = stdout(&out);
    for needle in ["LAST USED", ci.as_str(), "network 2", "init", bot.id.as_str()] {
        assert!(listing.contains(needle), "`token list` shows {needle}: {listing}");
    }
    assert!(!listing.contains(&ci_token), "{listing}");
    let out = w.cli(&ci_token, &["token", "new", "--role", "operator", "--label", "backup", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let made: Value = serde_json::from_slice(&out.stdout).unwrap();
    let backup = made["token"].as_str().unwrap().to_owned();
    w.get("/v1/wallet", &backup).expect(200, "made by the CLI");
    let out = w.cli(&ci_token, &["token", "revoke", made["id"].as_str().unwrap()]);
    assert!(out.status.success() && stdout(&out).starts_with("revoked operator token"), "{out:?}");
    w.get("/v1/wallet", &backup).refused(401, "revoked_token", "revoked by the CLI");
    let out = w.cli(&ci_token, &["token", "revoke", &ci]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("last_operator_token"), "{out:?}");
    let out = w.cli(&ci_token, &["token", "new", "--role", "agent", "--label", "x"]);
    assert_eq!(out.status.code(), Some(2), "an agent's token is made by creating the agent: {out:?}");
    let out = w.cli(&ci_token, &["token", "new", "--role", "network"]);
    assert_eq!(out.status.code(), Some(2), "a label is required: {out:?}");

    // A use is no write: many requests, and the database holds at most one
    // row of the token's uses per minute the daemon has run.
    for _ in 0..50 {
        w.get("/v1/wallet", &ci_token).expect(200, "a use");
    }
    let db_file = w.data.join(spendguard::datadir::DB_FILE);
    let uses_of = |id: &str| -> i64 {
        let db = rusqlite::Connection::open(&db_file).unwrap();
        db.query_row("SELECT COUNT(*) FROM token_uses WHERE token_id = ?1", [id], |r| r.get(0)).unwrap()
    };
    let minutes = i64::try_from(started.elapsed().as_secs() / 60).unwrap();
    assert!(uses_of(&ci) <= minutes, "{} rows of uses after {minutes} whole minutes", uses_of(&ci));

    // Uses are written when the daemon stops (and every minute): after a
    // restart the network token's last use is still known.
    w.stop();
    assert!(uses_of(&ci) >= 1 && uses_of(&ci) <= minutes + 1, "written once at shutdown: {}", uses_of(&ci));
    w.restart();
    assert_eq!(find(&tokens(&w, &ci_token), &net2)["last_used_at"], used, "written at shutdown");
    w.get("/v1/wallet", &w.operator).refused(401, "revoked_token", "still revoked after a restart");
}

#[test]
fn an_operator_who_lost_every_token_mints_one_on_the_data_directory() {
    let w = Wallet::new();
    let out = spendguard()
        .args([
            "token",
            "new",
            "--data-dir",
            path(&w.data),
            "--role",
            "operator",
            "--label",
            "rescue",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let minted: Value = serde_json::from_slice(&out.stdout).unwrap();
    let token = minted["token"].as_str().unwrap();
    w.get("/v1/wallet", token).expect(200, "the minted token works on the running daemon");
    let listed = find(&tokens(&w, token), minted["id"].as_str().unwrap()).clone();
    assert_eq!(listed["label"], "rescue");
    // Its record names the data directory, not a token.
    let records = w.read("/v1/audit?limit=1000")["records"].as_array().unwrap().clone();
    let made = records.iter().rev().find(|r| r["kind"] == "token_created").unwrap();
    assert_eq!(made["record"]["actor"], json!({"token_id": null, "role": "data_directory", "address": null}));
    // A bad label is refused there too, and nothing is made.
    let out = spendguard()
        .args(["token", "new", "--data-dir", path(&w.data), "--role", "operator", "--label", "a\u{1b}[2Jb"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(tokens(&w, token).len(), 3);
}

// ---- who acted ---------------------------------------------------------------

/// The audit records appended since the last call.
struct Trail {
    seen: u64,
    secrets: Vec<String>,
}

impl Trail {
    fn new_records(&mut self, w: &Wallet) -> Vec<Value> {
        let list = w.read(&format!("/v1/audit?after={}&limit=1000", self.seen))["records"].clone();
        let list = list.as_array().unwrap().clone();
        if let Some(last) = list.last() {
            self.seen = last["seq"].as_u64().unwrap();
        }
        list
    }

    /// What `change` appended: at least a record of `kind`, and every record
    /// names the token `token_id` of `role`, from 127.0.0.1, and holds no token.
    #[track_caller]
    fn acted(&mut self, w: &Wallet, what: &str, kind: &str, token_id: &str, role: &str) -> Vec<Value> {
        let records = self.new_records(w);
        assert!(records.iter().any(|r| r["kind"] == kind), "{what}: a `{kind}` record in {records:?}");
        for r in &records {
            let actor = &r["record"]["actor"];
            assert_eq!(actor["token_id"], token_id, "{what}: {r}");
            assert_eq!(actor["role"], role, "{what}: {r}");
            assert_eq!(actor["address"], "127.0.0.1", "{what}: {r}");
            let text = r.to_string();
            for secret in &self.secrets {
                assert!(!text.contains(secret.as_str()), "{what}: a token or its hash in {r}");
            }
        }
        records
    }
}

fn spend(w: &Wallet, agent: &crate::support::AgentToken, amount: &str) -> Value {
    let reply: Reply = w.post("/v1/spends", &agent.token, proposal(amount, "api.openai.com", "5734"));
    reply.expect(201, "a proposal")
}

#[test]
fn every_change_names_the_token_role_and_address_that_made_it() {
    let mut w = Wallet::new();
    let list = tokens(&w, &w.operator);
    let id = |role: &str| list.iter().find(|t| t["role"] == role).unwrap()["id"].as_str().unwrap().to_owned();
    let (op, net) = (id("operator"), id("network"));
    let mut secrets = vec![w.operator.clone(), w.network.clone()];
    let hashes: Vec<String> = secrets.iter().map(|t| spendguard::datadir::token_hash(t)).collect();
    secrets.extend(hashes);
    let mut trail = Trail { seen: 0, secrets };
    trail.new_records(&w);

    w.deposit("500.00");
    trail.acted(&w, "a deposit", "deposit", &op, "operator");
    w.upload("threshold", "approval-threshold");
    trail.acted(&w, "a policy upload", "policy_uploaded", &op, "operator");
    let config = json!([{"policy": "threshold", "config": {"threshold": "50.00", "currency": "USD"}}]);
    let bot = w.create_agent("bot", config.clone());
    trail.secrets.extend([bot.token.clone(), spendguard::datadir::token_hash(&bot.token)]);
    trail.acted(&w, "an agent created", "agent_created", &op, "operator");
    w.send(
        "PUT",
        &format!("/v1/agents/{}/policies", bot.id),
        Some(&bearer(&w.operator)),
        &[],
        Body::Json(config),
    )
    .expect(200, "attachments");
    trail.acted(&w, "attachments replaced", "attachments_set", &op, "operator");
    let agent_token =
        tokens(&w, &w.operator).into_iter().find(|t| t["agent_id"] == bot.id.as_str()).unwrap()["id"].clone();
    let agent_token = agent_token.as_str().unwrap();

    let approved = spend(&w, &bot, "10.00");
    assert_eq!(approved["status"], "approved", "{approved}");
    let records = trail.acted(&w, "a spend proposal", "spend", agent_token, "agent");
    assert_eq!(records[0]["record"]["actor"]["agent_id"], bot.id.as_str());
    w.charge(&approved["card"], "10.00", "api.openai.com");
    trail.acted(&w, "a network authorization", "authorization", &net, "network");

    let pending = spend(&w, &bot, "60.00");
    assert_eq!(pending["status"], "pending_approval", "{pending}");
    trail.acted(&w, "a proposal that waits", "spend", agent_token, "agent");
    post_empty(&w, &format!("/v1/approvals/{}/approve", pending["id"].as_str().unwrap()), &w.operator)
        .expect(200, "approve");
    trail.acted(&w, "an approval", "approval", &op, "operator");
    let pending = spend(&w, &bot, "70.00");
    trail.acted(&w, "another proposal that waits", "spend", agent_token, "agent");
    w.post(
        &format!("/v1/approvals/{}/deny", pending["id"].as_str().unwrap()),
        &w.operator,
        json!({"reason": "no"}),
    )
    .expect(200, "deny");
    trail.acted(&w, "a deny", "approval", &op, "operator");

    let open = spend(&w, &bot, "5.00");
    trail.acted(&w, "a proposal", "spend", agent_token, "agent");
    post_empty(&w, &format!("/v1/cards/{}/void", open["card"]["id"].as_str().unwrap()), &w.operator)
        .expect(200, "void");
    trail.acted(&w, "a void", "card_void", &op, "operator");

    let (made, made_token) = new_token(&w, &w.operator, "operator", "second");
    trail.secrets.extend([made_token.clone(), spendguard::datadir::token_hash(&made_token)]);
    trail.acted(&w, "a token made", "token_created", &op, "operator");
    post_empty(&w, &format!("/v1/tokens/{made}/revoke"), &w.operator).expect(200, "revoke a token");
    trail.acted(&w, "a token revoked", "token_revoked", &op, "operator");

    // A spend left waiting, for the sweep to expire.
    let waiting = spend(&w, &bot, "80.00");
    assert_eq!(waiting["status"], "pending_approval", "{waiting}");
    trail.acted(&w, "a proposal that waits", "spend", agent_token, "agent");

    // The expiry sweep names the system.
    w.stop();
    let config_file = w.data.with_file_name("short-approvals.toml");
    std::fs::write(&config_file, "approval_ttl_seconds = 1\nsweep_interval_ms = 100\n").unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    w.restart_with(&["--config", config_file.to_str().unwrap()]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let expired = loop {
        let records = trail.new_records(&w);
        if let Some(r) = records.into_iter().find(|r| r["kind"] == "approval") {
            break r;
        }
        assert!(Instant::now() < deadline, "the sweep did not expire the waiting spend");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(expired["record"]["decision"], "expired", "{expired}");
    assert_eq!(expired["record"]["actor"], json!({"token_id": null, "role": "system", "address": null}));

    // Revoking the agent after its spend expired (a revocation denies the
    // spends still waiting, which would leave the sweep nothing to expire).
    post_empty(&w, &format!("/v1/agents/{}/revoke", bot.id), &w.operator).expect(200, "revoke");
    trail.acted(&w, "an agent revoked", "agent_revoked", &op, "operator");

    // And nowhere in the whole trail a token or its hash.
    let all = w.read("/v1/audit?limit=1000").to_string();
    for secret in &trail.secrets {
        assert!(!all.contains(secret.as_str()), "a token or its hash in the audit trail");
    }
    assert_eq!(w.read("/v1/audit/verify")["ok"], true);
}
