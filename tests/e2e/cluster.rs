//! Several daemons, one wallet: two `spendguard serve` processes on one
//! PostgreSQL database, each with its own copy of the data directory, taking
//! requests at the same time.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use serde_json::json;
use spendguard::storage::INSUFFICIENT_FUNDS;

use crate::support::{
    Body, Kind, Reply, Wallet, XorShift, bearer, check_daemon_race, from_cents, proposal, race_daemon, seed,
};

/// Two daemons on one fresh PostgreSQL wallet, with a deadline no
/// descheduling reaches (as in the other races: a policy that times out
/// denies, which would hide nothing but make the counts noisy).
fn two_daemons() -> (Wallet, Wallet) {
    let mut a = Wallet::on(Kind::Postgres);
    let config = a.data.with_file_name("serve.toml");
    std::fs::write(&config, format!("{}[sandbox]\ndeadline = 10000\n", crate::support::NO_RATE_LIMIT))
        .unwrap();
    a.stop();
    a.restart_with(&["--config", config.to_str().unwrap()]);
    let b = a.sibling(&["--config", config.to_str().unwrap()]);
    (a, b)
}

#[test]
fn two_daemons_never_pass_a_limit_or_the_balance_and_honour_each_others_cards() {
    let seed = seed("two_daemons_never_pass_a_limit_or_the_balance_and_honour_each_others_cards");
    let mut rng = XorShift::new(seed);
    let (a, b) = two_daemons();
    a.upload("spend-limit", "spend-limit");
    let window = 2_000 + (rng.next() % 3_000) as i64;
    let slack = 100 + (rng.next() % 1_500) as i64;
    a.deposit(&from_cents(window + slack + 100));

    // A card issued through one daemon is authorized through the other,
    // and only once, whichever daemon the second charge reaches.
    let bot = a.create_agent(
        "bot",
        json!([{"policy": "spend-limit", "config": {"limit": from_cents(window + 100), "currency": "USD", "window": "1h"}}]),
    );
    let issued = b.propose(&bot, "1.00", "api.openai.com", "5734").expect(201, "a proposal through b");
    assert_eq!(issued["status"], "approved", "{issued}");
    let charged = a.charge(&issued["card"], "1.00", "api.openai.com");
    assert_eq!(charged["approved"], true, "b's card through a: {charged}");
    let again = b.charge(&issued["card"], "1.00", "api.openai.com");
    assert_eq!(
        again,
        json!({"approved": false, "decline_code": "card_used"}),
        "b's card, charged again through b"
    );

    // Hundreds of proposals of one agent, spread over both daemons,
    // against its rolling window.
    let one = race_daemon(&[&a, &b], &[bot], &mut rng, 300, 300);
    let spent_one = check_daemon_race("one agent over two daemons, a rolling window", seed, &one, window);
    for (_, r) in one.iter().filter(|(_, r)| r["status"] == "denied") {
        assert!(r["reasons"][0].as_str().unwrap().contains("spend-limit"), "only the window denies: {r}");
    }

    // A nearly empty wallet: limits that never bind, over both daemons.
    let left = window + slack - spent_one;
    let free = json!([{"policy": "spend-limit", "config": {"limit": "100000.00", "currency": "USD"}}]);
    let spenders: Vec<_> = (0..4).map(|i| a.create_agent(&format!("spender-{i}"), free.clone())).collect();
    let last = race_daemon(&[&a, &b], &spenders, &mut rng, 300, 300);
    let spent_last =
        check_daemon_race("four agents over two daemons, a nearly empty wallet", seed, &last, left);
    for (_, r) in last.iter().filter(|(_, r)| r["status"] == "denied") {
        assert_eq!(r["reasons"], json!([INSUFFICIENT_FUNDS]), "{r}");
    }

    // Both daemons see the same wallet, to the cent, and one audit chain.
    for w in [&a, &b] {
        w.assert_wallet(&from_cents(left - spent_last), &from_cents(spent_one + spent_last), "1.00");
        assert_eq!(w.read("/v1/audit/verify")["ok"], true);
    }
    a.store().check_invariants().unwrap();
}

/// A proposal a client sent, with its key, and how it was answered.
struct Sent {
    key: String,
    body: serde_json::Value,
    answer: Reply,
}

#[test]
fn killing_one_daemon_under_load_loses_nothing() {
    const CLIENTS: usize = 8;
    const PER_CLIENT: usize = 30;
    let (a, mut b) = two_daemons();
    a.upload("spend-limit", "spend-limit");
    a.deposit("1000.00");
    let bot = a.create_agent(
        "bot",
        json!([{"policy": "spend-limit", "config": {"limit": "100000.00", "currency": "USD"}}]),
    );
    let answered = AtomicUsize::new(0);
    let failed_over = AtomicUsize::new(0);
    let b_dead = AtomicBool::new(false);
    let sent: Vec<Vec<Sent>> = std::thread::scope(|s| {
        let clients: Vec<_> = (0..CLIENTS)
            .map(|c| {
                let (a, b, bot, answered, failed_over) = (&a, &b, &bot, &answered, &failed_over);
                s.spawn(move || {
                    let mut sent = Vec::new();
                    for i in 0..PER_CLIENT {
                        let key = format!("client-{c}-{i}");
                        let body = proposal(
                            &from_cents(1 + ((c * PER_CLIENT + i) % 250) as i64),
                            "api.openai.com",
                            "5734",
                        );
                        let send = |w: &Wallet| -> Result<Reply, String> {
                            w.try_send(
                                "POST",
                                "/v1/spends",
                                Some(&bearer(&bot.token)),
                                &[("Idempotency-Key", &key)],
                                Body::Json(body.clone()),
                            )
                        };
                        // Half the clients talk to b; when b is gone (no
                        // answer), they retry on a with the same key.
                        let first = if c % 2 == 0 { send(a) } else { send(b) };
                        let answer = match first {
                            Ok(reply) => reply,
                            Err(_) => {
                                failed_over.fetch_add(1, Ordering::SeqCst);
                                send(a).unwrap_or_else(|e| panic!("a stopped serving: {e}"))
                            }
                        };
                        assert_eq!(answer.status, 201, "{key}: {}", answer.text);
                        answered.fetch_add(1, Ordering::SeqCst);
                        sent.push(Sent { key, body, answer });
                    }
                    sent
                })
            })
            .collect();
        // Kill b once a third of the proposals are answered: mid-load, with
        // requests in flight on it.
        while answered.load(Ordering::SeqCst) < CLIENTS * PER_CLIENT / 3 {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        b.daemon.kill9();
        b_dead.store(true, Ordering::SeqCst);
        clients.into_iter().map(|c| c.join().unwrap()).collect()
    });
    assert!(b_dead.load(Ordering::SeqCst));
    let failed_over = failed_over.load(Ordering::SeqCst);
    assert!(failed_over > 0, "no proposal found b dead: the kill came too late to test anything");
    println!("{failed_over} proposals sent to b after it was killed were retried on a");
    b.daemon.reap();
    assert!(
        b.try_send("GET", "/v1/wallet", Some(&bearer(&a.operator)), &[], Body::None).is_err(),
        "b is dead"
    );

    // Every acknowledged proposal is there, as answered, and its key
    // replays the same spend on the daemon that survived.
    let store = a.store();
    let mut approved_cents = 0;
    let mut by_key = BTreeMap::new();
    for s in sent.iter().flatten() {
        let answer = &s.answer;
        let id = answer.json["id"].as_str().unwrap().to_owned();
        let kept =
            store.spend(&id).unwrap().unwrap_or_else(|| panic!("{}: acknowledged spend {id} lost", s.key));
        assert_eq!(kept.status.as_str(), answer.json["status"], "{}", s.key);
        if answer.json["status"] == "approved" {
            approved_cents += kept.amount.units();
        }
        let replay = a.send(
            "POST",
            "/v1/spends",
            Some(&bearer(&bot.token)),
            &[("Idempotency-Key", &s.key)],
            Body::Json(s.body.clone()),
        );
        assert_eq!(replay.json["id"], answer.json["id"], "{}: the key replays the same spend", s.key);
        assert!(by_key.insert(s.key.clone(), id).is_none());
    }
    // Exactly one spend per key: nothing committed twice by the retries.
    assert_eq!(store.spends(Some(&bot.id), usize::MAX).unwrap().len(), CLIENTS * PER_CLIENT);
    store.check_invariants().unwrap();
    a.assert_wallet(&from_cents(100_000 - approved_cents), &from_cents(approved_cents), "0.00");
    assert_eq!(a.read("/v1/audit/verify")["ok"], true);
}

/// Run `spendguard ARGS` to its end; its status and stderr.
fn run(args: &[&str]) -> (bool, String) {
    let out = crate::support::spendguard().args(args).env_remove("SPENDGUARD_DATABASE_URL").output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// What would split a wallet, or serve a different one, is refused with a
/// clear error and changes nothing.
#[test]
fn a_wallet_in_postgres_refuses_what_would_split_it() {
    let db = crate::support::TestDatabase::create();
    let dir = tempfile::tempdir().unwrap();
    let (first, second, sqlite) =
        (dir.path().join("first"), dir.path().join("second"), dir.path().join("sqlite"));
    let p = |p: &std::path::Path| p.to_str().unwrap().to_owned();
    let (ok, err) = run(&["init", "--data-dir", &p(&first), "--database-url", &db.url, "--json"]);
    assert!(ok, "{err}");
    assert!(first.join(spendguard::datadir::POSTGRES_MARKER).exists());
    assert!(!first.join(spendguard::datadir::DB_FILE).exists(), "no SQLite wallet beside it");

    // A second `init` on the same database: refused, and no directory made.
    let (ok, err) = run(&["init", "--data-dir", &p(&second), "--database-url", &db.url]);
    assert!(!ok && err.contains("already holds a wallet"), "{err}");
    assert!(!second.exists());

    // Served without its URL: refused, not an empty SQLite wallet.
    let (ok, err) = run(&["serve", "--data-dir", &p(&first), "--listen", "127.0.0.1:0"]);
    assert!(!ok && err.contains("is in PostgreSQL"), "{err}");
    assert!(!first.join(spendguard::datadir::DB_FILE).exists());

    // A copy whose card key is not the wallet's: refused.
    std::fs::create_dir(&second).unwrap();
    std::fs::copy(first.join("postgres"), second.join("postgres")).unwrap();
    std::fs::write(second.join(spendguard::datadir::CARD_KEY_FILE), rand::random::<[u8; 32]>()).unwrap();
    let (ok, err) =
        run(&["serve", "--data-dir", &p(&second), "--database-url", &db.url, "--listen", "127.0.0.1:0"]);
    assert!(!ok && err.contains("card key is not the wallet's"), "{err}");

    // A SQLite data directory given a database URL: refused.
    let (ok, err) = run(&["init", "--data-dir", &p(&sqlite), "--json"]);
    assert!(ok, "{err}");
    let (ok, err) =
        run(&["serve", "--data-dir", &p(&sqlite), "--database-url", &db.url, "--listen", "127.0.0.1:0"]);
    assert!(!ok && err.contains("is in SQLite"), "{err}");
    let (ok, err) = run(&[
        "serve",
        "--data-dir",
        &p(&sqlite),
        "--database-url",
        "mysql://x@y/z",
        "--listen",
        "127.0.0.1:0",
    ]);
    assert!(!ok && err.contains("postgres://"), "{err}");

    // The operator's escape hatch works on PostgreSQL too; the URL never shows.
    let (ok, err) =
        run(&["token", "new", "--data-dir", &p(&first), "--database-url", &db.url, "--role", "operator"]);
    assert!(ok, "{err}");
    let audit = spendguard::storage::postgres::PgStorage::connect(&db.url, 1).unwrap();
    let kinds: Vec<String> = spendguard::storage::Storage::audit_records(&audit, 0, 100)
        .unwrap()
        .into_iter()
        .map(|r| r.kind)
        .collect();
    assert_eq!(kinds[0], spendguard::datadir::WALLET_CREATED);
    assert_eq!(kinds.iter().filter(|k| *k == "token_created").count(), 3, "{kinds:?}");
}
