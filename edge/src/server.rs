//! Starting an edge: configuration, certificates, its API, and the link to the master.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::routing::get;
use tether_common::api::{AdminToken, Health, health, serve_https};
use tether_common::link::{
    ConnectorConfig, LinkConfig, LinkEvent, Secret, maintain_link, refuse_all, tls,
};
use tether_common::pki;
use tether_config::EdgeConfig;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Runs the edge until SIGINT or SIGTERM.
pub fn run(config_path: &Path) -> anyhow::Result<()> {
    let config = EdgeConfig::load(config_path)?;
    tls::install_crypto_provider();
    if config.tls.create_dev_certs {
        let leaf = pki::Leaf {
            cert: config.tls.cert.clone(),
            key: config.tls.key.clone(),
            role: pki::Role::Edge {
                edge_id: config.edge_id.clone(),
                names: pki::loopback_names(),
            },
        };
        for path in pki::ensure(
            &config.tls.ca,
            &[leaf],
            std::slice::from_ref(&config.secret_file),
        )? {
            tracing::info!("created development file {}", path.display());
        }
    }
    let secret = Secret::load(&config.secret_file)?;
    let connector = ConnectorConfig {
        master_addr: config.master.clone(),
        server_name: tls::server_name(&config.master_name)?,
        tls: tls::client_config(&config.tls.ca, Some((&config.tls.cert, &config.tls.key)))?,
        edge_id: config.edge_id.clone(),
        secret,
        handshake_timeout: Duration::from_millis(config.handshake_timeout_ms),
        reconnect: Duration::from_millis(config.reconnect_ms),
        link: LinkConfig::with_heartbeat(
            Duration::from_millis(config.heartbeat_ms),
            config.max_frame_bytes as usize,
        ),
    };
    let api_tls = tls::server_config(&config.tls.cert, &config.tls.key, None)?;
    // Everything is checked; only now write to the data folder.
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data_dir {}", config.data_dir.display()))?;
    let token = Arc::new(AdminToken::load_or_create(&config.data_dir)?);
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(serve(config, token, connector, api_tls))
}

async fn serve(
    config: EdgeConfig,
    token: Arc<AdminToken>,
    connector: ConnectorConfig,
    api_tls: Arc<rustls::ServerConfig>,
) -> anyhow::Result<()> {
    let api_listener = TcpListener::bind(config.api_listen)
        .await
        .with_context(|| {
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
    // The token guards the rest of the edge's API, which comes with the proxying issue.
    let _ = token;
    let router = Router::new()
        .route("/api/v1/health", get(health))
        .with_state(health_state.clone());
    tokio::spawn(serve_https(api_listener, api_tls, router, shutdown.clone()));

    let (events_tx, events_rx) = mpsc::channel(16);
    tokio::spawn(maintain_link(connector, events_tx, shutdown.clone()));
    tokio::spawn(follow_link(events_rx));

    health_state.booted.store(true, Ordering::Relaxed);
    tracing::info!(edge = %config.edge_id, api = %config.api_listen, master = %config.master, "edge booted");
    tether_common::shutdown::wait_for_signal().await;
    tracing::info!("shutting down");
    shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(())
}

/// Serves what the master sends on each link as it comes up.
async fn follow_link(mut events: mpsc::Receiver<LinkEvent>) {
    while let Some(event) = events.recv().await {
        if let LinkEvent::Up { incoming, .. } = event {
            // Control, the replica and execution handle what the master sends with later issues.
            tokio::spawn(refuse_all(
                incoming,
                "this edge does not handle that request yet",
            ));
        }
    }
}
