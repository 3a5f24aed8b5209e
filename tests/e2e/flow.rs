//! The whole product in one pass, as its users meet it: `init`, a deposit,
//! policies uploaded and attached, agents proposing, cards issued and
//! charged, approvals, revocation, the audit trail.

use std::collections::BTreeSet;

use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::support::{Wallet, approved, assert_no_secrets, assert_secrets, declined, ids, path, spendguard};

#[test]
fn the_whole_flow() {
    let mut w = Wallet::new();
    // `init` never overwrites a wallet.
    let again = spendguard().args(["init", "--data-dir", path(&w.data), "--json"]).output().unwrap();
    assert_eq!(again.status.code(), Some(1), "{}", String::from_utf8_lossy(&again.stdout));
    assert!(again.stdout.is_empty(), "no new tokens: {}", String::from_utf8_lossy(&again.stdout));
    assert_eq!(w.read("/v1/wallet"), json!({"balances": []}));
    w.deposit("100.00");
    w.assert_wallet("100.00", "0.00", "0.00");
    for name in ["spend-limit", "merchant-rules", "approval-threshold"] {
        assert_eq!(w.upload(name, name)["version"], 1);
    }
    let listed = w.read("/v1/policies");
    let names: Vec<_> =
        listed["policies"].as_array().unwrap().iter().map(|p| (&p["name"], &p["version"])).collect();
    assert_eq!(
        names,
        [
            (&json!("approval-threshold"), &json!(1)),
            (&json!("merchant-rules"), &json!(1)),
            (&json!("spend-limit"), &json!(1))
        ]
    );

    let bot = w.create_agent(
        "research bot",
        json!([
            {"policy": "spend-limit", "config": {"limit": "80.00", "currency": "USD", "window": "24h"}},
            {"policy": "merchant-rules", "config": {"block_mcc": ["7995"]}},
            {"policy": "approval-threshold", "config": {"threshold": "50.00", "currency": "USD"}},
        ]),
    );
    let agents = w.get("/v1/agents", &w.operator);
    assert!(!agents.text.contains(&bot.token), "an agent's token is shown only once: {}", agents.text);
    let agents = agents.expect(200, "list agents");
    assert_eq!(ids(&agents["agents"]), [bot.id.as_str()]);
    let attached: Vec<_> =
        agents["agents"][0]["policies"].as_array().unwrap().iter().map(|p| &p["policy"]).collect();
    assert_eq!(
        attached,
        [&json!("spend-limit@1"), &json!("merchant-rules@1"), &json!("approval-threshold@1")]
    );
    assert_eq!(agents["agents"][0]["revoked"], false);

    // An allowed purchase: a single-use card for exactly its amount.
    let before = OffsetDateTime::now_utc();
    let first = w.propose(&bot, "10.00", "api.openai.com", "5734").expect(201, "propose 10.00");
    assert_eq!(first["status"], "approved", "{first}");
    assert_eq!(first["reasons"], json!([]), "{first}");
    let card = &first["card"];
    let keys: BTreeSet<&str> = card.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        BTreeSet::from([
            "id",
            "pan",
            "cvv",
            "exp_month",
            "exp_year",
            "limit",
            "currency",
            "merchant_id",
            "expires_at"
        ]),
        "{card}"
    );
    assert_secrets(card);
    assert_eq!((&card["limit"], &card["currency"]), (&json!("10.00"), &json!("USD")));
    assert_eq!(card["merchant_id"], "api.openai.com");
    assert!((1..=12).contains(&card["exp_month"].as_u64().unwrap()), "{card}");
    let expires = OffsetDateTime::parse(card["expires_at"].as_str().unwrap(), &Rfc3339).unwrap();
    let ttl = (expires - before).whole_seconds();
    assert!((890..=910).contains(&ttl), "a card lives 15 minutes by default, this one {ttl} s");
    let first_pan = card["pan"].as_str().unwrap().to_owned();
    w.assert_wallet("90.00", "10.00", "0.00");

    // The merchant charges a little less: the rest of the hold is released.
    assert_eq!(w.charge(card, "9.99", "api.openai.com"), approved());
    w.assert_wallet("90.01", "0.00", "9.99");
    assert_eq!(w.charge(card, "0.01", "api.openai.com"), declined("card_used"));
    w.assert_wallet("90.01", "0.00", "9.99");
    let cards = w.get("/v1/cards", &w.operator);
    assert!(!cards.text.contains(&first_pan), "no PAN after the first response: {}", cards.text);
    let cards = cards.expect(200, "list cards");
    assert_eq!(cards["cards"][0]["id"], card["id"]);
    assert_eq!(cards["cards"][0]["state"], "used");
    assert_eq!(cards["cards"][0]["captured"], "9.99");
    assert_eq!(cards["cards"][0]["last4"], first_pan[12..]);

    // A card is locked to its merchant and capped at its amount.
    let second = w.propose(&bot, "5.00", "api.openai.com", "5734").expect(201, "propose 5.00");
    assert_eq!(second["status"], "approved", "{second}");
    let card2 = &second["card"];
    assert_secrets(card2);
    let pan2 = card2["pan"].as_str().unwrap().to_owned();
    assert_ne!(card2["pan"], card["pan"]);
    w.assert_wallet("85.01", "5.00", "9.99");
    assert_eq!(w.charge(card2, "5.00", "shop.example.com"), declined("wrong_merchant"));
    assert_eq!(w.charge_in(card2, "5.00", "EUR", "api.openai.com"), declined("wrong_currency"));
    assert_eq!(w.charge(card2, "5.01", "api.openai.com"), declined("over_limit"));
    let mut wrong_cvv = card2.clone();
    wrong_cvv["cvv"] = json!(if card2["cvv"] == "000" { "001" } else { "000" });
    assert_eq!(w.charge(&wrong_cvv, "1.00", "api.openai.com"), declined("wrong_cvv"));
    let mut unknown = card2.clone();
    unknown["pan"] = json!("4000000000000002");
    assert_eq!(w.charge(&unknown, "1.00", "api.openai.com"), declined("card_not_found"));
    w.assert_wallet("85.01", "5.00", "9.99");
    // The operator voids it: the hold is released, the card refuses charges.
    let void = w.post(&format!("/v1/cards/{}/void", card2["id"].as_str().unwrap()), &w.operator, json!({}));
    let voided = void.expect(200, "void");
    assert_eq!(voided["state"], "voided", "{voided}");
    w.assert_wallet("90.01", "0.00", "9.99");
    assert_eq!(w.charge(card2, "5.00", "api.openai.com"), declined("card_voided"));
    let again = w.post(&format!("/v1/cards/{}/void", card2["id"].as_str().unwrap()), &w.operator, json!({}));
    again.refused(409, "card_not_open", "voiding twice");
    w.assert_wallet("90.01", "0.00", "9.99");

    // A blocked category: denied with the reason, nothing held, no card.
    let bet = w.propose(&bot, "10.00", "bets.example.com", "7995").expect(201, "propose at mcc 7995");
    assert_eq!(bet["status"], "denied", "{bet}");
    let reasons = bet["reasons"].as_array().unwrap();
    assert!(reasons.iter().any(|r| r.as_str().unwrap().contains("7995")), "the reason names the code: {bet}");
    assert!(bet.get("card").is_none_or(Value::is_null), "{bet}");
    w.assert_wallet("90.01", "0.00", "9.99");

    // Above the threshold: it waits for the operator, nothing held yet.
    let big = w.propose(&bot, "60.00", "api.openai.com", "5734").expect(201, "propose 60.00");
    assert_eq!(big["status"], "pending_approval", "{big}");
    assert!(
        big["reasons"].as_array().unwrap().iter().any(|r| r.as_str().unwrap().contains("approval-threshold")),
        "the reason names the policy: {big}"
    );
    assert!(big.get("card").is_none_or(Value::is_null), "{big}");
    let big_id = big["id"].as_str().unwrap().to_owned();
    w.assert_wallet("90.01", "0.00", "9.99");
    let pending = w.read("/v1/approvals");
    assert_eq!(ids(&pending["approvals"]), [big_id.as_str()], "{pending}");
    assert_eq!(pending["approvals"][0]["amount"], "60.00");
    assert_eq!(pending["approvals"][0]["status"], "pending_approval");
    assert_eq!(pending["approvals"][0]["agent_id"], bot.id.as_str());
    let waiting =
        w.get(&format!("/v1/spends/{big_id}"), &bot.token).expect(200, "the agent reads its pending spend");
    assert_eq!(waiting["status"], "pending_approval", "{waiting}");
    assert!(waiting["card"].is_null(), "no card before the approval: {waiting}");
    w.assert_wallet("90.01", "0.00", "9.99");

    let ok =
        w.post(&format!("/v1/approvals/{big_id}/approve"), &w.operator, json!({})).expect(200, "approve");
    assert_eq!((&ok["id"], &ok["status"]), (&json!(big_id), &json!("approved")), "{ok}");
    w.assert_wallet("30.01", "60.00", "9.99");
    assert_eq!(w.read("/v1/approvals"), json!({"approvals": []}));
    w.post(&format!("/v1/approvals/{big_id}/approve"), &w.operator, json!({})).refused(
        409,
        "not_pending_approval",
        "approving twice",
    );
    w.post(&format!("/v1/approvals/{big_id}/deny"), &w.operator, json!({})).refused(
        409,
        "not_pending_approval",
        "denying an approved spend",
    );
    w.assert_wallet("30.01", "60.00", "9.99");

    // The agent collects its card: PAN and CVV this once.
    let collected =
        w.get(&format!("/v1/spends/{big_id}"), &bot.token).expect(200, "the agent reads its spend");
    assert_eq!(collected["status"], "approved", "{collected}");
    let card3 = collected["card"].clone();
    assert_secrets(&card3);
    assert_eq!((&card3["limit"], &card3["currency"]), (&json!("60.00"), &json!("USD")), "{card3}");
    assert_eq!(card3["merchant_id"], "api.openai.com");
    let pan3 = card3["pan"].as_str().unwrap().to_owned();
    let again = w.get(&format!("/v1/spends/{big_id}"), &bot.token).expect(200, "the agent reads it again");
    assert_eq!(again["card"]["id"], card3["id"], "{again}");
    assert_no_secrets(&again["card"]);
    assert_eq!(again["card"]["last4"], pan3[12..]);
    let by_operator = w.read(&format!("/v1/spends/{big_id}"));
    assert_no_secrets(&by_operator["card"]);
    w.assert_wallet("30.01", "60.00", "9.99");
    assert_eq!(w.charge(&card3, "60.00", "api.openai.com"), approved());
    w.assert_wallet("30.01", "0.00", "69.99");

    // 69.99 spent in the window: another 20.00 would pass the 80.00 limit.
    let over = w.propose(&bot, "20.00", "api.openai.com", "5734").expect(201, "propose 20.00");
    assert_eq!(over["status"], "denied", "{over}");
    assert!(
        over["reasons"].as_array().unwrap().iter().any(|r| r.as_str().unwrap().contains("spend-limit")),
        "the reason names the policy: {over}"
    );
    w.assert_wallet("30.01", "0.00", "69.99");

    // The audit trail holds together, and the CLI agrees.
    let records = w.read("/v1/audit?limit=1000")["records"].as_array().unwrap().clone();
    let verify = w.read("/v1/audit/verify");
    assert_eq!(verify["ok"], true, "{verify}");
    assert_eq!(verify["records"], records.len(), "{verify}");
    let spends: Vec<&Value> = records.iter().filter(|r| r["kind"] == "spend").collect();
    assert_eq!(spends.len(), 5, "every proposal is recorded: {records:?}");
    // PAN and CVV are shown once, and kept nowhere: not in the audit trail,
    // the database or the logs.
    let pans = [&first_pan, &pan2, &pan3];
    let audit_text = serde_json::to_string(&records).unwrap();
    for pan in pans {
        assert!(!audit_text.contains(pan.as_str()), "a PAN in the audit trail");
    }
    let out = w.cli(&w.operator, &["audit", "verify"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));

    w.stop();
    for file in ["spendguard.db", "spendguard.db-wal"] {
        let Ok(bytes) = std::fs::read(w.data.join(file)) else { continue };
        for pan in pans {
            assert!(!bytes.windows(16).any(|x| x == pan.as_bytes()), "a PAN at rest in {file}");
        }
    }
    let log = std::fs::read_to_string(&w.log).unwrap();
    for pan in pans {
        assert!(!log.contains(pan.as_str()), "a PAN in the daemon's log");
    }
    // Edit one record behind the daemon's back: verification must notice.
    let seq = {
        let db = rusqlite::Connection::open(w.data.join("spendguard.db")).unwrap();
        db.execute_batch("DROP TRIGGER audit_append_only_u").unwrap();
        let (seq, record): (i64, String) = db
            .query_row("SELECT seq, record FROM audit WHERE kind = 'spend' ORDER BY seq LIMIT 1", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        let edited = record.replacen(r#""amount":"10.00""#, r#""amount":"1.00""#, 1);
        assert_ne!(edited, record, "the first spend's record holds its amount: {record}");
        let n = db
            .execute("UPDATE audit SET record = ?1 WHERE seq = ?2", rusqlite::params![edited, seq])
            .unwrap();
        assert_eq!(n, 1);
        seq
    };
    w.restart();
    let verify = w.read("/v1/audit/verify");
    assert_eq!(verify["ok"], false, "{verify}");
    assert_eq!(verify["seq"], seq, "{verify}");
    let out = w.cli(&w.operator, &["audit", "verify"]);
    assert!(
        !out.status.success(),
        "`audit verify` must fail on an edited trail: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(out.status.code(), Some(1));
}
