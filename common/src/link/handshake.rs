//! The authentication exchange over a fresh TLS stream, for each side.
//!
//! Frames here are bounded by [`HANDSHAKE_MAX_FRAME`], so a peer that has not proved
//! anything can make us hold at most a few KiB. The caller bounds the time.

use bytes::BytesMut;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{Framed, FramedParts};

use super::Secret;
use super::auth::{
    EXPORTER_LABEL, EXPORTER_LEN, Exporter, Transcript, edge_proof, master_proof, new_nonce,
    verify_edge_proof, verify_master_proof,
};
use crate::protocol::{FrameCodec, FrameError, HANDSHAKE_MAX_FRAME, Handshake, PROTOCOL_VERSION};

/// Why a handshake failed. The master logs these; the peer is told only that it failed
/// (and a protocol mismatch), so the answer is no oracle for which ids exist.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The peer speaks another protocol version.
    #[error("protocol version {theirs} is not supported (this side speaks {ours})")]
    Version {
        /// The peer's.
        theirs: u16,
        /// Ours.
        ours: u16,
    },
    /// No edge with that id is configured.
    #[error("unknown edge id {0:?}")]
    UnknownEdge(String),
    /// The MAC did not verify: a wrong secret, or an answer replayed or relayed from
    /// another connection (its nonces or TLS exporter value differ).
    #[error(
        "edge {0:?} failed authentication: wrong secret, or an answer replayed or relayed from another connection"
    )]
    BadEdgeProof(String),
    /// The master's MAC did not verify: it does not hold our secret.
    #[error("the master's proof did not verify: it does not hold this edge's secret")]
    BadMasterProof,
    /// The master refused us.
    #[error("the master refused the link: {0}")]
    Refused(String),
    /// A message arrived out of order.
    #[error("unexpected handshake message: expected {expected}, got {got}")]
    Unexpected {
        /// What the protocol expected.
        expected: &'static str,
        /// What came.
        got: &'static str,
    },
    /// The peer closed the connection during the handshake.
    #[error("the peer closed the connection during the handshake")]
    Closed,
    /// A frame was malformed or too large.
    #[error("handshake frame: {0}")]
    Frame(#[from] FrameError),
    /// The TLS exporter value could not be derived.
    #[error("TLS exporter: {0}")]
    Exporter(rustls::Error),
}

fn name(message: &Handshake) -> &'static str {
    match message {
        Handshake::Challenge { .. } => "Challenge",
        Handshake::Answer { .. } => "Answer",
        Handshake::Accepted { .. } => "Accepted",
        Handshake::Refused { .. } => "Refused",
    }
}

/// This connection's exporter value, on the master (TLS server) side.
pub fn server_exporter<IO>(
    stream: &tokio_rustls::server::TlsStream<IO>,
) -> Result<Exporter, AuthError> {
    stream
        .get_ref()
        .1
        .export_keying_material([0u8; EXPORTER_LEN], EXPORTER_LABEL, None)
        .map_err(AuthError::Exporter)
}

/// This connection's exporter value, on the edge (TLS client) side.
pub fn client_exporter<IO>(
    stream: &tokio_rustls::client::TlsStream<IO>,
) -> Result<Exporter, AuthError> {
    stream
        .get_ref()
        .1
        .export_keying_material([0u8; EXPORTER_LEN], EXPORTER_LABEL, None)
        .map_err(AuthError::Exporter)
}

async fn next<S: AsyncRead + AsyncWrite + Unpin>(
    framed: &mut Framed<S, FrameCodec<Handshake>>,
) -> Result<Handshake, AuthError> {
    match framed.next().await {
        Some(message) => Ok(message?),
        None => Err(AuthError::Closed),
    }
}

/// What an accepted handshake leaves: the stream, and bytes already read past it.
#[derive(Debug)]
pub struct Handshaken<S> {
    /// The stream, positioned after the handshake.
    pub stream: S,
    /// Bytes read from the stream that belong to the link's first frames.
    pub leftover: BytesMut,
}

fn finish<S>(framed: Framed<S, FrameCodec<Handshake>>) -> Handshaken<S> {
    let FramedParts { io, read_buf, .. } = framed.into_parts();
    Handshaken {
        stream: io,
        leftover: read_buf,
    }
}

/// The master's side: challenge, check the answer against `secret_of(edge_id)`, prove
/// itself. Returns the authenticated edge id.
pub async fn master_handshake<S, F>(
    stream: S,
    exporter: &Exporter,
    secret_of: F,
) -> Result<(String, Handshaken<S>), AuthError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: FnOnce(&str) -> Option<Secret>,
{
    let mut framed = Framed::new(stream, FrameCodec::<Handshake>::new(HANDSHAKE_MAX_FRAME));
    let master_nonce = new_nonce();
    framed
        .send(&Handshake::Challenge {
            protocol: PROTOCOL_VERSION,
            nonce: master_nonce,
        })
        .await?;
    let (protocol, edge_id, edge_nonce, mac) = match next(&mut framed).await? {
        Handshake::Answer {
            protocol,
            edge_id,
            nonce,
            mac,
        } => (protocol, edge_id, nonce, mac),
        other => {
            return Err(AuthError::Unexpected {
                expected: "Answer",
                got: name(&other),
            });
        }
    };
    let refuse = |reason: &str| Handshake::Refused {
        reason: reason.to_string(),
    };
    if protocol != PROTOCOL_VERSION {
        let err = AuthError::Version {
            theirs: protocol,
            ours: PROTOCOL_VERSION,
        };
        let _ = framed.send(&refuse(&err.to_string())).await;
        return Err(err);
    }
    let transcript = Transcript {
        master_nonce: &master_nonce,
        edge_nonce: &edge_nonce,
        edge_id: &edge_id,
        exporter,
    };
    let Some(secret) = secret_of(&edge_id) else {
        let _ = framed.send(&refuse("authentication failed")).await;
        return Err(AuthError::UnknownEdge(edge_id));
    };
    if !verify_edge_proof(&secret, &transcript, &mac) {
        let _ = framed.send(&refuse("authentication failed")).await;
        return Err(AuthError::BadEdgeProof(edge_id));
    }
    framed
        .send(&Handshake::Accepted {
            mac: master_proof(&secret, &transcript),
        })
        .await?;
    Ok((edge_id, finish(framed)))
}

/// The edge's side: answer the challenge with its proof, check the master's proof.
pub async fn edge_handshake<S>(
    stream: S,
    exporter: &Exporter,
    edge_id: &str,
    secret: &Secret,
) -> Result<Handshaken<S>, AuthError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut framed = Framed::new(stream, FrameCodec::<Handshake>::new(HANDSHAKE_MAX_FRAME));
    let (protocol, master_nonce) = match next(&mut framed).await? {
        Handshake::Challenge { protocol, nonce } => (protocol, nonce),
        other => {
            return Err(AuthError::Unexpected {
                expected: "Challenge",
                got: name(&other),
            });
        }
    };
    if protocol != PROTOCOL_VERSION {
        return Err(AuthError::Version {
            theirs: protocol,
            ours: PROTOCOL_VERSION,
        });
    }
    let edge_nonce = new_nonce();
    let transcript = Transcript {
        master_nonce: &master_nonce,
        edge_nonce: &edge_nonce,
        edge_id,
        exporter,
    };
    framed
        .send(&Handshake::Answer {
            protocol: PROTOCOL_VERSION,
            edge_id: edge_id.to_string(),
            nonce: edge_nonce,
            mac: edge_proof(secret, &transcript),
        })
        .await?;
    match next(&mut framed).await? {
        Handshake::Accepted { mac } if verify_master_proof(secret, &transcript, &mac) => {
            Ok(finish(framed))
        }
        Handshake::Accepted { .. } => Err(AuthError::BadMasterProof),
        Handshake::Refused { reason } => Err(AuthError::Refused(reason)),
        other => Err(AuthError::Unexpected {
            expected: "Accepted",
            got: name(&other),
        }),
    }
}
