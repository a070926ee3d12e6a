//! The runtime's way to the other side: each call becomes a request on the link to the
//! side that runs the module.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use serde_json::{Map, Value};
use tokio::sync::{broadcast, mpsc};

use super::errors::from_link;
use crate::identity::EdgeId;
use crate::link::{Link, LinkError, ResponseStream};
use crate::protocol::{Json, OnBehalf, Request, Response, StreamItem};
use crate::runtime::{
    DebugLine, ExecError, Executed, MAX_LOG_LINE, MAX_STATUS_KEY, MAX_STATUS_VALUE, Origin, Remote,
    RemoteCall, StatusEvent, StatusMap, SystemAction,
};

/// How long the far side may take to start a stream or act on a system.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Events a proxied watch may queue for a slow reader.
const WATCH_QUEUE: usize = 256;

/// What a server knows about its links.
pub trait Links: Send + Sync + 'static {
    /// The link to the side that runs the modules of `edge` (`None`: the master's own)
    /// for a call that came in over `via`; fails fast when there is none (unreachable),
    /// and when it would lead back over `via`.
    fn link_to(&self, edge: Option<&str>, via: Option<&str>) -> Result<Link, ExecError>;

    /// The other side's API address when it controls `system`.
    fn preferred_server(&self, system: &str) -> Option<String>;

    /// Whether the other side holds every system (true on an edge: the master does).
    fn holds_every_system(&self) -> bool;
}

/// A [`Remote`] over a server's [`Links`].
pub struct LinkRemote<L> {
    links: Arc<L>,
    /// Status subscriptions open on a link, by module, shared by every binding here.
    watches: Arc<Mutex<HashMap<ModuleKey, WatchSlot>>>,
}

impl<L: Links> LinkRemote<L> {
    /// A remote over `links`.
    pub fn new(links: Arc<L>) -> Self {
        LinkRemote {
            links,
            watches: Arc::default(),
        }
    }

    fn link(&self, call: &RemoteCall) -> Result<Link, ExecError> {
        self.links
            .link_to(call.edge.as_deref(), call.origin.via.as_deref())
    }
}

/// The far side for people: an edge's link is named by its id, the master's by its
/// address.
fn describe(link: &Link) -> String {
    let peer = link.peer();
    if peer.contains(':') {
        format!("the master ({peer})")
    } else {
        format!("edge {peer}")
    }
}

fn unexpected(link: &Link, answer: &Response) -> ExecError {
    ExecError::Script(format!(
        "{} answered with something unexpected: {answer:?}",
        describe(link)
    ))
}

fn decode(link: &Link, json: &Json) -> Result<Value, ExecError> {
    json.to_value().map_err(|err| {
        ExecError::Script(format!(
            "{} sent a value that is not JSON: {err}",
            describe(link)
        ))
    })
}

async fn request(link: &Link, body: Request, call: &RemoteCall) -> Result<Response, ExecError> {
    link.request_as(body, call.timeout, call.origin.on_behalf.clone())
        .await
        .map_err(|err| from_link(&describe(link), err))
}

/// Opens a stream and waits for its first item, so that a refusal is the caller's error
/// and not an empty stream.
async fn open_stream(
    link: &Link,
    body: Request,
    on_behalf: Option<OnBehalf>,
) -> Result<(ResponseStream, Option<StreamItem>), ExecError> {
    let mut stream = link
        .request_stream_as(body, START_TIMEOUT, on_behalf)
        .await
        .map_err(|err| from_link(&describe(link), err))?;
    match tokio::time::timeout(START_TIMEOUT, stream.next()).await {
        Ok(Some(Ok(first))) => Ok((stream, Some(first))),
        Ok(Some(Err(err))) => Err(from_link(&describe(link), err)),
        Ok(None) => Ok((stream, None)),
        Err(_) => Err(from_link(
            &describe(link),
            LinkError::Timeout(START_TIMEOUT),
        )),
    }
}

/// Feeds a stream's items, converted, into a channel until either end goes.
fn pump<T: Send + 'static>(
    mut stream: ResponseStream,
    first: Option<T>,
    convert: impl Fn(StreamItem) -> Option<T> + Send + 'static,
) -> mpsc::Receiver<T> {
    let (tx, rx) = mpsc::channel(WATCH_QUEUE);
    tokio::spawn(async move {
        if let Some(first) = first
            && tx.send(first).await.is_err()
        {
            return;
        }
        loop {
            tokio::select! {
                _ = tx.closed() => return,
                item = stream.next() => match item {
                    Some(Ok(item)) => {
                        if let Some(event) = convert(item)
                            && tx.send(event).await.is_err()
                        {
                            return;
                        }
                    }
                    // The stream ended (the module stopped there) or the link went.
                    _ => return,
                },
            }
        }
    });
    rx
}

/// A module as a status subscription names it.
type ModuleKey = (String, String, u32, Option<String>);

/// Where a module's shared subscription is kept: opened by one binding while the others
/// wait; it ends by itself (link gone, module stopped there, no one following).
type WatchSlot = Arc<tokio::sync::Mutex<Option<Arc<SharedWatch>>>>;

fn module_key(module: &crate::protocol::ModuleRef) -> ModuleKey {
    (
        module.system.clone(),
        module.name.clone(),
        module.index,
        module.id.clone(),
    )
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Status changes a shared subscription's followers may fall behind by before they are
/// sent the whole map again.
const SHARED_EVENTS: usize = 256;
/// How often a shared subscription with no follower left checks to end.
const SHARED_CHECK: Duration = Duration::from_secs(1);

/// One status subscription on a link, followed by any number of bindings on this side:
/// the far side keeps one subscription per module and link (a second replaces the first),
/// so this side shares it. It keeps the current map for followers that join late.
struct SharedWatch {
    link: Link,
    /// The map as of the last event; changed and broadcast under this lock, so a follower
    /// that subscribes under it misses nothing and sees nothing twice.
    map: Mutex<Map<String, Value>>,
    events: broadcast::Sender<StatusEvent>,
    /// Cancelled when the subscription ends: every follower ends with it.
    ended: tokio_util::sync::CancellationToken,
}

impl SharedWatch {
    /// Pumps `stream` into a new shared watch until it ends or no one follows it.
    fn start(
        link: Link,
        mut stream: ResponseStream,
        first: Option<StatusEvent>,
    ) -> Arc<SharedWatch> {
        let watch = Arc::new(SharedWatch {
            link,
            map: Mutex::default(),
            events: broadcast::channel(SHARED_EVENTS).0,
            ended: tokio_util::sync::CancellationToken::new(),
        });
        if let Some(first) = first {
            watch.apply(first);
        }
        let pumped = watch.clone();
        tokio::spawn(async move {
            let mut check = tokio::time::interval(SHARED_CHECK);
            check.tick().await;
            loop {
                tokio::select! {
                    item = stream.next() => match item.map(|item| item.map(status_event)) {
                        Some(Ok(Some(event))) => pumped.apply(event),
                        Some(Ok(None)) => {}
                        // The module stopped running there, or the link went.
                        _ => break,
                    },
                    _ = check.tick() => {
                        if pumped.events.receiver_count() == 0 {
                            break;
                        }
                    }
                }
            }
            pumped.ended.cancel();
        });
        watch
    }

    fn ended(&self) -> bool {
        self.ended.is_cancelled()
    }

    fn apply(&self, event: StatusEvent) {
        let mut map = lock(&self.map);
        match &event {
            StatusEvent::Map(whole) => *map = whole.clone(),
            StatusEvent::Value(key, value) => {
                map.insert(key.clone(), value.clone());
            }
        }
        // No follower is fine.
        let _ = self.events.send(event);
    }

    /// A new follower: the current map, then each change, until the subscription ends.
    fn follow(self: &Arc<Self>) -> mpsc::Receiver<StatusEvent> {
        let (mut events, map) = {
            let map = lock(&self.map);
            (self.events.subscribe(), map.clone())
        };
        let (tx, rx) = mpsc::channel(WATCH_QUEUE);
        let watch = self.clone();
        tokio::spawn(async move {
            if tx.send(StatusEvent::Map(map)).await.is_err() {
                return;
            }
            loop {
                let event = tokio::select! {
                    _ = tx.closed() => return,
                    _ = watch.ended.cancelled() => return,
                    event = events.recv() => match event {
                        Ok(event) => event,
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            StatusEvent::Map(lock(&watch.map).clone())
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                };
                if tx.send(event).await.is_err() {
                    return;
                }
            }
        });
        rx
    }
}

/// A status item from the other side, within the caps a module's own status has (the
/// other side may be hostile): what does not fit is dropped.
fn status_event(item: StreamItem) -> Option<StatusEvent> {
    let fits =
        |key: &str, value: &Json| key.len() <= MAX_STATUS_KEY && value.0.len() <= MAX_STATUS_VALUE;
    match item {
        StreamItem::StatusMap { entries } => {
            let mut map = StatusMap::new();
            for (key, value) in entries {
                if fits(&key, &value)
                    && let Ok(value) = value.to_value()
                {
                    let _ = map.set(&key, value);
                }
            }
            Some(StatusEvent::Map(map.into_map()))
        }
        StreamItem::StatusValue { key, value } if fits(&key, &value) => {
            Some(StatusEvent::Value(key, value.to_value().ok()?))
        }
        _ => None,
    }
}

/// A debug line from the other side, cut to the length a module's own lines have.
fn debug_line(item: StreamItem) -> Option<DebugLine> {
    match item {
        StreamItem::Debug { time_ms, mut line } => {
            if line.len() > MAX_LOG_LINE {
                let mut at = MAX_LOG_LINE;
                while !line.is_char_boundary(at) {
                    at -= 1;
                }
                line.truncate(at);
            }
            Some(DebugLine { time_ms, line })
        }
        _ => None,
    }
}

impl<L: Links> Remote for LinkRemote<L> {
    fn exec(
        &self,
        call: RemoteCall,
        method: String,
        args: Vec<Value>,
    ) -> BoxFuture<'static, Result<Executed, ExecError>> {
        let link = self.link(&call);
        async move {
            let link = link?;
            let body = Request::Execute {
                module: call.module.clone(),
                method,
                args: Json::from_value(&Value::Array(args)),
                epoch: call.claim.epoch,
                holder: call.claim.holder,
            };
            match request(&link, body, &call).await? {
                Response::Value { value, executed_by } => Ok(Executed {
                    value: decode(&link, &value)?,
                    executed_by,
                }),
                other => Err(unexpected(&link, &other)),
            }
        }
        .boxed()
    }

    fn status(
        &self,
        call: RemoteCall,
    ) -> BoxFuture<'static, Result<Map<String, Value>, ExecError>> {
        let link = self.link(&call);
        async move {
            let link = link?;
            let body = Request::StatusRequest {
                module: call.module.clone(),
            };
            match request(&link, body, &call).await? {
                Response::Status { entries } => entries
                    .into_iter()
                    .map(|(key, value)| Ok((key, decode(&link, &value)?)))
                    .collect(),
                other => Err(unexpected(&link, &other)),
            }
        }
        .boxed()
    }

    fn debug_lines(
        &self,
        call: RemoteCall,
    ) -> BoxFuture<'static, Result<Vec<DebugLine>, ExecError>> {
        let link = self.link(&call);
        async move {
            let link = link?;
            let body = Request::DebugRead {
                module: call.module.clone(),
            };
            match request(&link, body, &call).await? {
                Response::DebugLines { lines } => Ok(lines
                    .into_iter()
                    .map(|(time_ms, line)| DebugLine { time_ms, line })
                    .collect()),
                other => Err(unexpected(&link, &other)),
            }
        }
        .boxed()
    }

    fn watch_status(
        &self,
        call: RemoteCall,
    ) -> BoxFuture<'static, Result<mpsc::Receiver<StatusEvent>, ExecError>> {
        let link = self.link(&call);
        let watches = self.watches.clone();
        async move {
            let link = link?;
            // One subscription per module at a time: bindings that ask together wait for
            // the first to open it, then follow it (the far side would end all but one).
            let slot = lock(&watches)
                .entry(module_key(&call.module))
                .or_default()
                .clone();
            let mut current = slot.lock().await;
            if let Some(watch) = current
                .as_ref()
                .filter(|watch| watch.link.same_link(&link) && !watch.ended())
            {
                return Ok(watch.follow());
            }
            let body = Request::StatusSubscribe {
                module: call.module,
            };
            let (stream, first) = open_stream(&link, body, call.origin.on_behalf).await?;
            let watch = SharedWatch::start(link, stream, first.and_then(status_event));
            *current = Some(watch.clone());
            Ok(watch.follow())
        }
        .boxed()
    }

    fn watch_debug(
        &self,
        call: RemoteCall,
    ) -> BoxFuture<'static, Result<mpsc::Receiver<DebugLine>, ExecError>> {
        let link = self.link(&call);
        async move {
            let link = link?;
            let body = Request::DebugSubscribe {
                module: call.module,
            };
            let stream = link
                .request_stream_as(body, START_TIMEOUT, call.origin.on_behalf)
                .await
                .map_err(|err| from_link(&describe(&link), err))?;
            // A quiet module sends nothing at first, so nothing is awaited here.
            Ok(pump(stream, None, debug_line))
        }
        .boxed()
    }

    fn system_action(
        &self,
        system: String,
        edge: Option<EdgeId>,
        origin: Origin,
        action: SystemAction,
    ) -> BoxFuture<'static, Result<String, ExecError>> {
        let link = self.links.link_to(edge.as_deref(), origin.via.as_deref());
        async move {
            let link = link?;
            let body = match action {
                SystemAction::Start => Request::StartSystem { system },
                SystemAction::Stop => Request::StopSystem { system },
                SystemAction::ExpireCache => Request::ExpireSystemCache { system },
            };
            let response = link
                .request_as(body, START_TIMEOUT, origin.on_behalf)
                .await
                .map_err(|err| from_link(&describe(&link), err))?;
            match response {
                Response::DoneBy { side } => Ok(side),
                other => Err(unexpected(&link, &other)),
            }
        }
        .boxed()
    }

    fn preferred_server(&self, system: &str) -> Option<String> {
        self.links.preferred_server(system)
    }

    fn holds_every_system(&self) -> bool {
        self.links.holds_every_system()
    }
}
