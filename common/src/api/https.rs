//! Serving an axum router over TLS: an accept loop under a cap on connections, a deadline
//! on each client's TLS handshake, request head and blocked writes, hyper's automatic
//! HTTP/1.1 or HTTP/2, and WebSocket upgrades.
//!
//! What a client that has not authenticated can make the server hold is bounded here: one
//! of `max_connections` slots, for at most `client_timeout` per step (handshake, each
//! request head, each write it does not read), with a request head of at most
//! [`MAX_HEAD_BYTES`]. Request bodies are read only after authentication ([`read_body`]).

use std::sync::Arc;
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
use tokio::sync::Semaphore;
use tokio_io_timeout::TimeoutStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::ApiError;

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

/// What one client of the API may take.
#[derive(Debug, Clone, Copy)]
pub struct ApiLimits {
    /// Connections served at once; further clients wait in the kernel's accept queue.
    pub max_connections: usize,
    /// The largest request body, in bytes.
    pub max_body: usize,
    /// The deadline of a TLS handshake, of a request head, of a request body and of any
    /// write the client does not take.
    pub client_timeout: Duration,
}

impl ApiLimits {
    /// From the `[limits]` of a configuration file.
    pub fn from_config(limits: &tether_config::Limits) -> Self {
        ApiLimits {
            max_connections: usize::try_from(limits.api_connections).unwrap_or(usize::MAX),
            max_body: usize::try_from(limits.api_body_bytes).unwrap_or(usize::MAX),
            client_timeout: Duration::from_millis(limits.client_timeout_ms),
        }
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
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        // At the cap, stop accepting: later clients wait in the kernel's queue.
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => return,
            },
            _ = shutdown.cancelled() => return,
        };
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
        let acceptor = acceptor.clone();
        let service = TowerToHyperService::new(router.clone());
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _slot = slot;
            // A client that stops reading blocks the server's writes: after the deadline
            // the write fails and the connection ends.
            let mut tcp = TimeoutStream::new(tcp);
            tcp.set_write_timeout(Some(limits.client_timeout));
            // Pinned, so that it is `Unpin` for rustls.
            let tcp = Box::pin(tcp);
            let tls = match tokio::time::timeout(limits.client_timeout, acceptor.accept(tcp)).await
            {
                Ok(Ok(tls)) => tls,
                Ok(Err(err)) => {
                    tracing::debug!(%addr, "API TLS handshake failed: {err}");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%addr, "API TLS handshake timed out");
                    return;
                }
            };
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
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
            tokio::select! {
                result = connection => {
                    if let Err(err) = result {
                        tracing::debug!(%addr, "API connection ended: {err}");
                    }
                }
                _ = shutdown.cancelled() => {}
            }
        });
    }
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
