//! The HTTPS and WebSocket calls, and what can go wrong with them.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// Why a command failed; each kind has its exit code.
#[derive(Debug)]
pub enum Failure {
    /// The command line or a local file is wrong (exit 2).
    Usage(String),
    /// The server could not be reached (exit 3).
    Connect(String),
    /// The server answered with an error (exit 1).
    Api {
        /// HTTP status.
        status: u16,
        /// The API's error code.
        code: String,
        /// The API's message.
        message: String,
    },
}

impl Failure {
    pub fn usage(message: impl Into<String>) -> Failure {
        Failure::Usage(message.into())
    }

    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Api { .. } => 1,
            Failure::Usage(_) => 2,
            Failure::Connect(_) => 3,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Usage(message) => write!(f, "{message}"),
            Failure::Connect(message) => write!(f, "cannot reach the server: {message}"),
            Failure::Api {
                status,
                code,
                message,
            } => write!(f, "{status} {code}: {message}"),
        }
    }
}

/// A client of one server.
pub struct Client {
    base: String,
    token: String,
    tls: Arc<rustls::ClientConfig>,
    http: reqwest::Client,
}

impl Client {
    /// A client for `server`, trusting `ca`.
    pub fn new(server: &str, ca: &Path, token: String) -> Result<Client, Failure> {
        let tls = tether_common::link::tls::api_client_config(ca)
            .map_err(|err| Failure::usage(format!("--ca: {err}")))?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls.clone())
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|err| Failure::usage(format!("cannot make an HTTPS client: {err}")))?;
        if !server.starts_with("https://") {
            return Err(Failure::usage(format!(
                "--server must be an https:// address, not {server:?}"
            )));
        }
        Ok(Client {
            base: server.trim_end_matches('/').to_string(),
            token,
            tls: Arc::new(tls),
            http,
        })
    }

    pub async fn get(&self, path: &str) -> Result<Value, Failure> {
        self.send(self.http.get(self.url(path))).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Result<Value, Failure> {
        self.send(self.http.post(self.url(path)).json(&body)).await
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<Value, Failure> {
        let response = request
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|err| Failure::Connect(describe(&err)))?;
        let status = response.status();
        if let Some(server) = response
            .headers()
            .get("tether-preferred-server")
            .and_then(|v| v.to_str().ok())
        {
            eprintln!("note: {server} controls this system and serves it directly");
        }
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if status.is_success() {
            Ok(body)
        } else {
            Err(Failure::Api {
                status: status.as_u16(),
                code: body["error"].as_str().unwrap_or("error").to_string(),
                message: body["message"].as_str().unwrap_or_default().to_string(),
            })
        }
    }

    /// Sends one WebSocket command and prints each message of `kind` that follows, until
    /// `count` of them (or forever).
    pub async fn stream(
        &self,
        command: Value,
        kind: &str,
        count: Option<usize>,
        json_out: bool,
        render: impl Fn(&Value) -> String,
    ) -> Result<(), Failure> {
        let url = format!("{}/api/v1/ws", self.base.replacen("https://", "wss://", 1));
        let mut request = url
            .into_client_request()
            .map_err(|err| Failure::usage(err.to_string()))?;
        let header = format!("Bearer {}", self.token)
            .parse()
            .map_err(|_| Failure::usage("the token is not a valid header value"))?;
        request.headers_mut().insert("authorization", header);
        let connector = tokio_tungstenite::Connector::Rustls(self.tls.clone());
        let (mut socket, _) =
            tokio_tungstenite::connect_async_tls_with_config(request, None, false, Some(connector))
                .await
                .map_err(|err| match err {
                    tokio_tungstenite::tungstenite::Error::Http(response) => Failure::Api {
                        status: response.status().as_u16(),
                        code: "refused".into(),
                        message: String::from_utf8_lossy(
                            response.body().as_deref().unwrap_or_default(),
                        )
                        .into_owned(),
                    },
                    other => Failure::Connect(other.to_string()),
                })?;
        socket
            .send(Message::Text(command.to_string().into()))
            .await
            .map_err(|err| Failure::Connect(err.to_string()))?;
        let mut printed = 0;
        while count.is_none_or(|count| printed < count) {
            let Some(message) = socket.next().await else {
                return Err(Failure::Connect("the server closed the WebSocket".into()));
            };
            let text = match message {
                Ok(Message::Text(text)) => text,
                Ok(_) => continue,
                Err(err) => return Err(Failure::Connect(err.to_string())),
            };
            let message: Value = serde_json::from_str(text.as_str()).unwrap_or(Value::Null);
            match message["type"].as_str() {
                Some("error") => {
                    return Err(Failure::Api {
                        status: 0,
                        code: message["code"].as_str().unwrap_or("error").to_string(),
                        message: message["message"].as_str().unwrap_or_default().to_string(),
                    });
                }
                Some("redirect") => eprintln!(
                    "note: {} controls this system and serves it directly",
                    message["server"].as_str().unwrap_or_default()
                ),
                Some(found) if found == kind => {
                    if json_out {
                        println!("{message}");
                    } else {
                        println!("{}", render(&message));
                    }
                    printed += 1;
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// A reqwest error with its causes, which say what actually failed (refused, TLS, ...).
fn describe(err: &reqwest::Error) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}
