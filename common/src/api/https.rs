//! Serving an axum router over TLS: an accept loop that never pauses, deadlines on each
//! client's first bytes, TLS handshake, request heads and blocked writes, hyper's
//! automatic HTTP/1.1 or HTTP/2, and WebSocket upgrades.
//!
//! What a client that has not authenticated can make the server hold is bounded here. A
//! new connection is pending ([`Admission`]) until it makes a request with a valid token:
//! pending connections are capped in all and per address, and when full the oldest is
//! dropped for the newest, so idle or silent connections can never hold every slot
//! (`/api/v1/health` keeps answering). Authenticated connections are capped at
//! `max_connections`; one over the cap stays pending. Any connection with no request open
//! for `client_timeout` ends (an HTTP/2 client that only answers pings included). A
//! WebSocket, once upgraded (which takes a valid token), leaves this loop: the WebSocket
//! API bounds its messages and queues. Request
//! heads are at most [`MAX_HEAD_BYTES`]; bodies are read only after authentication
//! ([`read_body`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;
use tokio_io_timeout::TimeoutStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::ApiError;
use crate::admission::{Activity, Admission, AdmissionLimits, Watched, first_bytes};

/// The largest request head (request line and headers) an HTTP/1.1 client may send; HTTP/2
/// header lists are held to the same.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// HTTP/2 streams (requests) a client may have open at once on one connection.
const MAX_H2_STREAMS: u32 = 256;
/// HTTP/2 flow-control windows: what a client may send ahead of the server reading it, per
/// request and per connection (hyper's defaults are larger), so that bodies nobody reads
/// (a request without a token) hold at most this much per connection.
const H2_STREAM_WINDOW: u32 = 64 * 1024;
const H2_CONNECTION_WINDOW: u32 = 256 * 1024;
/// How often a connection checks whether it has been idle too long.
const IDLE_CHECK: Duration = Duration::from_millis(250);
/// What a connection told to close gets to finish its last answers.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// What one client of the API may take.
#[derive(Debug, Clone, Copy)]
pub struct ApiLimits {
    /// Authenticated connections at once; one over it stays pending (and may be dropped).
    pub max_connections: usize,
    /// Connections not yet authenticated: in all, and per address.
    pub pending: AdmissionLimits,
    /// From accept to a connection's first bytes.
    pub first_byte_timeout: Duration,
    /// The largest request body, in bytes.
    pub max_body: usize,
    /// The deadline of a TLS handshake, of a request head, of a request body, of any
    /// write the client does not take, and of a connection with no request open.
    pub client_timeout: Duration,
}

impl ApiLimits {
    /// From the `[limits]` of a configuration file.
    pub fn from_config(limits: &tether_config::Limits) -> Self {
        let size = |value: u64| usize::try_from(value).unwrap_or(usize::MAX);
        ApiLimits {
            max_connections: size(limits.api_connections),
            pending: AdmissionLimits {
                max_pending: size(limits.api_pending),
                max_per_address: size(limits.pending_per_address),
            },
            first_byte_timeout: Duration::from_millis(limits.first_byte_timeout_ms),
            max_body: size(limits.api_body_bytes),
            client_timeout: Duration::from_millis(limits.client_timeout_ms),
        }
    }
}

/// One client connection as its requests see it (in their extensions): the access check
/// tells it when a request authenticated, and it counts requests open to tell when it is
/// idle.
#[derive(Debug)]
pub(crate) struct ClientConnection {
    open: AtomicUsize,
    last_active: std::sync::Mutex<Instant>,
    settle: Notify,
}

impl ClientConnection {
    fn new() -> Arc<Self> {
        Arc::new(ClientConnection {
            open: AtomicUsize::new(0),
            last_active: std::sync::Mutex::new(Instant::now()),
            settle: Notify::new(),
        })
    }

    /// A request on this connection carried a valid token.
    pub(crate) fn authenticated(&self) {
        self.settle.notify_one();
    }

    fn touch(&self) {
        *self.last_active.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    /// How long no request has been open, if none is.
    fn idle_for(&self) -> Option<Duration> {
        (self.open.load(Ordering::Acquire) == 0).then(|| {
            self.last_active
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .elapsed()
        })
    }
}

/// Counts one open request for as long as it lives.
struct OpenRequest(Arc<ClientConnection>);

impl OpenRequest {
    fn new(connection: Arc<ClientConnection>) -> Self {
        connection.open.fetch_add(1, Ordering::AcqRel);
        connection.touch();
        OpenRequest(connection)
    }
}

impl Drop for OpenRequest {
    fn drop(&mut self) {
        self.0.touch();
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Serves `router` on `listener` over TLS until `shutdown`.
pub async fn serve_https(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: Router,
    limits: ApiLimits,
    shutdown: CancellationToken,
) {
    let acceptor = TlsAcceptor::from(tls);
    let mut pace = crate::admission::AcceptPace::default();
    let admission = Admission::new(limits.pending);
    let authenticated = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        pace.accepted().await;
        let (tcp, addr) = tokio::select! {
            result = listener.accept() => match result {
                Ok(conn) => conn,
                Err(err) => {
                    tracing::warn!("API accept failed: {err}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        // Answers go out as written: a small answer held back for an ACK the client
        // delays would add its delay to a call.
        let _ = tcp.set_nodelay(true);
        let pending = match admission.admit_tcp(&tcp, addr.ip()) {
            Ok(admitted) => admitted,
            Err(err) => {
                tracing::debug!(%addr, "connection dropped at once: {err}");
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let router = router.clone();
        let shutdown = shutdown.clone();
        let authenticated = authenticated.clone();
        tokio::spawn(async move {
            let tls = tokio::select! {
                tls = handshake(tcp, &acceptor, limits, pending.activity()) => tls,
                _ = pending.dropped() => Err("dropped for a newer connection (pending table full)".into()),
            };
            let tls = match tls {
                Ok(tls) => tls,
                Err(why) => return tracing::debug!(%addr, "API connection ended: {why}"),
            };
            let client = ClientConnection::new();
            let service = {
                let client = client.clone();
                tower::service_fn(move |mut request: Request<hyper::body::Incoming>| {
                    let open = OpenRequest::new(client.clone());
                    request.extensions_mut().insert(client.clone());
                    let call = tower::ServiceExt::oneshot(router.clone(), request.map(Body::new));
                    async move {
                        let response = call.await;
                        drop(open);
                        response
                    }
                })
            };
            serve_connection(
                tls,
                service,
                client,
                pending,
                authenticated,
                limits,
                shutdown,
            )
            .await
            .unwrap_or_else(|why| tracing::debug!(%addr, "API connection ended: {why}"));
        });
    }
}

type ClientStream = tokio_rustls::server::TlsStream<
    std::pin::Pin<Box<TimeoutStream<Watched<tokio::net::TcpStream>>>>,
>;

/// The first bytes and the TLS handshake, each within its deadline.
async fn handshake(
    tcp: tokio::net::TcpStream,
    acceptor: &TlsAcceptor,
    limits: ApiLimits,
    activity: Activity,
) -> Result<ClientStream, String> {
    first_bytes(&tcp, limits.first_byte_timeout).await?;
    activity.touch();
    // A client that stops reading blocks the server's writes: after the deadline the
    // write fails and the connection ends.
    let mut tcp = TimeoutStream::new(Watched::new(tcp, activity));
    tcp.set_write_timeout(Some(limits.client_timeout));
    // Pinned, so that it is `Unpin` for rustls.
    match tokio::time::timeout(limits.client_timeout, acceptor.accept(Box::pin(tcp))).await {
        Ok(Ok(tls)) => Ok(tls),
        Ok(Err(err)) => Err(format!("TLS handshake failed: {err}")),
        Err(_) => Err("TLS handshake timed out".into()),
    }
}

/// Serves one connection: pending until a request authenticates (then holding one of the
/// authenticated slots, if one is free), and closed when dropped from the pending table,
/// when idle for the client timeout, or at shutdown.
async fn serve_connection<S>(
    tls: ClientStream,
    service: S,
    client: Arc<ClientConnection>,
    mut pending: crate::admission::Pending,
    authenticated: Arc<Semaphore>,
    limits: ApiLimits,
    shutdown: CancellationToken,
) -> Result<(), String>
where
    S: tower::Service<
            Request<hyper::body::Incoming>,
            Response = Response,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.client_timeout)
        .max_buf_size(MAX_HEAD_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEAD_BYTES as u32)
        .max_concurrent_streams(MAX_H2_STREAMS)
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .keep_alive_interval(limits.client_timeout)
        .keep_alive_timeout(limits.client_timeout);
    let connection = builder
        .serve_connection_with_upgrades(TokioIo::new(tls), TowerToHyperService::new(service));
    tokio::pin!(connection);
    let mut slot = None;
    let mut idle_check = tokio::time::interval(IDLE_CHECK);
    let why = loop {
        tokio::select! {
            result = connection.as_mut() => {
                return result.map_err(|err| err.to_string());
            }
            _ = client.settle.notified(), if slot.is_none() => {
                // Settled only into a free slot: over the cap it stays pending.
                if let Ok(permit) = authenticated.clone().try_acquire_owned()
                    && pending.settle()
                {
                    slot = Some(permit);
                }
            }
            _ = pending.dropped(), if slot.is_none() => {
                break "dropped for a newer connection (pending table full)".to_string();
            }
            _ = idle_check.tick() => {
                if client.idle_for().is_some_and(|idle| idle >= limits.client_timeout) {
                    break format!("no request for {} ms", limits.client_timeout.as_millis());
                }
            }
            _ = shutdown.cancelled() => break "the server is shutting down".to_string(),
        }
    };
    // Let answers in progress finish, briefly.
    connection.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(CLOSE_GRACE, connection.as_mut()).await;
    Err(why)
}

/// Middleware, inside authentication: reads the request body whole, at most `max_body`
/// bytes, within `client_timeout` (408 after), so that handlers see a complete body and a
/// slow or endless upload holds nothing for long. A larger body is answered 413 after it
/// has been read and thrown away (up to [`DRAIN_LIMIT`]): closing a connection with unread
/// data resets it, and the client would lose the answer.
pub async fn read_body(State(limits): State<ApiLimits>, request: Request, next: Next) -> Response {
    if request.method() == Method::GET || request.method() == Method::HEAD {
        return next.run(request).await;
    }
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|length| length > DRAIN_LIMIT) {
        return too_large(limits);
    }
    let (parts, body) = request.into_parts();
    let collected = tokio::time::timeout(limits.client_timeout, collect(body, limits.max_body));
    match collected.await {
        Ok(Ok(bytes)) => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        Ok(Err(BodyError::TooLarge)) => too_large(limits),
        Ok(Err(BodyError::Read(err))) => ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("the request body could not be read: {err}"),
        )
        .into_response(),
        Err(_) => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "timeout",
            format!(
                "the request body did not arrive within {} ms",
                limits.client_timeout.as_millis()
            ),
        )
        .into_response(),
    }
}

/// The most of a too-large body read (and thrown away) so that its client gets the 413.
const DRAIN_LIMIT: u64 = 16 * 1024 * 1024;

enum BodyError {
    TooLarge,
    Read(axum::Error),
}

/// The body, if it holds at most `max` bytes; past that its bytes are counted and dropped,
/// up to [`DRAIN_LIMIT`].
async fn collect(body: Body, max: usize) -> Result<bytes::Bytes, BodyError> {
    let mut stream = body.into_data_stream();
    let mut kept = bytes::BytesMut::new();
    let mut seen: u64 = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(BodyError::Read)?;
        seen += chunk.len() as u64;
        if seen > DRAIN_LIMIT {
            return Err(BodyError::TooLarge);
        }
        if seen <= max as u64 {
            kept.extend_from_slice(&chunk);
        }
    }
    if seen > max as u64 {
        Err(BodyError::TooLarge)
    } else {
        Ok(kept.freeze())
    }
}

/// 413; the connection is closed after it, as the client may still be sending.
fn too_large(limits: ApiLimits) -> Response {
    let mut response = ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
        format!(
            "the request body is larger than the limit of {} bytes ([limits] api_body_bytes)",
            limits.max_body
        ),
    )
    .into_response();
    response.headers_mut().insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
    response
}
