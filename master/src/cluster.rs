//! This master in a cluster (`[cluster]` in master.toml): it joins etcd (a presence key on
//! a lease it keeps alive), keeps grants, claims and link keys there, follows what the
//! other masters do by watch, and hands its control the inputs it decides on. Built with
//! the `cluster` feature; without it a `[cluster]` table is refused with the way to build
//! one that has it.

use std::sync::Arc;

use tether_common::store::{Grants, SharedAudit, SharedCode};

use crate::control::ClusterHooks;

/// What a master of a cluster runs on besides its own store.
pub struct Node {
    /// Grants in etcd.
    pub grants: Arc<dyn Grants>,
    /// The audit log every master shares.
    pub audit: Arc<dyn SharedAudit>,
    /// The driver code every master shares.
    pub code: Arc<dyn SharedCode>,
    /// Claims, link keys and the cluster's inputs, for the control.
    pub hooks: ClusterHooks,
    /// How long ago each master's lease was renewed, for `GET /api/v1/masters`.
    pub lease_ages: Arc<dyn crate::api::LeaseAges>,
}

/// A connection to the cluster's etcd (none can be made without the `cluster` feature).
#[cfg(not(feature = "cluster"))]
pub enum Connected {}

/// Connects to the etcd of the cluster `config` names, if any.
#[cfg(not(feature = "cluster"))]
pub async fn connect_if_configured(
    config: &tether_config::MasterConfig,
) -> anyhow::Result<Option<Connected>> {
    if config.cluster.is_some() {
        anyhow::bail!(
            "master.toml has a [cluster] table, but this tether-master was built without the cluster feature: build it with `cargo build --release -p tether-master --features cluster` (it needs protoc, Debian's protobuf-compiler)"
        );
    }
    Ok(None)
}

#[cfg(not(feature = "cluster"))]
impl Connected {
    /// The cluster's model.
    pub async fn open_model(
        &self,
        _config: &tether_config::MasterConfig,
    ) -> anyhow::Result<Arc<crate::model::ModelService>> {
        match *self {}
    }

    /// Joins the cluster.
    pub async fn join(
        self,
        _config: &tether_config::MasterConfig,
        _admin_hash: String,
        _store: Arc<tether_common::store::Store>,
    ) -> anyhow::Result<Node> {
        match self {}
    }
}

#[cfg(feature = "cluster")]
pub use joined::{Connected, connect_if_configured};

#[cfg(feature = "cluster")]
mod joined {
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::time::Duration;

    use anyhow::Context;
    use tether_common::control::lease::begin_stopping;
    use tether_common::control::{Lease, MasterId};
    use tether_common::store::etcd::{
        Etcd, EtcdAudit, EtcdCode, EtcdControl, EtcdModel, Mirror, Presence, follow,
    };
    use tether_common::store::{SharedAudit, Store};
    use tether_config::{ClusterConfig, MasterConfig};
    use tokio::sync::watch;

    use super::Node;
    use crate::control::{ClusterHooks, ClusterInputs};
    use crate::model::ModelService;

    /// Units start stopping this long before the lease can have expired: a stop closes
    /// the device connections at once (a stuck script may take longer, holding no device).
    const STOP_ALLOWANCE_MS: u64 = 500;
    /// A request to etcd that takes longer has failed.
    const ETCD_TIMEOUT: Duration = Duration::from_secs(3);

    /// Asks etcd of the masters' presence leases.
    struct EtcdLeaseAges(Etcd);

    impl crate::api::LeaseAges for EtcdLeaseAges {
        fn lease_age_ms(&self, lease: i64) -> futures::future::BoxFuture<'static, Option<u64>> {
            let etcd = self.0.clone();
            Box::pin(async move { etcd.lease_age_ms(lease).await })
        }
    }

    /// Connections to the cluster's etcd.
    pub struct Connected {
        /// For the shared state: grants, claims, link keys, the model, audit, code.
        etcd: Etcd,
        /// For presence (its keep-alives) and the watch of the cluster, on a connection of
        /// their own: a burst of state requests (a mass failover) never delays them.
        presence: Etcd,
        cluster: ClusterConfig,
    }

    /// Connects to the etcd of the cluster `config` names, if any (an error naming the
    /// endpoints when it does not answer).
    pub async fn connect_if_configured(config: &MasterConfig) -> anyhow::Result<Option<Connected>> {
        let Some(cluster) = &config.cluster else {
            return Ok(None);
        };
        let connect = || async {
            Etcd::connect_with(
                &cluster.etcd,
                &cluster.prefix,
                ETCD_TIMEOUT,
                tls_options(cluster)?,
            )
            .await
            .context("cannot join the cluster ([cluster] etcd in master.toml)")
        };
        Ok(Some(Connected {
            etcd: connect().await?,
            presence: connect().await?,
            cluster: cluster.clone(),
        }))
    }

    impl Connected {
        /// The cluster's model, shared by every master in etcd, beside this master's own
        /// database (its audit log and code).
        pub async fn open_model(&self, config: &MasterConfig) -> anyhow::Result<Arc<ModelService>> {
            let records = EtcdModel::open(self.etcd.clone())
                .await
                .context("cannot open the cluster's model in etcd")?;
            ModelService::open_shared(&config.data_dir, Arc::new(records), config.change_log_limit)
                .await
                .map_err(crate::server::model_open_error)
        }

        /// Writes this master's presence (refused when a live master has its id) and its
        /// admin token's hash (so that every master takes it), and follows the cluster.
        /// Its own audit records (in `store`) are copied to the shared log as they come.
        pub async fn join(
            self,
            config: &MasterConfig,
            admin_hash: String,
            store: Arc<Store>,
        ) -> anyhow::Result<Node> {
            join(self, config, admin_hash, store).await
        }
    }

    async fn join(
        connected: Connected,
        config: &MasterConfig,
        admin_hash: String,
        store: Arc<Store>,
    ) -> anyhow::Result<Node> {
        let Connected {
            etcd,
            presence: presence_etcd,
            cluster,
        } = connected;
        let cluster = &cluster;
        let me = MasterId::new(cluster.master_id.as_str());
        let audit = Arc::new(EtcdAudit::new(etcd.clone(), &me));
        let code = Arc::new(EtcdCode::new(etcd.clone()));
        tokio::spawn(share_audit(store, audit.clone()));
        let info = serde_json::json!({
            "api_url": config.public_api_url(),
            "link": config.link_listen.to_string(),
        });
        let presence = Presence::join(&presence_etcd, &me, &info, cluster.lease_ms)
            .await
            .context("cannot join the cluster")?;
        // Once present (a process refused for a live master's id writes nothing), and
        // not on the lease: a master's token works on the others while it is down.
        etcd.put(
            "cannot share this master's admin token",
            etcd.key(&format!("admins/{}", cluster.master_id)),
            admin_hash,
            None,
        )
        .await
        .context("cannot join the cluster")?;
        tracing::info!(master = %cluster.master_id, endpoints = %cluster.etcd.join(", "), "joined the cluster");
        let control = Arc::new(EtcdControl::new(etcd.clone(), &me, Some(presence.lease())));
        let mirror = follow(presence_etcd.clone());
        let presence_etcd_for_ages = presence_etcd.clone();
        // Nothing may run before the feed has published the lease.
        let (publish, inputs) = watch::channel(Arc::new(ClusterInputs {
            me: me.clone(),
            lease: Lease::Lost,
            ..ClusterInputs::default()
        }));
        tokio::spawn(feed(
            Joined {
                etcd: presence_etcd,
                control: control.clone(),
                cluster: cluster.clone(),
                info,
            },
            presence,
            mirror,
            publish,
        ));
        Ok(Node {
            lease_ages: Arc::new(EtcdLeaseAges(presence_etcd_for_ages)),
            code,
            audit,
            grants: control.clone(),
            hooks: ClusterHooks {
                claims: control.clone(),
                inputs,
                pair_grants: control,
            },
        })
    }

    fn tls_options(cluster: &ClusterConfig) -> anyhow::Result<Option<etcd_client::TlsOptions>> {
        let Some(tls) = &cluster.tls else {
            return Ok(None);
        };
        let read = |path: &std::path::Path| {
            std::fs::read(path)
                .with_context(|| format!("cannot read {} ([cluster.tls])", path.display()))
        };
        let mut options = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(read(&tls.ca)?));
        if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
            options = options.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
        }
        Ok(Some(options))
    }

    /// Audit records each master keeps in the shared log (its newest).
    const SHARED_AUDIT_KEEP: u64 = 10_000;

    /// Copies this master's audit records, once durable at home, to the shared log:
    /// those not yet shared (from where it left off, across restarts), then each new one.
    /// While etcd is out of reach they wait at home.
    async fn share_audit(store: Arc<Store>, audit: Arc<EtcdAudit>) {
        let mut appended = store.subscribe_audit();
        loop {
            match share_pending(&store, &audit).await {
                Ok(()) => {
                    // A new record, or a look now and then (a lagging receiver).
                    let _ = tokio::time::timeout(Duration::from_secs(5), appended.recv()).await;
                }
                Err(err) => {
                    tracing::warn!(
                        "cannot share audit records with the cluster: {err}; again shortly"
                    );
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    async fn share_pending(store: &Arc<Store>, audit: &Arc<EtcdAudit>) -> anyhow::Result<()> {
        let read = store.clone();
        let mut entries = tokio::task::spawn_blocking(move || {
            let shared = read.audit_shared()?;
            read.audit_after(shared)
        })
        .await??;
        let Some(last) = entries.last().map(|e| e.seq) else {
            return Ok(());
        };
        let keep = usize::try_from(SHARED_AUDIT_KEEP).unwrap_or(usize::MAX);
        entries.drain(..entries.len().saturating_sub(keep));
        audit.clone().share(entries, SHARED_AUDIT_KEEP).await?;
        let write = store.clone();
        tokio::task::spawn_blocking(move || write.set_audit_shared(last)).await??;
        Ok(())
    }

    /// What joining again needs (`etcd`: the presence connection).
    struct Joined {
        etcd: Etcd,
        control: Arc<EtcdControl>,
        cluster: ClusterConfig,
        info: serde_json::Value,
    }

    /// Publishes the control's inputs whenever the mirror or the lease changes; joins
    /// again on a new lease when etcd says the old one is gone.
    async fn feed(
        joined: Joined,
        mut presence: Presence,
        mut mirror: watch::Receiver<Arc<Mirror>>,
        publish: watch::Sender<Arc<ClusterInputs>>,
    ) {
        let me = MasterId::new(joined.cluster.master_id.as_str());
        let mut held = presence.held_until();
        loop {
            let lease = match *held.borrow_and_update() {
                Some(until) => Lease::Until(begin_stopping(until, STOP_ALLOWANCE_MS)),
                None => Lease::Lost,
            };
            let view = mirror.borrow_and_update().clone();
            publish.send_replace(Arc::new(inputs(&me, lease, &view)));
            let lost = tokio::select! {
                changed = held.changed() => changed.is_err() || held.borrow().is_none(),
                changed = mirror.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    false
                }
            };
            if lost {
                publish.send_replace(Arc::new(inputs(&me, Lease::Lost, &mirror.borrow())));
                presence = rejoin(&joined).await;
                held = presence.held_until();
            }
        }
    }

    /// Joins again until it can (the old lease is gone, so its id is free).
    async fn rejoin(joined: &Joined) -> Presence {
        loop {
            tracing::warn!("the presence lease is gone: joining the cluster again");
            match Presence::join(
                &joined.etcd,
                &MasterId::new(joined.cluster.master_id.as_str()),
                &joined.info,
                joined.cluster.lease_ms,
            )
            .await
            {
                Ok(presence) => {
                    joined.control.set_lease(presence.lease());
                    return presence;
                }
                Err(err) => {
                    tracing::error!("cannot join the cluster again: {err}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    fn inputs(me: &MasterId, lease: Lease, mirror: &Mirror) -> ClusterInputs {
        ClusterInputs {
            me: me.clone(),
            lease,
            live: mirror.masters(),
            links: mirror.links(),
            link_ended: mirror.links_ended(),
            runners: mirror.runners(),
            grants: mirror.grants(),
            pair_grants: mirror.pair_grants(),
            leases: mirror.master_leases(),
            info: mirror
                .masters()
                .into_iter()
                .filter_map(|id| Some((id.clone(), mirror.master_info(&id)?)))
                .collect::<BTreeMap<_, _>>(),
            admins: mirror.admin_hashes(),
        }
    }
}
