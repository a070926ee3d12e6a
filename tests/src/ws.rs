//! A real WebSocket client for `/api/v1/ws` (tokio-tungstenite over rustls, trusting the
//! test CA), with waits that name what they waited for.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

/// One WebSocket session.
pub struct WsClient {
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// Every message received so far, in order.
    pub received: Vec<Value>,
}

impl WsClient {
    /// Connects to `base` (`https://host:port`) with `token` in the Authorization header.
    pub async fn connect(base: &str, ca: &Path, token: &str) -> Result<WsClient, String> {
        let tls = tether_common::link::tls::api_client_config(ca).map_err(|e| e.to_string())?;
        let url = format!("{}/api/v1/ws", base.replacen("https://", "wss://", 1));
        let mut request = url.into_client_request().map_err(|e| e.to_string())?;
        request.headers_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().map_err(|_| "bad token")?,
        );
        let (socket, _) = tokio_tungstenite::connect_async_tls_with_config(
            request,
            None,
            false,
            Some(Connector::Rustls(Arc::new(tls))),
        )
        .await
        .map_err(|e| e.to_string())?;
        Ok(WsClient {
            socket,
            received: Vec::new(),
        })
    }

    /// Sends one JSON command.
    pub async fn send(&mut self, command: Value) {
        self.socket
            .send(Message::Text(command.to_string().into()))
            .await
            .expect("send on the WebSocket");
    }

    /// Waits up to `limit` for a message `wanted` accepts (others are kept in
    /// `received`); panics naming `what` if none comes.
    pub async fn wait(
        &mut self,
        what: &str,
        limit: Duration,
        wanted: impl Fn(&Value) -> bool,
    ) -> Value {
        if let Some(found) = self.received.iter().find(|m| wanted(m)) {
            return found.clone();
        }
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let next = tokio::time::timeout(left, self.socket.next()).await;
            match next {
                Ok(Some(Ok(Message::Text(text)))) => {
                    let value: Value = serde_json::from_str(text.as_str()).expect("JSON message");
                    self.received.push(value.clone());
                    if wanted(&value) {
                        return value;
                    }
                }
                Ok(Some(Ok(_))) => {}
                Ok(other) => panic!(
                    "waiting for {what}: the socket ended: {other:?}; got {:?}",
                    self.received
                ),
                Err(_) => panic!("no {what} within {limit:?}; got {:?}", self.received),
            }
        }
    }

    /// Waits for the answer to command `id`.
    pub async fn answer(&mut self, id: u64, limit: Duration) -> Value {
        self.wait(&format!("the answer to command {id}"), limit, |m| {
            m["id"] == id && (m["type"] == "success" || m["type"] == "error")
        })
        .await
    }

    /// Sends one text message as it is, JSON or not.
    pub async fn send_text(&mut self, text: String) -> Result<(), String> {
        self.socket
            .send(Message::Text(text.into()))
            .await
            .map_err(|err| err.to_string())
    }

    /// Reads until the server closes the socket, up to `limit`: the close frame's code,
    /// or `None` when the socket ended without one (or did not end in time).
    pub async fn close_code(&mut self, limit: Duration) -> Option<u16> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.socket.next()).await {
                Ok(Some(Ok(Message::Close(frame)))) => return frame.map(|f| f.code.into()),
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(_)) | None) | Err(_) => return None,
            }
        }
    }

    /// Forgets what was received, so later waits see only new messages.
    pub fn clear(&mut self) {
        self.received.clear();
    }
}
