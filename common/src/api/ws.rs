//! The WebSocket API at `/api/v1/ws`: bindings to modules' status, exec, debug streams,
//! redirect hints, and watches of the edges and of control changes, as JSON text
//! messages (the README lists them).
//!
//! Every command carries an `id` that its answer (`success` or `error`) repeats. Bindings
//! and debug streams follow a module wherever it runs, across changes of owner, until
//! unbound or until the socket closes. A client too slow to take what it is sent is cut
//! off rather than buffered for without limit.

use crate::identity::Epoch;
use std::collections::{HashMap, HashSet};

use axum::Extension;
use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
use axum::response::Response;
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::Live;
use super::{ApiError, Principal};
use crate::protocol::ModuleRef;
use crate::runtime::{ExecError, Runtime, StatusEvent};

/// The largest message a client may send.
const MAX_MESSAGE: usize = 64 * 1024;
/// Messages queued for a client before it counts as too slow and is cut off.
const OUT_QUEUE: usize = 1024;

/// A client's command.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Command {
    id: Value,
    cmd: String,
    /// The module's system and name (every command but `watch` and `unwatch`).
    #[serde(default)]
    sys: Option<String>,
    #[serde(rename = "mod", default)]
    module: Option<String>,
    /// `watch`/`unwatch`: `edges` or `audit`.
    #[serde(default)]
    topic: Option<String>,
    #[serde(default = "one")]
    index: u32,
    /// `bind`/`unbind`: one status key; all keys when absent.
    #[serde(default)]
    key: Option<String>,
    /// `exec`: the method and its arguments.
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    args: Vec<Value>,
    /// `exec`: the caller's epoch, fenced as on HTTP.
    #[serde(default)]
    epoch: Option<Epoch>,
}

fn one() -> u32 {
    1
}

/// `GET /api/v1/ws`: upgrades to the WebSocket API.
pub(super) async fn ws(
    State(live): State<Live>,
    Extension(principal): Extension<Principal>,
    upgrade: WebSocketUpgrade,
) -> Response {
    upgrade
        .max_message_size(MAX_MESSAGE)
        .on_upgrade(move |socket| session(socket, live, principal))
}

/// One module's status binding on a socket: the keys bound, the values last sent.
struct Binding {
    keys: Option<HashSet<String>>,
    sent: Map<String, Value>,
    task: JoinHandle<()>,
}

type Key = (String, String, u32);

struct Session {
    runtime: Runtime,
    live: Live,
    /// Watches by topic.
    watches: HashMap<String, JoinHandle<()>>,
    principal: Principal,
    out: mpsc::Sender<Value>,
    bindings: HashMap<Key, Binding>,
    debugs: HashMap<Key, JoinHandle<()>>,
    /// Systems whose redirect hint was sent already.
    hinted: HashSet<String>,
    /// Status events of the bindings, back to the session to filter and send.
    events: mpsc::Sender<(Key, StatusEvent)>,
}

async fn session(socket: WebSocket, live: Live, principal: Principal) {
    let (mut sink, mut stream) = socket.split();
    let (out, mut out_rx) = mpsc::channel::<Value>(OUT_QUEUE);
    let writer = tokio::spawn(async move {
        while let Some(message) = out_rx.recv().await {
            if sink
                .send(Message::Text(message.to_string().into()))
                .await
                .is_err()
            {
                return None;
            }
        }
        Some(sink)
    });
    let (events, mut events_rx) = mpsc::channel(OUT_QUEUE);
    let mut session = Session {
        runtime: live.runtime.clone(),
        live,
        watches: HashMap::new(),
        principal,
        out,
        bindings: HashMap::new(),
        debugs: HashMap::new(),
        hinted: HashSet::new(),
        events,
    };
    // Why the server ends the session, when the client should be told.
    let mut close = None;
    loop {
        tokio::select! {
            message = stream.next() => match message {
                Some(Ok(Message::Text(text))) => {
                    if !session.command(text.as_str()).await {
                        break;
                    }
                }
                Some(Ok(Message::Close(_))) | None => break,
                Some(Err(err)) => {
                    tracing::debug!(user = %session.principal.user, "WebSocket read failed: {err}");
                    close = Some(read_error_close(&err));
                    break;
                }
                // Pings are answered by axum; binary frames are not part of the API.
                Some(Ok(Message::Binary(_))) => {
                    let error = json!({"type": "error", "id": null, "code": "bad_request",
                        "message": "commands are JSON text messages"});
                    if !session.send(error) {
                        break;
                    }
                }
                Some(Ok(_)) => {}
            },
            Some((key, event)) = events_rx.recv() => {
                if !session.status_event(key, event) {
                    break;
                }
            }
        }
    }
    for (_, binding) in session.bindings.drain() {
        binding.task.abort();
    }
    let debugs = session.debugs.drain().map(|(_, task)| task);
    for task in debugs.chain(session.watches.drain().map(|(_, task)| task)) {
        task.abort();
    }
    drop(session);
    // The writer sends what is queued, then the close frame; a client that does not
    // read gets a second at most.
    let abort = writer.abort_handle();
    match tokio::time::timeout(CLOSE_WAIT, writer).await {
        Ok(Ok(Some(mut sink))) => {
            if let Some(frame) = close {
                let _ =
                    tokio::time::timeout(CLOSE_WAIT, sink.send(Message::Close(Some(frame)))).await;
            }
        }
        Ok(_) => {}
        Err(_) => abort.abort(),
    }
}

/// How long the end of a session waits for a client to take its last messages.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// The close frame for a client whose message could not be read: 1009 for a message over
/// [`MAX_MESSAGE`], 1002 (protocol error) for anything else.
fn read_error_close(err: &axum::Error) -> CloseFrame {
    let text = err.to_string();
    if text.contains("too long") || text.contains("too big") {
        CloseFrame {
            code: close_code::SIZE,
            reason: format!("a message is limited to {MAX_MESSAGE} bytes").into(),
        }
    } else {
        CloseFrame {
            code: close_code::PROTOCOL,
            reason: "malformed WebSocket frame".into(),
        }
    }
}

fn at(key: &Key) -> ModuleRef {
    ModuleRef::new(key.0.clone(), key.1.clone(), key.2)
}

fn error_json(id: &Value, err: ApiError) -> Value {
    let (code, message) = err.parts();
    json!({"type": "error", "id": id, "code": code, "message": message})
}

impl Session {
    /// Queues a message; false when the client is too slow and must be cut off.
    fn send(&self, message: Value) -> bool {
        match self.out.try_send(message) {
            Ok(()) => true,
            Err(_) => {
                tracing::warn!(user = %self.principal.user, "WebSocket client too slow; closing");
                false
            }
        }
    }

    fn hint(&mut self, system: &str) -> bool {
        if self.hinted.contains(system) {
            return true;
        }
        match self.runtime.preferred_server(system) {
            Some(server) => {
                self.hinted.insert(system.to_string());
                self.send(json!({"type": "redirect", "sys": system, "server": server}))
            }
            None => true,
        }
    }

    /// Handles one text message; false when the socket must close.
    async fn command(&mut self, text: &str) -> bool {
        let command: Command = match serde_json::from_str(text) {
            Ok(command) => command,
            Err(err) => {
                let id = serde_json::from_str::<Value>(text)
                    .ok()
                    .and_then(|v| v.get("id").cloned())
                    .unwrap_or(Value::Null);
                return self.send(error_json(
                    &id,
                    ApiError::unprocessable(format!("not a command: {err}")),
                ));
            }
        };
        let answer = match command.cmd.as_str() {
            "watch" => self.watch(command.topic.as_deref()),
            "unwatch" => {
                if let Some(task) = command.topic.as_ref().and_then(|t| self.watches.remove(t)) {
                    task.abort();
                }
                Ok(json!({}))
            }
            _ => self.module_command(&command).await,
        };
        let message = match answer {
            // An exec: its answer follows when the method returns.
            Ok(Value::Null) => None,
            Ok(mut body) => {
                body["type"] = json!("success");
                body["id"] = command.id.clone();
                Some(body)
            }
            Err(err) => Some(error_json(&command.id, err)),
        };
        let sent = message.is_none_or(|message| self.send(message));
        sent && command.sys.as_ref().is_none_or(|system| self.hint(system))
    }

    /// Starts a watch of `edges` or `audit`; its messages follow this command's answer.
    fn watch(&mut self, topic: Option<&str>) -> Result<Value, ApiError> {
        let topic = topic.ok_or_else(|| ApiError::unprocessable("watch needs a `topic`"))?;
        if self.watches.contains_key(topic) {
            return Ok(json!({}));
        }
        let (live, out) = (self.live.clone(), self.out.clone());
        let task = match topic {
            "edges" => tokio::spawn(super::live::watch_edges(live, out)),
            "audit" => tokio::spawn(super::live::watch_audit(live, out)),
            other => {
                return Err(ApiError::unprocessable(format!(
                    "unknown topic {other:?}: expected edges or audit"
                )));
            }
        };
        self.watches.insert(topic.to_string(), task);
        Ok(json!({}))
    }

    /// A command about one module: bind, unbind, exec, debug, ignore.
    async fn module_command(&mut self, command: &Command) -> Result<Value, ApiError> {
        let (Some(sys), Some(module)) = (&command.sys, &command.module) else {
            return Err(ApiError::unprocessable(format!(
                "{:?} needs `sys` and `mod`",
                command.cmd
            )));
        };
        let key: Key = (sys.clone(), module.clone(), command.index);
        match command.cmd.as_str() {
            "bind" => self.bind(key, command.key.clone()).await,
            "unbind" => {
                self.unbind(&key, command.key.clone());
                Ok(json!({}))
            }
            // The answer follows when the method returns: an empty success is not sent.
            "exec" => self.exec(command, &key).map(|()| Value::Null),
            "debug" => self.debug(key).await,
            "ignore" => {
                if let Some(task) = self.debugs.remove(&key) {
                    task.abort();
                }
                Ok(json!({}))
            }
            other => Err(ApiError::unprocessable(format!(
                "unknown cmd {other:?}: expected bind, unbind, exec, debug, ignore, watch or unwatch"
            ))),
        }
    }

    /// Where this client's calls come from (its token, for an edge to forward).
    fn origin(&self) -> crate::runtime::Origin {
        crate::runtime::Origin::client(self.principal.on_behalf.clone())
    }

    async fn bind(&mut self, key: Key, status_key: Option<String>) -> Result<Value, ApiError> {
        if let Some(binding) = self.bindings.get_mut(&key) {
            match (&mut binding.keys, status_key) {
                (Some(keys), Some(status_key)) => {
                    keys.insert(status_key);
                }
                (keys, None) => *keys = None,
                (None, Some(_)) => {}
            }
            // Values sent before for other keys are sent again for the new ones.
            binding.sent.clear();
            let status = self
                .runtime
                .status_from(&at(&key), &self.origin())
                .await
                .unwrap_or_default();
            self.status_event(key, StatusEvent::Map(status));
            return Ok(json!({}));
        }
        let mut source = self
            .runtime
            .bind_status(&at(&key), &self.origin())
            .await
            .map_err(ApiError::from)?;
        let events = self.events.clone();
        let task_key = key.clone();
        let task = tokio::spawn(async move {
            while let Some(event) = source.recv().await {
                if events.send((task_key.clone(), event)).await.is_err() {
                    return;
                }
            }
        });
        self.bindings.insert(
            key,
            Binding {
                keys: status_key.map(|k| HashSet::from([k])),
                sent: Map::new(),
                task,
            },
        );
        Ok(json!({}))
    }

    fn unbind(&mut self, key: &Key, status_key: Option<String>) {
        let drop_all = match (self.bindings.get_mut(key), status_key) {
            (Some(binding), Some(status_key)) => match &mut binding.keys {
                Some(keys) => {
                    keys.remove(&status_key);
                    keys.is_empty()
                }
                None => false,
            },
            (Some(_), None) => true,
            (None, _) => false,
        };
        if drop_all && let Some(binding) = self.bindings.remove(key) {
            binding.task.abort();
        }
    }

    /// Sends what changed of the keys bound; false when the client is too slow.
    fn status_event(&mut self, key: Key, event: StatusEvent) -> bool {
        let Some(binding) = self.bindings.get_mut(&key) else {
            return true;
        };
        let changes: Vec<(String, Value)> = match event {
            StatusEvent::Map(map) => map.into_iter().collect(),
            StatusEvent::Value(k, v) => vec![(k, v)],
        };
        let mut messages = Vec::new();
        for (status_key, value) in changes {
            let bound = binding
                .keys
                .as_ref()
                .is_none_or(|keys| keys.contains(&status_key));
            if bound && binding.sent.get(&status_key) != Some(&value) {
                binding.sent.insert(status_key.clone(), value.clone());
                messages.push(json!({"type": "notify", "sys": key.0, "mod": key.1,
                    "index": key.2, "key": status_key, "value": value}));
            }
        }
        messages.into_iter().all(|message| self.send(message))
    }

    /// Starts a method call in its own task, so the session keeps reading; its answer
    /// comes through the out queue.
    fn exec(&mut self, command: &Command, key: &Key) -> Result<(), ApiError> {
        if !self.principal.may_exec() {
            return Err(ApiError::forbidden(format!(
                "user {} (viewer) may not run methods",
                self.principal.user
            )));
        }
        let method = command
            .method
            .as_deref()
            .ok_or_else(|| ApiError::unprocessable("exec needs a `method`"))?;
        let module = at(key);
        let runtime = self.runtime.clone();
        let (args, epoch, id) = (command.args.clone(), command.epoch, command.id.clone());
        let method = method.to_string();
        let out = self.out.clone();
        let origin = self.origin();
        tokio::spawn(async move {
            let answer =
                super::modules::client_exec(&runtime, &module, &method, args, epoch, &origin).await;
            let message = match answer {
                Ok(done) => json!({"type": "success", "id": id, "result": done.value,
                    "executed_by": done.executed_by}),
                Err(err) => error_json(&id, ApiError::from(err)),
            };
            let _ = out.try_send(message);
        });
        Ok(())
    }

    async fn debug(&mut self, key: Key) -> Result<Value, ApiError> {
        if self.debugs.contains_key(&key) {
            return Ok(json!({}));
        }
        let mut lines = self
            .runtime
            .bind_debug(&at(&key), &self.origin())
            .await
            .map_err(|err: ExecError| ApiError::from(err))?;
        let out = self.out.clone();
        let task_key = key.clone();
        let task = tokio::spawn(async move {
            while let Some(line) = lines.recv().await {
                let message = json!({"type": "debug", "sys": task_key.0, "mod": task_key.1,
                    "index": task_key.2, "time_ms": line.time_ms, "line": line.line});
                if out.try_send(message).is_err() {
                    return;
                }
            }
        });
        self.debugs.insert(key, task);
        Ok(json!({}))
    }
}
