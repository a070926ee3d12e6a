use serde::{Deserialize, Serialize};

use super::{Notice, Request, Response, StreamItem};

/// One frame on an authenticated link. Requests carry an id chosen by the sender; the
/// answer (a response, or stream items and an end) carries the same id. Ids of the two
/// directions are independent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Envelope {
    /// A request; the peer must answer before `deadline_ms` from when it received it.
    Request {
        /// Request id.
        id: u64,
        /// Milliseconds the requester will wait.
        deadline_ms: u32,
        /// The request.
        body: Request,
        /// The client the sender forwards this request for, when the receiver must
        /// authorize that client itself (an edge passing on a user's call for a unit
        /// outside its own site).
        on_behalf: Option<OnBehalf>,
    },
    /// The single answer to a request.
    Response {
        /// The request's id.
        id: u64,
        /// The answer, or why there is none.
        result: Result<Response, RemoteError>,
    },
    /// One item of a streamed answer (debug logs, repository files).
    StreamItem {
        /// The request's id.
        id: u64,
        /// The item.
        item: StreamItem,
    },
    /// The end of a streamed answer.
    StreamEnd {
        /// The request's id.
        id: u64,
        /// Whether the stream completed.
        result: Result<(), RemoteError>,
    },
    /// The requester gave up on a request (its deadline passed); the peer may stop work.
    Cancel {
        /// The request's id.
        id: u64,
    },
    /// A one-way message that needs no answer.
    Notice(Notice),
    /// Heartbeat; the peer answers with `Pong` carrying the same values.
    Ping {
        /// Sequence number.
        seq: u64,
        /// The sender's clock, in microseconds since the link started.
        sent_us: u64,
    },
    /// Answer to a `Ping`.
    Pong {
        /// Echoed sequence number.
        seq: u64,
        /// Echoed clock value.
        sent_us: u64,
    },
    /// The sender is closing the link on purpose, and says why.
    Close {
        /// Why.
        reason: String,
    },
}

/// A client's bearer token, carried with a request an edge forwards to the master for a
/// unit outside the edge's own site: the master authenticates and authorizes that client
/// as if it had called the master's API, so an edge can never lend its own standing (or
/// its local admin token) to another site. Never printed.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OnBehalf(pub String);

impl std::fmt::Debug for OnBehalf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnBehalf(..)")
    }
}

/// What went wrong with a request, as an error code and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct RemoteError {
    /// Machine-readable kind.
    pub code: ErrorCode,
    /// Explanation.
    pub message: String,
}

impl RemoteError {
    /// Builds an error.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        RemoteError {
            code,
            message: message.into(),
        }
    }
}

/// Error kinds, matching the client API's HTTP statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// Malformed or unacceptable arguments (422).
    BadRequest,
    /// No such system, module or method (404).
    NotFound,
    /// The request carried an epoch older than the receiver has seen (409).
    StaleEpoch,
    /// The target is not reachable now (503).
    Unavailable,
    /// The deadline passed (504).
    Timeout,
    /// Not allowed (403).
    Forbidden,
    /// The receiver does not handle this request (yet, or on this side).
    Unsupported,
    /// The answer would exceed the frame bound.
    TooLarge,
    /// A fault inside the receiver (500).
    Internal,
    /// The module runs on neither side, or the call would go back where it came from.
    NotHere,
    /// The module's script failed to compile or load (503).
    Faulted,
    /// The module's queue is full (503).
    Busy,
    /// The module's script threw or broke a limit (500).
    Script,
    /// The module waits for its driver code, on its way (503, try again shortly).
    Waiting,
}
