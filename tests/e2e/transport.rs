//! The daemon's connections against slow and hostile clients: bodies read
//! only after the token is checked, header, body and idle timeouts, a cap on
//! connections, a shutdown deadline; TLS, and plain HTTP refused beyond
//! loopback; per-agent rates and quotas; one `Authorization` header; data
//! files owner-only; errors that repeat no secret.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{
    Body, Kind, LISTENING, STARTUP_TIMEOUT, Wallet, bad, bearer, path, proposal, send_raw, spendguard,
};

/// Far longer than any timeout these tests configure: what a test waits at
/// most for the daemon to act on one.
const PATIENCE: Duration = Duration::from_secs(20);

/// A wallet whose daemon serves with `config` (TOML).
fn configured(config: &str) -> Wallet {
    let mut w = Wallet::new();
    reconfigure(&mut w, config);
    w
}

fn reconfigure(w: &mut Wallet, config: &str) {
    let file = w.data.with_file_name("serve.toml");
    std::fs::write(&file, config).unwrap();
    w.stop();
    w.restart_with(&["--config", path(&file)]);
}

fn addr(w: &Wallet) -> String {
    w.daemon.url.trim_start_matches("http://").to_owned()
}

fn connect(w: &Wallet) -> TcpStream {
    let stream = TcpStream::connect(addr(w)).expect("the daemon accepts a connection");
    stream.set_nodelay(true).unwrap();
    stream
}

/// Whether the daemon closes `stream` within `within` (whatever it sends
/// before, a 408 say, is read and dropped).
fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return false;
            }
            Err(_) => return true,
        }
    }
}

/// The head of the first response read on `stream` within `within`, and the
/// body bytes that came with it; `None` when none came.
fn response_within(stream: &mut TcpStream, within: Duration) -> Option<(String, String)> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).into_owned();
            let length = head
                .to_ascii_lowercase()
                .lines()
                .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap()))
                .unwrap_or(0);
            if got.len() >= end + 4 + length {
                return Some((head, String::from_utf8_lossy(&got[end + 4..end + 4 + length]).into_owned()));
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

fn status(head: &str) -> u16 {
    head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no status in {head:?}"))
}

/// A request head, `Content-Length: length` announced, the body not sent.
fn head(w: &Wallet, method: &str, target: &str, token: Option<&str>, length: usize) -> String {
    let auth = token.map(|t| format!("Authorization: {}\r\n", bearer(t))).unwrap_or_default();
    format!(
        "{method} {target} HTTP/1.1\r\nHost: {}\r\n{auth}Content-Type: application/octet-stream\r\nContent-Length: {length}\r\n\r\n",
        addr(w)
    )
}

// ---- bodies after tokens ---------------------------------------------------

#[test]
fn an_upload_is_refused_from_its_head_before_its_body_is_read() {
    let w = Wallet::new();
    let agent = w.create_agent("bot", json!([]));
    // No token, and the wrong role: answered from the head alone, while the
    // client has not sent a byte of its 4 MB module.
    for (token, expected, code) in
        [(None, 401, "missing_token"), (Some(agent.token.as_str()), 403, "forbidden")]
    {
        let mut stream = connect(&w);
        stream.write_all(head(&w, "POST", "/v1/policies?name=x", token, 4_000_000).as_bytes()).unwrap();
        let (head, body) = response_within(&mut stream, PATIENCE).unwrap_or_else(|| {
            panic!("no answer to an upload's head within {PATIENCE:?} (token: {token:?})")
        });
        assert_eq!(status(&head), expected, "{head}\n{body}");
        assert!(body.contains(code), "{body}");
    }

    // Forty clients with no token each send 4 MiB of a module and stall:
    // the daemon keeps none of it.
    let pid = w.daemon.pid();
    let before = crate::support::rss_bytes(&pid);
    let chunk = vec![0u8; 4 * 1024 * 1024];
    let streams: Vec<TcpStream> = (0..40)
        .map(|_| {
            let mut stream = connect(&w);
            stream.write_all(head(&w, "POST", "/v1/policies?name=x", None, 8_000_000).as_bytes()).unwrap();
            stream.write_all(&chunk).unwrap();
            stream
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let after = crate::support::rss_bytes(&pid);
    let grown = after.saturating_sub(before);
    assert!(
        grown < 48 * 1024 * 1024,
        "40 stalled uploads with no token grew the daemon by {} MiB",
        grown / (1024 * 1024)
    );
    drop(streams);
    // And it still serves.
    w.read("/v1/wallet");
}

#[test]
fn a_stalled_body_is_answered_408_and_a_slow_head_is_cut_off() {
    let w = configured("body_timeout_ms = 1000\nheader_read_timeout_ms = 1000\nidle_timeout_ms = 60000\n");
    // A deposit whose body stops after 10 of its 100 bytes.
    let mut stream = connect(&w);
    stream.write_all(head(&w, "POST", "/v1/wallet/deposits", Some(&w.operator), 100).as_bytes()).unwrap();
    stream.write_all(br#"{"amount":"#).unwrap();
    let (head, body) =
        response_within(&mut stream, PATIENCE).expect("a stalled body is answered within the body timeout");
    assert_eq!(status(&head), 408, "{head}\n{body}");
    let error: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error["error"]["code"], "request_timeout", "{body}");
    assert!(closed_within(&mut stream, PATIENCE), "the connection of a stalled body is closed");

    // A head sent a line at a time, for ever: cut off after the header
    // timeout, bytes coming in or not.
    let mut slow = connect(&w);
    slow.write_all(b"GET /healthz HTTP/1.1\r\n").unwrap();
    let started = Instant::now();
    let mut cut = false;
    while started.elapsed() < PATIENCE {
        if slow.write_all(b"X-Slow: 1\r\n").is_err() || closed_within(&mut slow, Duration::from_millis(200)) {
            cut = true;
            break;
        }
    }
    assert!(cut, "a head dripping in for {PATIENCE:?} was not cut off");
    w.assert_wallet_empty();
}

#[test]
fn an_idle_connection_is_closed() {
    let w = configured("idle_timeout_ms = 1000\nheader_read_timeout_ms = 60000\n");
    let mut stream = connect(&w);
    stream.write_all(format!("GET /healthz HTTP/1.1\r\nHost: {}\r\n\r\n", addr(&w)).as_bytes()).unwrap();
    let (head, _) = response_within(&mut stream, PATIENCE).expect("/healthz answers");
    assert_eq!(status(&head), 200, "{head}");
    assert!(closed_within(&mut stream, PATIENCE), "an idle kept-alive connection stayed open");
}

#[test]
fn connections_beyond_the_cap_wait_for_a_free_one() {
    let w = configured("max_connections = 2\nheader_read_timeout_ms = 60000\nidle_timeout_ms = 60000\n");
    let first = connect(&w);
    let second = connect(&w);
    // Served once accepted: give the daemon the time to take both.
    std::thread::sleep(Duration::from_millis(300));
    let mut third = connect(&w);
    third.write_all(format!("GET /healthz HTTP/1.1\r\nHost: {}\r\n\r\n", addr(&w)).as_bytes()).unwrap();
    assert!(
        response_within(&mut third, Duration::from_secs(1)).is_none(),
        "a third connection was served beyond a cap of two"
    );
    drop(first);
    let (head, _) = response_within(&mut third, PATIENCE).expect("served once a connection closed");
    assert_eq!(status(&head), 200, "{head}");
    drop(second);
}

#[test]
fn slow_clients_do_not_hold_the_shutdown_past_its_deadline() {
    let mut w = configured(
        "shutdown_timeout_ms = 1000\nheader_read_timeout_ms = 60000\nbody_timeout_ms = 60000\nidle_timeout_ms = 60000\n",
    );
    let mut slow = Vec::new();
    for _ in 0..2 {
        let mut stream = connect(&w);
        stream.write_all(b"GET /healthz HTTP/1.1\r\nX-Slow: 1\r\n").unwrap();
        slow.push(stream);
        // A deposit in flight, its body stalled.
        let mut stream = connect(&w);
        stream.write_all(head(&w, "POST", "/v1/wallet/deposits", Some(&w.operator), 100).as_bytes()).unwrap();
        stream.write_all(b"{").unwrap();
        slow.push(stream);
    }
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    // Exits, cleanly, within the harness's shutdown timeout.
    w.stop();
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    drop(slow);
}

// ---- TLS, and plain HTTP beyond loopback ---------------------------------------

/// `serve` on `listen` with `config`, for at most `PATIENCE`: whether it
/// printed that it listens, then its exit status (killed if still running)
/// and stderr.
fn serve_on(data: &Path, listen: &str, config: Option<&Path>) -> (bool, std::process::ExitStatus, String) {
    let mut cmd = spendguard();
    cmd.args(["serve", "--data-dir", path(data), "--listen", listen]);
    if let Some(config) = config {
        cmd.args(["--config", path(config)]);
    }
    let mut child = cmd
        .env_remove("SPENDGUARD_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        let mut reader = std::io::BufReader::new(stdout);
        let _ = std::io::BufRead::read_line(&mut reader, &mut text);
        let _ = tx.send(text);
    });
    let listened = rx.recv_timeout(STARTUP_TIMEOUT).unwrap_or_default().starts_with(LISTENING);
    let deadline = Instant::now() + PATIENCE;
    while child.try_wait().unwrap().is_none() && !listened && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    (listened, status, stderr)
}

#[test]
fn plain_http_beyond_loopback_is_refused_unless_explicitly_allowed() {
    let mut w = Wallet::new();
    w.stop();
    let (listened, status, stderr) = serve_on(&w.data, "0.0.0.0:0", None);
    assert!(!listened && !status.success(), "served plain HTTP on 0.0.0.0: {status} {stderr}");
    assert!(stderr.contains("allow_insecure_http") && stderr.contains("[tls]"), "{stderr}");

    let config = w.data.with_file_name("insecure.toml");
    std::fs::write(&config, "allow_insecure_http = true\n").unwrap();
    let (listened, _, stderr) = serve_on(&w.data, "0.0.0.0:0", Some(&config));
    assert!(listened, "`allow_insecure_http = true` serves: {stderr}");
    assert!(stderr.contains("plain HTTP beyond loopback"), "the daemon warns: {stderr}");
}

#[test]
fn the_daemon_serves_https_with_a_configured_certificate() {
    let mut w = Wallet::new();
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
    let (chain, key) = (w.data.with_file_name("cert.pem"), w.data.with_file_name("key.pem"));
    std::fs::write(&chain, cert.pem()).unwrap();
    std::fs::write(&key, signing_key.serialize_pem()).unwrap();
    reconfigure(&mut w, &format!("[tls]\ncert_chain = {:?}\nprivate_key = {:?}\n", path(&chain), path(&key)));
    assert!(w.daemon.url.starts_with("https://127.0.0.1:"), "{}", w.daemon.url);

    let root = ureq::tls::Certificate::from_der(cert.der()).to_owned();
    let tls = ureq::tls::TlsConfig::builder()
        .provider(ureq::tls::TlsProvider::Rustls)
        .root_certs(ureq::tls::RootCerts::Specific(std::sync::Arc::new(vec![root])))
        .build();
    w.http = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .tls_config(tls)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into();
    let health = w.send("GET", "/healthz", None, &[], Body::None);
    assert_eq!(health.status, 200, "{}", health.text);
    w.deposit("5.00");
    w.assert_wallet("5.00", "0.00", "0.00");

    // The CLI, trusting that certificate.
    let cli = |ca: Option<&Path>| {
        let mut cmd = spendguard();
        cmd.args(["wallet", "show", "--json"])
            .env("SPENDGUARD_URL", &w.daemon.url)
            .env("SPENDGUARD_TOKEN", &w.operator)
            .env_remove("SPENDGUARD_CA_CERT");
        if let Some(ca) = ca {
            cmd.env("SPENDGUARD_CA_CERT", ca);
        }
        cmd.output().unwrap()
    };
    let out = cli(Some(&chain));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let shown: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["balances"][0]["available"], "5.00", "{shown}");
    // Not trusting it (the Web PKI roots only): refused, nothing sent.
    let out = cli(None);
    assert!(!out.status.success(), "a self-signed certificate was trusted by default");

    // Plain HTTP on the TLS port gets no HTTP answer.
    let mut plain = TcpStream::connect(w.daemon.url.trim_start_matches("https://")).unwrap();
    plain.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let answer = response_within(&mut plain, Duration::from_secs(5));
    assert!(answer.as_ref().is_none_or(|(head, _)| !head.starts_with("HTTP/1.1 200")), "{answer:?}");
}

// ---- per-agent rate and quota ------------------------------------------------

/// A proposal: status, `Retry-After`, body.
fn propose(w: &Wallet, token: &str) -> (u16, Option<u64>, Value) {
    let mut reply = w
        .http
        .post(&w.url("/v1/spends"))
        .header("Authorization", &bearer(token))
        .header("Content-Type", "application/json")
        .send(proposal("1.00", "api.openai.com", "5734").to_string())
        .unwrap();
    let retry_after = reply.headers().get("retry-after").map(|v| v.to_str().unwrap().parse().unwrap());
    let body = reply.body_mut().read_json().unwrap_or(Value::Null);
    (reply.status().as_u16(), retry_after, body)
}

fn spend_count(w: &Wallet) -> usize {
    w.read("/v1/spends?limit=1000")["spends"].as_array().unwrap().len()
}

#[test]
fn an_agent_past_its_rate_is_told_when_to_retry_and_nothing_is_recorded() {
    let w = configured("agent_rate_per_second = 1\nagent_burst = 1\n");
    w.deposit("100.00");
    let agent = w.create_agent("eager", json!([]));
    let other = w.create_agent("calm", json!([]));
    let audit_len = || w.read("/v1/audit?limit=1000")["records"].as_array().unwrap().len();
    // What one proposal writes to the audit trail.
    let before = audit_len();
    assert_eq!(propose(&w, &other.token).0, 201);
    let per_proposal = audit_len() - before;
    let audit_before = audit_len();
    let mut admitted = 0;
    let mut refused = None;
    for _ in 0..20 {
        let (status, retry_after, body) = propose(&w, &agent.token);
        if status == 429 {
            refused = Some((retry_after, body));
            break;
        }
        assert_eq!(status, 201, "{body}");
        admitted += 1;
    }
    let (retry_after, body) = refused.expect("20 proposals in a row at 1 a second: one is refused");
    assert_eq!(body["error"]["code"], "rate_limited", "{body}");
    assert!(retry_after.is_some_and(|s| (1..=2).contains(&s)), "Retry-After: {retry_after:?}");
    assert_eq!(spend_count(&w), admitted + 1, "a refused proposal is not recorded");
    assert_eq!(audit_len() - audit_before, admitted * per_proposal, "a refusal wrote an audit record");
    // Another agent has its own rate: a fresh one is served at once.
    let fresh = w.create_agent("fresh", json!([]));
    assert_eq!(propose(&w, &fresh.token).0, 201);
}

fn quota_holds_across_restarts(kind: Kind) {
    let mut w = Wallet::on(kind);
    reconfigure(&mut w, "agent_quota = 3\n");
    w.deposit("100.00");
    let agent = w.create_agent("thrifty", json!([]));
    for i in 0..3 {
        let (status, _, body) = propose(&w, &agent.token);
        assert_eq!(status, 201, "proposal {i}: {body}");
    }
    let check_refused = |w: &Wallet| {
        let (status, retry_after, body) = propose(w, &agent.token);
        assert_eq!(status, 429, "{body}");
        assert_eq!(body["error"]["code"], "quota_exceeded", "{body}");
        let wait = retry_after.expect("a Retry-After header");
        assert!((86_000..=86_400).contains(&wait), "Retry-After: {wait}");
    };
    check_refused(&w);
    w.stop();
    w.restart_with(&["--config", path(&w.data.with_file_name("serve.toml"))]);
    check_refused(&w);
    assert_eq!(spend_count(&w), 3);
    let other = w.create_agent("other", json!([]));
    assert_eq!(propose(&w, &other.token).0, 201, "the quota is per agent");
}

#[test]
fn an_agent_past_its_quota_is_refused_across_restarts_sqlite() {
    quota_holds_across_restarts(Kind::Sqlite);
}

#[test]
fn an_agent_past_its_quota_is_refused_across_restarts_postgres() {
    quota_holds_across_restarts(Kind::Postgres);
}

// ---- headers, files, errors -------------------------------------------------------

#[test]
fn two_authorization_headers_are_refused() {
    let w = Wallet::new();
    let unknown = format!("sg_op_{}", "0".repeat(64));
    // Whichever comes first, valid or not.
    for (first, second) in [(w.operator.clone(), unknown.clone()), (unknown, w.operator.clone())] {
        let request = bad(&first, "GET", "/v1/wallet").header("Authorization", bearer(&second));
        let (reply, _) = send_raw(&w, &request).unwrap();
        reply.refused(400, "duplicate_authorization", "two Authorization headers");
        let request = bad(&first, "POST", "/v1/wallet/deposits")
            .header("Authorization", bearer(&second))
            .json(&json!({"amount": "5.00", "currency": "USD"}));
        let (reply, _) = send_raw(&w, &request).unwrap();
        reply.refused(400, "duplicate_authorization", "a deposit with two Authorization headers");
    }
    w.assert_wallet_empty();
}

#[cfg(unix)]
#[test]
fn every_file_of_the_data_directory_is_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let mut w = Wallet::new();
    w.upload("approval-threshold", "approval-threshold");
    w.deposit("100.00");
    let agent = w.create_agent(
        "bot",
        json!([{"policy": "approval-threshold", "config": {"threshold": "50.00", "currency": "USD"}}]),
    );
    w.propose(&agent, "1.00", "api.openai.com", "5734").expect(201, "a proposal");
    w.stop();
    w.restart();
    w.propose(&agent, "1.00", "api.openai.com", "5734").expect(201, "a proposal after a restart");

    fn walk(dir: &Path, found: &mut Vec<(std::path::PathBuf, u32, bool)>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let meta = entry.metadata().unwrap();
            found.push((entry.path(), meta.permissions().mode() & 0o777, meta.is_dir()));
            if meta.is_dir() {
                walk(&entry.path(), found);
            }
        }
    }
    let mut found =
        vec![(w.data.clone(), std::fs::metadata(&w.data).unwrap().permissions().mode() & 0o777, true)];
    walk(&w.data, &mut found);
    let names: Vec<String> = found.iter().map(|(p, _, _)| p.display().to_string()).collect();
    for suffix in ["spendguard.db", "spendguard.db-wal", "spendguard.db-shm"] {
        assert!(names.iter().any(|n| n.ends_with(suffix)), "no {suffix} in {names:?}");
    }
    assert!(found.iter().filter(|(_, _, dir)| *dir).count() >= 2, "a cache directory: {names:?}");
    assert!(found.iter().filter(|(_, _, dir)| !dir).count() >= 5, "the key and a cached policy: {names:?}");
    let wrong: Vec<String> = found
        .iter()
        .filter(|(_, mode, dir)| *mode != if *dir { 0o700 } else { 0o600 })
        .map(|(p, mode, _)| format!("{} {mode:o}", p.display()))
        .collect();
    assert!(wrong.is_empty(), "not owner-only: {wrong:?}");
}

#[test]
fn errors_do_not_repeat_a_query_or_a_path() {
    let w = Wallet::new();
    let agent = w.create_agent("bot", json!([]));
    for (token, target) in [
        (&w.operator, "/v1/wallet?token=SECRET"),
        (&w.operator, "/v1/cards?access_token=SECRET"),
        (&agent.token, "/v1/spends?token=SECRET"),
        (&agent.token, "/v1/spends?limit=SECRET"),
        (&w.operator, "/v1/audit?after=SECRET"),
        (&w.operator, "/v1/audit?SECRET=1"),
    ] {
        let reply = w.get(target, token);
        reply.refused(422, "invalid_query", target);
        assert!(!reply.text.contains("SECRET"), "{target}: {}", reply.text);
    }
    let (reply, _) = send_raw(&w, &bad(&w.operator, "GET", &b"/v1/spends/%FFSECRET"[..])).unwrap();
    reply.refused(404, "not_found", "an id that is no UTF-8");
    assert!(!reply.text.contains("SECRET"), "{}", reply.text);
    // A charge's card data of the wrong type is not quoted back.
    for (pan, cvv) in [(json!(4000000000000002u64), json!("987")), (json!("4000000000000002"), json!(987))] {
        let body = json!({"pan": pan, "cvv": cvv, "exp_month": 12, "exp_year": 2030,
                          "amount": "1.00", "currency": "USD", "merchant_id": "api.openai.com"});
        let reply = w.post("/v1/network/authorizations", &w.network, body);
        reply.refused(422, "invalid_json", "card data of the wrong type");
        assert!(!reply.text.contains("4000000000000002") && !reply.text.contains("987"), "{}", reply.text);
    }
    // The daemon logged none of it either.
    assert!(!w.daemon.log().contains("SECRET"), "{}", w.daemon.log());
}

impl Wallet {
    fn assert_wallet_empty(&self) {
        let wallet = self.read("/v1/wallet");
        assert!(
            wallet["balances"].as_array().is_none_or(|b| b.iter().all(|b| b["available"] == "0.00")),
            "{wallet}"
        );
    }
}
