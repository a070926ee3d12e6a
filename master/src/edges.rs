//! The master's view of its edges: their records and secrets (following the data model),
//! and which link is current for each. A newer authenticated link replaces the old one;
//! only the current link's closing marks an edge offline.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;
use serde_json::Value;
use tether_common::control::{ControlState, Mono, owner_name};
use tether_common::link::{EdgeSecrets, Link, Secret};
use tether_common::model::EdgeRecord;

struct EdgeEntry {
    record: EdgeRecord,
    secret: Option<Secret>,
    /// The current link and a number that tells it from the links it replaced.
    link: Option<(u64, Link)>,
    connected_since_ms: Option<u64>,
    /// Last frame from the last link, kept after it closes.
    last_seen_ms: Option<u64>,
    /// The edge's client API as it announced it; kept while it is offline, because a
    /// client may reach an edge the master cannot.
    api_url: Option<String>,
    /// A site pair's node: its location (the record is the location's).
    location: Option<String>,
    /// A site pair's location: the node its witness granted the modules last.
    holder: Option<String>,
    /// A site pair's node: its collector-array slot as it reported it last.
    array_slot: Option<(u64, u64)>,
}

impl EdgeEntry {
    fn new(record: &EdgeRecord, secret: Option<Secret>, location: Option<String>) -> Self {
        EdgeEntry {
            record: record.clone(),
            secret,
            link: None,
            connected_since_ms: None,
            last_seen_ms: None,
            api_url: None,
            location,
            holder: None,
            array_slot: None,
        }
    }

    fn live_link(&self) -> Option<&Link> {
        self.link
            .as_ref()
            .map(|(_, link)| link)
            .filter(|link| !link.is_closed())
    }
}

/// Every edge of the model and its link.
pub struct EdgeRegistry {
    edges: Mutex<HashMap<String, EdgeEntry>>,
    /// The site pairs this master witnesses: only their nodes may link here.
    witnessed: Mutex<std::collections::HashSet<String>>,
    /// Each site pair's holder as its witness set it last, kept apart from the entries:
    /// the witness may decide before the model's records have made the location's entry
    /// (at the master's start), and the entry made later takes it from here.
    holders: Mutex<HashMap<String, Option<String>>>,
    /// Relative secret files are resolved against this folder (master.toml's).
    base_dir: PathBuf,
    next_generation: std::sync::atomic::AtomicU64,
}

/// The link state `GET /api/v1/edges` adds to an edge's record.
#[derive(Debug, Serialize)]
struct LinkView {
    online: bool,
    last_seen: Option<String>,
    connected_since: Option<String>,
    rtt_ms: Option<f64>,
    api_url: Option<String>,
}

use crate::control::now_ms;
use tether_common::api::rfc3339;

impl EdgeRegistry {
    /// An empty registry; [`sync`](Self::sync) fills it from the model.
    pub fn new(base_dir: PathBuf) -> Arc<Self> {
        Arc::new(EdgeRegistry {
            edges: Mutex::new(HashMap::new()),
            witnessed: Mutex::default(),
            holders: Mutex::default(),
            base_dir,
            next_generation: 1.into(),
        })
    }

    fn load_secret(&self, record: &EdgeRecord) -> Option<Secret> {
        // A pair's location never links itself: its nodes do, each with its own secret.
        if record.is_pair() {
            return None;
        }
        let Some(file) = &record.secret_file else {
            tracing::error!(edge = %record.id, "edge cannot authenticate: its record names no secret_file");
            return None;
        };
        match Secret::load(&self.base_dir.join(file)) {
            Ok(secret) => Some(secret),
            Err(err) => {
                tracing::error!(edge = %record.id, "edge cannot authenticate: {err}");
                None
            }
        }
    }

    /// A site pair's node's secret: `NODE.secret` beside the location's `secret_file`
    /// (where `tether-master certs --edges` writes it).
    fn load_node_secret(&self, record: &EdgeRecord, node: &str) -> Option<Secret> {
        let Some(file) = &record.secret_file else {
            tracing::error!(edge = %record.id, node, "node cannot authenticate: its location's record names no secret_file (node secrets are beside it)");
            return None;
        };
        let path = self.base_dir.join(file);
        let path = path
            .parent()
            .unwrap_or(std::path::Path::new("."))
            .join(format!("{node}.secret"));
        match Secret::load(&path) {
            Ok(secret) => Some(secret),
            Err(err) => {
                tracing::error!(edge = %record.id, node, "node cannot authenticate: {err}");
                None
            }
        }
    }

    /// Follows the model's edges: new ones are added, changed ones updated (their secret
    /// read again), deleted ones removed and their links closed. An edge whose secret
    /// cannot be read is logged and cannot authenticate; the others are unaffected. A
    /// site pair's nodes are entries of their own (their links), tied to their location.
    pub fn sync(&self, records: &BTreeMap<String, EdgeRecord>) {
        let mut edges = self.lock();
        let nodes: BTreeMap<&str, &EdgeRecord> = records
            .values()
            .flat_map(|record| record.nodes.iter().map(move |node| (node.as_str(), record)))
            .collect();
        edges.retain(|id, entry| {
            let keep = match &entry.location {
                None => records.get(id).is_some_and(|r| r.is_pair() == entry.record.is_pair()),
                Some(location) => nodes.get(id.as_str()).is_some_and(|r| &r.id == location),
            };
            if !keep && let Some((_, link)) = &entry.link {
                link.close("the edge (or node) was deleted from the data model, or changed from one node to a pair");
            }
            keep
        });
        for (node, record) in &nodes {
            match edges.get_mut(*node) {
                Some(entry) if entry.record == **record => {}
                Some(entry) => {
                    if entry.record.secret_file != record.secret_file {
                        entry.secret = self.load_node_secret(record, node);
                    }
                    entry.record = (*record).clone();
                }
                None => {
                    let secret = self.load_node_secret(record, node);
                    let entry = EdgeEntry::new(record, secret, Some(record.id.clone()));
                    edges.insert(node.to_string(), entry);
                }
            }
        }
        for (id, record) in records {
            match edges.get_mut(id) {
                Some(entry) if entry.record == *record => {}
                Some(entry) => {
                    if entry.record.secret_file != record.secret_file {
                        entry.secret = self.load_secret(record);
                    }
                    entry.record = record.clone();
                }
                None => {
                    let mut entry = EdgeEntry::new(record, self.load_secret(record), None);
                    entry.holder = self
                        .holders
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get(id)
                        .cloned()
                        .flatten();
                    edges.insert(id.clone(), entry);
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, EdgeEntry>> {
        self.edges.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes `link` the edge's current link, closing the one it replaces. Returns the
    /// link's generation, for [`detach`](Self::detach).
    pub fn attach(&self, edge_id: &str, link: Link, addr: std::net::SocketAddr) -> Option<u64> {
        let generation = self
            .next_generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut edges = self.lock();
        let entry = edges.get_mut(edge_id)?;
        if let Some((_, old)) = entry.link.replace((generation, link)) {
            tracing::warn!(edge = %edge_id, %addr, "a newer authenticated link replaces the edge's current one");
            old.close(format!("replaced by a newer link from {addr}"));
        }
        entry.connected_since_ms = Some(now_ms());
        tracing::info!(edge = %edge_id, %addr, "edge online");
        Some(generation)
    }

    /// Marks the edge offline if `generation` is still its current link; answers when it
    /// was last heard (on the monotonic clock), or `None` when a newer link had replaced
    /// this one.
    pub fn detach(&self, edge_id: &str, generation: u64, reason: &str) -> Option<Mono> {
        let mut edges = self.lock();
        let entry = edges.get_mut(edge_id)?;
        match &entry.link {
            Some((current, link)) if *current == generation => {
                let last_heard = link.last_heard();
                entry.last_seen_ms = Some(link.last_seen_unix_ms());
                entry.link = None;
                entry.connected_since_ms = None;
                entry.array_slot = None;
                tracing::warn!(edge = %edge_id, "edge offline: {reason}");
                Some(last_heard)
            }
            _ => None,
        }
    }

    /// The link that reaches the edge location's modules, if it is connected: the
    /// edge's own, or for a site pair the node its witness granted them last.
    pub fn link(&self, edge_id: &str) -> Option<Link> {
        let edges = self.lock();
        let entry = edges.get(edge_id)?;
        let entry = match &entry.holder {
            Some(node) => edges.get(node)?,
            None => entry,
        };
        entry.live_link().cloned()
    }

    /// A site pair: the node its witness granted the location's modules last.
    pub fn holder(&self, location: &str) -> Option<String> {
        self.lock().get(location)?.holder.clone()
    }

    /// Whether this master witnesses site pair `location` (only then may its nodes link).
    pub fn set_witnessed(&self, location: &str, witnessed: bool) {
        let mut set = self.witnessed.lock().unwrap_or_else(|p| p.into_inner());
        if witnessed {
            set.insert(location.to_string());
        } else {
            set.remove(location);
        }
    }

    /// Whether this master witnesses site pair `location`.
    pub fn witnesses(&self, location: &str) -> bool {
        self.witnessed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(location)
    }

    /// A site pair's node's own secret (the witness proves its grants with it).
    pub fn node_secret(&self, node: &str) -> Option<Secret> {
        let edges = self.lock();
        let entry = edges.get(node)?;
        entry.location.as_ref()?;
        entry.secret.clone()
    }

    /// Closes the links of site pair `location`'s nodes, saying why.
    pub fn close_nodes(&self, location: &str, why: &str) {
        for entry in self.lock().values() {
            if entry.location.as_deref() == Some(location)
                && let Some((_, link)) = &entry.link
            {
                link.close(why.to_string());
            }
        }
    }

    /// A site pair's node's collector-array slot, as it reported it.
    pub fn set_array_slot(&self, node: &str, slot: Option<(u64, u64)>) {
        if let Some(entry) = self.lock().get_mut(node) {
            entry.array_slot = slot;
        }
    }

    /// A site pair's node's current link.
    pub fn link_of_node(&self, node: &str) -> Option<Link> {
        self.lock().get(node)?.live_link().cloned()
    }

    /// A site pair's node's location (none: not a node).
    pub fn location_of(&self, id: &str) -> Option<String> {
        self.lock().get(id)?.location.clone()
    }

    /// A site pair: the node its witness granted the location's modules (none: the
    /// master, or a move in progress).
    pub fn set_holder(&self, location: &str, node: Option<&str>) {
        let mut edges = self.lock();
        let holder = node.map(str::to_string);
        self.holders
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(location.to_string(), holder.clone());
        if let Some(entry) = edges.get_mut(location) {
            entry.holder = holder;
        }
    }

    /// The edge's current link and its generation, if it is connected.
    pub fn current(&self, edge_id: &str) -> Option<(u64, Link)> {
        let edges = self.lock();
        let (generation, link) = edges.get(edge_id)?.link.as_ref()?;
        (!link.is_closed()).then(|| (*generation, link.clone()))
    }

    /// Records the API address the edge announced.
    pub fn set_api_url(&self, edge_id: &str, url: String) {
        if let Some(entry) = self.lock().get_mut(edge_id) {
            entry.api_url = Some(url);
        }
    }

    /// The API address the edge (a pair: the holder node) announced last.
    pub fn api_url(&self, edge_id: &str) -> Option<String> {
        let edges = self.lock();
        let entry = edges.get(edge_id)?;
        match &entry.holder {
            Some(node) => edges.get(node)?.api_url.clone(),
            None => entry.api_url.clone(),
        }
    }

    /// How many of the model's edge locations are connected now (a pair: any node).
    pub fn connected(&self) -> (usize, usize) {
        let edges = self.lock();
        let mut online = std::collections::HashSet::new();
        for (id, entry) in edges.iter() {
            if entry.live_link().is_some() {
                online.insert(entry.location.as_deref().unwrap_or(id));
            }
        }
        let locations = edges.values().filter(|e| e.location.is_none()).count();
        (online.len(), locations)
    }

    /// Closes every link (shutdown).
    pub fn close_all(&self, reason: &str) {
        for entry in self.lock().values() {
            if let Some((_, link)) = &entry.link {
                link.close(reason);
            }
        }
    }

    /// An edge's record with its link state and its owner and epoch, as
    /// `GET /api/v1/edges` shows it.
    pub fn view(&self, record: &EdgeRecord, control: Option<ControlState>) -> Option<Value> {
        let edges = self.lock();
        let entry = edges.get(&record.id);
        let link = entry.and_then(|e| e.link.as_ref()).map(|(_, link)| link);
        let online = link.is_some_and(|link| !link.is_closed());
        let last_seen = link
            .map(|l| l.last_seen_unix_ms())
            .or(entry.and_then(|e| e.last_seen_ms));
        let state = LinkView {
            online,
            last_seen: last_seen.map(rfc3339),
            connected_since: entry.and_then(|e| e.connected_since_ms).map(rfc3339),
            rtt_ms: link
                .and_then(|l| l.rtt())
                .map(|rtt| (rtt.as_secs_f64() * 1e6).round() / 1e3),
            api_url: entry.and_then(|e| e.api_url.clone()),
        };
        let mut view = serde_json::to_value(record).ok()?;
        if let (Value::Object(map), Ok(Value::Object(state))) =
            (&mut view, serde_json::to_value(state))
        {
            map.extend(state);
            if record.is_pair() {
                let holder = entry.and_then(|e| e.holder.as_deref());
                map.insert(
                    "online".into(),
                    record
                        .nodes
                        .iter()
                        .any(|n| edges.get(n).is_some_and(|e| e.live_link().is_some()))
                        .into(),
                );
                map.insert("nodes".into(), node_views(&edges, record, holder));
            }
            let control = control.unwrap_or_default();
            map.insert("owner".into(), owner_name(control.owner).into());
            map.insert("epoch".into(), control.epoch.into());
        }
        Some(view)
    }
}

/// A site pair's nodes as `GET /api/v1/edges` shows them: each one's link, its role
/// (`holder` or `standby`) and its collector-array slot (`[rank, of]` among the nodes that
/// poll, as the node reported it; none while offline, or not polling).
fn node_views(
    edges: &HashMap<String, EdgeEntry>,
    record: &EdgeRecord,
    holder: Option<&str>,
) -> Value {
    let views = record.nodes.iter().map(|node| {
        let entry = edges.get(node.as_str());
        let link = entry.and_then(EdgeEntry::live_link);
        let last_seen = link
            .map(|l| l.last_seen_unix_ms())
            .or(entry.and_then(|e| e.last_seen_ms));
        let slot = link
            .and(entry.and_then(|e| e.array_slot))
            .map(|(rank, of)| serde_json::json!([rank, of]));
        serde_json::json!({
            "id": node,
            "online": link.is_some(),
            "role": if holder == Some(node.as_str()) { "holder" } else { "standby" },
            "last_seen": last_seen.map(rfc3339),
            "rtt_ms": link.and_then(|l| l.rtt()).map(|rtt| (rtt.as_secs_f64() * 1e6).round() / 1e3),
            "api_url": entry.and_then(|e| e.api_url.clone()),
            "array_slot": slot,
        })
    });
    Value::Array(views.collect())
}

impl EdgeSecrets for EdgeRegistry {
    fn secret(&self, edge_id: &str) -> Option<Secret> {
        let edges = self.lock();
        let entry = edges.get(edge_id)?;
        // A pair's node links only to the master that witnesses its pair: refused in the
        // handshake elsewhere, it tries the next master at once.
        if let Some(location) = &entry.location
            && !self
                .witnessed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(location)
        {
            tracing::info!(node = edge_id, %location, "node link refused: another master witnesses its site pair");
            return None;
        }
        entry.secret.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair_records() -> BTreeMap<String, EdgeRecord> {
        let record: EdgeRecord = serde_json::from_value(serde_json::json!({
            "id": "site-1",
            "nodes": ["site-1a", "site-1b"],
        }))
        .unwrap();
        BTreeMap::from([(record.id.clone(), record)])
    }

    #[test]
    fn a_holder_set_before_the_records_made_the_location_is_kept() {
        // At the master's start the witness may decide before the model's records reach
        // the registry: the location's entry made later must take that holder.
        let registry = EdgeRegistry::new(PathBuf::from("."));
        registry.set_holder("site-1", Some("site-1b"));
        assert_eq!(registry.holder("site-1"), None, "no entry yet");
        registry.sync(&pair_records());
        assert_eq!(registry.holder("site-1").as_deref(), Some("site-1b"));

        // A later decision, and records synced again, change nothing else.
        registry.set_holder("site-1", Some("site-1a"));
        registry.sync(&pair_records());
        assert_eq!(registry.holder("site-1").as_deref(), Some("site-1a"));
        registry.set_holder("site-1", None);
        assert_eq!(registry.holder("site-1"), None);
    }
}
