//! The fault campaign: a master, two edges (each link through a [`FaultProxy`]) and a
//! projector simulator per edge, under a client that keeps writing the data model and
//! running methods, while faults chosen at random from a printed seed hit them one after
//! another: SIGKILL or SIGSTOP of a server, a cut, slowed or reset link, or a flood of
//! connections that never authenticate against both of the master's ports.
//!
//! What it checks, and where the evidence comes from:
//! - no data-model write that got a 2xx is lost: each write raises a per-system counter, so
//!   the master's value may never fall below the last acknowledged one (checked after each
//!   master restart), and at the end it must be the last acknowledged write or one whose
//!   answer never came (such a write may land late, even after later ones);
//! - every replica converges to the master's slice once the faults stop;
//! - epochs only grow: every side's view of every edge's epoch, sampled all along;
//! - two sides ran the same edge's modules only within a link fault: the simulators log
//!   each device session with its time, and an interval with two sessions open at once
//!   must begin after a fault touching that edge began and end within [`GRACE`] of its end.
//!   Each such interval's length is reported. A flood touches no edge's link: no edge may
//!   lose its link to one, so two sessions during a flood are a violation.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use tether_common::link::tls;

use crate::api::ApiClient;
use crate::cluster::{Cluster, ClusterSpec};
use crate::flood::{Flood, FloodKind};
use crate::sim::Sim;
use crate::wait_for;

/// The edges' failover timeout in the campaign.
pub const TIMEOUT_MS: u64 = 2000;
/// How long after a fault ends two sides may still both run an edge's modules: the edge
/// reconnects within one period (3 s, plus up to a sixth of jitter after a failed
/// attempt), authenticates, and the side that must let go stops its modules.
pub const GRACE: Duration = Duration::from_millis(6000);

/// What to run.
#[derive(Debug, Clone, Copy)]
pub struct CampaignSpec {
    /// Faults, one after another.
    pub faults: usize,
    /// The random seed of the fault sequence.
    pub seed: u64,
}

impl CampaignSpec {
    /// `TETHER_CAMPAIGN_FAULTS` (else `faults`) and `TETHER_CAMPAIGN_SEED` (else random).
    pub fn from_env(faults: usize) -> CampaignSpec {
        let number = |name: &str| std::env::var(name).ok().and_then(|v| v.parse().ok());
        CampaignSpec {
            faults: number("TETHER_CAMPAIGN_FAULTS")
                .map(|n: u64| n as usize)
                .unwrap_or(faults),
            seed: number("TETHER_CAMPAIGN_SEED").unwrap_or_else(rand::random),
        }
    }
}

/// The kinds of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    KillMaster,
    FreezeMaster,
    KillEdge,
    FreezeEdge,
    CutLink,
    SlowLink,
    ResetLink,
    Flood,
}

const KINDS: [Kind; 8] = [
    Kind::KillMaster,
    Kind::FreezeMaster,
    Kind::KillEdge,
    Kind::FreezeEdge,
    Kind::CutLink,
    Kind::SlowLink,
    Kind::ResetLink,
    Kind::Flood,
];

/// Connections of each kind (idle TCP, silent TLS) a flood fault opens on each port.
const FLOOD_CONNECTIONS: usize = 1_000;

/// One fault as applied: which edges' links it touched, and when.
#[derive(Debug, Clone)]
struct Fault {
    kind: Kind,
    /// The edge (index) for edge and link faults; `None` for the master.
    edge: Option<usize>,
    start: SystemTime,
    end: SystemTime,
}

impl Fault {
    fn touches(&self, edge: usize) -> bool {
        self.kind != Kind::Flood && self.edge.is_none_or(|e| e == edge)
    }
}

/// One data-model write and how it ended.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Write {
    pub(crate) system: usize,
    pub(crate) n: u64,
    /// `Some(true)`: 2xx; `Some(false)`: refused (4xx); `None`: no answer or a 5xx, so
    /// it may or may not have been applied.
    pub(crate) acked: Option<bool>,
}

/// What the client saw; shared with its tasks.
#[derive(Default)]
struct Observed {
    writes: Vec<Write>,
    execs: BTreeMap<String, u64>,
    /// (observer, edge) → highest epoch seen.
    epochs: HashMap<(String, String), u64>,
    epoch_samples: u64,
    violations: Vec<String>,
}

/// Two device sessions of one simulator open at once.
#[derive(Debug, Clone)]
pub struct Dual {
    /// The simulator's index (an edge's, in this campaign).
    pub edge: usize,
    /// When the second session opened.
    pub start: SystemTime,
    /// When one of them closed.
    pub end: SystemTime,
}

/// Runs the campaign; prints its report; panics listing every violation.
pub async fn run(spec: CampaignSpec) {
    eprintln!(
        "fault campaign: seed {} with {} faults (TETHER_CAMPAIGN_SEED={} replays the sequence)",
        spec.seed, spec.faults, spec.seed
    );
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let sims = [projector(), projector()];
    let mut cluster = start_cluster(&sims).await;
    let observed = Arc::new(Mutex::new(Observed::default()));
    let running = Arc::new(AtomicBool::new(true));
    let tasks = vec![
        tokio::spawn(keep_writing(
            vec![client(&cluster, None)],
            {
                let observed = observed.clone();
                move |write| observed.lock().unwrap().writes.push(write)
            },
            running.clone(),
        )),
        tokio::spawn(keep_executing(
            [
                client(&cluster, None),
                client(&cluster, Some(0)),
                client(&cluster, Some(1)),
            ],
            observed.clone(),
            running.clone(),
        )),
        tokio::spawn(keep_sampling_epochs(
            [
                client(&cluster, None),
                client(&cluster, Some(0)),
                client(&cluster, Some(1)),
            ],
            observed.clone(),
            running.clone(),
        )),
    ];

    let began = Instant::now();
    let mut faults = Vec::new();
    for number in 1..=spec.faults {
        let fault = inflict(&mut cluster, &mut rng, &observed).await;
        eprintln!(
            "fault {number}/{} at {}: {:?}{} for {} ms",
            spec.faults,
            humantime::format_rfc3339_millis(fault.start),
            fault.kind,
            fault
                .edge
                .map(|e| format!(" site-{}", e + 1))
                .unwrap_or_default(),
            fault
                .end
                .duration_since(fault.start)
                .unwrap_or_default()
                .as_millis()
        );
        faults.push(fault);
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..2500))).await;
    }
    let faulted = began.elapsed();

    // Settle: every link up, both sides agreeing on each edge's control, every replica
    // equal to its slice, with the client still writing; then stop the client and check
    // the last writes reached everyone.
    let settle = Instant::now();
    for edge in ["site-1", "site-2"] {
        cluster
            .wait_edge_online(edge, true, Duration::from_secs(30))
            .await;
    }
    for index in 0..2 {
        wait_agreement(&cluster, index).await;
    }
    running.store(false, Ordering::SeqCst);
    for task in tasks {
        let _ = task.await;
    }
    for index in 0..2 {
        cluster
            .wait_replica_in_sync(index, Duration::from_secs(30))
            .await;
    }
    let settled = settle.elapsed();
    check_final_writes(&cluster, &observed).await;

    let duals: Vec<Dual> = (0..2).flat_map(|e| dual_sessions(&sims[e], e)).collect();
    check_duals(&duals, &faults, &observed);
    let report = report(spec, &faults, &duals, &observed, faulted, settled);
    eprintln!("{report}");
    let violations = observed.lock().unwrap().violations.clone();
    assert!(
        violations.is_empty(),
        "the campaign (seed {}) found {} violation(s):\n{}",
        spec.seed,
        violations.len(),
        violations.join("\n")
    );
}

fn projector() -> Sim {
    // Room for the sessions of both sides (and a frozen one), so that an overlap shows
    // in the log instead of being refused.
    Sim::start(&[
        "projector",
        "--listen",
        "127.0.0.1:0",
        "--max-sessions",
        "4",
    ])
}

async fn start_cluster(sims: &[Sim; 2]) -> Cluster {
    let mut site = format!(
        "[[repositories]]\nid = \"core\"\npath = \"{}\"\n\n\
         [[drivers]]\nid = \"projector\"\nrepository = \"core\"\nfile = \"projector.rhai\"\n\
         delimiter = \"\\r\"\ndefault_settings = {{ poll_ms = 500 }}\n\n",
        crate::CORE
    );
    for (i, sim) in sims.iter().enumerate() {
        let n = i + 1;
        let _ = write!(
            site,
            "[[modules]]\nid = \"proj-{n}\"\ndriver = \"projector\"\nname = \"Display\"\n\
             host = \"127.0.0.1\"\nport = {}\nedge = \"site-{n}\"\n\n\
             [[systems]]\nid = \"room-{n}\"\nname = \"Room {n}\"\nedge = \"site-{n}\"\n\
             modules = [\"proj-{n}\"]\n\n",
            sim.port()
        );
    }
    let mut spec = ClusterSpec::edges(2);
    spec.proxied = true;
    spec.boot_wait_ms = 6000;
    spec.edge_settings = format!("failover = true\ntimeout_ms = {TIMEOUT_MS}\nstandby = \"cold\"");
    spec.site_extra = site;
    let cluster = Cluster::start(spec).await;
    for index in 0..2 {
        cluster.wait_edge_api_up(index).await;
        let edge = cluster.edge_admin(index);
        let system = format!("room-{}", index + 1);
        wait_for(
            "the edge running its display",
            Duration::from_secs(15),
            || async {
                let (status, body) = edge
                    .exec(&system, "Display", 1, "power", json!([false]))
                    .await;
                (status == 200).then_some(body)
            },
        )
        .await;
    }
    cluster
}

/// A client of the master (`None`) or of an edge, giving up on a request after 2 s.
fn client(cluster: &Cluster, edge: Option<usize>) -> ApiClient {
    let admin = match edge {
        None => cluster.master_api(),
        Some(index) => cluster.edge_admin(index),
    };
    ApiClient::with_timeout(
        admin.base(),
        &cluster.ca(),
        admin.token(),
        Duration::from_secs(2),
    )
}

/// Applies one random fault, waits its random length, and lifts it.
async fn inflict(cluster: &mut Cluster, rng: &mut StdRng, observed: &Mutex<Observed>) -> Fault {
    let kind = KINDS[rng.random_range(0..KINDS.len())];
    let edge = match kind {
        Kind::KillMaster | Kind::FreezeMaster | Kind::Flood => None,
        _ => Some(rng.random_range(0..2)),
    };
    // Some shorter than the failover timeout, some well beyond it.
    let length = Duration::from_millis(rng.random_range(300..6000));
    let start = SystemTime::now();
    match (kind, edge) {
        (Kind::KillMaster, _) => {
            let acked = last_acked(observed);
            cluster.master.kill();
            tokio::time::sleep(length).await;
            cluster.master.restart();
            // The master's data after the kill holds every write acknowledged before it.
            cluster.wait_master_up().await;
            check_writes_kept(cluster, observed, acked).await;
        }
        (Kind::FreezeMaster, _) => {
            cluster.master.freeze();
            tokio::time::sleep(length).await;
            cluster.master.thaw();
        }
        (Kind::KillEdge, Some(e)) => {
            cluster.edges[e].kill();
            tokio::time::sleep(length).await;
            cluster.edges[e].restart();
        }
        (Kind::FreezeEdge, Some(e)) => {
            cluster.edges[e].freeze();
            tokio::time::sleep(length).await;
            cluster.edges[e].thaw();
        }
        (Kind::CutLink, Some(e)) => {
            cluster.proxies[e].cut();
            tokio::time::sleep(length).await;
            cluster.proxies[e].heal();
        }
        (Kind::SlowLink, Some(e)) => {
            let delay = rng.random_range(50..1500);
            cluster.proxies[e].delay(Duration::from_millis(delay));
            tokio::time::sleep(length).await;
            cluster.proxies[e].delay(Duration::ZERO);
        }
        (Kind::ResetLink, Some(e)) => {
            cluster.proxies[e].reset();
        }
        (Kind::Flood, _) => {
            let floods = floods(cluster);
            tokio::time::sleep(length).await;
            drop(floods);
        }
        _ => unreachable!("edge faults name an edge"),
    }
    Fault {
        kind,
        edge,
        start,
        end: SystemTime::now(),
    }
}

/// Idle TCP and silent TLS connections against both of the master's ports (the silent
/// TLS ones on the link port with a stolen edge certificate, without its secret).
fn floods(cluster: &Cluster) -> Vec<Flood> {
    let certs = cluster.path("certs");
    let link_tls = tls::client_config(
        &cluster.ca(),
        Some((&certs.join("site-1.pem"), &certs.join("site-1.key"))),
    )
    .expect("site-1's certificate");
    let api_tls = Arc::new(tls::api_client_config(&cluster.ca()).expect("the CA"));
    vec![
        Flood::start(cluster.link_addr, FLOOD_CONNECTIONS, FloodKind::IdleTcp),
        Flood::start(
            cluster.link_addr,
            FLOOD_CONNECTIONS,
            FloodKind::SilentTls(link_tls),
        ),
        Flood::start(cluster.api_addr, FLOOD_CONNECTIONS, FloodKind::IdleTcp),
        Flood::start(
            cluster.api_addr,
            FLOOD_CONNECTIONS,
            FloodKind::SilentTls(api_tls),
        ),
    ]
}

/// Room `index`'s record with the campaign's counter at `n`.
pub fn system_record(index: usize, n: u64) -> Value {
    let i = index + 1;
    json!({"id": format!("room-{i}"), "name": format!("Room {i}"), "edge": format!("site-{i}"),
           "modules": [format!("proj-{i}")], "settings": {"campaign": n}})
}

/// Writes each room's counter in turn (through each of `via` in turn), telling `record`
/// how each write ended.
pub(crate) async fn keep_writing(
    via: Vec<ApiClient>,
    record: impl Fn(Write) + Send + 'static,
    running: Arc<AtomicBool>,
) {
    let mut n = 0u64;
    while running.load(Ordering::SeqCst) {
        n += 1;
        let system = (n % 2) as usize;
        let through = &via[(n as usize / 2) % via.len()];
        let path = format!("/api/v1/systems/room-{}", system + 1);
        let (status, _) = through.put(&path, system_record(system, n)).await;
        let acked = match status {
            200..=299 => Some(true),
            400..=499 => Some(false),
            _ => None,
        };
        record(Write { system, n, acked });
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
}

async fn keep_executing(
    clients: [ApiClient; 3],
    observed: Arc<Mutex<Observed>>,
    running: Arc<AtomicBool>,
) {
    let mut round = 0u64;
    while running.load(Ordering::SeqCst) {
        round += 1;
        // Through the master to either room, and through each edge to its own.
        let (via, system) = match round % 4 {
            0 => (0, 0),
            1 => (0, 1),
            2 => (1, 0),
            _ => (2, 1),
        };
        let system = format!("room-{}", system + 1);
        let (status, body) = clients[via]
            .exec(
                &system,
                "Display",
                1,
                "power",
                json!([round.is_multiple_of(3)]),
            )
            .await;
        let outcome = exec_outcome(status, &body);
        *observed.lock().unwrap().execs.entry(outcome).or_default() += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn keep_sampling_epochs(
    clients: [ApiClient; 3],
    observed: Arc<Mutex<Observed>>,
    running: Arc<AtomicBool>,
) {
    let names = ["master", "site-1", "site-2"];
    while running.load(Ordering::SeqCst) {
        for (client, observer) in clients.iter().zip(names) {
            let (status, edges) = client.get("/api/v1/edges").await;
            if status != 200 {
                continue;
            }
            let mut observed = observed.lock().unwrap();
            observed.epoch_samples += 1;
            let Observed {
                epochs, violations, ..
            } = &mut *observed;
            note_epochs(epochs, violations, observer, &edges);
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

/// Takes `observer`'s `GET /api/v1/edges` answer into the highest epochs seen, adding a
/// violation for any that fell.
pub fn note_epochs(
    epochs: &mut HashMap<(String, String), u64>,
    violations: &mut Vec<String>,
    observer: &str,
    edges: &Value,
) {
    for edge in edges.as_array().into_iter().flatten() {
        let (Some(id), Some(epoch)) = (edge["id"].as_str(), edge["epoch"].as_u64()) else {
            continue;
        };
        let highest = epochs
            .entry((observer.to_string(), id.to_string()))
            .or_insert(epoch);
        if epoch < *highest {
            violations.push(format!(
                "{observer} showed {id}'s epoch {epoch} after {highest}"
            ));
        } else {
            *highest = epoch;
        }
    }
}

/// An exec's answer as the report counts it.
pub fn exec_outcome(status: u16, body: &Value) -> String {
    match (status, body["executed_by"].as_str()) {
        (200, Some(by)) => format!("ok, run by {}", by.split(':').next().unwrap_or(by)),
        (0, _) => "no answer".to_string(),
        (status, _) => format!("error {status}"),
    }
}

/// Per system, the counter of the last acknowledged write so far.
fn last_acked(observed: &Mutex<Observed>) -> [u64; 2] {
    let mut last = [0; 2];
    for write in &observed.lock().unwrap().writes {
        if write.acked == Some(true) {
            last[write.system] = write.n;
        }
    }
    last
}

/// The counter each system holds on the master now.
async fn counters(cluster: &Cluster) -> [Option<u64>; 2] {
    let master = cluster.master_api();
    let mut values = [None; 2];
    for (index, value) in values.iter_mut().enumerate() {
        let (_, record) = master
            .get(&format!("/api/v1/systems/room-{}", index + 1))
            .await;
        *value = record["settings"]["campaign"].as_u64();
    }
    values
}

async fn check_writes_kept(cluster: &Cluster, observed: &Mutex<Observed>, acked: [u64; 2]) {
    let now = counters(cluster).await;
    let mut observed = observed.lock().unwrap();
    for (index, held) in now.iter().enumerate() {
        // Later writes raise the counter; a write that got no answer may land at any time.
        let kept = match held {
            Some(n) => *n >= acked[index] || unanswered(&observed, index).contains(n),
            None => acked[index] == 0,
        };
        if !kept {
            observed.violations.push(format!(
                "room-{} holds {held:?} after a master restart; write {} had been acknowledged",
                index + 1,
                acked[index]
            ));
        }
    }
}

/// The writes of system `index` whose answer never came: each may have been applied,
/// even after later ones (a frozen master reads a request its client gave up on).
fn unanswered(observed: &Observed, index: usize) -> Vec<u64> {
    observed
        .writes
        .iter()
        .filter(|w| w.system == index && w.acked.is_none())
        .map(|w| w.n)
        .collect()
}

/// With the client stopped, each system holds its last acknowledged write, or a write
/// whose answer never came; never an older acknowledged one (a lost write).
async fn check_final_writes(cluster: &Cluster, observed: &Mutex<Observed>) {
    let now = counters(cluster).await;
    let mut observed = observed.lock().unwrap();
    for (index, held) in now.iter().enumerate() {
        let last_acked = observed
            .writes
            .iter()
            .filter(|w| w.system == index && w.acked == Some(true))
            .map(|w| w.n)
            .next_back();
        let unanswered = unanswered(&observed, index);
        let ok = match held {
            Some(n) => Some(*n) == last_acked || unanswered.contains(n),
            None => last_acked.is_none(),
        };
        if !ok {
            observed.violations.push(format!(
                "room-{} holds {held:?} at the end; the last acknowledged write was {last_acked:?}",
                index + 1
            ));
        }
    }
}

/// Waits until the master and edge `index` show the same owner and epoch for it.
async fn wait_agreement(cluster: &Cluster, index: usize) {
    let id = cluster.spec.edges[index].clone();
    let (master, edge) = (cluster.master_api(), cluster.edge_admin(index));
    wait_for(
        &format!("master and {id} agreeing on its control"),
        Duration::from_secs(30),
        || async {
            let a = master.edge(&id).await?;
            let b = edge.edge(&id).await?;
            (a["owner"] == b["owner"] && a["epoch"] == b["epoch"]).then_some(())
        },
    )
    .await;
}

/// Intervals in which a simulator had two or more sessions open.
pub fn dual_sessions(sim: &Sim, edge: usize) -> Vec<Dual> {
    let mut open = 0usize;
    let mut since = None;
    let mut duals = Vec::new();
    for event in sim.events() {
        let Some(time) = event["time"]
            .as_str()
            .and_then(|t| humantime::parse_rfc3339(t).ok())
        else {
            continue;
        };
        match event["event"].as_str() {
            Some("connect") => {
                open += 1;
                if open == 2 {
                    since = Some(time);
                }
            }
            Some("disconnect") => {
                open = open.saturating_sub(1);
                if open == 1
                    && let Some(start) = since.take()
                {
                    duals.push(Dual {
                        edge,
                        start,
                        end: time,
                    });
                }
            }
            _ => {}
        }
    }
    if let Some(start) = since {
        // Still open at the end: measured up to now, and outside any fault.
        duals.push(Dual {
            edge,
            start,
            end: SystemTime::now() + GRACE * 100,
        });
    }
    duals
}

/// The spans in which edge `edge`'s link was faulted: its faults' intervals, merged where
/// one begins before the previous one's grace has run out (a second fault while the
/// first is still being recovered from).
fn fault_spans(faults: &[Fault], edge: usize) -> Vec<(SystemTime, SystemTime)> {
    let mut spans: Vec<(SystemTime, SystemTime)> = Vec::new();
    for fault in faults.iter().filter(|f| f.touches(edge)) {
        match spans.last_mut() {
            Some(last) if fault.start <= last.1 + GRACE => last.1 = last.1.max(fault.end),
            _ => spans.push((fault.start, fault.end)),
        }
    }
    spans
}

/// The faulted span of `dual`'s edge that holds its start, if any.
fn span_of(dual: &Dual, faults: &[Fault]) -> Option<(SystemTime, SystemTime)> {
    fault_spans(faults, dual.edge)
        .into_iter()
        .find(|span| span.0 <= dual.start && dual.start <= span.1 + GRACE)
}

/// Every dual interval lies within a faulted span of its edge's link, plus [`GRACE`].
fn check_duals(duals: &[Dual], faults: &[Fault], observed: &Mutex<Observed>) {
    for dual in duals {
        let within = span_of(dual, faults).is_some_and(|span| dual.end <= span.1 + GRACE);
        if !within {
            observed.lock().unwrap().violations.push(format!(
                "site-{}: two device sessions from {} for {} ms, not within a fault of its link and {} ms after",
                dual.edge + 1,
                humantime::format_rfc3339_millis(dual.start),
                millis(dual.end.duration_since(dual.start).unwrap_or_default()),
                GRACE.as_millis()
            ));
        }
    }
}

fn millis(d: Duration) -> u128 {
    d.as_millis()
}

fn report(
    spec: CampaignSpec,
    faults: &[Fault],
    duals: &[Dual],
    observed: &Mutex<Observed>,
    faulted: Duration,
    settled: Duration,
) -> String {
    let observed = observed.lock().unwrap();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "== fault campaign report: seed {}, {} faults in {} s, settled {} ms after the last",
        spec.seed,
        faults.len(),
        faulted.as_secs(),
        settled.as_millis()
    );
    let mut kinds: BTreeMap<Kind, usize> = BTreeMap::new();
    for fault in faults {
        *kinds.entry(fault.kind).or_default() += 1;
    }
    let _ = writeln!(out, "faults: {kinds:?}");
    let count = |f: fn(&Write) -> bool| observed.writes.iter().filter(|w| f(w)).count();
    let _ = writeln!(
        out,
        "model writes: {} acknowledged, {} refused, {} without an answer",
        count(|w| w.acked == Some(true)),
        count(|w| w.acked == Some(false)),
        count(|w| w.acked.is_none())
    );
    let _ = writeln!(out, "method calls: {:?}", observed.execs);
    let mut epochs: Vec<_> = observed.epochs.iter().collect();
    epochs.sort();
    let _ = writeln!(
        out,
        "epochs: {} samples; highest seen {:?}",
        observed.epoch_samples, epochs
    );
    let _ = writeln!(out, "two sides at once: {} interval(s)", duals.len());
    for dual in duals {
        let touching = || faults.iter().filter(|f| f.touches(dual.edge));
        let cause = touching().rfind(|f| f.start <= dual.start);
        // After the last fault that began before it ended: 0 when it ended during one.
        let overhang = touching()
            .filter(|f| f.start <= dual.end)
            .map(|f| f.end)
            .max()
            .and_then(|end| dual.end.duration_since(end).ok())
            .map(millis)
            .unwrap_or(0);
        let _ = writeln!(
            out,
            "  site-{}: {} ms, begun in {:?}, ended {} ms after the last fault on its link",
            dual.edge + 1,
            millis(dual.end.duration_since(dual.start).unwrap_or_default()),
            cause.map(|f| f.kind),
            overhang
        );
    }
    let _ = writeln!(out, "violations: {}", observed.violations.len());
    out
}
