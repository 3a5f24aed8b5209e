//! Mandates through the daemon: an agent asks for a narrow lane, the operator
//! approves it, the agent spends inside it until it is exhausted; bad
//! mandates are refused and change nothing; concurrent proposals never take
//! a mandate past its budget or its count (one daemon on SQLite, two on one
//! PostgreSQL database); revoking a mandate, or racing its revocation, leaves
//! no open card under it.

use std::collections::BTreeSet;
use std::sync::Barrier;

use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::support::Kind;
use crate::support::from_cents as cents;
use crate::support::{AgentToken, Wallet, approved, declined};
use crate::support::{XorShift, race, seed};

/// Policies that let everything through: a mandate is what binds.
fn open_policies() -> Value {
    json!([{"policy": "spend-limit", "config": {"limit": "100000.00", "currency": "USD"}}])
}

/// A wallet whose daemon takes proposals as fast as they come, with
/// `spend-limit` uploaded and 1000.00 USD deposited.
fn fast_wallet(kind: Kind) -> Wallet {
    let mut w = Wallet::on(kind);
    let config = w.data.with_file_name("serve.toml");
    std::fs::write(&config, format!("{}[sandbox]\ndeadline = 10000\n", crate::support::NO_RATE_LIMIT))
        .unwrap();
    w.stop();
    w.restart_with(&["--config", config.to_str().unwrap()]);
    w.upload("spend-limit", "spend-limit");
    w.deposit("1000.00");
    w
}

fn under(amount: &str, merchant: &str, mcc: &str, mandate_id: &str) -> Value {
    let mut p = crate::support::proposal(amount, merchant, mcc);
    p["mandate_id"] = json!(mandate_id);
    p
}

fn propose_under(w: &Wallet, agent: &AgentToken, amount: &str, merchant: &str, mandate_id: &str) -> Value {
    w.post("/v1/spends", &agent.token, under(amount, merchant, "5942", mandate_id))
        .expect(201, &format!("propose {amount} under {mandate_id}"))
}

fn mandate(w: &Wallet, id: &str) -> Value {
    w.read(&format!("/v1/mandates/{id}"))
}

fn create(w: &Wallet, body: Value) -> Value {
    w.post("/v1/mandates", &w.operator, body).expect(201, "create a mandate")
}

#[track_caller]
fn denied_by_mandate(reply: &Value, says: &str) {
    assert_eq!(reply["status"], "denied", "{reply}");
    let reasons = reply["reasons"].as_array().unwrap();
    assert!(
        reasons
            .iter()
            .any(|r| r.as_str().unwrap().starts_with("mandate:") && r.as_str().unwrap().contains(says)),
        "a reason beginning `mandate:` that says `{says}`: {reply}"
    );
    assert!(reply.get("card").is_none_or(Value::is_null), "{reply}");
}

fn time_ms(v: &Value) -> i128 {
    OffsetDateTime::parse(v.as_str().unwrap(), &Rfc3339).unwrap().unix_timestamp_nanos() / 1_000_000
}

fn mandate_events(w: &Wallet, id: &str) -> Vec<(String, Value)> {
    w.read("/v1/audit?limit=1000")["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["kind"] == "mandate" && r["record"]["mandate_id"] == id)
        .map(|r| (r["record"]["event"].as_str().unwrap().to_owned(), r["record"]["actor"].clone()))
        .collect()
}

/// How many previews the audit trail records.
fn previews_in_trail(w: &Wallet) -> usize {
    w.read("/v1/audit?limit=1000")["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["kind"] == "spend_preview")
        .count()
}

fn mandate_flow(kind: Kind) {
    let w = fast_wallet(kind);
    let bot = w.create_agent("shopper", open_policies());

    // The agent asks; the request waits for the operator.
    let asked = w
        .post(
            "/v1/mandates",
            &bot.token,
            json!({"amount": "20.00", "currency": "USD", "purpose": "buy the course books",
                   "merchant_ids": ["books.example"], "max_spends": 2, "expires_in_seconds": 600}),
        )
        .expect(201, "the agent asks for a mandate");
    let id = asked["id"].as_str().unwrap().to_owned();
    assert_eq!(asked["status"], "pending_approval", "{asked}");
    assert_eq!((&asked["agent_id"], &asked["created_by"]), (&json!(bot.id), &json!("agent")), "{asked}");
    assert_eq!((&asked["remaining"], &asked["spend_count"]), (&json!("20.00"), &json!(0)), "{asked}");
    assert!(asked["approved_at"].is_null(), "{asked}");
    denied_by_mandate(&propose_under(&w, &bot, "5.00", "books.example", &id), "approval");
    w.assert_wallet("1000.00", "0.00", "0.00");

    let ok = w.post(&format!("/v1/mandates/{id}/approve"), &w.operator, json!({})).expect(200, "approve");
    assert_eq!(ok["status"], "active", "{ok}");
    assert!(ok["approved_at"].is_string(), "{ok}");
    w.post(&format!("/v1/mandates/{id}/approve"), &w.operator, json!({})).refused(
        409,
        "not_pending_approval",
        "approve twice",
    );
    w.post(&format!("/v1/mandates/{id}/approve"), &bot.token, json!({})).refused(
        403,
        "forbidden",
        "self-approval",
    );

    // Inside the lane: a card that never outlives the mandate.
    let first = propose_under(&w, &bot, "12.00", "books.example", &id);
    assert_eq!(first["status"], "approved", "{first}");
    assert!(time_ms(&first["card"]["expires_at"]) <= time_ms(&ok["expires_at"]), "{first} {ok}");
    let m = mandate(&w, &id);
    assert_eq!(
        (&m["spent"], &m["held"], &m["remaining"], &m["spend_count"]),
        (&json!("0.00"), &json!("12.00"), &json!("8.00"), &json!(1)),
        "{m}"
    );
    assert_eq!(w.charge(&first["card"], "10.00", "books.example"), approved());
    let m = mandate(&w, &id);
    assert_eq!(
        (&m["spent"], &m["held"], &m["remaining"]),
        (&json!("10.00"), &json!("0.00"), &json!("10.00")),
        "{m}"
    );

    // Outside it: too much, another merchant, another currency.
    denied_by_mandate(&propose_under(&w, &bot, "10.01", "books.example", &id), "10.00 USD left");
    denied_by_mandate(&propose_under(&w, &bot, "1.00", "games.example", &id), "games.example");
    let mut eur = under("1.00", "books.example", "5942", &id);
    eur["currency"] = json!("EUR");
    denied_by_mandate(&w.post("/v1/spends", &bot.token, eur).expect(201, "EUR"), "in USD");
    w.assert_wallet("990.00", "0.00", "10.00");

    // The second and last spend it allows: exhausted.
    let last = propose_under(&w, &bot, "10.00", "books.example", &id);
    assert_eq!(last["status"], "approved", "{last}");
    let m = mandate(&w, &id);
    assert_eq!(
        (&m["status"], &m["remaining"], &m["spend_count"]),
        (&json!("exhausted"), &json!("0.00"), &json!(2))
    );
    denied_by_mandate(&propose_under(&w, &bot, "0.01", "books.example", &id), "2 spends");
    // Its spend shows the mandate; the agent sees its own mandates only.
    let spend =
        w.get(&format!("/v1/spends/{}", last["id"].as_str().unwrap()), &bot.token).expect(200, "spend");
    assert_eq!(spend["mandate_id"], id, "{spend}");
    let own = w.get("/v1/mandates", &bot.token).expect(200, "the agent lists its mandates");
    assert_eq!(own["mandates"].as_array().unwrap().len(), 1, "{own}");

    // Revoked by the agent itself: the open card is voided, its hold released.
    let revoked = w.post(&format!("/v1/mandates/{id}/revoke"), &bot.token, json!({})).expect(200, "revoke");
    assert_eq!((&revoked["status"], &revoked["held"]), (&json!("revoked"), &json!("0.00")), "{revoked}");
    assert_eq!(w.charge(&last["card"], "10.00", "books.example"), declined("card_voided"));
    w.assert_wallet("990.00", "0.00", "10.00");
    w.post(&format!("/v1/mandates/{id}/revoke"), &w.operator, json!({})).refused(
        409,
        "mandate_ended",
        "revoke twice",
    );

    let events: Vec<String> = mandate_events(&w, &id).into_iter().map(|(e, _)| e).collect();
    assert_eq!(events, ["requested", "approved", "revoked"]);
    for (event, actor) in mandate_events(&w, &id) {
        let role = if event == "approved" { "operator" } else { "agent" };
        assert_eq!(actor["role"], role, "{event}: {actor}");
        assert!(actor["token_id"].is_string(), "{event}: {actor}");
    }

    // A request the operator denies; a mandate of the operator's own that
    // goes with its agent.
    let asked = w
        .post("/v1/mandates", &bot.token, json!({"amount": "5.00", "currency": "USD", "purpose": "snacks"}))
        .expect(201, "ask again");
    let no = w.post(&format!("/v1/mandates/{}/deny", asked["id"].as_str().unwrap()), &w.operator, json!({}));
    assert_eq!(no.expect(200, "deny")["status"], "denied");
    let given =
        create(&w, json!({"agent_id": bot.id, "amount": "30.00", "currency": "USD", "purpose": "tools"}));
    assert_eq!((&given["status"], &given["created_by"]), (&json!("active"), &json!("operator")), "{given}");
    let given_id = given["id"].as_str().unwrap().to_owned();
    let card = propose_under(&w, &bot, "7.00", "tools.example", &given_id);
    assert_eq!(card["status"], "approved", "{card}");
    w.post(&format!("/v1/agents/{}/revoke", bot.id), &w.operator, json!({})).expect(200, "revoke the agent");
    assert_eq!(mandate(&w, &given_id)["status"], "revoked");
    assert_eq!(mandate(&w, &given_id)["held"], "0.00");
    assert_eq!(w.charge(&card["card"], "7.00", "tools.example"), declined("card_voided"));
    w.assert_wallet("990.00", "0.00", "10.00");
    assert_eq!(w.read("/v1/audit/verify")["ok"], true);
    w.store().check_invariants().unwrap();
}

fn bad_mandates_are_refused_and_change_nothing(kind: Kind) {
    let w = fast_wallet(kind);
    let bot = w.create_agent("bot", open_policies());
    let other = w.create_agent("other", open_policies());
    let base = json!({"agent_id": bot.id, "amount": "20.00", "currency": "USD", "purpose": "a task"});
    let with = |key: &str, value: Value| {
        let mut b = base.clone();
        b[key] = value;
        b
    };
    let before = w.read("/v1/audit/verify")["records"].clone();
    let bad = [
        ("a zero budget", with("amount", json!("0.00")), "invalid_amount"),
        ("a negative budget", with("amount", json!("-5.00")), "invalid_amount"),
        ("too many decimals", with("amount", json!("1.001")), "invalid_amount"),
        ("an unknown currency", with("currency", json!("XYZ")), "invalid_amount"),
        ("no purpose", with("purpose", json!("  ")), "invalid_field"),
        (
            "a merchant id with a zero-width space",
            with("merchant_ids", json!(["shop\u{200b}.example"])),
            "invalid_field",
        ),
        ("a lookalike merchant id", with("merchant_ids", json!(["shоp.example"])), "confusable_merchant"),
        ("a three-digit category", with("mccs", json!(["594"])), "invalid_field"),
        ("max_spends of zero", with("max_spends", json!(0)), "invalid_field"),
        ("an expiry over 30 days", with("expires_in_seconds", json!(30 * 86_400 + 1)), "invalid_field"),
        ("an expiry of zero", with("expires_in_seconds", json!(0)), "invalid_field"),
        ("an unknown field", with("budget", json!("5.00")), ""),
    ];
    for (what, body, code) in bad {
        w.post("/v1/mandates", &w.operator, body).refused(422, code, what);
    }
    let mut no_agent = base.clone();
    no_agent.as_object_mut().unwrap().remove("agent_id");
    w.post("/v1/mandates", &w.operator, no_agent.clone()).refused(
        422,
        "invalid_field",
        "the operator names no agent",
    );
    w.post("/v1/mandates", &bot.token, base.clone()).refused(422, "invalid_field", "an agent names an agent");
    w.post("/v1/mandates", &w.network, no_agent).refused(403, "forbidden", "the network token");
    w.post("/v1/mandates", &w.operator, with("agent_id", json!("ag_nobody"))).refused(
        404,
        "not_found",
        "unknown agent",
    );
    w.get("/v1/mandates", &w.network).refused(403, "forbidden", "the network token lists");
    assert_eq!(w.read("/v1/mandates"), json!({"mandates": []}));
    assert_eq!(w.read("/v1/audit/verify")["records"], before, "a refused mandate writes nothing");

    // Another agent's mandate: not found, whatever the agent tries.
    let theirs = create(&w, with("agent_id", json!(other.id)));
    let id = theirs["id"].as_str().unwrap();
    let before = w.read("/v1/audit/verify")["records"].clone();
    w.post("/v1/spends", &bot.token, under("1.00", "shop.example", "5942", id)).refused(
        404,
        "not_found",
        "spend under another's",
    );
    w.get(&format!("/v1/mandates/{id}"), &bot.token).refused(404, "not_found", "read another's");
    w.post(&format!("/v1/mandates/{id}/revoke"), &bot.token, json!({})).refused(
        404,
        "not_found",
        "revoke another's",
    );
    w.post(&format!("/v1/mandates/{id}/deny"), &bot.token, json!({})).refused(
        403,
        "forbidden",
        "an agent denies",
    );
    w.post(&format!("/v1/mandates/{id}/revoke"), &w.network, json!({})).refused(
        403,
        "forbidden",
        "the network revokes",
    );
    w.get(&format!("/v1/mandates?agent_id={}", other.id), &bot.token).refused(
        403,
        "forbidden",
        "list another's",
    );
    w.post("/v1/spends", &bot.token, under("1.00", "shop.example", "5942", "md_unknown")).refused(
        404,
        "not_found",
        "unknown mandate",
    );
    assert_eq!(w.read("/v1/audit/verify")["records"], before, "nothing recorded");
    assert_eq!(w.get("/v1/spends", &bot.token).expect(200, "spends"), json!({"spends": []}));
    assert_eq!(mandate(&w, id)["status"], "active");
    w.assert_wallet("1000.00", "0.00", "0.00");
}

#[test]
fn a_mandate_ends_when_its_time_does_and_its_cards_with_it() {
    let w = fast_wallet(Kind::Sqlite);
    let bot = w.create_agent("bot", open_policies());
    let m = create(
        &w,
        json!({"agent_id": bot.id, "amount": "20.00", "currency": "USD", "purpose": "quick",
                              "expires_in_seconds": 3}),
    );
    let id = m["id"].as_str().unwrap().to_owned();
    let spend = propose_under(&w, &bot, "5.00", "shop.example", &id);
    assert_eq!(spend["status"], "approved", "{spend}");
    // 15 minutes by default, clipped to the mandate's 3 seconds.
    assert!(time_ms(&spend["card"]["expires_at"]) <= time_ms(&m["expires_at"]), "{spend} {m}");
    std::thread::sleep(std::time::Duration::from_millis(3_500));
    assert_eq!(mandate(&w, &id)["status"], "expired");
    denied_by_mandate(&propose_under(&w, &bot, "1.00", "shop.example", &id), "expired");
    assert_eq!(w.charge(&spend["card"], "5.00", "shop.example"), declined("card_expired"));
    // The sweep records the end (the daemon sweeps every second).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !mandate_events(&w, &id).iter().any(|(e, _)| e == "expired") {
        assert!(std::time::Instant::now() < deadline, "no `expired` record: {:?}", mandate_events(&w, &id));
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let (_, actor) = mandate_events(&w, &id).into_iter().find(|(e, _)| e == "expired").unwrap();
    assert_eq!(actor["role"], "system");
    w.assert_wallet("1000.00", "0.00", "0.00");
}

/// `n` proposals of seeded amounts under one mandate from many connections
/// at once, proposal `i` through `daemons[i % len]`; each amount in cents
/// with its reply.
fn race_mandate(
    daemons: &[&Wallet],
    agent: &AgentToken,
    id: &str,
    rng: &mut XorShift,
    n: usize,
) -> Vec<(i64, Value)> {
    race(rng, n, 400, |i, amount| {
        daemons[i % daemons.len()]
            .post("/v1/spends", &agent.token, under(amount, "shop.example", "5942", id))
            .expect(201, &format!("proposal {i}"))
    })
}

/// Many proposals at once against a mandate's budget, then against its
/// count: never past either, to the cent; what the mandate shows is what
/// was approved.
fn check_mandate_races(daemons: &[&Wallet], what: &str) {
    let seed = seed(what);
    let mut rng = XorShift::new(seed);
    let w = daemons[0];
    let bot = w.create_agent("racer", open_policies());

    let budget = 2_000 + (rng.next() % 3_000) as i64;
    let m =
        create(w, json!({"agent_id": bot.id, "amount": cents(budget), "currency": "USD", "purpose": "race"}));
    let id = m["id"].as_str().unwrap().to_owned();
    let results = race_mandate(daemons, &bot, &id, &mut rng, 200);
    let total: i64 = results.iter().filter(|(_, r)| r["status"] == "approved").map(|(c, _)| c).sum();
    assert!(total <= budget, "{what} (seed {seed}): {total} cents approved past a budget of {budget}");
    assert!(total > 0, "{what} (seed {seed}): nothing approved");
    for (c, r) in results.iter().filter(|(_, r)| r["status"] != "approved") {
        assert_eq!(r["status"], "denied", "{r}");
        assert!(r["reasons"][0].as_str().unwrap().starts_with("mandate:"), "only the mandate denies: {r}");
        assert!(*c > budget - total, "{what} (seed {seed}): {c} denied with {} left: {r}", budget - total);
    }
    let shown = mandate(w, &id);
    assert_eq!(
        (&shown["held"], &shown["remaining"]),
        (&json!(cents(total)), &json!(cents(budget - total))),
        "{shown}"
    );

    let max = 3 + (rng.next() % 5) as usize;
    let m = create(
        w,
        json!({"agent_id": bot.id, "amount": "1000.00", "currency": "USD", "purpose": "count",
                             "max_spends": max}),
    );
    let id = m["id"].as_str().unwrap().to_owned();
    let results = race_mandate(daemons, &bot, &id, &mut rng, 60);
    let approved = results.iter().filter(|(_, r)| r["status"] == "approved").count();
    assert_eq!(approved, max, "{what} (seed {seed}): {approved} spends approved under a mandate of {max}");
    assert_eq!(mandate(w, &id)["spend_count"], max);
    assert_eq!(mandate(w, &id)["status"], "exhausted");
    for d in daemons {
        assert_eq!(d.read("/v1/audit/verify")["ok"], true);
    }
    w.store().check_invariants().unwrap();
}

#[test]
fn concurrent_proposals_never_pass_a_mandate_on_one_daemon() {
    let w = fast_wallet(Kind::Sqlite);
    check_mandate_races(&[&w], "concurrent_proposals_never_pass_a_mandate_on_one_daemon");
}

#[test]
fn concurrent_proposals_never_pass_a_mandate_across_two_daemons() {
    let a = fast_wallet(Kind::Postgres);
    let config = a.data.with_file_name("serve.toml");
    let b = a.sibling(&["--config", config.to_str().unwrap()]);
    check_mandate_races(&[&a, &b], "concurrent_proposals_never_pass_a_mandate_across_two_daemons");
}

fn revocation_racing_proposals_leaves_no_open_card(kind: Kind) {
    let w = fast_wallet(kind);
    let bot = w.create_agent("racer", open_policies());
    for round in 0..3 {
        let m =
            create(&w, json!({"agent_id": bot.id, "amount": "100.00", "currency": "USD", "purpose": "race"}));
        let id = m["id"].as_str().unwrap().to_owned();
        let barrier = Barrier::new(9);
        let (replies, revoked) = std::thread::scope(|s| {
            let proposers: Vec<_> = (0..8)
                .map(|_| {
                    let (w, bot, id, barrier) = (&w, &bot, &id, &barrier);
                    s.spawn(move || {
                        barrier.wait();
                        (0..6).map(|_| propose_under(w, bot, "1.00", "shop.example", id)).collect::<Vec<_>>()
                    })
                })
                .collect();
            let revoker = s.spawn(|| {
                barrier.wait();
                std::thread::sleep(std::time::Duration::from_millis(5 * round));
                w.post(&format!("/v1/mandates/{id}/revoke"), &w.operator, json!({})).expect(200, "revoke")
            });
            let replies: Vec<Value> = proposers.into_iter().flat_map(|h| h.join().unwrap()).collect();
            (replies, revoker.join().unwrap())
        });
        assert_eq!(revoked["status"], "revoked");
        let spends: BTreeSet<&str> =
            replies.iter().filter(|r| r["status"] == "approved").map(|r| r["id"].as_str().unwrap()).collect();
        let cards = w.read("/v1/cards");
        for card in cards["cards"].as_array().unwrap() {
            if spends.contains(card["spend_id"].as_str().unwrap()) {
                assert_eq!(
                    card["state"], "voided",
                    "round {round}: a card left open under a revoked mandate: {card}"
                );
            }
        }
        for r in replies.iter().filter(|r| r["status"] == "denied") {
            assert!(r["reasons"][0].as_str().unwrap().contains("revoked"), "{r}");
        }
        let shown = mandate(&w, &id);
        assert_eq!((&shown["held"], &shown["spend_count"]), (&json!("0.00"), &json!(0)), "{shown}");
    }
    w.assert_wallet("1000.00", "0.00", "0.00");
    assert_eq!(w.read("/v1/audit/verify")["ok"], true);
    w.store().check_invariants().unwrap();
}

#[test]
fn the_cli_grants_lists_and_spends_under_a_mandate() {
    let w = fast_wallet(Kind::Sqlite);
    let bot = w.create_agent("bot", open_policies());
    let out = w.cli(
        &w.operator,
        &[
            "mandate",
            "create",
            "--agent",
            &bot.id,
            "--amount",
            "15.00",
            "--currency",
            "usd",
            "--purpose",
            "books",
            "--merchant-id",
            "books.example",
            "--max-spends",
            "2",
            "--expires-in",
            "1h",
            "--json",
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let m: Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = m["id"].as_str().unwrap();
    assert_eq!((&m["status"], &m["max_spends"]), (&json!("active"), &json!(2)), "{m}");
    let out = w.cli(
        &bot.token,
        &[
            "spend",
            "propose",
            "--amount",
            "5.00",
            "--currency",
            "USD",
            "--merchant-id",
            "books.example",
            "--merchant-name",
            "Books",
            "--mcc",
            "5942",
            "--purpose",
            "a book",
            "--mandate",
            id,
            "--json",
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let spend: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(spend["status"], "approved", "{spend}");
    let out = w.cli(&w.operator, &["mandate", "show", id]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.starts_with(&format!("active  {id}\n")), "{text}");
    assert!(text.contains("10.00 USD") && text.contains("1 of 2"), "{text}");
    let out = w.cli(&w.operator, &["mandate", "list", "--agent", &bot.id]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(id));
    let out = w.cli(
        &bot.token,
        &["mandate", "request", "--amount", "3.00", "--currency", "USD", "--purpose", "pens", "--json"],
    );
    let asked: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(asked["status"], "pending_approval", "{asked}");
    let out = w.cli(&w.operator, &["mandate", "approve", asked["id"].as_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("active  "),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = w.cli(&w.operator, &["mandate", "revoke", id]);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("revoked  "));
    let out = w.cli(
        &w.operator,
        &[
            "mandate",
            "create",
            "--agent",
            &bot.id,
            "--amount",
            "1.00",
            "--currency",
            "USD",
            "--purpose",
            "x",
            "--expires-in",
            "1w",
        ],
    );
    assert_eq!(out.status.code(), Some(2), "a bad duration is a usage error");
}

crate::support::on_each_backend!(
    mandate_flow,
    bad_mandates_are_refused_and_change_nothing,
    revocation_racing_proposals_leaves_no_open_card,
);

#[test]
fn a_policy_of_contract_0_2_0_sees_the_mandate() {
    let w = fast_wallet(Kind::Sqlite);
    w.upload("approval-threshold", "approval-threshold");
    let bot = w.create_agent(
        "bot",
        json!([{"policy": "spend-limit", "config": {"limit": "100000.00", "currency": "USD"}},
               {"policy": "approval-threshold", "config": {"threshold": "100.00", "currency": "USD"}}]),
    );
    // Without a mandate, above the threshold: a human is asked.
    let alone = w.propose(&bot, "150.00", "shop.example", "5942").expect(201, "propose 150.00");
    assert_eq!(alone["status"], "pending_approval", "{alone}");
    // Inside a mandate the operator made: the policy sees it and asks no one.
    let given =
        create(&w, json!({"agent_id": bot.id, "amount": "500.00", "currency": "USD", "purpose": "hardware"}));
    let given_id = given["id"].as_str().unwrap();
    // A preview sees what a proposal would: the policies are shown the
    // mandate, and the host's check bounds what they say.
    let preview = |who: &AgentToken, amount: &str, mandate_id: &str| {
        w.post("/v1/spends/preview", &who.token, under(amount, "shop.example", "5942", mandate_id))
    };
    let previews = || previews_in_trail(&w);
    let seen = preview(&bot, "150.00", given_id).expect(200, "preview inside the mandate");
    assert_eq!(seen["decision"], "allow", "{seen}");
    let too_much = preview(&bot, "600.00", given_id).expect(200, "preview beyond the mandate");
    assert_eq!(too_much["decision"], "deny", "{too_much}");
    assert!(too_much["reasons"].to_string().contains("more than the 500.00 USD left"), "{too_much}");
    let before = previews();
    let stranger = w.create_agent("stranger", open_policies());
    preview(&stranger, "1.00", given_id).refused(404, "not_found", "another agent's mandate");
    assert_eq!(previews(), before, "a refused preview records nothing");
    let inside = propose_under(&w, &bot, "150.00", "shop.example", given_id);
    assert_eq!(inside["status"], "approved", "{inside}");
    // More than is left of it: the host denies it, whatever the policies say.
    let beyond = propose_under(&w, &bot, "360.00", "shop.example", given_id);
    assert_eq!(beyond["status"], "denied", "the host's check denies what the mandate cannot cover: {beyond}");
    // A mandate the agent asked for does not skip the human.
    let asked = w
        .post("/v1/mandates", &bot.token, json!({"amount": "500.00", "currency": "USD", "purpose": "more"}))
        .expect(201, "ask");
    let asked_id = asked["id"].as_str().unwrap();
    w.post(&format!("/v1/mandates/{asked_id}/approve"), &w.operator, json!({})).expect(200, "approve");
    let requested = propose_under(&w, &bot, "150.00", "shop.example", asked_id);
    assert_eq!(requested["status"], "pending_approval", "{requested}");
    // Its approval is checked against the mandate again, and its card does
    // not outlive it.
    let spend_id = requested["id"].as_str().unwrap();
    w.post(&format!("/v1/approvals/{spend_id}/approve"), &w.operator, json!({}))
        .expect(200, "approve the spend");
    let collected = w.get(&format!("/v1/spends/{spend_id}"), &bot.token).expect(200, "collect");
    assert!(time_ms(&collected["card"]["expires_at"]) <= time_ms(&asked["expires_at"]), "{collected}");
    assert_eq!(mandate(&w, asked_id)["held"], "150.00");
}
