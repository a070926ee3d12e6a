//! Tether's parsers of untrusted bytes, each behind one function that takes the bytes a
//! peer or a file could hold: the edge link's frame decoder, both sides of the
//! authentication handshake, and the site file. The fuzz targets (`fuzz/`) and their
//! property-test twins (`common/tests/hostile.rs`) call these, so both exercise the very
//! code the servers run.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::codec::Decoder;

use crate::link::auth::Exporter;
use crate::link::{AuthError, Secret, edge_handshake, master_handshake};
use crate::protocol::{Envelope, FrameCodec, FrameError};

/// The edge id and secret the handshake entry points accept.
pub const EDGE_ID: &str = "site-1";

fn secret() -> Secret {
    Secret::from_bytes(vec![7; 32])
}

/// Decodes `input` as it would arrive on an authenticated link bounded by `max_frame`:
/// frame after frame until more bytes are needed or a frame is refused. Answers the frames
/// decoded and the error that stopped it, if any.
pub fn decode_frames(input: &[u8], max_frame: usize) -> (Vec<Envelope>, Option<FrameError>) {
    let mut codec = FrameCodec::<Envelope>::new(max_frame);
    let mut buffer = BytesMut::from(input);
    let mut frames = Vec::new();
    loop {
        match codec.decode(&mut buffer) {
            Ok(Some(frame)) => frames.push(frame),
            Ok(None) => return (frames, None),
            Err(err) => return (frames, Some(err)),
        }
    }
}

/// Runs the master's side of the handshake against a peer that sends `input` (in reads of
/// the sizes `input`'s first byte picks), then closes. Answers the edge id it accepted.
pub fn master_handshake_against(input: &[u8]) -> Result<String, AuthError> {
    let stream = Scripted::new(input);
    let exporter: Exporter = [1; 32];
    let secret = secret();
    let run = master_handshake(stream, &exporter, |id| {
        (id == EDGE_ID).then(|| secret.clone())
    });
    futures::executor::block_on(run).map(|(edge_id, _)| edge_id)
}

/// Runs the edge's side of the handshake against a master that sends `input`, then closes.
pub fn edge_handshake_against(input: &[u8]) -> Result<(), AuthError> {
    let stream = Scripted::new(input);
    let exporter: Exporter = [1; 32];
    let secret = secret();
    let run = edge_handshake(stream, &exporter, EDGE_ID, &secret);
    futures::executor::block_on(run).map(|_| ())
}

/// Parses and checks `text` as a site file (named `site.toml` in its errors).
pub fn parse_site_file(text: &str) -> Result<tether_config::SiteFile, tether_config::ConfigError> {
    tether_config::SiteFile::parse(Path::new("site.toml"), text)
}

/// A peer that sends fixed bytes in reads of varying size, then closes; it takes
/// whatever is written to it.
struct Scripted {
    input: Vec<u8>,
    at: usize,
    /// Bytes per read: 1 to 256, from the first input byte, so partial frames are met.
    chunk: usize,
}

impl Scripted {
    fn new(input: &[u8]) -> Self {
        let chunk = input.first().map_or(1, |b| usize::from(*b) + 1);
        Scripted {
            input: input.to_vec(),
            at: 0,
            chunk,
        }
    }
}

impl AsyncRead for Scripted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let left = self.input.len() - self.at;
        let n = left.min(self.chunk).min(buf.remaining());
        let at = self.at;
        buf.put_slice(&self.input[at..at + n]);
        self.at += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Scripted {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
