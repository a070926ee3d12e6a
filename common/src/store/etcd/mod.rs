//! The cluster's shared store in etcd (v3 API), behind the same interfaces as the redb
//! store (built with the `etcd` feature; the master's `cluster` feature turns it on).
//!
//! Keys live under one prefix (`/tether/` unless told otherwise), readable with `etcdctl
//! get --prefix /tether/`: values are JSON. A compare-and-set compares the key's
//! `mod_revision` (the etcd revision that last wrote it), not its bytes, so a change of
//! encoding between versions of Tether cannot make two deciders both win.

use crate::identity::{EdgeId, Epoch, MasterId, UnitId};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, GetResponse, KeyValue, PutOptions,
    PutResponse, Txn, TxnOp, TxnResponse,
};

pub mod audit;
pub mod code;
pub mod model;

pub use audit::EtcdAudit;
pub use code::EtcdCode;
pub use model::EtcdModel;

use super::StoreError;
use super::grants::{Claims, Grants, Held, IssueError, PairGrants, Pending};
use crate::control::clock::{Mono, mono_now};
use crate::control::lease::{ClockPair, LeaseClock, unseen_ms};
use crate::control::pair::{PairGrant, PairHolder};
use crate::control::{ControlState, Owner};

/// The prefix of every key Tether writes, unless the configuration names another.
pub const DEFAULT_PREFIX: &str = "/tether/";

/// Keys one read asks for at most (a large folder is read in pages at one revision).
const PAGE: i64 = 500;

/// Tries of a request that reached no member (see [`Etcd::retry_unsent`]), and the
/// pauses between them: the first, doubled each time up to the last.
const UNSENT_TRIES: u32 = 16;
const UNSENT_FIRST_PAUSE: Duration = Duration::from_millis(5);
const UNSENT_MAX_PAUSE: Duration = Duration::from_millis(50);
/// The largest answer a read or a watch takes: a page of large log entries or of code
/// chunks, or a lagging watch's batch, is more than gRPC's default of 4 MiB.
pub(super) const READ_LIMIT: usize = 64 << 20;

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
        Self::connect_with(endpoints, prefix, timeout, None).await
    }

    /// [`connect`](Self::connect), over TLS when `tls` is given.
    pub async fn connect_with(
        endpoints: &[String],
        prefix: &str,
        timeout: Duration,
        tls: Option<etcd_client::TlsOptions>,
    ) -> Result<Etcd, StoreError> {
        let named: Arc<str> = endpoints.join(", ").into();
        // HTTP/2 pings find a dead connection (a member gone silent) within the timeout,
        // and a member cut off from the quorum refuses (a watch on it ends) rather than
        // answer silently stale.
        let mut options = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_timeout(timeout)
            .with_keep_alive(timeout, timeout)
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        if let Some(tls) = tls {
            options = options.with_tls(tls);
        }
        let client = Client::connect(endpoints, Some(options))
            .await
            .map_err(|err| etcd_error(&named, "cannot connect", err))?;
        let etcd = Etcd {
            client,
            endpoints: named,
            prefix: prefix.into(),
        };
        // The channel connects lazily: a read says whether anyone answers.
        etcd.get(
            "no answer",
            etcd.key("ping"),
            Some(GetOptions::new().with_count_only()),
        )
        .await?;
        Ok(etcd)
    }

    /// A client on the shared channel (requests need `&mut`).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Runs `request` on the shared channel, and again when it reached no member.
    ///
    /// The channel balances over the members and connects to each one lazily. While a
    /// member is down, the balancer still hands it requests now and then (etcd-client's
    /// issue 39), and each fails at once with a connect error though the others keep
    /// the quorum. Such a request was never sent, so trying it again, most likely on
    /// another member, cannot apply it twice. Any other answer or error is returned as
    /// it is: a request that may have reached etcd is not repeated here.
    pub async fn retry_unsent<T, F>(
        &self,
        mut request: impl FnMut(Client) -> F,
    ) -> Result<T, etcd_client::Error>
    where
        F: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut pause = UNSENT_FIRST_PAUSE;
        for _ in 1..UNSENT_TRIES {
            match request(self.client()).await {
                Err(err) if never_sent(&err) => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(UNSENT_MAX_PAUSE);
                }
                answer => return answer,
            }
        }
        request(self.client()).await
    }

    /// [`retry_unsent`](Self::retry_unsent), its error a store error saying `what` failed.
    pub async fn call<T, F>(
        &self,
        what: &str,
        request: impl FnMut(Client) -> F,
    ) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        self.retry_unsent(request)
            .await
            .map_err(|err| self.error(what, err))
    }

    /// A read (see [`call`](Self::call)).
    pub async fn get(
        &self,
        what: &str,
        key: impl Into<Vec<u8>>,
        options: Option<GetOptions>,
    ) -> Result<GetResponse, StoreError> {
        let key = key.into();
        self.call(what, |mut client| {
            let (key, options) = (key.clone(), options.clone());
            async move { client.get(key, options).await }
        })
        .await
    }

    /// A transaction (see [`call`](Self::call)).
    pub async fn txn(&self, what: &str, txn: Txn) -> Result<TxnResponse, StoreError> {
        self.call(what, |mut client| {
            let txn = txn.clone();
            async move { client.txn(txn).await }
        })
        .await
    }

    /// A write of one key (see [`call`](Self::call)).
    pub async fn put(
        &self,
        what: &str,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
        options: Option<PutOptions>,
    ) -> Result<PutResponse, StoreError> {
        let (key, value) = (key.into(), value.into());
        self.call(what, |mut client| {
            let (key, value, options) = (key.clone(), value.clone(), options.clone());
            async move { client.put(key, value, options).await }
        })
        .await
    }

    /// How long ago `lease` was last renewed, in whole seconds as etcd counts them
    /// (`None`: etcd does not know it, or did not answer within a second).
    pub async fn lease_age_ms(&self, lease: i64) -> Option<u64> {
        let asked = self
            .retry_unsent(|mut client| async move { client.lease_time_to_live(lease, None).await });
        let answer = tokio::time::timeout(Duration::from_secs(1), asked)
            .await
            .ok()?
            .ok()?;
        (answer.ttl() >= 0).then(|| (answer.granted_ttl() - answer.ttl()).max(0) as u64 * 1000)
    }

    /// The full key of `rest` under the prefix.
    pub fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }

    /// Every key from `start` up to `end`, read in pages at one revision (`at`, or the
    /// newest); returns the keys and the revision read.
    pub(super) async fn read_range(
        &self,
        start: String,
        end: Vec<u8>,
        at: Option<i64>,
    ) -> Result<(Vec<KeyValue>, i64), StoreError> {
        let mut kvs = Vec::new();
        let mut from = start.into_bytes();
        let mut revision = at.unwrap_or(0);
        loop {
            let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if revision > 0 {
                options = options.with_revision(revision);
            }
            let mut answer = self
                .call("cannot read", |client| {
                    let (from, options) = (from.clone(), options.clone());
                    async move {
                        client
                            .kv_client()
                            .max_decoding_message_size(READ_LIMIT)
                            .get(from, Some(options))
                            .await
                    }
                })
                .await?;
            if revision == 0 {
                revision = answer.header().map(|h| h.revision()).unwrap_or_default();
            }
            let more = answer.more();
            let page = answer.take_kvs();
            let Some(last) = page.last() else {
                return Ok((kvs, revision));
            };
            // The next page starts just after the last key read.
            from = last.key().to_vec();
            from.push(0);
            kvs.extend(page);
            if !more {
                return Ok((kvs, revision));
            }
        }
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

/// A grant as etcd holds it (JSON): for a master's grant, the master it names.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct StoredGrant {
    #[serde(flatten)]
    grant: ControlState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    master: Option<MasterId>,
}

/// One master's view of the control state the masters share in etcd: grants
/// (`PREFIX grants/UNIT`), claims (`PREFIX running/UNIT`: the master that runs the unit,
/// on its lease) and link keys (`PREFIX links/EDGE`: the master holding the edge's link,
/// on its lease). Every write of this master is a transaction that also asks for its
/// lease, so a master whose lease etcd has expired can change nothing.
#[derive(Debug, Clone)]
pub struct EtcdControl {
    etcd: Etcd,
    master_id: MasterId,
    /// The presence lease this master writes under (0: none, only in tests without
    /// presence); replaced when the master joins again on a new lease.
    lease: Arc<std::sync::atomic::AtomicI64>,
    /// Requests in flight at most: thousands of units deciding at once (a mass failover)
    /// queue here rather than overrun etcd and time out together.
    slots: Arc<tokio::sync::Semaphore>,
}

/// Requests to etcd one master's control has in flight at most.
const CONTROL_IN_FLIGHT: usize = 32;

/// A stored grant with the revision that wrote it (`None`: never granted).
type Read = (StoredGrant, Option<i64>);

impl EtcdControl {
    /// Master `master_id`'s view, writing under `lease` (its presence lease).
    pub fn new(etcd: Etcd, master_id: &MasterId, lease: Option<i64>) -> Self {
        EtcdControl {
            etcd,
            master_id: master_id.clone(),
            lease: Arc::new(lease.unwrap_or(0).into()),
            slots: Arc::new(tokio::sync::Semaphore::new(CONTROL_IN_FLIGHT)),
        }
    }

    /// Waits for a slot among the requests in flight (held until dropped).
    async fn slot(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        // The semaphore is never closed.
        self.slots.acquire().await.ok()
    }

    /// Writes from now on go under `lease` (the master joined again).
    pub fn set_lease(&self, lease: i64) {
        self.lease
            .store(lease, std::sync::atomic::Ordering::Relaxed);
    }

    fn current_lease(&self) -> Option<i64> {
        Some(self.lease.load(std::sync::atomic::Ordering::Relaxed)).filter(|l| *l != 0)
    }

    fn grant_key(&self, unit: &str) -> String {
        self.etcd.key(&format!("grants/{unit}"))
    }

    fn claim_key(&self, unit: &str) -> String {
        self.etcd.key(&format!("running/{unit}"))
    }

    fn link_key(&self, edge: &str) -> String {
        self.etcd.key(&format!("links/{edge}"))
    }

    /// The condition that this master's lease still lives (its presence key is on it).
    fn lease_holds(&self) -> Vec<Compare> {
        match self.current_lease() {
            Some(lease) => vec![Compare::lease(
                self.etcd.key(&format!("masters/{}", self.master_id)),
                CompareOp::Equal,
                lease,
            )],
            None => Vec::new(),
        }
    }

    fn put_options(&self) -> Option<etcd_client::PutOptions> {
        self.current_lease()
            .map(|lease| etcd_client::PutOptions::new().with_lease(lease))
    }

    fn decode(&self, unit: &str, value: &[u8]) -> Result<StoredGrant, StoreError> {
        serde_json::from_slice(value).map_err(|err| StoreError::Etcd {
            endpoints: self.etcd.endpoints.to_string(),
            what: format!("the grant of {unit} does not decode: {err}"),
        })
    }

    async fn read(&self, unit: &str) -> Result<Read, StoreError> {
        let answer = self
            .etcd
            .get("cannot read a grant", self.grant_key(unit), None)
            .await?;
        match answer.kvs().first() {
            None => Ok((
                StoredGrant {
                    grant: ControlState::default(),
                    master: None,
                },
                None,
            )),
            Some(kv) => Ok((self.decode(unit, kv.value())?, Some(kv.mod_revision()))),
        }
    }

    async fn all(&self) -> Result<BTreeMap<UnitId, Held>, StoreError> {
        let prefix = self.grant_key("");
        let answer = self
            .etcd
            .get(
                "cannot read the grants",
                prefix.clone(),
                Some(GetOptions::new().with_prefix()),
            )
            .await?;
        let mut grants = BTreeMap::new();
        for kv in answer.kvs() {
            let unit = String::from_utf8_lossy(&kv.key()[prefix.len()..]).into_owned();
            let stored = self.decode(&unit, kv.value())?;
            let here = stored.master.as_deref() == Some(self.master_id.as_str());
            grants.insert(
                UnitId::new(unit),
                Held {
                    grant: stored.grant,
                    here,
                },
            );
        }
        Ok(grants)
    }

    async fn issue_grant(
        &self,
        unit: &str,
        expected: ControlState,
        grant: ControlState,
        here: bool,
    ) -> Result<(), IssueError> {
        let conflict = |stored: StoredGrant| IssueError::Conflict {
            unit: UnitId::new(unit),
            expected,
            grant,
            stored_here: stored.master.as_deref() == Some(self.master_id.as_str()),
            stored: stored.grant,
        };
        let (stored, revision) = self.read(unit).await?;
        if stored.grant != expected || grant.epoch <= expected.epoch {
            return Err(conflict(stored));
        }
        let master = match (grant.owner, here) {
            (Owner::Edge, _) => None,
            (Owner::Master, true) => Some(self.master_id.clone()),
            // Kept with the master the expected grant names.
            (Owner::Master, false) => match stored.master.clone() {
                Some(master) => Some(master),
                None => return Err(conflict(stored)),
            },
        };
        let key = self.grant_key(unit);
        let unchanged = match revision {
            Some(revision) => Compare::mod_revision(key.clone(), CompareOp::Equal, revision),
            None => Compare::version(key.clone(), CompareOp::Equal, 0),
        };
        // A grant always encodes: an enum, an integer and a string.
        let value = serde_json::to_vec(&StoredGrant { grant, master }).unwrap_or_default();
        let mut when = self.lease_holds();
        when.push(unchanged);
        // Taking a unit for itself, a master also asks that no other master holds the
        // edge's link or claims the unit (as it last read them), whatever its watch says.
        if grant.owner == Owner::Master && here {
            for key in [self.link_key(unit), self.claim_key(unit)] {
                match self.owner_of(&key).await? {
                    (Some(owner), _) if self.master_id != link_master(&owner) => {
                        return Err(conflict(stored));
                    }
                    (_, revision) => when.push(match revision {
                        Some(revision) => Compare::mod_revision(key, CompareOp::Equal, revision),
                        None => Compare::version(key, CompareOp::Equal, 0),
                    }),
                }
            }
        }
        let mut then = vec![TxnOp::put(key, value, None)];
        // A master's grant for itself carries its claim: no watcher sees the one
        // without the other.
        if grant.owner == Owner::Master && here {
            then.push(TxnOp::put(
                self.claim_key(unit),
                self.master_id.as_bytes(),
                self.put_options(),
            ));
        }
        let txn = Txn::new().when(when).and_then(then);
        if self.commit(txn, "cannot issue a grant").await? {
            return Ok(());
        }
        // Another decider wrote in between, or the lease is gone: say what is stored.
        let (stored, _) = self.read(unit).await?;
        Err(conflict(stored))
    }

    /// The master a link or claim key names, and the revision that wrote it.
    async fn owner_of(&self, key: &str) -> Result<(Option<String>, Option<i64>), StoreError> {
        let answer = self.etcd.get("cannot read a key", key, None).await?;
        Ok(match answer.kvs().first() {
            Some(kv) => (
                Some(String::from_utf8_lossy(kv.value()).into_owned()),
                Some(kv.mod_revision()),
            ),
            None => (None, None),
        })
    }

    /// A refusal naming what was refused and why.
    fn refused(&self, what: String) -> StoreError {
        StoreError::Etcd {
            endpoints: self.etcd.endpoints.to_string(),
            what,
        }
    }

    async fn claim_unit(&self, unit: &str, epoch: Epoch) -> Result<(), StoreError> {
        let (stored, revision) = self.read(unit).await?;
        let mine = StoredGrant {
            grant: ControlState {
                owner: Owner::Master,
                epoch,
            },
            master: Some(self.master_id.clone()),
        };
        let Some(revision) = revision.filter(|_| stored == mine) else {
            return Err(self.refused(format!(
                "claim of {unit} refused: the grant is {stored:?}, not this master's at epoch {epoch}"
            )));
        };
        let claim = self.claim_key(unit);
        let mut when = self.lease_holds();
        when.push(Compare::mod_revision(
            self.grant_key(unit),
            CompareOp::Equal,
            revision,
        ));
        // No claim, or this master's own.
        let free = Compare::version(claim.clone(), CompareOp::Equal, 0);
        let own = Compare::value(claim.clone(), CompareOp::Equal, self.master_id.as_bytes());
        for condition in [free, own] {
            let mut when = when.clone();
            when.push(condition);
            let txn = Txn::new().when(when).and_then([TxnOp::put(
                claim.clone(),
                self.master_id.as_bytes(),
                self.put_options(),
            )]);
            if self.commit(txn, "cannot claim a unit").await? {
                return Ok(());
            }
        }
        Err(self.refused(format!(
            "claim of {unit} refused: another master's claim stands, the grant changed, or this master's lease is gone"
        )))
    }

    /// Runs `txn`; answers whether its conditions held. `what` names it in an error.
    async fn commit(&self, txn: Txn, what: &str) -> Result<bool, StoreError> {
        self.etcd
            .txn(what, txn)
            .await
            .map(|answer| answer.succeeded())
    }

    /// Deletes `key` if it holds `value`.
    async fn delete_if(&self, key: String, value: &str, what: &str) -> Result<(), StoreError> {
        let txn = Txn::new()
            .when([Compare::value(key.clone(), CompareOp::Equal, value)])
            .and_then([TxnOp::delete(key, None)]);
        self.commit(txn, what).await.map(|_| ())
    }

    /// A link key's value: the master, and the link's generation (so that the end of an
    /// old link never withdraws a newer one's key).
    fn link_value(&self, generation: u64) -> String {
        format!("{}#{generation}", self.master_id)
    }

    async fn link_edge(&self, edge: &str, generation: u64) -> Result<(), StoreError> {
        let txn = Txn::new().when(self.lease_holds()).and_then([TxnOp::put(
            self.link_key(edge),
            self.link_value(generation),
            self.put_options(),
        )]);
        if self.commit(txn, "cannot store a link key").await? {
            Ok(())
        } else {
            Err(self.refused(format!(
                "link key of {edge} refused: this master's lease is gone"
            )))
        }
    }
}

impl Grants for EtcdControl {
    fn grants(self: Arc<Self>) -> Pending<Result<BTreeMap<UnitId, Held>, StoreError>> {
        Box::pin(async move {
            let _slot = self.slot().await;
            self.all().await
        })
    }

    fn issue(
        self: Arc<Self>,
        unit: UnitId,
        expected: ControlState,
        grant: ControlState,
        here: bool,
    ) -> Pending<Result<(), IssueError>> {
        Box::pin(async move {
            let _slot = self.slot().await;
            self.issue_grant(&unit, expected, grant, here).await
        })
    }

    fn confirm(
        self: Arc<Self>,
        unit: UnitId,
        grant: ControlState,
    ) -> Pending<Result<(), IssueError>> {
        Box::pin(async move {
            let _slot = self.slot().await;
            self.confirm_grant(&unit, grant).await
        })
    }
}

impl EtcdControl {
    async fn confirm_grant(&self, unit: &str, grant: ControlState) -> Result<(), IssueError> {
        let (stored, _) = self.read(unit).await?;
        if stored.grant == grant {
            return Ok(());
        }
        Err(IssueError::Conflict {
            unit: UnitId::new(unit),
            expected: grant,
            grant,
            stored_here: stored.master.as_deref() == Some(self.master_id.as_str()),
            stored: stored.grant,
        })
    }
}

impl EtcdControl {
    fn pair_key(&self, location: &str) -> String {
        self.etcd.key(&format!("pair_grants/{location}"))
    }

    /// A pair's stored grant and the revision that wrote it.
    async fn read_pair(
        &self,
        location: &str,
    ) -> Result<(Option<PairGrant>, Option<i64>), StoreError> {
        let answer = self
            .etcd
            .get("cannot read a pair grant", self.pair_key(location), None)
            .await?;
        match answer.kvs().first() {
            None => Ok((None, None)),
            Some(kv) => {
                let grant = serde_json::from_slice(kv.value()).map_err(|err| {
                    self.refused(format!(
                        "the pair grant of {location} does not decode: {err}"
                    ))
                })?;
                Ok((Some(grant), Some(kv.mod_revision())))
            }
        }
    }

    /// A compare-and-set on the pair grant, under this master's lease; a grant naming
    /// the master carries this master's claim of the modules (none other's may stand),
    /// any other grant withdraws this master's claim.
    async fn issue_pair_grant(
        &self,
        location: &str,
        expected: Option<PairGrant>,
        grant: PairGrant,
    ) -> Result<(), StoreError> {
        let (stored, revision) = self.read_pair(location).await?;
        if stored != expected {
            return Err(self.refused(format!(
                "pair grant of {location} refused: it is {stored:?}, not {expected:?} (another witness decided)"
            )));
        }
        let key = self.pair_key(location);
        let mut when = self.lease_holds();
        when.push(match revision {
            Some(revision) => Compare::mod_revision(key.clone(), CompareOp::Equal, revision),
            None => Compare::version(key.clone(), CompareOp::Equal, 0),
        });
        // A grant always encodes: an enum, strings and an integer.
        let value = serde_json::to_vec(&grant).unwrap_or_default();
        let claim = self.claim_key(location);
        let (owner, claim_revision) = self.owner_of(&claim).await?;
        let mine = owner.as_deref() == Some(self.master_id.as_str());
        // Another master's claim stands: it runs the modules (a witness before this one,
        // its lease not yet gone), and no grant may move them while it does.
        if owner.is_some() && !mine {
            return Err(self.refused(format!(
                "pair grant of {location} refused: master {} claims its modules",
                owner.unwrap_or_default()
            )));
        }
        let mut then = vec![TxnOp::put(key, value, None)];
        if grant.holder == PairHolder::Master {
            then.push(TxnOp::put(
                claim.clone(),
                self.master_id.as_bytes(),
                self.put_options(),
            ));
        } else if mine {
            then.push(TxnOp::delete(claim.clone(), None));
        }
        when.push(match claim_revision {
            Some(revision) => Compare::mod_revision(claim, CompareOp::Equal, revision),
            None => Compare::version(claim, CompareOp::Equal, 0),
        });
        if self
            .commit(
                Txn::new().when(when).and_then(then),
                "cannot issue a pair grant",
            )
            .await?
        {
            return Ok(());
        }
        Err(self.refused(format!(
            "pair grant of {location} refused: it changed meanwhile, a claim changed, or this master's lease is gone"
        )))
    }
}

impl PairGrants for EtcdControl {
    fn load_pair(
        self: Arc<Self>,
        location: UnitId,
    ) -> Pending<Result<Option<PairGrant>, StoreError>> {
        Box::pin(async move {
            let _slot = self.slot().await;
            self.read_pair(&location).await.map(|(grant, _)| grant)
        })
    }

    fn issue_pair(
        self: Arc<Self>,
        location: UnitId,
        expected: Option<PairGrant>,
        grant: PairGrant,
    ) -> Pending<Result<(), StoreError>> {
        Box::pin(async move {
            let _slot = self.slot().await;
            self.issue_pair_grant(&location, expected, grant).await
        })
    }
}

impl Claims for EtcdControl {
    fn claim(self: Arc<Self>, unit: UnitId, epoch: Epoch) -> Pending<Result<(), StoreError>> {
        Box::pin(async move {
            let _slot = self.slot().await;
            self.claim_unit(&unit, epoch).await
        })
    }

    fn release(self: Arc<Self>, unit: UnitId) -> Pending<Result<(), StoreError>> {
        Box::pin(async move {
            let _slot = self.slot().await;
            let key = self.claim_key(&unit);
            let me = self.master_id.clone();
            self.delete_if(key, &me, "cannot withdraw a claim").await
        })
    }

    fn link(self: Arc<Self>, edge: EdgeId, generation: u64) -> Pending<Result<(), StoreError>> {
        Box::pin(async move {
            let _slot = self.slot().await;
            self.link_edge(&edge, generation).await
        })
    }

    fn unlink(self: Arc<Self>, edge: EdgeId, generation: u64) -> Pending<Result<(), StoreError>> {
        Box::pin(async move {
            let _slot = self.slot().await;
            let key = self.link_key(&edge);
            let value = self.link_value(generation);
            self.delete_if(key, &value, "cannot withdraw a link key")
                .await
        })
    }

    fn unlink_stale(self: Arc<Self>, edge: EdgeId) -> Pending<Result<(), StoreError>> {
        Box::pin(async move {
            let _slot = self.slot().await;
            let key = self.link_key(&edge);
            match self.owner_of(&key).await? {
                (Some(value), _) if self.master_id == link_master(&value) => {
                    self.delete_if(key, &value, "cannot withdraw a link key")
                        .await
                }
                _ => Ok(()),
            }
        })
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
    DuplicateId(MasterId),
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
        master_id: &MasterId,
        info: &serde_json::Value,
        ttl_ms: u64,
    ) -> Result<Presence, JoinError> {
        let ttl_s = ttl_ms.div_ceil(1000).max(1) as i64;
        let key = etcd.key(&format!("masters/{master_id}"));
        let value = serde_json::to_vec(info).unwrap_or_default();
        // A key left by this master's previous run (killed within its time to live)
        // expires within that time; one kept alive longer belongs to a live master. Each
        // try is on a lease of its own, granted just before (one granted at the start
        // could expire while the old key is waited out).
        let give_up = tokio::time::Instant::now() + Duration::from_millis(ttl_ms + 1000);
        let (lease, clock) = loop {
            let sent = mono_now();
            let granted = etcd
                .call("cannot grant a lease", |mut client| async move {
                    client.lease_grant(ttl_s, None).await
                })
                .await?;
            let lease = granted.id();
            let txn = Txn::new()
                .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(
                    key.clone(),
                    value.clone(),
                    Some(etcd_client::PutOptions::new().with_lease(lease)),
                )]);
            let answer = etcd.txn("cannot write the presence key", txn).await?;
            if answer.succeeded() {
                let mut clock = LeaseClock::new(ttl_s as u64 * 1000);
                clock.renewed(sent, granted.ttl().max(0) as u64 * 1000);
                break (lease, clock);
            }
            let _ = etcd
                .retry_unsent(|mut client| async move { client.lease_revoke(lease).await })
                .await;
            if tokio::time::Instant::now() >= give_up {
                return Err(JoinError::DuplicateId(master_id.clone()));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
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
    let mut clocks = clock_pair();
    loop {
        // Until the next send, a look at the clocks now and then: after a suspend of the
        // machine longer than the lease's margin, the lease counted on the monotonic
        // clock (which stopped meanwhile) may have expired in etcd, and another master
        // may run the units: it is taken as lost at once, the units stop, and the master
        // joins again.
        let wake = tokio::time::sleep_until(next_send);
        tokio::pin!(wake);
        loop {
            tokio::select! {
                _ = &mut wake => break,
                _ = tokio::time::sleep(SUSPEND_LOOK) => {}
            }
            let now = clock_pair();
            let unseen = unseen_ms(clocks, now);
            clocks = now;
            if unseen >= clock.margin_ms() {
                tracing::error!(
                    lease,
                    unseen_ms = unseen,
                    "the machine was suspended for longer than the lease's margin: the presence lease is taken as lost"
                );
                clock.lost();
                publish.send_replace(clock.held_until());
                return;
            }
        }
        clocks = clock_pair();
        if stream.is_none() {
            let opened =
                etcd.retry_unsent(|mut client| async move { client.lease_keep_alive(lease).await });
            stream = match tokio::time::timeout(answer_within, opened).await {
                Ok(Ok(opened)) => Some(opened),
                Ok(Err(err)) if lease_gone(&err) => {
                    tracing::error!(lease, "etcd says the presence lease is gone: {err}");
                    clock.lost();
                    publish.send_replace(clock.held_until());
                    return;
                }
                Ok(Err(err)) => {
                    tracing::warn!(lease, "presence keep-alive: {err}; trying again");
                    None
                }
                Err(_) => {
                    tracing::warn!(
                        lease,
                        "presence keep-alive: etcd does not answer; trying again"
                    );
                    None
                }
            };
        }
        let Some((keeper, answers)) = stream.as_mut() else {
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
            Ok(Err(err)) if lease_gone(&err) => {
                tracing::error!(lease, "etcd says the presence lease is gone: {err}");
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
        let held = clock.held_until();
        publish.send_if_modified(|now| {
            let changed = *now != held;
            *now = held;
            changed
        });
    }
}

/// The master a link key's value names (`MASTER#GENERATION`).
fn link_master(value: &str) -> &str {
    value.split_once('#').map_or(value, |(master, _)| master)
}

/// Whether `err` says the request reached no member: the connection to the member the
/// balancer picked could not be made (tonic marks that error, and answers UNAVAILABLE).
fn never_sent(err: &etcd_client::Error) -> bool {
    let etcd_client::Error::GRpcStatus(status) = err else {
        return false;
    };
    if status.code() != tonic::Code::Unavailable {
        return false;
    }
    let mut source = std::error::Error::source(status);
    while let Some(cause) = source {
        if cause.is::<tonic::ConnectError>() {
            return true;
        }
        source = cause.source();
    }
    false
}

/// Whether etcd answered that the lease no longer exists (it expired).
fn lease_gone(err: &etcd_client::Error) -> bool {
    err.to_string().contains("lease not found")
}

/// How often the keep-alive task looks for a suspend of the machine.
const SUSPEND_LOOK: Duration = Duration::from_millis(100);

/// The monotonic and boot clocks, read together.
fn clock_pair() -> ClockPair {
    let boot = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    ClockPair {
        mono_ms: mono_now().0,
        boot_ms: (boot.tv_sec as u64)
            .saturating_mul(1000)
            .saturating_add(boot.tv_nsec as u64 / 1_000_000),
    }
}

/// The pause before trying a failed keep-alive again (not a busy loop against an etcd
/// that refuses at once).
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// What the masters share in etcd, as one master mirrors it by watch: presence, grants,
/// claims and link keys, with when each edge's link key last went (on this master's
/// monotonic clock).
#[derive(Debug, Clone, Default)]
pub struct Mirror {
    /// Keys under the prefix (without it) and their values.
    keys: BTreeMap<String, Vec<u8>>,
    /// The grants decoded, once each as they come (thousands are read at every change).
    grants: BTreeMap<UnitId, (ControlState, Option<MasterId>)>,
    link_ended: BTreeMap<EdgeId, Mono>,
    /// Each present master's presence lease.
    master_leases: BTreeMap<MasterId, i64>,
    /// Whether the mirror follows etcd now (false: etcd out of reach, the mirror frozen).
    pub following: bool,
}

impl Mirror {
    fn under<'a>(&'a self, folder: &'a str) -> impl Iterator<Item = (&'a str, &'a [u8])> + 'a {
        self.keys
            .range(folder.to_string()..)
            .take_while(move |(key, _)| key.starts_with(folder))
            .map(move |(key, value)| (&key[folder.len()..], value.as_slice()))
    }

    /// The ids of the masters present (their leases live).
    pub fn masters(&self) -> Vec<MasterId> {
        self.under("masters/")
            .map(|(id, _)| MasterId::new(id))
            .collect()
    }

    /// Each present master's presence lease (to ask etcd how long ago it was renewed).
    pub fn master_leases(&self) -> BTreeMap<MasterId, i64> {
        self.master_leases.clone()
    }

    /// What a present master said of itself when it joined.
    pub fn master_info(&self, id: &str) -> Option<serde_json::Value> {
        let value = self.keys.get(&format!("masters/{id}"))?;
        serde_json::from_slice(value).ok()
    }

    /// Every edge's link holder.
    pub fn links(&self) -> BTreeMap<EdgeId, MasterId> {
        self.under("links/")
            .map(|(edge, m)| {
                let value = String::from_utf8_lossy(m);
                (EdgeId::new(edge), MasterId::new(link_master(&value)))
            })
            .collect()
    }

    /// When each edge's link key last went, as this master saw it.
    pub fn links_ended(&self) -> BTreeMap<EdgeId, Mono> {
        self.link_ended.clone()
    }

    /// The hashes of every master's admin token (each master's, kept after it goes).
    pub fn admin_hashes(&self) -> Vec<String> {
        self.under("admins/")
            .map(|(_, hash)| String::from_utf8_lossy(hash).into_owned())
            .collect()
    }

    /// Every claimed unit and the master claiming it.
    pub fn runners(&self) -> BTreeMap<UnitId, MasterId> {
        self.under("running/")
            .map(|(unit, m)| (UnitId::new(unit), MasterId::new(String::from_utf8_lossy(m))))
            .collect()
    }

    /// Every stored grant, and for a master's grant the master it names.
    pub fn grants(&self) -> BTreeMap<UnitId, (ControlState, Option<MasterId>)> {
        self.grants.clone()
    }

    /// Every site pair's stored grant (one that does not decode is left out).
    pub fn pair_grants(&self) -> BTreeMap<UnitId, PairGrant> {
        self.under("pair_grants/")
            .filter_map(|(location, value)| {
                Some((UnitId::new(location), serde_json::from_slice(value).ok()?))
            })
            .collect()
    }

    /// Keeps a master's presence lease as its key comes (`None`: the key went).
    fn lease_of(&mut self, key: &str, lease: Option<i64>) {
        let Some(master) = key.strip_prefix("masters/") else {
            return;
        };
        match lease {
            Some(lease) => self.master_leases.insert(MasterId::new(master), lease),
            None => self.master_leases.remove(master),
        };
    }

    fn set(&mut self, key: String, value: Option<Vec<u8>>) {
        let gone = value.is_none() && self.keys.contains_key(&key);
        if let Some(edge) = key.strip_prefix("links/")
            && gone
        {
            self.link_ended.insert(EdgeId::new(edge), mono_now());
        }
        if let Some(unit) = key.strip_prefix("grants/") {
            let decoded = value
                .as_deref()
                .and_then(|value| serde_json::from_slice::<StoredGrant>(value).ok());
            match decoded {
                Some(stored) => self
                    .grants
                    .insert(UnitId::new(unit), (stored.grant, stored.master)),
                None => self.grants.remove(unit),
            };
        }
        match value {
            Some(value) => self.keys.insert(key, value),
            None => self.keys.remove(&key),
        };
    }
}

/// A [`Mirror`] is published at most this often (less often when it is large).
const MIRROR_EVERY: Duration = Duration::from_millis(20);

/// The folders a [`Mirror`] holds.
const MIRRORED: [&str; 6] = [
    "masters/",
    "links/",
    "running/",
    "grants/",
    "admins/",
    "pair_grants/",
];

/// Follows the control's folders under `etcd`'s prefix into a [`Mirror`]: a read, then a watch from
/// the revision after it; when the watch fails (etcd out of reach) the mirror is marked
/// not following, and read again once etcd answers.
pub fn follow(etcd: Etcd) -> tokio::sync::watch::Receiver<Arc<Mirror>> {
    let (publish, mirror) = tokio::sync::watch::channel(Arc::new(Mirror::default()));
    tokio::spawn(async move {
        let mut current = Mirror::default();
        loop {
            if let Err(err) = follow_once(&etcd, &mut current, &publish).await {
                tracing::warn!("following etcd: {err}; reading again shortly");
            }
            if publish.is_closed() {
                return;
            }
            current.following = false;
            publish.send_replace(Arc::new(current.clone()));
            tokio::time::sleep(RETRY_PAUSE * 5).await;
        }
    });
    mirror
}

async fn follow_once(
    etcd: &Etcd,
    current: &mut Mirror,
    publish: &tokio::sync::watch::Sender<Arc<Mirror>>,
) -> Result<(), StoreError> {
    let prefix = etcd.key("");
    let strip = |key: &[u8]| String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
    // The folders the control decides on, read at one revision (not the model, audit or
    // code beside them).
    let reads =
        MIRRORED.map(|folder| TxnOp::get(etcd.key(folder), Some(GetOptions::new().with_prefix())));
    let read = etcd
        .txn(
            "cannot read the cluster's state",
            Txn::new().and_then(reads),
        )
        .await?;
    let revision = read.header().map(|h| h.revision()).unwrap_or_default();
    let fresh: BTreeMap<String, Vec<u8>> = read
        .op_responses()
        .iter()
        .filter_map(|op| match op {
            etcd_client::TxnOpResponse::Get(get) => Some(get.kvs().to_vec()),
            _ => None,
        })
        .flatten()
        .map(|kv| {
            current.lease_of(&strip(kv.key()), Some(kv.lease()));
            (strip(kv.key()), kv.value().to_vec())
        })
        .collect();
    // What went while the mirror was not following went then, as far as it can tell.
    let gone: Vec<String> = current
        .keys
        .keys()
        .filter(|key| !fresh.contains_key(*key))
        .cloned()
        .collect();
    for key in gone {
        current.lease_of(&key, None);
        current.set(key, None);
    }
    for (key, value) in fresh {
        current.set(key, Some(value));
    }
    current.following = true;
    publish.send_replace(Arc::new(current.clone()));
    let options = etcd_client::WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision + 1);
    let mut stream = etcd
        .call("cannot watch the cluster's state", |client| {
            let (prefix, options) = (prefix.clone(), options.clone());
            async move {
                client
                    .watch_client()
                    .max_decoding_message_size(READ_LIMIT)
                    .watch(prefix, Some(options))
                    .await
            }
        })
        .await?;
    // Changes are published at most every MIRROR_EVERY: a burst of thousands (a mass
    // failover, a storm of links) costs one copy of the mirror per period, not per event.
    let mut dirty = false;
    let mut published = std::time::Instant::now();
    loop {
        // Longer for a larger mirror: every publication is a copy of it, read by every
        // unit (5 µs a key: 150 ms with 10,000 edges linked and granted).
        let every = MIRROR_EVERY.max(Duration::from_micros(5 * current.keys.len() as u64));
        let wait = match dirty {
            true => every.saturating_sub(published.elapsed()),
            false => Duration::from_secs(3600),
        };
        // (A tonic stream's next message may be waited for again after a timeout.)
        let answer = match tokio::time::timeout(wait, stream.message()).await {
            Err(_) => {
                publish.send_replace(Arc::new(current.clone()));
                (dirty, published) = (false, std::time::Instant::now());
                continue;
            }
            Ok(answer) => answer.map_err(|err| etcd.error("the watch failed", err))?,
        };
        let Some(answer) = answer else {
            return Err(StoreError::Stopped("the watch ended".into()));
        };
        if answer.canceled() {
            return Err(StoreError::Stopped("etcd cancelled the watch".into()));
        }
        let mut changed = false;
        for event in answer.events() {
            let Some(kv) = event.kv() else { continue };
            let key = strip(kv.key());
            if !MIRRORED.iter().any(|folder| key.starts_with(folder)) {
                continue;
            }
            let value = match event.event_type() {
                etcd_client::EventType::Put => Some(kv.value().to_vec()),
                etcd_client::EventType::Delete => None,
            };
            current.lease_of(&key, value.as_ref().map(|_| kv.lease()));
            current.set(key, value);
            changed = true;
        }
        if publish.is_closed() {
            return Ok(());
        }
        dirty |= changed;
        if dirty && published.elapsed() >= every {
            publish.send_replace(Arc::new(current.clone()));
            (dirty, published) = (false, std::time::Instant::now());
        }
    }
}
