//! The line-protocol projector.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

use crate::events::emit;

/// Longest command accepted; a longer line is answered `ERR` and dropped.
const MAX_LINE: usize = 256;

#[derive(Debug, Default)]
struct State {
    power: bool,
    input: u32,
}

/// What the projector answers to one command, and the state after it.
fn answer(state: &mut State, command: &str) -> String {
    let mut words = command.split_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some("PWR"), Some("ON"), None) => state.power = true,
        (Some("PWR"), Some("OFF"), None) => state.power = false,
        (Some("PWR?"), None, None) => {}
        (Some("INPUT"), Some(n), None) => match n.parse() {
            Ok(n) => state.input = n,
            Err(_) => return "ERR".into(),
        },
        (Some("INPUT?"), None, None) => return format!("INPUT={}", state.input),
        _ => return "ERR".into(),
    }
    // A set command answers with the new state, as many real projectors do.
    if command.starts_with("INPUT") {
        format!("INPUT={}", state.input)
    } else {
        format!("PWR={}", if state.power { "ON" } else { "OFF" })
    }
}

pub(crate) async fn run(listen: SocketAddr, max_sessions: usize) -> anyhow::Result<()> {
    let listener = crate::events::listen(listen, "projector").await?;
    let state = Arc::new(Mutex::new(State::default()));
    let sessions = Arc::new(AtomicUsize::new(0));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(err) => {
                eprintln!("tether-sim: accept failed: {err}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        if sessions.fetch_add(1, Ordering::SeqCst) >= max_sessions {
            sessions.fetch_sub(1, Ordering::SeqCst);
            emit("refused", Some(peer), json!({ "reason": "session limit" }));
            drop(stream);
            continue;
        }
        emit("connect", Some(peer), json!({}));
        let state = state.clone();
        let sessions = sessions.clone();
        tokio::spawn(async move {
            let _ = session(stream, peer, state).await;
            sessions.fetch_sub(1, Ordering::SeqCst);
            emit("disconnect", Some(peer), json!({}));
        });
    }
}

async fn session(
    stream: TcpStream,
    peer: SocketAddr,
    state: Arc<Mutex<State>>,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\r', &mut line)
            .await?;
        if n == 0 {
            return Ok(());
        }
        let reply = if line.len() > MAX_LINE {
            // Skip the rest of an overlong line.
            let mut rest = Vec::new();
            reader.read_until(b'\r', &mut rest).await?;
            "ERR".to_string()
        } else {
            let command = String::from_utf8_lossy(&line);
            let command = command.trim_matches(|c: char| c == '\r' || c == '\n' || c == ' ');
            if command.is_empty() {
                continue;
            }
            let mut state = state.lock().await;
            let reply = answer(&mut state, command);
            emit(
                "command",
                Some(peer),
                json!({ "command": command, "reply": reply, "power": state.power, "input": state.input }),
            );
            reply
        };
        write.write_all(format!("{reply}\r").as_bytes()).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_protocol_of_design_md() {
        let mut s = State::default();
        assert_eq!(answer(&mut s, "PWR?"), "PWR=OFF");
        assert_eq!(answer(&mut s, "PWR ON"), "PWR=ON");
        assert_eq!(answer(&mut s, "PWR?"), "PWR=ON");
        assert_eq!(answer(&mut s, "INPUT 3"), "INPUT=3");
        assert_eq!(answer(&mut s, "INPUT?"), "INPUT=3");
        assert_eq!(answer(&mut s, "PWR OFF"), "PWR=OFF");
        for bad in ["PWR", "PWR MAYBE", "INPUT x", "HELLO", "PWR ON NOW"] {
            assert_eq!(answer(&mut s, bad), "ERR", "{bad}");
        }
    }
}
