//! An authenticated link: request/response multiplexing with ids and deadlines, streamed
//! answers, one-way notices and heartbeats with round-trip time, over any byte stream.
//!
//! Three tasks serve a link: a reader, a writer and a heartbeat. The reader never waits on
//! anything but the socket: what it must send (pongs, refusals) it queues with `try_send`,
//! and what it hands to the application goes through a bounded queue that refuses when
//! full. So a slow application cannot stall heartbeats, and two peers that both write a
//! lot cannot deadlock on each other's full buffers.
//!
//! What a peer can make this side hold is bounded per link, in count and in bytes: the
//! frames queued for it ([`Outbox`]: a peer that stops reading holds up its own answers),
//! its requests waiting for the application (`in_bytes`), its requests in flight
//! (`max_requests`) and streams open (`max_streams`), and one status subscription per
//! module (a new one replaces the old).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use super::outbox::{Outbox, Outgoing, Refused};
use crate::protocol::{
    Envelope, ErrorCode, FrameCodec, FrameError, ModuleRef, Notice, OnBehalf, RemoteError, Request,
    Response, StreamItem,
};

/// Tunables of a link. Every queue has a limit.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// Interval between pings.
    pub heartbeat: Duration,
    /// The link closes when nothing at all has arrived for this long.
    pub dead_after: Duration,
    /// Whether this side leaves out its ping on a tick when the peer's ping arrived since
    /// the tick before (see [`answering`](Self::answering)).
    pub answers_pings: bool,
    /// Largest frame either way.
    pub max_frame: usize,
    /// Frames waiting for the writer.
    pub out_queue: usize,
    /// Bytes of frames waiting for the writer (heartbeats, cancels and closes aside);
    /// senders wait while it is spent.
    pub out_bytes: usize,
    /// Requests and notices waiting for the application.
    pub in_queue: usize,
    /// Bytes of requests and notices waiting for the application; past it the peer's
    /// requests are refused as busy and its notices dropped.
    pub in_bytes: usize,
    /// The peer's requests this side is answering at once; past it they are refused as
    /// busy.
    pub max_requests: usize,
    /// Of those, the streamed ones (status and debug subscriptions, blob fetches).
    pub max_streams: usize,
    /// Items of one streamed answer waiting for its reader.
    pub stream_queue: usize,
    /// Told every measured round trip (the metrics).
    pub on_rtt: Option<RttObserver>,
}

/// What a link tells each heartbeat's round trip.
pub type RttSink = Box<dyn Fn(Duration) + Send + Sync>;

/// What an [`RttObserver`] calls once a link, with the peer's name.
pub type ObserveRtt = dyn Fn(&str) -> RttSink + Send + Sync;

/// Gives each link, once, what it tells every round trip it measures. Once a link, not
/// once a round trip: a labelled metric's lookup by the peer's name, on every pong of
/// 10,000 links, was 3 % of an idle master.
#[derive(Clone)]
pub struct RttObserver(pub Arc<ObserveRtt>);

impl std::fmt::Debug for RttObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RttObserver")
    }
}

impl LinkConfig {
    /// Defaults for a heartbeat interval: dead after three missed heartbeats.
    pub fn with_heartbeat(heartbeat: Duration, max_frame: usize) -> Self {
        LinkConfig {
            heartbeat,
            dead_after: heartbeat * 3,
            answers_pings: false,
            max_frame,
            out_queue: 4096,
            out_bytes: 16 << 20,
            in_queue: 4096,
            in_bytes: 32 << 20,
            max_requests: 1024,
            max_streams: 256,
            stream_queue: 256,
            on_rtt: None,
        }
    }

    /// For the side that connects: on a tick, it pings only if no ping of the peer's
    /// arrived since its tick before. The accepting side (a master, which shows each
    /// edge's round trip) pings every interval as it always did, and its liveness check is
    /// unchanged; here, the peer's ping is itself the frame a pong would have brought, so
    /// an idle link carries one ping and one pong an interval instead of two of each.
    /// Whenever the peer's pings stop coming (a slower `heartbeat_ms` over there, pings
    /// stuck behind a backlog, a dying peer), this side pings on every tick, as both
    /// sides did before: it never waits longer for a frame than it did.
    pub fn answering(mut self) -> Self {
        self.answers_pings = true;
        self
    }
}

/// Why a request over the link did not get an answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LinkError {
    /// The link is closed (or closed while waiting).
    #[error("link closed: {0}")]
    Closed(String),
    /// No answer within the deadline.
    #[error("no answer within {} ms", .0.as_millis())]
    Timeout(Duration),
    /// The peer answered with an error.
    #[error("{0}")]
    Remote(#[from] RemoteError),
    /// A streamed answer arrived faster than it was read, and was cut off.
    #[error("stream cut off: its reader fell more than the queue behind")]
    Overflow,
    /// The request does not fit in a frame.
    #[error("{0}")]
    TooLarge(String),
}

/// What the peer sends that the application must handle.
#[derive(Debug)]
pub enum Incoming {
    /// A request to answer through its [`Responder`]. Boxed, so that a link's queue of
    /// what the peer sends keeps small slots (see [`Outbox`]).
    Request(Box<IncomingRequest>),
    /// A one-way notice, holding its share of the link's `in_bytes` until dropped.
    Notice(Notice, Waiting),
}

/// What a notice holds of its link's budget for what waits for the application; dropped
/// with the notice.
#[derive(Debug)]
pub struct Waiting {
    _held: Option<OwnedSemaphorePermit>,
}

/// Answers every request on `incoming` with `Unsupported` and logs every notice, until the
/// link closes: for a side that handles none of what the peer may send yet, so that no
/// peer waits for an answer that will not come.
pub async fn refuse_all(mut incoming: mpsc::Receiver<Incoming>, message: &'static str) {
    while let Some(item) = incoming.recv().await {
        match item {
            Incoming::Request(request) => {
                let error = RemoteError::new(ErrorCode::Unsupported, message);
                request.responder.respond(Err(error)).await;
            }
            Incoming::Notice(notice, _) => tracing::debug!(?notice, "notice not handled"),
        }
    }
}

/// A request from the peer.
#[derive(Debug)]
pub struct IncomingRequest {
    /// The request.
    pub body: Request,
    /// The client the peer forwards it for, to be authorized here (see [`OnBehalf`]).
    pub on_behalf: Option<OnBehalf>,
    /// When the peer stops waiting.
    pub deadline: Instant,
    /// Where the answer goes.
    pub responder: Responder,
    /// Its share of the link's `in_bytes` while it waits for the application.
    _waiting: Option<OwnedSemaphorePermit>,
}

/// Answers one incoming request: once with [`respond`](Self::respond), or as a stream of
/// items closed by [`end`](Self::end). Dropped unanswered, it answers an internal error,
/// so the peer never waits for nothing.
#[derive(Debug)]
pub struct Responder {
    id: u64,
    link: Link,
    answered: AtomicBool,
    /// Cancelled when the peer cancels the request (it dropped a stream, or gave up).
    cancelled: CancellationToken,
    /// Whether it counts among the link's streams in flight.
    stream: bool,
    /// The status subscription it answers, if it does.
    subscription: Option<SubscriptionKey>,
}

/// A module's status subscription on a link: one at a time per module.
type SubscriptionKey = (String, String, u32, Option<String>);

/// A module named by id is that module whatever system the request also names: the key is
/// the id alone, so a peer cannot open many subscriptions to one module by varying the rest.
fn subscription_key(module: &ModuleRef) -> SubscriptionKey {
    match &module.id {
        Some(id) => (String::new(), String::new(), 0, Some(id.clone())),
        None => (
            module.system.clone(),
            module.name.clone(),
            module.index,
            None,
        ),
    }
}

/// The requests answered with a stream.
fn streamed(body: &Request) -> bool {
    matches!(
        body,
        Request::StatusSubscribe { .. }
            | Request::DebugSubscribe { .. }
            | Request::FetchBlobs { .. }
    )
}

impl Responder {
    /// Resolves when the peer no longer wants the answer: it cancelled the request, or
    /// the link closed. A long stream (a status binding, a debug log) ends on it.
    pub async fn cancelled(&self) {
        tokio::select! {
            _ = self.cancelled.cancelled() => {}
            _ = self.link.closed() => {}
        }
    }

    /// Whether the peer no longer wants the answer (see [`cancelled`](Self::cancelled)).
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.is_cancelled() || self.link.is_closed()
    }

    /// Sends the single answer.
    pub async fn respond(self, result: Result<Response, RemoteError>) {
        self.answered.store(true, Ordering::Relaxed);
        let _ = self
            .link
            .send(Envelope::Response {
                id: self.id,
                result,
            })
            .await;
    }

    /// Sends one item of a streamed answer. An item too large for a frame ends the
    /// stream with an error saying so.
    pub async fn item(&self, item: StreamItem) -> Result<(), LinkError> {
        let sent = self
            .link
            .send(Envelope::StreamItem { id: self.id, item })
            .await;
        if matches!(sent, Err(LinkError::TooLarge(_))) {
            self.answered.store(true, Ordering::Relaxed);
        }
        sent
    }

    /// Ends a streamed answer.
    pub async fn end(self, result: Result<(), RemoteError>) {
        self.answered.store(true, Ordering::Relaxed);
        let _ = self
            .link
            .send(Envelope::StreamEnd {
                id: self.id,
                result,
            })
            .await;
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        let shared = &self.link.shared;
        self.link.lock_cancels().remove(&self.id);
        shared.in_flight.fetch_sub(1, Ordering::AcqRel);
        if self.stream {
            shared.streams.fetch_sub(1, Ordering::AcqRel);
        }
        if let Some(key) = &self.subscription {
            let mut subscriptions = shared
                .subscriptions
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if subscriptions.get(key) == Some(&self.id) {
                subscriptions.remove(key);
            }
        }
        if !self.answered.load(Ordering::Relaxed) {
            let _ = shared.out.try_send(&Envelope::Response {
                id: self.id,
                result: Err(RemoteError::new(
                    ErrorCode::Internal,
                    "the request was dropped without an answer",
                )),
            });
        }
    }
}

enum Pending {
    Unary(oneshot::Sender<Result<Response, LinkError>>),
    Stream(mpsc::Sender<Streamed>),
}

/// One item of a streamed answer, holding its share of the link's `in_bytes` until the
/// reader takes it.
struct Streamed {
    item: Result<StreamItem, LinkError>,
    _waiting: Option<OwnedSemaphorePermit>,
}

impl From<LinkError> for Streamed {
    fn from(err: LinkError) -> Self {
        Streamed {
            item: Err(err),
            _waiting: None,
        }
    }
}

struct Shared {
    peer: String,
    config: LinkConfig,
    out: Outbox,
    /// The `in_bytes` budget of what waits for the application.
    in_budget: Arc<Semaphore>,
    /// The peer's requests being answered, and of those the streamed ones.
    in_flight: AtomicUsize,
    streams: AtomicUsize,
    /// Open status subscriptions by module, to the request id that answers each.
    subscriptions: Mutex<HashMap<SubscriptionKey, u64>>,
    pending: Mutex<HashMap<u64, Pending>>,
    /// The peer's requests still being answered, to pass on its cancels.
    cancels: Mutex<HashMap<u64, CancellationToken>>,
    next_id: AtomicU64,
    started: Instant,
    /// Microseconds since `started` at which the last frame arrived.
    last_frame_us: AtomicU64,
    /// When the peer's last ping arrived (µs since `started`; 0 before the first).
    last_ping_us: AtomicU64,
    /// Unix milliseconds of the last frame, for people.
    last_seen_unix_ms: AtomicU64,
    /// Last measured round trip in microseconds; 0 until the first pong.
    rtt_us: AtomicU64,
    /// Told every round trip (from the config's [`RttObserver`]).
    rtt_sink: Option<RttSink>,
    closed: CancellationToken,
    close_reason: Mutex<Option<String>>,
}

/// A handle on a live link; cheap to clone. The link stays up while its tasks run, not
/// while handles exist: call [`close`](Self::close) to end it.
#[derive(Clone)]
pub struct Link {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("peer", &self.shared.peer)
            .field("closed", &self.is_closed())
            .finish()
    }
}

/// What each direction's frame buffer holds when idle. Most frames (heartbeats, calls,
/// answers) are small; a big one (a model snapshot, repository files) grows the buffer,
/// which goes back to this size once empty, so that ten thousand idle links do not each
/// keep the largest frame they ever carried.
const IDLE_BUFFER: usize = 1024;
/// Written frames are flushed once this much is buffered, if not before.
const FLUSH_AT: usize = 8 * 1024;
/// A buffer larger than this is given back when empty.
const SHRINK_ABOVE: usize = 8 * 1024;

fn shrink_idle(buffer: &mut BytesMut) {
    if buffer.is_empty() && buffer.capacity() > SHRINK_ABOVE {
        *buffer = BytesMut::with_capacity(IDLE_BUFFER);
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Link {
    /// Starts the link's tasks over `stream`. `leftover` holds bytes already read past the
    /// handshake. Returns the handle and the queue of what the peer sends.
    pub fn start<S>(
        stream: S,
        leftover: BytesMut,
        peer: impl Into<String>,
        config: LinkConfig,
    ) -> (Link, mpsc::Receiver<Incoming>)
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (out_tx, out_rx) = Outbox::new(config.out_queue, config.out_bytes, config.max_frame);
        let (in_tx, in_rx) = mpsc::channel(config.in_queue);
        let in_bytes = config.in_bytes.clamp(1, u32::MAX as usize);
        let peer = peer.into();
        let rtt_sink = config.on_rtt.as_ref().map(|RttObserver(sink)| sink(&peer));
        let link = Link {
            shared: Arc::new(Shared {
                peer,
                config: config.clone(),
                out: out_tx,
                in_budget: Arc::new(Semaphore::new(in_bytes)),
                in_flight: AtomicUsize::new(0),
                streams: AtomicUsize::new(0),
                subscriptions: Mutex::default(),
                pending: Mutex::new(HashMap::new()),
                cancels: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
                started: Instant::now(),
                last_frame_us: AtomicU64::new(0),
                last_ping_us: AtomicU64::new(0),
                last_seen_unix_ms: AtomicU64::new(unix_ms()),
                rtt_us: AtomicU64::new(0),
                rtt_sink,
                closed: CancellationToken::new(),
                close_reason: Mutex::new(None),
            }),
        };
        let (read_half, write_half) = tokio::io::split(stream);
        let codec = FrameCodec::<Envelope>::new(config.max_frame);
        let mut reader = FramedRead::with_capacity(read_half, codec, IDLE_BUFFER);
        reader.read_buffer_mut().extend_from_slice(&leftover);
        tokio::spawn(link.clone().read_loop(reader, in_tx));
        // A peer that stops reading while it keeps sending (heartbeats included) would
        // hold every sender here forever: a write that makes no progress for as long as
        // a silent link may live ends the link.
        let mut writer = tokio_io_timeout::TimeoutWriter::new(write_half);
        writer.set_timeout(Some(config.dead_after));
        tokio::spawn(link.clone().write_loop(Box::pin(writer), out_rx));
        tokio::spawn(link.clone().heartbeat_loop());
        (link, in_rx)
    }

    /// The peer's name (an edge id, or the master's address).
    pub fn peer(&self) -> &str {
        &self.shared.peer
    }

    /// The last measured round-trip time.
    pub fn rtt(&self) -> Option<Duration> {
        match self.shared.rtt_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    /// Unix milliseconds at which the last frame arrived.
    pub fn last_seen_unix_ms(&self) -> u64 {
        self.shared.last_seen_unix_ms.load(Ordering::Relaxed)
    }

    /// When the last frame arrived, on the control core's monotonic clock (a step of the
    /// wall clock does not move it).
    pub fn last_heard(&self) -> crate::control::Mono {
        let silent_ms = self
            .now_us()
            .saturating_sub(self.shared.last_frame_us.load(Ordering::Relaxed))
            / 1000;
        let now = crate::control::clock::mono_now();
        crate::control::Mono(now.0.saturating_sub(silent_ms))
    }

    /// Whether the link has closed.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.is_cancelled()
    }

    /// Resolves when the link closes.
    pub async fn closed(&self) {
        self.shared.closed.cancelled().await
    }

    /// Why the link closed, once it has.
    pub fn close_reason(&self) -> Option<String> {
        self.shared.close_reason.lock().ok().and_then(|r| r.clone())
    }

    /// Closes the link, telling the peer why. Waiting requests fail with the reason.
    pub fn close(&self, reason: impl Into<String>) {
        let reason = reason.into();
        let _ = self.shared.out.try_send(&Envelope::Close {
            reason: reason.clone(),
        });
        self.shutdown(reason);
    }

    /// Whether `other` is a handle on this same link (not another link to the same peer).
    pub fn same_link(&self, other: &Link) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    /// Sends a request and waits up to `timeout` for its answer.
    pub async fn request(&self, body: Request, timeout: Duration) -> Result<Response, LinkError> {
        self.request_as(body, timeout, None).await
    }

    /// Sends a request on behalf of a client (see [`OnBehalf`]) and waits up to `timeout`
    /// for its answer.
    pub async fn request_as(
        &self,
        body: Request,
        timeout: Duration,
        on_behalf: Option<OnBehalf>,
    ) -> Result<Response, LinkError> {
        let (tx, rx) = oneshot::channel();
        let id = self.register(Pending::Unary(tx))?;
        let exchange = async {
            self.send_request(id, timeout, body, on_behalf).await?;
            match rx.await {
                Ok(result) => result,
                Err(_) => Err(self.closed_error()),
            }
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_) => {
                self.forget(id);
                Err(LinkError::Timeout(timeout))
            }
        }
    }

    /// Sends a request whose answer is a stream. The peer must start within `timeout`'s
    /// reach; the stream then lasts until the peer ends it or it is dropped.
    pub async fn request_stream(
        &self,
        body: Request,
        timeout: Duration,
    ) -> Result<ResponseStream, LinkError> {
        self.request_stream_as(body, timeout, None).await
    }

    /// [`request_stream`](Self::request_stream) on behalf of a client (see [`OnBehalf`]).
    pub async fn request_stream_as(
        &self,
        body: Request,
        timeout: Duration,
        on_behalf: Option<OnBehalf>,
    ) -> Result<ResponseStream, LinkError> {
        let (tx, rx) = mpsc::channel(self.shared.config.stream_queue.max(2));
        let id = self.register(Pending::Stream(tx))?;
        match tokio::time::timeout(timeout, self.send_request(id, timeout, body, on_behalf)).await {
            Ok(sent) => sent?,
            Err(_) => {
                self.forget(id);
                return Err(LinkError::Timeout(timeout));
            }
        }
        Ok(ResponseStream {
            id,
            rx,
            link: self.clone(),
        })
    }

    /// Queues request `id` (registered already); if it cannot go, its waiter is removed
    /// and the error is the sender's.
    async fn send_request(
        &self,
        id: u64,
        timeout: Duration,
        body: Request,
        on_behalf: Option<OnBehalf>,
    ) -> Result<(), LinkError> {
        let sent = self
            .send(Envelope::Request {
                id,
                deadline_ms: deadline_ms(timeout),
                body,
                on_behalf,
            })
            .await;
        if sent.is_err() {
            self.lock_pending().remove(&id);
        }
        sent
    }

    /// Sends a one-way notice.
    pub async fn notify(&self, notice: Notice) -> Result<(), LinkError> {
        self.send(Envelope::Notice(notice)).await
    }

    /// Queues a frame, waiting for room in the link's queue. A frame too large for the
    /// link is the sender's error; an answer or stream item too large is replaced by an
    /// error answer saying so, so the peer does not wait for it.
    async fn send(&self, envelope: Envelope) -> Result<(), LinkError> {
        if self.is_closed() {
            return Err(self.closed_error());
        }
        let why = match self.shared.out.send(&envelope).await {
            Ok(()) => return Ok(()),
            Err(Refused::Closed | Refused::Full) => return Err(self.closed_error()),
            Err(Refused::TooLarge(why)) => why,
        };
        tracing::warn!(peer = %self.shared.peer, "frame not sent: {why}");
        let too_large = RemoteError::new(ErrorCode::TooLarge, why.clone());
        let replacement = match envelope {
            Envelope::Response { id, .. } => Some(Envelope::Response {
                id,
                result: Err(too_large),
            }),
            Envelope::StreamItem { id, .. } => Some(Envelope::StreamEnd {
                id,
                result: Err(too_large),
            }),
            _ => None,
        };
        if let Some(replacement) = replacement {
            let _ = self.shared.out.send(&replacement).await;
        }
        Err(LinkError::TooLarge(why))
    }

    fn register(&self, pending: Pending) -> Result<u64, LinkError> {
        if self.is_closed() {
            return Err(self.closed_error());
        }
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock_pending().insert(id, pending);
        // A close between the check and the insert would leave this entry unfailed.
        if self.is_closed() {
            self.lock_pending().remove(&id);
            return Err(self.closed_error());
        }
        Ok(id)
    }

    /// Drops a request we no longer wait for, and tells the peer it may stop.
    fn forget(&self, id: u64) {
        if self.lock_pending().remove(&id).is_some() {
            let _ = self.shared.out.try_send(&Envelope::Cancel { id });
        }
    }

    fn lock_cancels(&self) -> std::sync::MutexGuard<'_, HashMap<u64, CancellationToken>> {
        self.shared
            .cancels
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Pending>> {
        // The map holds no invariant a panic could break halfway; keep going.
        self.shared
            .pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn closed_error(&self) -> LinkError {
        LinkError::Closed(self.close_reason().unwrap_or_else(|| "closed".to_string()))
    }

    /// Marks the link closed (first reason wins) and fails everything waiting on it.
    fn shutdown(&self, reason: String) {
        {
            let mut slot = self
                .shared
                .close_reason
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if slot.is_none() {
                *slot = Some(reason);
            }
        }
        self.shared.closed.cancel();
        // Senders waiting for room in the queue give up.
        self.shared.out.close();
        let error = self.closed_error();
        let pending: Vec<Pending> = self.lock_pending().drain().map(|(_, p)| p).collect();
        for waiter in pending {
            match waiter {
                Pending::Unary(tx) => {
                    let _ = tx.send(Err(error.clone()));
                }
                Pending::Stream(tx) => {
                    let _ = tx.try_send(error.clone().into());
                }
            }
        }
    }

    fn now_us(&self) -> u64 {
        self.shared.started.elapsed().as_micros() as u64
    }

    async fn read_loop<R: AsyncRead + Send + Unpin>(
        self,
        mut reader: FramedRead<R, FrameCodec<Envelope>>,
        incoming: mpsc::Sender<Incoming>,
    ) {
        // One wait for the close for the whole loop: a new one each frame registers and
        // drops a waiter under the token's lock (5 % of an idle master's CPU).
        let closed = self.shared.closed.cancelled();
        tokio::pin!(closed);
        let reason = loop {
            let frame = tokio::select! {
                frame = reader.next() => frame,
                _ = &mut closed => return,
            };
            shrink_idle(reader.read_buffer_mut());
            match frame {
                Some(Ok(envelope)) => {
                    self.shared
                        .last_frame_us
                        .store(self.now_us(), Ordering::Relaxed);
                    self.shared
                        .last_seen_unix_ms
                        .store(unix_ms(), Ordering::Relaxed);
                    let size = reader.decoder().last_frame_len();
                    if let Some(reason) = self.dispatch(envelope, size, &incoming) {
                        break reason;
                    }
                }
                Some(Err(FrameError::Io(err))) => break format!("read failed: {err}"),
                Some(Err(err)) => {
                    tracing::error!(peer = %self.shared.peer, "closing link: {err}");
                    break format!("bad frame from peer: {err}");
                }
                None => break "the peer closed the connection".to_string(),
            }
        };
        self.shutdown(reason);
    }

    /// A frame of `size` bytes' share of the `in_bytes` budget, if there is room.
    fn in_budget(&self, size: usize) -> Option<OwnedSemaphorePermit> {
        let share = size.clamp(1, self.shared.config.in_bytes.clamp(1, u32::MAX as usize));
        self.shared
            .in_budget
            .clone()
            .try_acquire_many_owned(share as u32)
            .ok()
    }

    /// Hands a request of the peer (a frame of `size` bytes) to the application, or
    /// refuses it as busy when the link's caps are reached: requests in flight, streams
    /// open, bytes waiting. A status subscription replaces any open one of the same module.
    fn take_request(
        &self,
        id: u64,
        deadline_ms: u32,
        body: Request,
        on_behalf: Option<OnBehalf>,
        size: usize,
        incoming: &mpsc::Sender<Incoming>,
    ) {
        let shared = &self.shared;
        let config = &shared.config;
        let stream = streamed(&body);
        let over = if shared.in_flight.load(Ordering::Acquire) >= config.max_requests {
            Some(format!(
                "too many requests in flight on this link (at most {})",
                config.max_requests
            ))
        } else if stream && shared.streams.load(Ordering::Acquire) >= config.max_streams {
            Some(format!(
                "too many streams open on this link (at most {})",
                config.max_streams
            ))
        } else {
            None
        };
        let waiting = match over {
            Some(_) => None,
            None => self.in_budget(size),
        };
        let Some(waiting) = waiting else {
            let message = over.unwrap_or_else(|| {
                format!(
                    "too many bytes of requests waiting on this link (at most {})",
                    config.in_bytes
                )
            });
            let _ = shared.out.try_send(&Envelope::Response {
                id,
                result: Err(RemoteError::new(ErrorCode::Busy, message)),
            });
            return;
        };
        shared.in_flight.fetch_add(1, Ordering::AcqRel);
        if stream {
            shared.streams.fetch_add(1, Ordering::AcqRel);
        }
        let cancelled = CancellationToken::new();
        // A peer reusing an id it still waits on gets the newer request's cancel.
        self.lock_cancels().insert(id, cancelled.clone());
        let subscription = match &body {
            Request::StatusSubscribe { module } => Some(subscription_key(module)),
            _ => None,
        };
        if let Some(key) = &subscription {
            let replaced = shared
                .subscriptions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key.clone(), id);
            if let Some(old) = replaced.filter(|old| *old != id)
                && let Some(token) = self.lock_cancels().get(&old)
            {
                token.cancel();
            }
        }
        let request = IncomingRequest {
            body,
            on_behalf,
            deadline: Instant::now() + Duration::from_millis(u64::from(deadline_ms)),
            responder: Responder {
                id,
                link: self.clone(),
                answered: AtomicBool::new(false),
                cancelled,
                stream,
                subscription,
            },
            _waiting: Some(waiting),
        };
        if let Err(err) = incoming.try_send(Incoming::Request(Box::new(request))) {
            let (message, rejected) = match err {
                mpsc::error::TrySendError::Full(r) => ("too many requests waiting on this link", r),
                mpsc::error::TrySendError::Closed(r) => ("this side no longer takes requests", r),
            };
            if let Incoming::Request(request) = rejected {
                request.responder.answered.store(true, Ordering::Relaxed);
                let _ = shared.out.try_send(&Envelope::Response {
                    id,
                    result: Err(RemoteError::new(ErrorCode::Unavailable, message)),
                });
            }
        }
    }

    /// Handles one frame of `size` bytes; returns a reason when the link must close.
    fn dispatch(
        &self,
        envelope: Envelope,
        size: usize,
        incoming: &mpsc::Sender<Incoming>,
    ) -> Option<String> {
        match envelope {
            Envelope::Request {
                id,
                deadline_ms,
                body,
                on_behalf,
            } => self.take_request(id, deadline_ms, body, on_behalf, size, incoming),
            Envelope::Response { id, result } => {
                let waiter = self.lock_pending().remove(&id);
                match waiter {
                    Some(Pending::Unary(tx)) => {
                        let _ = tx.send(result.map_err(LinkError::Remote));
                    }
                    Some(Pending::Stream(tx)) => {
                        let error = match result {
                            Err(remote) => LinkError::Remote(remote),
                            Ok(_) => LinkError::Remote(RemoteError::new(
                                ErrorCode::Internal,
                                "the peer answered a stream request with a single response",
                            )),
                        };
                        let _ = tx.try_send(error.into());
                    }
                    // A late answer to a request we gave up on.
                    None => {
                        tracing::trace!(peer = %self.shared.peer, id, "answer to a forgotten request")
                    }
                }
            }
            Envelope::StreamItem { id, item } => {
                let mut pending = self.lock_pending();
                if let Some(Pending::Stream(tx)) = pending.get(&id) {
                    // Keep the last slot for the overflow error, so the reader learns why
                    // its stream ended. An item also waits within the link's `in_bytes`:
                    // a reader that falls behind is cut off, in bytes as in count.
                    let waiting = (tx.capacity() > 1).then(|| self.in_budget(size)).flatten();
                    if waiting.is_some() {
                        let _ = tx.try_send(Streamed {
                            item: Ok(item),
                            _waiting: waiting,
                        });
                    } else {
                        let _ = tx.try_send(LinkError::Overflow.into());
                        pending.remove(&id);
                        let _ = self.shared.out.try_send(&Envelope::Cancel { id });
                    }
                }
            }
            Envelope::StreamEnd { id, result } => {
                let waiter = self.lock_pending().remove(&id);
                if let (Some(Pending::Stream(tx)), Err(remote)) = (waiter, result) {
                    let _ = tx.try_send(LinkError::Remote(remote).into());
                }
            }
            Envelope::Cancel { id } => {
                tracing::trace!(peer = %self.shared.peer, id, "peer cancelled a request");
                if let Some(token) = self.lock_cancels().remove(&id) {
                    token.cancel();
                }
            }
            Envelope::Notice(notice) => {
                let Some(waiting) = self.in_budget(size) else {
                    tracing::warn!(peer = %self.shared.peer, "notice dropped: the link's in_bytes of waiting requests and notices are spent");
                    return None;
                };
                if incoming
                    .try_send(Incoming::Notice(
                        notice,
                        Waiting {
                            _held: Some(waiting),
                        },
                    ))
                    .is_err()
                {
                    tracing::warn!(peer = %self.shared.peer, "notice dropped: the application queue is full");
                }
            }
            Envelope::Ping { seq, sent_us } => {
                self.shared
                    .last_ping_us
                    .store(self.now_us().max(1), Ordering::Relaxed);
                let _ = self.shared.out.try_send(&Envelope::Pong { seq, sent_us });
            }
            Envelope::Pong { sent_us, .. } => {
                let rtt = self.now_us().saturating_sub(sent_us).max(1);
                self.shared.rtt_us.store(rtt, Ordering::Relaxed);
                if let Some(sink) = &self.shared.rtt_sink {
                    sink(Duration::from_micros(rtt));
                }
            }
            Envelope::Close { reason } => {
                return Some(format!("the peer closed the link: {reason}"));
            }
        }
        None
    }

    async fn write_loop<W: AsyncWrite + Send + Unpin>(
        self,
        mut writer: W,
        mut out: mpsc::Receiver<Outgoing>,
    ) {
        // Small frames are gathered into one buffer and written together; a frame of
        // `FLUSH_AT` or more is written as it is, not copied.
        let mut buffer = BytesMut::with_capacity(IDLE_BUFFER);
        // Outside the write future, so that frames not yet written when the link closes
        // are still sent by the drain below.
        let mut batch = std::collections::VecDeque::new();
        // One wait for the close for the whole loop (see `read_loop`).
        let closed = self.shared.closed.cancelled();
        tokio::pin!(closed);
        loop {
            let frame = tokio::select! {
                frame = out.recv() => frame,
                _ = &mut closed => None,
            };
            let Some(frame) = frame else { break };
            // Batch whatever else is queued into one flush.
            batch.push_back(frame);
            while batch.len() < 256 {
                match out.try_recv() {
                    Ok(more) => batch.push_back(more),
                    Err(_) => break,
                }
            }
            let write = write_batch(&mut writer, &mut buffer, &mut batch);
            // A peer that stops reading (a cut link) can stall a write forever; the close
            // (from missed heartbeats, or on purpose) must still end this task, so that the
            // queue's receiver goes and nothing waits on a full queue.
            tokio::select! {
                biased;
                result = write => if let Err(err) = result {
                    let reason = if err.kind() == std::io::ErrorKind::TimedOut {
                        format!(
                            "the peer read nothing for {} ms",
                            self.shared.config.dead_after.as_millis()
                        )
                    } else {
                        format!("write failed: {err}")
                    };
                    tracing::warn!(peer = %self.shared.peer, "closing link: {reason}");
                    self.shutdown(reason);
                    return;
                },
                _ = &mut closed => break,
            }
            shrink_idle(&mut buffer);
        }
        // Closing: send what is already queued (a `Close` frame, answers), for at most
        // half a second, since the peer may be the reason we close.
        let drain = async {
            while let Ok(more) = out.try_recv() {
                batch.push_back(more);
            }
            buffer.clear();
            let _ = write_batch(&mut writer, &mut buffer, &mut batch).await;
            let _ = writer.shutdown().await;
        };
        let _ = tokio::time::timeout(Duration::from_millis(500), drain).await;
    }

    async fn heartbeat_loop(self) {
        let heartbeat = self.shared.config.heartbeat;
        let dead_after = self.shared.config.dead_after.as_micros() as u64;
        let answers_pings = self.shared.config.answers_pings;
        let mut last_tick_us = 0;
        let mut ticker = tokio::time::interval(heartbeat);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seq = 0u64;
        // One wait for the close for the whole loop (see `read_loop`).
        let closed = self.shared.closed.cancelled();
        tokio::pin!(closed);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = &mut closed => return,
            }
            let silent_for = self
                .now_us()
                .saturating_sub(self.shared.last_frame_us.load(Ordering::Relaxed));
            if silent_for > dead_after {
                let reason = format!(
                    "nothing received for {} ms (missed heartbeats)",
                    silent_for / 1000
                );
                tracing::warn!(peer = %self.shared.peer, "closing link: {reason}");
                self.shutdown(reason);
                return;
            }
            let tick_us = self.now_us();
            let pinged_since = self.shared.last_ping_us.load(Ordering::Relaxed) > last_tick_us;
            last_tick_us = tick_us;
            if answers_pings && pinged_since {
                continue;
            }
            seq += 1;
            let _ = self.shared.out.try_send(&Envelope::Ping {
                seq,
                sent_us: self.now_us(),
            });
        }
    }
}

/// Writes a batch of encoded frames and flushes; each frame's budget is released once it
/// is handed to the socket.
async fn write_batch<W: AsyncWrite + Unpin>(
    writer: &mut W,
    buffer: &mut BytesMut,
    batch: &mut std::collections::VecDeque<Outgoing>,
) -> std::io::Result<()> {
    while let Some(outgoing) = batch.pop_front() {
        if outgoing.frame.len() >= FLUSH_AT {
            if !buffer.is_empty() {
                writer.write_all(buffer).await?;
                buffer.clear();
            }
            writer.write_all(&outgoing.frame).await?;
        } else {
            buffer.extend_from_slice(&outgoing.frame);
            if buffer.len() >= FLUSH_AT {
                writer.write_all(buffer).await?;
                buffer.clear();
            }
        }
    }
    if !buffer.is_empty() {
        writer.write_all(buffer).await?;
        buffer.clear();
    }
    writer.flush().await
}

fn deadline_ms(timeout: Duration) -> u32 {
    timeout.as_millis().min(u128::from(u32::MAX)) as u32
}

/// A streamed answer. Dropping it tells the peer to stop.
#[derive(Debug)]
pub struct ResponseStream {
    id: u64,
    rx: mpsc::Receiver<Streamed>,
    link: Link,
}

impl ResponseStream {
    /// The next item; `None` when the peer ended the stream successfully.
    pub async fn next(&mut self) -> Option<Result<StreamItem, LinkError>> {
        self.rx.recv().await.map(|streamed| streamed.item)
    }
}

impl Drop for ResponseStream {
    fn drop(&mut self) {
        self.link.forget(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two ends of a link over an in-memory pipe, each counting the round trips it
    /// measured (one per pong it got, so one per ping it sent and had answered). The
    /// connecting end starts a third of its interval after the accepting one: two real
    /// peers tick at unrelated moments, and on paused time two ticks at the very same
    /// instant would each miss the other's ping.
    async fn linked(
        accepting: Duration,
        connecting: Duration,
    ) -> [(Link, mpsc::Receiver<Incoming>, Arc<AtomicUsize>); 2] {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let start = |stream, name, answering, heartbeat| {
            let pongs = Arc::new(AtomicUsize::new(0));
            let counted = pongs.clone();
            let mut config = LinkConfig::with_heartbeat(heartbeat, 1 << 20);
            if answering {
                config = config.answering();
            }
            config.on_rtt = Some(RttObserver(Arc::new(move |_| {
                let counted = counted.clone();
                Box::new(move |_| {
                    counted.fetch_add(1, Ordering::Relaxed);
                })
            })));
            let (link, incoming) = Link::start(stream, BytesMut::new(), name, config);
            (link, incoming, pongs)
        };
        let accepting_end = start(a, "a", false, accepting);
        tokio::time::sleep(connecting / 3).await;
        [accepting_end, start(b, "b", true, connecting)]
    }

    /// `a` accepts and pings, `b` connects and answers: a master and its edge. On paused
    /// time (it advances only when both ends wait), so a busy machine, which can stall this
    /// thread past the 60 ms `dead_after` between two frames, cannot kill the link.
    #[tokio::test(start_paused = true)]
    async fn an_idle_link_carries_one_ping_an_interval_and_a_slower_peer_is_pinged() {
        let heartbeat = Duration::from_millis(20);
        let [(a, _a_in, a_pongs), (b, _b_in, b_pongs)] = linked(heartbeat, heartbeat).await;
        // Idle for 50 intervals: the link lives on; `a` pings every interval and `b`
        // (whose tick sees `a`'s ping every time) never: 50 pings answered in all, where
        // each side pinging every interval made 100.
        tokio::time::sleep(heartbeat * 50).await;
        assert!(!a.is_closed() && !b.is_closed(), "an idle link stays up");
        let (from_a, from_b) = (
            a_pongs.load(Ordering::Relaxed),
            b_pongs.load(Ordering::Relaxed),
        );
        assert!(from_a >= 49, "a pinged {from_a} times in 50 intervals");
        assert!(
            from_b <= 1,
            "b pinged {from_b} times though a pinged each interval"
        );

        // The accepting side pings every 60 ms, the connecting one ticks every 20: two
        // of its three ticks see no ping of the peer's, so it pings then and lives on.
        let [(a, _a_in, _), (b, _b_in, b_pongs)] =
            linked(Duration::from_millis(60), Duration::from_millis(20)).await;
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert!(!a.is_closed() && !b.is_closed(), "the link stays up");
        let from_b = b_pongs.load(Ordering::Relaxed);
        assert!(
            (38..=41).contains(&from_b),
            "b pinged {from_b} times in 60 of its intervals, not on two of each three"
        );
    }
}
