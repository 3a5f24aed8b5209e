//! Proposals and their decisions: idempotency keys, no policy, concurrent
//! proposals against one limit.

use serde_json::{Value, json};

use crate::support::{AgentToken, Body, Wallet, assert_no_secrets, assert_secrets, bearer, proposal};

#[test]
fn idempotent_proposals() {
    let w = Wallet::new();
    w.deposit("100.00");
    w.upload("spend-limit", "spend-limit");
    let limit = json!([{"policy": "spend-limit", "config": {"limit": "50.00", "currency": "USD"}}]);
    let bot = w.create_agent("bot", limit.clone());
    let other = w.create_agent("other bot", limit);
    let propose = |agent: &AgentToken, key: &str, body: Value| {
        w.send(
            "POST",
            "/v1/spends",
            Some(&bearer(&agent.token)),
            &[("Idempotency-Key", key)],
            Body::Json(body),
        )
    };

    let first = propose(&bot, "order-1", proposal("10.00", "api.openai.com", "5734")).expect(201, "first");
    assert_eq!(first["status"], "approved", "{first}");
    assert_secrets(&first["card"]);
    w.assert_wallet("90.00", "10.00", "0.00");

    let retry = propose(&bot, "order-1", proposal("10.00", "api.openai.com", "5734")).expect(201, "retry");
    assert_eq!(retry["id"], first["id"], "{retry}");
    assert_eq!(retry["status"], first["status"]);
    assert_eq!(retry["reasons"], first["reasons"]);
    assert_eq!(retry["card"]["id"], first["card"]["id"], "{retry}");
    assert_no_secrets(&retry["card"]);
    w.assert_wallet("90.00", "10.00", "0.00");
    assert_eq!(w.read("/v1/spends")["spends"].as_array().unwrap().len(), 1);

    for (what, body) in [
        ("another amount", proposal("11.00", "api.openai.com", "5734")),
        ("another merchant", proposal("10.00", "api.anthropic.com", "5734")),
    ] {
        propose(&bot, "order-1", body).refused(409, "idempotency_conflict", what);
    }
    w.assert_wallet("90.00", "10.00", "0.00");
    assert_eq!(w.read("/v1/spends")["spends"].as_array().unwrap().len(), 1);

    // Keys are each agent's own.
    let theirs =
        propose(&other, "order-1", proposal("11.00", "api.openai.com", "5734")).expect(201, "other agent");
    assert_eq!(theirs["status"], "approved", "{theirs}");
    assert_ne!(theirs["id"], first["id"]);
    w.assert_wallet("79.00", "21.00", "0.00");
}

#[test]
fn no_policy_denies() {
    let w = Wallet::new();
    w.deposit("100.00");
    let bot = w.create_agent("unguarded", json!([]));
    let spend = w.propose(&bot, "10.00", "api.openai.com", "5734").expect(201, "propose");
    let id = spend["id"].as_str().unwrap();
    assert_eq!(spend, json!({"id": id, "status": "denied", "reasons": ["no policy attached"]}));
    w.assert_wallet("100.00", "0.00", "0.00");
    assert_eq!(w.read("/v1/cards"), json!({"cards": []}));
    let read = w.get(&format!("/v1/spends/{id}"), &bot.token).expect(200, "the agent reads it");
    assert_eq!((&read["status"], &read["reasons"]), (&json!("denied"), &json!(["no policy attached"])));
}

/// Concurrent proposals against one limit never commit more than it.
#[test]
fn concurrent_proposals_stay_within_the_limit() {
    let w = Wallet::new();
    w.deposit("500.00");
    w.upload("spend-limit", "spend-limit");
    let bot = w.create_agent(
        "bot",
        json!([{"policy": "spend-limit", "config": {"limit": "50.00", "currency": "USD", "window": "24h"}}]),
    );
    let statuses: Vec<Value> = std::thread::scope(|scope| {
        let proposals: Vec<_> = (0..12)
            .map(|_| {
                scope.spawn(|| w.propose(&bot, "10.00", "api.openai.com", "5734").expect(201, "propose"))
            })
            .collect();
        proposals.into_iter().map(|p| p.join().expect("a proposal thread")["status"].clone()).collect()
    });
    let approved = statuses.iter().filter(|s| *s == "approved").count();
    let denied = statuses.iter().filter(|s| *s == "denied").count();
    assert_eq!((approved, denied), (5, 7), "{statuses:?}");
    w.assert_wallet("450.00", "50.00", "0.00");
}
