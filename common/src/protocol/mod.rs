//! The edge link's wire format: message types and the frame codec. No I/O lives here.
//!
//! A frame is a 4-byte big-endian length and a postcard-encoded value. Before
//! authentication the values are [`Handshake`] messages (with a small frame bound);
//! afterwards they are [`Envelope`]s.

mod codec;
mod envelope;
mod handshake;
mod json;
mod messages;

pub use codec::{FrameCodec, FrameError, decode_frame, encode_frame};
pub use envelope::{Envelope, ErrorCode, OnBehalf, RemoteError};
pub use handshake::{Handshake, NONCE_LEN, Nonce};
pub use json::Json;
pub use messages::{
    AuditRecord, CodeAudit, ControlOwner, EntityKind, FileEntry, ModelBatch, ModelChange,
    ModuleRef, Notice, RepositoryAction, Request, Response, StreamItem,
};

/// The protocol version both sides must speak; checked in the handshake. 6: site pairs
/// (node reports, pair grants with proofs, peer notes, array slots).
pub const PROTOCOL_VERSION: u16 = 6;

/// Frame bound while a peer is not yet authenticated: handshake messages are tiny, so an
/// anonymous peer can make us buffer no more than this.
pub const HANDSHAKE_MAX_FRAME: usize = 4096;
