//! The HTTP client every daemon verb shares: where the daemon is, which token
//! it is shown, and how its answers and refusals are read.
//!
//! Secrets stay out of every message this module makes: the token is only
//! ever put in the `Authorization` header, and neither request bodies nor
//! response bodies (which may carry a card's PAN and CVV) are quoted in an
//! error, except the body of a refusal, which never carries card data.

use std::fmt;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, anyhow};
use clap::Args;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use ureq::http::{Response, StatusCode};
use ureq::{Body, RequestBuilder};

use super::UsageError;

/// Where `spendguard serve` listens unless told otherwise.
pub const DEFAULT_URL: &str = "http://127.0.0.1:7420";

/// How long to wait for the daemon to accept a connection. It runs on this
/// machine or a nearby one; a daemon that takes longer is not there.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one request may take in all. A proposal runs every attached
/// policy (each under its own deadline of well under a second) and an upload
/// compiles a module; a minute is far beyond both, yet stops a hung daemon
/// from hanging a script for ever.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// The largest response body read. A page of audit records or a list of
/// spends is far smaller; anything bigger is not a spendguard daemon.
const MAX_RESPONSE_BYTES: u64 = 32 * 1024 * 1024;

/// The most characters of a non-JSON error body quoted in a message: enough
/// for a proxy's or framework's one-line complaint, not a whole HTML page.
const MAX_QUOTED_CHARS: usize = 200;

/// Where the daemon is and which token to show it. Global flags: they may be
/// given before or after the subcommand.
#[derive(Clone, Args)]
pub struct ConnArgs {
    /// The daemon's base URL: http:// (on loopback) or https://.
    #[arg(
        long,
        global = true,
        env = "SPENDGUARD_URL",
        default_value = DEFAULT_URL,
        value_name = "URL",
        help_heading = "Daemon connection"
    )]
    url: String,
    /// Bearer token: the operator's, an agent's or the network's. Prefer the
    /// environment variable: a command line is visible to other users.
    #[arg(
        long,
        global = true,
        env = "SPENDGUARD_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN",
        help_heading = "Daemon connection"
    )]
    token: Option<String>,
    /// For an https:// daemon: the PEM file of the certificate(s) to trust
    /// (a self-signed daemon's own, or a private CA's). Without it, the
    /// public Web PKI roots are trusted.
    #[arg(
        long,
        global = true,
        env = "SPENDGUARD_CA_CERT",
        value_name = "FILE",
        help_heading = "Daemon connection"
    )]
    ca_cert: Option<std::path::PathBuf>,
}

impl ConnArgs {
    #[cfg(test)]
    pub fn new(url: &str, token: Option<&str>) -> ConnArgs {
        ConnArgs { url: url.to_owned(), token: token.map(str::to_owned), ca_cert: None }
    }
}

// Hand-written so that a debug print of the command line never shows the token.
impl fmt::Debug for ConnArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnArgs")
            .field("url", &self.url)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("ca_cert", &self.ca_cert)
            .finish()
    }
}

/// `--json`, shared by every daemon verb.
#[derive(Debug, Clone, Copy, Args)]
pub struct OutputArgs {
    /// Print the daemon's JSON response as it was sent, for scripts.
    #[arg(long)]
    pub json: bool,
}

/// A connection to the daemon with a token.
pub struct Client {
    agent: ureq::Agent,
    /// Without a trailing slash: paths are appended to it.
    base: String,
    token: Option<String>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client").field("base", &self.base).finish_non_exhaustive()
    }
}

impl Client {
    /// A client for `conn`. An unusable URL is a mistake on the command line
    /// (exit 2), found before anything is sent.
    pub fn new(conn: &ConnArgs) -> anyhow::Result<Client> {
        let base = conn.url.trim().trim_end_matches('/');
        let Some(authority) = base.strip_prefix("http://").or_else(|| base.strip_prefix("https://")) else {
            return Err(UsageError(format!(
                "`{base}` is not a daemon URL: expected http://HOST:PORT or https://HOST:PORT (set \
                 `SPENDGUARD_URL` or pass `--url`)"
            ))
            .into());
        };
        if authority.is_empty() || authority.contains(['?', '#']) {
            return Err(UsageError(format!("`{base}` is not a daemon URL: expected http://HOST:PORT")).into());
        }
        let roots = match &conn.ca_cert {
            None => ureq::tls::RootCerts::WebPki,
            Some(file) => {
                let pem = std::fs::read(file)
                    .with_context(|| format!("cannot read the CA certificate `{}`", file.display()))?;
                let certs = ureq::tls::parse_pem(&pem)
                    .filter_map(|item| match item {
                        Ok(ureq::tls::PemItem::Certificate(cert)) => Some(Ok(cert)),
                        Ok(_) => None,
                        Err(e) => Some(Err(e)),
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| UsageError(format!("`{}` is not a PEM certificate: {e}", file.display())))?;
                if certs.is_empty() {
                    return Err(UsageError(format!("`{}` holds no PEM certificate", file.display())).into());
                }
                ureq::tls::RootCerts::Specific(std::sync::Arc::new(certs))
            }
        };
        let tls = ureq::tls::TlsConfig::builder()
            .provider(ureq::tls::TlsProvider::Rustls)
            .root_certs(roots)
            .build();
        // Without a token the request still goes out: the daemon (or its
        // absence) says what is wrong, and a 401 gets a hint below.
        let token = conn.token.as_deref().map(str::trim).filter(|t| !t.is_empty()).map(str::to_owned);
        let agent = ureq::Agent::config_builder()
            // 4xx and 5xx bodies carry the daemon's error code and message.
            .http_status_as_error(false)
            // The daemon never redirects; following one would hand the
            // bearer token to wherever it points.
            .max_redirects(0)
            // The same reason for ignoring HTTP_PROXY: the token should go
            // straight to the daemon.
            .proxy(None)
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .timeout_global(Some(REQUEST_TIMEOUT))
            .user_agent(concat!("spendguard/", env!("CARGO_PKG_VERSION")))
            .tls_config(tls)
            .build()
            .new_agent();
        Ok(Client { agent, base: base.to_owned(), token })
    }

    /// Whether a token is sent.
    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// `GET path?query`.
    pub fn get(&self, path: &str, query: &[(&str, String)]) -> anyhow::Result<Reply> {
        let request = self.prepare(self.agent.get(self.url(path)), query, None);
        self.finish(request.call())
    }

    /// `POST path` with a JSON body, or none.
    pub fn post(
        &self,
        path: &str,
        body: Option<&Value>,
        idempotency_key: Option<&str>,
    ) -> anyhow::Result<Reply> {
        let request = self.prepare(self.agent.post(self.url(path)), &[], idempotency_key);
        self.finish(match body {
            Some(body) => request.send_json(body),
            None => request.send_empty(),
        })
    }

    /// `PUT path` with a JSON body.
    pub fn put(&self, path: &str, body: &Value) -> anyhow::Result<Reply> {
        let request = self.prepare(self.agent.put(self.url(path)), &[], None);
        self.finish(request.send_json(body))
    }

    /// `POST path?query` with raw bytes of `content_type` (a policy module).
    pub fn post_bytes(
        &self,
        path: &str,
        query: &[(&str, String)],
        content_type: &str,
        bytes: &[u8],
    ) -> anyhow::Result<Reply> {
        let request = self.prepare(self.agent.post(self.url(path)), query, None);
        self.finish(request.content_type(content_type).send(bytes))
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn prepare<B>(
        &self,
        mut request: RequestBuilder<B>,
        query: &[(&str, String)],
        idempotency_key: Option<&str>,
    ) -> RequestBuilder<B> {
        request = request.header("Accept", "application/json");
        if let Some(token) = &self.token {
            request = request.header("Authorization", format!("Bearer {token}"));
        }
        if let Some(key) = idempotency_key {
            request = request.header("Idempotency-Key", key);
        }
        for (name, value) in query {
            request = request.query(*name, value);
        }
        request
    }

    fn finish(&self, sent: Result<Response<Body>, ureq::Error>) -> anyhow::Result<Reply> {
        let mut response = sent.map_err(|err| self.transport_error(err))?;
        let status = response.status();
        let text = response
            .body_mut()
            .with_config()
            .limit(MAX_RESPONSE_BYTES)
            .lossy_utf8(true)
            .read_to_string()
            .map_err(|err| {
                anyhow!("reading the answer of the daemon at `{}` failed: {}", self.base, plain(&err))
            })?;
        if !status.is_success() {
            let err = refusal(&self.base, status, &text);
            if status == StatusCode::UNAUTHORIZED && self.token.is_none() {
                return Err(err.context("no token was sent: set `SPENDGUARD_TOKEN` or pass `--token`"));
            }
            return Err(err);
        }
        if serde_json::from_str::<serde::de::IgnoredAny>(&text).is_err() {
            return Err(anyhow!(
                "the daemon at `{}` answered {} with a body that is not JSON",
                self.base,
                status.as_u16()
            ));
        }
        Ok(Reply { base: self.base.clone(), body: text })
    }

    fn transport_error(&self, err: ureq::Error) -> anyhow::Error {
        match err {
            ureq::Error::Io(_)
            | ureq::Error::ConnectionFailed
            | ureq::Error::HostNotFound
            | ureq::Error::Timeout(_) => {
                anyhow!("cannot reach the daemon at `{}`: {}", self.base, plain(&err))
            }
            ureq::Error::BadUri(_) | ureq::Error::Http(_) => {
                anyhow!("cannot build a request to `{}`: {}", self.base, plain(&err))
            }
            other => anyhow!("request to the daemon at `{}` failed: {}", self.base, plain(&other)),
        }
    }
}

/// A ureq error without its category prefix (`io: connection refused` reads
/// better as `connection refused`).
fn plain(err: &ureq::Error) -> String {
    match err {
        ureq::Error::Io(io) => io.to_string(),
        other => other.to_string(),
    }
}

/// The daemon refused: its error body said why.
#[derive(Debug, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Refused {
    pub status: u16,
    pub code: String,
    pub message: String,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    code: String,
    #[serde(default)]
    message: String,
}

/// The error for a non-2xx answer: the daemon's own `code: message` when the
/// body is its error JSON, otherwise the status and the start of the body
/// (a proxy's or the framework's complaint).
fn refusal(base: &str, status: StatusCode, body: &str) -> anyhow::Error {
    if let Ok(ErrorBody { error }) = serde_json::from_str::<ErrorBody>(body) {
        return Refused { status: status.as_u16(), code: error.code, message: error.message }.into();
    }
    let status_line = match status.canonical_reason() {
        Some(reason) => format!("{} {reason}", status.as_u16()),
        None => status.as_u16().to_string(),
    };
    let quoted: String = body.split_whitespace().collect::<Vec<_>>().join(" ");
    if quoted.is_empty() {
        return anyhow!("the daemon at `{base}` answered {status_line}");
    }
    let mut cut: String = quoted.chars().take(MAX_QUOTED_CHARS).collect();
    if cut.len() < quoted.len() {
        cut.push('…');
    }
    anyhow!("the daemon at `{base}` answered {status_line}: {cut}")
}

/// A successful answer whose body is valid JSON.
pub struct Reply {
    base: String,
    body: String,
}

// The body may hold a card's PAN and CVV: never in a debug print.
impl fmt::Debug for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reply").field("bytes", &self.body.len()).finish_non_exhaustive()
    }
}

impl Reply {
    /// The body as `T`. When it does not fit, the message says where but
    /// quotes no value: a mistyped field could be a PAN.
    pub fn parse<T: DeserializeOwned>(&self) -> anyhow::Result<T> {
        serde_json::from_str(&self.body).map_err(|err| {
            let what = err.to_string();
            let what = if what.starts_with("missing field") {
                what.split(" at line").next().unwrap_or(&what).to_owned()
            } else {
                "a value of an unexpected type".to_owned()
            };
            anyhow!(
                "unexpected answer from the daemon at `{}`: {what} at line {} column {} \
                 (`--json` shows it as sent)",
                self.base,
                err.line(),
                err.column()
            )
        })
    }

    /// `--json`: the body as the daemon sent it.
    pub fn print(&self, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
        writeln!(out, "{}", super::render::json_safe(self.body.trim())).context("cannot write to stdout")?;
        Ok(ExitCode::SUCCESS)
    }
}

/// `s` as one path segment: an id with a `/` or `?` in it must not reach
/// another route.
pub fn segment(s: &str) -> String {
    let mut encoded = String::with_capacity(s.len());
    for byte in s.bytes() {
        // Dots too: an id of `..` must not climb a level.
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'~') {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

/// A one-request HTTP server for tests: it answers one canned response and
/// hands back the request as it arrived.
#[cfg(test)]
pub mod responder {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;
    use std::thread::JoinHandle;

    use serde_json::Value;

    /// One request as the server saw it.
    #[derive(Debug)]
    pub struct Captured {
        pub method: String,
        /// Path and query, as sent.
        pub target: String,
        /// Names lower-cased.
        pub headers: Vec<(String, String)>,
        pub body: Vec<u8>,
    }

    impl Captured {
        pub fn header(&self, name: &str) -> Option<&str> {
            self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
        }

        pub fn json(&self) -> Value {
            serde_json::from_slice(&self.body).unwrap()
        }
    }

    /// Listen on 127.0.0.1:0; answer the first request with `status` and
    /// `body`. Returns the base URL and the captured request.
    pub fn serve_once(status: u16, body: &str) -> (String, JoinHandle<Captured>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let body = body.to_owned();
        let handle = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let mut parts = line.split_whitespace();
            let method = parts.next().unwrap().to_owned();
            let target = parts.next().unwrap().to_owned();
            let mut headers = Vec::new();
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                let line = line.trim_end();
                if line.is_empty() {
                    break;
                }
                let (name, value) = line.split_once(':').unwrap();
                headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
            }
            let length = headers
                .iter()
                .find(|(n, _)| n == "content-length")
                .map_or(0, |(_, v)| v.parse::<usize>().unwrap());
            let mut request_body = vec![0; length];
            reader.read_exact(&mut request_body).unwrap();
            let mut stream = stream;
            write!(
                stream,
                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
                 connection: close\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
            stream.flush().unwrap();
            Captured { method, target, headers, body: request_body }
        });
        (url, handle)
    }

    /// Connection arguments for `url` with the token `test-token`.
    pub fn conn(url: &str) -> super::ConnArgs {
        super::ConnArgs::new(url, Some("test-token"))
    }

    /// Everything a verb wrote.
    pub fn text(out: Vec<u8>) -> String {
        String::from_utf8(out).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::responder::{conn, serve_once};
    use super::*;

    #[test]
    fn requests_carry_the_token_the_idempotency_key_and_the_json_body() {
        let (url, request) = serve_once(201, r#"{"id":"x"}"#);
        let client = Client::new(&conn(&url)).unwrap();
        let reply = client.post("/v1/things", Some(&serde_json::json!({"a": "1"})), Some("k-1")).unwrap();
        let request = request.join().unwrap();
        assert_eq!(request.method, "POST");
        assert_eq!(request.target, "/v1/things");
        assert_eq!(request.header("authorization"), Some("Bearer test-token"));
        assert_eq!(request.header("idempotency-key"), Some("k-1"));
        assert!(request.header("content-type").unwrap().starts_with("application/json"));
        assert_eq!(request.json(), serde_json::json!({"a": "1"}));
        let mut out = Vec::new();
        reply.print(&mut out).unwrap();
        assert_eq!(out, b"{\"id\":\"x\"}\n");
    }

    #[test]
    fn query_values_are_encoded() {
        let (url, request) = serve_once(200, "{}");
        let client = Client::new(&conn(&url)).unwrap();
        client.get("/v1/audit", &[("after", "7".into()), ("name", "a b&c".into())]).unwrap();
        let target = request.join().unwrap().target;
        assert!(target == "/v1/audit?after=7&name=a%20b%26c" || target == "/v1/audit?after=7&name=a+b%26c");
    }

    #[test]
    fn a_refusal_reads_as_code_and_message() {
        let (url, request) =
            serve_once(403, r#"{"error":{"code":"forbidden","message":"agents cannot deposit"}}"#);
        let client = Client::new(&conn(&url)).unwrap();
        let err = client.get("/v1/wallet", &[]).unwrap_err();
        request.join().unwrap();
        assert_eq!(format!("{err:#}"), "forbidden: agents cannot deposit");
        let refused = err.downcast_ref::<Refused>().unwrap();
        assert_eq!(refused.status, 403);
    }

    #[test]
    fn a_refusal_without_the_error_body_quotes_the_status_and_the_start_of_the_body() {
        let base = "http://127.0.0.1:7420";
        let err = refusal(base, StatusCode::PAYLOAD_TOO_LARGE, "length limit\n exceeded\n");
        assert_eq!(
            err.to_string(),
            "the daemon at `http://127.0.0.1:7420` answered 413 Payload Too Large: length limit exceeded"
        );
        let err = refusal(base, StatusCode::NOT_FOUND, "");
        assert_eq!(err.to_string(), "the daemon at `http://127.0.0.1:7420` answered 404 Not Found");
        let err = refusal(base, StatusCode::BAD_GATEWAY, &"x".repeat(1000));
        assert!(err.to_string().ends_with(&format!("{}…", "x".repeat(MAX_QUOTED_CHARS))));
        // An error body of another shape is quoted, not mistaken for a code.
        let err = refusal(base, StatusCode::UNPROCESSABLE_ENTITY, r#"{"message":"bad"}"#);
        assert!(err.to_string().contains(r#"422 Unprocessable Entity: {"message":"bad"}"#));
    }

    #[test]
    fn an_answer_that_is_not_json_is_an_error() {
        let (url, request) = serve_once(200, "<html>hello</html>");
        let client = Client::new(&conn(&url)).unwrap();
        let err = client.get("/v1/wallet", &[]).unwrap_err();
        request.join().unwrap();
        assert!(err.to_string().contains("not JSON"), "{err}");
    }

    #[test]
    fn an_unreachable_daemon_is_named() {
        // Bind and drop a listener: its port is now very likely closed.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let url = format!("http://127.0.0.1:{port}");
        let client = Client::new(&conn(&url)).unwrap();
        let err = client.get("/v1/wallet", &[]).unwrap_err().to_string();
        assert!(err.starts_with(&format!("cannot reach the daemon at `{url}`: ")), "{err}");
    }

    #[test]
    fn without_a_token_a_401_says_how_to_give_one() {
        let (url, request) = serve_once(
            401,
            r#"{"error":{"code":"missing_token","message":"send `Authorization: Bearer TOKEN`"}}"#,
        );
        let client = Client::new(&ConnArgs::new(&url, Some(" "))).unwrap();
        let err = client.get("/v1/wallet", &[]).unwrap_err();
        assert_eq!(request.join().unwrap().header("authorization"), None);
        assert_eq!(
            format!("{err:#}"),
            "no token was sent: set `SPENDGUARD_TOKEN` or pass `--token`: \
             missing_token: send `Authorization: Bearer TOKEN`"
        );
        // The daemon's code is still there for whoever looks for it.
        assert_eq!(err.downcast_ref::<Refused>().unwrap().code, "missing_token");
    }

    #[test]
    fn a_bad_url_is_a_usage_error() {
        for conn in [
            ConnArgs::new("ftp://example.com", Some("t")),
            ConnArgs::new("127.0.0.1:7420", Some("t")),
            ConnArgs::new("http://", Some("t")),
        ] {
            let err = Client::new(&conn).unwrap_err();
            assert!(err.downcast_ref::<UsageError>().is_some(), "{conn:?}: {err}");
        }
        // A trailing slash is not doubled.
        let client = Client::new(&ConnArgs::new("http://127.0.0.1:7420/", Some("t"))).unwrap();
        assert_eq!(client.url("/v1/wallet"), "http://127.0.0.1:7420/v1/wallet");
    }

    #[test]
    fn debug_prints_hide_the_token_and_the_body() {
        let conn = ConnArgs::new(DEFAULT_URL, Some("sg_secret"));
        assert!(!format!("{conn:?}").contains("sg_secret"));
        let client = Client::new(&conn).unwrap();
        assert!(!format!("{client:?}").contains("sg_secret"));
        let reply = Reply { base: DEFAULT_URL.into(), body: r#"{"pan":"4000001234567899"}"#.into() };
        assert!(!format!("{reply:?}").contains("4000"));
    }

    #[test]
    fn a_shape_mismatch_names_no_value() {
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Card {
            pan: u64,
            cvv: String,
        }
        let reply =
            Reply { base: DEFAULT_URL.into(), body: r#"{"pan":"4000001234567899","cvv":"123"}"#.into() };
        let err = reply.parse::<Card>().unwrap_err().to_string();
        assert!(!err.contains("4000") && err.contains("unexpected type"), "{err}");
        let reply = Reply { base: DEFAULT_URL.into(), body: r#"{"pan":1}"#.into() };
        let err = reply.parse::<Card>().unwrap_err().to_string();
        assert!(err.contains("missing field `cvv` at line 1"), "{err}");
    }

    #[test]
    fn path_segments_are_escaped() {
        assert_eq!(segment("sp_01H-x_y~z"), "sp_01H-x_y~z");
        assert_eq!(segment("../admin?x=1"), "%2E%2E%2Fadmin%3Fx%3D1");
        assert_eq!(segment("é"), "%C3%A9");
    }
}
