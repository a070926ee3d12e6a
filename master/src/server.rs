//! Starting the master: configuration, certificates, listeners, and the life of each
//! edge link.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use tether_common::admission::{AdmissionLimits, bind_listener};
use tether_common::api::{Access, AdminToken, ApiLimits, Health, serve_https};
use tether_common::link::{
    AuthenticatedEdge, ConnectionGauges, LinkConfig, ListenerConfig, RttObserver, run_listener, tls,
};
use tether_common::pki;
use tether_common::protocol::EntityKind;
use tether_common::runtime::{Executor, Runtime, ScriptLimits};
use tether_config::{MasterConfig, SiteFile};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::control::Control;
use crate::edges::EdgeRegistry;
use crate::model::ModelService;
use crate::proxy::MasterLinks;
use crate::repos::RepositoriesRoot;
use tether_common::control::{MasterEvent, MasterId};
use tether_common::proxy::LinkRemote;
use tether_common::shutdown::StopOn;

/// Runs the master until `stop` says so.
pub fn run(config_path: &Path, stop: StopOn) -> anyhow::Result<()> {
    let config = MasterConfig::load(config_path)?;
    let seed = config.seed.as_deref().map(SiteFile::load).transpose()?;
    tls::install_crypto_provider();
    if config.tls.create_dev_certs {
        let leaf = pki::Leaf {
            cert: config.tls.cert.clone(),
            key: config.tls.key.clone(),
            role: pki::Role::Master(pki::master_dev_names()),
        };
        let secrets: Vec<_> = seed
            .iter()
            .flat_map(|site| site.edges.iter().map(|e| e.secret_file.clone()))
            .collect();
        for path in pki::ensure(&config.tls.ca, &[leaf], &secrets)? {
            tracing::info!("created development file {}", path.display());
        }
    }
    let client_ca = config
        .tls
        .require_client_cert
        .then_some(config.tls.ca.as_path());
    let link_tls = tls::link_server_config(&config.tls.cert, &config.tls.key, client_ca)?;
    let api_tls = tls::server_config(&config.tls.cert, &config.tls.key, None)?;
    // Everything is checked; only now write to the data folder.
    tether_common::store::create_data_dir(&config.data_dir)
        .with_context(|| format!("cannot create data_dir {}", config.data_dir.display()))?;
    let root = repositories_root(&config, seed.as_ref())?;
    let token = Arc::new(AdminToken::load_or_create(&config.data_dir)?);

    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async {
        let (model, cluster) = open_model(&config).await?;
        if let Some(site) = &seed {
            seed_new_model(&model, site, &root).await.with_context(|| {
                format!(
                    "seed {}",
                    config.seed.as_deref().unwrap_or(Path::new("")).display()
                )
            })?;
        }
        serve(
            config_path,
            config,
            (model, cluster),
            token,
            (link_tls, api_tls),
            root,
            stop,
        )
        .await
    })
}

/// The repositories root of `config`, checked to hold none of the master's secrets: its
/// certificate, key and CA, the edges' secret files the site file names, its data folder.
pub fn repositories_root(
    config: &MasterConfig,
    site: Option<&SiteFile>,
) -> anyhow::Result<RepositoriesRoot> {
    let mut private: Vec<(&str, &Path)> = vec![
        ("certificate", &config.tls.cert),
        ("key", &config.tls.key),
        ("CA", &config.tls.ca),
        ("data folder", &config.data_dir),
    ];
    for edge in site.iter().flat_map(|site| &site.edges) {
        private.push(("edge secret", &edge.secret_file));
    }
    RepositoriesRoot::open(
        &config.repositories_root,
        &private,
        config.limits.repository_bytes,
    )
    .map_err(|err| anyhow::anyhow!(err))
}

/// Each heartbeat's round trip into the metrics, under the edge's id (the link's peer).
fn rtt_metrics(runtime: &Runtime) -> RttObserver {
    let metrics = runtime.metrics().clone();
    RttObserver(Arc::new(move |edge| metrics.rtt_sink(edge)))
}

/// Opens the model: the database in the data folder, or in a cluster the model in etcd
/// (with the connection to it).
pub async fn open_model(
    config: &MasterConfig,
) -> anyhow::Result<(Arc<ModelService>, Option<crate::cluster::Connected>)> {
    let cluster = crate::cluster::connect_if_configured(config).await?;
    let model = match &cluster {
        Some(connected) => connected.open_model(config).await?,
        None => {
            let (data_dir, limit) = (config.data_dir.clone(), config.change_log_limit);
            let opened = tokio::task::spawn_blocking(move || ModelService::open(&data_dir, limit))
                .await
                .context("the model's open task failed")?;
            Arc::new(opened.map_err(model_open_error)?)
        }
    };
    Ok((model, cluster))
}

/// A model that does not open, naming a master that holds its database already.
pub fn model_open_error(err: tether_common::store::StoreError) -> anyhow::Error {
    let text = err.to_string();
    if text.contains("already open") {
        anyhow::anyhow!("{text}: is a master running with this data_dir? Stop it first")
    } else {
        anyhow::anyhow!(text)
    }
}

/// A model that has never been written is seeded from the site file.
async fn seed_new_model(
    model: &ModelService,
    site: &SiteFile,
    root: &RepositoriesRoot,
) -> anyhow::Result<()> {
    let (_, version) = model.snapshot();
    if version > 0 {
        return Ok(());
    }
    let writes = crate::seed::site_writes(site, root)?;
    let changes = model
        .write(|_| Ok(writes.clone()))
        .await
        .context("the seed site file does not make a valid model")?;
    tracing::info!(
        changes = changes.len(),
        "seeded a new data model from the site file"
    );
    Ok(())
}

async fn serve(
    config_path: &Path,
    config: MasterConfig,
    (model, cluster): (Arc<ModelService>, Option<crate::cluster::Connected>),
    token: Arc<AdminToken>,
    (link_tls, api_tls): (Arc<rustls::ServerConfig>, Arc<rustls::ServerConfig>),
    root: RepositoriesRoot,
    stop: StopOn,
) -> anyhow::Result<()> {
    let link_listener = bind_listener(config.link_listen).with_context(|| {
        format!(
            "cannot listen for edge links on {} (link_listen)",
            config.link_listen
        )
    })?;
    let api_listener = bind_listener(config.api_listen).with_context(|| {
        format!(
            "cannot listen for the API on {} (api_listen)",
            config.api_listen
        )
    })?;

    let shutdown = CancellationToken::new();
    let base_dir = config_path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    // Boot, in DESIGN.md's order. Load edges and systems, and every module but the edges'.
    let registry = EdgeRegistry::new(base_dir.clone());
    // Among several masters, what one ran names it.
    let executor = Executor::Master(
        config
            .cluster
            .as_ref()
            .map(|c| MasterId::new(c.master_id.as_str())),
    );
    let runtime = Runtime::new(executor, ScriptLimits::default());
    // Every audit event of this master's own log to the [[alerts]] receivers.
    let name = config.cluster.as_ref().map_or(&config.id, |c| &c.master_id);
    tether_common::alerts::start(
        model.store(),
        &config.alerts,
        &format!("master:{name}"),
        runtime.metrics().clone(),
    )?;
    // In a cluster the grants, claims and link keys live in etcd.
    let cluster = match cluster {
        Some(connected) => Some(
            connected
                .join(&config, token.hash_hex(), model.store())
                .await?,
        ),
        None => None,
    };
    let grants: Arc<dyn tether_common::store::Grants> = match &cluster {
        Some(node) => node.grants.clone(),
        None => model.store(),
    };
    let hooks = cluster.as_ref().map(|node| node.hooks.clone());
    let control = Control::start(
        model.store(),
        grants,
        runtime.clone(),
        registry.clone(),
        hooks.clone(),
    )
    .await?;
    if let Some(hooks) = &hooks {
        tokio::spawn(close_links_without_lease(
            hooks.clone(),
            registry.clone(),
            control.clone(),
        ));
    }
    // Calls for modules the master does not run go to their edge.
    runtime.set_remote(Arc::new(LinkRemote::new(Arc::new(MasterLinks {
        registry: registry.clone(),
        control: control.clone(),
        model: model.clone(),
    }))));
    // The code before the model: the first reconcile already has the drivers' scripts.
    let shared_code = cluster.as_ref().map(|node| node.code.clone());
    let repos =
        crate::repos::Repositories::open(model.clone(), runtime.clone(), root, shared_code).await?;
    if cluster.is_some() {
        // Another master's pull or reset runs here too.
        tokio::spawn(repos.clone().follow_cluster());
    }
    if let Some(hooks) = &hooks {
        // A master of a cluster takes model writes only while it reaches etcd (its
        // lease held), as DESIGN.md asks: reads it keeps serving from memory.
        let inputs = hooks.inputs.clone();
        model.set_write_gate(Box::new(move || {
            let lease = inputs.borrow().lease;
            match lease.allows(tether_common::control::clock::mono_now()) {
                true => Ok(()),
                false => Err(
                    "etcd is out of reach of this master (no lease in the cluster): writes wait until it is back"
                        .into(),
                ),
            }
        }));
    }
    // Watched from before the first look, so that no write falls between the two.
    let versions = model.watch_version();
    let followed = follow_model(&model, &registry, &control);
    tokio::spawn(follow_model_changes(
        model.clone(),
        registry.clone(),
        control.clone(),
        (versions, followed),
    ));
    // One check of tokens for the API and for the calls edges forward for users.
    let access = {
        let model = model.clone();
        let access = Access::new(token, move || model.snapshot().0);
        match &hooks {
            // Among several masters, every master's admin token works on each.
            Some(hooks) => {
                let inputs = hooks.inputs.clone();
                access.with_other_admins(move || inputs.borrow().admins.clone())
            }
            None => access,
        }
    };
    let guard = Arc::new(crate::link_guard::LinkGuard::new(access.clone()));
    let health = Arc::new(Health {
        role: "master",
        id: config.id.clone(),
        booted: false.into(),
    });

    // Edges may connect from now on; while the master boots they keep their modules
    // (rule 3).
    let (accepted_tx, accepted_rx) = mpsc::channel(64);
    let listener_config = ListenerConfig {
        handshake_timeout: Duration::from_millis(config.handshake_timeout_ms),
        first_byte_timeout: Duration::from_millis(config.limits.first_byte_timeout_ms),
        pending: AdmissionLimits {
            max_pending: usize::try_from(config.limits.max_pending_handshakes)
                .unwrap_or(usize::MAX),
            max_per_address: usize::try_from(config.limits.pending_per_address)
                .unwrap_or(usize::MAX),
        },
        max_links: usize::try_from(config.limits.max_links).unwrap_or(usize::MAX),
        gauges: Some(ConnectionGauges {
            handshake: runtime.metrics().link_connections("handshake"),
            link: runtime.metrics().link_connections("link"),
        }),
        link: LinkConfig {
            on_rtt: Some(rtt_metrics(&runtime)),
            ..LinkConfig::with_heartbeat(
                Duration::from_millis(config.heartbeat_ms),
                config.max_frame_bytes as usize,
            )
        },
    };
    tokio::spawn(run_listener(
        link_listener,
        link_tls,
        registry.clone(),
        listener_config,
        accepted_tx,
        shutdown.clone(),
    ));
    tokio::spawn(attach_links(
        LinkContext {
            registry: registry.clone(),
            model: model.clone(),
            control: control.clone(),
            runtime: runtime.clone(),
            api_url: config.public_api_url(),
            repos: repos.clone(),
            guard,
        },
        hooks.clone(),
        accepted_rx,
    ));

    wait_for_edges(&registry, Duration::from_millis(config.boot_wait_ms)).await;
    // Take control of absent edges that had failed over before, tell the connected ones
    // the master is ready; then serve the API.
    control.booted();
    let forwarder = match &hooks {
        Some(hooks) => Some(Arc::new(crate::forward::Forwarder::new(
            hooks.inputs.clone(),
            model.clone(),
            tls::api_client_config(&config.tls.ca)?,
        )?)),
        None => None,
    };
    let state = crate::api::AppState {
        forwarder,
        lease_ages: cluster.as_ref().map(|node| node.lease_ages.clone()),
        shared_audit: cluster.as_ref().map(|node| node.audit.clone()),
        model: model.clone(),
        edges: registry.clone(),
        runtime: runtime.clone(),
        control: control.clone(),
        repos,
        me: (
            config
                .cluster
                .as_ref()
                .map_or(config.id.clone(), |c| c.master_id.clone()),
            config.public_api_url(),
        ),
    };
    let api_limits = ApiLimits::from_config(&config.limits);
    let router = crate::api::router(health.clone(), access, state, api_limits);
    tokio::spawn(serve_https(
        api_listener,
        api_tls,
        router,
        api_limits,
        shutdown.clone(),
    ));
    health.booted.store(true, Ordering::Relaxed);
    let (_, version) = model.snapshot();
    let (online, edges) = registry.connected();
    tracing::info!(
        api = %config.api_listen,
        link = %config.link_listen,
        edges,
        online,
        version,
        "master booted"
    );

    tether_common::shutdown::wait(stop).await;
    tracing::info!("shutting down");
    registry.close_all("the master is shutting down");
    shutdown.cancel();
    runtime.stop_all().await;
    // Let the links flush their close frames.
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(())
}

/// Applies the model to the edge registry and to control (which runs the modules of no
/// edge, and those of the edges it controls).
fn follow_model(model: &ModelService, registry: &EdgeRegistry, control: &Control) -> u64 {
    let (snapshot, version) = model.snapshot();
    // Control first: a new edge's unit exists before its link can be accepted.
    control.model_changed(snapshot.clone(), true);
    registry.sync(&snapshot.edges);
    version
}

/// What the edges' registry and the control units follow: the edge records, and (for a
/// cluster's units of no edge) where systems and modules are placed.
const PLACEMENT_KINDS: [EntityKind; 3] = [EntityKind::Edge, EntityKind::System, EntityKind::Module];

/// Follows every committed write after version `followed` (what [`follow_model`] saw;
/// `version` watched since before it): the registry and the units only when a write
/// touched what they follow, so that a change of a user does not make a master with
/// thousands of edges look at each of them.
async fn follow_model_changes(
    model: Arc<ModelService>,
    registry: Arc<EdgeRegistry>,
    control: Control,
    (mut version, mut followed): (watch::Receiver<u64>, u64),
) {
    while version.changed().await.is_ok() {
        let (snapshot, now) = model.snapshot();
        let placement_changed = model.changed_any_of(followed, now, &PLACEMENT_KINDS);
        control.model_changed(snapshot.clone(), placement_changed);
        if placement_changed {
            registry.sync(&snapshot.edges);
        }
        followed = now;
    }
}

/// The boot wait: until every edge of the model is connected, or `boot_wait` has passed.
async fn wait_for_edges(registry: &EdgeRegistry, boot_wait: Duration) {
    let deadline = tokio::time::Instant::now() + boot_wait;
    loop {
        let (online, all) = registry.connected();
        if online == all || tokio::time::Instant::now() >= deadline {
            tracing::info!(online, edges = all, "boot wait over");
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What serving an edge link needs.
#[derive(Clone)]
pub struct LinkContext {
    /// The edges and their links.
    pub registry: Arc<EdgeRegistry>,
    /// The data model.
    pub model: Arc<ModelService>,
    /// Who controls each edge location.
    pub control: Control,
    /// The modules the master runs, for the edges' calls.
    pub runtime: Runtime,
    /// The master's client API, announced to each edge.
    pub api_url: String,
    /// The driver repositories, whose commits each edge is kept on.
    pub repos: Arc<crate::repos::Repositories>,
    /// What an edge may ask over its link.
    pub guard: Arc<crate::link_guard::LinkGuard>,
}

/// A master of a cluster whose lease lapses closes its edges' links (and refuses new
/// ones, [`attach_links`]): the others cannot see a link it holds without a lease, and
/// would fail the edge over while it runs its rooms. The edges go to another master.
async fn close_links_without_lease(
    hooks: crate::control::ClusterHooks,
    registry: Arc<EdgeRegistry>,
    control: Control,
) {
    use tether_common::control::Lease;
    let mut inputs = hooks.inputs.clone();
    let mut closed = false;
    loop {
        let lease = inputs.borrow_and_update().lease;
        let now = tether_common::control::clock::mono_now();
        let wait = match lease {
            Lease::Until(until) if now < until => Some(Duration::from_millis(until.since(now))),
            Lease::Alone => None,
            _ => {
                if !closed {
                    tracing::warn!(
                        "no lease: closing every edge link, so that the edges find a master in the cluster"
                    );
                    registry.close_all("this master has no lease in the cluster");
                    // Whatever a unit's task waits for (etcd, slow to answer), its
                    // modules stop now.
                    control.fence().await;
                    closed = true;
                }
                None
            }
        };
        if wait.is_some() {
            closed = false;
        }
        let changed = match wait {
            Some(wait) => tokio::select! {
                changed = inputs.changed() => changed,
                _ = tokio::time::sleep(wait) => Ok(()),
            },
            None => inputs.changed().await,
        };
        if changed.is_err() {
            return;
        }
    }
}

/// Serves a site pair's node's link until it closes; its witness hears it come and go.
async fn serve_node(
    context: LinkContext,
    location: String,
    edge: AuthenticatedEdge,
    generation: u64,
) {
    let (control, registry) = (context.control.clone(), context.registry.clone());
    let node = edge.edge_id.clone();
    // Its pair may have moved to another witness since its handshake.
    if !registry.witnesses(&location) {
        edge.link
            .close("another master witnesses this node's site pair now");
        registry.detach(&node, generation, "not witnessed here");
        return;
    }
    let up = crate::control::NodeLinkEvent::Up;
    control.node_event(&location, &node, generation, up).await;
    crate::edge_link::serve_edge(
        tether_common::control::EdgeId::new(location.as_str()),
        Some(tether_common::control::NodeId::new(node.as_str())),
        generation,
        edge.link.clone(),
        edge.incoming,
        context,
    )
    .await;
    edge.link.closed().await;
    let reason = edge.link.close_reason().unwrap_or_default();
    if let Some(last_heard) = registry.detach(&node, generation, &reason) {
        let down = crate::control::NodeLinkEvent::Down { last_heard };
        control.node_event(&location, &node, generation, down).await;
    }
}

/// Registers each authenticated edge and serves what it sends until its link closes. In
/// a cluster a link is kept only while this master's lease allows and once its key is in
/// etcd (so that no other master fails the edge over).
async fn attach_links(
    context: LinkContext,
    cluster: Option<crate::control::ClusterHooks>,
    mut accepted: mpsc::Receiver<AuthenticatedEdge>,
) {
    while let Some(edge) = accepted.recv().await {
        let registry = context.registry.clone();
        let Some(generation) = registry.attach(&edge.edge_id, edge.link.clone(), edge.addr) else {
            // Its entry vanished between the secret lookup and now; nothing to attach to.
            edge.link.close("unknown edge");
            continue;
        };
        let context = context.clone();
        let cluster = cluster.clone();
        // A site pair's node: linked only to its pair's witness, which holds the pair's
        // link key (none of the node's own).
        if let Some(location) = registry.location_of(&edge.edge_id) {
            tokio::spawn(serve_node(context, location, edge, generation));
            continue;
        }
        tokio::spawn(async move {
            if let Some(cluster) = &cluster {
                let now = tether_common::control::clock::mono_now();
                let allowed = cluster.inputs.borrow().lease.allows(now);
                let stored = match allowed {
                    true => {
                        cluster
                            .claims
                            .clone()
                            .link(edge.edge_id.clone(), generation)
                            .await
                    }
                    false => Err(tether_common::store::StoreError::Stopped(
                        "this master has no lease in the cluster".into(),
                    )),
                };
                if let Err(err) = stored {
                    tracing::warn!(edge = %edge.edge_id, "link refused: {err}");
                    edge.link
                        .close(format!("this master cannot hold the link now: {err}"));
                    // This link replaced any older one (whose end was not reported): the
                    // unit hears that no link is up now.
                    if let Some(last_heard) = registry.detach(&edge.edge_id, generation, "refused")
                    {
                        let control = context.control.clone();
                        control
                            .event(&edge.edge_id, generation, MasterEvent::LinkUp)
                            .await;
                        control
                            .event(
                                &edge.edge_id,
                                generation,
                                MasterEvent::LinkDown { last_heard },
                            )
                            .await;
                    }
                    return;
                }
            }
            let control = context.control.clone();
            // Here, not before the spawn: a unit whose queue is full holds back its own
            // edge's link only, never the attaching of others.
            control
                .event(&edge.edge_id, generation, MasterEvent::LinkUp)
                .await;
            crate::edge_link::serve_edge(
                edge.edge_id.clone(),
                None,
                generation,
                edge.link.clone(),
                edge.incoming,
                context,
            )
            .await;
            edge.link.closed().await;
            let reason = edge.link.close_reason().unwrap_or_default();
            // The unit hears first (its link key may wait behind other etcd requests).
            if let Some(last_heard) = registry.detach(&edge.edge_id, generation, &reason) {
                control
                    .event(
                        &edge.edge_id,
                        generation,
                        MasterEvent::LinkDown { last_heard },
                    )
                    .await;
            }
            if let Some(cluster) = &cluster
                && let Err(err) = cluster
                    .claims
                    .clone()
                    .unlink(edge.edge_id.clone(), generation)
                    .await
            {
                tracing::warn!(edge = %edge.edge_id, "cannot withdraw the link key: {err}");
            }
        });
    }
}
