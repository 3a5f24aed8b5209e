//! The daemon over real HTTP, as its users drive it: `spendguard init`, then
//! `spendguard serve` as a child process on a free port, spoken to with bearer
//! tokens by an operator, by agents and by the card network.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::guests;

/// How long `serve` may take to say it listens (it compiles nothing at start,
/// but this machine builds other things while the tests run).
pub(crate) const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a daemon sent SIGTERM may take to exit.
pub(crate) const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// What `serve` prints on stdout once it accepts connections.
pub(crate) const LISTENING: &str = "spendguard listening on ";

pub(crate) fn spendguard() -> Command {
    Command::new(env!("CARGO_BIN_EXE_spendguard"))
}

pub(crate) fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

// ---- the daemon process -----------------------------------------------------

/// A running `spendguard serve`, killed and reaped when dropped, so a failing
/// test leaves no daemon behind.
pub(crate) struct Daemon {
    pub(crate) child: Child,
    pub(crate) url: String,
    pub(crate) log: PathBuf,
}

impl Daemon {
    /// Start `serve` on a free port and wait until it says where it listens.
    pub(crate) fn start(data: &Path, log: &Path) -> Daemon {
        Daemon::start_with(data, log, &[])
    }

    /// [`Daemon::start`] with more arguments for `serve` (`--config FILE`).
    pub(crate) fn start_with(data: &Path, log: &Path, args: &[&str]) -> Daemon {
        let stderr = OpenOptions::new().create(true).append(true).open(log).expect("log file opens");
        let mut child = spendguard()
            .args(["serve", "--data-dir", path(data), "--listen", "127.0.0.1:0"])
            .args(args)
            .env_remove("SPENDGUARD_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .spawn()
            .expect("`spendguard serve` starts");
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        // Reads stdout to its end, so the daemon never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(url) = line.strip_prefix(LISTENING)
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(url.trim().to_owned());
                }
            }
        });
        let mut daemon = Daemon { child, url: String::new(), log: log.to_path_buf() };
        match rx.recv_timeout(STARTUP_TIMEOUT) {
            Ok(url) => daemon.url = url,
            Err(RecvTimeoutError::Timeout) => panic!(
                "`spendguard serve` did not print `{LISTENING}URL` within {STARTUP_TIMEOUT:?}; its log:\n{}",
                daemon.log()
            ),
            Err(RecvTimeoutError::Disconnected) => {
                let status = daemon.child.wait().expect("the daemon is reaped");
                panic!("`spendguard serve` exited ({status}) before it listened; its log:\n{}", daemon.log())
            }
        }
        daemon
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub(crate) fn pid(&self) -> String {
        self.child.id().to_string()
    }

    /// SIGKILL, as a crash or the OOM killer ends it: no chance to finish
    /// anything. Only sends the signal (so another thread can crash the
    /// daemon while clients talk to it); [`Daemon::reap`] waits for it.
    pub(crate) fn kill9(&self) {
        let kill = Command::new("kill").args(["-KILL", &self.pid()]).status().expect("`kill` runs");
        assert!(kill.success(), "`kill -KILL {}` failed", self.pid());
    }

    /// Wait for a killed daemon to exit; how it exited.
    pub(crate) fn reap(&mut self) -> ExitStatus {
        self.child.wait().expect("the daemon can be waited for")
    }

    /// SIGTERM, as a service manager stops it; how it exited.
    pub(crate) fn terminate(&mut self) -> ExitStatus {
        let kill = Command::new("kill").args(["-TERM", &self.pid()]).status().expect("`kill` runs");
        assert!(kill.success(), "`kill -TERM {}` failed", self.pid());
        let deadline = Instant::now() + SHUTDOWN_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("the daemon can be waited for") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not exit within {SHUTDOWN_TIMEOUT:?} of SIGTERM; its log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---- HTTP ---------------------------------------------------------------------

/// A request body.
#[derive(Debug, Clone)]
pub(crate) enum Body {
    None,
    Json(Value),
    /// Sent as JSON, whatever it holds (for malformed JSON).
    Text(&'static str),
    /// A policy module, or whatever stands in for one.
    Module(Vec<u8>),
    /// A module sent as over a slow uplink: the daemon has read the headers
    /// (and may have answered) before the first byte of the body leaves.
    SlowModule(Vec<u8>),
}

/// How long a [`Body::SlowModule`] waits before its first byte: far longer
/// than the daemon takes to answer a request from its headers alone.
pub(crate) const SLOW_UPLINK_DELAY: Duration = Duration::from_millis(300);

/// A reader that waits [`SLOW_UPLINK_DELAY`] before its first byte.
pub(crate) struct SlowReader {
    pub(crate) waited: bool,
    pub(crate) bytes: std::io::Cursor<Vec<u8>>,
}

impl std::io::Read for SlowReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if !self.waited {
            self.waited = true;
            std::thread::sleep(SLOW_UPLINK_DELAY);
        }
        self.bytes.read(buf)
    }
}

/// A response: its status, and its body as JSON (`Null` when it is not).
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) json: Value,
    pub(crate) text: String,
}

impl Reply {
    /// The JSON body, after checking the status.
    pub(crate) fn expect(self, status: u16, what: &str) -> Value {
        assert_eq!(self.status, status, "{what}: {}", self.text);
        self.json
    }

    /// Check a refusal: its status and its error code, with a message.
    #[track_caller]
    pub(crate) fn refused(&self, status: u16, code: &str, what: &str) {
        if let Err(e) = self.check(status, Some(code)) {
            panic!("{what}: {e}");
        }
    }

    /// The status is `status`; for a refusal (`code` given) the body is
    /// `{"error": {"code": code, "message": "…"}}`.
    /// An empty `code` stands for any code (where the spec names none).
    pub(crate) fn check(&self, status: u16, code: Option<&str>) -> Result<(), String> {
        let got = &self.json["error"];
        let code_fits = |c: &str| {
            got["code"].as_str().is_some_and(|got| if c.is_empty() { !got.is_empty() } else { got == c })
        };
        let fine = self.status == status
            && code.is_none_or(|c| code_fits(c) && got["message"].as_str().is_some_and(|m| !m.is_empty()));
        if fine {
            Ok(())
        } else {
            let wanted = match code {
                None => String::new(),
                Some("") => " with a JSON error".to_owned(),
                Some(c) => format!(" with error code `{c}`"),
            };
            let text = if self.text.is_empty() { "(an empty body)" } else { &self.text };
            Err(format!("expected {status}{wanted}, got {} {text}", self.status))
        }
    }
}

pub(crate) fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// An agent as the operator created it.
#[derive(Debug, Clone)]
pub(crate) struct AgentToken {
    pub(crate) id: String,
    pub(crate) token: String,
}

/// A fresh data directory with a daemon serving it, and the tokens `init`
/// printed.
pub(crate) struct Wallet {
    // Dropped first: the daemon stops before its directory is removed.
    pub(crate) daemon: Daemon,
    pub(crate) data: PathBuf,
    pub(crate) log: PathBuf,
    pub(crate) operator: String,
    pub(crate) network: String,
    pub(crate) http: ureq::Agent,
    pub(crate) _dir: tempfile::TempDir,
}

impl Wallet {
    pub(crate) fn new() -> Wallet {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("data");
        let out = spendguard()
            .args(["init", "--data-dir", path(&data), "--json"])
            .output()
            .expect("`spendguard init` runs");
        assert!(
            out.status.success(),
            "`spendguard init` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let tokens: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("`init --json` prints JSON ({e}): {}", String::from_utf8_lossy(&out.stdout))
        });
        let token = |key: &str| {
            tokens[key]
                .as_str()
                .unwrap_or_else(|| panic!("`init --json` prints `{key}`: {tokens}"))
                .to_owned()
        };
        let (operator, network) = (token("operator_token"), token("network_token"));
        assert_ne!(operator, network);
        let log = dir.path().join("daemon.log");
        let daemon = Daemon::start(&data, &log);
        let http: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .proxy(None)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        Wallet { daemon, data, log, operator, network, http, _dir: dir }
    }

    /// Stop the daemon with SIGTERM; it must exit cleanly.
    pub(crate) fn stop(&mut self) {
        let status = self.daemon.terminate();
        assert!(
            status.success(),
            "the daemon exited with {status} on SIGTERM; its log:\n{}",
            self.daemon.log()
        );
    }

    /// Serve the same data directory again (on a new port).
    pub(crate) fn restart(&mut self) {
        self.daemon = Daemon::start(&self.data, &self.log);
    }

    /// [`Wallet::restart`] with more arguments for `serve` (`--config FILE`).
    pub(crate) fn restart_with(&mut self, args: &[&str]) {
        self.daemon = Daemon::start_with(&self.data, &self.log, args);
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.daemon.url)
    }

    /// One request, `authorization` being the whole header value.
    pub(crate) fn send(
        &self,
        method: &str,
        path: &str,
        authorization: Option<&str>,
        headers: &[(&str, &str)],
        body: Body,
    ) -> Reply {
        self.try_send(method, path, authorization, headers, body).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Wallet::send`], saying so when no HTTP response could be read.
    pub(crate) fn try_send(
        &self,
        method: &str,
        path: &str,
        authorization: Option<&str>,
        headers: &[(&str, &str)],
        body: Body,
    ) -> Result<Reply, String> {
        let url = self.url(path);
        let what = format!("{method} {path}");
        let response = if method == "GET" {
            let mut req = self.http.get(&url);
            if let Some(a) = authorization {
                req = req.header("Authorization", a);
            }
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            assert!(matches!(body, Body::None), "{what}: a GET has no body");
            req.call()
        } else {
            let mut req = match method {
                "POST" => self.http.post(&url),
                "PUT" => self.http.put(&url),
                other => panic!("no method {other} in the API"),
            };
            if let Some(a) = authorization {
                req = req.header("Authorization", a);
            }
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            match body {
                Body::None => req.send_empty(),
                Body::Json(v) => req.header("Content-Type", "application/json").send(v.to_string()),
                Body::Text(t) => req.header("Content-Type", "application/json").send(t),
                Body::Module(bytes) => req.header("Content-Type", "application/wasm").send(bytes),
                Body::SlowModule(bytes) => {
                    let slow = SlowReader { waited: false, bytes: std::io::Cursor::new(bytes) };
                    req.header("Content-Type", "application/wasm")
                        .send(ureq::SendBody::from_owned_reader(slow))
                }
            }
        };
        let mut response = response.map_err(|e| format!("{what}: no HTTP response: {e}"))?;
        let status = response.status().as_u16();
        let text =
            response.body_mut().read_to_string().map_err(|e| format!("{what}: unreadable body: {e}"))?;
        let json = serde_json::from_str(&text).unwrap_or(Value::Null);
        Ok(Reply { status, json, text })
    }

    pub(crate) fn get(&self, path: &str, token: &str) -> Reply {
        self.send("GET", path, Some(&bearer(token)), &[], Body::None)
    }

    pub(crate) fn post(&self, path: &str, token: &str, body: Value) -> Reply {
        self.send("POST", path, Some(&bearer(token)), &[], Body::Json(body))
    }

    /// What the operator reads at `path`, which must answer 200.
    pub(crate) fn read(&self, path: &str) -> Value {
        self.get(path, &self.operator).expect(200, &format!("GET {path}"))
    }

    pub(crate) fn deposit(&self, amount: &str) {
        let reply =
            self.post("/v1/wallet/deposits", &self.operator, json!({"amount": amount, "currency": "USD"}));
        let d = reply.expect(201, "deposit");
        assert_eq!((&d["amount"], &d["currency"]), (&json!(amount), &json!("USD")), "{d}");
    }

    pub(crate) fn upload(&self, name: &str, package: &str) -> Value {
        let module = guests::bytes(package);
        let reply = self.send(
            "POST",
            &format!("/v1/policies?name={name}"),
            Some(&bearer(&self.operator)),
            &[],
            Body::Module(module.clone()),
        );
        let p = reply.expect(201, &format!("upload `{package}` as `{name}`"));
        assert_eq!(p["name"], name, "{p}");
        assert_eq!(p["sha256"], hex::encode(Sha256::digest(&module)), "{p}");
        p
    }

    pub(crate) fn create_agent(&self, name: &str, policies: Value) -> AgentToken {
        let reply = self.post(
            "/v1/agents",
            &self.operator,
            json!({"name": name, "labels": {}, "policies": policies}),
        );
        let a = reply.expect(201, &format!("create agent `{name}`"));
        assert_eq!(a["name"], name, "{a}");
        let field =
            |k: &str| a[k].as_str().unwrap_or_else(|| panic!("a new agent has `{k}`: {a}")).to_owned();
        AgentToken { id: field("id"), token: field("token") }
    }

    pub(crate) fn propose(&self, agent: &AgentToken, amount: &str, merchant: &str, mcc: &str) -> Reply {
        self.post("/v1/spends", &agent.token, proposal(amount, merchant, mcc))
    }

    /// A merchant's charge through the card network.
    pub(crate) fn charge(&self, card: &Value, amount: &str, merchant: &str) -> Value {
        self.charge_in(card, amount, "USD", merchant)
    }

    pub(crate) fn charge_in(&self, card: &Value, amount: &str, currency: &str, merchant: &str) -> Value {
        let body = json!({
            "pan": card["pan"], "cvv": card["cvv"], "exp_month": card["exp_month"], "exp_year": card["exp_year"],
            "amount": amount, "currency": currency, "merchant_id": merchant,
        });
        self.post("/v1/network/authorizations", &self.network, body).expect(200, "authorization")
    }

    /// The USD balances, exactly.
    #[track_caller]
    pub(crate) fn assert_wallet(&self, available: &str, held: &str, spent: &str) {
        assert_eq!(
            self.read("/v1/wallet"),
            json!({"balances": [{"currency": "USD", "available": available, "held": held, "spent": spent}]}),
        );
    }

    /// `spendguard …` as a client of this daemon, with `token`.
    pub(crate) fn cli(&self, token: &str, args: &[&str]) -> std::process::Output {
        spendguard()
            .args(args)
            .env("SPENDGUARD_URL", &self.daemon.url)
            .env("SPENDGUARD_TOKEN", token)
            .output()
            .expect("the CLI runs")
    }
}

pub(crate) fn proposal(amount: &str, merchant: &str, mcc: &str) -> Value {
    json!({
        "amount": amount, "currency": "USD",
        "merchant": {"id": merchant, "name": merchant, "mcc": mcc, "country": "US"},
        "purpose": "end-to-end test",
    })
}

pub(crate) fn approved() -> Value {
    json!({"approved": true, "decline_code": null})
}

pub(crate) fn declined(code: &str) -> Value {
    json!({"approved": false, "decline_code": code})
}

pub(crate) fn luhn_valid(pan: &str) -> bool {
    let mut sum = 0;
    for (i, b) in pan.bytes().rev().enumerate() {
        let mut d = u32::from(b - b'0');
        if i % 2 == 1 {
            d *= 2;
            if d > 9 {
                d -= 9;
            }
        }
        sum += d;
    }
    sum % 10 == 0
}

/// A card's PAN and CVV are well formed: 16 Luhn-valid digits, 3 or 4 digits.
#[track_caller]
pub(crate) fn assert_secrets(card: &Value) {
    let pan = card["pan"].as_str().unwrap_or_else(|| panic!("the card has its PAN: {card}"));
    assert!(pan.len() == 16 && pan.bytes().all(|b| b.is_ascii_digit()), "a 16-digit PAN: {pan}");
    assert!(luhn_valid(pan), "a Luhn-valid PAN: {pan}");
    let cvv = card["cvv"].as_str().unwrap_or_else(|| panic!("the card has its CVV: {card}"));
    assert!((3..=4).contains(&cvv.len()) && cvv.bytes().all(|b| b.is_ascii_digit()), "a CVV: {cvv}");
}

#[track_caller]
pub(crate) fn assert_no_secrets(card: &Value) {
    assert!(card.get("pan").is_none() && card.get("cvv").is_none(), "PAN and CVV are shown once: {card}");
}

pub(crate) fn ids(list: &Value) -> Vec<&str> {
    list.as_array().expect("a list").iter().map(|x| x["id"].as_str().expect("an id")).collect()
}

// ---- the whole flow -------------------------------------------------------------

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
    again.refused(409, "conflict", "voiding twice");
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
        "conflict",
        "approving twice",
    );
    w.post(&format!("/v1/approvals/{big_id}/deny"), &w.operator, json!({})).refused(
        409,
        "conflict",
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

// ---- who may do what --------------------------------------------------------------

/// Who calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    Nobody,
    /// The operator's own token, but not as `Bearer`.
    Malformed,
    Unknown,
    RevokedAgent,
    Network,
    OtherAgent,
    Agent,
    Operator,
}

const CALLERS: [Who; 8] = [
    Who::Nobody,
    Who::Malformed,
    Who::Unknown,
    Who::RevokedAgent,
    Who::Network,
    Who::OtherAgent,
    Who::Agent,
    Who::Operator,
];

/// One route of SPEC §9, and who gets what from it (every other caller with a
/// valid token gets 403).
struct Route {
    method: &'static str,
    path: String,
    body: Body,
    allowed: Vec<(Who, u16)>,
}

fn route(method: &'static str, path: impl Into<String>, body: Body, allowed: &[(Who, u16)]) -> Route {
    Route { method, path: path.into(), body, allowed: allowed.to_vec() }
}

#[test]
fn authority_matrix() {
    let w = Wallet::new();
    w.deposit("1000.00");
    w.upload("approval-threshold", "approval-threshold");
    let threshold =
        json!([{"policy": "approval-threshold", "config": {"threshold": "50.00", "currency": "USD"}}]);
    let alpha = w.create_agent("alpha", threshold.clone());
    let beta = w.create_agent("beta", threshold.clone());
    let revoked = w.create_agent("revoked", json!([]));
    let doomed = w.create_agent("to be revoked", json!([]));
    let r = w.post(&format!("/v1/agents/{}/revoke", revoked.id), &w.operator, json!({}));
    assert_eq!(r.expect(200, "revoke")["revoked"], true);

    let spend = w.propose(&alpha, "10.00", "api.openai.com", "5734").expect(201, "alpha proposes");
    assert_eq!(spend["status"], "approved", "{spend}");
    let (spend_id, card_id) = (spend["id"].as_str().unwrap(), spend["card"]["id"].as_str().unwrap());
    let beta_spend = w.propose(&beta, "10.00", "api.openai.com", "5734").expect(201, "beta proposes");
    let beta_card = beta_spend["card"]["id"].as_str().unwrap();
    let pending = |what| {
        let p = w.propose(&alpha, "60.00", "api.openai.com", "5734").expect(201, what);
        assert_eq!(p["status"], "pending_approval", "{p}");
        p["id"].as_str().unwrap().to_owned()
    };
    let (to_approve, to_deny) = (pending("to approve"), pending("to deny"));
    w.assert_wallet("980.00", "20.00", "0.00");

    use Who::{Agent, Network, Operator, OtherAgent};
    let operator_only = |ok: u16| vec![(Operator, ok)];
    let module = guests::bytes("approval-threshold");
    let charge = json!({"pan": "4000000000000002", "cvv": "123", "exp_month": 12, "exp_year": 2030,
                        "amount": "1.00", "currency": "USD", "merchant_id": "api.openai.com"});
    let routes = [
        route(
            "POST",
            "/v1/spends",
            Body::Json(proposal("10.00", "api.openai.com", "5734")),
            &[(Agent, 201), (OtherAgent, 201)],
        ),
        route(
            "GET",
            format!("/v1/spends/{spend_id}"),
            Body::None,
            &[(Agent, 200), (OtherAgent, 404), (Operator, 200)],
        ),
        route("GET", "/v1/spends", Body::None, &[(Agent, 200), (OtherAgent, 200), (Operator, 200)]),
        route("GET", "/v1/approvals", Body::None, &operator_only(200)),
        route("POST", format!("/v1/approvals/{to_approve}/approve"), Body::None, &operator_only(200)),
        route(
            "POST",
            format!("/v1/approvals/{to_deny}/deny"),
            Body::Json(json!({"reason": "no"})),
            &operator_only(200),
        ),
        route(
            "POST",
            "/v1/wallet/deposits",
            Body::Json(json!({"amount": "5.00", "currency": "USD"})),
            &operator_only(201),
        ),
        route("GET", "/v1/wallet", Body::None, &operator_only(200)),
        // Sent as over a slow link, where a refusal from the headers alone
        // reaches the client while it is still sending the module.
        route("POST", "/v1/policies?name=matrix", Body::SlowModule(module), &operator_only(201)),
        route("GET", "/v1/policies", Body::None, &operator_only(200)),
        route("POST", "/v1/agents", Body::Json(json!({"name": "made in the matrix"})), &operator_only(201)),
        route("GET", "/v1/agents", Body::None, &operator_only(200)),
        route("POST", format!("/v1/agents/{}/revoke", doomed.id), Body::None, &operator_only(200)),
        route(
            "PUT",
            format!("/v1/agents/{}/policies", alpha.id),
            Body::Json(json!({"policies": threshold})),
            &operator_only(200),
        ),
        route("GET", "/v1/cards", Body::None, &[(Agent, 200), (OtherAgent, 200), (Operator, 200)]),
        route("POST", format!("/v1/cards/{card_id}/void"), Body::None, &operator_only(200)),
        route("POST", "/v1/network/authorizations", Body::Json(charge), &[(Network, 200)]),
        route("GET", "/v1/audit", Body::None, &operator_only(200)),
        route("GET", "/v1/audit/verify", Body::None, &operator_only(200)),
    ];
    let unknown = format!("sg_op_{}", "0".repeat(64));
    let mut wrong = Vec::new();
    for r in &routes {
        for who in CALLERS {
            let authorization = match who {
                Who::Nobody => None,
                Who::Malformed => Some(format!("Basic {}", w.operator)),
                Who::Unknown => Some(bearer(&unknown)),
                Who::RevokedAgent => Some(bearer(&revoked.token)),
                Who::Network => Some(bearer(&w.network)),
                Who::OtherAgent => Some(bearer(&beta.token)),
                Who::Agent => Some(bearer(&alpha.token)),
                Who::Operator => Some(bearer(&w.operator)),
            };
            let allowed = r.allowed.iter().find(|(w, _)| *w == who).map(|(_, s)| *s);
            let (status, code) = match (who, allowed) {
                (Who::Nobody, _) => (401, Some("missing_token")),
                (Who::Malformed | Who::Unknown, _) => (401, Some("invalid_token")),
                (Who::RevokedAgent, _) => (401, Some("revoked_token")),
                (_, Some(404)) => (404, Some("not_found")),
                (_, Some(status)) => (status, None),
                (_, None) => (403, Some("forbidden")),
            };
            // Every cell is checked, so one run shows every wrong one.
            let checked = w
                .try_send(r.method, &r.path, authorization.as_deref(), &[], r.body.clone())
                .and_then(|reply| reply.check(status, code));
            if let Err(e) = checked {
                wrong.push(format!("{} {} by {who:?}: {e}", r.method, r.path));
            }
        }
    }
    for open in ["/healthz", "/metrics"] {
        let reply = w.send("GET", open, None, &[], Body::None);
        assert_eq!(reply.status, 200, "{open} needs no token: {}", reply.text);
    }

    // Only what the operator did with its token happened.
    w.assert_wallet("915.00", "90.00", "0.00");
    let agents = w.read("/v1/agents")["agents"].clone();
    let revoked_ids: BTreeSet<&str> = agents
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["revoked"] == true)
        .map(|a| a["id"].as_str().unwrap())
        .collect();
    assert_eq!(revoked_ids, BTreeSet::from([revoked.id.as_str(), doomed.id.as_str()]));
    assert_eq!(agents.as_array().unwrap().len(), 5);
    let versions: Vec<_> =
        w.read("/v1/policies")["policies"].as_array().unwrap().iter().map(|p| p["name"].clone()).collect();
    assert_eq!(versions, [json!("approval-threshold"), json!("matrix")]);

    // An agent sees its own spends and cards, never another's.
    let alpha_cards = w.get("/v1/cards", &alpha.token).expect(200, "alpha's cards");
    let alpha_cards = ids(&alpha_cards["cards"]);
    assert!(alpha_cards.contains(&card_id) && !alpha_cards.contains(&beta_card), "{alpha_cards:?}");
    let beta_cards = w.get("/v1/cards", &beta.token).expect(200, "beta's cards");
    let beta_cards = ids(&beta_cards["cards"]);
    assert!(beta_cards.contains(&beta_card) && !beta_cards.contains(&card_id), "{beta_cards:?}");
    for (agent, n) in [(&alpha, 4), (&beta, 2)] {
        let spends = w.get("/v1/spends", &agent.token).expect(200, "an agent's spends");
        let spends = spends["spends"].as_array().unwrap();
        assert_eq!(spends.len(), n, "{spends:?}");
        assert!(spends.iter().all(|s| s["agent_id"] == agent.id.as_str()), "{spends:?}");
    }
    // A revoked agent's token opens nothing, however it is sent.
    let r = w.get(&format!("/v1/spends/{spend_id}"), &doomed.token);
    r.refused(401, "revoked_token", "the revoked agent");

    assert!(wrong.is_empty(), "{} of the matrix wrong:\n{}", wrong.len(), wrong.join("\n"));
}

// ---- idempotency -------------------------------------------------------------------

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

// ---- bad input ------------------------------------------------------------------

#[test]
fn bad_input_changes_nothing() {
    let w = Wallet::new();
    w.deposit("100.00");
    w.upload("spend-limit", "spend-limit");
    let bot = w.create_agent(
        "bot",
        json!([{"policy": "spend-limit", "config": {"limit": "50.00", "currency": "USD"}}]),
    );
    let spend = w.propose(&bot, "10.00", "api.openai.com", "5734").expect(201, "a good proposal");
    assert_eq!(spend["status"], "approved");
    let snapshot = |w: &Wallet| {
        ["/v1/wallet", "/v1/policies", "/v1/agents", "/v1/spends", "/v1/cards", "/v1/audit?limit=1000"]
            .map(|p| (p, w.read(p)))
    };
    let before = snapshot(&w);

    let (op, agent, net) = (w.operator.clone(), bot.token.clone(), w.network.clone());
    let deposit = |amount: &str, currency: &str| Body::Json(json!({"amount": amount, "currency": currency}));
    let spend = |amount: &str, currency: &str, mcc: &str| {
        let mut p = proposal(amount, "api.openai.com", mcc);
        p["currency"] = json!(currency);
        Body::Json(p)
    };
    let mut unknown_field = proposal("1.00", "api.openai.com", "5734");
    unknown_field["merchant"]["url"] = json!("https://openai.com");
    let put_policies = format!("/v1/agents/{}/policies", bot.id);
    let cases: Vec<(&str, &str, &str, Body, u16, &str)> = vec![
        (
            &op,
            "POST",
            "/v1/wallet/deposits",
            Body::Text(r#"{"amount": "1.00", "currency": "#),
            422,
            "invalid_json",
        ),
        (&op, "POST", "/v1/wallet/deposits", Body::Text(""), 422, "invalid_json"),
        (
            &op,
            "POST",
            "/v1/wallet/deposits",
            Body::Json(json!({"amount": "1.00", "currency": "USD", "memo": "x"})),
            422,
            "invalid_json",
        ),
        (&op, "POST", "/v1/wallet/deposits", deposit("10.001", "USD"), 422, "invalid_amount"),
        (&op, "POST", "/v1/wallet/deposits", deposit("-1", "USD"), 422, "invalid_amount"),
        (&op, "POST", "/v1/wallet/deposits", deposit("0", "USD"), 422, "invalid_amount"),
        (&op, "POST", "/v1/wallet/deposits", deposit("1e3", "USD"), 422, "invalid_amount"),
        (&op, "POST", "/v1/wallet/deposits", deposit("100000000000000000000", "USD"), 422, "invalid_amount"),
        (&op, "POST", "/v1/wallet/deposits", deposit("1.00", "XYZ"), 422, "invalid_amount"),
        (
            &op,
            "POST",
            "/v1/policies?name=junk",
            Body::Module(b"not a wasm module".to_vec()),
            422,
            "invalid_policy",
        ),
        (
            &op,
            "POST",
            "/v1/policies?name=Bad%20Name",
            Body::Module(guests::bytes("spend-limit")),
            422,
            "invalid_name",
        ),
        (&op, "POST", "/v1/policies", Body::Module(guests::bytes("spend-limit")), 422, "invalid_name"),
        (
            &op,
            "POST",
            "/v1/policies?name=wrong-exports",
            Body::Module(guests::bytes("guest-wrong-exports")),
            422,
            "invalid_policy",
        ),
        (&op, "POST", "/v1/agents", Body::Json(json!({"name": "x", "colour": "red"})), 422, "invalid_json"),
        (&op, "POST", "/v1/agents", Body::Json(json!({"name": ""})), 422, "invalid_field"),
        (
            &op,
            "POST",
            "/v1/agents",
            Body::Json(json!({"name": "x", "policies": [{"policy": "no-such-policy"}]})),
            422,
            "unknown_policy",
        ),
        (
            &op,
            "POST",
            "/v1/agents",
            Body::Json(json!({"name": "x", "policies": [{"policy": "spend-limit@7"}]})),
            422,
            "unknown_policy",
        ),
        (
            &op,
            "POST",
            "/v1/agents",
            Body::Json(json!({"name": "x", "policies":
                [{"policy": "spend-limit", "config": {"limt": "50.00", "currency": "USD"}}]})),
            422,
            "invalid_config",
        ),
        (
            &op,
            "PUT",
            &put_policies,
            Body::Json(
                json!({"policies": [{"policy": "spend-limit", "config": {"limit": "-5", "currency": "USD"}}]}),
            ),
            422,
            "invalid_config",
        ),
        (&op, "PUT", "/v1/agents/ag_nobody/policies", Body::Json(json!({"policies": []})), 404, "not_found"),
        (&op, "POST", "/v1/approvals/sp_nothing/approve", Body::None, 404, "not_found"),
        (&op, "POST", "/v1/cards/card_nothing/void", Body::None, 404, "not_found"),
        (&agent, "POST", "/v1/spends", Body::Text("{\"amount\": \"10.00\""), 422, "invalid_json"),
        (&agent, "POST", "/v1/spends", Body::Json(unknown_field), 422, "invalid_json"),
        (&agent, "POST", "/v1/spends", spend("10.001", "USD", "5734"), 422, "invalid_amount"),
        (&agent, "POST", "/v1/spends", spend("-1", "USD", "5734"), 422, "invalid_amount"),
        (&agent, "POST", "/v1/spends", spend("0.00", "USD", "5734"), 422, "invalid_amount"),
        (&agent, "POST", "/v1/spends", spend("10.00", "XYZ", "5734"), 422, "invalid_amount"),
        (&agent, "POST", "/v1/spends", spend("10.00", "USD", "57a4"), 422, "invalid_field"),
        (&agent, "GET", "/v1/spends/sp_nothing", Body::None, 404, "not_found"),
        (
            &net,
            "POST",
            "/v1/network/authorizations",
            Body::Json(json!({"pan": "4111", "cvv": "123", "exp_month": 12, "exp_year": 2030,
                              "amount": "1.00", "currency": "USD", "merchant_id": "api.openai.com"})),
            422,
            "invalid_card_data",
        ),
        (
            &net,
            "POST",
            "/v1/network/authorizations",
            Body::Json(json!({"pan": "4000000000000002", "cvv": "123", "exp_month": 12, "exp_year": 2030,
                              "amount": "1.001", "currency": "USD", "merchant_id": "api.openai.com"})),
            422,
            "invalid_amount",
        ),
        (&op, "GET", "/v1/no-such-route", Body::None, 404, "not_found"),
        (
            &op,
            "POST",
            "/v1/wallet/deposits",
            Body::Json(json!({"amount": "1.00", "currency": "USD", "memo": "x".repeat(100_000)})),
            413,
            "too_large",
        ),
        // A malformed query string is invalid input like any other: a JSON
        // error (the spec names no code for it), not axum's plain text.
        (&op, "GET", "/v1/spends?limit=abc", Body::None, 422, ""),
        (&op, "GET", "/v1/spends?colour=red", Body::None, 422, ""),
        (&op, "GET", "/v1/audit?after=-1", Body::None, 422, ""),
        (&agent, "GET", "/v1/spends?limit=abc", Body::None, 422, ""),
        // A route that exists, with a method it does not have: JSON too.
        (&op, "PUT", "/v1/wallet", Body::None, 405, ""),
    ];
    // Every case is tried, so one run shows every wrong answer.
    let mut wrong = Vec::new();
    for (token, method, path, body, status, code) in cases {
        let shown = match &body {
            Body::Module(m) | Body::SlowModule(m) => format!("a {}-byte module", m.len()),
            Body::Json(v) if v.to_string().len() > 300 => "a large body".to_owned(),
            other => format!("{other:?}"),
        };
        let checked = w
            .try_send(method, path, Some(&bearer(token)), &[], body)
            .and_then(|reply| reply.check(status, Some(code)));
        if let Err(e) = checked {
            wrong.push(format!("{method} {path} with {shown}: {e}"));
        }
    }
    let after = snapshot(&w);
    for ((path, before), (_, after)) in before.iter().zip(&after) {
        assert_eq!(before, after, "{path} changed after refused requests");
    }
    w.assert_wallet("90.00", "10.00", "0.00");
    assert!(wrong.is_empty(), "{} refusals wrong:\n{}", wrong.len(), wrong.join("\n"));
}

// ---- decisions and metrics ---------------------------------------------------------

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

/// The samples of a Prometheus text exposition: (name, labels) → value.
fn samples(text: &str) -> BTreeMap<(String, BTreeMap<String, String>), f64> {
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("a sample: {line}"));
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, rest.strip_suffix('}').unwrap_or_else(|| panic!("labels: {line}"))),
            None => (series, ""),
        };
        let labels = labels
            .split(',')
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (k, v) = l.split_once('=').unwrap_or_else(|| panic!("a label: {line}"));
                (k.to_owned(), v.trim_matches('"').to_owned())
            })
            .collect();
        out.insert((name.to_owned(), labels), value.parse().unwrap_or_else(|_| panic!("a value: {line}")));
    }
    out
}

#[test]
fn metrics_count_outcomes() {
    let w = Wallet::new();
    w.deposit("100.00");
    w.upload("merchant-rules", "merchant-rules");
    w.upload("approval-threshold", "approval-threshold");
    let bot = w.create_agent(
        "bot",
        json!([
            {"policy": "merchant-rules", "config": {"block_mcc": ["7995"]}},
            {"policy": "approval-threshold", "config": {"threshold": "50.00", "currency": "USD"}},
        ]),
    );
    let unguarded = w.create_agent("unguarded", json!([]));
    let status = |r: Reply| r.expect(201, "propose")["status"].clone();
    assert_eq!(status(w.propose(&bot, "10.00", "api.openai.com", "5734")), "approved");
    assert_eq!(status(w.propose(&bot, "10.00", "bets.example.com", "7995")), "denied");
    assert_eq!(status(w.propose(&unguarded, "10.00", "api.openai.com", "5734")), "denied");
    assert_eq!(status(w.propose(&bot, "60.00", "api.openai.com", "5734")), "pending_approval");

    let reply = w.send("GET", "/metrics", None, &[], Body::None);
    assert_eq!(reply.status, 200, "{}", reply.text);
    let samples = samples(&reply.text);
    let get = |name: &str, labels: &[(&str, &str)]| {
        let labels = labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        samples.get(&(name.to_owned(), labels)).copied()
    };
    for (outcome, n) in [("approved", 1.0), ("denied", 2.0), ("pending_approval", 1.0)] {
        assert_eq!(get("spendguard_proposals_total", &[("outcome", outcome)]), Some(n), "{}", reply.text);
    }
    for (balance, v) in [("available", 90.0), ("held", 10.0), ("spent", 0.0)] {
        let got = get("spendguard_wallet_balance", &[("currency", "USD"), ("balance", balance)]);
        assert_eq!(got, Some(v), "{balance}: {}", reply.text);
    }
}

// ---- shutdown ----------------------------------------------------------------------

#[test]
fn graceful_shutdown() {
    let mut w = Wallet::new();
    let health = w.send("GET", "/healthz", None, &[], Body::None).expect(200, "healthz");
    assert_eq!(health, json!({"ok": true}));
    w.deposit("10.00");
    w.upload("spend-limit", "spend-limit");
    let bot = w.create_agent(
        "bot",
        json!([{"policy": "spend-limit", "config": {"limit": "50.00", "currency": "USD", "window": "24h"}}]),
    );
    w.stop();
    // What was committed before the stop is there after it.
    w.restart();
    w.assert_wallet("10.00", "0.00", "0.00");
    // A restarted daemon compiles stored policies on first use — while
    // storage is not locked (this once deadlocked).
    let spend = w.propose(&bot, "1.00", "api.openai.com", "5734").expect(201, "propose after a restart");
    assert_eq!(spend["status"], "approved", "{spend}");
    w.assert_wallet("9.00", "1.00", "0.00");
}

// ---- approvals and expiry ----------------------------------------------------------

/// An escalated spend is decided by every policy too: approving it must not
/// let an agent pass a spend limit the policies would have held it to.
#[test]
fn approvals_cannot_pass_the_spend_limit() {
    let w = Wallet::new();
    w.deposit("500.00");
    w.upload("spend-limit", "spend-limit");
    w.upload("approval-threshold", "approval-threshold");
    let bot = w.create_agent(
        "bot",
        json!([
            {"policy": "spend-limit", "config": {"limit": "80.00", "currency": "USD", "window": "24h"}},
            {"policy": "approval-threshold", "config": {"threshold": "50.00", "currency": "USD"}},
        ]),
    );
    let first = w.propose(&bot, "60.00", "api.openai.com", "5734").expect(201, "first 60.00");
    assert_eq!(first["status"], "pending_approval", "{first}");
    let second = w.propose(&bot, "60.00", "api.openai.com", "5734").expect(201, "second 60.00");
    // Either the first counts against the limit while it waits (the second
    // is denied now), or approving the second is refused: never 120.00.
    let approve = |id: &Value| {
        w.post(&format!("/v1/approvals/{}/approve", id.as_str().unwrap()), &w.operator, json!({}))
    };
    approve(&first["id"]).expect(200, "approve the first");
    let second_approval = (second["status"] == "pending_approval").then(|| approve(&second["id"]));
    let wallet = w.read("/v1/wallet");
    assert_eq!(
        wallet,
        json!({"balances": [{"currency": "USD", "available": "440.00", "held": "60.00", "spent": "0.00"}]}),
        "an 80.00 limit let 120.00 through: second proposal {second}, its approval {second_approval:?}"
    );
}

#[test]
fn expired_cards_release_their_hold() {
    let w = Wallet::new();
    w.deposit("100.00");
    w.upload("purchase-cap", "purchase-cap");
    let bot = w.create_agent(
        "bot",
        json!([{"policy": "purchase-cap", "config": {"cap": "50.00", "currency": "USD", "ttl_seconds": 1}}]),
    );
    let spend = w.propose(&bot, "5.00", "api.openai.com", "5734").expect(201, "propose");
    assert_eq!(spend["status"], "approved", "{spend}");
    let card = &spend["card"];
    w.assert_wallet("95.00", "5.00", "0.00");
    // The sweeper releases it within a second or so of its expiry.
    let deadline = Instant::now() + Duration::from_secs(10);
    while w.read("/v1/wallet")["balances"][0]["held"] != "0.00" {
        assert!(Instant::now() < deadline, "the hold of an expired card was not released");
        std::thread::sleep(Duration::from_millis(100));
    }
    w.assert_wallet("100.00", "0.00", "0.00");
    assert_eq!(w.charge(card, "5.00", "api.openai.com"), declined("card_expired"));
    w.assert_wallet("100.00", "0.00", "0.00");
    assert_eq!(w.read("/v1/cards")["cards"][0]["state"], "expired");
}

/// SPEC §4: concurrent proposals against one limit never commit more than it.
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
