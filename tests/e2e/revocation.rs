//! Authority that can be taken back, through the real daemon: revoking an
//! agent while it fires proposals (and while the operator approves and the
//! network charges its cards) leaves nothing of it that can move money;
//! cards resist a CVV probe; a retried authorization gets its first answer.
//!
//! The revocation race is seeded (`SPENDGUARD_SEED` replays one) and runs on
//! SQLite and PostgreSQL alike.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Barrier, Mutex};

use serde_json::{Value, json};

use crate::support::{
    AgentToken, Body, Kind, Wallet, XorShift, bearer, declined, from_cents, on_each_backend, proposal, seed,
};

/// Seeded runs of the revocation race per backend, each on a fresh wallet.
const RUNS: u64 = 5;
/// Proposals the agent fires per run, and the connections it fires them on.
const PROPOSALS: usize = 60;
const CONNECTIONS: usize = 16;

/// A wallet on `kind` whose sandbox deadline no descheduling reaches (as in
/// the other races: this machine may be loaded), with the example policies
/// uploaded and `deposit` USD in it.
fn wallet(kind: Kind, deposit: &str) -> Wallet {
    let mut w = Wallet::on(kind);
    let config = w.data.with_file_name("serve.toml");
    std::fs::write(&config, "[sandbox]\ndeadline = 10000\n").unwrap();
    w.stop();
    w.restart_with(&["--config", config.to_str().unwrap()]);
    w.upload("spend-limit", "spend-limit");
    w.upload("approval-threshold", "approval-threshold");
    w.deposit(deposit);
    w
}

/// The agent of these tests: a limit that never binds, and the operator's
/// approval above 20.00.
fn escalating_agent(w: &Wallet, name: &str) -> AgentToken {
    w.create_agent(
        name,
        json!([
            {"policy": "spend-limit", "config": {"limit": "100000.00", "currency": "USD", "window": "24h"}},
            {"policy": "approval-threshold", "config": {"threshold": "20.00", "currency": "USD"}},
        ]),
    )
}

/// The whole audit trail, oldest first.
fn audit_trail(w: &Wallet) -> Vec<Value> {
    let mut all = Vec::new();
    loop {
        let after = all.last().map_or(0, |r: &Value| r["seq"].as_u64().unwrap());
        let page = w.read(&format!("/v1/audit?after={after}&limit=1000"));
        let records = page["records"].as_array().unwrap().clone();
        if records.is_empty() {
            return all;
        }
        all.extend(records);
    }
}

/// A merchant's charge of `card` for `amount` at `merchant`, with the
/// network's `Idempotency-Key` when given: the raw reply.
fn charge(
    w: &Wallet,
    card: &Value,
    amount: &str,
    merchant: &str,
    key: Option<&str>,
) -> crate::support::Reply {
    let body = json!({
        "pan": card["pan"], "cvv": card["cvv"], "exp_month": card["exp_month"], "exp_year": card["exp_year"],
        "amount": amount, "currency": "USD", "merchant_id": merchant,
    });
    let headers: Vec<(&str, &str)> = key.iter().map(|k| ("Idempotency-Key", *k)).collect();
    w.send("POST", "/v1/network/authorizations", Some(&bearer(&w.network)), &headers, Body::Json(body))
}

/// The card `id` as the operator lists it.
fn listed_card(w: &Wallet, id: &str) -> Value {
    let cards = w.read("/v1/cards");
    cards["cards"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("card `{id}` is listed: {cards}"))
}

/// A card with another CVV than its own (of the same length).
fn with_cvv(card: &Value, cvv: u32) -> Value {
    let mut other = card.clone();
    let len = card["cvv"].as_str().unwrap().len();
    other["cvv"] = json!(format!("{cvv:0len$}"));
    other
}

// ---- revocation is a kill switch ----------------------------------------------

/// One run of the race: the agent fires [`PROPOSALS`] proposals over
/// [`CONNECTIONS`] connections; as they come back the operator approves the
/// escalated ones, the agent collects their cards and the network charges
/// cards; after a seeded number of answers the operator revokes the agent.
/// Then nothing of the agent may have moved money after the revocation's
/// audit record, and none of its cards may authorize.
fn revocation_race_run(kind: Kind, seed: u64) {
    let mut rng = XorShift::new(seed);
    let w = wallet(kind, "100000.00");
    let bot = escalating_agent(&w, "bot");
    let amounts: Vec<i64> = (0..PROPOSALS).map(|_| 1 + (rng.next() % 3_000) as i64).collect();
    let revoke_after = 1 + (rng.next() % (PROPOSALS as u64 / 2)) as usize;
    let charge_every = 1 + (rng.next() % 3) as usize;

    let answered = AtomicUsize::new(0);
    let revoked = AtomicBool::new(false);
    let done = AtomicBool::new(false);
    // Every card the agent was shown (with its PAN and CVV), and the spends
    // that waited for the operator.
    let cards: Mutex<Vec<Value>> = Mutex::default();
    let pending: Mutex<Vec<String>> = Mutex::default();
    // The proposing connections, the operator and this thread start together.
    let barrier = Barrier::new(CONNECTIONS + 2);
    std::thread::scope(|s| {
        for c in 0..CONNECTIONS {
            let (w, bot, amounts, barrier) = (&w, &bot, &amounts, &barrier);
            let (answered, cards, pending) = (&answered, &cards, &pending);
            s.spawn(move || {
                barrier.wait();
                for i in (c..PROPOSALS).step_by(CONNECTIONS) {
                    let reply = w.post(
                        "/v1/spends",
                        &bot.token,
                        proposal(&from_cents(amounts[i]), "api.openai.com", "5734"),
                    );
                    answered.fetch_add(1, Ordering::SeqCst);
                    match reply.status {
                        201 if reply.json["status"] == "approved" => {
                            cards.lock().unwrap().push(reply.json["card"].clone());
                        }
                        201 if reply.json["status"] == "pending_approval" => {
                            pending.lock().unwrap().push(reply.json["id"].as_str().unwrap().to_owned());
                        }
                        201 => assert_eq!(reply.json["status"], "denied", "{}", reply.text),
                        // Revoked while it waited, at the door or at the commit.
                        _ => reply.refused(401, "revoked_token", "a proposal racing the revocation"),
                    }
                }
            });
        }
        // The operator: revokes the agent after `revoke_after` answers,
        // approving escalated spends until then and a little after.
        let (w2, bot2, answered2, revoked2, done2, pending2) =
            (&w, &bot, &answered, &revoked, &done, &pending);
        let barrier2 = &barrier;
        s.spawn(move || {
            barrier2.wait();
            let mut approved = BTreeSet::new();
            loop {
                let waiting: Vec<String> =
                    pending2.lock().unwrap().iter().filter(|id| !approved.contains(*id)).cloned().collect();
                for id in &waiting {
                    approved.insert(id.clone());
                    let reply = w2.post(&format!("/v1/approvals/{id}/approve"), &w2.operator, json!({}));
                    match reply.status {
                        200 => {}
                        // Denied by the revocation, or its agent found revoked.
                        _ => {
                            let code = reply.json["error"]["code"].as_str().unwrap_or_default();
                            let code = if code == "agent_revoked" {
                                "agent_revoked"
                            } else {
                                "not_pending_approval"
                            };
                            reply.refused(409, code, "an approval racing the revocation")
                        }
                    }
                }
                if !revoked2.load(Ordering::SeqCst) && answered2.load(Ordering::SeqCst) >= revoke_after {
                    let reply = w2.post(&format!("/v1/agents/{}/revoke", bot2.id), &w2.operator, json!({}));
                    assert_eq!(reply.expect(200, "revoke")["revoked"], true);
                    revoked2.store(true, Ordering::SeqCst);
                }
                if done2.load(Ordering::SeqCst) {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        });
        // The agent collects the cards of approved escalations; the network
        // charges every `charge_every`-th card it sees, racing the revocation.
        let (w3, bot3, cards3, pending3, done3) = (&w, &bot, &cards, &pending, &done);
        s.spawn(move || {
            let (mut charged, mut collected) = (0, BTreeSet::new());
            loop {
                let finished = done3.load(Ordering::SeqCst);
                let waiting: Vec<String> =
                    pending3.lock().unwrap().iter().filter(|id| !collected.contains(*id)).cloned().collect();
                for id in &waiting {
                    let reply = w3.get(&format!("/v1/spends/{id}"), &bot3.token);
                    match reply.status {
                        200 if reply.json["card"]["pan"].is_string() => {
                            collected.insert(id.clone());
                            cards3.lock().unwrap().push(reply.json["card"].clone());
                        }
                        200 if reply.json["status"] == "denied" => {
                            collected.insert(id.clone());
                        }
                        200 => {}
                        _ => {
                            reply.refused(401, "revoked_token", "collecting a card after the revocation");
                            collected.insert(id.clone());
                        }
                    }
                }
                let seen: Vec<Value> = cards3.lock().unwrap().clone();
                while charged < seen.len() {
                    if charged % charge_every == 0 {
                        let card = &seen[charged];
                        let reply = charge(w3, card, card["limit"].as_str().unwrap(), "api.openai.com", None);
                        let got = reply.expect(200, "a charge racing the revocation");
                        assert!(got["approved"] == true || got["decline_code"] == "card_voided", "{got}");
                    }
                    charged += 1;
                }
                if finished {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        });
        // Wait for the proposals (the scope joins the others after `done`).
        barrier.wait();
        while answered.load(Ordering::SeqCst) < PROPOSALS || !revoked.load(Ordering::SeqCst) {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        done.store(true, Ordering::SeqCst);
    });

    // After the race: every card the agent ever got, charged in full at
    // its merchant, is declined.
    let cards = cards.into_inner().unwrap();
    for card in &cards {
        let got =
            charge(&w, card, card["limit"].as_str().unwrap(), "api.openai.com", None).expect(200, "charge");
        assert!(
            got == declined("card_voided") || got == declined("card_used"),
            "seed {seed}: a card of the revoked agent still authorizes: {got}"
        );
    }
    // The agent can do nothing any more.
    w.propose(&bot, "1.00", "api.openai.com", "5734").refused(
        401,
        "revoked_token",
        "proposing after the revocation",
    );

    // The trail: nothing of the agent moved money after its revocation.
    let trail = audit_trail(&w);
    let revocations: Vec<&Value> =
        trail.iter().filter(|r| r["kind"] == "agent_revoked" && r["record"]["agent_id"] == bot.id).collect();
    assert_eq!(revocations.len(), 1, "seed {seed}: one revocation record");
    let revocation = revocations[0];
    let at = revocation["seq"].as_u64().unwrap();
    let card_ids: BTreeSet<&str> = cards.iter().map(|c| c["id"].as_str().unwrap()).collect();
    let mut counts: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for r in &trail {
        let seq = r["seq"].as_u64().unwrap();
        let (kind, record) = (r["kind"].as_str().unwrap(), &r["record"]);
        let moved = match kind {
            "spend" => record["agent_id"] == bot.id && record["decision"] == "approved",
            "approval" => record["decision"] == "approved",
            "authorization" => record["approved"] == true,
            _ => false,
        };
        if moved {
            let count = counts.entry(kind).or_default();
            if seq < at { count.0 += 1 } else { count.1 += 1 }
        }
        assert!(
            !moved || seq < at,
            "seed {seed}: `{kind}` record {seq} moved money after the revocation (record {at}): {record}"
        );
        if kind == "authorization" && record["approved"] == true {
            assert!(card_ids.contains(record["card_id"].as_str().unwrap()), "seed {seed}: {record}");
        }
    }
    // The revocation voided exactly the cards left open, and released
    // every hold: nothing of the agent is held.
    let listed = w.read("/v1/cards");
    let listed = listed["cards"].as_array().unwrap();
    assert!(listed.iter().all(|c| c["state"] == "used" || c["state"] == "voided"), "seed {seed}: {listed:?}");
    let voided = listed.iter().filter(|c| c["state"] == "voided").count();
    assert_eq!(revocation["record"]["cards_voided"], json!(voided), "seed {seed}: {revocation}");
    let wallet = w.read("/v1/wallet");
    assert_eq!(wallet["balances"][0]["held"], "0.00", "seed {seed}: {wallet}");
    assert!(w.read("/v1/approvals")["approvals"].as_array().unwrap().is_empty(), "seed {seed}");
    w.store().check_invariants().unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    assert_eq!(w.read("/v1/audit/verify")["ok"], true);
    println!(
        "seed {seed}: revoked after {revoke_after} answers; {} cards shown, {voided} voided by the revocation; \
         money moved (before, after) the revocation: {counts:?}",
        cards.len()
    );
}

fn revoking_an_agent_racing_its_proposals_leaves_it_nothing(kind: Kind) {
    let first = seed("revoking_an_agent_racing_its_proposals_leaves_it_nothing");
    for run in 0..RUNS {
        revocation_race_run(kind, first.wrapping_add(run));
    }
}

/// Revoking takes back everything at once, in one audit record: the open
/// card voided, the hold of an approved escalation whose card was never
/// collected released, the spend still waiting denied (and no longer
/// approvable).
fn revoking_voids_cards_releases_holds_and_denies_pending_spends(kind: Kind) {
    let w = wallet(kind, "100.00");
    let bot = escalating_agent(&w, "bot");
    let other = escalating_agent(&w, "other");
    let open = w.propose(&bot, "5.00", "api.openai.com", "5734").expect(201, "propose 5.00");
    assert_eq!(open["status"], "approved", "{open}");
    let kept = w.propose(&other, "7.00", "api.openai.com", "5734").expect(201, "another agent's 7.00");
    let waiting = w.propose(&bot, "30.00", "api.openai.com", "5734").expect(201, "propose 30.00");
    let uncollected = w.propose(&bot, "25.00", "api.openai.com", "5734").expect(201, "propose 25.00");
    assert_eq!(waiting["status"], "pending_approval", "{waiting}");
    let uncollected_id = uncollected["id"].as_str().unwrap();
    w.post(&format!("/v1/approvals/{uncollected_id}/approve"), &w.operator, json!({})).expect(200, "approve");
    w.assert_wallet("63.00", "37.00", "0.00");

    let revoked = w.post(&format!("/v1/agents/{}/revoke", bot.id), &w.operator, json!({}));
    assert_eq!(revoked.expect(200, "revoke")["revoked"], true);
    // The other agent's card is untouched.
    w.assert_wallet("93.00", "7.00", "0.00");
    let trail = audit_trail(&w);
    let record = &trail.last().unwrap();
    assert_eq!(record["kind"], "agent_revoked");
    assert_eq!(record["record"]["actor"]["role"], "operator", "{record}");
    assert_eq!(
        without_actor(&record["record"]),
        json!({
            "agent_id": bot.id,
            "cards_voided": 1,
            "card_ids": [open["card"]["id"]],
            "holds_released": 2,
            "approvals_denied": 1,
        })
    );
    let card = listed_card(&w, open["card"]["id"].as_str().unwrap());
    assert_eq!(card["state"], "voided", "{card}");
    let spend = w.read(&format!("/v1/spends/{}", waiting["id"].as_str().unwrap()));
    assert_eq!(spend["status"], "denied", "{spend}");
    assert!(spend["reasons"].as_array().unwrap().contains(&json!("the agent was revoked")), "{spend}");
    let approve =
        w.post(&format!("/v1/approvals/{}/approve", waiting["id"].as_str().unwrap()), &w.operator, json!({}));
    approve.refused(409, "not_pending_approval", "approving a revoked agent's spend");
    assert_eq!(
        charge(&w, &open["card"], "5.00", "api.openai.com", None).expect(200, "charge"),
        declined("card_voided")
    );
    assert_eq!(w.charge(&kept["card"], "7.00", "api.openai.com"), crate::support::approved());
    w.get(&format!("/v1/spends/{uncollected_id}"), &bot.token).refused(401, "revoked_token", "collecting");
    w.assert_wallet("93.00", "0.00", "7.00");
    w.post(&format!("/v1/agents/{}/revoke", bot.id), &w.operator, json!({})).refused(
        409,
        "already_revoked",
        "twice",
    );
    w.store().check_invariants().unwrap();
    assert_eq!(w.read("/v1/audit/verify")["ok"], true);
}

// ---- cards resist probing ------------------------------------------------------

/// The probe of the attack: every CVV, with a wrong merchant so that nothing
/// is charged. Before, the right CVV showed as `wrong_merchant` after about
/// a thousand tries; now the third wrong CVV voids the card, its hold is
/// released, and no answer tells the right CVV any more.
fn a_cvv_probe_voids_the_card_after_three_wrong_tries(kind: Kind) {
    let w = wallet(kind, "100.00");
    let bot = escalating_agent(&w, "bot");
    let p = w.propose(&bot, "5.00", "api.openai.com", "5734").expect(201, "propose 5.00");
    let card = &p["card"];
    let card_id = card["id"].as_str().unwrap();
    let right: u32 = card["cvv"].as_str().unwrap().parse().unwrap();
    w.assert_wallet("95.00", "5.00", "0.00");

    // Wrong CVVs first (the probe's bad luck is the norm: 999 of 1000),
    // then the right one: declined `card_voided` like every other.
    let probes: Vec<u32> = (1..=40).map(|k| (right + k) % 1000).chain([right]).collect();
    let mut answers: BTreeMap<String, usize> = BTreeMap::new();
    for (tries, cvv) in probes.iter().enumerate() {
        let got = charge(&w, &with_cvv(card, *cvv), "5.00", "probe.example.com", None).expect(200, "probe");
        assert_eq!(got["approved"], false, "{got}");
        let code = got["decline_code"].as_str().unwrap().to_owned();
        assert_ne!(code, "wrong_merchant", "the right CVV told apart after {tries} tries");
        *answers.entry(code).or_default() += 1;
    }
    assert_eq!(answers.get("wrong_cvv"), Some(&3), "{answers:?}");
    assert_eq!(answers.get("card_voided"), Some(&(probes.len() - 3)), "{answers:?}");
    // The hold is released, and even the right card data declines.
    w.assert_wallet("100.00", "0.00", "0.00");
    assert_eq!(listed_card(&w, card_id)["state"], "voided");
    assert_eq!(
        charge(&w, card, "5.00", "api.openai.com", None).expect(200, "charge"),
        declined("card_voided")
    );
    let trail = audit_trail(&w);
    let voids: Vec<&Value> = trail.iter().filter(|r| r["kind"] == "card_void").collect();
    assert_eq!(voids.len(), 1, "{voids:?}");
    // The lockout is the network's doing: its token is the actor.
    assert_eq!(voids[0]["record"]["actor"]["role"], "network", "{}", voids[0]);
    assert_eq!(
        without_actor(&voids[0]["record"]),
        json!({"card_id": card_id, "reason": "3 authorizations with a wrong CVV"})
    );
    // Nothing of the probe's CVVs is in the trail.
    assert!(!trail.iter().any(|r| r.to_string().contains(card["pan"].as_str().unwrap())));
    w.store().check_invariants().unwrap();
}

/// Racing wrong tries count exactly: of many concurrent wrong CVVs, three
/// are declined `wrong_cvv` and the rest `card_voided`; the hold is released
/// once.
fn racing_wrong_cvvs_lock_the_card_exactly_once(kind: Kind) {
    let w = wallet(kind, "100.00");
    let bot = escalating_agent(&w, "bot");
    let p = w.propose(&bot, "5.00", "api.openai.com", "5734").expect(201, "propose 5.00");
    let card = &p["card"];
    let right: u32 = card["cvv"].as_str().unwrap().parse().unwrap();
    let codes: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (1..=24)
            .map(|i| {
                let (w, wrong) = (&w, with_cvv(card, (right + i) % 1000));
                s.spawn(move || {
                    let got = charge(w, &wrong, "5.00", "api.openai.com", None).expect(200, "a racing probe");
                    got["decline_code"].as_str().unwrap().to_owned()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(codes.iter().filter(|c| *c == "wrong_cvv").count(), 3, "{codes:?}");
    assert_eq!(codes.iter().filter(|c| *c == "card_voided").count(), 21, "{codes:?}");
    w.assert_wallet("100.00", "0.00", "0.00");
    w.store().check_invariants().unwrap();
}

// ---- idempotent authorizations --------------------------------------------------

fn a_retried_authorization_gets_its_first_answer(kind: Kind) {
    let w = wallet(kind, "100.00");
    let bot = escalating_agent(&w, "bot");
    let p = w.propose(&bot, "10.00", "api.openai.com", "5734").expect(201, "propose 10.00");
    let card = &p["card"];
    let card_id = card["id"].as_str().unwrap();

    // Approved, then retried (the network lost the answer): approved again,
    // and the money moved once.
    let first = charge(&w, card, "9.99", "api.openai.com", Some("auth-1"));
    assert!(first.text.contains("\"approved\":true"), "{}", first.text);
    assert_eq!(first.expect(200, "the first authorization"), crate::support::approved());
    for _ in 0..3 {
        let again = charge(&w, card, "9.99", "api.openai.com", Some("auth-1"));
        assert_eq!(again.expect(200, "a retry"), crate::support::approved());
    }
    w.assert_wallet("90.01", "0.00", "9.99");
    let listed = listed_card(&w, card_id);
    assert_eq!((&listed["state"], &listed["captured"]), (&json!("used"), &json!("9.99")), "{listed}");
    let trail = audit_trail(&w);
    let approvals: Vec<&Value> =
        trail.iter().filter(|r| r["kind"] == "authorization" && r["record"]["approved"] == true).collect();
    assert_eq!(approvals.len(), 1, "one approved authorization on record: {approvals:?}");
    assert_eq!(approvals[0]["record"]["card_id"], card_id);

    // The same key for another charge: a conflict, nothing written.
    let before = audit_trail(&w).len();
    let conflict = charge(&w, card, "5.00", "api.openai.com", Some("auth-1"));
    conflict.refused(409, "idempotency_conflict", "the same key with another amount");
    let conflict = charge(&w, &with_cvv(card, 0), "9.99", "api.openai.com", Some("auth-1"));
    conflict.refused(409, "idempotency_conflict", "the same key with other card data");
    assert_eq!(audit_trail(&w).len(), before);
    // Another key, or none: the card is used, as before.
    let other = charge(&w, card, "9.99", "api.openai.com", Some("auth-2"));
    assert_eq!(other.expect(200, "another key"), declined("card_used"));
    assert_eq!(w.charge(card, "9.99", "api.openai.com"), declined("card_used"));
    w.assert_wallet("90.01", "0.00", "9.99");

    // A declined try retried is answered again without counting towards
    // the lockout: the card of another spend stays open.
    let p2 = w.propose(&bot, "3.00", "api.openai.com", "5734").expect(201, "propose 3.00");
    let card2 = &p2["card"];
    let right: u32 = card2["cvv"].as_str().unwrap().parse().unwrap();
    let wrong = with_cvv(card2, (right + 1) % 1000);
    for _ in 0..5 {
        let got =
            charge(&w, &wrong, "3.00", "api.openai.com", Some("auth-3")).expect(200, "a wrong try, retried");
        assert_eq!(got, declined("wrong_cvv"));
    }
    assert_eq!(
        charge(&w, card2, "3.00", "api.openai.com", Some("auth-4")).expect(200, "charge"),
        crate::support::approved()
    );
    w.assert_wallet("87.01", "0.00", "12.99");

    // A malformed key is refused, changing nothing.
    let long = "k".repeat(201);
    let bad = charge(&w, card2, "3.00", "api.openai.com", Some(&long));
    bad.refused(422, "invalid_idempotency_key", "a key too long");
    w.store().check_invariants().unwrap();
}

/// The CLI as the network: a charge retried with its key prints `approved`
/// again, and the money moves once.
fn the_cli_retries_a_charge_with_its_key(kind: Kind) {
    let w = wallet(kind, "100.00");
    let bot = escalating_agent(&w, "bot");
    let card = w.propose(&bot, "4.00", "api.openai.com", "5734").expect(201, "propose")["card"].clone();
    let (exp_month, exp_year) = (card["exp_month"].to_string(), card["exp_year"].to_string());
    let args = |amount: &'static str| {
        vec![
            "network".to_owned(),
            "authorize".to_owned(),
            "--pan".to_owned(),
            card["pan"].as_str().unwrap().to_owned(),
            "--cvv".to_owned(),
            card["cvv"].as_str().unwrap().to_owned(),
            "--exp-month".to_owned(),
            exp_month.clone(),
            "--exp-year".to_owned(),
            exp_year.clone(),
            "--amount".to_owned(),
            amount.to_owned(),
            "--currency".to_owned(),
            "USD".to_owned(),
            "--merchant-id".to_owned(),
            "api.openai.com".to_owned(),
            "--idempotency-key".to_owned(),
            "cli-charge-1".to_owned(),
        ]
    };
    let run = |amount| {
        let args = args(amount);
        w.cli(&w.network, &args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    for _ in 0..2 {
        let out = run("4.00");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "approved\n");
    }
    w.assert_wallet("96.00", "0.00", "4.00");
    let out = run("3.00");
    assert!(!out.status.success(), "the same key with another amount fails");
    assert!(String::from_utf8_lossy(&out.stderr).contains("idempotency_conflict"), "{out:?}");
    w.assert_wallet("96.00", "0.00", "4.00");
}

/// A replayed answer says so in a header, and the metrics count it apart.
fn a_replayed_authorization_is_marked(kind: Kind) {
    let w = wallet(kind, "100.00");
    let bot = escalating_agent(&w, "bot");
    let card = w.propose(&bot, "1.00", "api.openai.com", "5734").expect(201, "propose")["card"].clone();
    let body = json!({
        "pan": card["pan"], "cvv": card["cvv"], "exp_month": card["exp_month"], "exp_year": card["exp_year"],
        "amount": "1.00", "currency": "USD", "merchant_id": "api.openai.com",
    });
    let send = || {
        w.http
            .post(&w.url("/v1/network/authorizations"))
            .header("Authorization", &bearer(&w.network))
            .header("Idempotency-Key", "auth-replayed")
            .send_json(&body)
            .unwrap()
    };
    let first = send();
    assert_eq!(first.status().as_u16(), 200);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let again = send();
    assert_eq!(again.status().as_u16(), 200);
    assert_eq!(again.headers().get("idempotent-replayed").map(|v| v.to_str().unwrap()), Some("true"));
}

on_each_backend!(
    revoking_an_agent_racing_its_proposals_leaves_it_nothing,
    revoking_voids_cards_releases_holds_and_denies_pending_spends,
    a_cvv_probe_voids_the_card_after_three_wrong_tries,
    racing_wrong_cvvs_lock_the_card_exactly_once,
    a_retried_authorization_gets_its_first_answer,
    a_replayed_authorization_is_marked,
    the_cli_retries_a_charge_with_its_key,
);

/// An audit record's content without its actor (checked on its own).
fn without_actor(record: &Value) -> Value {
    let mut record = record.clone();
    if let Some(fields) = record.as_object_mut() {
        fields.remove("actor");
    }
    record
}
