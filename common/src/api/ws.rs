//! The WebSocket API at `/api/v1/ws`: bindings to modules' status, exec, debug streams,
//! redirect hints, and watches of the edges and of control changes, as JSON text
//! messages (the README lists them).
//!
//! Every command carries an `id` that its answer (`success` or `error`) repeats. Bindings
//! and debug streams follow a module wherever it runs, across changes of owner, until
//! unbound or until the socket closes. A client too slow to take what it is sent is cut
//! off rather than buffered for without limit.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use axum::Extension;
use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
use axum::http::HeaderMap;
use axum::response::Response;
use futures::future::BoxFuture;
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::Live;
use super::{ApiError, PresentedToken, Principal};
use crate::identity::Epoch;
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

/// Says which master sent a call or a WebSocket on (and that it must not go further).
pub const FORWARDED_BY: &str = "tether-forwarded-by";

/// Sends a WebSocket client's module commands on to the server that serves the module
/// (another master of a cluster, holding the edge's link or running the unit), on a
/// WebSocket of its own with the client's token, and brings the answers back: a client
/// may bind and call any module on any master.
pub trait WsRelay: Send + Sync {
    /// The server serving `system`'s module `name` `index`, when it is not this one.
    fn serving_elsewhere(&self, system: &str, name: &str, index: u32) -> Option<Elsewhere>;
    /// Opens a WebSocket to `server` with the client's `token`.
    fn open(&self, server: &str, token: &str) -> BoxFuture<'static, Result<Upstream, String>>;
}

/// Another server that serves a module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Elsewhere {
    /// Its id (one WebSocket to it per session).
    pub server: String,
    /// Its API address, for the client's redirect hint.
    pub api_url: String,
}

/// A WebSocket to another server, opened for one client's session.
pub struct Upstream {
    /// Command texts to send there.
    pub commands: mpsc::Sender<String>,
    /// The messages it sends; closed when the socket ends.
    pub messages: mpsc::Receiver<Value>,
}

/// `GET /api/v1/ws`: upgrades to the WebSocket API.
pub(super) async fn ws(
    State(live): State<Live>,
    Extension(principal): Extension<Principal>,
    token: Option<Extension<PresentedToken>>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    // A session another master sent on is served here: never sent further.
    let relay = match (&live.relay, token, headers.contains_key(FORWARDED_BY)) {
        (Some(relay), Some(Extension(PresentedToken(token))), false) => {
            Some((relay.clone(), token))
        }
        _ => None,
    };
    upgrade
        .max_message_size(MAX_MESSAGE)
        .on_upgrade(move |socket| session(socket, live, principal, relay))
}

/// A WebSocket to another server this session sends commands on.
struct Upstreamed {
    commands: mpsc::Sender<String>,
    /// The ids (as JSON text) of commands sent there whose answer is awaited: when sent,
    /// and whether it was an exec (answered 503 if the socket ends first).
    awaiting: HashMap<String, (Instant, bool)>,
    /// Forwards its messages to the session.
    task: JoinHandle<()>,
}

/// What one module's commands made on another server: a binding (of some status keys,
/// or all) and a debug stream, to be made again wherever the module is served next.
#[derive(Default)]
struct Relayed {
    server: String,
    /// `Some(None)`: every key bound; `Some(Some(keys))`: those; `None`: no binding.
    binding: Option<Option<HashSet<String>>>,
    debug: bool,
}

impl Relayed {
    /// The commands that make it again (under [`REMADE`], whose success nobody awaits).
    fn remake(&self, key: &Key) -> Vec<String> {
        let command = |cmd: &str, status_key: Option<&String>| {
            json!({"id": REMADE, "cmd": cmd, "sys": key.0, "mod": key.1, "index": key.2,
                "key": status_key})
            .to_string()
        };
        let mut commands = Vec::new();
        match &self.binding {
            Some(None) => commands.push(command("bind", None)),
            Some(Some(keys)) => commands.extend(keys.iter().map(|k| command("bind", Some(k)))),
            None => {}
        }
        if self.debug {
            commands.push(command("debug", None));
        }
        commands
    }
}

/// The id of commands the session makes again itself (a binding following its module):
/// their success is not passed on.
const REMADE: &str = "tether:remade";
/// Commands awaiting an answer from one other server, at most: more are refused 503.
const AWAITING_MAX: usize = 256;
/// An exec sent on and unanswered this long is answered 504.
const RELAYED_EXEC_DEADLINE: std::time::Duration = std::time::Duration::from_secs(65);
/// Another server's messages are taken only while the client's queue holds fewer than
/// this many (each at most the relay's message limit): a slow client stops the reading
/// of the other server's socket rather than let its messages pile up.
const RELAYED_QUEUED: usize = 64;

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
    /// Where commands for modules served elsewhere go, with the client's token.
    relay: Option<(Arc<dyn WsRelay>, String)>,
    /// The other servers' sockets, by server.
    upstreams: HashMap<String, Upstreamed>,
    /// The modules whose bindings or debug streams live on another server.
    relayed: HashMap<Key, Relayed>,
    /// Messages of the other servers' sockets (`None`: that socket ended).
    from_upstreams: mpsc::Sender<(String, Option<Value>)>,
    /// Servers whose socket would not open, not tried again before then.
    unreachable: HashMap<String, Instant>,
}

/// How often a session in a cluster checks that its bindings are where their modules are
/// served, and moves those that are not.
const REHOME_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
/// A server whose WebSocket would not open is not tried again for this long (its
/// commands are served here meanwhile).
const UNREACHABLE_PAUSE: std::time::Duration = std::time::Duration::from_secs(5);

async fn session(
    socket: WebSocket,
    live: Live,
    principal: Principal,
    relay: Option<(Arc<dyn WsRelay>, String)>,
) {
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
    let (from_upstreams, mut upstream_rx) = mpsc::channel(OUT_QUEUE);
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
        relay,
        upstreams: HashMap::new(),
        relayed: HashMap::new(),
        from_upstreams,
        unreachable: HashMap::new(),
    };
    let mut rehome = tokio::time::interval(REHOME_EVERY);
    rehome.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
            _ = rehome.tick(), if session.relay.is_some() => {
                if !session.rehome().await {
                    break;
                }
            }
            Some((server, message)) = upstream_rx.recv(),
                if session.out.capacity() + RELAYED_QUEUED > OUT_QUEUE => {
                let kept = match message {
                    Some(message) => session.upstream_message(&server, message),
                    None => session.upstream_ended(&server).await,
                };
                if !kept {
                    break;
                }
            }
        }
    }
    for (_, upstream) in session.upstreams.drain() {
        upstream.task.abort();
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
        if let Some(sent) = self.relay_command(&command, text).await {
            return sent;
        }
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
            // A binding made again by the session itself: nobody waits for its success.
            Ok(_) if command.id == REMADE => None,
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

    /// Sends a module's command to the server that serves the module, when that is
    /// another: `Some(false)` when the client must be cut off, `None` when the command is
    /// served here (no other server serves the module, or it could not be reached).
    async fn relay_command(&mut self, command: &Command, text: &str) -> Option<bool> {
        let (relay, token) = self.relay.clone()?;
        let (Some(sys), Some(module)) = (&command.sys, &command.module) else {
            return None;
        };
        let key: Key = (sys.clone(), module.clone(), command.index);
        let cmd = command.cmd.as_str();
        // A binding or debug stream made here stays here until moved (`rehome`).
        match cmd {
            "bind" | "unbind" if self.bindings.contains_key(&key) => return None,
            "debug" | "ignore" if self.debugs.contains_key(&key) => return None,
            _ => {}
        }
        let (server, api_url) = match (cmd, self.relayed.get(&key)) {
            ("bind" | "debug" | "unbind" | "ignore", Some(relayed)) => {
                (relayed.server.clone(), None)
            }
            ("bind" | "debug" | "exec", _) => {
                let elsewhere = relay.serving_elsewhere(sys, module, command.index)?;
                (elsewhere.server, Some(elsewhere.api_url))
            }
            _ => return None,
        };
        if !self.upstreams.contains_key(&server) {
            if self.paused(&server) {
                return None;
            }
            match relay.open(&server, &token).await {
                Ok(upstream) => self.add_upstream(&server, upstream),
                Err(err) => {
                    tracing::warn!(%server, "not sending a WebSocket command on to {server}: {err}; serving it here");
                    self.unreachable
                        .insert(server, Instant::now() + UNREACHABLE_PAUSE);
                    return None;
                }
            }
        }
        let upstream = self.upstreams.get_mut(&server)?;
        if upstream.awaiting.len() >= AWAITING_MAX
            || upstream.commands.try_send(text.to_string()).is_err()
        {
            return Some(self.send(error_json(
                &command.id,
                ApiError::unavailable(format!(
                    "master {server}, which serves {sys}'s {module}, does not take commands now"
                )),
            )));
        }
        upstream
            .awaiting
            .insert(command.id.to_string(), (Instant::now(), cmd == "exec"));
        self.note_relayed(&key, &server, command);
        let hinted = match api_url {
            Some(api_url) if self.hinted.insert(sys.clone()) => {
                self.send(json!({"type": "redirect", "sys": sys, "server": api_url}))
            }
            _ => true,
        };
        Some(hinted)
    }

    /// Keeps what `command`, sent to `server`, made there (or undid).
    fn note_relayed(&mut self, key: &Key, server: &str, command: &Command) {
        match command.cmd.as_str() {
            "bind" => {
                let relayed = self.relayed.entry(key.clone()).or_default();
                relayed.server = server.to_string();
                relayed.binding = match (relayed.binding.take(), &command.key) {
                    (Some(Some(mut keys)), Some(k)) => {
                        keys.insert(k.clone());
                        Some(Some(keys))
                    }
                    (None, Some(k)) => Some(Some(HashSet::from([k.clone()]))),
                    (Some(None), _) | (_, None) => Some(None),
                };
            }
            "debug" => {
                let relayed = self.relayed.entry(key.clone()).or_default();
                relayed.server = server.to_string();
                relayed.debug = true;
            }
            "unbind" | "ignore" => {
                let Some(relayed) = self.relayed.get_mut(key) else {
                    return;
                };
                if command.cmd == "ignore" {
                    relayed.debug = false;
                } else {
                    match (&mut relayed.binding, &command.key) {
                        (Some(Some(keys)), Some(k)) => {
                            keys.remove(k);
                            if keys.is_empty() {
                                relayed.binding = None;
                            }
                        }
                        (_, None) => relayed.binding = None,
                        _ => {}
                    }
                }
                if relayed.binding.is_none() && !relayed.debug {
                    self.relayed.remove(key);
                }
            }
            _ => {}
        }
    }

    /// Whether `server`'s socket would not open a moment ago (its commands are served
    /// here until the pause is over).
    fn paused(&self, server: &str) -> bool {
        self.unreachable
            .get(server)
            .is_some_and(|until| Instant::now() < *until)
    }

    /// Moves the bindings and debug streams whose modules are now served elsewhere than
    /// where they were made (a unit moved between masters, or came here); answers the
    /// execs another server left unanswered past their deadline; closes the sockets no
    /// longer used. False when the client must be cut off.
    async fn rehome(&mut self) -> bool {
        let Some((relay, _)) = self.relay.clone() else {
            return true;
        };
        let serving = |key: &Key| {
            relay
                .serving_elsewhere(&key.0, &key.1, key.2)
                .map(|e| e.server)
        };
        let mut texts = Vec::new();
        let local: HashSet<Key> = self
            .bindings
            .keys()
            .chain(self.debugs.keys())
            .cloned()
            .collect();
        for key in local {
            // Moved only where it can go (a server that would not open is not tried).
            if serving(&key).is_none_or(|server| self.paused(&server)) {
                continue;
            }
            let mut relayed = Relayed::default();
            if let Some(binding) = self.bindings.remove(&key) {
                binding.task.abort();
                relayed.binding = Some(binding.keys);
            }
            if let Some(task) = self.debugs.remove(&key) {
                task.abort();
                relayed.debug = true;
            }
            texts.extend(relayed.remake(&key));
        }
        let moved: Vec<Key> = self
            .relayed
            .iter()
            .filter(|(key, relayed)| match serving(key) {
                Some(server) => server != relayed.server && !self.paused(&server),
                None => true,
            })
            .map(|(key, _)| key.clone())
            .collect();
        for key in moved {
            let Some(relayed) = self.relayed.remove(&key) else {
                continue;
            };
            // Undone there first; a socket that cannot take it is closed (which undoes
            // everything made there).
            let undo = ["unbind", "ignore"].map(|cmd| {
                json!({"id": REMADE, "cmd": cmd, "sys": key.0, "mod": key.1, "index": key.2})
                    .to_string()
            });
            if let Some(upstream) = self.upstreams.get(&relayed.server)
                && undo
                    .iter()
                    .any(|text| upstream.commands.try_send(text.clone()).is_err())
                && let Some(upstream) = self.upstreams.remove(&relayed.server)
            {
                upstream.task.abort();
            }
            texts.extend(relayed.remake(&key));
        }
        for text in texts {
            if !Box::pin(self.command(&text)).await {
                return false;
            }
        }
        // Execs unanswered past their deadline; sockets nothing uses any more.
        let mut late = Vec::new();
        for (server, upstream) in &mut self.upstreams {
            upstream.awaiting.retain(|id, (sent, exec)| {
                let keep = sent.elapsed() < RELAYED_EXEC_DEADLINE;
                if !keep && *exec {
                    late.push((server.clone(), id.clone()));
                }
                keep
            });
        }
        for (server, id) in late {
            let id: Value = serde_json::from_str(&id).unwrap_or(Value::Null);
            let message = json!({"type": "error", "id": id, "code": "timeout",
                "message": format!("master {server} did not answer the call in time (it may have run there)")});
            if !self.send(message) {
                return false;
            }
        }
        let used: HashSet<String> = self.relayed.values().map(|r| r.server.clone()).collect();
        self.upstreams.retain(|server, upstream| {
            let keep = used.contains(server) || !upstream.awaiting.is_empty();
            if !keep {
                upstream.task.abort();
            }
            keep
        });
        true
    }

    fn add_upstream(&mut self, server: &str, mut upstream: Upstream) {
        let (to_session, name) = (self.from_upstreams.clone(), server.to_string());
        let task = tokio::spawn(async move {
            while let Some(message) = upstream.messages.recv().await {
                if to_session
                    .send((name.clone(), Some(message)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            let _ = to_session.send((name, None)).await;
        });
        self.upstreams.insert(
            server.to_string(),
            Upstreamed {
                commands: upstream.commands,
                awaiting: HashMap::new(),
                task,
            },
        );
    }

    /// Passes on a message of another server's socket, when it is about what this
    /// session sent there (anything else of a peer's is dropped, its redirect hints
    /// included: this session hints itself); false when the client is too slow.
    fn upstream_message(&mut self, server: &str, message: Value) -> bool {
        let Some(upstream) = self.upstreams.get_mut(server) else {
            return true;
        };
        match message["type"].as_str() {
            Some(kind @ ("success" | "error")) => {
                if upstream
                    .awaiting
                    .remove(&message["id"].to_string())
                    .is_none()
                    || (kind == "success" && message["id"] == REMADE)
                {
                    return true;
                }
                self.send(message)
            }
            Some(kind @ ("notify" | "debug")) => {
                let key: Key = (
                    message["sys"].as_str().unwrap_or_default().to_string(),
                    message["mod"].as_str().unwrap_or_default().to_string(),
                    message["index"].as_u64().unwrap_or(0) as u32,
                );
                let ours = self.relayed.get(&key).is_some_and(|relayed| {
                    relayed.server == server
                        && match kind {
                            "notify" => relayed.binding.is_some(),
                            _ => relayed.debug,
                        }
                });
                !ours || self.send(message)
            }
            _ => true,
        }
    }

    /// Another server's socket ended: its unanswered execs are answered 503 (they may
    /// have run there, so they are not run again), and the bindings and debug streams
    /// made there are made again (here, until the pause after the end is over; then
    /// `rehome` moves them to where their modules are served).
    async fn upstream_ended(&mut self, server: &str) -> bool {
        let Some(upstream) = self.upstreams.remove(server) else {
            return true;
        };
        self.unreachable
            .insert(server.to_string(), Instant::now() + UNREACHABLE_PAUSE);
        for (id, (_, exec)) in &upstream.awaiting {
            if !exec {
                continue;
            }
            let id: Value = serde_json::from_str(id).unwrap_or(Value::Null);
            let message = error_json(
                &id,
                ApiError::unavailable(format!(
                    "master {server} did not answer the call before its socket ended (it may have run there)"
                )),
            );
            if !self.send(message) {
                return false;
            }
        }
        let moved: Vec<Key> = self
            .relayed
            .iter()
            .filter(|(_, relayed)| relayed.server == server)
            .map(|(key, _)| key.clone())
            .collect();
        for key in moved {
            let Some(relayed) = self.relayed.remove(&key) else {
                continue;
            };
            for text in relayed.remake(&key) {
                if !Box::pin(self.command(&text)).await {
                    return false;
                }
            }
        }
        true
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
