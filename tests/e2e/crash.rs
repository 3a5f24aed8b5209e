//! Crashes: the daemon is killed with SIGKILL at random points
//! while clients propose spends, charge and void cards and fund the wallet,
//! then restarted on the same data directory. After every crash, with the
//! daemon dead, the database is opened directly and checked:
//!
//! - the ledger's invariants hold and the audit chain verifies, and only
//!   grows (what was recorded before a crash is still there, unchanged);
//! - every acknowledged proposal is there with the same status and card,
//!   every acknowledged charge's capture and every acknowledged void too;
//! - every card has its hold and its audit record, every spend its record;
//! - an idempotency key never made two spends, and a retry after the crash
//!   answers with the spend the first attempt committed, if it did;
//! - deposits happened at most once, and every acknowledged one did;
//! - no agent's committed spend passed its spend limit.
//!
//! After every restart no card past its life still holds money; at the end,
//! once every card's short life is over, nothing is held and available plus
//! spent is exactly what was deposited.
//!
//! Seeded: `SPENDGUARD_SEED` replays a run's choices (when each kill comes,
//! every client's actions and amounts). Thread interleavings, and so the
//! exact statement each kill interrupts, still vary between runs.

use std::collections::{BTreeSet, HashMap};
use std::os::unix::process::ExitStatusExt as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use spendguard::cards::CardState;
use spendguard::datadir::now_ms;
use spendguard::storage::{AuditRecord, CardRecord, SpendRecord};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::support::{
    AgentToken, Body, Kind, Reply, Wallet, XorShift, bearer, on_each_backend, path, proposal, seed, to_cents,
};

/// Independent wallets per test run, each with its own seed.
const RUNS: u64 = 2;
/// Kills (and restarts) per wallet.
const CYCLES: usize = 10;
/// How long the clients run before a kill: 50 ms to 1.2 s.
const KILL_AFTER_MS: (u64, u64) = (50, 1_200);
/// The daemon's default card life, short so that cards expire during the test.
const CARD_TTL_SECONDS: u64 = 3;
const SWEEP_INTERVAL_MS: u64 = 100;
/// Replays of acknowledged proposals per client after each restart.
const REPLAYS: usize = 2;

const MERCHANTS: [(&str, &str); 3] =
    [("api.openai.com", "5734"), ("cloud.example.com", "4816"), ("books.example.com", "5942")];

fn crashes_lose_nothing(kind: Kind) {
    let base = seed("crashes_lose_nothing");
    for run in 0..RUNS {
        let seed = if run == 0 { base } else { mix(base.wrapping_add(run)) };
        let started = Instant::now();
        let stats = crash_run(kind, run, seed);
        println!("run {run} (seed {seed}): {stats} in {:.1?}", started.elapsed());
    }
}

/// SplitMix64's finaliser: unrelated seeds from consecutive numbers.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

// ---- money ---------------------------------------------------------------------

fn dollars(cents: i64) -> String {
    format!("{}.{:02}", cents / 100, cents % 100)
}

fn expires_at_ms(card: &Value) -> u64 {
    let at = OffsetDateTime::parse(card["expires_at"].as_str().unwrap(), &Rfc3339).unwrap();
    u64::try_from(at.unix_timestamp_nanos() / 1_000_000).unwrap()
}

// ---- the clients -----------------------------------------------------------------

/// A proposal as sent, so that it can be sent again with the same key.
#[derive(Debug, Clone)]
struct Proposal {
    key: String,
    purpose: String,
    body: Value,
}

/// A proposal the daemon answered.
#[derive(Debug)]
struct Acked {
    proposal: Proposal,
    spend_id: String,
    status: String,
    card_id: Option<String>,
    cap_cents: Option<i64>,
    /// When the answer came: the spend was committed by then.
    answered_at_ms: u64,
}

/// A proposal sent when the daemon died: no answer, so it may or may not be
/// committed. `committed` is what the database said after the crash.
#[derive(Debug)]
struct InDoubt {
    proposal: Proposal,
    committed: Option<String>,
}

#[derive(Debug, Clone)]
struct Deposit {
    key: String,
    cents: i64,
    id: Option<String>,
}

/// A card this client holds with its PAN and CVV, not yet charged or voided.
#[derive(Debug)]
struct Card {
    id: String,
    secrets: Value,
    cap_cents: i64,
    merchant: String,
    expires_at_ms: u64,
}

/// One client thread: an agent proposing spends, which also plays the card
/// network (charging its cards) and the operator (voiding them, funding the
/// wallet). It remembers everything the daemon acknowledged.
struct Client {
    name: String,
    agent: AgentToken,
    rng: XorShift,
    n: u64,
    acked: Vec<Acked>,
    in_doubt: Option<InDoubt>,
    deposits: Vec<Deposit>,
    deposit_in_doubt: Option<Deposit>,
    cards: Vec<Card>,
    /// Approved charges: card id, amount.
    charged: Vec<(String, i64)>,
    voided: Vec<String>,
    requests: usize,
    /// Denials by their first reason's policy (or reason).
    denials: HashMap<String, usize>,
    /// Unanswered proposals found committed after the crash, and not.
    in_doubt_committed: usize,
    in_doubt_lost: usize,
    problems: Vec<String>,
}

impl Client {
    fn new(name: String, agent: AgentToken, seed: u64) -> Client {
        Client {
            name,
            agent,
            rng: XorShift::new(seed),
            n: 0,
            acked: Vec::new(),
            in_doubt: None,
            deposits: Vec::new(),
            deposit_in_doubt: None,
            cards: Vec::new(),
            charged: Vec::new(),
            voided: Vec::new(),
            requests: 0,
            denials: HashMap::new(),
            in_doubt_committed: 0,
            in_doubt_lost: 0,
            problems: Vec::new(),
        }
    }

    fn below(&mut self, n: u64) -> u64 {
        self.rng.next() % n
    }

    /// Until `stop`, or until the daemon stops answering.
    fn load(&mut self, w: &Wallet, stop: &AtomicBool) {
        while !stop.load(Ordering::SeqCst) {
            let roll = self.below(100);
            let answered = if roll < 3 {
                self.deposit(w)
            } else if !self.cards.is_empty() && roll < 40 {
                self.charge(w)
            } else if !self.cards.is_empty() && roll < 48 {
                self.void(w)
            } else {
                self.propose(w)
            };
            if !answered {
                return;
            }
            self.requests += 1;
        }
    }

    fn deposit(&mut self, w: &Wallet) -> bool {
        self.n += 1;
        let d = Deposit {
            key: format!("{}-dep-{}", self.name, self.n),
            cents: 10_000 + self.below(20_001) as i64,
            id: None,
        };
        match send_deposit(w, &d) {
            Err(_) => {
                self.deposit_in_doubt = Some(d);
                false
            }
            Ok(reply) => {
                self.accept_deposit(d, &reply);
                true
            }
        }
    }

    fn accept_deposit(&mut self, mut d: Deposit, reply: &Reply) {
        if reply.status != 201 || reply.json["amount"] != dollars(d.cents).as_str() {
            self.problems.push(format!(
                "deposit `{}` of {}: {} {}",
                d.key,
                dollars(d.cents),
                reply.status,
                reply.text
            ));
            return;
        }
        d.id = reply.json["id"].as_str().map(str::to_owned);
        self.deposits.push(d);
    }

    fn take_card(&mut self) -> Card {
        let i = self.below(self.cards.len() as u64) as usize;
        self.cards.swap_remove(i)
    }

    fn charge(&mut self, w: &Wallet) -> bool {
        let card = self.take_card();
        let amount =
            if self.below(10) < 7 { card.cap_cents } else { 1 + self.below(card.cap_cents as u64) as i64 };
        let mut body = card.secrets.clone();
        body["amount"] = json!(dollars(amount));
        body["currency"] = json!("USD");
        body["merchant_id"] = json!(card.merchant);
        let sent = w.try_send(
            "POST",
            "/v1/network/authorizations",
            Some(&bearer(&w.network)),
            &[],
            Body::Json(body),
        );
        // No answer: whatever the daemon committed, the check after the
        // crash finds the card used or not, both consistent.
        let Ok(reply) = sent else { return false };
        match (reply.status, &reply.json["approved"], reply.json["decline_code"].as_str()) {
            (200, Value::Bool(true), _) => self.charged.push((card.id, amount)),
            (200, Value::Bool(false), Some("card_expired")) if now_ms() >= card.expires_at_ms => {}
            _ => self.problems.push(format!(
                "charging {} on card {} (expires at {} ms, now {} ms): {} {}",
                dollars(amount),
                card.id,
                card.expires_at_ms,
                now_ms(),
                reply.status,
                reply.text
            )),
        }
        true
    }

    fn void(&mut self, w: &Wallet) -> bool {
        let card = self.take_card();
        let path = format!("/v1/cards/{}/void", card.id);
        let Ok(reply) = w.try_send("POST", &path, Some(&bearer(&w.operator)), &[], Body::Json(json!({})))
        else {
            return false;
        };
        match reply.status {
            200 if reply.json["state"] == "voided" => self.voided.push(card.id),
            // Only a card past its life may already be closed.
            409 if now_ms() >= card.expires_at_ms => {}
            _ => self.problems.push(format!("voiding card {}: {} {}", card.id, reply.status, reply.text)),
        }
        true
    }

    fn propose(&mut self, w: &Wallet) -> bool {
        self.n += 1;
        let key = format!("{}-{}", self.name, self.n);
        let amount = 100 + self.below(5_901) as i64;
        let (merchant, mcc) = MERCHANTS[self.below(MERCHANTS.len() as u64) as usize];
        let purpose = format!("crash test {key}");
        let mut body = proposal(&dollars(amount), merchant, mcc);
        body["purpose"] = json!(purpose);
        let p = Proposal { key, purpose, body };
        match send_proposal(w, &self.agent, &p) {
            Err(_) => {
                self.in_doubt = Some(InDoubt { proposal: p, committed: None });
                false
            }
            Ok(reply) => {
                self.accept(p, &reply, false);
                true
            }
        }
    }

    /// Record an answered proposal. `replay`: the answer must be the first
    /// attempt's (no card secrets); otherwise it must be a fresh answer.
    fn accept(&mut self, p: Proposal, reply: &Reply, replay: bool) {
        let v = &reply.json;
        let status = v["status"].as_str().unwrap_or_default().to_owned();
        let card = &v["card"];
        let fine = reply.status == 201
            && v["id"].is_string()
            && match status.as_str() {
                "approved" => card["id"].is_string() && (card["pan"].is_string() != replay),
                "denied" => card.is_null() && v["reasons"].as_array().is_some_and(|r| !r.is_empty()),
                _ => false,
            };
        if !fine {
            let which = if replay { "a replay of" } else { "proposing" };
            self.problems.push(format!("{which} `{}`: {} {}", p.key, reply.status, reply.text));
            return;
        }
        let card_id = card["id"].as_str().map(str::to_owned);
        let mut cap_cents = None;
        if !replay && let Some(id) = &card_id {
            let cap = to_cents(card["limit"].as_str().unwrap_or("0"));
            cap_cents = Some(cap);
            let secrets = json!({
                "pan": card["pan"], "cvv": card["cvv"], "exp_month": card["exp_month"], "exp_year": card["exp_year"],
            });
            let merchant = p.body["merchant"]["id"].as_str().unwrap().to_owned();
            self.cards.push(Card {
                id: id.clone(),
                secrets,
                cap_cents: cap,
                merchant,
                expires_at_ms: expires_at_ms(card),
            });
        }
        let spend_id = v["id"].as_str().unwrap().to_owned();
        if !replay && status == "denied" {
            let reason = v["reasons"][0].as_str().unwrap_or_default();
            let why = reason.split_once(':').map_or(reason, |(policy, _)| policy);
            *self.denials.entry(why.to_owned()).or_default() += 1;
        }
        let answered_at_ms = now_ms();
        self.acked.push(Acked { proposal: p, spend_id, status, card_id, cap_cents, answered_at_ms });
    }

    /// After a restart: resend what had no answer, with the same keys, and
    /// replay a few answered proposals and a deposit.
    fn recover(&mut self, w: &Wallet) {
        if let Some(d) = self.in_doubt.take() {
            if d.committed.is_some() {
                self.in_doubt_committed += 1;
            } else {
                self.in_doubt_lost += 1;
            }
            match send_proposal(w, &self.agent, &d.proposal) {
                Err(e) => self.problems.push(format!("retrying `{}` after the restart: {e}", d.proposal.key)),
                Ok(reply) => {
                    let id = reply.json["id"].as_str().unwrap_or_default();
                    match &d.committed {
                        Some(first) if first != id => self.problems.push(format!(
                            "`{}` was committed as {first} before the crash, but its retry answered {}",
                            d.proposal.key, reply.text
                        )),
                        _ => self.accept(d.proposal, &reply, d.committed.is_some()),
                    }
                }
            }
        }
        if let Some(d) = self.deposit_in_doubt.take() {
            match send_deposit(w, &d) {
                Err(e) => self.problems.push(format!("retrying deposit `{}` after the restart: {e}", d.key)),
                Ok(reply) => self.accept_deposit(d, &reply),
            }
        }
        for _ in 0..REPLAYS.min(self.acked.len()) {
            let i = self.below(self.acked.len() as u64) as usize;
            let (p, first) = (self.acked[i].proposal.clone(), &self.acked[i]);
            let (id, status, card_id) = (first.spend_id.clone(), first.status.clone(), first.card_id.clone());
            let problem = match send_proposal(w, &self.agent, &p) {
                Err(e) => Some(e),
                Ok(reply) => {
                    let v = &reply.json;
                    let same = reply.status == 201
                        && v["id"] == id.as_str()
                        && v["status"] == status.as_str()
                        && v["card"]["id"].as_str() == card_id.as_deref()
                        && v["card"].get("pan").is_none();
                    (!same).then(|| format!("{} {}", reply.status, reply.text))
                }
            };
            if let Some(problem) = problem {
                self.problems.push(format!(
                    "replaying `{}` (first answered {id}, {status}, card {card_id:?}): {problem}",
                    p.key
                ));
            }
        }
        if !self.deposits.is_empty() {
            let i = self.below(self.deposits.len() as u64) as usize;
            let d = self.deposits[i].clone();
            match send_deposit(w, &d) {
                Ok(reply) if reply.status == 201 && reply.json["id"].as_str() == d.id.as_deref() => {}
                Ok(reply) => self.problems.push(format!(
                    "replaying deposit `{}` (first {:?}): {} {}",
                    d.key, d.id, reply.status, reply.text
                )),
                Err(e) => self.problems.push(format!("replaying deposit `{}`: {e}", d.key)),
            }
        }
    }
}

fn send_proposal(w: &Wallet, agent: &AgentToken, p: &Proposal) -> Result<Reply, String> {
    w.try_send(
        "POST",
        "/v1/spends",
        Some(&bearer(&agent.token)),
        &[("Idempotency-Key", &p.key)],
        Body::Json(p.body.clone()),
    )
}

fn send_deposit(w: &Wallet, d: &Deposit) -> Result<Reply, String> {
    w.try_send(
        "POST",
        "/v1/wallet/deposits",
        Some(&bearer(&w.operator)),
        &[("Idempotency-Key", &d.key)],
        Body::Json(json!({"amount": dollars(d.cents), "currency": "USD"})),
    )
}

// ---- a run ---------------------------------------------------------------------------

/// An agent's spend limit: cents per window.
#[derive(Debug, Clone, Copy)]
struct Limit {
    cents: i64,
    window_ms: u64,
}

impl Limit {
    fn config(self) -> Value {
        json!({"limit": dollars(self.cents), "currency": "USD", "window": format!("{}s", self.window_ms / 1000)})
    }
}

/// The agents: a name, their policies, and their spend limit.
fn agents() -> Vec<(&'static str, Value, Limit)> {
    let day = 86_400_000;
    let loose = Limit { cents: 100_000_000, window_ms: day };
    // A limit the load keeps hitting, in a window that keeps rolling on.
    let tight = Limit { cents: 20_000, window_ms: 2_000 };
    vec![
        (
            "capped",
            json!([
                {"policy": "spend-limit", "config": loose.config()},
                {"policy": "purchase-cap", "config": {"cap": "40.00", "currency": "USD", "ttl_seconds": 2}},
            ]),
            loose,
        ),
        // Two clients race this agent's tight limit.
        ("tight", json!([{"policy": "spend-limit", "config": tight.config()}]), tight),
        ("plain", json!([{"policy": "spend-limit", "config": loose.config()}]), loose),
    ]
}

/// Which agent each client thread speaks for.
const CLIENT_AGENTS: [usize; 4] = [0, 1, 1, 2];

/// The audit chain as last seen: its length and last hash.
#[derive(Default)]
struct Chain {
    len: u64,
    last_hash: Option<String>,
}

/// What a failed check prints: how to replay it, and the daemon's last words.
fn fail(w: &Wallet, seed: u64, when: &str, problems: &[String]) -> ! {
    let log = std::fs::read_to_string(&w.log).unwrap_or_default();
    let tail: Vec<&str> = log.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect();
    panic!(
        "{when}, seed {seed} (rerun with SPENDGUARD_SEED={seed}): {} problem(s):\n  {}\nthe daemon's log ends:\n{}",
        problems.len(),
        problems.iter().take(30).cloned().collect::<Vec<_>>().join("\n  "),
        tail.join("\n")
    );
}

fn crash_run(kind: Kind, run: u64, seed: u64) -> String {
    let mut rng = XorShift::new(seed);
    let mut w = Wallet::on(kind);
    w.upload("spend-limit", "spend-limit");
    w.upload("purchase-cap", "purchase-cap");
    let specs = agents();
    let tokens: Vec<AgentToken> =
        specs.iter().map(|(name, policies, _)| w.create_agent(name, policies.clone())).collect();
    let mut clients: Vec<Client> = CLIENT_AGENTS
        .iter()
        .enumerate()
        .map(|(i, &a)| Client::new(format!("r{run}c{i}"), tokens[a].clone(), rng.next()))
        .collect();
    // The opening deposit, recorded like the clients' ones.
    let opening = Deposit { key: format!("r{run}-opening"), cents: 200_000, id: None };
    let reply = send_deposit(&w, &opening).unwrap();
    clients[0].accept_deposit(opening, &reply);
    // Short card lives and quick sweeps, so that cards expire under test.
    let config = w.log.with_file_name("serve.toml");
    std::fs::write(
        &config,
        format!(
            "card_ttl_seconds = {CARD_TTL_SECONDS}\nsweep_interval_ms = {SWEEP_INTERVAL_MS}\n{}",
            crate::support::NO_RATE_LIMIT
        ),
    )
    .unwrap();
    let config = path(&config).to_owned();
    w.stop();
    w.restart_with(&["--config", &config]);

    let limits: HashMap<String, Limit> =
        tokens.iter().zip(&specs).map(|(t, s)| (t.id.clone(), s.2)).collect();
    let mut chain = Chain::default();
    let mut kills = Vec::new();
    for cycle in 0..CYCLES {
        let delay = KILL_AFTER_MS.0 + rng.next() % (KILL_AFTER_MS.1 - KILL_AFTER_MS.0 + 1);
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            for c in &mut clients {
                let (w, stop) = (&w, &stop);
                s.spawn(move || c.load(w, stop));
            }
            std::thread::sleep(Duration::from_millis(delay));
            w.daemon.kill9();
            stop.store(true, Ordering::SeqCst);
        });
        let status = w.daemon.reap();
        kills.push(delay);
        let when = format!("run {run}, after kill {} ({delay} ms into the load)", cycle + 1);
        if status.signal() != Some(9) {
            fail(&w, seed, &when, &[format!("the daemon ended by itself before the kill: {status}")]);
        }
        let mut problems: Vec<String> = clients.iter_mut().flat_map(|c| c.problems.drain(..)).collect();
        problems.extend(check_at_rest(&w, &mut clients, &limits, &mut chain, false));
        if !problems.is_empty() {
            fail(&w, seed, &when, &problems);
        }

        let restarted_at = now_ms();
        w.restart_with(&["--config", &config]);
        let mut problems = check_expired(&w, restarted_at);
        let verify = w.read("/v1/audit/verify");
        if verify["ok"] != true || verify["records"].as_u64().is_none_or(|n| n < chain.len) {
            problems.push(format!("after the restart the daemon's audit verification says {verify}"));
        }
        for c in &mut clients {
            c.recover(&w);
        }
        problems.extend(clients.iter_mut().flat_map(|c| c.problems.drain(..)));
        if !problems.is_empty() {
            fail(&w, seed, &format!("{when}, after the restart"), &problems);
        }
    }

    // The end: every card's life runs out, every hold is released.
    let last_expiry = clients.iter().flat_map(|c| &c.cards).map(|c| c.expires_at_ms).max().unwrap_or(0);
    let deadline = Instant::now()
        + Duration::from_millis(last_expiry.saturating_sub(now_ms()))
        + Duration::from_secs(CARD_TTL_SECONDS + 5);
    let deposited: i64 = clients.iter().flat_map(|c| &c.deposits).map(|d| d.cents).sum();
    let wallet = loop {
        let wallet = w.read("/v1/wallet");
        let held = wallet["balances"][0]["held"].as_str().map(to_cents);
        if held == Some(0) || Instant::now() > deadline {
            break wallet;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let balance = |k: &str| wallet["balances"][0][k].as_str().map_or(-1, to_cents);
    let mut problems = Vec::new();
    if balance("held") != 0 || balance("available") + balance("spent") != deposited {
        problems.push(format!(
            "once every card's life is over: {wallet}, expected nothing held and {} available + spent",
            dollars(deposited)
        ));
    }
    w.stop();
    problems.extend(check_at_rest(&w, &mut clients, &limits, &mut chain, true));
    if !problems.is_empty() {
        fail(&w, seed, &format!("run {run}, at the end"), &problems);
    }
    let acked: usize = clients.iter().map(|c| c.acked.len()).sum();
    let requests: usize = clients.iter().map(|c| c.requests).sum();
    let cards: usize = clients.iter().flat_map(|c| &c.acked).filter(|a| a.card_id.is_some()).count();
    let charged: usize = clients.iter().map(|c| c.charged.len()).sum();
    let voided: usize = clients.iter().map(|c| c.voided.len()).sum();
    let committed: usize = clients.iter().map(|c| c.in_doubt_committed).sum();
    let lost: usize = clients.iter().map(|c| c.in_doubt_lost).sum();
    let mut denials = std::collections::BTreeMap::new();
    for (why, n) in clients.iter().flat_map(|c| &c.denials) {
        *denials.entry(why.as_str()).or_insert(0) += n;
    }
    format!(
        "{} kills (after {kills:?} ms), {requests} answered requests, {acked} proposals answered \
         ({cards} cards, denials {denials:?}), {charged} charges, {voided} voids, unanswered proposals \
         {committed} committed and {lost} not, {} audit records, {} deposited",
        kills.len(),
        chain.len,
        dollars(deposited)
    )
}

// ---- the checks ------------------------------------------------------------------------

fn open(w: &Wallet) -> std::sync::Arc<dyn spendguard::storage::Backend> {
    w.store()
}

/// Everything that must hold of the database of a stopped (or killed)
/// daemon. Also tells each client whether its unanswered proposal was
/// committed. `end`: every deposit was answered and every card's life is over.
fn check_at_rest(
    w: &Wallet,
    clients: &mut [Client],
    limits: &HashMap<String, Limit>,
    chain: &mut Chain,
    end: bool,
) -> Vec<String> {
    let db = open(w);
    let mut problems = Vec::new();
    if let Err(e) = db.check_invariants() {
        problems.push(format!("a ledger invariant fails: {e}"));
    }
    match db.verify_audit(None) {
        Ok(Ok(head)) if head.records >= chain.len => {}
        Ok(Ok(head)) => {
            problems.push(format!("the audit chain shrank from {} to {} records", chain.len, head.records))
        }
        Ok(Err(e)) => problems.push(format!("the audit chain breaks: {e:?}")),
        Err(e) => problems.push(format!("the audit chain cannot be read: {e}")),
    }
    let records = db.audit_records(0, usize::MAX).unwrap();
    if let Some(hash) = &chain.last_hash {
        let kept = records.get(usize::try_from(chain.len).unwrap() - 1).map(|r| &r.hash);
        if kept != Some(hash) {
            problems.push(format!("audit record {} changed or vanished across the crash", chain.len));
        }
    }
    chain.len = records.len() as u64;
    chain.last_hash = records.last().map(|r| r.hash.clone());

    // What the audit trail says.
    let mut spend_records: HashMap<String, Value> = HashMap::new();
    let mut audited_cards = BTreeSet::new();
    let mut captured_in_audit = BTreeSet::new();
    let mut voided_in_audit = BTreeSet::new();
    for r in &records {
        let v: Value = serde_json::from_str(&r.record).unwrap_or(Value::Null);
        let card = v["card_id"].as_str().map(str::to_owned);
        match r.kind.as_str() {
            "spend" => {
                audited_cards.extend(card);
                spend_records.insert(v["spend_id"].as_str().unwrap_or_default().to_owned(), v);
            }
            "authorization" if v["approved"] == true => captured_in_audit.extend(card),
            "card_void" => voided_in_audit.extend(card),
            _ => {}
        }
    }

    // Every spend and card, against the audit trail and each other.
    let spends = db.spends(None, usize::MAX).unwrap();
    let cards = db.cards(None).unwrap();
    let card_by_id: HashMap<&str, _> = cards.iter().map(|c| (c.id.as_str(), c)).collect();
    let mut by_purpose: HashMap<&str, &str> = HashMap::new();
    for s in &spends {
        if let Some(other) = by_purpose.insert(&s.purpose, &s.id) {
            problems
                .push(format!("one idempotency key made two spends, {other} and {} ({})", s.id, s.purpose));
        }
        match spend_records.get(&s.id) {
            None => problems.push(format!("spend {} has no audit record", s.id)),
            Some(r)
                if r["decision"] != s.status.as_str() || r["card_id"].as_str() != s.card_id.as_deref() =>
            {
                problems.push(format!(
                    "spend {} ({:?}, card {:?}) has the audit record {r}",
                    s.id, s.status, s.card_id
                ));
            }
            Some(_) => {}
        }
        if let Some(card) = &s.card_id
            && !card_by_id.contains_key(card.as_str())
        {
            problems.push(format!("spend {} names card {card}, which does not exist", s.id));
        }
    }
    let spend_by_id: HashMap<&str, _> = spends.iter().map(|s| (s.id.as_str(), s)).collect();
    let mut open_caps = 0;
    for c in &cards {
        let spend = spend_by_id.get(c.spend_id.as_str());
        if spend.is_none_or(|s| s.card_id.as_deref() != Some(&c.id) || s.status.as_str() != "approved") {
            problems.push(format!("card {} does not belong to an approved spend: {:?}", c.id, spend));
        }
        if !audited_cards.contains(&c.id) {
            problems.push(format!("card {} has no audit record", c.id));
        }
        let cap = c.cap.units();
        let state_recorded = match c.state {
            CardState::Open => {
                open_caps += cap;
                true
            }
            CardState::Used => captured_in_audit.contains(&c.id),
            CardState::Voided => voided_in_audit.contains(&c.id),
            CardState::Expired => true,
        };
        if !state_recorded {
            problems.push(format!("card {} is {} with no audit record of it", c.id, c.state));
        }
        if end && c.state == CardState::Open {
            problems.push(format!("card {} is still open after its life ({} ms)", c.id, c.expires_at_ms));
        }
    }
    // Every hold has its card (no approvals here, so no hold waits for one).
    let balances = db.balances().unwrap();
    let usd = balances.iter().find(|b| b.currency == "USD");
    let (held, total) = usd.map_or((0, 0), |b| (b.held, b.available + b.held + b.spent));
    if held != open_caps {
        problems.push(format!("{held} cents held, but the open cards' caps add up to {open_caps}"));
    }
    let answered: HashMap<&str, u64> =
        clients.iter().flat_map(|c| &c.acked).map(|a| (a.spend_id.as_str(), a.answered_at_ms)).collect();
    problems.extend(check_limits(&records, &spend_by_id, &card_by_id, &answered, limits));

    // What the clients were told.
    let deposited: i64 = clients.iter().flat_map(|c| &c.deposits).map(|d| d.cents).sum();
    let in_doubt: i64 = clients.iter().flat_map(|c| &c.deposit_in_doubt).map(|d| d.cents).sum();
    if total < deposited || total > deposited + in_doubt || (end && total != deposited) {
        problems.push(format!(
            "{total} cents deposited in the ledger; {deposited} acknowledged, {in_doubt} unanswered"
        ));
    }
    for client in clients.iter_mut() {
        for a in &client.acked {
            let got = spend_by_id.get(a.spend_id.as_str());
            let fine = got.is_some_and(|s| {
                s.status.as_str() == a.status
                    && s.card_id == a.card_id
                    && s.purpose == a.proposal.purpose
                    && s.agent_id == client.agent.id
            });
            if !fine {
                problems.push(format!(
                    "acknowledged `{}` ({}, {}, card {:?}) is now {got:?}",
                    a.proposal.key, a.spend_id, a.status, a.card_id
                ));
            }
            if let (Some(card), Some(cap)) = (&a.card_id, a.cap_cents)
                && card_by_id.get(card.as_str()).is_none_or(|c| c.cap.units() != cap)
            {
                problems.push(format!("acknowledged card {card} of {} is not there as issued", dollars(cap)));
            }
        }
        for (card, amount) in &client.charged {
            let c = card_by_id.get(card.as_str());
            if c.is_none_or(|c| c.state != CardState::Used || c.captured_units != Some(*amount)) {
                problems.push(format!(
                    "an approved charge of {} on card {card} is lost: {c:?}",
                    dollars(*amount)
                ));
            }
        }
        for card in &client.voided {
            let c = card_by_id.get(card.as_str());
            if c.is_none_or(|c| c.state != CardState::Voided) {
                problems.push(format!("an acknowledged void of card {card} is lost: {c:?}"));
            }
        }
        if let Some(d) = &mut client.in_doubt {
            d.committed = by_purpose.get(d.proposal.purpose.as_str()).map(|id| (*id).to_owned());
        }
    }
    problems
}

/// No approval passed its agent's spend limit: when each approved spend
/// committed, what its agent had committed before in the spend's window
/// (open holds, captures) plus its card was within the limit.
///
/// The audit trail gives the commit order (a spend's, a capture's and a
/// void's record are written in their own transaction). An earlier card
/// counts its cap while it was still open when the spend committed: not
/// yet captured or voided by then, and not expired, which is certain only
/// when the spend's answer came before the card's life ended (expiries
/// leave no audit record); otherwise it counts what it captured before, or
/// nothing. A lower bound of what the policy had to count, so never a false
/// alarm.
fn check_limits(
    records: &[AuditRecord],
    spends: &HashMap<&str, &SpendRecord>,
    cards: &HashMap<&str, &CardRecord>,
    answered: &HashMap<&str, u64>,
    limits: &HashMap<String, Limit>,
) -> Vec<String> {
    // Where each card was captured or voided in the trail.
    let mut closed_at: HashMap<&str, u64> = HashMap::new();
    let parsed: Vec<(&AuditRecord, Value)> =
        records.iter().map(|r| (r, serde_json::from_str(&r.record).unwrap_or(Value::Null))).collect();
    for (r, v) in &parsed {
        let closes = (r.kind == "authorization" && v["approved"] == true) || r.kind == "card_void";
        if closes && let Some(card) = v["card_id"].as_str().and_then(|id| cards.get_key_value(id)) {
            closed_at.insert(card.0, r.seq);
        }
    }
    let mut problems = Vec::new();
    // Per agent, the approved spends so far: their spend and card.
    let mut before: HashMap<&str, Vec<(&SpendRecord, &CardRecord)>> = HashMap::new();
    for (r, v) in parsed.iter().filter(|(r, _)| r.kind == "spend") {
        let (Some(spend), Some(card)) = (v["spend_id"].as_str(), v["card_id"].as_str()) else { continue };
        let (Some(&spend), Some(&card)) = (spends.get(spend), cards.get(card)) else { continue };
        let Some(limit) = limits.get(&spend.agent_id) else { continue };
        let since = spend.received_at_ms.saturating_sub(limit.window_ms);
        let committed_by = answered.get(spend.id.as_str()).copied();
        let earlier = before.entry(spend.agent_id.as_str()).or_default();
        let mut counted = Vec::new();
        for (s, c) in earlier.iter().filter(|(s, _)| s.received_at_ms >= since) {
            let closed_before = closed_at.get(c.id.as_str()).is_some_and(|&seq| seq < r.seq);
            let units = if closed_before {
                if c.state == CardState::Used { c.captured_units.unwrap_or(0) } else { 0 }
            } else if c.state != CardState::Expired || committed_by.is_some_and(|at| at < c.expires_at_ms) {
                c.cap.units()
            } else {
                0
            };
            if units > 0 {
                counted.push((s.id.as_str(), units));
            }
        }
        let in_window: i64 = counted.iter().map(|(_, n)| n).sum();
        if in_window + card.cap.units() > limit.cents {
            problems.push(format!(
                "spend {} of {} was approved with {} already committed in its window ({counted:?}): \
                 over the limit of {} per {} ms",
                spend.id,
                dollars(card.cap.units()),
                dollars(in_window),
                dollars(limit.cents),
                limit.window_ms
            ));
        }
        earlier.push((spend, card));
    }
    problems
}

/// Right after a restart: no card whose life ended before it still holds
/// money (the daemon sweeps before it accepts the first request).
fn check_expired(w: &Wallet, restarted_at: u64) -> Vec<String> {
    let db = open(w);
    db.cards(None)
        .unwrap()
        .iter()
        .filter(|c| c.state == CardState::Open && c.expires_at_ms < restarted_at)
        .map(|c| {
            format!(
                "card {} expired at {} ms, yet is still open after a restart at {restarted_at} ms",
                c.id, c.expires_at_ms
            )
        })
        .collect()
}

on_each_backend!(crashes_lose_nothing);
