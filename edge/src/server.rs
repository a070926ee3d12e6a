//! Starting an edge: configuration, certificates, its API, and the link to the master.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use tether_common::api::{
    Access, AdminToken, ApiLimits, Health, Live, health, live_routes, module_routes, protect,
    serve_https, system_routes,
};
use tether_common::link::{ConnectorConfig, LinkEvent, RttObserver, Secret, maintain_link, tls};
use tether_common::pki;
use tether_common::runtime::{Executor, Runtime, ScriptLimits};
use tether_config::EdgeConfig;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::control::EdgeControl;
use crate::proxy::EdgeLinks;
use crate::replica::Replica;
use tether_common::control::{EdgeEvent, EdgeId, EdgeTiming, NodeId};
use tether_common::proxy::LinkRemote;
use tether_common::shutdown::StopOn;

/// The numbers behind the edge's takeover, from its configuration.
fn timing(config: &EdgeConfig) -> EdgeTiming {
    EdgeTiming {
        heartbeat_ms: config.heartbeat_ms,
        reconnect_ms: config.reconnect_ms,
        handshake_timeout_ms: config.handshake_timeout_ms,
        masters: config.master_addrs().len() as u64,
    }
}

/// Runs the edge until `stop` says so.
pub fn run(config_path: &Path, stop: StopOn) -> anyhow::Result<()> {
    let config = EdgeConfig::load(config_path)?;
    tls::install_crypto_provider();
    // A site pair's node links (to the master and its peer) as itself.
    let link_id = config
        .pair
        .as_ref()
        .map_or(config.edge_id.clone(), |pair| pair.node_id.clone());
    if config.tls.create_dev_certs {
        let [link, mut api] = pki::edge_leaves(&link_id, &config.tls.cert, &config.tls.key);
        (api.cert, api.key) = (config.tls.api_cert.clone(), config.tls.api_key.clone());
        for path in pki::ensure(
            &config.tls.ca,
            &[link, api],
            std::slice::from_ref(&config.secret_file),
        )? {
            tracing::info!("created development file {}", path.display());
        }
    }
    let secret = Secret::load(&config.secret_file)?;
    let timing = timing(&config);
    let connector = ConnectorConfig {
        // In the order of this edge's rendezvous hash: edges spread over the masters.
        master_addrs: tether_common::control::placement::rendezvous_order(
            &config.edge_id,
            &config.master_addrs(),
        )
        .into_iter()
        .cloned()
        .collect(),
        server_name: tls::server_name(&config.master_name)?,
        tls: tls::client_config(&config.tls.ca, Some((&config.tls.cert, &config.tls.key)))?,
        edge_id: EdgeId::new(link_id.clone()),
        secret,
        handshake_timeout: Duration::from_millis(timing.handshake_timeout_ms),
        reconnect: Duration::from_millis(timing.reconnect_ms),
        link: timing.link_config(config.max_frame_bytes as usize),
    };
    let api_tls = tls::server_config(&config.tls.api_cert, &config.tls.api_key, None)?;
    let peer = match &config.pair {
        Some(pair) => Some(peer_links(&config, pair, &connector)?),
        None => None,
    };
    // Everything is checked; only now write to the data folder.
    tether_common::store::create_data_dir(&config.data_dir)
        .with_context(|| format!("cannot create data_dir {}", config.data_dir.display()))?;
    let token = Arc::new(AdminToken::load_or_create(&config.data_dir)?);
    let replica = Arc::new(
        Replica::open(&config.data_dir, &config.edge_id).map_err(|err| {
            let text = err.to_string();
            if text.contains("already open") {
                anyhow::anyhow!("{text}: is an edge running with this data_dir? Stop it first")
            } else {
                anyhow::anyhow!(text)
            }
        })?,
    );
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(serve(
        config, token, connector, api_tls, replica, peer, stop,
    ))
}

/// How a site pair's node reaches its peers, from its `[pair]` table: it listens for
/// those that connect to it (with its API certificate, asking for a client certificate
/// of the CA, which names the peer), and connects to the others (with its link
/// certificate), authenticating with the location's secret either way.
fn peer_links(
    config: &EdgeConfig,
    pair: &tether_config::EdgePair,
    connector: &ConnectorConfig,
) -> anyhow::Result<PeerSetup> {
    let secret = Secret::load(&pair.secret_file).with_context(|| {
        format!(
            "cannot read the pair's secret (pair.secret_file {})",
            pair.secret_file.display()
        )
    })?;
    let link = crate::pair::peer_link_config(config.heartbeat_ms, config.max_frame_bytes as usize);
    let peers = pair.peer_list();
    let listened_for: Vec<NodeId> = peers
        .iter()
        .filter(|peer| peer.addr.is_none())
        .map(|peer| NodeId::new(peer.id.clone()))
        .collect();
    let listen = match pair.peer_listen {
        Some(addr) if !listened_for.is_empty() => Some(PeerListen {
            addr,
            tls: tls::link_server_config(
                &config.tls.api_cert,
                &config.tls.api_key,
                Some(&config.tls.ca),
            )?,
            peers: listened_for,
            secret: secret.clone(),
            link: link.clone(),
        }),
        _ => None,
    };
    let mut connect = Vec::new();
    for peer in &peers {
        if let Some(addr) = &peer.addr {
            let connector = ConnectorConfig {
                master_addrs: vec![addr.clone()],
                server_name: tls::server_name(peer.name.as_deref().unwrap_or_default())?,
                secret: secret.clone(),
                link: link.clone(),
                ..connector.clone()
            };
            connect.push((NodeId::new(peer.id.clone()), connector));
        }
    }
    Ok(PeerSetup { listen, connect })
}

/// A site pair's peer links, checked before anything is written.
struct PeerSetup {
    /// Where it listens for the peers that connect to it.
    listen: Option<PeerListen>,
    /// One connector a peer it connects to.
    connect: Vec<(NodeId, ConnectorConfig)>,
}

struct PeerListen {
    addr: std::net::SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    peers: Vec<NodeId>,
    secret: Secret,
    link: tether_common::link::LinkConfig,
}

async fn serve(
    config: EdgeConfig,
    token: Arc<AdminToken>,
    mut connector: ConnectorConfig,
    api_tls: Arc<rustls::ServerConfig>,
    replica: Arc<Replica>,
    peer: Option<PeerSetup>,
    stop: StopOn,
) -> anyhow::Result<()> {
    let api_listener =
        tether_common::admission::bind_listener(config.api_listen).with_context(|| {
            format!(
                "cannot listen for the API on {} (api_listen)",
                config.api_listen
            )
        })?;
    let shutdown = CancellationToken::new();
    let health_state = Arc::new(Health {
        role: "edge",
        id: config.edge_id.clone(),
        booted: false.into(),
    });
    // A pair's node names itself in `executed_by`.
    let node = config
        .pair
        .as_ref()
        .map(|pair| NodeId::new(pair.node_id.clone()));
    let executor = node
        .clone()
        .map_or(EdgeId::new(config.edge_id.clone()), |n| {
            EdgeId::new(n.as_str())
        });
    let runtime = Runtime::new(Executor::Edge(executor), ScriptLimits::default());
    runtime.set_device_routes(config.device_routes());
    // Round trips to the master, in the metrics under this edge's id.
    let (metrics, edge_id) = (runtime.metrics().clone(), config.edge_id.clone());
    connector.link.on_rtt = Some(RttObserver(Arc::new(move |_| metrics.rtt_sink(&edge_id))));
    // The replica alone is enough to run: if the master cannot be reached, control
    // starts the modules from it after one more attempt.
    // A pair's node proves the witness's grants with its own secret.
    let node = match (node, &config.pair) {
        (Some(node), Some(pair)) => Some((
            node,
            pair.peer_list()
                .into_iter()
                .map(|peer| NodeId::new(peer.id))
                .collect(),
            Secret::load(&config.secret_file)?,
        )),
        _ => None,
    };
    let control = EdgeControl::start(
        &config.edge_id,
        node,
        replica.clone(),
        runtime.clone(),
        timing(&config),
    )?;
    // Every audit event to the [[alerts]] receivers, from the edge's own log: an edge cut
    // off from its master still alerts.
    tether_common::alerts::start(
        replica.store(),
        &config.alerts,
        &format!("edge:{}", config.edge_id),
        runtime.metrics().clone(),
    )?;
    // Calls for modules the edge does not run go to the master.
    let links = Arc::new(EdgeLinks::new(control.clone(), replica.clone()));
    runtime.set_remote(Arc::new(LinkRemote::new(links.clone())));

    // The admin token of this edge, and the users replicated from the master.
    let users = replica.clone();
    let access = Access::new(token, move || users.snapshot().0).forwarding_users();
    let overview = crate::api::EdgeOverview {
        control: control.clone(),
        replica: replica.clone(),
        edge_id: EdgeId::new(config.edge_id.clone()),
    };
    let live = Live::new(runtime.clone(), Arc::new(overview.clone()));
    let api_limits = ApiLimits::from_config(&config.limits);
    let routes = Router::new()
        .route("/api/v1/replica", get(replica_dump))
        .with_state(replica.clone())
        .merge(crate::api::control_routes(overview))
        .merge(system_routes(runtime.clone()))
        .merge(module_routes(runtime.clone()))
        .merge(live_routes(live));
    let protected = protect(routes, access, api_limits);
    let router = Router::new()
        .route("/api/v1/health", get(health))
        .with_state(health_state.clone())
        .merge(protected);
    tokio::spawn(serve_https(
        api_listener,
        api_tls,
        router,
        api_limits,
        shutdown.clone(),
    ));

    if config.pair.is_some() {
        tokio::spawn(crate::pair::count_devices(
            EdgeId::new(config.edge_id.clone()),
            replica.clone(),
            runtime.clone(),
            control.clone(),
        ));
    }
    if let Some(peer) = peer {
        let mut links = Vec::new();
        if let Some(listen) = peer.listen {
            let addr = listen.addr;
            let listener = tether_common::admission::bind_listener(addr).with_context(|| {
                format!("cannot listen for the pair's peers on {addr} (pair.peer_listen)")
            })?;
            links.push(crate::pair::PeerLink::Listen {
                listener,
                tls: listen.tls,
                config: peer_listener_config(&config, listen.link, listen.peers.len()),
                peers: listen.peers,
                secret: listen.secret,
            });
        }
        links.extend(
            peer.connect
                .into_iter()
                .map(|(id, connector)| crate::pair::PeerLink::Connect(id, connector)),
        );
        for how in links {
            tokio::spawn(crate::pair::run_peer_link(
                how,
                control.clone(),
                runtime.clone(),
                shutdown.clone(),
            ));
        }
    }
    let (events_tx, events_rx) = mpsc::channel(16);
    tokio::spawn(maintain_link(connector, events_tx, shutdown.clone()));
    tokio::spawn(follow_link(
        events_rx,
        MasterContext {
            replica: replica.clone(),
            control: control.clone(),
            runtime: runtime.clone(),
            links,
            api_url: config.public_api_url(),
        },
    ));

    health_state.booted.store(true, Ordering::Relaxed);
    let (_, at) = replica.snapshot();
    tracing::info!(
        edge = %config.edge_id,
        api = %config.api_listen,
        masters = %config.master_addrs().join(", "),
        replica_version = at.version,
        modules = runtime.running().len(),
        "edge booted"
    );
    tether_common::shutdown::wait(stop).await;
    tracing::info!("shutting down");
    shutdown.cancel();
    runtime.stop_all().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(())
}

/// The peer listener's settings: a few peers, so a few handshakes at once.
fn peer_listener_config(
    config: &EdgeConfig,
    link: tether_common::link::LinkConfig,
    peers: usize,
) -> tether_common::link::ListenerConfig {
    tether_common::link::ListenerConfig {
        handshake_timeout: Duration::from_millis(config.handshake_timeout_ms),
        first_byte_timeout: Duration::from_millis(config.limits.first_byte_timeout_ms),
        pending: tether_common::admission::AdmissionLimits {
            max_pending: 8,
            max_per_address: 4,
        },
        // A link a peer, and its replacement while the old one is found gone.
        max_links: 2 * peers,
        gauges: None,
        link,
    }
}

/// The replica: `{"model_id", "version", "records": {kind: {id: record}}}`.
async fn replica_dump(State(replica): State<Arc<Replica>>) -> Json<serde_json::Value> {
    let (model, at) = replica.snapshot();
    Json(serde_json::json!({
        "model_id": at.model_id.to_string(),
        "version": at.version,
        "records": model.dump_for_clients(),
    }))
}

/// What serving the link to the master needs.
#[derive(Clone)]
pub struct MasterContext {
    /// The local replica of the edge's slice.
    pub replica: Arc<Replica>,
    /// The edge's control.
    pub control: EdgeControl,
    /// The modules the edge runs, for the master's calls.
    pub runtime: Runtime,
    /// The link to the master, for proxying.
    pub links: Arc<EdgeLinks>,
    /// The edge's client API, announced to the master.
    pub api_url: String,
}

/// Serves each link to the master as it comes up, and tells control what the link does.
async fn follow_link(mut events: mpsc::Receiver<LinkEvent>, context: MasterContext) {
    while let Some(event) = events.recv().await {
        match event {
            LinkEvent::Up { link, incoming } => {
                context.links.set_link(Some(link.clone()));
                context
                    .control
                    .link_event(EdgeEvent::LinkUp, Some(link.clone()));
                tokio::spawn(crate::sync::serve_master(link, incoming, context.clone()));
            }
            LinkEvent::Down { .. } => {
                context.links.set_link(None);
                context.control.link_event(EdgeEvent::LinkDown, None)
            }
            LinkEvent::AttemptFailed { .. } => {
                context.control.link_event(EdgeEvent::AttemptFailed, None)
            }
        }
    }
}
