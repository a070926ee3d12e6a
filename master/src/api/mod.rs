//! The master's client API routes.

mod control;
mod dashboard;
mod records;
mod repos;
mod users;

use std::sync::Arc;

use axum::Router;
use serde_json::Value;
use tether_common::api::{
    Access, ApiLimits, Health, Live, Overview, health, live_routes, module_routes, protect,
};
use tether_common::control::MasterId;
use tether_common::runtime::Runtime;
use tether_common::store::Store;

use crate::edges::EdgeRegistry;
use crate::model::ModelService;

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    /// The data model.
    pub model: Arc<ModelService>,
    /// The edges and their links.
    pub edges: Arc<EdgeRegistry>,
    /// The modules the master runs.
    pub runtime: Runtime,
    /// Who controls each edge location.
    pub control: crate::control::Control,
    /// The driver repositories.
    pub repos: Arc<crate::repos::Repositories>,
    /// This master's id and API address, for `GET /api/v1/masters`.
    pub me: (String, String),
    /// In a cluster: the audit log every master shares.
    pub shared_audit: Option<Arc<dyn tether_common::store::SharedAudit>>,
    /// In a cluster: sends calls for units other masters hold to them.
    pub forwarder: Option<Arc<crate::forward::Forwarder>>,
    /// In a cluster: how long ago each master's lease was renewed.
    pub lease_ages: Option<Arc<dyn LeaseAges>>,
}

/// Asks the cluster's etcd how long ago a master's presence lease was renewed.
pub trait LeaseAges: Send + Sync {
    /// Milliseconds since `lease` was renewed, in etcd's whole seconds (`None`: unknown).
    fn lease_age_ms(&self, lease: i64) -> futures::future::BoxFuture<'static, Option<u64>>;
}

/// The router: health is open (for load balancers and probes); the rest needs the token.
pub fn router(
    health_state: Arc<Health>,
    access: Access,
    state: AppState,
    limits: ApiLimits,
) -> Router {
    let live = Live::new(state.runtime.clone(), Arc::new(state.clone()));
    // In a cluster a WebSocket client's commands for modules other masters serve go there.
    let live = match &state.forwarder {
        Some(forwarder) => live.with_relay(forwarder.clone()),
        None => live,
    };
    let protected = records::routes()
        .merge(control::routes())
        .merge(users::routes())
        .merge(repos::routes())
        .route("/api/v1/edges/{id}/slice", axum::routing::get(edge_slice))
        .route("/api/v1/masters", axum::routing::get(masters))
        .with_state(state.clone())
        .merge(forwarded(module_routes(state.runtime.clone()), &state))
        .merge(live_routes(live));
    let protected = protect(protected, access, limits);
    Router::new()
        .route("/api/v1/health", axum::routing::get(health))
        .with_state(health_state)
        .merge(dashboard::routes())
        .merge(protected)
}

/// `routes`, sending calls for units another master holds to it (in a cluster).
fn forwarded(routes: Router, state: &AppState) -> Router {
    match &state.forwarder {
        Some(forwarder) => routes.layer(axum::middleware::from_fn_with_state(
            forwarder.clone(),
            crate::forward::forward_to_holder,
        )),
        None => routes,
    }
}

/// The master's account for the live routes: every edge of the model with its link and
/// control state, the model version, the audit log in the model's store.
impl Overview for AppState {
    fn edges(&self) -> Vec<Value> {
        let (model, _) = self.model.snapshot();
        model
            .edges
            .values()
            .filter_map(|record| self.edges.view(record, self.control.state(&record.id)))
            .collect()
    }

    fn model_version(&self) -> u64 {
        self.model.snapshot().1
    }

    fn store(&self) -> Arc<Store> {
        self.model.store()
    }
}

/// An edge's slice of the model, in the shape the edge's `GET /api/v1/replica` has, so
/// the two can be compared.
async fn edge_slice(
    axum::extract::State(state): axum::extract::State<AppState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<axum::Json<serde_json::Value>, tether_common::api::ApiError> {
    let (model, version) = state.model.snapshot();
    if !model.edges.contains_key(&id) {
        return Err(tether_common::api::ApiError::not_found(format!(
            "no edge {id}"
        )));
    }
    Ok(axum::Json(serde_json::json!({
        "model_id": state.model.model_id().to_string(),
        "version": version,
        "records": model.slice(&id).dump_for_clients(),
    })))
}

/// The masters: in a cluster each present one (its id, API address, the edges whose links
/// it holds and the units it runs, from etcd as this master follows it); alone, itself.
async fn masters(
    axum::extract::State(state): axum::extract::State<AppState>,
) -> axum::Json<Vec<Value>> {
    let (id, api_url) = state.me.clone();
    let Some(cluster) = state.control.cluster() else {
        let (model, _) = state.model.snapshot();
        let linked: Vec<&String> = model
            .edges
            .keys()
            .filter(|edge| state.edges.link(edge).is_some())
            .collect();
        return axum::Json(vec![serde_json::json!({
            "id": id,
            "api_url": api_url,
            "alive": true,
            "edges": linked,
            "units": state.control.running_here(),
            "lease_age_ms": null,
        })]);
    };
    fn held<K: ToString>(
        map: &std::collections::BTreeMap<K, MasterId>,
        master: &MasterId,
    ) -> Vec<String> {
        map.iter()
            .filter(|(_, m)| *m == master)
            .map(|(unit, _)| unit.to_string())
            .collect()
    }
    // Asked of etcd for every master at once (a second at most).
    let ages = futures::future::join_all(cluster.live.iter().map(|master| {
        let (asked, lease) = (
            state.lease_ages.clone(),
            cluster.leases.get(master).copied(),
        );
        async move {
            match (asked, lease) {
                (Some(asked), Some(lease)) => asked.lease_age_ms(lease).await,
                _ => None,
            }
        }
    }))
    .await;
    axum::Json(
        cluster
            .live
            .iter()
            .zip(ages)
            .map(|(master, age)| {
                let info = cluster.info.get(master);
                serde_json::json!({
                    "id": master,
                    "api_url": info.and_then(|i| i.get("api_url")).cloned().unwrap_or(Value::Null),
                    "alive": true,
                    "edges": held(&cluster.links, master),
                    "units": held(&cluster.runners, master),
                    "lease_age_ms": age,
                })
            })
            .collect(),
    )
}
