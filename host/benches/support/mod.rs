//! What the daemon benches share: a fresh wallet with its daemon, an HTTP
//! client, and where the built policies are.

#![allow(dead_code)] // each bench uses its own part

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

/// A number from the environment, or `default`.
pub fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The example spend-limit policy as `make policies` built it.
pub fn spend_limit_module() -> Vec<u8> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let wasm = target.join("wasm32-unknown-unknown/release/spend_limit.wasm");
    std::fs::read(&wasm).unwrap_or_else(|e| panic!("{}: {e} (run `make policies` first)", wasm.display()))
}

/// A fresh data directory with `spendguard serve` on it (logging only
/// warnings), killed when dropped.
pub struct Daemon {
    pub child: Child,
    pub url: String,
    pub operator: String,
    pub network: String,
    _dir: tempfile::TempDir,
}

impl Daemon {
    pub fn start() -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let bin = env!("CARGO_BIN_EXE_spendguard");
        let out = Command::new(bin)
            .args(["init", "--data-dir", data.to_str().unwrap(), "--json"])
            .output()
            .unwrap();
        assert!(out.status.success(), "init: {}", String::from_utf8_lossy(&out.stderr));
        let tokens: Value = serde_json::from_slice(&out.stdout).unwrap();
        let token = |key: &str| tokens[key].as_str().unwrap().to_owned();
        // The load generator drives one agent as fast as the daemon goes
        // (`SG_BENCH_AGENTS=1`): the per-agent rate and quota are raised out
        // of its way (one agent at 2,000 proposals a second would reach the
        // shipped quota of 20,000 within a run), so the figures are the
        // daemon's, not the limiter's. The quota is still counted, as in
        // production: at most once a second per agent.
        let config = dir.path().join("serve.toml");
        std::fs::write(
            &config,
            "agent_rate_per_second = 1000000\nagent_burst = 1000000\nagent_quota = 1000000000\n",
        )
        .unwrap();
        let mut child = Command::new(bin)
            .args(["serve", "--data-dir", data.to_str().unwrap(), "--listen", "127.0.0.1:0"])
            .args(["--config", config.to_str().unwrap()])
            .env("SPENDGUARD_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let url =
            line.trim().strip_prefix("spendguard listening on ").expect("the daemon's address").to_owned();
        Daemon { child, url, operator: token("operator_token"), network: token("network_token"), _dir: dir }
    }
}

impl Daemon {
    /// Fund the wallet with `amount` USD, as the operator.
    pub fn deposit(&self, http: &ureq::Agent, amount: &str) {
        let (s, v) = post(
            http,
            &format!("{}/v1/wallet/deposits", self.url),
            &self.operator,
            &serde_json::json!({"amount": amount, "currency": "USD"}),
        );
        assert_eq!(s, 201, "{v}");
    }

    /// CPU time the daemon has used so far, user and system.
    pub fn cpu(&self) -> Duration {
        cpu_of(&self.child.id().to_string())
    }
}

/// CPU time a process (`self`, or a pid) has used so far, user and system,
/// from `/proc/PID/stat`.
pub fn cpu_of(pid: &str) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command's closing parenthesis; utime and stime are
    // the 14th and 15th of the whole line, in clock ticks.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    let hz = Command::new("getconf").arg("CLK_TCK").output().unwrap();
    let hz: u64 = String::from_utf8_lossy(&hz.stdout).trim().parse().unwrap();
    Duration::from_micros(ticks * 1_000_000 / hz)
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP client that reports every status instead of failing on it.
pub fn http(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .timeout_global(Some(timeout))
        .build()
        .into()
}

/// POST `body` with a bearer token; the status and the JSON answer.
pub fn send(http: &ureq::Agent, url: &str, token: &str, content_type: &str, body: &[u8]) -> (u16, Value) {
    let mut r = http
        .post(url)
        .header("Authorization", format!("Bearer {token}"))
        .header("Content-Type", content_type)
        .send(body)
        .unwrap();
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// [`send`] a JSON body.
pub fn post(http: &ureq::Agent, url: &str, token: &str, body: &Value) -> (u16, Value) {
    send(http, url, token, "application/json", body.to_string().as_bytes())
}
