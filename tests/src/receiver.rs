//! A small HTTP receiver of alerts: it takes POSTs of JSON on a loopback port, keeps their
//! bodies in order (those with the expected bearer token; others get 401), answers 200,
//! and can be stopped (connections refused) and started again on the same port.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// The largest body taken.
const BODY_LIMIT: usize = 1 << 20;

/// A running (or stopped) receiver.
pub struct Receiver {
    addr: SocketAddr,
    token: String,
    bodies: Arc<Mutex<Vec<Value>>>,
    tasks: Option<JoinSet<()>>,
}

impl Receiver {
    /// Starts on a free loopback port, taking POSTs that carry `Bearer token`.
    pub async fn start(token: &str) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut receiver = Receiver {
            addr: listener.local_addr().unwrap(),
            token: token.to_string(),
            bodies: Arc::default(),
            tasks: None,
        };
        receiver.serve(listener);
        receiver
    }

    /// Its URL for `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The bodies taken so far, in order.
    pub fn bodies(&self) -> Vec<Value> {
        self.bodies.lock().unwrap().clone()
    }

    /// Stops: the port refuses connections and open ones are closed.
    pub fn stop(&mut self) {
        self.tasks = None;
    }

    /// Starts again on the same port.
    pub async fn restart(&mut self) {
        let listener = TcpListener::bind(self.addr).await.expect("bind again");
        self.serve(listener);
    }

    fn serve(&mut self, listener: TcpListener) {
        let mut tasks = JoinSet::new();
        let (bodies, token) = (self.bodies.clone(), self.token.clone());
        tasks.spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                connections.spawn(connection(stream, bodies.clone(), token.clone()));
            }
        });
        self.tasks = Some(tasks);
    }
}

/// Serves HTTP/1.1 requests on one connection until it closes.
async fn connection(stream: TcpStream, bodies: Arc<Mutex<Vec<Value>>>, token: String) {
    let mut reader = BufReader::new(stream);
    loop {
        let mut length = 0usize;
        let mut authorized = false;
        let mut line = String::new();
        // The request line, then headers up to an empty line.
        let mut first = true;
        loop {
            line.clear();
            match reader.read_line(&mut line).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let trimmed = line.trim_end();
            if trimmed.is_empty() && !first {
                break;
            }
            first = false;
            if let Some((name, value)) = trimmed.split_once(':') {
                let value = value.trim();
                match name.to_ascii_lowercase().as_str() {
                    "content-length" => length = value.parse().unwrap_or(0),
                    "authorization" => authorized = value == format!("Bearer {token}"),
                    _ => {}
                }
            }
        }
        if length > BODY_LIMIT {
            return;
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).await.is_err() {
            return;
        }
        let status = match (authorized, serde_json::from_slice::<Value>(&body)) {
            (true, Ok(value)) => {
                bodies.lock().unwrap().push(value);
                "200 OK"
            }
            (false, _) => "401 Unauthorized",
            (true, Err(_)) => "400 Bad Request",
        };
        let answer = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
        if reader.get_mut().write_all(answer.as_bytes()).await.is_err() {
            return;
        }
    }
}
