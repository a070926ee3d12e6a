//! A server's metrics for Prometheus (`GET /metrics`, text format 0.0.4), each server its
//! own registry. Events are counted as they happen (link round trips, method calls,
//! changes of owner); states (links up, owners, epochs, model version, modules) are read
//! at each scrape from what the API shows, so the two never disagree.

use std::sync::Mutex;
use std::time::Duration;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder, exponential_buckets,
};
use serde_json::Value;

use crate::control::{AuditRecord, owner_name};

/// The content type of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What a scrape reads of the server's state.
#[derive(Debug, Default)]
pub struct State {
    /// The edges as `GET /api/v1/edges` shows them (`id`, `online`, `owner`, `epoch`).
    pub edges: Vec<Value>,
    /// The data-model version this side holds.
    pub model_version: u64,
    /// Per running module: where it belongs (`edge:ID` or `master`) and, for a module
    /// with a device, whether its connection is up.
    pub modules: Vec<(String, Option<bool>)>,
}

/// One server's metrics.
pub struct Metrics {
    registry: Registry,
    link_up: IntGaugeVec,
    link_rtt: HistogramVec,
    owner: IntGaugeVec,
    epoch: IntGaugeVec,
    takeovers: IntCounterVec,
    exec: IntCounterVec,
    exec_seconds: HistogramVec,
    model_version: IntGauge,
    modules: IntGaugeVec,
    modules_connected: IntGaugeVec,
    link_connections: IntGaugeVec,
    link_refused: IntCounterVec,
    grant_store_failures: IntCounterVec,
    alerts_pending: IntGaugeVec,
    alerts_dropped: IntCounterVec,
    /// One scrape at a time: each resets and refills the state gauges.
    scraping: Mutex<()>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The metric names and label names are constants: building them cannot fail.
fn must<T>(built: prometheus::Result<T>) -> T {
    built.expect("metric definitions are constant and valid")
}

impl Metrics {
    /// Every metric, registered.
    pub fn new() -> Self {
        let registry = Registry::new();
        let gauges = |name: &str, help: &str, labels: &[&str]| {
            let vec = must(IntGaugeVec::new(Opts::new(name, help), labels));
            must(registry.register(Box::new(vec.clone())));
            vec
        };
        let histograms = |name: &str, help: &str, labels: &[&str], start: f64, count: usize| {
            let opts = HistogramOpts::new(name, help)
                .buckets(must(exponential_buckets(start, 2.0, count)));
            let vec = must(HistogramVec::new(opts, labels));
            must(registry.register(Box::new(vec.clone())));
            vec
        };
        let counters = |name: &str, help: &str, labels: &[&str]| {
            let vec = must(IntCounterVec::new(Opts::new(name, help), labels));
            must(registry.register(Box::new(vec.clone())));
            vec
        };
        let link_up = gauges(
            "tether_link_up",
            "1 while the edge link is up (on an edge: its link to the master)",
            &["edge"],
        );
        let link_rtt = histograms(
            "tether_link_rtt_seconds",
            "Round trips of the edge link's heartbeats",
            &["edge"],
            0.000_1,
            17,
        );
        let owner = gauges(
            "tether_edge_owner",
            "1 for the side that controls the edge's modules (owner=\"edge\" or \"master\"), 0 for the other",
            &["edge", "owner"],
        );
        let epoch = gauges(
            "tether_edge_epoch",
            "The edge location's control epoch",
            &["edge"],
        );
        let takeovers = counters(
            "tether_takeovers_total",
            "Changes of owner recorded here since start, by edge and new owner",
            &["edge", "to"],
        );
        let exec = counters(
            "tether_exec_total",
            "Method calls of this server's clients, by the side that ran them (edge, master; none when refused) and result",
            &["side", "result"],
        );
        let exec_seconds = histograms(
            "tether_exec_duration_seconds",
            "Time to answer a client's method call, by the side that ran it",
            &["side"],
            0.000_1,
            18,
        );
        let model_version = IntGauge::new(
            "tether_model_version",
            "The data-model version this side holds (on an edge: its replica's)",
        );
        let model_version = must(model_version);
        must(registry.register(Box::new(model_version.clone())));
        let modules = gauges(
            "tether_modules_running",
            "Modules running here, by the location they belong to (edge:ID or master)",
            &["location"],
        );
        let modules_connected = gauges(
            "tether_modules_connected",
            "Modules running here whose device connection is up, by location",
            &["location"],
        );
        let link_connections = gauges(
            "tether_link_connections",
            "Edge-link connections held by the master's listener, by stage (handshake: not yet authenticated; link: authenticated)",
            &["stage"],
        );
        let link_refused = counters(
            "tether_link_refused_total",
            "What the master refused or dropped of an edge's link, by edge and kind: request (outside its site), audit (over its rate), notice (not its module), blob (not its code), cap (over a per-link limit)",
            &["edge", "what"],
        );
        let grant_store_failures = counters(
            "tether_grant_store_failures_total",
            "Grants (changes of owner, or an edge's own claim) that could not be stored and so were not carried out, by edge; each is tried again",
            &["edge"],
        );
        let alerts_pending = gauges(
            "tether_alerts_pending",
            "Audit events not yet taken by an [[alerts]] receiver, by receiver (its URL without credentials or query)",
            &["receiver"],
        );
        let alerts_dropped = counters(
            "tether_alerts_dropped_total",
            "Audit events an [[alerts]] receiver will never get: the oldest dropped over its max_pending, or let go by the audit log before delivery",
            &["receiver"],
        );
        Metrics {
            registry,
            alerts_pending,
            alerts_dropped,
            grant_store_failures,
            link_connections,
            link_refused,
            link_up,
            link_rtt,
            owner,
            epoch,
            takeovers,
            exec,
            exec_seconds,
            model_version,
            modules,
            modules_connected,
            scraping: Mutex::new(()),
        }
    }

    /// The gauge of the listener's connections at `stage` (`handshake` or `link`).
    pub fn link_connections(&self, stage: &str) -> IntGauge {
        self.link_connections.with_label_values(&[stage])
    }

    /// Something of `edge`'s link was refused or dropped (`what`: its kind).
    pub fn refused(&self, edge: &str, what: &str) {
        self.link_refused.with_label_values(&[edge, what]).inc();
    }

    /// Events not yet taken by alert `receiver`.
    pub fn alerts_pending(&self, receiver: &str, pending: u64) {
        self.alerts_pending
            .with_label_values(&[receiver])
            .set(i64::try_from(pending).unwrap_or(i64::MAX));
    }

    /// Events alert `receiver` will never get.
    pub fn alerts_dropped(&self, receiver: &str, count: u64) {
        self.alerts_dropped
            .with_label_values(&[receiver])
            .inc_by(count);
    }

    /// A grant of `edge` could not be stored, so it was not carried out.
    pub fn grant_store_failed(&self, edge: &str) {
        self.grant_store_failures.with_label_values(&[edge]).inc();
    }

    /// What takes each heartbeat's round trip on `edge`'s link (the labelled histogram
    /// looked up once).
    pub fn rtt_sink(&self, edge: &str) -> crate::link::RttSink {
        let histogram = self.link_rtt.with_label_values(&[edge]);
        Box::new(move |rtt| histogram.observe(rtt.as_secs_f64()))
    }

    /// A client's method call: who ran it (`master`, `edge:ID`, or `None` when it was
    /// refused or failed), and how long the answer took.
    pub fn observe_exec(&self, executed_by: Option<&str>, ok: bool, took: Duration) {
        let side = match executed_by {
            Some(by) if by.starts_with("edge") => "edge",
            Some(_) => "master",
            None => "none",
        };
        let result = if ok { "ok" } else { "error" };
        self.exec.with_label_values(&[side, result]).inc();
        self.exec_seconds
            .with_label_values(&[side])
            .observe(took.as_secs_f64());
    }

    /// An audit record was stored: a change of owner counts as a takeover.
    pub fn observe_audit(&self, record: &AuditRecord) {
        if record.code.is_none() {
            self.takeovers
                .with_label_values(&[record.edge.as_str(), owner_name(record.to)])
                .inc();
        }
    }

    /// The text exposition, after reading `state` into the state gauges.
    pub fn render(&self, state: &State) -> String {
        let _one = self.scraping.lock().unwrap_or_else(|p| p.into_inner());
        for vec in [
            &self.link_up,
            &self.owner,
            &self.epoch,
            &self.modules,
            &self.modules_connected,
        ] {
            vec.reset();
        }
        for edge in &state.edges {
            let id = edge["id"].as_str().unwrap_or_default();
            self.link_up
                .with_label_values(&[id])
                .set(i64::from(edge["online"] == true));
            let owner = edge["owner"].as_str().unwrap_or("edge");
            for side in ["edge", "master"] {
                self.owner
                    .with_label_values(&[id, side])
                    .set(i64::from(owner == side));
            }
            let epoch = edge["epoch"].as_u64().unwrap_or(0);
            self.epoch
                .with_label_values(&[id])
                .set(i64::try_from(epoch).unwrap_or(i64::MAX));
        }
        self.model_version
            .set(i64::try_from(state.model_version).unwrap_or(i64::MAX));
        for (location, connected) in &state.modules {
            self.modules.with_label_values(&[location.as_str()]).inc();
            if *connected == Some(true) {
                self.modules_connected
                    .with_label_values(&[location.as_str()])
                    .inc();
            } else {
                // Present (at 0) for every location with modules.
                self.modules_connected
                    .with_label_values(&[location.as_str()])
                    .add(0);
            }
        }
        let mut text = Vec::new();
        // Encoding our own metric families into a Vec cannot fail.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut text);
        String::from_utf8(text).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::Owner;
    use serde_json::json;

    fn sample(text: &str, name_and_labels: &str) -> Option<f64> {
        text.lines()
            .find_map(|line| line.strip_prefix(name_and_labels)?.trim().parse().ok())
    }

    #[test]
    fn states_are_read_at_each_scrape_and_events_add_up() {
        let metrics = Metrics::new();
        let mut state = State {
            edges: vec![json!({"id": "site-1", "online": true, "owner": "edge", "epoch": 2})],
            model_version: 7,
            modules: vec![
                ("edge:site-1".into(), Some(true)),
                ("edge:site-1".into(), None),
                ("master".into(), Some(false)),
            ],
        };
        metrics.observe_exec(Some("edge:site-1"), true, Duration::from_millis(3));
        metrics.observe_exec(None, false, Duration::from_millis(1));
        metrics.rtt_sink("site-1")(Duration::from_micros(400));
        let text = metrics.render(&state);
        assert_eq!(sample(&text, "tether_link_up{edge=\"site-1\"}"), Some(1.0));
        assert_eq!(
            sample(&text, "tether_edge_owner{edge=\"site-1\",owner=\"edge\"}"),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, "tether_edge_owner{edge=\"site-1\",owner=\"master\"}"),
            Some(0.0)
        );
        assert_eq!(sample(&text, "tether_model_version"), Some(7.0));
        assert_eq!(
            sample(&text, "tether_modules_running{location=\"edge:site-1\"}"),
            Some(2.0)
        );
        assert_eq!(
            sample(&text, "tether_modules_connected{location=\"edge:site-1\"}"),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, "tether_modules_connected{location=\"master\"}"),
            Some(0.0)
        );
        assert_eq!(
            sample(&text, "tether_exec_total{result=\"ok\",side=\"edge\"}"),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, "tether_exec_total{result=\"error\",side=\"none\"}"),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, "tether_link_rtt_seconds_count{edge=\"site-1\"}"),
            Some(1.0)
        );

        // The edge goes away and the master takes over: the next scrape says so.
        metrics.observe_audit(&AuditRecord {
            time_ms: 0,
            edge: "site-1".into(),
            from: Owner::Edge,
            to: Owner::Master,
            epoch: crate::identity::Epoch(3),
            reason: "failover".into(),
            code: None,
        });
        state.edges = vec![json!({"id": "site-1", "online": false, "owner": "master", "epoch": 3})];
        let text = metrics.render(&state);
        assert_eq!(sample(&text, "tether_link_up{edge=\"site-1\"}"), Some(0.0));
        assert_eq!(
            sample(&text, "tether_edge_owner{edge=\"site-1\",owner=\"master\"}"),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, "tether_edge_epoch{edge=\"site-1\"}"),
            Some(3.0)
        );
        assert_eq!(
            sample(
                &text,
                "tether_takeovers_total{edge=\"site-1\",to=\"master\"}"
            ),
            Some(1.0)
        );
    }
}
