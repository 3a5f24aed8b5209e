//! Malformed requests written byte for byte on a connection of their own, and
//! the refusal each must get.

use std::time::Duration;

use serde_json::Value;

use crate::support::{Reply, Wallet};

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
    pub(crate) status: u16,
    pub(crate) code: &'static str,
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
    pub(crate) fn text(mut self, body: impl Into<Vec<u8>>) -> Bad {
        self.body = Some(body.into());
        self
    }

    pub(crate) fn module(mut self, module: Vec<u8>) -> Bad {
        self.content_type = "application/wasm";
        self.body = Some(module);
        self
    }

    pub(crate) fn chunked(mut self) -> Bad {
        self.chunked = true;
        self
    }

    pub(crate) fn header(mut self, name: &'static str, value: impl Into<Vec<u8>>) -> Bad {
        self.headers.push((name, value.into()));
        self
    }

    pub(crate) fn refused(mut self, status: u16, code: &'static str) -> Bad {
        self.status = status;
        self.code = code;
        self
    }

    pub(crate) fn describe(&self) -> String {
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
