//! The wallet ledger and its cards against real SQLite and a real
//! PostgreSQL server: seeded randomized operations checked against a model
//! after every step, racing charges, and money edge cases. Written against
//! the `Storage` trait: every test runs on both backends.

use std::collections::BTreeMap;
use std::sync::Arc;

use spendguard::cards::{AuthorizationRequest, CardKey, CardState, DeclineCode, SimulatedIssuer};
use spendguard::history::{History, HistoryScope, PastSpend, StaticHistory};
use spendguard::money::Amount;
use spendguard::policy::{CardTerms, Merchant, SpendFilter};
use spendguard::storage::{
    Actor, AuthorizationOutcome, Backend as Store, CardIssuance, Conflict, Decided, NewSpend, Proposed,
    SpendStatus, Storage, StorageError, Verdict, new_id,
};

use crate::support::{Backend, Kind, XorShift, on_each_backend, simulated_cards};

fn usd(a: &str) -> Amount {
    Amount::parse(a, "USD").unwrap()
}

const T0: u64 = 1_795_521_600_000; // 2026-11-24T12:00:00Z

fn merchant(id: &str) -> Merchant {
    Merchant { id: id.into(), name: id.into(), mcc: "5734".into(), country: "US".into() }
}

fn spend(agent: &str, amount: Amount, merchant_id: &str, key: Option<&str>, at: u64) -> NewSpend {
    NewSpend {
        id: new_id("sp"),
        agent_id: agent.into(),
        idempotency_key: key.map(Into::into),
        amount,
        merchant: merchant(merchant_id),
        purpose: "test".into(),
        received_at_ms: at,
        mandate_id: None,
    }
}

fn approve(terms: CardTerms) -> impl FnMut(Arc<dyn spendguard::history::History>) -> Decided {
    move |_| Verdict::Approve(terms.clone()).into()
}

/// Propose with every policy allowing at the default terms.
fn propose_allowed(
    storage: &(impl Storage + ?Sized),
    cards: &CardIssuance,
    spend: NewSpend,
    now: u64,
) -> Proposed {
    storage.propose(&spend, cards, &Actor::System, now, &mut approve(CardTerms::default())).unwrap()
}

fn charge(card: &spendguard::cards::IssuedCard, amount: Amount, merchant_id: &str) -> AuthorizationRequest {
    AuthorizationRequest {
        pan: card.secrets.pan.clone(),
        cvv: card.secrets.cvv.clone(),
        exp_month: card.exp_month,
        exp_year: card.exp_year,
        amount,
        merchant_id: merchant_id.into(),
        idempotency_key: None,
    }
}

fn a_card_is_issued_charged_once_and_the_rest_released(kind: Kind) {
    let b = kind.fresh();
    let cards = simulated_cards();
    let key = Arc::clone(&cards.key);
    b.storage.deposit(&usd("100.00"), None, &Actor::System, T0).unwrap();

    let p = propose_allowed(&*b.storage, &cards, spend("bot", usd("30.00"), "api.openai.com", None, T0), T0);
    assert_eq!(p.spend.status, SpendStatus::Approved);
    let card = p.card.expect("an approved spend gets a card");
    let bal = &b.storage.balances().unwrap()[0];
    assert_eq!((bal.available, bal.held, bal.spent), (7000, 3000, 0));

    let out = b
        .storage
        .authorize(&charge(&card, usd("12.34"), "api.openai.com"), &key, &Actor::System, T0 + 1000)
        .unwrap();
    assert!(out.approved, "{out:?}");
    let bal = &b.storage.balances().unwrap()[0];
    assert_eq!((bal.available, bal.held, bal.spent), (8766, 0, 1234), "the unused 17.66 goes back");

    let again = b
        .storage
        .authorize(&charge(&card, usd("1.00"), "api.openai.com"), &key, &Actor::System, T0 + 2000)
        .unwrap();
    assert_eq!(again.decline_code, Some(DeclineCode::CardUsed));
    assert_eq!(b.storage.card(&card.card_id).unwrap().unwrap().state, CardState::Used);
    b.storage.check_invariants().unwrap();
}

fn policies_narrow_the_card_and_funds_must_cover_it(kind: Kind) {
    let b = kind.fresh();
    let cards = simulated_cards();
    let key = Arc::clone(&cards.key);
    b.storage.deposit(&usd("20.00"), None, &Actor::System, T0).unwrap();

    // A cap of 15 on a 25 request: the hold and the card are 15, which fits.
    let terms = CardTerms { ttl_seconds: Some(60), max_amount: Some(usd("15.00")) };
    let p = b
        .storage
        .propose(
            &spend("bot", usd("25.00"), "m.com", None, T0),
            &cards,
            &Actor::System,
            T0,
            &mut approve(terms),
        )
        .unwrap();
    let card = p.card.unwrap();
    assert_eq!(card.expires_at_ms, T0 + 60_000);
    let record = b.storage.card(&card.card_id).unwrap().unwrap();
    assert_eq!(record.cap, usd("15.00"));
    let out = b.storage.authorize(&charge(&card, usd("15.01"), "m.com"), &key, &Actor::System, T0).unwrap();
    assert_eq!(out.decline_code, Some(DeclineCode::OverLimit));

    // A TTL above the default never widens the card.
    let terms = CardTerms { ttl_seconds: Some(100_000), max_amount: None };
    let p = b
        .storage
        .propose(
            &spend("bot", usd("5.00"), "m.com", None, T0),
            &cards,
            &Actor::System,
            T0,
            &mut approve(terms),
        )
        .unwrap();
    assert_eq!(p.card.unwrap().expires_at_ms, T0 + 900_000);

    // 20 - 15 - 5 = 0 left: the next approval is denied for funds, holds nothing.
    let p = propose_allowed(&*b.storage, &cards, spend("bot", usd("0.01"), "m.com", None, T0), T0);
    assert_eq!(p.spend.status, SpendStatus::Denied);
    assert_eq!(p.spend.reasons, vec!["insufficient funds".to_owned()]);
    assert!(p.card.is_none());
    b.storage.check_invariants().unwrap();
}

fn idempotency_keys_replay_or_conflict(kind: Kind) {
    let b = kind.fresh();
    let cards = simulated_cards();
    b.storage.deposit(&usd("50.00"), Some("fund-1"), &Actor::System, T0).unwrap();
    let replay = b.storage.deposit(&usd("50.00"), Some("fund-1"), &Actor::System, T0).unwrap();
    assert!(replay.replayed);
    assert_eq!(
        b.storage.deposit(&usd("60.00"), Some("fund-1"), &Actor::System, T0),
        Err(StorageError::IdempotencyConflict("fund-1".into()))
    );
    assert_eq!(b.storage.balances().unwrap()[0].available, 5000, "a replayed deposit moves nothing");

    let first = propose_allowed(&*b.storage, &cards, spend("bot", usd("10.00"), "m.com", Some("k1"), T0), T0);
    let mut ran = false;
    let again = b
        .storage
        .propose(
            &spend("bot", usd("10.00"), "m.com", Some("k1"), T0 + 5),
            &cards,
            &Actor::System,
            T0 + 5,
            &mut |_| {
                ran = true;
                Verdict::Deny(vec!["would differ".into()]).into()
            },
        )
        .unwrap();
    assert!(!ran, "a replay must not run the policies again");
    assert!(again.replayed && again.card.is_none(), "PAN and CVV are never shown twice");
    assert_eq!(again.spend, first.spend);
    let other = b.storage.propose(
        &spend("bot", usd("11.00"), "m.com", Some("k1"), T0),
        &cards,
        &Actor::System,
        T0,
        &mut approve(CardTerms::default()),
    );
    assert_eq!(other.unwrap_err(), StorageError::IdempotencyConflict("k1".into()));
    // Keys are per agent.
    let p =
        propose_allowed(&*b.storage, &cards, spend("other-bot", usd("11.00"), "m.com", Some("k1"), T0), T0);
    assert!(!p.replayed);
    let bal = &b.storage.balances().unwrap()[0];
    assert_eq!((bal.available, bal.held), (2900, 2100));
    b.storage.check_invariants().unwrap();
}

fn expired_and_voided_cards_release_their_holds_once(kind: Kind) {
    let b = kind.fresh();
    let cards = simulated_cards();
    let key = Arc::clone(&cards.key);
    b.storage.deposit(&usd("30.00"), None, &Actor::System, T0).unwrap();
    let issue = |amount: &str| {
        propose_allowed(&*b.storage, &cards, spend("bot", usd(amount), "m.com", None, T0), T0).card.unwrap()
    };
    let (a, v, e) = (issue("10.00"), issue("10.00"), issue("10.00"));
    b.storage.void_card(&v.card_id, &Actor::System, T0 + 1).unwrap();
    assert!(matches!(
        b.storage.void_card(&v.card_id, &Actor::System, T0 + 2),
        Err(StorageError::Conflict(Conflict::CardNotOpen, _))
    ));
    let out = b.storage.authorize(&charge(&v, usd("1.00"), "m.com"), &key, &Actor::System, T0 + 3).unwrap();
    assert_eq!(out.decline_code, Some(DeclineCode::CardVoided));

    // Nothing expires a moment before the end of its life, all of it at the end.
    assert_eq!(b.storage.expire_cards(T0 + 899_999).unwrap(), 0);
    let out =
        b.storage.authorize(&charge(&a, usd("1.00"), "m.com"), &key, &Actor::System, T0 + 900_000).unwrap();
    assert_eq!(
        out.decline_code,
        Some(DeclineCode::CardExpired),
        "a charge at the end of its life is refused"
    );
    assert_eq!(b.storage.expire_cards(T0 + 900_000).unwrap(), 1, "only `e` was still open");
    assert_eq!(b.storage.expire_cards(T0 + 900_000).unwrap(), 0, "expiry releases once");
    assert_eq!(b.storage.card(&e.card_id).unwrap().unwrap().state, CardState::Expired);
    let bal = &b.storage.balances().unwrap()[0];
    assert_eq!((bal.available, bal.held, bal.spent), (3000, 0, 0));
    b.storage.check_invariants().unwrap();
}

fn cards_that_expired_while_the_daemon_was_down_are_released_on_open(kind: Kind) {
    let b = kind.fresh();
    let cards = simulated_cards();
    {
        let storage = b.open_again();
        storage.deposit(&usd("10.00"), None, &Actor::System, T0).unwrap();
        propose_allowed(&*storage, &cards, spend("bot", usd("10.00"), "m.com", None, T0), T0);
    }
    let storage = b.open_again();
    assert_eq!(storage.balances().unwrap()[0].held, 1000, "still held across a restart");
    assert_eq!(storage.expire_cards(T0 + 3_600_000).unwrap(), 1);
    assert_eq!(storage.balances().unwrap()[0].available, 1000);
    storage.check_invariants().unwrap();
}

fn history_counts_captures_and_open_holds_in_the_requests_currency(kind: Kind) {
    let b = kind.fresh();
    let cards = simulated_cards();
    let key = Arc::clone(&cards.key);
    b.storage.deposit(&usd("100.00"), None, &Actor::System, T0).unwrap();
    b.storage.deposit(&Amount::parse("100.00", "EUR").unwrap(), None, &Actor::System, T0).unwrap();
    let issue = |agent: &str, amount: Amount, merchant_id: &str, at: u64| {
        propose_allowed(&*b.storage, &cards, spend(agent, amount, merchant_id, None, at), at).card.unwrap()
    };
    let used = issue("bot", usd("20.00"), "a.com", T0);
    b.storage.authorize(&charge(&used, usd("5.00"), "a.com"), &key, &Actor::System, T0 + 1).unwrap(); // counts 5
    let voided = issue("bot", usd("7.00"), "a.com", T0 + 10);
    b.storage.void_card(&voided.card_id, &Actor::System, T0 + 11).unwrap(); // counts 0
    issue("bot", usd("3.00"), "b.com", T0 + 20); // open: counts 3
    issue("other", usd("4.00"), "a.com", T0 + 30); // another agent
    issue("bot", Amount::parse("9.00", "EUR").unwrap(), "a.com", T0 + 40); // another currency

    let mut seen = Vec::new();
    let mut probe = |h: Arc<dyn spendguard::history::History>| {
        let scope = HistoryScope { agent_id: "bot".into(), currency: "USD".into() };
        let f = |since_ms, merchant: Option<&str>, wallet_wide| SpendFilter {
            since_ms,
            merchant_id: merchant.map(Into::into),
            mcc: None,
            wallet_wide,
            mandate_id: None,
        };
        for filter in
            [f(0, None, false), f(T0 + 20, None, false), f(0, Some("a.com"), false), f(0, None, true)]
        {
            let s = h.summarize(&scope, &filter).unwrap();
            seen.push((s.total_units, s.count));
        }
        Verdict::Deny(vec!["probe".into()]).into()
    };
    b.storage
        .propose(
            &spend("bot", usd("1.00"), "a.com", None, T0 + 50),
            &cards,
            &Actor::System,
            T0 + 50,
            &mut probe,
        )
        .unwrap();
    assert_eq!(seen, vec![(800, 2), (300, 1), (500, 1), (1200, 3)]);
    b.storage.check_invariants().unwrap();
}

/// The ledger's history query counts what the shared rule counts
/// (`spendguard_types::history`, which `policy eval`, `policy test` and the
/// SDK's test host answer with): the same spends, every filter shape, on
/// both backends.
fn the_ledgers_history_query_counts_what_the_shared_rule_counts(kind: Kind) {
    let b = kind.fresh();
    let cards = simulated_cards();
    b.storage.deposit(&usd("1000.00"), None, &Actor::System, T0).unwrap();
    b.storage.deposit(&Amount::parse("1000.00", "EUR").unwrap(), None, &Actor::System, T0).unwrap();
    let mut past = Vec::new();
    let mut at = T0;
    for (i, agent) in ["bot", "other"].into_iter().enumerate() {
        for merchant_id in ["a.com", "b.com"] {
            for mcc in ["5734", "5812"] {
                for currency in ["USD", "EUR"] {
                    at += 10;
                    let amount =
                        Amount::from_units(100 + i64::try_from(past.len()).unwrap(), currency).unwrap();
                    let mut new = spend(agent, amount.clone(), merchant_id, None, at);
                    new.merchant.mcc = mcc.into();
                    propose_allowed(&*b.storage, &cards, new, at).card.unwrap();
                    past.push(PastSpend {
                        amount,
                        merchant_id: merchant_id.into(),
                        mcc: mcc.into(),
                        at_ms: at,
                        agent: (i == 1).then(|| agent.to_owned()),
                        mandate_id: None,
                    });
                }
            }
        }
    }
    let fixed = StaticHistory(past);
    let mut compared = 0;
    let mut probe = |h: Arc<dyn spendguard::history::History>| {
        let scope = HistoryScope { agent_id: "bot".into(), currency: "USD".into() };
        for since_ms in [0, T0 + 45, T0 + 125, T0 + 10_000] {
            for merchant_id in [None, Some("a.com"), Some("b.com"), Some("c.com")] {
                for mcc in [None, Some("5734"), Some("5812")] {
                    for wallet_wide in [false, true] {
                        let filter = SpendFilter {
                            since_ms,
                            merchant_id: merchant_id.map(Into::into),
                            mcc: mcc.map(Into::into),
                            wallet_wide,
                            mandate_id: None,
                        };
                        let ledger = h.summarize(&scope, &filter).unwrap();
                        let rule = fixed.summarize(&scope, &filter).unwrap();
                        assert_eq!(
                            (ledger.total_units, ledger.count),
                            (rule.total_units, rule.count),
                            "{filter:?}"
                        );
                        compared += 1;
                    }
                }
            }
        }
        Verdict::Deny(vec!["probe".into()]).into()
    };
    b.storage
        .propose(
            &spend("bot", usd("1.00"), "a.com", None, at + 10),
            &cards,
            &Actor::System,
            at + 10,
            &mut probe,
        )
        .unwrap();
    assert_eq!(compared, 96);
    b.storage.check_invariants().unwrap();
}

/// A charge as the daemon makes it: queued for the backend's writer thread
/// when it has one, otherwise on this thread.
fn charge_queued(
    storage: &dyn Store,
    request: AuthorizationRequest,
    key: &Arc<CardKey>,
) -> AuthorizationOutcome {
    match storage.authorize_queued(request, Arc::clone(key), Actor::System, T0 + 1) {
        Ok(answer) => answer.blocking_recv().unwrap().unwrap(),
        Err(request) => storage.authorize(&request, key, &Actor::System, T0 + 1).unwrap(),
    }
}

fn racing_charges_on_one_card_approve_exactly_once(kind: Kind) {
    let b = kind.fresh();
    let cards = simulated_cards();
    let key = Arc::clone(&cards.key);
    b.storage.deposit(&usd("100.00"), None, &Actor::System, T0).unwrap();
    for round in 0..5 {
        let card = propose_allowed(&*b.storage, &cards, spend("bot", usd("10.00"), "m.com", None, T0), T0)
            .card
            .unwrap();
        let card = Arc::new(card);
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let (storage, key, card) = (Arc::clone(&b.storage), Arc::clone(&key), Arc::clone(&card));
                std::thread::spawn(move || {
                    let amount = usd(&format!("{}.00", 1 + i % 9));
                    let request = charge(&card, amount, "m.com");
                    // Half as the daemon charges (queued for the writer
                    // thread, on SQLite), half on this thread.
                    if i % 2 == 0 {
                        charge_queued(&*storage, request, &key)
                    } else {
                        storage.authorize(&request, &key, &Actor::System, T0 + 1).unwrap()
                    }
                })
            })
            .collect();
        let outcomes: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let approved = outcomes.iter().filter(|o| o.approved).count();
        assert_eq!(approved, 1, "round {round}: {outcomes:?}");
        assert!(
            outcomes.iter().filter(|o| !o.approved).all(|o| o.decline_code == Some(DeclineCode::CardUsed))
        );
        b.storage.check_invariants().unwrap();
    }
}

fn racing_charges_from_two_connections_approve_exactly_once(kind: Kind) {
    // Two stores on one database: what two processes sharing it would do.
    let b = kind.fresh();
    let (one, two) = (b.open_again(), b.open_again());
    let cards = simulated_cards();
    let key = Arc::clone(&cards.key);
    one.deposit(&usd("10.00"), None, &Actor::System, T0).unwrap();
    let card = Arc::new(
        propose_allowed(&*one, &cards, spend("bot", usd("10.00"), "m.com", None, T0), T0).card.unwrap(),
    );
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let storage = if i % 2 == 0 { one.clone() } else { two.clone() };
            let (key, card) = (Arc::clone(&key), Arc::clone(&card));
            std::thread::spawn(move || {
                let request = charge(&card, usd("10.00"), "m.com");
                if i % 4 < 2 {
                    charge_queued(&*storage, request, &key)
                } else {
                    storage.authorize(&request, &key, &Actor::System, T0 + 1).unwrap()
                }
            })
        })
        .collect();
    let approved =
        threads.into_iter().filter(|_| true).map(|t| t.join().unwrap()).filter(|o| o.approved).count();
    assert_eq!(approved, 1);
    two.check_invariants().unwrap();
}

fn money_edge_cases(kind: Kind) {
    let b = kind.fresh();
    // 0.1 + 0.2 is exactly 0.3.
    b.storage.deposit(&usd("0.10"), None, &Actor::System, T0).unwrap();
    b.storage.deposit(&usd("0.20"), None, &Actor::System, T0).unwrap();
    assert_eq!(b.storage.balances().unwrap()[0].available, 30);
    assert_eq!(serde_json::to_value(&b.storage.balances().unwrap()[0]).unwrap()["available"], "0.30");
    // Precision per currency.
    assert!(Amount::parse("1000.5", "JPY").is_err(), "JPY has no decimals");
    assert_eq!(Amount::parse("1000", "JPY").unwrap().units(), 1000);
    assert_eq!(Amount::parse("0.000001", "USDC").unwrap().units(), 1);
    assert!(Amount::parse("0.0000001", "USDC").is_err());
    // Past i64: refused as input, and the ledger refuses to overflow.
    assert!(Amount::parse("92233720368547758.08", "USD").is_err());
    assert!(Amount::from_units(i64::MAX, "USD").is_err());
    let btc = Amount::parse("1000000000", "BTC").unwrap(); // 10^17 units
    let mut refused = None;
    for i in 0..100 {
        match b.storage.deposit(&btc, None, &Actor::System, T0) {
            Ok(_) => {}
            Err(e) => {
                refused = Some((i, e));
                break;
            }
        }
    }
    let (i, err) = refused.expect("the 93rd deposit of 10^17 units overflows i64");
    assert_eq!(i, 92, "{err}");
    assert!(matches!(err, StorageError::Invariant(_)), "{err}");
    let btc_balance = b.storage.balances().unwrap().into_iter().find(|x| x.currency == "BTC").unwrap();
    assert_eq!(btc_balance.available, 92 * 100_000_000_000_000_000, "the refused deposit changed nothing");
    b.storage.check_invariants().unwrap();
}

fn the_ledger_refuses_updates_and_deletes(kind: Kind) {
    let b = kind.fresh();
    b.storage.deposit(&usd("5.00"), None, &Actor::System, T0).unwrap();
    for sql in [
        "UPDATE entries SET delta = delta * 2",
        "DELETE FROM transfers",
        "DELETE FROM deposits",
        "DELETE FROM audit",
    ] {
        let err = b.raw(sql).expect_err(sql);
        assert!(err.contains("append-only"), "{sql}: {err}");
    }
    if kind == Kind::Postgres {
        let err = b.raw("TRUNCATE audit").expect_err("TRUNCATE");
        assert!(err.contains("append-only"), "{err}");
    }
    assert_eq!(b.storage.balances().unwrap()[0].available, 500);
}

/// What the model expects of one card.
struct ModelCard {
    card: spendguard::cards::IssuedCard,
    cap: Amount,
    merchant_id: String,
    state: CardState,
    /// Authorizations declined `wrong_cvv` so far: the third voids the card.
    wrong_cvv_tries: u32,
}

#[derive(Default, Clone, Copy, PartialEq, Eq, Debug)]
struct ModelBalance {
    available: i64,
    held: i64,
    spent: i64,
}

/// Thousands of random operations, each checked against a model and the
/// ledger's invariants right after. The seed is printed: set
/// `SPENDGUARD_SEED` to replay a failure exactly.
fn randomized_operations_keep_every_invariant(kind: Kind) {
    let seed = crate::support::seed("randomized_operations_keep_every_invariant");
    let mut rng = XorShift::new(seed);
    let b = kind.fresh();
    let cards = simulated_cards();
    let key = Arc::clone(&cards.key);
    let currencies = ["USD", "JPY", "USDC"];
    let agents = ["a1", "a2", "a3"];
    let merchants = ["m1.com", "m2.com"];
    let mut model: BTreeMap<String, ModelBalance> = BTreeMap::new();
    let mut issued: Vec<ModelCard> = Vec::new();
    let mut now = T0;
    let mut keys: Vec<(String, NewSpend)> = Vec::new();
    let steps = 3000;
    for step in 0..steps {
        let ctx = format!("seed {seed}, step {step}");
        let pick = |rng: &mut XorShift, n: usize| (rng.next() % n as u64) as usize;
        match rng.next() % 100 {
            0..=9 => {
                let currency = currencies[pick(&mut rng, 3)];
                let units = 1 + (rng.next() % 50_000) as i64;
                b.storage
                    .deposit(&Amount::from_units(units, currency).unwrap(), None, &Actor::System, now)
                    .unwrap();
                model.entry(currency.to_owned()).or_default().available += units;
            }
            10..=44 => {
                let currency = currencies[pick(&mut rng, 3)];
                let amount = Amount::from_units(1 + (rng.next() % 20_000) as i64, currency).unwrap();
                let agent = agents[pick(&mut rng, 3)];
                let reuse = !keys.is_empty() && rng.next().is_multiple_of(10);
                let new = if reuse {
                    let (_, earlier) = &keys[pick(&mut rng, keys.len())];
                    let mut again = earlier.clone();
                    if rng.next().is_multiple_of(2) {
                        again.amount = amount.clone(); // a conflict, unless equal by chance
                    }
                    again
                } else {
                    let key = rng.next().is_multiple_of(3).then(|| new_id("key"));
                    spend(agent, amount, merchants[pick(&mut rng, 2)], key.as_deref(), now)
                };
                let verdict_roll = rng.next() % 10;
                let cap_roll = rng.next() % 4;
                let requested = new.amount.clone();
                let mut decide = |h: Arc<dyn spendguard::history::History>| {
                    let scope = HistoryScope {
                        agent_id: new.agent_id.clone(),
                        currency: requested.currency().into(),
                    };
                    h.summarize(
                        &scope,
                        &SpendFilter {
                            since_ms: now.saturating_sub(3_600_000),
                            merchant_id: None,
                            mcc: None,
                            wallet_wide: false,
                            mandate_id: None,
                        },
                    )
                    .unwrap();
                    Decided::from(match verdict_roll {
                        0 => Verdict::Deny(vec!["no".into()]),
                        1 => Verdict::RequireApproval {
                            reasons: vec!["ask".into()],
                            terms: CardTerms::default(),
                        },
                        _ => Verdict::Approve(CardTerms {
                            ttl_seconds: (cap_roll == 0).then_some(60),
                            max_amount: (cap_roll == 1 && requested.units() > 1).then(|| {
                                Amount::from_units(requested.units() / 2, requested.currency()).unwrap()
                            }),
                        }),
                    })
                };
                let result = b.storage.propose(&new, &cards, &Actor::System, now, &mut decide);
                let earlier = new
                    .idempotency_key
                    .as_ref()
                    .and_then(|k| keys.iter().find(|(key, s)| key == k && s.agent_id == new.agent_id));
                match (earlier, result) {
                    (Some((_, first)), Ok(p)) => {
                        assert!(p.replayed, "{ctx}");
                        assert_eq!(first.fingerprint(), new.fingerprint(), "{ctx}");
                    }
                    (Some(_), Err(StorageError::IdempotencyConflict(_))) => {}
                    (None, Ok(p)) => {
                        assert!(!p.replayed, "{ctx}");
                        if let Some(k) = &new.idempotency_key {
                            keys.push((k.clone(), new.clone()));
                        }
                        let bal = model.entry(requested.currency().to_owned()).or_default();
                        if let Some(card) = p.card {
                            let cap = b.storage.card(&card.card_id).unwrap().unwrap().cap;
                            assert!(cap.units() <= requested.units(), "{ctx}");
                            bal.available -= cap.units();
                            bal.held += cap.units();
                            issued.push(ModelCard {
                                card,
                                cap,
                                merchant_id: new.merchant.id.clone(),
                                state: CardState::Open,
                                wrong_cvv_tries: 0,
                            });
                        } else if p.spend.status == SpendStatus::Approved {
                            panic!("{ctx}: approved without a card");
                        }
                    }
                    (_, other) => panic!("{ctx}: {other:?}"),
                }
            }
            45..=79 if !issued.is_empty() => {
                let i = pick(&mut rng, issued.len());
                let c = &issued[i];
                let mut req = charge(&c.card, c.cap.clone(), &c.merchant_id);
                let mistake = rng.next() % 8;
                let cap = c.cap.units();
                match mistake {
                    0 => req.amount = Amount::from_units(cap + 1, c.cap.currency()).unwrap(),
                    1 => req.merchant_id = "elsewhere.com".into(),
                    2 => req.cvv = if req.cvv == "000" { "001".into() } else { "000".into() },
                    3 => {
                        let other = if c.cap.currency() == "USD" { "JPY" } else { "USD" };
                        req.amount = Amount::from_units(1, other).unwrap();
                    }
                    _ => {
                        req.amount =
                            Amount::from_units(1 + (rng.next() % cap as u64) as i64, c.cap.currency())
                                .unwrap()
                    }
                }
                let expired = now >= c.card.expires_at_ms;
                let locked_out = c.wrong_cvv_tries >= spendguard::cards::MAX_WRONG_CVV;
                let want = match (mistake, c.state) {
                    _ if locked_out => Some(DeclineCode::CardVoided),
                    (2, _) => Some(DeclineCode::WrongCvv),
                    (_, CardState::Used) => Some(DeclineCode::CardUsed),
                    (_, CardState::Voided) => Some(DeclineCode::CardVoided),
                    (_, CardState::Expired) => Some(DeclineCode::CardExpired),
                    _ if expired => Some(DeclineCode::CardExpired),
                    (3, _) => Some(DeclineCode::WrongCurrency),
                    (1, _) => Some(DeclineCode::WrongMerchant),
                    (0, _) => Some(DeclineCode::OverLimit),
                    _ => None,
                };
                let out = b.storage.authorize(&req, &key, &Actor::System, now).unwrap();
                assert_eq!(out.decline_code, want, "{ctx}: charge on card {}", c.card.card_id);
                let bal = model.get_mut(c.cap.currency()).unwrap();
                if want.is_none() {
                    let charged = req.amount.units();
                    bal.held -= cap;
                    bal.spent += charged;
                    bal.available += cap - charged;
                    issued[i].state = CardState::Used;
                } else if want == Some(DeclineCode::CardExpired) && issued[i].state == CardState::Open {
                    bal.held -= cap;
                    bal.available += cap;
                    issued[i].state = CardState::Expired;
                } else if want == Some(DeclineCode::WrongCvv) {
                    issued[i].wrong_cvv_tries += 1;
                    // The third wrong try voids an open card, past its life or not.
                    if issued[i].wrong_cvv_tries == spendguard::cards::MAX_WRONG_CVV
                        && issued[i].state == CardState::Open
                    {
                        bal.held -= cap;
                        bal.available += cap;
                        issued[i].state = CardState::Voided;
                    }
                }
            }
            80..=83 if !issued.is_empty() => {
                // Racing valid charges on one card: at most one wins.
                let i = pick(&mut rng, issued.len());
                let c = &issued[i];
                let cap = c.cap.units();
                let amounts: Vec<i64> = (0..4).map(|_| 1 + (rng.next() % cap as u64) as i64).collect();
                let outcomes: Vec<_> = std::thread::scope(|scope| {
                    let handles: Vec<_> = amounts
                        .iter()
                        .map(|units| {
                            let req = charge(
                                &c.card,
                                Amount::from_units(*units, c.cap.currency()).unwrap(),
                                &c.merchant_id,
                            );
                            let (storage, key) = (&b.storage, &key);
                            scope.spawn(move || storage.authorize(&req, key, &Actor::System, now).unwrap())
                        })
                        .collect();
                    handles.into_iter().map(|h| h.join().unwrap()).collect()
                });
                let winners: Vec<usize> = (0..4).filter(|&k| outcomes[k].approved).collect();
                let open = c.state == CardState::Open && now < c.card.expires_at_ms;
                assert_eq!(winners.len(), usize::from(open), "{ctx}: {outcomes:?}");
                let bal = model.get_mut(c.cap.currency()).unwrap();
                if let Some(&w) = winners.first() {
                    bal.held -= cap;
                    bal.spent += amounts[w];
                    bal.available += cap - amounts[w];
                    issued[i].state = CardState::Used;
                } else if c.state == CardState::Open {
                    // Past its life: the first charge to see it expired it.
                    bal.held -= cap;
                    bal.available += cap;
                    issued[i].state = CardState::Expired;
                }
            }
            84..=89 if !issued.is_empty() => {
                let i = pick(&mut rng, issued.len());
                let result = b.storage.void_card(&issued[i].card.card_id, &Actor::System, now);
                // A card past its life but not yet swept can still be voided.
                if issued[i].state == CardState::Open {
                    result.unwrap_or_else(|e| panic!("{ctx}: {e}"));
                    let bal = model.get_mut(issued[i].cap.currency()).unwrap();
                    bal.held -= issued[i].cap.units();
                    bal.available += issued[i].cap.units();
                    issued[i].state = CardState::Voided;
                } else {
                    assert!(
                        matches!(result, Err(StorageError::Conflict(Conflict::CardNotOpen, _))),
                        "{ctx}: {result:?}"
                    );
                }
            }
            _ => {
                now += rng.next() % 120_000;
                let n = b.storage.expire_cards(now).unwrap();
                let mut expected = 0;
                for c in
                    issued.iter_mut().filter(|c| c.state == CardState::Open && now >= c.card.expires_at_ms)
                {
                    let bal = model.get_mut(c.cap.currency()).unwrap();
                    bal.held -= c.cap.units();
                    bal.available += c.cap.units();
                    c.state = CardState::Expired;
                    expected += 1;
                }
                assert_eq!(n, expected, "{ctx}");
            }
        }
        b.storage.check_invariants().unwrap_or_else(|e| panic!("{ctx}: {e}"));
        for bal in b.storage.balances().unwrap() {
            let want = model.get(bal.currency.as_str()).copied().unwrap_or_default();
            assert_eq!(
                ModelBalance { available: bal.available, held: bal.held, spent: bal.spent },
                want,
                "{ctx}: {}",
                bal.currency
            );
        }
    }
    assert!(issued.len() > 100, "the run should issue many cards, issued {}", issued.len());
    assert_no_secrets_at_rest(&b, &issued.iter().map(|c| &c.card).collect::<Vec<_>>());
}

/// No PAN in any file the store wrote, and no PAN or CVV in any column.
fn assert_no_secrets_at_rest(b: &Backend, cards: &[&spendguard::cards::IssuedCard]) {
    let bytes = b.at_rest();
    assert!(bytes.len() > 10_000, "the store holds the run's records ({} bytes)", bytes.len());
    for card in cards {
        let pan = card.secrets.pan.as_bytes();
        assert!(!bytes.windows(pan.len()).any(|w| w == pan), "a PAN is stored in the clear");
    }
    let secrets: std::collections::HashSet<String> =
        cards.iter().flat_map(|c| [c.secrets.pan.clone(), c.secrets.cvv.clone()]).collect();
    for table in ["cards", "spends", "authorizations", "holds", "transfers", "deposits", "audit"] {
        let texts = b.text_values(table);
        assert!(!texts.is_empty() || table == "deposits", "`{table}` has text");
        for text in texts {
            assert!(!secrets.contains(&text), "a PAN or CVV is stored in `{table}`");
        }
    }
}

/// Hands out the same card number twice, then fresh ones.
struct RepeatingIssuer(std::sync::Mutex<u32>);

impl spendguard::cards::Issuer for RepeatingIssuer {
    fn name(&self) -> &'static str {
        "repeating"
    }

    fn issue(
        &self,
        request: &spendguard::cards::CardRequest,
    ) -> Result<spendguard::cards::IssuedCard, spendguard::cards::CardError> {
        let mut n = self.0.lock().unwrap();
        *n += 1;
        let pan = if *n <= 2 { "4000001234567899".to_owned() } else { format!("40000012345{:05}", *n) };
        let mut card = SimulatedIssuer::new().issue(request)?;
        card.secrets.pan = pan;
        Ok(card)
    }
}

fn a_card_number_already_in_use_is_drawn_again(kind: Kind) {
    let b = kind.fresh();
    let cards =
        CardIssuance { issuer: Arc::new(RepeatingIssuer(std::sync::Mutex::new(0))), ..simulated_cards() };
    b.storage.deposit(&usd("10.00"), None, &Actor::System, T0).unwrap();
    let first = propose_allowed(&*b.storage, &cards, spend("bot", usd("1.00"), "m.com", None, T0), T0);
    let second = propose_allowed(&*b.storage, &cards, spend("bot", usd("1.00"), "m.com", None, T0), T0);
    let (first, second) = (first.card.unwrap(), second.card.unwrap());
    assert_eq!(first.secrets.pan, "4000001234567899");
    assert_ne!(second.secrets.pan, first.secrets.pan, "the repeated number was drawn again");
    b.storage.check_invariants().unwrap();
}

/// The invariant checker itself must catch what it claims to: each kind of
/// tampering, done behind the ledger's back, is reported.
fn the_invariant_checks_catch_tampering(kind: Kind) {
    let tampering: &[(&str, &str)] = &[
        ("UPDATE entries SET delta = delta + 1 WHERE id = (SELECT MAX(id) FROM entries)", "cancel out"),
        (
            "UPDATE entries SET balance_after = balance_after + 1 WHERE id = (SELECT MAX(id) FROM entries)",
            "running balance",
        ),
        ("UPDATE hold_resolutions SET captured_units = captured_units + 1", "captures add up"),
        ("DELETE FROM hold_resolutions", "held"),
        ("UPDATE holds SET units = units + 1", "open holds"),
        ("UPDATE spends SET status = 'denied' WHERE status = 'approved'", "approved if and only if"),
        ("DELETE FROM cards", "no card and no approval"),
    ];
    for (sql, fragment) in tampering {
        let b = kind.fresh();
        let storage = &b.storage;
        let cards = simulated_cards();
        let key = Arc::clone(&cards.key);
        storage.deposit(&usd("50.00"), None, &Actor::System, T0).unwrap();
        let used = propose_allowed(&**storage, &cards, spend("bot", usd("10.00"), "m.com", None, T0), T0)
            .card
            .unwrap();
        storage.authorize(&charge(&used, usd("4.00"), "m.com"), &key, &Actor::System, T0).unwrap();
        propose_allowed(&**storage, &cards, spend("bot", usd("5.00"), "m.com", None, T0), T0);
        storage.check_invariants().unwrap();
        let table = sql.split_whitespace().nth(if sql.starts_with("DELETE") { 2 } else { 1 }).unwrap();
        b.tamper(table, sql);
        let err = storage.check_invariants().expect_err(&format!("`{sql}` went unnoticed"));
        assert!(err.contains(fragment), "`{sql}`: {err}");
    }
}

on_each_backend!(
    a_card_is_issued_charged_once_and_the_rest_released,
    policies_narrow_the_card_and_funds_must_cover_it,
    idempotency_keys_replay_or_conflict,
    expired_and_voided_cards_release_their_holds_once,
    history_counts_captures_and_open_holds_in_the_requests_currency,
    the_ledgers_history_query_counts_what_the_shared_rule_counts,
    racing_charges_on_one_card_approve_exactly_once,
    money_edge_cases,
    a_card_number_already_in_use_is_drawn_again,
    randomized_operations_keep_every_invariant,
    cards_that_expired_while_the_daemon_was_down_are_released_on_open,
    racing_charges_from_two_connections_approve_exactly_once,
    the_ledger_refuses_updates_and_deletes,
    the_invariant_checks_catch_tampering,
);
