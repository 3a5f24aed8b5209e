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

/// Config lines that take the per-agent rate out of a load test's way: the
/// crash, race and cluster tests drive agents far faster than the default
/// rate allows, to test durability and atomicity, not the limiter
/// (`transport::an_agent_past_its_rate_is_told_when_to_retry_and_nothing_is_recorded` does).
pub(crate) const NO_RATE_LIMIT: &str = "agent_rate_per_second = 1000000\nagent_burst = 1000000\n";

/// A running `spendguard serve`, killed and reaped when dropped, so a failing
/// test leaves no daemon behind.
pub(crate) struct Daemon {
    pub(crate) child: Child,
    pub(crate) url: String,
    pub(crate) log: PathBuf,
}

impl Daemon {
    /// Start `serve` on a free port, with more arguments (`--config FILE`),
    /// and wait until it says where it listens.
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
    /// The wallet's PostgreSQL database, when it is in one (`--database-url`).
    pub(crate) database_url: Option<String>,
    /// Kept alive (and dropped last) by the wallet that made it.
    pub(crate) _db: Option<std::sync::Arc<crate::backends::TestDatabase>>,
    pub(crate) _dir: tempfile::TempDir,
}

impl Wallet {
    /// A wallet in SQLite, its daemon serving.
    pub(crate) fn new() -> Wallet {
        Wallet::on(crate::backends::Kind::Sqlite)
    }

    /// A wallet on `kind` (PostgreSQL: a fresh database), its daemon serving.
    pub(crate) fn on(kind: crate::backends::Kind) -> Wallet {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("data");
        let db = (kind == crate::backends::Kind::Postgres)
            .then(|| std::sync::Arc::new(crate::backends::TestDatabase::create()));
        let database_url = db.as_ref().map(|db| db.url.clone());
        let db_args: Vec<&str> = database_url.iter().flat_map(|u| ["--database-url", u.as_str()]).collect();
        let out = spendguard()
            .args(["init", "--data-dir", path(&data), "--json"])
            .args(&db_args)
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
        let daemon = Daemon::start_with(&data, &log, &db_args);
        let http: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .proxy(None)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        Wallet { daemon, data, log, operator, network, http, database_url, _db: db, _dir: dir }
    }

    /// `--database-url URL` when the wallet is in PostgreSQL, then `extra`.
    fn serve_args<'a>(&'a self, extra: &[&'a str]) -> Vec<&'a str> {
        let mut args: Vec<&str> =
            self.database_url.iter().flat_map(|u| ["--database-url", u.as_str()]).collect();
        args.extend_from_slice(extra);
        args
    }

    /// A second daemon on the same PostgreSQL wallet, with a copy of this
    /// one's data directory (its card key), as an operator would set it up
    /// on another host. The same tokens work on it.
    pub(crate) fn sibling(&self, extra: &[&str]) -> Wallet {
        let url = self.database_url.clone().expect("only a wallet in PostgreSQL has siblings");
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        for file in [
            spendguard::datadir::CARD_KEY_FILE,
            spendguard::datadir::AUDIT_KEY_FILE,
            spendguard::datadir::POSTGRES_MARKER,
        ] {
            std::fs::copy(self.data.join(file), data.join(file)).unwrap();
        }
        let log = dir.path().join("daemon.log");
        let mut args = vec!["--database-url", url.as_str()];
        args.extend_from_slice(extra);
        let daemon = Daemon::start_with(&data, &log, &args);
        Wallet {
            daemon,
            data,
            log,
            operator: self.operator.clone(),
            network: self.network.clone(),
            http: self.http.clone(),
            database_url: Some(url),
            _db: self._db.clone(),
            _dir: dir,
        }
    }

    /// The wallet's store, opened directly (as another process would), with
    /// the data directory's audit key.
    pub(crate) fn store(&self) -> std::sync::Arc<dyn spendguard::storage::Backend> {
        let store = self.store_without_key();
        let key =
            spendguard::audit::AuditKey::load(&self.data.join(spendguard::datadir::AUDIT_KEY_FILE)).unwrap();
        store.set_audit_key(std::sync::Arc::new(key)).unwrap();
        store
    }

    /// The wallet's store as someone with the database but not the data
    /// directory opens it: without the audit key.
    pub(crate) fn store_without_key(&self) -> std::sync::Arc<dyn spendguard::storage::Backend> {
        match &self.database_url {
            Some(url) => {
                std::sync::Arc::new(spendguard::storage::postgres::PgStorage::connect(url, 4).unwrap())
            }
            None => std::sync::Arc::new(
                spendguard::storage::sqlite::SqliteStorage::open(
                    &self.data.join(spendguard::datadir::DB_FILE),
                )
                .unwrap(),
            ),
        }
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
        self.daemon = Daemon::start_with(&self.data, &self.log, &self.serve_args(&[]));
    }

    /// [`Wallet::restart`] with more arguments for `serve` (`--config FILE`).
    pub(crate) fn restart_with(&mut self, args: &[&str]) {
        self.daemon = Daemon::start_with(&self.data, &self.log, &self.serve_args(args));
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

/// One route of the API (docs/contract.md), and who gets what from it (every other caller with a
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
    let spare = w.post("/v1/tokens", &w.operator, json!({"role": "network", "label": "spare"}));
    let spare = spare.expect(201, "a spare token")["id"].as_str().unwrap().to_owned();

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
        route("GET", "/v1/tokens", Body::None, &operator_only(200)),
        route(
            "POST",
            "/v1/tokens",
            Body::Json(json!({"role": "network", "label": "made in the matrix"})),
            &operator_only(201),
        ),
        route("POST", format!("/v1/tokens/{spare}/revoke"), Body::None, &operator_only(200)),
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
//
// Tables of malformed requests, route by route. Each must be refused with a
// 4xx and a JSON error carrying its specific code, and leave the database as
// it was: every row of every table, read beside the daemon before and after
// the table runs, besides what the API shows. Where a route has a real target
// the request names it (the agent's open card, its pending spend, the agent
// itself, a valid module), so a malformed request let through would change
// something.
//
// Not refused, on purpose: a route that takes no body (approve, revoke, void)
// ignores one; a JSON body is read whatever its Content-Type says; odd but
// printable text (accents in either normal form, other scripts, emoji, zero
// width joiners in names) and amounts like `+12.50` or `12.500` are accepted
// and stored as sent: `bad_input_that_is_fine_is_stored_verbatim`.

/// What the operator can see, compared before and after a table.
const BAD_INPUT_VIEWS: [&str; 7] = [
    "/v1/wallet",
    "/v1/policies",
    "/v1/agents",
    "/v1/spends?limit=1000",
    "/v1/cards",
    "/v1/approvals",
    "/v1/audit?limit=1000",
];

/// The database as text, table by table: the schema (and `user_version`),
/// then each table's rows with their rowid, in rowid order. Read in one
/// transaction of a read-only connection beside the running daemon (WAL: it
/// sees every committed write). Long values stand as their length and hash.
pub(crate) fn db_dump(data: &Path) -> BTreeMap<String, String> {
    use rusqlite::OpenFlags;
    use rusqlite::types::ValueRef;
    let db =
        rusqlite::Connection::open_with_flags(data.join("spendguard.db"), OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("the database opens read-only beside the daemon");
    db.execute_batch("BEGIN").unwrap();
    let mut schema = String::new();
    let mut tables = Vec::new();
    let mut stmt =
        db.prepare("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name").unwrap();
    let mut rows = stmt.query([]).unwrap();
    while let Some(row) = rows.next().unwrap() {
        let (kind, name): (String, String) = (row.get(0).unwrap(), row.get(1).unwrap());
        let (table, sql): (String, Option<String>) = (row.get(2).unwrap(), row.get(3).unwrap());
        schema.push_str(&format!("{kind} {name} on {table}: {}\n", sql.unwrap_or_default()));
        if kind == "table" {
            tables.push(name);
        }
    }
    drop(rows);
    drop(stmt);
    let version: i64 = db.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
    schema.push_str(&format!("user_version {version}\n"));
    let mut dump = BTreeMap::from([("(schema)".to_owned(), schema)]);
    let long =
        |bytes: &[u8]| format!("({} bytes, sha256 {})", bytes.len(), hex::encode(Sha256::digest(bytes)));
    let cell = |v: ValueRef<'_>| match v {
        ValueRef::Null => "NULL".to_owned(),
        ValueRef::Integer(i) => i.to_string(),
        ValueRef::Real(f) => format!("{f:?}"),
        ValueRef::Text(t) if t.len() > 400 => format!("text {}", long(t)),
        ValueRef::Text(t) => format!("{:?}", String::from_utf8_lossy(t)),
        ValueRef::Blob(b) if b.len() > 64 => format!("blob {}", long(b)),
        ValueRef::Blob(b) => format!("x'{}'", hex::encode(b)),
    };
    for table in tables {
        let quoted = format!("\"{}\"", table.replace('"', "\"\""));
        // A WITHOUT ROWID table has no rowid: ordered by every column instead.
        let mut stmt = match db.prepare(&format!("SELECT rowid, * FROM {quoted} ORDER BY rowid")) {
            Ok(stmt) => stmt,
            Err(_) => {
                let n = db.prepare(&format!("SELECT * FROM {quoted}")).unwrap().column_count();
                let order: Vec<String> = (1..=n).map(|i| i.to_string()).collect();
                db.prepare(&format!("SELECT * FROM {quoted} ORDER BY {}", order.join(", "))).unwrap()
            }
        };
        let mut text = format!("({})\n", stmt.column_names().join(", "));
        let n = stmt.column_count();
        let mut rows = stmt.query([]).unwrap();
        while let Some(row) = rows.next().unwrap() {
            let cells: Vec<String> = (0..n).map(|i| cell(row.get_ref(i).unwrap())).collect();
            text.push_str(&cells.join(" | "));
            text.push('\n');
        }
        dump.insert(table, text);
    }
    dump
}

/// Which tables differ between two dumps, and their rows only in one or the
/// other; empty when none does.
pub(crate) fn db_diff(before: &BTreeMap<String, String>, after: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    for table in before.keys().chain(after.keys()).collect::<BTreeSet<_>>() {
        let (b, a) =
            (before.get(table).map_or("", String::as_str), after.get(table).map_or("", String::as_str));
        if a == b {
            continue;
        }
        let (b, a): (BTreeSet<&str>, BTreeSet<&str>) = (b.lines().collect(), a.lines().collect());
        out.push_str(&format!("table `{table}` changed:\n"));
        for gone in b.difference(&a) {
            out.push_str(&format!("  - {gone}\n"));
        }
        for new in a.difference(&b) {
            out.push_str(&format!("  + {new}\n"));
        }
    }
    out
}

/// One malformed request, and the refusal it must get.
#[derive(Debug, Clone)]
pub(crate) struct Bad {
    token: String,
    method: &'static str,
    /// The request target, as sent: it may be anything but a space.
    path: Vec<u8>,
    headers: Vec<(&'static str, Vec<u8>)>,
    content_type: &'static str,
    body: Option<Vec<u8>>,
    /// Sent with `Transfer-Encoding: chunked` (no length known up front).
    chunked: bool,
    status: u16,
    code: &'static str,
}

pub(crate) fn bad(token: &str, method: &'static str, path: impl Into<Vec<u8>>) -> Bad {
    Bad {
        token: token.to_owned(),
        method,
        path: path.into(),
        headers: Vec::new(),
        content_type: "application/json",
        body: None,
        chunked: false,
        status: 0,
        code: "",
    }
}

impl Bad {
    pub(crate) fn json(self, body: &Value) -> Bad {
        self.text(body.to_string())
    }

    /// A body sent as JSON, whatever it holds.
    fn text(mut self, body: impl Into<Vec<u8>>) -> Bad {
        self.body = Some(body.into());
        self
    }

    fn module(mut self, module: Vec<u8>) -> Bad {
        self.content_type = "application/wasm";
        self.body = Some(module);
        self
    }

    fn chunked(mut self) -> Bad {
        self.chunked = true;
        self
    }

    pub(crate) fn header(mut self, name: &'static str, value: impl Into<Vec<u8>>) -> Bad {
        self.headers.push((name, value.into()));
        self
    }

    fn refused(mut self, status: u16, code: &'static str) -> Bad {
        self.status = status;
        self.code = code;
        self
    }

    fn describe(&self) -> String {
        let cut = |bytes: &[u8], max: usize| {
            let text = String::from_utf8_lossy(&bytes[..bytes.len().min(max)]).into_owned();
            if bytes.len() > max {
                format!("{text:?}… ({} bytes)", bytes.len())
            } else {
                format!("{text:?}")
            }
        };
        let mut out = format!("{} {}", self.method, cut(&self.path, 100));
        for (name, value) in &self.headers {
            out.push_str(&format!(" [{name}: {}]", cut(value, 60)));
        }
        if let Some(body) = &self.body {
            let how = if self.chunked { "chunked " } else { "" };
            out.push_str(&format!(" with {how}{}", cut(body, 160)));
        }
        out
    }
}

/// Send `bad` on a connection of its own, written byte for byte: an HTTP
/// client library refuses some of what the tables send (a method of any name,
/// bytes beyond ASCII in a header). Its reply, and its Content-Type.
pub(crate) fn send_raw(w: &Wallet, bad: &Bad) -> Result<(Reply, String), String> {
    use std::io::{Read, Write};
    let addr = w.daemon.url.trim_start_matches("http://").to_owned();
    let mut stream = std::net::TcpStream::connect(&addr).map_err(|e| format!("cannot connect: {e}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut request = format!("{} ", bad.method).into_bytes();
    request.extend_from_slice(&bad.path);
    request.extend_from_slice(
        format!(" HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAuthorization: Bearer {}\r\n", bad.token)
            .as_bytes(),
    );
    for (name, value) in &bad.headers {
        request.extend_from_slice(format!("{name}: ").as_bytes());
        request.extend_from_slice(value);
        request.extend_from_slice(b"\r\n");
    }
    match &bad.body {
        None if bad.method == "GET" => request.extend_from_slice(b"\r\n"),
        None => request.extend_from_slice(b"Content-Length: 0\r\n\r\n"),
        Some(body) if bad.chunked => {
            request.extend_from_slice(
                format!("Content-Type: {}\r\nTransfer-Encoding: chunked\r\n\r\n", bad.content_type)
                    .as_bytes(),
            );
            for chunk in body.chunks(16 * 1024) {
                request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                request.extend_from_slice(chunk);
                request.extend_from_slice(b"\r\n");
            }
            request.extend_from_slice(b"0\r\n\r\n");
        }
        Some(body) => {
            request.extend_from_slice(
                format!("Content-Type: {}\r\nContent-Length: {}\r\n\r\n", bad.content_type, body.len())
                    .as_bytes(),
            );
            request.extend_from_slice(body);
        }
    }
    // Written while the reply is read: the daemon may refuse a large body
    // before it has all of it.
    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    let sender = std::thread::spawn(move || writer.write_all(&request).and_then(|()| writer.flush()));
    let mut response = Vec::new();
    let read = stream.read_to_end(&mut response);
    let sent = sender.join().expect("the writer does not panic");
    let Some(end) = response.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Err(format!(
            "no HTTP response (read: {read:?}, write: {sent:?}): {:?}",
            String::from_utf8_lossy(&response)
        ));
    };
    let head = String::from_utf8_lossy(&response[..end]).to_ascii_lowercase();
    let mut body = response[end + 4..].to_vec();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status in {head:?}"))?;
    let header = |name: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(':')))
            .map(|v| v.trim().to_owned())
    };
    if header("transfer-encoding").is_some_and(|te| te.contains("chunked")) {
        let (mut rest, mut whole) = (body.as_slice(), Vec::new());
        loop {
            let line = rest.windows(2).position(|w| w == b"\r\n").ok_or("a broken chunked reply")?;
            let size = usize::from_str_radix(String::from_utf8_lossy(&rest[..line]).trim(), 16)
                .map_err(|e| format!("a broken chunked reply: {e}"))?;
            if size == 0 {
                break;
            }
            let chunk = rest.get(line + 2..line + 2 + size).ok_or("a truncated chunked reply")?;
            whole.extend_from_slice(chunk);
            rest = rest.get(line + 4 + size..).ok_or("a truncated chunked reply")?;
        }
        body = whole;
    }
    let text = String::from_utf8_lossy(&body).into_owned();
    let json = serde_json::from_str(&text).unwrap_or(Value::Null);
    Ok((Reply { status, json, text }, header("content-type").unwrap_or_default()))
}

/// A wallet with something of everything a malformed request could spoil.
/// Nothing in it can expire while a table runs: cards live 900 s and
/// approvals 600 s by default, so the sweeper has nothing to write.
struct Targets {
    bot: AgentToken,
    /// A revoked agent's id.
    gone: String,
    /// The bot's spend waiting for the operator.
    pending: String,
    approved: String,
    denied: String,
    /// The open card of `approved`, with its PAN and CVV.
    card: Value,
    voided: String,
}

fn bot_policies() -> Value {
    json!([
        {"policy": "spend-limit", "config": {"limit": "500.00", "currency": "USD"}},
        {"policy": "approval-threshold", "config": {"threshold": "100.00", "currency": "USD"}},
    ])
}

fn bad_input_wallet() -> (Wallet, Targets) {
    let w = Wallet::new();
    let deposit = Body::Json(json!({"amount": "1000.00", "currency": "USD"}));
    let auth = bearer(&w.operator);
    w.send("POST", "/v1/wallet/deposits", Some(&auth), &[("Idempotency-Key", "funding")], deposit)
        .expect(201, "deposit");
    w.upload("spend-limit", "spend-limit");
    w.upload("approval-threshold", "approval-threshold");
    let bot = w.create_agent("bot", bot_policies());
    let propose = |amount: &str, status: &str| {
        let body = Body::Json(proposal(amount, "api.openai.com", "5734"));
        let key = format!("order-{amount}");
        let reply =
            w.send("POST", "/v1/spends", Some(&bearer(&bot.token)), &[("Idempotency-Key", &key)], body);
        let spend = reply.expect(201, &format!("propose {amount}"));
        assert_eq!(spend["status"], status, "{spend}");
        spend
    };
    let approved = propose("10.00", "approved");
    let voided = propose("20.00", "approved")["card"]["id"].as_str().unwrap().to_owned();
    w.post(&format!("/v1/cards/{voided}/void"), &w.operator, json!({})).expect(200, "void");
    let pending = propose("150.00", "pending_approval")["id"].as_str().unwrap().to_owned();
    let denied = propose("600.00", "denied")["id"].as_str().unwrap().to_owned();
    let gone = w.create_agent("gone", json!([])).id;
    w.post(&format!("/v1/agents/{gone}/revoke"), &w.operator, json!({})).expect(200, "revoke");
    let targets = Targets {
        bot,
        gone,
        pending,
        approved: approved["id"].as_str().unwrap().to_owned(),
        denied,
        card: approved["card"].clone(),
        voided,
    };
    (w, targets)
}

/// Send every case, each on a connection of its own, then check each got its
/// refusal, and that neither the database nor anything the API shows changed.
/// Every case is tried, so one run shows every wrong answer.
fn assert_refused_changing_nothing(w: &Wallet, cases: &[Bad]) {
    let views = || BAD_INPUT_VIEWS.map(|p| (p, w.read(p)));
    let (api_before, db_before) = (views(), db_dump(&w.data));
    let mut wrong = Vec::new();
    for bad in cases {
        assert!(
            (400..500).contains(&bad.status) && !bad.code.is_empty(),
            "no refusal for {}",
            bad.describe()
        );
        let checked = send_raw(w, bad).and_then(|(reply, content_type)| {
            reply.check(bad.status, Some(bad.code))?;
            if content_type.starts_with("application/json") {
                Ok(())
            } else {
                Err(format!("a JSON error with Content-Type `{content_type}`"))
            }
        });
        if let Err(e) = checked {
            wrong.push(format!("{}: {e}", bad.describe()));
        }
    }
    let (api_after, db_after) = (views(), db_dump(&w.data));
    let db = db_diff(&db_before, &db_after);
    let api: Vec<&str> =
        api_before.iter().zip(&api_after).filter(|(b, a)| b != a).map(|((p, _), _)| *p).collect();
    assert!(
        wrong.is_empty() && db.is_empty() && api.is_empty(),
        "{} of {} refusals wrong:\n{}\n\nthe database changed:\n{db}\nthe API shows a change at {api:?}; the daemon's log:\n{}",
        wrong.len(),
        cases.len(),
        wrong.join("\n"),
        w.daemon.log(),
    );
}

/// `base` with the value at `pointer` replaced (or added, in an object).
fn with(base: &Value, pointer: &str, value: Value) -> Value {
    let mut v = base.clone();
    let (parent, key) = pointer.rsplit_once('/').expect("a JSON pointer");
    match v.pointer_mut(parent) {
        Some(Value::Object(map)) => {
            map.insert(key.to_owned(), value);
        }
        Some(Value::Array(list)) => list[key.parse::<usize>().unwrap()] = value,
        _ => panic!("no `{parent}` in {base}"),
    }
    v
}

/// `base` without the value at `pointer`.
fn without(base: &Value, pointer: &str) -> Value {
    let mut v = base.clone();
    let (parent, key) = pointer.rsplit_once('/').expect("a JSON pointer");
    match v.pointer_mut(parent) {
        Some(Value::Object(map)) => assert!(map.remove(key).is_some(), "no `{pointer}` in {base}"),
        Some(Value::Array(list)) => drop(list.remove(key.parse::<usize>().unwrap())),
        _ => panic!("no `{parent}` in {base}"),
    }
    v
}

/// `base` as JSON text with the value at `pointer` written as `raw`: what
/// serde_json never writes (a lone surrogate, `1e400`, a duplicate key).
fn with_raw(base: &Value, pointer: &str, raw: &str) -> Vec<u8> {
    let mark = json!("\u{1}raw\u{1}");
    let text = with(base, pointer, mark.clone()).to_string();
    assert!(text.contains(&mark.to_string()));
    text.replace(&mark.to_string(), raw).into_bytes()
}

/// Values of every other JSON type than `good`'s (`null` too unless the
/// field is an option).
fn wrong_types(good: &Value, null_ok: bool) -> Vec<Value> {
    let kind = std::mem::discriminant;
    [json!(null), json!(true), json!(7), json!(-2.5), json!("7"), json!([good]), json!({"value": good})]
        .into_iter()
        .filter(|v| kind(v) != kind(good) && !(null_ok && v.is_null()))
        .collect()
}

/// What is wrong with a body as JSON, whatever its fields: broken syntax,
/// not an object, trailing data, a byte order mark, bytes that are not
/// UTF-8, a duplicate key, nesting deeper than the parser goes.
fn broken_json(base: &Value) -> Vec<Vec<u8>> {
    let text = base.to_string();
    let (first, value) = base.as_object().and_then(|m| m.iter().next()).expect("an object with a field");
    let mut out: Vec<Vec<u8>> = vec![
        b"{".to_vec(),
        text[..text.len() - 1].into(),
        format!("{text} x").into(),
        format!("{text}{text}").into(),
        format!("\u{feff}{text}").into(),
        text.replace('"', "'").into(),
        format!("/* a comment */ {text}").into(),
        format!("{{\"{first}\": {value}, {}", &text[1..]).into(),
        b"null".to_vec(),
        b"true".to_vec(),
        b"12.50".to_vec(),
        b"\"12.50\"".to_vec(),
        format!("[{text}]").into(),
        format!("{}]", "[".repeat(10_000)).into(),
    ];
    // Not UTF-8: a byte that never starts a character, inside the first key.
    let mut latin1 = text.clone().into_bytes();
    latin1.insert(2, 0xff);
    out.push(latin1);
    out
}

/// A body over the 64 KiB limit: `base` with a long extra field.
fn oversized(base: &Value) -> Value {
    with(base, "/padding", json!("x".repeat(70 * 1024)))
}

/// Amounts that are no amount: sign, zero, too many decimals, exponents,
/// white space, separators, other digits, beyond the largest, not numbers.
fn bad_amounts() -> Vec<String> {
    let mut out: Vec<String> = [
        "-1",
        "-0.01",
        "-0",
        "0",
        "0.00",
        "0.001",
        "10.001",
        "1.00000000000000000000000000001",
        "1e3",
        "1E3",
        "1e-2",
        "0x10",
        "NaN",
        "inf",
        "Infinity",
        "",
        " ",
        " 1.00",
        "1.00 ",
        "\t1.00",
        "1.00\n",
        "1 000",
        "1,00",
        "1,000.00",
        "1_000",
        "1.",
        ".5",
        "+-1",
        "--1",
        "1..0",
        "1.0.0",
        "$1.00",
        "1.00USD",
        "1.00\u{0}",
        "½",
        "١٢",
        "１２",
        "1000000000.01",
        "1000000001",
        "99999999999999999999999999999",
    ]
    .map(String::from)
    .into();
    out.push("9".repeat(100));
    out.push(format!("0.{}1", "0".repeat(60)));
    out
}

const BAD_CURRENCIES: [&str; 14] = [
    "XYZ",
    "usd",
    "Usd",
    "US",
    "USDD",
    "",
    " USD",
    "USD ",
    "U\u{0}SD",
    "ＵＳＤ",
    "US$",
    "$",
    "💵",
    "USD\u{200b}",
];

/// Text a person typed, spoiled: control characters (C0, DEL, C1), direction
/// overrides and isolates that reorder what a reader sees, line and paragraph
/// separators, and one character too many (in ASCII, in two- and four-byte
/// characters: the limit counts characters).
fn bad_texts(max: usize) -> Vec<String> {
    let mut out: Vec<String> = [
        "a\u{0}b",
        "\u{0}",
        "a\nb",
        "a\r\nb",
        "a\tb",
        "\u{1b}[31mred\u{1b}[0m",
        "a\u{7f}",
        "a\u{85}b",
        "a\u{9b}31m",
        "moc.\u{202e}evil",
        "\u{2066}abc\u{2069}",
        "a\u{202a}b",
        "a\u{200e}\u{202d}b",
        "a\u{2028}b",
        "a\u{2029}b",
    ]
    .map(String::from)
    .into();
    out.push("a".repeat(max + 1));
    out.push("é".repeat(max + 1));
    out.push("\u{1f600}".repeat(max + 1));
    out
}

/// Text that must not be empty, left empty.
const BLANKS: [&str; 4] = ["", " ", "   ", "\u{a0}"];

/// Identifiers compared exactly (a merchant id is the card's lock): on top of
/// [`bad_texts`] and [`BLANKS`], white space and invisible characters that
/// make two ids look the same.
fn bad_ids() -> Vec<String> {
    let mut out = bad_texts(MAX_NAME_CHARS);
    out.extend(BLANKS.map(String::from));
    out.extend(
        [
            " api.openai.com",
            "api.openai.com ",
            "api openai.com",
            "api.openai.com\u{a0}",
            "api.openai.com\u{3000}",
            "api.openai.com\u{200b}",
            "api.\u{200d}openai.com",
            "api.\u{200c}openai.com",
            "\u{feff}api.openai.com",
            "api.open\u{ad}ai.com",
            "api.openai.com\u{2060}",
            "api.openai.com\u{e0041}",
            "api.openai.com\u{fe0f}",
        ]
        .map(String::from),
    );
    out
}

/// Lone surrogates, as JSON escapes: no character at all.
const LONE_SURROGATES: [&str; 4] = [r#""\ud800""#, r#""a\udc00b""#, r#""\ud800\u0041""#, r#""\udfff\ud800""#];

/// Longest merchant id, merchant name, agent name or label the API takes.
const MAX_NAME_CHARS: usize = 200;
/// Longest purpose or deny reason.
const MAX_PURPOSE_CHARS: usize = 1000;

#[test]
fn bad_input_bodies_change_nothing() {
    let (w, t) = bad_input_wallet();
    let (op, bot, net) = (w.operator.as_str(), t.bot.token.as_str(), w.network.as_str());
    let card = &t.card;
    let attachment = json!({"policy": "spend-limit", "config": {"limit": "50.00", "currency": "USD"}});
    let charge = json!({"pan": card["pan"], "cvv": card["cvv"], "exp_month": card["exp_month"],
                        "exp_year": card["exp_year"], "amount": "1.00", "currency": "USD",
                        "merchant_id": "api.openai.com"});
    let put_policies = format!("/v1/agents/{}/policies", t.bot.id);
    let deny = format!("/v1/approvals/{}/deny", t.pending);
    // Each JSON route with a body it would take (and act on): every case
    // below spoils it one way. (token, method, path, body, its fields:
    // (pointer, required, null accepted), where unknown fields go.)
    type Fields = &'static [(&'static str, bool, bool)];
    type JsonRoute<'a> = (&'a str, &'static str, String, Value, Fields, &'static [&'static str]);
    let routes: Vec<JsonRoute> = vec![
        (
            op,
            "POST",
            "/v1/wallet/deposits".into(),
            json!({"amount": "5.00", "currency": "USD"}),
            &[("/amount", true, false), ("/currency", true, false)],
            &[""],
        ),
        (
            bot,
            "POST",
            "/v1/spends".into(),
            proposal("5.00", "api.openai.com", "5734"),
            &[
                ("/amount", true, false),
                ("/currency", true, false),
                ("/merchant", true, false),
                ("/merchant/id", true, false),
                ("/merchant/name", true, false),
                ("/merchant/mcc", true, false),
                ("/merchant/country", false, false),
                ("/purpose", false, false),
            ],
            &["", "/merchant"],
        ),
        (
            op,
            "POST",
            "/v1/agents".into(),
            json!({"name": "new bot", "labels": {"team": "research"}, "policies": [attachment]}),
            &[
                ("/name", true, false),
                ("/labels", false, false),
                ("/labels/team", false, false),
                ("/policies", false, false),
                ("/policies/0", false, false),
                ("/policies/0/policy", true, false),
            ],
            &["", "/policies/0"],
        ),
        (
            op,
            "PUT",
            put_policies.clone(),
            json!({"policies": [attachment]}),
            &[("/policies", true, false), ("/policies/0", false, false), ("/policies/0/policy", true, false)],
            &["", "/policies/0"],
        ),
        (op, "POST", deny.clone(), json!({"reason": "too dear"}), &[("/reason", false, true)], &[""]),
        (
            net,
            "POST",
            "/v1/network/authorizations".into(),
            charge.clone(),
            &[
                ("/pan", true, false),
                ("/cvv", true, false),
                ("/exp_month", true, false),
                ("/exp_year", true, false),
                ("/amount", true, false),
                ("/currency", true, false),
                ("/merchant_id", true, false),
            ],
            &[""],
        ),
    ];
    let mut cases = Vec::new();
    for (token, method, path, base, fields, objects) in &routes {
        let req = || bad(token, method, path.as_str());
        let invalid_json = |body: Vec<u8>| req().text(body).refused(422, "invalid_json");
        // An empty body is how a deny says "no reason"; a bare list is a
        // list of attachments.
        if !path.ends_with("/deny") {
            cases.push(invalid_json(Vec::new()));
        }
        cases.extend(broken_json(base).into_iter().map(invalid_json));
        if *method != "PUT" {
            cases.push(invalid_json(b"[]".to_vec()));
        }
        for &(pointer, required, null_ok) in *fields {
            let good = base.pointer(pointer).unwrap();
            for wrong in wrong_types(good, null_ok) {
                cases.push(req().json(&with(base, pointer, wrong)).refused(422, "invalid_json"));
            }
            if required {
                cases.push(req().json(&without(base, pointer)).refused(422, "invalid_json"));
            }
            if good.is_string() {
                for raw in LONE_SURROGATES {
                    cases.push(invalid_json(with_raw(base, pointer, raw)));
                }
            }
        }
        for object in *objects {
            cases.push(
                req()
                    .json(&with(base, &format!("{object}/colour"), json!("red")))
                    .refused(422, "invalid_json"),
            );
            // A field's name in other case is another (unknown) field.
            if let Some((key, value)) =
                base.pointer(object).and_then(Value::as_object).and_then(|m| m.iter().next())
            {
                let renamed = with(
                    &without(base, &format!("{object}/{key}")),
                    &format!("{object}/{}", key.to_uppercase()),
                    value.clone(),
                );
                cases.push(req().json(&renamed).refused(422, "invalid_json"));
            }
        }
        cases.push(req().json(&oversized(base)).refused(413, "too_large"));
        cases.push(req().json(&oversized(base)).chunked().refused(413, "too_large"));
        // Amounts and currencies, wherever money is named.
        if base.get("amount").is_some() {
            for amount in bad_amounts() {
                cases.push(req().json(&with(base, "/amount", json!(amount))).refused(422, "invalid_amount"));
            }
            for currency in BAD_CURRENCIES {
                cases.push(
                    req().json(&with(base, "/currency", json!(currency))).refused(422, "invalid_amount"),
                );
            }
            for (amount, currency) in
                [("1.5", "JPY"), ("0.5", "KRW"), ("1.0001", "KWD"), ("1.0000001", "USDC")]
            {
                let body = with(&with(base, "/amount", json!(amount)), "/currency", json!(currency));
                cases.push(req().json(&body).refused(422, "invalid_amount"));
            }
        }
    }

    // Text fields: what a person typed, and ids compared exactly.
    let spend = proposal("5.00", "api.openai.com", "5734");
    let new_agent = json!({"name": "new bot", "labels": {"team": "research"}});
    let reason = json!({"reason": "too dear"});
    // (token, method, path, a body it would take, the field, what to put there)
    type TextCase<'a> = (&'a str, &'static str, &'a str, &'a Value, &'static str, Vec<String>);
    let texts: Vec<TextCase> = vec![
        (bot, "POST", "/v1/spends", &spend, "/merchant/id", bad_ids()),
        (net, "POST", "/v1/network/authorizations", &charge, "/merchant_id", bad_ids()),
        (bot, "POST", "/v1/spends", &spend, "/merchant/name", bad_texts(MAX_NAME_CHARS)),
        (bot, "POST", "/v1/spends", &spend, "/purpose", bad_texts(MAX_PURPOSE_CHARS)),
        (
            op,
            "POST",
            "/v1/agents",
            &new_agent,
            "/name",
            [bad_texts(MAX_NAME_CHARS), BLANKS.map(String::from).into()].concat(),
        ),
        (op, "POST", "/v1/agents", &new_agent, "/labels/team", bad_texts(MAX_NAME_CHARS)),
        (op, "POST", deny.as_str(), &reason, "/reason", bad_texts(MAX_PURPOSE_CHARS)),
    ];
    for (token, method, path, base, pointer, values) in texts {
        for value in values {
            cases.push(
                bad(token, method, path)
                    .json(&with(base, pointer, json!(value)))
                    .refused(422, "invalid_field"),
            );
        }
    }
    // A label's name is text too, and must not be blank; at most 32 labels.
    for key in [bad_texts(MAX_NAME_CHARS), BLANKS.map(String::from).into()].concat() {
        let body = with(&new_agent, "/labels", json!({ key: "x" }));
        cases.push(bad(op, "POST", "/v1/agents").json(&body).refused(422, "invalid_field"));
    }
    let many: serde_json::Map<String, Value> = (0..33).map(|i| (format!("label{i}"), json!("x"))).collect();
    cases.push(
        bad(op, "POST", "/v1/agents")
            .json(&with(&new_agent, "/labels", Value::Object(many)))
            .refused(422, "invalid_field"),
    );

    // Merchant category and country.
    for mcc in ["573", "57340", "57a4", "", " 573", "5734 ", "５７３４", "٥٧٣٤", "-573", "5.73", "57\u{0}4"]
    {
        cases.push(
            bad(bot, "POST", "/v1/spends")
                .json(&with(&spend, "/merchant/mcc", json!(mcc)))
                .refused(422, "invalid_field"),
        );
    }
    for country in ["us", "USA", "U", "1A", "ÜS", " US", "U S", "\u{0}\u{0}", "ＵＳ"] {
        let body = with(&spend, "/merchant/country", json!(country));
        cases.push(bad(bot, "POST", "/v1/spends").json(&body).refused(422, "invalid_field"));
    }

    // Card data, on the open card: let through, a charge would capture it.
    let authorize = |body: Value| bad(net, "POST", "/v1/network/authorizations").json(&body);
    for pan in [
        "4111",
        "",
        "4000 0000 0000 0002",
        "4000-0000-0000-0002",
        "400000000000000a",
        "40000000000000000002",
        "４０００００００００００００２",
    ] {
        cases.push(authorize(with(&charge, "/pan", json!(pan))).refused(422, "invalid_card_data"));
    }
    for cvv in ["12", "12345", "12a", "", " 123", "１２３"] {
        cases.push(authorize(with(&charge, "/cvv", json!(cvv))).refused(422, "invalid_card_data"));
    }
    for month in [0, 13, 255] {
        cases.push(authorize(with(&charge, "/exp_month", json!(month))).refused(422, "invalid_card_data"));
    }
    for (pointer, raw) in [
        ("/exp_month", "256"),
        ("/exp_month", "-1"),
        ("/exp_month", "12.0"),
        ("/exp_month", "1e400"),
        ("/exp_year", "-1"),
        ("/exp_year", "65536"),
        ("/exp_year", "2030.5"),
        ("/exp_year", "99999999999999999999999"),
    ] {
        cases.push(
            bad(net, "POST", "/v1/network/authorizations")
                .text(with_raw(&charge, pointer, raw))
                .refused(422, "invalid_json"),
        );
    }
    // Serde reads a struct from an array too, its fields in order: the API
    // takes objects with named fields, an array in their place is a wrong type.
    let merchant = json!(["api.openai.com", "OpenAI", "5734", "US"]);
    let positional_attachment = json!([["spend-limit", {"limit": "50.00", "currency": "USD"}]]);
    let positional: Vec<(&str, &'static str, &str, Value)> = vec![
        (op, "POST", "/v1/wallet/deposits", json!(["5.00", "USD"])),
        (bot, "POST", "/v1/spends", json!(["5.00", "USD", spend["merchant"], "a purpose"])),
        (bot, "POST", "/v1/spends", with(&spend, "/merchant", merchant)),
        (op, "POST", "/v1/agents", json!(["new bot", {"team": "research"}, [attachment]])),
        (op, "POST", "/v1/agents", with(&new_agent, "/policies", positional_attachment.clone())),
        (op, "PUT", put_policies.as_str(), json!([[attachment]])),
        (op, "PUT", put_policies.as_str(), positional_attachment.clone()),
        (op, "PUT", put_policies.as_str(), json!({"policies": positional_attachment})),
        (op, "POST", deny.as_str(), json!(["too dear"])),
        (
            net,
            "POST",
            "/v1/network/authorizations",
            json!([
                card["pan"],
                card["cvv"],
                card["exp_month"],
                card["exp_year"],
                "1.00",
                "USD",
                "api.openai.com"
            ]),
        ),
    ];
    for (token, method, path, body) in positional {
        cases.push(bad(token, method, path).json(&body).refused(422, "invalid_json"));
    }
    // The bare list of attachments, spoilt.
    for body in [
        json!([with(&attachment, "/colour", json!("red"))]),
        json!([{"config": {}}]),
        json!([{"policy": 7}]),
        json!(["spend-limit"]),
        json!([null]),
        json!([[]]),
    ] {
        cases.push(bad(op, "PUT", put_policies.as_str()).json(&body).refused(422, "invalid_json"));
    }
    assert_refused_changing_nothing(&w, &cases);
}

#[test]
fn bad_input_routes_queries_and_headers_change_nothing() {
    let (w, t) = bad_input_wallet();
    let (op, bot) = (w.operator.as_str(), t.bot.token.as_str());
    let card = t.card["id"].as_str().unwrap();
    let mut cases = Vec::new();

    // Ids in paths that name nothing: unknown, another kind's id, the real
    // id spoilt, bytes that decode to no UTF-8, control and direction
    // characters, dot segments, very long.
    let bad_ids = |real: &str, other: &str| -> Vec<String> {
        let mut ids: Vec<String> = [
            "",
            "sp_nothing",
            "ag_nothing",
            "card_nothing",
            "%00",
            "%FF",
            "%C0%AF",
            "%ED%A0%80",
            "%E2%80%AE",
            "%0A",
            "%1B%5B31m",
            "%2F",
            "..",
            "%2E%2E",
            ".",
            "%",
            "%zz",
            "%u202e",
            "*",
            "null",
            "0",
            "-1",
        ]
        .map(String::from)
        .into();
        ids.extend([
            other.to_owned(),
            real.to_uppercase(),
            format!("{real}%20"),
            format!("%20{real}"),
            format!("{real}%00"),
            format!("{real}%E2%80%8B"),
            format!("{real}x"),
            real[..real.len() - 1].to_owned(),
            "a".repeat(10_000),
        ]);
        ids
    };
    // (token, method, path with `{}` for the id, body, the real id, another kind's id)
    type ById<'a> = (&'a str, &'static str, String, Option<Value>, String, String);
    let by_id: Vec<ById> = vec![
        (bot, "GET", "/v1/spends/{}".into(), None, t.approved.clone(), t.bot.id.clone()),
        (op, "GET", "/v1/spends/{}".into(), None, t.approved.clone(), card.to_owned()),
        (op, "POST", "/v1/approvals/{}/approve".into(), None, t.pending.clone(), t.bot.id.clone()),
        (
            op,
            "POST",
            "/v1/approvals/{}/deny".into(),
            Some(json!({"reason": "no"})),
            t.pending.clone(),
            card.to_owned(),
        ),
        (op, "POST", "/v1/agents/{}/revoke".into(), None, t.bot.id.clone(), t.approved.clone()),
        (
            op,
            "PUT",
            "/v1/agents/{}/policies".into(),
            Some(json!({"policies": []})),
            t.bot.id.clone(),
            t.pending.clone(),
        ),
        (op, "POST", "/v1/cards/{}/void".into(), None, card.to_owned(), t.approved.clone()),
    ];
    for (token, method, template, body, real, other) in &by_id {
        for id in bad_ids(real, other) {
            let mut req = bad(token, method, template.replace("{}", &id));
            if let Some(body) = body {
                req = req.json(body);
            }
            cases.push(req.refused(404, "not_found"));
        }
    }

    // Routes that do not exist, near ones that do.
    for path in [
        "/",
        "/v1",
        "/v1/",
        "/v1/nope",
        "/v2/wallet",
        "/v1/wallet/",
        "/V1/wallet",
        "/v1//wallet",
        "/v1/spends/",
        "/v1/spends/x/y",
        "/v1/cards/x/void/again",
        "/v1/approvals/x/maybe",
        "/v1/wallet%2F",
        "/v1/../v1/wallet",
        "/healthz/",
    ] {
        cases.push(bad(op, "GET", path).refused(404, "not_found"));
    }
    let deposit = json!({"amount": "5.00", "currency": "USD"});
    cases.push(bad(op, "POST", "/v1/wallet/deposit").json(&deposit).refused(404, "not_found"));
    cases.push(bad(op, "POST", "/v1/wallet/deposits/").json(&deposit).refused(404, "not_found"));

    // Routes that exist, with a method they do not take.
    let spend = proposal("5.00", "api.openai.com", "5734");
    for (method, path) in [
        ("PUT", "/v1/wallet".to_owned()),
        ("DELETE", "/v1/spends".to_owned()),
        ("PATCH", "/v1/agents".to_owned()),
        ("GET", "/v1/wallet/deposits".to_owned()),
        ("GET", "/v1/network/authorizations".to_owned()),
        ("DELETE", format!("/v1/cards/{card}/void")),
        ("GET", format!("/v1/cards/{card}/void")),
        ("POST", "/v1/audit".to_owned()),
        ("GET", format!("/v1/approvals/{}/approve", t.pending)),
        ("PUT", format!("/v1/spends/{}", t.approved)),
        ("DELETE", format!("/v1/agents/{}/policies", t.bot.id)),
        ("POST", format!("/v1/agents/{}/policies", t.bot.id)),
        ("PUT", "/v1/spends".to_owned()),
        ("OPTIONS", "/v1/wallet".to_owned()),
        ("TRACE", "/v1/wallet".to_owned()),
        ("FROB", "/v1/wallet".to_owned()),
    ] {
        let mut req = bad(op, method, path);
        if method != "GET" {
            req = req.json(&spend);
        }
        cases.push(req.refused(405, "method_not_allowed"));
    }

    // Query strings: malformed on the routes that take one, and any at all on
    // the routes that take none (as an unknown field in a body is refused).
    for query in [
        "limit=abc",
        "limit=-1",
        "limit=1.5",
        "limit=1e2",
        "limit=99999999999999999999999999",
        "limit=",
        "limit=%FF",
        "limit=%00",
        "limit=1&limit=2",
        "colour=red",
        "Limit=5",
        "limit",
    ] {
        cases.push(bad(op, "GET", format!("/v1/spends?{query}")).refused(422, "invalid_query"));
        cases.push(bad(bot, "GET", format!("/v1/spends?{query}")).refused(422, "invalid_query"));
    }
    for query in [
        "after=-1",
        "after=x",
        "after=18446744073709551616",
        "limit=x",
        "after=1&after=2",
        "colour=red",
        "after=1.0",
    ] {
        cases.push(bad(op, "GET", format!("/v1/audit?{query}")).refused(422, "invalid_query"));
    }
    for (token, method, path, body) in [
        (op, "GET", "/v1/wallet".to_owned(), None),
        (op, "GET", "/v1/cards".to_owned(), None),
        (bot, "GET", "/v1/cards".to_owned(), None),
        (op, "GET", "/v1/agents".to_owned(), None),
        (op, "GET", "/v1/approvals".to_owned(), None),
        (op, "GET", "/v1/policies".to_owned(), None),
        (op, "GET", "/v1/audit/verify".to_owned(), None),
        (bot, "GET", format!("/v1/spends/{}", t.approved), None),
        (op, "POST", "/v1/wallet/deposits".to_owned(), Some(deposit.clone())),
        (bot, "POST", "/v1/spends".to_owned(), Some(spend.clone())),
        (op, "POST", format!("/v1/approvals/{}/approve", t.pending), None),
        (op, "POST", format!("/v1/approvals/{}/deny", t.pending), Some(json!({"reason": "no"}))),
        (op, "POST", format!("/v1/agents/{}/revoke", t.bot.id), None),
        (op, "PUT", format!("/v1/agents/{}/policies", t.bot.id), Some(json!({"policies": []}))),
        (op, "POST", format!("/v1/cards/{card}/void"), None),
        (op, "POST", "/v1/agents".to_owned(), Some(json!({"name": "new bot"}))),
    ] {
        for query in ["limit=5", "amount=5", "dry_run=true", "x"] {
            let mut req = bad(token, method, format!("{path}?{query}"));
            if let Some(body) = &body {
                req = req.json(body);
            }
            cases.push(req.refused(422, "invalid_query"));
        }
    }

    // Idempotency keys: empty, too long, not printable ASCII.
    let long_key = "k".repeat(201);
    for key in
        [&b""[..], long_key.as_bytes(), "ключ".as_bytes(), b"\xff\xfe", b"a\tb", "\u{202e}key".as_bytes()]
    {
        cases.push(
            bad(bot, "POST", "/v1/spends")
                .json(&spend)
                .header("Idempotency-Key", key)
                .refused(422, "invalid_idempotency_key"),
        );
        cases.push(
            bad(op, "POST", "/v1/wallet/deposits")
                .json(&deposit)
                .header("Idempotency-Key", key)
                .refused(422, "invalid_idempotency_key"),
        );
    }
    // A key used before, with other parameters.
    for other in ["11.00", "10.01"] {
        let body = proposal(other, "api.openai.com", "5734");
        cases.push(
            bad(bot, "POST", "/v1/spends")
                .json(&body)
                .header("Idempotency-Key", "order-10.00")
                .refused(409, "idempotency_conflict"),
        );
    }
    let other_merchant = proposal("10.00", "api.anthropic.com", "5734");
    cases.push(
        bad(bot, "POST", "/v1/spends")
            .json(&other_merchant)
            .header("Idempotency-Key", "order-10.00")
            .refused(409, "idempotency_conflict"),
    );
    cases.push(
        bad(op, "POST", "/v1/wallet/deposits")
            .json(&deposit)
            .header("Idempotency-Key", "funding")
            .refused(409, "idempotency_conflict"),
    );

    // What the state does not allow: deciding twice, voiding twice, revoking twice.
    for (path, body) in [
        (format!("/v1/approvals/{}/approve", t.approved), None),
        (format!("/v1/approvals/{}/approve", t.denied), None),
        (format!("/v1/approvals/{}/deny", t.approved), Some(json!({"reason": "no"}))),
        (format!("/v1/approvals/{}/deny", t.denied), None),
        (format!("/v1/cards/{}/void", t.voided), None),
        (format!("/v1/agents/{}/revoke", t.gone), None),
    ] {
        let mut req = bad(op, "POST", path);
        if let Some(body) = &body {
            req = req.json(body);
        }
        cases.push(req.refused(409, "conflict"));
    }
    assert_refused_changing_nothing(&w, &cases);
}

#[test]
fn bad_input_policies_and_configs_change_nothing() {
    let (w, t) = bad_input_wallet();
    let op = w.operator.as_str();
    let module = guests::bytes("spend-limit");
    let max_module = 8 * 1024 * 1024; // the sandbox's default `max_module_bytes`
    let mut cases = Vec::new();

    // Uploads that are no policy: not Wasm, empty, a header alone, an empty
    // module, cut short, with bytes after its end, the wrong exports, a WASI
    // import, JSON; and one byte over the module size cap.
    let upload = || bad(op, "POST", "/v1/policies?name=new-policy");
    for junk in [
        b"not a wasm module".to_vec(),
        Vec::new(),
        b"\0asm".to_vec(),
        b"\0asm\x01\0\0\0".to_vec(),
        b"\0asm\x0d\0\x01\0".to_vec(),
        b"\0asm\x02\0\0\0".to_vec(),
        module[..module.len() / 2].to_vec(),
        module[..module.len() - 1].to_vec(),
        [module.as_slice(), b"trailing junk"].concat(),
        guests::bytes("guest-wrong-exports"),
        guests::bytes("guest-wasi-import"),
        br#"{"module": "AGFzbQEAAAA="}"#.to_vec(),
    ] {
        cases.push(upload().module(junk).refused(422, "invalid_policy"));
    }
    let mut too_big = module.clone();
    too_big.resize(max_module + 1, 0);
    cases.push(upload().module(too_big.clone()).refused(413, "too_large"));
    cases.push(upload().module(too_big).chunked().refused(413, "too_large"));

    // Names a policy cannot have, with a module that would load.
    for query in [
        "".to_owned(),
        "?".to_owned(),
        "?name=".to_owned(),
        "?name=Bad%20Name".to_owned(),
        "?name=UPPER".to_owned(),
        "?name=a%2Fb".to_owned(),
        "?name=..%2Fetc".to_owned(),
        "?name=spend-limit%402".to_owned(),
        format!("?name={}", "a".repeat(65)),
        "?name=%C3%A9t%C3%A9".to_owned(),
        "?name=x%00".to_owned(),
        "?name=%E2%80%AEx".to_owned(),
        "?name=a%20".to_owned(),
        "?name=%FF".to_owned(),
        "?name=a&name=b".to_owned(),
        "?name=ok&version=2".to_owned(),
        "?nam=x".to_owned(),
    ] {
        cases.push(
            bad(op, "POST", format!("/v1/policies{query}"))
                .module(module.clone())
                .refused(422, "invalid_name"),
        );
    }

    // Attachments: by POST /v1/agents and by PUT on the bot, whose policies a
    // refusal must leave as they are.
    let put = format!("/v1/agents/{}/policies", t.bot.id);
    let attach = |policies: Value| {
        [
            bad(op, "POST", "/v1/agents").json(&json!({"name": "new bot", "policies": policies})),
            bad(op, "PUT", put.as_str()).json(&json!({"policies": policies})),
        ]
    };
    let limit = |config: Value| json!([{"policy": "spend-limit", "config": config}]);
    let mut refuse = |requests: [Bad; 2], status: u16, code: &'static str| {
        cases.extend(requests.map(|r| r.refused(status, code)));
    };
    for policy in ["no-such-policy", "spend-limit@0", "spend-limit@3", "approval-threshold@2"] {
        refuse(attach(json!([{"policy": policy}])), 422, "unknown_policy");
    }
    for policy in [
        "spend-limit@",
        "spend-limit@x",
        "spend-limit@-1",
        "spend-limit@1.0",
        "spend-limit@ 1",
        "spend-limit@4294967296",
        "spend-limit@1@1",
    ] {
        refuse(attach(json!([{"policy": policy}])), 422, "invalid_policy_ref");
    }
    let long_name = "a".repeat(65);
    for policy in [
        "",
        "Spend-Limit",
        "spend limit",
        "@1",
        "../spend-limit",
        "spend-limit\u{0}",
        "spend-limit\u{202e}",
        &long_name,
    ] {
        refuse(attach(json!([{"policy": policy}])), 422, "invalid_name");
    }
    let many: Vec<Value> = (0..33)
        .map(|_| json!({"policy": "spend-limit@1", "config": {"limit": "50.00", "currency": "USD"}}))
        .collect();
    refuse(attach(json!(many)), 422, "too_many_policies");

    // Configs the policy refuses (its `validate-config`), alone or beside a
    // good one.
    for config in [
        json!({}),
        json!(null),
        json!({"limt": "50.00", "currency": "USD"}),
        json!({"limit": "-5", "currency": "USD"}),
        json!({"limit": "ten", "currency": "USD"}),
        json!({"limit": "50.00", "currency": "usd"}),
        json!({"limit": "50.00", "currency": "USD", "window": "0h"}),
        json!({"limit": "50.00", "currency": "USD", "window": "24x"}),
        json!({"limit": "50.00", "currency": "USD", "mcc": "57"}),
        json!({"limit": "50.00", "currency": "USD", "colour": "red"}),
        json!("limit 50.00 USD"),
        json!([]),
        json!(7),
        json!(true),
    ] {
        refuse(attach(limit(config)), 422, "invalid_config");
    }
    for threshold in [json!({"threshold": "-1", "currency": "USD"}), json!({"threshold": "10.00"})] {
        let both = json!([
            {"policy": "spend-limit", "config": {"limit": "50.00", "currency": "USD"}},
            {"policy": "approval-threshold", "config": threshold},
        ]);
        refuse(attach(both), 422, "invalid_config");
    }
    // A config nested deeper than a JSON parser goes is no JSON.
    let deep = format!(
        r#"{{"name": "new bot", "policies": [{{"policy": "spend-limit", "config": {}1{}}}]}}"#,
        "[".repeat(5_000),
        "]".repeat(5_000)
    );
    cases.push(bad(op, "POST", "/v1/agents").text(deep.clone()).refused(422, "invalid_json"));
    assert_refused_changing_nothing(&w, &cases);
}

/// Odd but printable text is no bad input: accents in either Unicode normal
/// form, other scripts and right-to-left text, emoji joined by zero-width
/// joiners, combining marks, text at the length limit; and amounts with a
/// plus sign, a leading zero or trailing zeros. Each is stored as sent (the
/// daemon normalises no text: an id in NFC and the same id in NFD are two
/// merchants, and a card locked to one does not pay the other).
#[test]
fn bad_input_that_is_fine_is_stored_verbatim() {
    let w = Wallet::new();
    w.deposit("1000.00");
    w.upload("spend-limit", "spend-limit");
    let name = "Zoë's bot 🤖";
    let labels = json!({"équipe": "recherche", "👨\u{200d}👩\u{200d}👧": "famille", "لغة": "العربية"});
    let policies = json!([{"policy": "spend-limit", "config": {"limit": "900.00", "currency": "USD"}}]);
    let reply =
        w.post("/v1/agents", &w.operator, json!({"name": name, "labels": labels, "policies": policies}));
    let created = reply.expect(201, "an agent with an odd name");
    assert_eq!(created["name"], name);
    let bot = AgentToken {
        id: created["id"].as_str().unwrap().to_owned(),
        token: created["token"].as_str().unwrap().to_owned(),
    };
    let agents = w.read("/v1/agents");
    let agent = agents["agents"].as_array().unwrap().iter().find(|a| a["id"] == bot.id.as_str()).unwrap();
    assert_eq!((&agent["name"], &agent["labels"]), (&json!(name), &labels), "{agent}");

    let nfc = "bücher.de";
    let nfd = "bu\u{308}cher.de";
    let merchants = [
        (nfc, "Bücherstube Zürich", "Bücher für die Übersetzung 📚"),
        ("buecher.de", "Bu\u{308}cherstube Zu\u{308}rich", "the same shop's name, spelt in NFD"),
        (
            "shop.example.com",
            "Cafe\u{301} \u{5d7}\u{5e0}\u{5d5}\u{5ea} متجر 東京ストア",
            "mixed scripts, no overrides",
        ),
        ("family.example", "👨\u{200d}👩\u{200d}👧 shop, نمی\u{200c}خواهم", "zero-width joiners"),
        ("zalgo.example", "Z\u{324}\u{354}a\u{308}\u{316}l\u{36e}g\u{30c}o", "combining marks"),
        ("example.com\u{1f600}", "emoji in an id", "tab-free, space-free"),
    ];
    let long_id = "a".repeat(MAX_NAME_CHARS);
    let long_name = "é".repeat(MAX_NAME_CHARS);
    let long_purpose = "ü".repeat(MAX_PURPOSE_CHARS);
    let all: Vec<(&str, &str, &str)> = merchants
        .iter()
        .copied()
        .chain([(long_id.as_str(), long_name.as_str(), long_purpose.as_str())])
        .collect();
    let mut cards = BTreeMap::new();
    for (id, name, purpose) in all {
        let body = json!({"amount": "1.00", "currency": "USD",
                          "merchant": {"id": id, "name": name, "mcc": "5942", "country": "DE"}, "purpose": purpose});
        let spend =
            w.post("/v1/spends", &bot.token, body.clone()).expect(201, &format!("a proposal at {id:?}"));
        assert_eq!(spend["status"], "approved", "{spend}");
        assert_eq!(spend["card"]["merchant_id"], id, "the card is locked to the id as sent");
        let stored = w.read(&format!("/v1/spends/{}", spend["id"].as_str().unwrap()));
        assert_eq!(
            (&stored["merchant"], &stored["purpose"]),
            (&body["merchant"], &body["purpose"]),
            "{stored}"
        );
        cards.insert(id.to_owned(), spend["card"].clone());
    }
    // A character beyond the BMP, escaped as a JSON surrogate pair, is that
    // character (a lone surrogate is no JSON: `LONE_SURROGATES`).
    let escaped = r#"{"amount": "1.00", "currency": "USD", "purpose": "an escaped pair",
                     "merchant": {"id": "pair.example", "name": "\ud83d\ude00 shop", "mcc": "5942"}}"#;
    let reply = w.send("POST", "/v1/spends", Some(&bearer(&bot.token)), &[], Body::Text(escaped));
    let spend = reply.expect(201, "a surrogate pair");
    let stored = w.read(&format!("/v1/spends/{}", spend["id"].as_str().unwrap()));
    assert_eq!(stored["merchant"]["name"], "\u{1f600} shop", "{stored}");
    // An id spelt in NFD looks like the NFC one: refused as a lookalike (in a
    // proposal and from the network), never a card of its own.
    let mut body = proposal("1.00", nfd, "5942");
    body["merchant"]["name"] = json!("Bücherstube");
    w.post("/v1/spends", &bot.token, body).refused(422, "confusable_merchant", "an id in NFD");
    let card = &cards[nfc];
    let charge = json!({
        "pan": card["pan"], "cvv": card["cvv"], "exp_month": card["exp_month"], "exp_year": card["exp_year"],
        "amount": "1.00", "currency": "USD", "merchant_id": nfd,
    });
    w.post("/v1/network/authorizations", &w.network, charge).refused(422, "confusable_merchant", "NFD");
    assert_eq!(w.charge(&cards[nfc], "1.00", nfc), approved());

    for (amount, stored) in [("+12.50", "12.50"), ("012.5", "12.50"), ("12.500", "12.50"), ("0.01", "0.01")] {
        let spend = w.propose(&bot, amount, "api.openai.com", "5734").expect(201, amount);
        let record = w.read(&format!("/v1/spends/{}", spend["id"].as_str().unwrap()));
        assert_eq!((&record["amount"], &record["currency"]), (&json!(stored), &json!("USD")), "{amount}");
        assert_eq!(spend["card"]["limit"], stored, "{spend}");
    }
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
