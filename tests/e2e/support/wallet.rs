//! A wallet as its users drive it over real HTTP: `spendguard init`, then a
//! daemon serving it, spoken to with bearer tokens by an operator, by agents
//! and by the card network.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::support::{Daemon, guests, path, spendguard};

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
    pub(crate) _db: Option<std::sync::Arc<crate::support::TestDatabase>>,
    pub(crate) _dir: tempfile::TempDir,
}

impl Wallet {
    /// A wallet in SQLite, its daemon serving.
    pub(crate) fn new() -> Wallet {
        Wallet::on(crate::support::Kind::Sqlite)
    }

    /// A wallet on `kind` (PostgreSQL: a fresh database), its daemon serving.
    pub(crate) fn on(kind: crate::support::Kind) -> Wallet {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("data");
        let db = (kind == crate::support::Kind::Postgres)
            .then(|| std::sync::Arc::new(crate::support::TestDatabase::create()));
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

/// `spendguard_policy_loads_total` by source, from `/metrics`: (compiled, cache).
pub(crate) fn loads(w: &Wallet) -> (u64, u64) {
    let text = w.send("GET", "/metrics", None, &[], Body::None).text;
    let count = |source: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("spendguard_policy_loads_total{{source=\"{source}\"}}")))
            .and_then(|l| l.rsplit(' ').next())
            .map_or(0, |v| v.parse::<f64>().unwrap() as u64)
    };
    (count("compiled"), count("cache"))
}
