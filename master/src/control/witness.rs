//! The master as a site pair's witness: one task per location with nodes, owning the
//! location's [`WitnessSide`] machine (DESIGN.md, "Site pairs and collector arrays"). It
//! feeds the machine its nodes' links and reports, the model's settings and the time, and
//! carries out its actions in order: a grant is stored before it is sent to the nodes (one
//! the store did not take is not sent, and is tried again on the next poll), and the
//! master's own start or stop of the location's modules completes before what follows.
//!
//! Its grants are published like a single edge's (owner `edge` while a node holds, with
//! the grant's epoch), so the API, the runtime's fence and the proxy's hints read them as
//! they read an edge's; the registry learns the holder node, so calls reach it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tether_common::control::pair::{
    NodeReport, PairGrant, PairHolder, PairSettings, WitnessAction, WitnessEvent, WitnessSide,
};
use tether_common::control::{AuditRecord, NodeId, Now, UnitId};
use tether_common::model::EdgeRecord;
use tether_common::protocol::Request;
use tokio::sync::{mpsc, watch};

use super::{AUDIT_KEEP, RestoreError, Shared, UnitCommand, now_ms};

/// How often the witness looks at the time (its deadlines are a pair timeout or more).
const POLL: Duration = Duration::from_millis(100);
/// How long a node may take to take a grant.
const GRANT_TIMEOUT: Duration = Duration::from_secs(10);

/// What happened on a node's link.
#[derive(Debug, Clone)]
pub enum NodeLinkEvent {
    /// It came up.
    Up,
    /// It went down; its last frame came then.
    Down {
        /// On the monotonic clock.
        last_heard: tether_common::control::Mono,
    },
    /// The node reported where it stands.
    Report(NodeReport),
}

/// One pair location's witness.
pub(super) struct Witness {
    location: UnitId,
    nodes: Vec<String>,
    machine: WitnessSide,
    shared: Arc<Shared>,
    /// The current link generation of each node.
    links: HashMap<NodeId, u64>,
    /// The grant stored and sent last (a grant the store refused is tried again).
    sent: Option<PairGrant>,
}

impl Witness {
    /// The witness of `record`'s location, from the grant stored last.
    pub(super) fn new(shared: Arc<Shared>, record: &EdgeRecord) -> Witness {
        // A location new to this witness: its first grant names the preferred node, at
        // epoch 1 (above the epoch 0 a node starts from), stored and sent after the
        // boot wait.
        let first = PairGrant {
            epoch: PairGrant::initial(&record.nodes).epoch.next(),
            ..PairGrant::initial(&record.nodes)
        };
        let (persisted, sent) = match shared.store.pair_grant(&record.id) {
            Ok(Some(grant)) => (grant.clone(), Some(grant)),
            Ok(None) => (first, None),
            Err(err) => {
                // Refusing to witness would leave the nodes without one; nodes refuse a
                // grant not newer than theirs, so a stale first grant changes nothing.
                tracing::error!(edge = %record.id, "cannot read the stored pair grant: {err}");
                (first, None)
            }
        };
        let nodes: Vec<NodeId> = record.nodes.iter().map(NodeId::new).collect();
        let location = UnitId::new(record.id.as_str());
        shared.publish(&location, persisted.control_state());
        shared
            .runtime
            .set_grant(&location, persisted.control_state());
        shared
            .registry
            .set_holder(&record.id, persisted.node().map(|n| n.as_str()));
        Witness {
            machine: WitnessSide::new(
                nodes,
                PairSettings::of(record),
                persisted.clone(),
                Now::system().mono,
            ),
            location,
            nodes: record.nodes.clone(),
            shared,
            links: HashMap::new(),
            sent,
        }
    }

    pub(super) async fn run(
        mut self,
        mut commands: mpsc::Receiver<UnitCommand>,
        mut booted: watch::Receiver<bool>,
    ) {
        let mut model = self.shared.model.clone();
        loop {
            tokio::select! {
                command = commands.recv() => match command {
                    Some(command) => self.command(command).await,
                    None => return,
                },
                changed = model.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let now = model.borrow_and_update().clone();
                    match now.edges.get(self.location.as_str()) {
                        // Other nodes make another unit (the coordinator replaces this one).
                        Some(record) if record.nodes == self.nodes => {
                            self.machine.set_settings(PairSettings::of(record))
                        }
                        _ => return,
                    }
                }
                _ = tokio::time::sleep(POLL) => {
                    // Nothing is decided before the boot wait: the nodes have that long to
                    // link, as an edge has.
                    if *booted.borrow_and_update() {
                        let actions = self.machine.poll(Now::system().mono);
                        self.carry_out(actions).await;
                    }
                }
            }
        }
    }

    async fn command(&mut self, command: UnitCommand) {
        match command {
            UnitCommand::Node {
                node,
                generation,
                event,
            } => {
                let event = match event {
                    NodeLinkEvent::Up => {
                        let newer = self.links.get(&node).is_none_or(|g| generation > *g);
                        if !newer {
                            return;
                        }
                        self.links.insert(node.clone(), generation);
                        // It learns the grant at once (once stored), whatever the machine
                        // decides.
                        if let Some(sent) = &self.sent {
                            self.send_grant_to(&node, sent.clone());
                        }
                        WitnessEvent::Up(node)
                    }
                    NodeLinkEvent::Down { last_heard } => {
                        if self.links.get(&node) != Some(&generation) {
                            return;
                        }
                        self.links.remove(&node);
                        WitnessEvent::Down(node, last_heard)
                    }
                    NodeLinkEvent::Report(report) => {
                        if self.links.get(&node) != Some(&generation) {
                            return;
                        }
                        WitnessEvent::Report(node, report)
                    }
                };
                let actions = self.machine.handle(Now::system().mono, event);
                self.carry_out(actions).await;
            }
            UnitCommand::Restore(reply) => {
                let before = self.machine.grant().clone();
                let actions = self
                    .machine
                    .handle(Now::system().mono, WitnessEvent::Restore);
                let answer = if self.machine.grant() == &before {
                    Err(RestoreError::NotStored(match before.holder {
                        PairHolder::Master => "no node of the pair is linked to this master".into(),
                        _ => "a node of the pair holds the modules already".into(),
                    }))
                } else {
                    Ok(())
                };
                self.carry_out(actions).await;
                let answer = answer.and_then(|()| match &self.sent {
                    Some(sent) if sent == self.machine.grant() => Ok(sent.control_state()),
                    _ => Err(RestoreError::NotStored(
                        "the grant could not be stored".into(),
                    )),
                });
                let _ = reply.send(answer);
            }
            UnitCommand::Link { .. } => {
                tracing::warn!(edge = %self.location, "a link under a pair location's own id is ignored: its nodes link");
            }
        }
    }

    /// Carries out the machine's actions in order; a grant not stored stops the batch
    /// (the next poll stores and sends it).
    async fn carry_out(&mut self, actions: Vec<WitnessAction>) {
        for action in actions {
            match action {
                WitnessAction::Issue(grant) => {
                    if !self.store_and_send(grant).await {
                        return;
                    }
                }
                WitnessAction::Start { epoch } => {
                    tracing::info!(edge = %self.location, %epoch, "the master starts the pair's modules (no node linked)");
                    self.shared.set_running(&self.location, true);
                    self.shared.reconcile(|_| false).await;
                }
                WitnessAction::Stop => {
                    tracing::info!(edge = %self.location, "the master stops the pair's modules");
                    self.shared.set_running(&self.location, false);
                    self.shared.stop_unit_modules(&self.location).await;
                }
            }
        }
        // A grant the store refused earlier: again.
        let current = self.machine.grant().clone();
        if self.sent.as_ref() != Some(&current) {
            self.store_and_send(current).await;
        }
    }

    /// Stores `grant`, then publishes it and sends it to every linked node; false when it
    /// could not be stored (nothing sent).
    async fn store_and_send(&mut self, grant: PairGrant) -> bool {
        let store = self.shared.store.clone();
        let location = self.location.to_string();
        let stored = {
            let grant = grant.clone();
            tokio::task::spawn_blocking(move || store.set_pair_grant(&location, &grant)).await
        };
        if let Err(err) = stored
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()))
        {
            tracing::error!(edge = %self.location, ?grant, "pair grant not stored, so not sent (tried again): {err}");
            self.shared
                .runtime
                .metrics()
                .grant_store_failed(&self.location);
            return false;
        }
        let before = self
            .sent
            .replace(grant.clone())
            .map(|g| g.control_state())
            .unwrap_or_default();
        let state = grant.control_state();
        self.shared.runtime.set_grant(&self.location, state);
        self.shared.publish(&self.location, state);
        self.shared
            .registry
            .set_holder(&self.location, grant.node().map(|n| n.as_str()));
        let record = AuditRecord {
            time_ms: now_ms(),
            edge: self.location.clone(),
            from: before.owner,
            to: state.owner,
            epoch: state.epoch,
            reason: reason(&grant),
            code: None,
        };
        tracing::warn!(edge = %self.location, epoch = %grant.epoch, "pair grant: {}", record.reason);
        self.shared
            .store
            .record_audits(vec![record], AUDIT_KEEP)
            .await;
        for node in self.links.keys() {
            self.send_grant_to(node, grant.clone());
        }
        true
    }

    /// Sends `grant` to `node`'s current link, without waiting.
    fn send_grant_to(&self, node: &NodeId, grant: PairGrant) {
        let Some(link) = self.shared.registry.link_of_node(node) else {
            return;
        };
        let location = self.location.clone();
        tokio::spawn(async move {
            if let Err(err) = link
                .request(Request::PairGrant { grant }, GRANT_TIMEOUT)
                .await
            {
                tracing::warn!(edge = %location, node = %link.peer(), "the node did not take the pair grant: {err}");
            }
        });
    }
}

/// What the audit log says of a grant.
fn reason(grant: &PairGrant) -> String {
    match &grant.holder {
        PairHolder::Node(node) => format!("site pair: node {node} holds the modules"),
        PairHolder::Master => {
            "site pair: no node linked for the location's timeout, the master holds the modules"
                .into()
        }
        PairHolder::Moving(node) => format!(
            "site pair: the holder is released, the modules go to node {node} once it has stopped"
        ),
    }
}
