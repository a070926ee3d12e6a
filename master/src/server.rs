//! Starting the master: configuration, certificates, listeners, and the life of each
//! edge link.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use tether_common::api::{AdminToken, Health, serve_https};
use tether_common::link::{
    AuthenticatedEdge, LinkConfig, ListenerConfig, refuse_all, run_listener, tls,
};
use tether_common::pki;
use tether_config::{MasterConfig, SiteFile};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::edges::EdgeRegistry;

/// Handshakes in progress at once before new connections are dropped.
const MAX_PENDING_HANDSHAKES: usize = 256;

/// Runs the master until SIGINT or SIGTERM.
pub fn run(config_path: &Path) -> anyhow::Result<()> {
    let config = MasterConfig::load(config_path)?;
    let site = match &config.seed {
        Some(seed) => SiteFile::load(seed)?,
        None => {
            tracing::warn!("no seed site file is configured: no edge can connect");
            SiteFile::default()
        }
    };
    tls::install_crypto_provider();
    if config.tls.create_dev_certs {
        let leaf = pki::Leaf {
            cert: config.tls.cert.clone(),
            key: config.tls.key.clone(),
            role: pki::Role::Master(pki::loopback_names()),
        };
        let secrets: Vec<_> = site.edges.iter().map(|e| e.secret_file.clone()).collect();
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
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data_dir {}", config.data_dir.display()))?;
    let token = Arc::new(AdminToken::load_or_create(&config.data_dir)?);

    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(serve(config, site, token, link_tls, api_tls))
}

async fn serve(
    config: MasterConfig,
    site: SiteFile,
    token: Arc<AdminToken>,
    link_tls: Arc<rustls::ServerConfig>,
    api_tls: Arc<rustls::ServerConfig>,
) -> anyhow::Result<()> {
    let link_listener = TcpListener::bind(config.link_listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen for edge links on {} (link_listen)",
                config.link_listen
            )
        })?;
    let api_listener = TcpListener::bind(config.api_listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen for the API on {} (api_listen)",
                config.api_listen
            )
        })?;

    let shutdown = CancellationToken::new();
    let registry = EdgeRegistry::new(&site.edges);
    let health = Arc::new(Health {
        role: "master",
        id: config.id.clone(),
        booted: false.into(),
    });

    let (accepted_tx, accepted_rx) = mpsc::channel(64);
    let listener_config = ListenerConfig {
        handshake_timeout: Duration::from_millis(config.handshake_timeout_ms),
        max_pending_handshakes: MAX_PENDING_HANDSHAKES,
        link: LinkConfig::with_heartbeat(
            Duration::from_millis(config.heartbeat_ms),
            config.max_frame_bytes as usize,
        ),
    };
    tokio::spawn(run_listener(
        link_listener,
        link_tls,
        registry.clone(),
        listener_config,
        accepted_tx,
        shutdown.clone(),
    ));
    tokio::spawn(attach_links(registry.clone(), accepted_rx));

    let router = crate::api::router(health.clone(), token, registry.clone());
    tokio::spawn(serve_https(api_listener, api_tls, router, shutdown.clone()));

    health.booted.store(true, Ordering::Relaxed);
    tracing::info!(
        api = %config.api_listen,
        link = %config.link_listen,
        edges = site.edges.len(),
        "master booted"
    );

    tether_common::shutdown::wait_for_signal().await;
    tracing::info!("shutting down");
    registry.close_all("the master is shutting down");
    shutdown.cancel();
    // Let the links flush their close frames.
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(())
}

/// Registers each authenticated edge and serves what it sends until its link closes.
async fn attach_links(
    registry: Arc<EdgeRegistry>,
    mut accepted: mpsc::Receiver<AuthenticatedEdge>,
) {
    while let Some(edge) = accepted.recv().await {
        let Some(generation) = registry.attach(&edge.edge_id, edge.link.clone(), edge.addr) else {
            // Its entry vanished between the secret lookup and now; nothing to attach to.
            edge.link.close("unknown edge");
            continue;
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            // The data model, control and proxying handle what edges send with later issues.
            refuse_all(
                edge.incoming,
                "this master does not handle that request yet",
            )
            .await;
            edge.link.closed().await;
            let reason = edge.link.close_reason().unwrap_or_default();
            registry.detach(&edge.edge_id, generation, &reason);
        });
    }
}
