//! The cluster's shared store on a real etcd (started per test on free loopback ports):
//! grants by compare-and-set between two connections racing, an unreachable etcd named,
//! a master id used twice refused, a presence lease cut off from etcd that stops being
//! held before etcd expires it, one that survives a short loss of etcd, no request lost
//! to a member that is down while the others keep the quorum, and no model write lost to
//! the leader's death.
#![cfg(feature = "cluster")]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tether_common::control::clock::mono_now;
use tether_common::control::{ControlState, Epoch, Owner};
use tether_common::store::Grants;
use tether_common::store::etcd::{DEFAULT_PREFIX, Etcd, EtcdControl, JoinError, Presence};
use tether_tests::etcd::Etcd as EtcdServer;
use tether_tests::proxy::FaultProxy;
use tether_tests::{free_port, wait_for};

const TIMEOUT: Duration = Duration::from_secs(2);

async fn connect(endpoints: &[String]) -> Etcd {
    Etcd::connect(endpoints, DEFAULT_PREFIX, TIMEOUT)
        .await
        .expect("etcd answers")
}

fn grant(owner: Owner, epoch: u64) -> ControlState {
    ControlState {
        owner,
        epoch: Epoch(epoch),
    }
}

#[tokio::test]
async fn grants_are_issued_by_compare_and_set_and_racing_masters_never_share_an_epoch() {
    let server = EtcdServer::start(1).await;
    let endpoints = server.endpoints();
    let one = Arc::new(EtcdControl::new(
        connect(&endpoints).await,
        &"m1".into(),
        None,
    ));
    let start = ControlState::default();
    one.clone()
        .issue("e".into(), start, grant(Owner::Master, 1), true)
        .await
        .unwrap();
    let lost = one
        .clone()
        .issue("e".into(), start, grant(Owner::Edge, 1), true)
        .await
        .unwrap_err();
    assert_eq!(lost.stored(), Some(grant(Owner::Master, 1)), "{lost}");
    let same = one
        .clone()
        .issue(
            "e".into(),
            grant(Owner::Master, 1),
            grant(Owner::Edge, 1),
            true,
        )
        .await
        .unwrap_err();
    assert_eq!(same.stored(), Some(grant(Owner::Master, 1)), "{same}");

    // Four deciders on two connections (two masters), each deciding from what it read.
    let mut deciders = Vec::new();
    for decider in 0..4u64 {
        let grants = Arc::new(EtcdControl::new(
            connect(&endpoints).await,
            &"m1".into(),
            None,
        ));
        deciders.push(tokio::spawn(async move {
            let owner = if decider % 2 == 0 {
                Owner::Master
            } else {
                Owner::Edge
            };
            let mut issued = Vec::new();
            for _ in 0..25 {
                let read = grants
                    .clone()
                    .grants()
                    .await
                    .unwrap()
                    .get("f")
                    .map(|held| held.grant)
                    .unwrap_or_default();
                let next = grant(owner, read.epoch.next().get());
                if grants
                    .clone()
                    .issue("f".into(), read, next, true)
                    .await
                    .is_ok()
                {
                    issued.push(next.epoch);
                }
            }
            issued
        }));
    }
    let mut all = Vec::new();
    for decider in deciders {
        all.extend(decider.await.unwrap());
    }
    let distinct: BTreeSet<Epoch> = all.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        all.len(),
        "an epoch was issued twice: {all:?}"
    );
    assert!(all.len() >= 25, "the race made progress: {}", all.len());
    let stored = one.grants().await.unwrap();
    assert_eq!(stored["f"].grant.epoch, *distinct.last().unwrap());
    assert_eq!(stored["e"].grant, grant(Owner::Master, 1));
    assert!(
        stored["e"].here,
        "a master's grant names the master that issued it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_down_fails_no_request_while_the_others_keep_the_quorum() {
    let mut server = EtcdServer::start(3).await;
    let grants = Arc::new(EtcdControl::new(
        connect(&server.endpoints()).await,
        &"m1".into(),
        None,
    ));
    // Every connection made while all answer, then one member killed: the balanced
    // channel keeps handing it requests, which fail to connect.
    grants.clone().grants().await.unwrap();
    server.members[1].server.kill();
    server.wait_healthy(Duration::from_secs(20)).await;
    let mut failed = Vec::new();
    let mut held = ControlState::default();
    for n in 1..=150u64 {
        let next = grant(Owner::Master, n);
        match grants.clone().issue("u".into(), held, next, true).await {
            Ok(_) => held = next,
            Err(err) => failed.push(format!("issue {n}: {err}")),
        }
        if let Err(err) = grants.clone().grants().await {
            failed.push(format!("read {n}: {err}"));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of 300 requests failed with two of three members up:\n{}",
        failed.len(),
        failed.join("\n")
    );
    assert_eq!(grants.grants().await.unwrap()["u"].grant, held);
}

#[tokio::test]
async fn an_unreachable_etcd_is_named_in_the_error() {
    let nobody = format!("http://127.0.0.1:{}", free_port());
    let err = Etcd::connect(
        std::slice::from_ref(&nobody),
        DEFAULT_PREFIX,
        Duration::from_secs(1),
    )
    .await
    .unwrap_err()
    .to_string();
    eprintln!("{err}");
    assert!(
        err.contains("etcd") && err.contains(&nobody),
        "the error names etcd and the endpoint: {err}"
    );
}

#[tokio::test]
async fn a_master_id_in_use_is_refused_and_a_restarted_master_waits_out_its_old_key() {
    let server = EtcdServer::start(1).await;
    let etcd = connect(&server.endpoints()).await;
    let info = serde_json::json!({"api_url": "https://m1"});
    let first = Presence::join(&etcd, &"m1".into(), &info, 2000)
        .await
        .unwrap();
    let second = Presence::join(&etcd, &"m1".into(), &info, 2000).await;
    assert!(
        matches!(second, Err(JoinError::DuplicateId(ref id)) if id == "m1"),
        "{:?}",
        second.err().map(|e| e.to_string())
    );
    assert!(
        Presence::join(&etcd, &"m2".into(), &info, 2000)
            .await
            .is_ok()
    );
    // The first master dies (its lease no longer kept alive) and starts again at once,
    // within its time to live: its old key is waited out, not taken for a duplicate.
    drop(first);
    let again = Presence::join(&etcd, &"m1".into(), &info, 2000).await;
    assert!(again.is_ok(), "{:?}", again.err().map(|e| e.to_string()));
}

/// Master `m1` joined through a fault proxy in front of `server`, once a keep-alive has
/// been answered (the time held moved forward).
async fn joined_through_a_proxy(server: &EtcdServer, ttl_ms: u64) -> (FaultProxy, Presence) {
    let upstream = server.endpoints()[0]
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let proxy = FaultProxy::start(0, upstream).await;
    let through_proxy = connect(&[format!("http://{}", proxy.addr())]).await;
    let presence = Presence::join(&through_proxy, &"m1".into(), &serde_json::json!({}), ttl_ms)
        .await
        .unwrap();
    let held = presence.held_until();
    let first = held.borrow().expect("held after joining");
    wait_for("a keep-alive", Duration::from_secs(3), || async {
        held.borrow().filter(|until| *until > first)
    })
    .await;
    (proxy, presence)
}

#[tokio::test]
async fn a_master_cut_off_from_etcd_stops_holding_its_lease_before_etcd_expires_it() {
    let server = EtcdServer::start(1).await;
    let ttl_ms = 2000;
    let (proxy, presence) = joined_through_a_proxy(&server, ttl_ms).await;
    let held = presence.held_until();

    proxy.cut();
    let cut_at = mono_now();
    let observer = connect(&server.endpoints()).await;
    let key = observer.key("masters/m1");
    let gone_at = wait_for(
        "the presence key to expire",
        Duration::from_millis(ttl_ms * 3),
        || {
            let observer = observer.clone();
            let key = key.clone();
            async move {
                let answer = observer.client().get(key, None).await.ok()?;
                answer.kvs().is_empty().then(mono_now)
            }
        },
    )
    .await;
    let held_until = held.borrow().expect("the last time held");
    eprintln!(
        "cut at {cut_at:?}: the master held its lease until {held_until:?}, etcd expired it by {gone_at:?}"
    );
    assert!(
        held_until < gone_at,
        "the master stopped acting on its lease ({held_until:?}) before etcd expired it ({gone_at:?})"
    );
    assert!(
        held_until.since(cut_at) < ttl_ms,
        "it stopped within a time to live of the cut"
    );
}

#[tokio::test]
async fn a_short_loss_of_etcd_does_not_fence_the_master() {
    let server = EtcdServer::start(1).await;
    // A keep-alive every 1.67 s, each answered within 0.83 s, held 4.5 s from a send.
    let ttl_ms = 5000;
    let (proxy, presence) = joined_through_a_proxy(&server, ttl_ms).await;
    let held = presence.held_until();
    // Lose etcd for 3.3 s, two thirds of the time to live: the keep-alive sent during
    // the loss goes unanswered. Waiting a whole period for its answer and another before
    // trying again would pass the 4.5 s the lease is held; trying again at once does not.
    proxy.cut();
    let cut_for = Duration::from_millis(3300);
    let cut_at = tokio::time::Instant::now();
    let at_cut = held.borrow().expect("held");
    let mut healed = false;
    // Held at every moment, through the loss and until a keep-alive is answered again.
    loop {
        let now = mono_now();
        let until = held.borrow().expect("still held");
        assert!(
            now < until,
            "fenced at {now:?}, {:?} into a loss of {cut_for:?} (held until {until:?})",
            cut_at.elapsed()
        );
        if !healed && cut_at.elapsed() >= cut_for {
            proxy.heal();
            healed = true;
        }
        if healed && until > at_cut.plus(cut_for.as_millis() as u64) {
            break;
        }
        assert!(
            cut_at.elapsed() < Duration::from_secs(10),
            "no keep-alive answered after the loss"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Masters with different change-log limits: one trims the log to its own floor, the
/// other then writes a lower floor. The log no longer reaches back unbroken, and says so
/// (a master or an edge behind it reads the whole model) rather than hand out changes
/// with a gap. Large writes land in runs, in order, each with its own versions.
#[tokio::test]
async fn the_shared_log_never_answers_with_a_gap_and_large_writes_land_in_runs() {
    use tether_common::protocol::EntityKind;
    use tether_common::store::etcd::EtcdModel;
    use tether_common::store::{CommitError, ModelStore, Write};

    let server = EtcdServer::start(1).await;
    let endpoints = server.endpoints();
    let short = Arc::new(EtcdModel::open(connect(&endpoints).await).await.unwrap());
    let long = Arc::new(EtcdModel::open(connect(&endpoints).await).await.unwrap());
    assert_eq!(
        short.model_id(),
        long.model_id(),
        "one model id for the cluster"
    );
    let user = |n: u64| -> Write {
        (
            EntityKind::User,
            format!("u{n}"),
            Some(format!(
                r#"{{"id":"u{n}","name":"U","role":"viewer","token_hash":"x"}}"#
            )),
        )
    };
    // 30 writes with a limit of 10: entries up to version 20 are trimmed.
    for n in 0..30 {
        short.clone().commit(n, vec![user(n)], 10).await.unwrap();
    }
    // A write planned on an older version is refused whole.
    let behind = long.clone().commit(29, vec![user(99)], 25).await;
    assert!(
        matches!(behind, Err(CommitError::Behind { base: 29 })),
        "{behind:?}"
    );
    // One with a limit of 25 moves the floor back to 6.
    long.clone().commit(30, vec![user(30)], 25).await.unwrap();
    assert_eq!(
        long.clone().changes_since(10).await.unwrap(),
        None,
        "the log does not reach back to 10 unbroken"
    );
    let since_25 = long
        .clone()
        .changes_since(25)
        .await
        .unwrap()
        .expect("unbroken");
    assert_eq!(
        since_25.iter().map(|c| c.version).collect::<Vec<_>>(),
        (26..=31).collect::<Vec<_>>()
    );
    // 250 records at once: three runs, versions 32..=281 in order.
    let many: Vec<Write> = (1000..1250).map(user).collect();
    let changes = short.clone().commit(31, many, 10_000).await.unwrap();
    assert_eq!(
        changes.iter().map(|c| c.version).collect::<Vec<_>>(),
        (32..=281).collect::<Vec<_>>()
    );
    let loaded = long.clone().load().await.unwrap();
    assert_eq!(loaded.state.version, 281);
    assert_eq!(loaded.model.users.len(), 31 + 250);
    assert_eq!(
        loaded.record_versions[&(EntityKind::User, "u1249".into())],
        281
    );
}

/// The member that leads the cluster now, by etcd's own status of each member.
async fn leader_index(server: &EtcdServer) -> usize {
    let http = reqwest::Client::new();
    for (index, member) in server.members.iter().enumerate() {
        let status: serde_json::Value = http
            .post(format!("{}/v3/maintenance/status", member.client_url))
            .body("{}")
            .send()
            .await
            .expect("status")
            .json()
            .await
            .expect("status JSON");
        if status["leader"] == status["header"]["member_id"] {
            return index;
        }
    }
    panic!("no member leads");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_write_made_as_the_leader_dies_lands_once_a_new_one_is_elected() {
    use tether_common::protocol::EntityKind;
    use tether_common::store::ModelStore;
    use tether_common::store::etcd::EtcdModel;

    let mut server = EtcdServer::start(3).await;
    let model = Arc::new(
        EtcdModel::open(connect(&server.endpoints()).await)
            .await
            .unwrap(),
    );
    let user = |n: u64| {
        (
            EntityKind::User,
            format!("u{n}"),
            Some(format!(
                r#"{{"id":"u{n}","name":"U","role":"viewer","token_hash":"x"}}"#
            )),
        )
    };
    model.clone().commit(0, vec![user(0)], 100).await.unwrap();
    let leader = leader_index(&server).await;
    server.members[leader].server.kill();
    // Writes go on at once: the first meets the election.
    for n in 1..=10u64 {
        let written = model.clone().commit(n, vec![user(n)], 100).await;
        assert!(
            written.is_ok(),
            "write {n} with the leader gone: {:?}",
            written.err()
        );
    }
    let changes = model.clone().changes_since(0).await.unwrap().unwrap();
    let ids: Vec<String> = changes.iter().map(|c| c.id.clone()).collect();
    let wanted: Vec<String> = (0..=10).map(|n| format!("u{n}")).collect();
    assert_eq!(ids, wanted, "each write once, in order");
}
