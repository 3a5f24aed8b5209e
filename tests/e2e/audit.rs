//! The audit trail against someone who can write the database but not the
//! data directory: a rewritten record does not verify even with the plain
//! hash chain recomputed, a checkpoint kept elsewhere finds the newest
//! records removed, and a trail begun before the audit key existed keeps
//! verifying and is keyed from then on. Through the real daemon and CLI.

use serde_json::Value;
use spendguard::datadir::{AUDIT_KEY_FILE, DB_FILE};
use spendguard::storage::{AUDIT_GENESIS, AuditRecord, audit_hash};

use crate::support::{Body, Kind, Wallet, bearer, on_each_backend, path, spendguard};

/// Run `sql` on the wallet's database behind the daemon's back, with the
/// audit table's append-only triggers out of the way: what an attacker
/// who owns the database can do.
fn tamper(w: &Wallet, sql: &str) {
    match &w.database_url {
        None => {
            let db = rusqlite::Connection::open(w.data.join(DB_FILE)).unwrap();
            db.execute_batch(&format!(
                "DROP TRIGGER IF EXISTS audit_append_only_u; DROP TRIGGER IF EXISTS audit_append_only_d; {sql}"
            ))
            .unwrap();
        }
        Some(url) => {
            let mut db = ::postgres::Client::connect(url, ::postgres::NoTls).unwrap();
            // A replica session fires no user triggers.
            db.batch_execute(&format!("SET session_replication_role = replica; {sql}")).unwrap();
        }
    }
}

fn quoted(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// The trail as stored.
fn records(w: &Wallet) -> Vec<AuditRecord> {
    w.store_without_key().audit_records(0, usize::MAX).unwrap()
}

/// Rewrite the records from `from` on as they are in `trail` (edited by the
/// caller), recomputing the plain SHA-256 chain over them: all an attacker
/// without the audit key can do.
fn rewrite_with_plain_hashes(w: &Wallet, trail: &mut [AuditRecord], from: usize) {
    let mut prev = if from == 0 { AUDIT_GENESIS.to_owned() } else { trail[from - 1].hash.clone() };
    for r in &mut trail[from..] {
        r.prev_hash = prev;
        r.hash = audit_hash(&r.prev_hash, r.seq, r.at_ms, &r.kind, &r.record);
        prev = r.hash.clone();
    }
    put(w, &trail[from..]);
}

/// Store these records as they are, over the ones in their places.
fn put(w: &Wallet, records: &[AuditRecord]) {
    let mut sql = String::new();
    for r in records {
        sql.push_str(&format!(
            "UPDATE audit SET record = {}, prev_hash = {}, hash = {} WHERE seq = {};\n",
            quoted(&r.record),
            quoted(&r.prev_hash),
            quoted(&r.hash),
            r.seq
        ));
    }
    tamper(w, &sql);
}

fn verify(w: &Wallet, checkpoint: Option<&str>) -> Value {
    let path = match checkpoint {
        Some(cp) => format!("/v1/audit/verify?checkpoint={cp}"),
        None => "/v1/audit/verify".to_owned(),
    };
    w.read(&path)
}

/// `spendguard audit verify [--checkpoint CP]`: its exit code and stdout.
fn cli_verify(w: &Wallet, checkpoint: Option<&str>) -> (i32, String) {
    let mut args = vec!["audit", "verify"];
    if let Some(cp) = checkpoint {
        args.extend(["--checkpoint", cp]);
    }
    let out = w.cli(&w.operator, &args);
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The head `verify` returned, as a checkpoint.
fn head(v: &Value) -> String {
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["records"], v["head"]["seq"], "{v}");
    format!("{}:{}", v["head"]["seq"], v["head"]["hash"].as_str().unwrap())
}

fn deposits(w: &Wallet, amounts: &[&str]) {
    for amount in amounts {
        w.deposit(amount);
    }
}

fn a_rewritten_record_does_not_verify_even_with_the_plain_chain_recomputed(kind: Kind) {
    let w = Wallet::on(kind);
    deposits(&w, &["1.00", "2.00", "3.00"]);
    let before = verify(&w, None);
    let checkpoint = head(&before);
    let (code, out) = cli_verify(&w, None);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("head: {checkpoint}")), "the CLI prints the head to keep: {out}");

    // The attacker turns the 2.00 deposit into 2000.00 and recomputes every
    // hash from there on, as the unkeyed chain allowed.
    let mut trail = records(&w);
    let at = trail.iter().position(|r| r.kind == "deposit" && r.record.contains("\"2.00\"")).unwrap();
    trail[at].record = trail[at].record.replace("\"2.00\"", "\"2000.00\"");
    rewrite_with_plain_hashes(&w, &mut trail, at);

    let after = verify(&w, None);
    assert_eq!(after["ok"], false, "a rewritten trail must not verify: {after}");
    assert_eq!(after["seq"], trail[at].seq, "{after}");
    assert!(after["error"].as_str().unwrap().contains("audit key"), "{after}");
    let (code, out) = cli_verify(&w, None);
    assert_eq!(code, 1, "`audit verify` fails on a rewritten trail: {out}");
    let (code, _) = cli_verify(&w, Some(&checkpoint));
    assert_eq!(code, 1, "and with a checkpoint too");
}

fn removing_the_newest_records_is_found_by_a_checkpoint_taken_before(kind: Kind) {
    let w = Wallet::on(kind);
    deposits(&w, &["1.00"]);
    let early = head(&verify(&w, None));
    deposits(&w, &["2.00", "3.00"]);
    let late = head(&verify(&w, None));
    let late_seq: u64 = late.split(':').next().unwrap().parse().unwrap();
    // A checkpoint of the current head, and one of an earlier record, hold.
    for cp in [&early, &late] {
        assert_eq!(verify(&w, Some(cp))["ok"], true, "{cp}");
        let (code, out) = cli_verify(&w, Some(cp));
        assert_eq!(code, 0, "{out}");
        assert!(out.contains(&format!("checkpoint {cp}: still in the trail")), "{out}");
    }

    // The two newest records go.
    tamper(&w, &format!("DELETE FROM audit WHERE seq > {};", late_seq - 2));
    let without = verify(&w, None);
    assert_eq!(without["ok"], true, "a shorter chain still holds together: {without}");
    assert_eq!(without["records"], late_seq - 2, "{without}");
    let with = verify(&w, Some(&late));
    assert_eq!(with["ok"], false, "the checkpoint taken before finds the cut: {with}");
    assert!(with["error"].as_str().unwrap().contains("fewer than the checkpoint"), "{with}");
    let (code, out) = cli_verify(&w, Some(&late));
    assert_eq!(code, 1, "{out}");
    assert_eq!(verify(&w, Some(&early))["ok"], true, "an older checkpoint still holds");

    // New records after the cut take the removed places with other hashes:
    // the checkpoint still finds it.
    deposits(&w, &["4.00", "5.00"]);
    let refilled = verify(&w, Some(&late));
    assert_eq!(refilled["ok"], false, "{refilled}");
    assert_eq!(refilled["seq"], late_seq, "{refilled}");
    assert!(
        refilled["error"].as_str().unwrap().contains("no longer has the checkpoint's hash"),
        "{refilled}"
    );

    // Cut back to nothing: the audit key says where its records begin, so
    // even without a checkpoint an empty trail does not verify.
    tamper(&w, "DELETE FROM audit;");
    let empty = verify(&w, None);
    assert_eq!(empty["ok"], false, "{empty}");
    assert!(empty["error"].as_str().unwrap().contains("records were removed"), "{empty}");
}

on_each_backend!(
    a_rewritten_record_does_not_verify_even_with_the_plain_chain_recomputed,
    removing_the_newest_records_is_found_by_a_checkpoint_taken_before,
);

#[test]
fn a_malformed_checkpoint_is_refused() {
    let w = Wallet::new();
    let hash = "ab".repeat(32);
    for bad in [
        "".to_owned(),
        "7".into(),
        format!("0:{hash}"),
        format!("x:{hash}"),
        "3:abc".into(),
        format!("3:{hash}1"),
    ] {
        let reply = w.send(
            "GET",
            &format!("/v1/audit/verify?checkpoint={bad}"),
            Some(&bearer(&w.operator)),
            &[],
            Body::None,
        );
        reply.refused(422, "invalid_checkpoint", &format!("checkpoint `{bad}`"));
    }
    // Only `checkpoint`: any other parameter is refused, and not echoed.
    let reply =
        w.send("GET", "/v1/audit/verify?token=sg_op_secret", Some(&bearer(&w.operator)), &[], Body::None);
    reply.refused(422, "invalid_query", "an unknown parameter");
    assert!(!reply.text.contains("sg_op_secret"), "{}", reply.text);
    let out = w.cli(&w.operator, &["audit", "verify", "--checkpoint", "7"]);
    assert_eq!(out.status.code(), Some(2), "a malformed checkpoint is a usage error");
}

#[test]
fn a_trail_begun_before_the_audit_key_keeps_verifying_and_is_keyed_from_then_on() {
    let mut w = Wallet::new();
    deposits(&w, &["1.00", "2.00"]);
    w.stop();
    // Make it a data directory of before the key: the whole trail plain
    // SHA-256, no key fingerprint, no key file.
    let mut trail = records(&w);
    for r in &mut trail {
        let mut v: Value = serde_json::from_str(&r.record).unwrap();
        v.as_object_mut().unwrap().remove("audit_key_fingerprint");
        r.record = v.to_string();
    }
    rewrite_with_plain_hashes(&w, &mut trail, 0);
    std::fs::remove_file(w.data.join(AUDIT_KEY_FILE)).unwrap();
    let legacy = trail.len() as u64;

    w.restart();
    let v = verify(&w, None);
    assert_eq!(v["ok"], true, "the old records verify as they were: {v}");
    assert_eq!(v["records"], legacy + 1, "one record marks where keyed records begin: {v}");
    let keyed = &w.read(&format!("/v1/audit?after={legacy}"))["records"][0];
    assert_eq!(keyed["kind"], "audit_keyed", "{keyed}");
    assert_eq!(keyed["record"]["keyed_from"], legacy + 1, "{keyed}");
    let key_file = std::fs::metadata(w.data.join(AUDIT_KEY_FILE)).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(key_file.permissions().mode() & 0o777, 0o600);
    }
    deposits(&w, &["3.00"]);
    let checkpoint = head(&verify(&w, None));

    // Someone with only the database rewrites an old, plain record and
    // recomputes the plain chain to the end: the first keyed record covered
    // the old hash, so the trail no longer verifies.
    let mut trail = records(&w);
    let at = trail.iter().position(|r| r.record.contains("\"1.00\"")).unwrap();
    let original = trail.clone();
    trail[at].record = trail[at].record.replace("\"1.00\"", "\"1000.00\"");
    rewrite_with_plain_hashes(&w, &mut trail, at);
    let v = verify(&w, None);
    assert_eq!(v["ok"], false, "{v}");
    assert_eq!(v["seq"], legacy + 1, "the first keyed record no longer verifies: {v}");

    // Nor can new records be made plain again (a downgrade): a plain record
    // appended after the keyed ones fails.
    put(&w, &original);
    assert_eq!(verify(&w, Some(&checkpoint))["ok"], true, "restored");
    let trail = original;
    let last = trail.last().unwrap();
    let (seq, record) = (last.seq + 1, r#"{"amount":"9.00","currency":"USD","deposit_id":"dep_forged"}"#);
    let hash = audit_hash(&last.hash, seq, last.at_ms, "deposit", record);
    tamper(
        &w,
        &format!(
            "INSERT INTO audit (seq, at_ms, kind, record, prev_hash, hash) VALUES ({seq}, {}, 'deposit', {}, {}, {});",
            last.at_ms,
            quoted(record),
            quoted(&last.hash),
            quoted(&hash)
        ),
    );
    let v = verify(&w, None);
    assert_eq!(v["ok"], false, "a plain record after the keyed ones: {v}");
    assert_eq!(v["seq"], seq, "{v}");

    // A copy of the data directory without its audit key is refused: it
    // would key the trail anew.
    w.stop();
    tamper(&w, &format!("DELETE FROM audit WHERE seq = {seq};"));
    let copy = w.data.with_file_name("copy");
    std::fs::create_dir(&copy).unwrap();
    for file in [DB_FILE.to_owned(), format!("{DB_FILE}-wal"), spendguard::datadir::CARD_KEY_FILE.to_owned()]
    {
        if w.data.join(&file).exists() {
            std::fs::copy(w.data.join(&file), copy.join(&file)).unwrap();
        }
    }
    let out = spendguard()
        .args(["token", "new", "--data-dir", path(&copy), "--role", "operator"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "a copy without `audit.key` must be refused");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(AUDIT_KEY_FILE),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // With another wallet's key it is refused too.
    let other = Wallet::new();
    std::fs::copy(other.data.join(AUDIT_KEY_FILE), copy.join(AUDIT_KEY_FILE)).unwrap();
    let out = spendguard()
        .args(["token", "new", "--data-dir", path(&copy), "--role", "operator"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "another wallet's audit key must be refused");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not the wallet's"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    w.restart();
    assert_eq!(verify(&w, Some(&checkpoint))["ok"], true);
}
