//! The `tcp` transport: one connection to the device, kept up with backoff, its bytes cut
//! into frames by a delimiter or a fixed length, each frame handed to the script's
//! `received`. Many devices allow a single session, so there is never more than one.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::transport::{Backoff, TransportEvent};

/// A frame longer than this without a delimiter is handed over as it is.
const MAX_FRAME: usize = 64 * 1024;
/// Bytes waiting to be written before `send` refuses more.
const OUT_QUEUE: usize = 64;
/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How to cut the byte stream.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Framing {
    /// Frames end with these bytes (removed).
    Delimiter(Vec<u8>),
    /// Frames are this long.
    Fixed(usize),
    /// Whatever each read returns.
    Raw,
}

impl Framing {
    /// Takes the complete frames out of `buffer`.
    pub(super) fn split(&self, buffer: &mut BytesMut) -> Vec<Vec<u8>> {
        let mut frames = Vec::new();
        match self {
            Framing::Delimiter(delimiter) => {
                while let Some(at) = buffer
                    .windows(delimiter.len())
                    .position(|window| window == delimiter.as_slice())
                {
                    let frame = buffer.split_to(at + delimiter.len());
                    frames.push(frame[..at].to_vec());
                }
                if buffer.len() > MAX_FRAME {
                    frames.push(buffer.split().to_vec());
                }
            }
            Framing::Fixed(length) => {
                while buffer.len() >= *length {
                    frames.push(buffer.split_to(*length).to_vec());
                }
            }
            Framing::Raw => {
                if !buffer.is_empty() {
                    frames.push(buffer.split().to_vec());
                }
            }
        }
        frames
    }
}

/// The script's side of a TCP transport.
#[derive(Debug, Clone)]
pub(super) struct TcpHandle {
    out: mpsc::Sender<Vec<u8>>,
    connected: Arc<AtomicBool>,
}

impl TcpHandle {
    /// Queues bytes for the device.
    pub(super) fn send(&self, data: Vec<u8>) -> Result<(), String> {
        if !self.connected.load(Ordering::Relaxed) {
            return Err("not connected to the device".into());
        }
        self.out
            .try_send(data)
            .map_err(|_| "the device's send queue is full".to_string())
    }
}

/// Starts the transport; it runs until `cancel`. The task ends once the connection is closed.
pub(super) fn spawn(
    host: String,
    port: u16,
    framing: Framing,
    events: mpsc::Sender<TransportEvent>,
    cancel: CancellationToken,
) -> (TcpHandle, JoinHandle<()>) {
    let (out_tx, out_rx) = mpsc::channel(OUT_QUEUE);
    let connected = Arc::new(AtomicBool::new(false));
    let task = tokio::spawn(run(
        host,
        port,
        framing,
        events,
        out_rx,
        connected.clone(),
        cancel,
    ));
    let handle = TcpHandle {
        out: out_tx,
        connected,
    };
    (handle, task)
}

async fn run(
    host: String,
    port: u16,
    framing: Framing,
    events: mpsc::Sender<TransportEvent>,
    mut out: mpsc::Receiver<Vec<u8>>,
    connected: Arc<AtomicBool>,
    cancel: CancellationToken,
) {
    let mut backoff = Backoff::new();
    loop {
        let attempt =
            tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((host.as_str(), port)));
        let stream = tokio::select! {
            _ = cancel.cancelled() => return,
            result = attempt => result,
        };
        let stream = match stream {
            Ok(Ok(stream)) => stream,
            Ok(Err(err)) => {
                let _ = events
                    .send(TransportEvent::Failed(format!(
                        "connect to {host}:{port}: {err}"
                    )))
                    .await;
                if backoff.wait(&cancel).await.is_err() {
                    return;
                }
                continue;
            }
            Err(_) => {
                let _ = events
                    .send(TransportEvent::Failed(format!(
                        "connect to {host}:{port}: timed out"
                    )))
                    .await;
                if backoff.wait(&cancel).await.is_err() {
                    return;
                }
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        backoff.reset();
        // Whatever was queued for an earlier connection is stale.
        while out.try_recv().is_ok() {}
        connected.store(true, Ordering::Relaxed);
        let _ = events.send(TransportEvent::Connected).await;
        let reason = serve(stream, &framing, &events, &mut out, &cancel).await;
        connected.store(false, Ordering::Relaxed);
        if cancel.is_cancelled() {
            return;
        }
        let _ = events.send(TransportEvent::Disconnected(reason)).await;
        if backoff.wait(&cancel).await.is_err() {
            return;
        }
    }
}

/// Moves bytes both ways until the connection ends; returns why.
async fn serve(
    mut stream: TcpStream,
    framing: &Framing,
    events: &mpsc::Sender<TransportEvent>,
    out: &mut mpsc::Receiver<Vec<u8>>,
    cancel: &CancellationToken,
) -> String {
    let (mut reader, mut writer) = stream.split();
    let mut buffer = BytesMut::with_capacity(4096);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => {
                let _ = writer.shutdown().await;
                return "stopped".into();
            }
            read = reader.read_buf(&mut buffer) => match read {
                Ok(0) => return "the device closed the connection".into(),
                Ok(_) => {
                    for frame in framing.split(&mut buffer) {
                        if events.send(TransportEvent::Received(frame)).await.is_err() {
                            return "stopped".into();
                        }
                    }
                }
                Err(err) => return format!("read: {err}"),
            },
            Some(data) = out.recv() => {
                // A device that stops reading must not hold up a stop: the write gives way
                // to it (the connection closes when the stream is dropped).
                tokio::select! {
                    written = writer.write_all(&data) => {
                        if let Err(err) = written {
                            return format!("write: {err}");
                        }
                    }
                    _ = cancel.cancelled() => return "stopped".into(),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_cut_by_delimiter_or_length() {
        let mut buffer = BytesMut::from(&b"PWR=ON\rINPUT=2\rPAR"[..]);
        let frames = Framing::Delimiter(b"\r".to_vec()).split(&mut buffer);
        assert_eq!(frames, vec![b"PWR=ON".to_vec(), b"INPUT=2".to_vec()]);
        assert_eq!(&buffer[..], b"PAR");
        let mut buffer = BytesMut::from(&b"abcdefg"[..]);
        let frames = Framing::Fixed(3).split(&mut buffer);
        assert_eq!(frames, vec![b"abc".to_vec(), b"def".to_vec()]);
        assert_eq!(&buffer[..], b"g");
    }
}
