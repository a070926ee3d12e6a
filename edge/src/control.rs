//! The edge's control shell: one task that owns the [`EdgeSide`] machine, feeds it link
//! events and the master's decisions, and carries out its actions in order: persist,
//! start or stop this site's modules (a stop completes, devices disconnected, before the
//! decision is acknowledged), report to the master. A grant or claim is stored before it
//! is acted on: when the store fails, nothing after it is carried out (a decision is
//! answered with the failure; a claim is tried again). The machine's own deadlines (the
//! takeover after a lost link) are polled on the monotonic clock.
//!
//! On every new link it also streams the modules' status changes to the master
//! (runtime-state sync, for warm standby) and reports the changes of owner it decided
//! alone while the master was out of reach.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde_json::Value;
use tether_common::api::audit_entry_json;
use tether_common::control::clock::wall_now_ms;
use tether_common::control::pair::{GrantProof, PairGrant, PeerNote};
use tether_common::control::{
    ControlState, EdgeAction, EdgeEvent, EdgeId, EdgeSide, EdgeTiming, Epoch, NodeId, Now, Owner,
    StaleDecision, owner_name,
};
use tether_common::link::Secret;
use tether_common::link::{Link, LinkError};
use tether_common::protocol::{AuditRecord, ErrorCode, Json, Notice, Request};
use tether_common::runtime::Runtime;
use tether_common::store::Store;
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::replica::Replica;

/// How long the master may take to take a report.
const REPORT_TIMEOUT: Duration = Duration::from_secs(15);
/// Audit records kept on an edge.
pub(crate) const AUDIT_KEEP: u64 = 10_000;

/// Why a decision of the master was not acted on.
#[derive(Debug, thiserror::Error)]
pub enum DecisionRefused {
    /// It is older than what this edge holds.
    #[error(transparent)]
    Stale(#[from] StaleDecision),
    /// It could not be stored, so it was not carried out.
    #[error("the decision could not be stored, so it was not carried out: {0}")]
    NotStored(String),
    /// The control task has stopped (shutdown).
    #[error("the edge is shutting down")]
    Stopped,
    /// This edge is a node of a site pair: its witness grants, nobody decides.
    #[error(
        "this edge is a node of a site pair: it takes pair grants from its witness, not control decisions"
    )]
    PairNode,
}

/// What the API shows of this edge's control.
#[derive(Debug, Clone, Default)]
pub struct ControlView {
    /// Owner and epoch.
    pub state: ControlState,
    /// Whether this edge runs its modules now.
    pub active: bool,
    /// Whether the link to the master is up.
    pub online: bool,
    /// Whether the master said it has booted.
    pub master_ready: bool,
    /// The longest from a silent cut of the master link to this edge running its modules.
    pub takeover_worst_ms: u64,
    /// A site pair's node: its pair.
    pub pair: Option<crate::pair::PairView>,
}

pub(crate) enum Command {
    Link(EdgeEvent, Option<Link>),
    Decision {
        owner: Owner,
        epoch: Epoch,
        reason: String,
        reply: oneshot::Sender<Result<Epoch, DecisionRefused>>,
    },
    ReplicaChanged,
    /// A site pair's grant from the witness, with its proofs.
    Granted {
        grant: PairGrant,
        proofs: Vec<GrantProof>,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// The link to a site pair's peer.
    Peer(PeerEvent),
    /// A site pair's node reaches this many of its location's devices.
    Devices(u32),
}

/// What happens on a site pair's link between its nodes.
pub enum PeerEvent {
    /// It came up, to this peer.
    Up(NodeId, Link),
    /// This link to this peer went down.
    Down(NodeId, Link),
}

/// A handle on the control task.
#[derive(Clone)]
pub struct EdgeControl {
    commands: mpsc::UnboundedSender<Command>,
    view: Arc<RwLock<ControlView>>,
    store: Arc<Store>,
    /// A site pair's node: what its peers sent.
    mail: Option<Arc<crate::pair::PeerMail>>,
}

/// Which of its location's modules an edge runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Running {
    /// Every one (it holds them).
    All,
    /// Those of collector-array drivers, to poll only (a pair's standby node).
    Polling,
    /// None.
    Nothing,
}

/// Runs `location`'s modules of the replica as `running` says, and records the reloads
/// refused (audited under `state`, reported over `link`).
pub(crate) async fn reconcile_modules(
    replica: &Replica,
    runtime: &Runtime,
    store: &Arc<Store>,
    link: Option<&Link>,
    location: &EdgeId,
    (running, state): (Running, ControlState),
) {
    let (model, _) = replica.snapshot();
    let wanted = model.clone();
    let edge_id = location.clone();
    let code = replica.code();
    runtime.set_code(code.clone());
    let refused = runtime
        .reconcile(model.clone(), move |module| {
            let ours = wanted.module_edge(module).as_deref() == Some(edge_id.as_str());
            let polls = || {
                wanted
                    .drivers
                    .get(&module.driver)
                    .is_some_and(|driver| driver.shared_polling)
            };
            ours && match running {
                Running::All => true,
                Running::Polling => polls(),
                Running::Nothing => false,
            }
        })
        .await;
    if !refused.is_empty() {
        let records: Vec<AuditRecord> = refused
            .iter()
            .map(|r| {
                r.audit(
                    &model,
                    &code,
                    (location.clone().into(), state.owner, state.epoch),
                    wall_now_ms(),
                )
            })
            .collect();
        store.record_audits(records, AUDIT_KEEP).await;
        if let Some(link) = link {
            tokio::spawn(report_audits(link.clone(), store.clone()));
        }
    }
}

impl EdgeControl {
    /// Starts the control task from the state persisted in the replica's database. No
    /// module runs until the master decides, or the master is found unreachable.
    pub fn start(
        edge_id: &str,
        node: Option<(NodeId, Vec<NodeId>, Secret)>,
        replica: Arc<Replica>,
        runtime: Runtime,
        timing: EdgeTiming,
    ) -> anyhow::Result<EdgeControl> {
        let store = replica.store();
        if let Some(node) = node {
            return Self::start_node(edge_id, node, replica, runtime, timing);
        }
        let persisted = store
            .control_states()?
            .get(edge_id)
            .copied()
            .unwrap_or_default();
        runtime.set_grant(edge_id, persisted);
        let view = Arc::new(RwLock::new(ControlView {
            state: persisted,
            takeover_worst_ms: timing.worst_case_takeover_ms(),
            ..ControlView::default()
        }));
        let (commands, receiver) = mpsc::unbounded_channel();
        let edge_id = EdgeId::new(edge_id);
        let task = Task {
            edge_id: edge_id.clone(),
            machine: EdgeSide::new(edge_id, persisted, timing),
            replica: replica.clone(),
            runtime,
            store: store.clone(),
            link: None,
            view: view.clone(),
        };
        tokio::spawn(task.run(receiver));
        let control = EdgeControl {
            commands,
            view,
            store,
            mail: None,
        };
        // Load the replica's systems (no module runs yet), so the API can answer for them.
        let _ = control.commands.send(Command::ReplicaChanged);
        tokio::spawn(follow_replica(replica, control.clone()));
        Ok(control)
    }

    /// A site pair's node (with its peers): its task over the grant it stored last;
    /// `secret` is its own, which proves its grants.
    fn start_node(
        edge_id: &str,
        (node, peers, secret): (NodeId, Vec<NodeId>, Secret),
        replica: Arc<Replica>,
        runtime: Runtime,
        timing: EdgeTiming,
    ) -> anyhow::Result<EdgeControl> {
        let store = replica.store();
        let view = Arc::new(RwLock::new(ControlView {
            takeover_worst_ms: timing.worst_case_takeover_ms(),
            ..ControlView::default()
        }));
        let (commands, receiver) = mpsc::unbounded_channel();
        let mail = Arc::new(crate::pair::PeerMail::new(&peers));
        let task = crate::pair::NodeTask::new(
            EdgeId::new(edge_id),
            (node, peers, secret),
            replica.clone(),
            runtime,
            view.clone(),
            timing.heartbeat_ms,
        )?;
        tokio::spawn(task.run(receiver, mail.clone()));
        let control = EdgeControl {
            commands,
            view,
            store,
            mail: Some(mail),
        };
        let _ = control.commands.send(Command::ReplicaChanged);
        tokio::spawn(follow_replica(replica, control.clone()));
        Ok(control)
    }

    /// A peer's note.
    pub fn peer_note(&self, from: (&NodeId, &Link), note: PeerNote) {
        if let Some(mail) = &self.mail {
            mail.note(from, note);
        }
    }

    /// Whether a peer polls its collector arrays (false again when its link goes).
    pub fn peer_polling(&self, from: (&NodeId, &Link), polling: bool) {
        if let Some(mail) = &self.mail {
            mail.polling(from, polling);
        }
    }

    /// A grant a peer passed on, with the witness's proofs.
    pub fn peer_grant(&self, from: (&NodeId, &Link), grant: PairGrant, proofs: Vec<GrantProof>) {
        if let Some(mail) = &self.mail {
            mail.grant(from, grant, proofs);
        }
    }

    /// A site pair's grant from the witness; answers once it is taken (and stored).
    pub async fn granted(&self, grant: PairGrant, proofs: Vec<GrantProof>) -> Result<(), String> {
        let (reply, answer) = oneshot::channel();
        let _ = self.commands.send(Command::Granted {
            grant,
            proofs,
            reply,
        });
        answer
            .await
            .unwrap_or_else(|_| Err("the edge is shutting down".into()))
    }

    /// Something happened on the link to a site pair's peer.
    pub fn peer_event(&self, event: PeerEvent) {
        let _ = self.commands.send(Command::Peer(event));
    }

    /// A site pair's node reaches this many of its location's devices now.
    pub fn devices(&self, reached: u32) {
        let _ = self.commands.send(Command::Devices(reached));
    }

    /// The link came up (with it), went down, or an attempt failed.
    pub fn link_event(&self, event: EdgeEvent, link: Option<Link>) {
        let _ = self.commands.send(Command::Link(event, link));
    }

    /// A decision of the master; answers the epoch acted on once the modules are stopped
    /// or started, or why it was refused.
    pub async fn decide(
        &self,
        owner: Owner,
        epoch: Epoch,
        reason: String,
    ) -> Result<Epoch, DecisionRefused> {
        let (reply, answer) = oneshot::channel();
        let _ = self.commands.send(Command::Decision {
            owner,
            epoch,
            reason,
            reply,
        });
        answer.await.unwrap_or(Err(DecisionRefused::Stopped))
    }

    /// What the API shows.
    pub fn view(&self) -> ControlView {
        self.view.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The changes of owner this edge decided alone, oldest first.
    pub async fn audit(&self) -> anyhow::Result<Vec<Value>> {
        let store = self.store.clone();
        let records = tokio::task::spawn_blocking(move || store.audit_after(0)).await??;
        Ok(records.iter().map(audit_entry_json).collect())
    }
}

/// Reconciles the modules after every applied batch (new host or settings: restart).
async fn follow_replica(replica: Arc<Replica>, control: EdgeControl) {
    let mut changed = replica.watch();
    while changed.changed().await.is_ok() {
        if control.commands.send(Command::ReplicaChanged).is_err() {
            return;
        }
    }
}

struct Task {
    edge_id: EdgeId,
    machine: EdgeSide,
    replica: Arc<Replica>,
    runtime: Runtime,
    store: Arc<Store>,
    link: Option<Link>,
    view: Arc<RwLock<ControlView>>,
}

impl Task {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        loop {
            let now = Now::system();
            let wait = self
                .machine
                .next_poll()
                .map(|at| Duration::from_millis(at.since(now.mono)));
            let command = tokio::select! {
                command = commands.recv() => match command {
                    Some(command) => command,
                    None => return,
                },
                _ = sleep_or_never(wait) => {
                    let actions = self.machine.poll(Now::system());
                    let _ = self.carry_out(actions).await;
                    self.publish();
                    continue;
                }
            };
            match command {
                Command::Link(event, link) => {
                    match event {
                        EdgeEvent::LinkUp => self.link = link,
                        EdgeEvent::LinkDown | EdgeEvent::AttemptFailed => self.link = None,
                        EdgeEvent::MasterReady => {}
                    }
                    let actions = self.machine.handle(Now::system(), event);
                    let _ = self.carry_out(actions).await;
                    if event == EdgeEvent::LinkUp
                        && let Some(link) = &self.link
                    {
                        tokio::spawn(report_audits(link.clone(), self.store.clone()));
                        tokio::spawn(stream_status(
                            link.clone(),
                            self.runtime.clone(),
                            self.view.clone(),
                        ));
                    }
                }
                Command::Decision {
                    owner,
                    epoch,
                    reason,
                    reply,
                } => {
                    let result = self.machine.decide(Now::system(), owner, epoch, &reason);
                    let answer = match result {
                        Ok(actions) => {
                            tracing::info!(
                                owner = owner_name(owner),
                                epoch = %epoch,
                                "control decision: {reason}"
                            );
                            self.carry_out(actions)
                                .await
                                .map(|()| epoch)
                                .map_err(DecisionRefused::NotStored)
                        }
                        Err(stale) => {
                            tracing::warn!("control decision refused: {stale}");
                            Err(stale.into())
                        }
                    };
                    let _ = reply.send(answer);
                }
                Command::ReplicaChanged => self.reconcile().await,
                Command::Granted { reply, .. } => {
                    let _ = reply.send(Err(
                        "this edge is no node of a site pair: it takes control decisions".into(),
                    ));
                }
                Command::Peer(_) | Command::Devices(_) => {}
            }
            self.publish();
        }
    }

    fn publish(&self) {
        *self.view.write().unwrap_or_else(|p| p.into_inner()) = ControlView {
            state: self.machine.state(),
            active: self.machine.is_active(),
            online: self.link.is_some(),
            master_ready: self.machine.master_ready(),
            takeover_worst_ms: self.machine.timing().worst_case_takeover_ms(),
            pair: None,
        };
    }

    /// Runs this edge's modules of the replica while it controls them; none otherwise.
    async fn reconcile(&self) {
        let running = match self.machine.is_active() {
            true => Running::All,
            false => Running::Nothing,
        };
        let decided = (running, self.machine.state());
        reconcile_modules(
            &self.replica,
            &self.runtime,
            &self.store,
            self.link.as_ref(),
            &self.edge_id,
            decided,
        )
        .await;
    }

    /// Carries out the machine's actions in order; a grant or claim the store did not
    /// take stops the batch there (the machine is told), and the answer says why.
    async fn carry_out(&mut self, actions: Vec<EdgeAction>) -> Result<(), String> {
        for action in actions {
            match action {
                EdgeAction::Persist(state) => {
                    let store = self.store.clone();
                    let id = self.edge_id.clone();
                    let stored =
                        tokio::task::spawn_blocking(move || store.set_control_state(&id, state))
                            .await;
                    let why = match stored {
                        Ok(Ok(())) => {
                            self.runtime.set_grant(&self.edge_id, state);
                            continue;
                        }
                        Ok(Err(err)) => err.to_string(),
                        Err(err) => err.to_string(),
                    };
                    tracing::error!(
                        ?state,
                        "cannot store the control state, so it is not acted on (tried again): {why}"
                    );
                    self.runtime.metrics().grant_store_failed(&self.edge_id);
                    self.machine.store_failed(Now::system());
                    self.runtime.set_grant(&self.edge_id, self.machine.state());
                    return Err(why);
                }
                EdgeAction::StartModules { epoch } => {
                    tracing::info!(%epoch, "this edge runs its modules");
                    self.publish();
                    self.reconcile().await;
                }
                EdgeAction::StopModules => {
                    tracing::info!("this edge stops its modules (the master controls them)");
                    self.publish();
                    self.reconcile().await;
                }
                EdgeAction::SendReport(report) => {
                    if let Some(link) = self.link.clone() {
                        tokio::spawn(async move {
                            let request = Request::ControlReport {
                                owner: report.state.owner,
                                epoch: report.state.epoch,
                                controlling: report.controlling,
                            };
                            if let Err(err) = link.request(request, REPORT_TIMEOUT).await {
                                tracing::warn!("control report not taken: {err}");
                            }
                        });
                    }
                }
                EdgeAction::Audit { record, report } => {
                    tracing::warn!(
                        from = owner_name(record.from),
                        to = owner_name(record.to),
                        epoch = %record.epoch,
                        "change of owner: {}",
                        record.reason
                    );
                    // The edge's log holds what it decided alone; the master logs its own
                    // decisions.
                    if report {
                        self.store.record_audits(vec![record], AUDIT_KEEP).await;
                        if let Some(link) = self.link.clone() {
                            tokio::spawn(report_audits(link, self.store.clone()));
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// Sleeps for `wait`, or forever when there is nothing to wait for.
pub(crate) async fn sleep_or_never(wait: Option<Duration>) {
    match wait {
        Some(wait) => tokio::time::sleep(wait).await,
        None => std::future::pending().await,
    }
}

/// Audit records per report: the master takes no more in one request.
const AUDIT_BATCH: usize = 256;
/// How long to wait before reporting again when the master's rate limit refused a batch.
const AUDIT_RETRY: Duration = Duration::from_secs(5);

/// Sends the master the audit records it has not acknowledged yet, a batch at a time,
/// waiting when the master's rate limit says so, until all are taken or the link goes.
pub(crate) async fn report_audits(link: Link, store: Arc<Store>) {
    // One reporter at a time, so that two links' reporters never send a record twice.
    static REPORTING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _one = REPORTING.lock().await;
    while !link.is_closed() {
        let pending = {
            let store = store.clone();
            tokio::task::spawn_blocking(move || {
                let reported = store.audit_reported()?;
                store.audit_after(reported)
            })
            .await
        };
        let Ok(Ok(mut pending)) = pending else {
            tracing::error!("cannot read the audit log: {pending:?}");
            return;
        };
        pending.truncate(AUDIT_BATCH);
        let Some(last) = pending.last().map(|entry| entry.seq) else {
            return;
        };
        let events = pending.into_iter().map(|entry| entry.record).collect();
        match link
            .request(Request::AuditEvents { events }, REPORT_TIMEOUT)
            .await
        {
            Ok(_) => {
                let store = store.clone();
                let _ = tokio::task::spawn_blocking(move || store.set_audit_reported(last)).await;
            }
            Err(LinkError::Remote(refused)) if refused.code == ErrorCode::Busy => {
                tracing::info!("the master takes audit events more slowly: {refused}");
                tokio::time::sleep(AUDIT_RETRY).await;
            }
            Err(err) => {
                tracing::warn!("audit events not taken (sent again on the next link): {err}");
                return;
            }
        }
    }
}

/// Streams every status change of the modules running here to the master, starting with
/// their whole maps, until the link closes. A subscriber that falls behind sends the
/// whole maps again.
pub(crate) async fn stream_status(link: Link, runtime: Runtime, view: Arc<RwLock<ControlView>>) {
    let epoch = || view.read().unwrap_or_else(|p| p.into_inner()).state.epoch;
    let mut changes = runtime.subscribe_status();
    'resend: loop {
        for (module_id, status) in runtime.statuses() {
            for (key, value) in status {
                if send_status(&link, &module_id, key, &value, epoch())
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
        loop {
            let change = tokio::select! {
                change = changes.recv() => change,
                _ = link.closed() => return,
            };
            match change {
                Ok(change) => {
                    // Gone (stopped since) is fine: its next status comes from its next run.
                    let Some(value) = runtime.status_value(&change.module_id, &change.key) else {
                        continue;
                    };
                    if send_status(&link, &change.module_id, change.key, &value, epoch())
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => continue 'resend,
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }
}

async fn send_status(
    link: &Link,
    module_id: &str,
    key: String,
    value: &Value,
    epoch: Epoch,
) -> Result<(), ()> {
    let notice = Notice::StatusChanged {
        module_id: module_id.to_string(),
        key,
        value: Json(value.to_string()),
        epoch,
    };
    link.notify(notice).await.map_err(|_| ())
}
