//! Listener plumbing: bounded connection counts per listener, idle and first-credential
//! timeouts on every connection, and the HTTP connection loop with header and request timeouts.
//!
//! Why: every container of a Kubernetes pod shares loopback, and a process has one
//! file-descriptor table. Without bounds, idle or half-sent connections to the HTTP listener
//! took the descriptors Envoy's connection to the ext_authz listener needed, and every route
//! fell into its fail mode. Each listener now has its own share of the descriptors, and
//! connections that do nothing are closed.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::{Instant, Sleep};
use tokio_util::either::Either;

use crate::config::server::Connections;

/// A bound listener of any kind.
#[derive(Debug)]
pub enum Bound {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// An accepted connection of any kind.
pub type Socket = Either<TcpStream, UnixStream>;

/// Descriptors kept back for everything that is not a client connection: the store's file, the
/// runtime's and the watcher's handles, Redis connections, logs.
const RESERVED_FDS: u64 = 64;

/// How many connections each listener may hold open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionBudget {
    pub ext_authz: usize,
    pub grpc: usize,
    pub http: usize,
}

impl ConnectionBudget {
    /// Raises the soft descriptor limit to the hard one, keeps some descriptors back for files
    /// and the store, then gives the ext_authz listener half of the rest and the gRPC and HTTP
    /// listeners a quarter each, unless the config sets a listener's maximum. Trade-off: a
    /// configured maximum is taken as given even if it overcommits the descriptors; the
    /// operator asked for it.
    pub fn from_limits(c: &Connections) -> Self {
        let soft = rlimit::increase_nofile_limit(u64::MAX)
            .or_else(|_| rlimit::getrlimit(rlimit::Resource::NOFILE).map(|(soft, _)| soft))
            .unwrap_or(1024);
        Self::split(soft, c)
    }

    /// The split for a descriptor limit of `fds`.
    pub fn split(fds: u64, c: &Connections) -> Self {
        let usable = usize::try_from(fds.saturating_sub(RESERVED_FDS).max(16)).unwrap_or(16);
        Self {
            ext_authz: c.max_ext_authz.unwrap_or((usable / 2).clamp(4, 4096)),
            grpc: c.max_grpc.unwrap_or((usable / 4).clamp(2, 1024)),
            http: c.max_http.unwrap_or((usable / 4).clamp(2, 1024)),
        }
    }
}

/// Why a listener closed (or refused) a connection; counted in `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// The listener already held its maximum.
    Full,
    /// Nothing was sent or received for the idle timeout.
    Idle,
    /// No call with a valid credential within the auth timeout.
    Unauthenticated,
}

impl CloseReason {
    pub const ALL: [CloseReason; 3] = [
        CloseReason::Full,
        CloseReason::Idle,
        CloseReason::Unauthenticated,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Full => "full",
            CloseReason::Idle => "idle",
            CloseReason::Unauthenticated => "unauthenticated",
        }
    }
}

/// Where a listener reports its connections.
pub trait ConnectionEvents: Send + Sync + std::fmt::Debug {
    fn opened(&self, listener: &'static str);
    fn closed(&self, listener: &'static str, reason: Option<CloseReason>);
}

/// What one connection shares with the calls it carries (as gRPC connect info): whether it
/// has presented a valid credential yet.
#[derive(Debug, Clone, Default)]
pub struct ConnState(Arc<AtomicBool>);

impl ConnState {
    /// Exempts the connection from the auth timeout.
    pub fn authenticated(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    fn is_authenticated(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// The timeouts one connection is held to.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub idle: Duration,
    /// `None`: no credential is asked for on this connection (HTTP, whose calls authenticate
    /// per request and are bounded by the header timeout instead).
    pub auth: Option<Duration>,
}

/// A connection held to its listener's bounds: it owns a slot of the listener's budget (freed
/// when it drops) and fails its next read once it has been idle, or unauthenticated, too long,
/// which makes the server close it.
pub struct Guarded {
    io: Socket,
    state: ConnState,
    opened: Instant,
    /// When the last byte was read or written.
    last: Instant,
    timeouts: Timeouts,
    timer: Pin<Box<Sleep>>,
    listener: &'static str,
    events: Arc<dyn ConnectionEvents>,
    expired: Option<CloseReason>,
    _slot: OwnedSemaphorePermit,
}

impl std::fmt::Debug for Guarded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guarded")
            .field("listener", &self.listener)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.events.closed(self.listener, self.expired);
    }
}

impl Guarded {
    fn touch(&mut self) {
        self.last = Instant::now();
    }

    /// When this connection is next due to close, and why.
    fn deadline(&self) -> (Instant, CloseReason) {
        let idle = (self.last + self.timeouts.idle, CloseReason::Idle);
        match self.timeouts.auth {
            Some(auth) if !self.state.is_authenticated() => {
                let unauth = (self.opened + auth, CloseReason::Unauthenticated);
                if unauth.0 < idle.0 { unauth } else { idle }
            }
            _ => idle,
        }
    }

    /// Called when a read would wait: arms the timer for the deadline and reports whether it
    /// has passed.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Option<CloseReason> {
        loop {
            let (at, why) = self.deadline();
            if Instant::now() >= at {
                return Some(why);
            }
            if self.timer.deadline() != at {
                self.timer.as_mut().reset(at);
            }
            if self.timer.as_mut().poll(cx).is_pending() {
                return None;
            }
        }
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    self.touch();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match self.poll_expired(cx) {
                Some(why) => {
                    self.expired = Some(why);
                    Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("connection closed: {}", why.as_str()),
                    )))
                }
                None => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r
            && *n > 0
        {
            self.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &r
            && *n > 0
        {
            self.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for Guarded {
    type ConnectInfo = ConnState;

    fn connect_info(&self) -> ConnState {
        self.state.clone()
    }
}

/// Accepts connections on `bound` while the listener holds fewer than `max`; a connection
/// over the maximum is closed at once (and counted), so it never holds a descriptor.
pub fn incoming(
    bound: Bound,
    listener: &'static str,
    max: usize,
    timeouts: Timeouts,
    events: Arc<dyn ConnectionEvents>,
) -> impl Stream<Item = io::Result<Guarded>> {
    let slots = Arc::new(Semaphore::new(max.max(1)));
    futures_util::stream::unfold(
        (bound, slots, events),
        move |(bound, slots, events)| async move {
            loop {
                let accepted = match &bound {
                    Bound::Tcp(l) => l.accept().await.map(|(s, _)| {
                        // Decisions are small request/response pairs: no Nagle delay.
                        let _ = s.set_nodelay(true);
                        Either::Left(s)
                    }),
                    Bound::Unix(l) => l.accept().await.map(|(s, _)| Either::Right(s)),
                };
                let socket = match accepted {
                    Ok(s) => s,
                    Err(e) => {
                        // Out of descriptors (or a connection reset before accept): wait a
                        // moment instead of spinning, and go on.
                        tracing::warn!(listener, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                    drop(socket);
                    events.closed(listener, Some(CloseReason::Full));
                    continue;
                };
                events.opened(listener);
                let now = Instant::now();
                let guarded = Guarded {
                    io: socket,
                    state: ConnState::default(),
                    opened: now,
                    last: now,
                    timeouts,
                    timer: Box::pin(tokio::time::sleep_until(now + timeouts.idle)),
                    listener,
                    events: Arc::clone(&events),
                    expired: None,
                    _slot: slot,
                };
                return Some((Ok(guarded), (bound, slots, events)));
            }
        },
    )
}

/// Serves `router` over HTTP/1.1 and HTTP/2 (cleartext) on `incoming` until `shutdown` turns
/// true, then waits for the connections in flight to finish their requests.
///
/// Trade-off: hyper's connection builder rather than `axum::serve`, which has no header read
/// timeout; a client that trickles headers (or idles between keep-alive requests) past
/// `header_timeout` is cut off, and a whole request, body included, is bounded by
/// `request_timeout` (answered 408).
pub async fn serve_http(
    router: axum::Router,
    incoming: impl Stream<Item = io::Result<Guarded>>,
    settings: &Connections,
    mut shutdown: watch::Receiver<bool>,
) {
    use futures_util::StreamExt;
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;

    let router = router.layer(tower_http::timeout::TimeoutLayer::with_status_code(
        axum::http::StatusCode::REQUEST_TIMEOUT,
        settings.request_timeout,
    ));
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_timeout);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut incoming = std::pin::pin!(incoming);
    loop {
        let conn = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => break,
            c = incoming.next() => c,
        };
        let Some(Ok(conn)) = conn else { break };
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let served = builder
            .serve_connection_with_upgrades(TokioIo::new(conn), service)
            .into_owned();
        let served = graceful.watch(served);
        tokio::spawn(async move {
            if let Err(e) = served.await {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
        });
    }
    graceful.shutdown().await;
}

/// Notes that the connection a request came on presented a valid credential, which exempts
/// it from the auth timeout (see [`ConnState`]).
pub fn mark_authenticated<T>(request: &tonic::Request<T>) {
    if let Some(state) = request.extensions().get::<ConnState>() {
        state.authenticated();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unset() -> Connections {
        Connections {
            max_ext_authz: None,
            max_grpc: None,
            max_http: None,
            idle_timeout: Duration::from_secs(300),
            auth_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
        }
    }

    #[test]
    fn the_ext_authz_listener_gets_half_the_descriptors() {
        let b = ConnectionBudget::split(128, &unset());
        assert_eq!((b.ext_authz, b.grpc, b.http), (32, 16, 16));
        let b = ConnectionBudget::split(1 << 20, &unset());
        assert_eq!((b.ext_authz, b.grpc, b.http), (4096, 1024, 1024));
        let b = ConnectionBudget::split(10, &unset());
        assert!(b.ext_authz >= 4 && b.grpc >= 2 && b.http >= 2);
        let mut c = unset();
        c.max_http = Some(3);
        assert_eq!(ConnectionBudget::split(128, &c).http, 3);
    }
}
