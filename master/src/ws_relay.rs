//! WebSocket sessions among several masters: a client's command for a module another
//! master serves (it holds the edge's link, or runs the unit) goes to that master on a
//! WebSocket this master opens with the client's own token, and the answers, status
//! notices and debug lines come back on the client's socket. The session's side (what
//! goes where, what is made again when a socket ends) is `tether_common::api::ws`; this
//! is the cluster's part: which master, and the socket to it.

use std::time::Duration;

use futures::future::BoxFuture;
use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tether_common::api::{Elsewhere, FORWARDED_BY, Upstream, WsRelay};
use tether_common::control::MasterId;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, http::HeaderValue};

use crate::forward::Forwarder;

/// The largest message taken from another master (a method's result, a status value).
const MESSAGE_LIMIT: usize = 1 << 20;
/// Messages of another master queued for the client's session at most (so at most this
/// many times [`MESSAGE_LIMIT`] held per socket, beside the few the session lets into the
/// client's queue); a full queue stops reading that socket.
const MESSAGES_QUEUED: usize = 16;
/// The other master is pinged this often while the socket is quiet...
const PING_EVERY: Duration = Duration::from_secs(10);
/// ...and a socket silent this long (a half-open connection to a dead master) is closed.
const SILENT_LIMIT: Duration = Duration::from_secs(30);
/// Commands queued for another master at most; a client sending faster is told so.
const COMMANDS_QUEUED: usize = 64;
/// Connect, TLS and the upgrade take at most this long.
const OPEN_TIMEOUT: Duration = Duration::from_secs(3);

impl WsRelay for Forwarder {
    fn serving_elsewhere(&self, system: &str, name: &str, index: u32) -> Option<Elsewhere> {
        let (master, api_url) = self.holder_of_module(system, name, index)?;
        Some(Elsewhere {
            server: master.into_string(),
            api_url,
        })
    }

    fn open(&self, server: &str, token: &str) -> BoxFuture<'static, Result<Upstream, String>> {
        let inputs = self.inputs.borrow().clone();
        let api_url = self.api_url_of(&inputs, &MasterId::new(server));
        let (me, tls, token) = (inputs.me.clone(), self.tls.clone(), token.to_string());
        let server = server.to_string();
        Box::pin(async move {
            let api_url =
                api_url.ok_or_else(|| format!("master {server} has no usable api_url"))?;
            let url = format!("{}/api/v1/ws", api_url.replacen("https://", "wss://", 1));
            let mut request = url.into_client_request().map_err(|err| err.to_string())?;
            let headers = request.headers_mut();
            let bearer = HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| "the client's token is not a header value".to_string())?;
            headers.insert("authorization", bearer);
            // Without it the other master would send the session on again.
            let me = HeaderValue::from_str(me.as_str())
                .map_err(|_| format!("this master's id {me:?} is not a header value"))?;
            headers.insert(FORWARDED_BY, me);
            let config = WebSocketConfig::default()
                .max_message_size(Some(MESSAGE_LIMIT))
                .max_frame_size(Some(MESSAGE_LIMIT));
            let connector = tokio_tungstenite::Connector::Rustls(tls);
            let opened = tokio::time::timeout(
                OPEN_TIMEOUT,
                tokio_tungstenite::connect_async_tls_with_config(
                    request,
                    Some(config),
                    true,
                    Some(connector),
                ),
            )
            .await
            .map_err(|_| {
                format!("master {server} did not open a WebSocket within {OPEN_TIMEOUT:?}")
            })?
            .map_err(|err| format!("master {server} refused a WebSocket: {err}"))?;
            let (commands, commands_rx) = mpsc::channel(COMMANDS_QUEUED);
            let (messages_tx, messages) = mpsc::channel(MESSAGES_QUEUED);
            tokio::spawn(pump(server, opened.0, commands_rx, messages_tx));
            Ok(Upstream { commands, messages })
        })
    }
}

/// Carries commands to the other master and its messages back, until either side ends.
async fn pump<S>(
    server: String,
    socket: tokio_tungstenite::WebSocketStream<S>,
    mut commands: mpsc::Receiver<String>,
    messages: mpsc::Sender<Value>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut sink, mut stream) = socket.split();
    let mut heard = tokio::time::Instant::now();
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ping.tick() => {
                if heard.elapsed() >= SILENT_LIMIT {
                    tracing::warn!(%server, "the WebSocket to master {server} was silent for {SILENT_LIMIT:?}: closed");
                    break;
                }
                if sink.send(Message::Ping(Vec::new().into())).await.is_err() {
                    break;
                }
            }
            command = commands.recv() => match command {
                Some(text) => {
                    if sink.send(Message::Text(text.into())).await.is_err() {
                        break;
                    }
                }
                // The client's session ended.
                None => break,
            },
            message = stream.next() => {
                if matches!(message, Some(Ok(_))) {
                    heard = tokio::time::Instant::now();
                }
                match message {
                    Some(Ok(Message::Text(text))) => match serde_json::from_str::<Value>(&text) {
                        Ok(value) => {
                            if messages.send(value).await.is_err() {
                                break;
                            }
                        }
                        Err(err) => {
                            tracing::warn!(%server, "master {server} sent a WebSocket message that is not JSON: {err}");
                            break;
                        }
                    },
                    Some(Ok(Message::Close(_))) | None => break,
                    Some(Err(err)) => {
                        tracing::debug!(%server, "WebSocket to master {server} ended: {err}");
                        break;
                    }
                    Some(Ok(_)) => {}
                }
            }
        }
    }
    let _ = sink.close().await;
}
