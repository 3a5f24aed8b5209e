//! The connections under the router: TLS, hyper's HTTP/1 with a header-read
//! timeout, a body deadline, an idle timeout, a cap on connections, and a
//! graceful shutdown with a deadline. `axum::serve` offers none of these.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::extract::rejection::BytesRejection;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tower::ServiceExt as _;

use super::ApiError;
use crate::config::{ServeConfig, TlsFiles};

/// The limits of [`serve_connections`], from the daemon's config.
#[derive(Debug, Clone)]
pub struct Limits {
    pub header_read: Duration,
    pub body: Duration,
    pub idle: Duration,
    pub max_connections: usize,
    pub shutdown: Duration,
    /// Bytes of a body the daemon did not read (it refused the request from
    /// its head) that are still taken in and dropped, so the client that is
    /// still sending gets the answer instead of a reset connection; past
    /// it, the connection is closed. The largest body any route accepts.
    pub discard: u64,
}

impl Limits {
    pub fn of(config: &ServeConfig) -> Limits {
        Limits {
            header_read: Duration::from_millis(config.header_read_timeout_ms),
            body: Duration::from_millis(config.body_timeout_ms),
            idle: Duration::from_millis(config.idle_timeout_ms),
            max_connections: usize::try_from(config.max_connections).unwrap_or(usize::MAX),
            shutdown: Duration::from_millis(config.shutdown_timeout_ms),
            discard: u64::try_from(config.max_body_bytes.max(config.sandbox.max_module_bytes))
                .unwrap_or(u64::MAX),
        }
    }
}

/// The TLS acceptor of the certificate chain and key in `files` (PEM).
pub fn tls_acceptor(files: &TlsFiles) -> anyhow::Result<TlsAcceptor> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert_chain)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("cannot read the certificate chain `{}`", files.cert_chain.display()))?;
    if chain.is_empty() {
        anyhow::bail!("`{}` holds no PEM certificate", files.cert_chain.display());
    }
    let key = PrivateKeyDer::from_pem_file(&files.private_key)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("cannot read the private key `{}`", files.private_key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("no TLS protocol version available")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("the certificate and the private key do not make a TLS identity")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Serve `router` on `listener` until `stopped` resolves; then stop
/// accepting, let requests in flight finish for `limits.shutdown` at most,
/// and return. Each handler finds the client's address as
/// `ConnectInfo<SocketAddr>`.
pub async fn serve_connections(
    listener: TcpListener,
    router: Router,
    tls: Option<TlsAcceptor>,
    limits: Limits,
    stopped: impl Future<Output = ()>,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.header_read).keep_alive(true);
    let limits = Arc::new(limits);
    tokio::pin!(stopped);
    loop {
        // A connection is accepted only with a permit: beyond the cap, new
        // ones wait in the listen backlog.
        let permit = tokio::select! {
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = &mut stopped => break,
        };
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait, not spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stopped => break,
        };
        let _ = stream.set_nodelay(true);
        let watcher = graceful.watcher();
        let (http, router, tls, limits) = (http.clone(), router.clone(), tls.clone(), Arc::clone(&limits));
        tokio::spawn(async move {
            let _permit = permit;
            match tls {
                None => connection(stream, remote, http, router, watcher, &limits).await,
                Some(tls) => {
                    // The handshake counts as the head: as long at most.
                    match tokio::time::timeout(limits.header_read, tls.accept(stream)).await {
                        Ok(Ok(stream)) => connection(stream, remote, http, router, watcher, &limits).await,
                        Ok(Err(e)) => tracing::debug!(%remote, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
    drop(listener);
    tracing::info!(
        connections = graceful.count(),
        deadline_ms = u64::try_from(limits.shutdown.as_millis()).unwrap_or(u64::MAX),
        "shutting down: finishing requests in flight"
    );
    if tokio::time::timeout(limits.shutdown, graceful.shutdown()).await.is_err() {
        tracing::warn!("requests still in flight at the shutdown deadline were cut off");
    }
}

/// One connection, until it closes, goes idle too long, or the daemon
/// stops.
async fn connection<S>(
    stream: S,
    remote: SocketAddr,
    http: hyper::server::conn::http1::Builder,
    router: Router,
    watcher: hyper_util::server::graceful::Watcher,
    limits: &Limits,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::new());
    let io = Watched { inner: stream, activity: Arc::clone(&activity) };
    let (body_limit, discard) = (limits.body, limits.discard);
    let seen = Arc::clone(&activity);
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let (router, activity) = (router.clone(), Arc::clone(&seen));
        async move {
            let _busy = Busy::new(activity);
            let (mut parts, body) = request.into_parts();
            parts.extensions.insert(ConnectInfo(remote));
            let body = Body::new(GuardedBody::new(body, Instant::now() + body_limit, discard));
            router.oneshot(axum::extract::Request::from_parts(parts, body)).await
        }
    });
    let conn = watcher.watch(http.serve_connection(TokioIo::new(io), service));
    tokio::pin!(conn);
    let mut wake = activity.last() + limits.idle;
    loop {
        tokio::select! {
            done = &mut conn => {
                if let Err(e) = done {
                    tracing::debug!(%remote, error = %e, "connection ended");
                }
                return;
            }
            () = tokio::time::sleep_until(wake) => {
                let (idle_at, now) = (activity.last() + limits.idle, Instant::now());
                if idle_at > now {
                    wake = idle_at;
                } else if activity.busy() == 0 {
                    tracing::debug!(%remote, "closing an idle connection");
                    return;
                } else {
                    wake = now + limits.idle;
                }
            }
        }
    }
}

/// When a connection last moved a byte, and how many of its requests are
/// being handled.
#[derive(Debug)]
struct Activity {
    start: Instant,
    /// Milliseconds from `start` to the last byte moved.
    last_ms: AtomicU64,
    busy: AtomicUsize,
}

impl Activity {
    fn new() -> Activity {
        Activity { start: Instant::now(), last_ms: AtomicU64::new(0), busy: AtomicUsize::new(0) }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    fn busy(&self) -> usize {
        self.busy.load(Ordering::Acquire)
    }
}

/// A request being handled: the idle clock does not run meanwhile (a
/// proposal may wait its agent's turn without a byte moving).
struct Busy(Arc<Activity>);

impl Busy {
    fn new(activity: Arc<Activity>) -> Busy {
        activity.busy.fetch_add(1, Ordering::AcqRel);
        Busy(activity)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A connection's stream, noting when bytes move.
struct Watched<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The request body did not arrive by its deadline.
#[derive(Debug)]
pub struct BodyTimeout;

impl std::fmt::Display for BodyTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request body did not arrive in time")
    }
}

impl std::error::Error for BodyTimeout {}

/// A request's body with a deadline for all of it (not per chunk: a client
/// sending a byte now and then does not keep it open). Dropped unread (the
/// request was refused from its head), the rest is taken in and discarded
/// in the background, up to `discard` bytes and the same deadline, so the
/// client still sending reads its answer; nothing of it is kept.
struct GuardedBody {
    inner: Option<Incoming>,
    deadline: Pin<Box<tokio::time::Sleep>>,
    discard: u64,
}

impl GuardedBody {
    fn new(inner: Incoming, deadline: Instant, discard: u64) -> GuardedBody {
        GuardedBody { inner: Some(inner), deadline: Box::pin(tokio::time::sleep_until(deadline)), discard }
    }
}

impl http_body::Body for GuardedBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else { return Poll::Ready(None) };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(None) => {
                this.inner = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(frame)) => Poll::Ready(Some(frame.map_err(Into::into))),
            Poll::Pending => {
                if this.deadline.as_mut().poll(cx).is_ready() {
                    // Dropped, not discarded: hyper closes the connection
                    // after the answer.
                    this.inner = None;
                    return Poll::Ready(Some(Err(Box::new(BodyTimeout))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(http_body::Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.as_ref().map(http_body::Body::size_hint).unwrap_or_else(|| SizeHint::with_exact(0))
    }
}

impl Drop for GuardedBody {
    fn drop(&mut self) {
        let Some(body) = self.inner.take() else { return };
        if http_body::Body::is_end_stream(&body) {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(discard(body, self.deadline.deadline(), self.discard));
        }
    }
}

/// Take in and drop what is left of a body, `limit` bytes at most, until
/// `deadline`.
async fn discard(mut body: Incoming, deadline: Instant, limit: u64) {
    let mut taken = 0u64;
    let _ = tokio::time::timeout_at(deadline, async {
        while let Some(frame) =
            std::future::poll_fn(|cx| http_body::Body::poll_frame(Pin::new(&mut body), cx)).await
        {
            let Ok(frame) = frame else { return };
            if let Some(data) = frame.data_ref() {
                taken = taken.saturating_add(data.len() as u64);
                if taken > limit {
                    return;
                }
            }
        }
    })
    .await;
}

/// The error of a body that could not be read: 408 when it did not arrive
/// in time, 413 over `too_large`'s limit, 422 otherwise.
pub fn body_error(e: &BytesRejection, too_large: impl FnOnce() -> ApiError) -> ApiError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(error) = source {
        if error.is::<BodyTimeout>() {
            return ApiError::new(
                axum::http::StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                "the request body did not arrive in time",
            );
        }
        source = error.source();
    }
    if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
        too_large()
    } else {
        ApiError::invalid("invalid_body", e.body_text())
    }
}
