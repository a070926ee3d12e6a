//! The cluster's shared store in etcd (v3 API), behind the same interfaces as the redb
//! store (built with the `etcd` feature; the master's `cluster` feature turns it on).
//!
//! Keys live under one prefix (`/tether/` unless told otherwise), readable with `etcdctl
//! get --prefix /tether/`: values are JSON. A compare-and-set compares the key's
//! `mod_revision` (the etcd revision that last wrote it), not its bytes, so a change of
//! encoding between versions of Tether cannot make two deciders both win.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, Txn, TxnOp};

use super::StoreError;
use super::grants::{Grants, IssueError, Pending};
use crate::control::ControlState;
use crate::control::clock::{Mono, mono_now};
use crate::control::lease::LeaseClock;

/// The prefix of every key Tether writes, unless the configuration names another.
pub const DEFAULT_PREFIX: &str = "/tether/";

/// A connection to an etcd cluster (cheap to clone: one channel, balanced over the
/// endpoints).
#[derive(Clone)]
pub struct Etcd {
    client: Client,
    endpoints: Arc<str>,
    prefix: Arc<str>,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl Etcd {
    /// Connects to `endpoints` (`http://host:port` ...) and checks that the cluster
    /// answers within `timeout`; every later request has the same deadline. The error
    /// names the endpoints.
    pub async fn connect(
        endpoints: &[String],
        prefix: &str,
        timeout: Duration,
    ) -> Result<Etcd, StoreError> {
        let named: Arc<str> = endpoints.join(", ").into();
        let options = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_timeout(timeout);
        let client = Client::connect(endpoints, Some(options))
            .await
            .map_err(|err| etcd_error(&named, "cannot connect", err))?;
        let etcd = Etcd {
            client,
            endpoints: named,
            prefix: prefix.into(),
        };
        // The channel connects lazily: a read says whether anyone answers.
        etcd.client()
            .get(etcd.key("ping"), Some(GetOptions::new().with_count_only()))
            .await
            .map_err(|err| etcd.error("no answer", err))?;
        Ok(etcd)
    }

    /// A client on the shared channel (requests need `&mut`).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The full key of `rest` under the prefix.
    pub fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }

    /// A store error naming the endpoints.
    pub fn error(&self, what: &str, err: etcd_client::Error) -> StoreError {
        etcd_error(&self.endpoints, what, err)
    }
}

fn etcd_error(endpoints: &str, what: &str, err: etcd_client::Error) -> StoreError {
    StoreError::Etcd {
        endpoints: endpoints.to_string(),
        what: format!("{what}: {err}"),
    }
}

/// Grants in etcd, one key per unit: `PREFIX grants/UNIT` holding the grant's JSON.
#[derive(Debug, Clone)]
pub struct EtcdGrants {
    etcd: Etcd,
}

/// A stored grant with the revision that wrote it (`None`: never granted).
type Read = (ControlState, Option<i64>);

impl EtcdGrants {
    /// Grants kept in `etcd`.
    pub fn new(etcd: Etcd) -> Self {
        EtcdGrants { etcd }
    }

    fn key(&self, unit: &str) -> String {
        self.etcd.key(&format!("grants/{unit}"))
    }

    fn decode(&self, unit: &str, value: &[u8]) -> Result<ControlState, StoreError> {
        serde_json::from_slice(value).map_err(|err| StoreError::Etcd {
            endpoints: self.etcd.endpoints.to_string(),
            what: format!("the grant of {unit} does not decode: {err}"),
        })
    }

    async fn read(&self, unit: &str) -> Result<Read, StoreError> {
        let answer = self
            .etcd
            .client()
            .get(self.key(unit), None)
            .await
            .map_err(|err| self.etcd.error("cannot read a grant", err))?;
        match answer.kvs().first() {
            None => Ok((ControlState::default(), None)),
            Some(kv) => Ok((self.decode(unit, kv.value())?, Some(kv.mod_revision()))),
        }
    }

    async fn all(&self) -> Result<BTreeMap<String, ControlState>, StoreError> {
        let prefix = self.key("");
        let answer = self
            .etcd
            .client()
            .get(prefix.clone(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|err| self.etcd.error("cannot read the grants", err))?;
        let mut grants = BTreeMap::new();
        for kv in answer.kvs() {
            let unit = String::from_utf8_lossy(&kv.key()[prefix.len()..]).into_owned();
            let grant = self.decode(&unit, kv.value())?;
            grants.insert(unit, grant);
        }
        Ok(grants)
    }

    async fn issue_grant(
        &self,
        unit: &str,
        expected: ControlState,
        grant: ControlState,
    ) -> Result<(), IssueError> {
        let conflict = |stored| IssueError::Conflict {
            unit: unit.to_string(),
            expected,
            grant,
            stored,
        };
        let (stored, revision) = self.read(unit).await?;
        if stored != expected || grant.epoch <= expected.epoch {
            return Err(conflict(stored));
        }
        let key = self.key(unit);
        let unchanged = match revision {
            Some(revision) => Compare::mod_revision(key.clone(), CompareOp::Equal, revision),
            None => Compare::version(key.clone(), CompareOp::Equal, 0),
        };
        // A grant always encodes: an enum and an integer.
        let value = serde_json::to_vec(&grant).unwrap_or_default();
        let txn = Txn::new()
            .when([unchanged])
            .and_then([TxnOp::put(key, value, None)]);
        let answer = self
            .etcd
            .client()
            .txn(txn)
            .await
            .map_err(|err| self.etcd.error("cannot issue a grant", err))?;
        if answer.succeeded() {
            return Ok(());
        }
        // Another decider wrote in between: say what it stored.
        let (stored, _) = self.read(unit).await?;
        Err(conflict(stored))
    }
}

impl Grants for EtcdGrants {
    fn grants(self: Arc<Self>) -> Pending<Result<BTreeMap<String, ControlState>, StoreError>> {
        Box::pin(async move { self.all().await })
    }

    fn issue(
        self: Arc<Self>,
        unit: String,
        expected: ControlState,
        grant: ControlState,
    ) -> Pending<Result<(), IssueError>> {
        Box::pin(async move { self.issue_grant(&unit, expected, grant).await })
    }
}

/// This master's presence: a key `PREFIX masters/ID` attached to a lease it keeps alive,
/// so that the key vanishes when the master dies or is cut off from etcd. What the master
/// may do on the lease is [`LeaseClock`]'s to say, published on [`held_until`].
///
/// [`held_until`]: Presence::held_until
pub struct Presence {
    lease: i64,
    held_until: tokio::sync::watch::Receiver<Option<Mono>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Presence {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Why a master could not join.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// Another live master holds this id.
    #[error(
        "master id {0:?} is already in use by a live master (its presence key exists under another lease): give each master its own master_id"
    )]
    DuplicateId(String),
    /// etcd failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Presence {
    /// Grants a lease of `ttl_ms` (rounded up to whole seconds, etcd's unit), writes the
    /// presence key with `info` under it, and keeps the lease alive from a task of its
    /// own. A key of the same id still there is waited out for a time to live (this
    /// master's previous run, killed); one kept alive longer is a live master with the
    /// same id, and refused.
    pub async fn join(
        etcd: &Etcd,
        master_id: &str,
        info: &serde_json::Value,
        ttl_ms: u64,
    ) -> Result<Presence, JoinError> {
        let mut client = etcd.client();
        let ttl_s = ttl_ms.div_ceil(1000).max(1) as i64;
        let sent = mono_now();
        let granted = client
            .lease_grant(ttl_s, None)
            .await
            .map_err(|err| etcd.error("cannot grant a lease", err))?;
        let mut clock = LeaseClock::new(ttl_s as u64 * 1000);
        clock.renewed(sent, granted.ttl().max(0) as u64 * 1000);
        let lease = granted.id();
        let key = etcd.key(&format!("masters/{master_id}"));
        let value = serde_json::to_vec(info).unwrap_or_default();
        let txn = Txn::new()
            .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key,
                value,
                Some(etcd_client::PutOptions::new().with_lease(lease)),
            )]);
        // A key left by this master's previous run (killed within its time to live)
        // expires within that time; one kept alive longer belongs to a live master.
        let give_up = tokio::time::Instant::now() + Duration::from_millis(ttl_ms + 1000);
        loop {
            let answer = client
                .txn(txn.clone())
                .await
                .map_err(|err| etcd.error("cannot write the presence key", err))?;
            if answer.succeeded() {
                break;
            }
            if tokio::time::Instant::now() >= give_up {
                let _ = client.lease_revoke(lease).await;
                return Err(JoinError::DuplicateId(master_id.to_string()));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let (publish, held_until) = tokio::sync::watch::channel(clock.held_until());
        let task = tokio::spawn(keep_alive(etcd.clone(), lease, clock, publish));
        Ok(Presence {
            lease,
            held_until,
            task,
        })
    }

    /// The lease's id in etcd (keys attached to it vanish with it).
    pub fn lease(&self) -> i64 {
        self.lease
    }

    /// Until when this master may act on its lease (`None`: it may not), on its
    /// monotonic clock; changes with every answered keep-alive.
    pub fn held_until(&self) -> tokio::sync::watch::Receiver<Option<Mono>> {
        self.held_until.clone()
    }
}

/// Sends a keep-alive every third of the time to live (counted from the last send), and
/// publishes until when the lease is held. An answer must come within half that period;
/// a keep-alive unanswered, or a stream that fails, is tried again at once on a new
/// stream, so that one lost keep-alive leaves the others their chance before the clock
/// runs out. A lease etcd says is gone stays lost (joining again is the master's call).
async fn keep_alive(
    etcd: Etcd,
    lease: i64,
    mut clock: LeaseClock,
    publish: tokio::sync::watch::Sender<Option<Mono>>,
) {
    let every = Duration::from_millis(clock.keep_alive_every_ms());
    let answer_within = every / 2;
    let mut stream = None;
    let mut next_send = tokio::time::Instant::now() + every;
    loop {
        tokio::time::sleep_until(next_send).await;
        if stream.is_none() {
            stream = tokio::time::timeout(answer_within, etcd.client().lease_keep_alive(lease))
                .await
                .ok()
                .and_then(Result::ok);
        }
        let Some((keeper, answers)) = stream.as_mut() else {
            tracing::warn!(lease, "presence keep-alive: etcd unreachable; trying again");
            next_send = tokio::time::Instant::now() + RETRY_PAUSE;
            continue;
        };
        let sent = mono_now();
        let sent_at = tokio::time::Instant::now();
        let answered = async {
            keeper.keep_alive().await?;
            answers.message().await
        };
        match tokio::time::timeout(answer_within, answered).await {
            Ok(Ok(Some(answer))) if answer.ttl() > 0 => {
                clock.renewed(sent, answer.ttl() as u64 * 1000);
                next_send = sent_at + every;
            }
            Ok(Ok(Some(_))) => {
                tracing::error!(lease, "etcd says the presence lease is gone");
                clock.lost();
                publish.send_replace(clock.held_until());
                return;
            }
            Ok(Ok(None)) | Ok(Err(_)) | Err(_) => {
                tracing::warn!(lease, "presence keep-alive unanswered; trying again");
                stream = None;
                next_send = tokio::time::Instant::now() + RETRY_PAUSE;
            }
        }
        publish.send_replace(clock.held_until());
    }
}

/// The pause before trying a failed keep-alive again (not a busy loop against an etcd
/// that refuses at once).
const RETRY_PAUSE: Duration = Duration::from_millis(100);
