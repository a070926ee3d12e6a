//! One JSON line per event on stdout.

use std::io::Write;
use std::net::SocketAddr;

use anyhow::Context;
use std::time::SystemTime;
use tokio::net::TcpListener;

use serde_json::{Value, json};

/// Prints `{"event": kind, "peer": ..., "time": ..., ...extra}` and flushes, so a reader
/// sees it at once even through a pipe.
pub(crate) fn emit(kind: &str, peer: Option<SocketAddr>, extra: Value) {
    let mut line = json!({
        "event": kind,
        "time": humantime::format_rfc3339_micros(SystemTime::now()).to_string(),
    });
    if let Some(peer) = peer {
        line["peer"] = json!(peer.to_string());
    }
    if let (Some(line), Value::Object(extra)) = (line.as_object_mut(), extra) {
        line.extend(extra);
    }
    let mut out = std::io::stdout().lock();
    // A closed stdout must not stop the device.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Binds `listen` and announces the address (a port of 0 is resolved) as `listening`.
pub(crate) async fn listen(listen: SocketAddr, device: &str) -> anyhow::Result<TcpListener> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    emit(
        "listening",
        None,
        json!({ "device": device, "addr": addr.to_string() }),
    );
    Ok(listener)
}
