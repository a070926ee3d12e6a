//! The link's multiplexing over real TLS on loopback, in process: a master listener and an
//! edge connector with dev certificates.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tether_common::link::{
    ConnectorConfig, EdgeSecrets, Incoming, LinkConfig, LinkError, ListenerConfig, Secret,
    connect_once, run_listener, tls,
};
use tether_common::pki;
use tether_common::protocol::{
    ErrorCode, Json, ModuleRef, RemoteError, Request, Response, StreamItem,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

struct OneEdge(Secret);

impl EdgeSecrets for OneEdge {
    fn secret(&self, edge_id: &str) -> Option<Secret> {
        (edge_id == "site-1").then(|| self.0.clone())
    }
}

/// A master listener and a connected edge link; returns the edge's side of the link, the
/// master's incoming queue, and what keeps the listener alive.
async fn pair(
    max_frame: usize,
) -> (
    tether_common::link::Link,
    mpsc::Receiver<Incoming>,
    tether_common::link::Link,
    mpsc::Receiver<Incoming>,
    tempfile::TempDir,
    CancellationToken,
) {
    tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    pki::write_dir(dir.path(), &["site-1".into()]).unwrap();
    let path = |name: &str| dir.path().join(name);
    let secret = Secret::load(&path("site-1.secret")).unwrap();
    let server_tls = tls::link_server_config(
        &path("master.pem"),
        &path("master.key"),
        Some(&path("ca.pem")),
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (accepted_tx, mut accepted_rx) = mpsc::channel(4);
    let shutdown = CancellationToken::new();
    let link_config = LinkConfig::with_heartbeat(Duration::from_millis(200), max_frame);
    tokio::spawn(run_listener(
        listener,
        server_tls,
        Arc::new(OneEdge(secret.clone())),
        ListenerConfig {
            handshake_timeout: Duration::from_secs(2),
            max_pending_handshakes: 8,
            link: link_config.clone(),
        },
        accepted_tx,
        shutdown.clone(),
    ));
    let connector = ConnectorConfig {
        master_addr: addr.to_string(),
        server_name: tls::server_name("localhost").unwrap(),
        tls: tls::client_config(
            &path("ca.pem"),
            Some((&path("site-1.pem"), &path("site-1.key"))),
        )
        .unwrap(),
        edge_id: "site-1".into(),
        secret,
        handshake_timeout: Duration::from_secs(2),
        reconnect: Duration::from_secs(3),
        link: link_config,
    };
    let (edge_link, edge_incoming) = connect_once(&connector).await.unwrap();
    let master_side = accepted_rx.recv().await.unwrap();
    assert_eq!(master_side.edge_id, "site-1");
    (
        edge_link,
        edge_incoming,
        master_side.link,
        master_side.incoming,
        dir,
        shutdown,
    )
}

fn execute(n: u64) -> Request {
    Request::Execute {
        module: ModuleRef {
            system: "room".into(),
            name: "Display".into(),
            index: 1,
        },
        method: "echo".into(),
        args: Json(n.to_string()),
        epoch: 0,
    }
}

/// Answers every Execute with its argument after a random delay, so answers overtake
/// each other.
fn echo_with_random_delays(mut incoming: mpsc::Receiver<Incoming>) {
    tokio::spawn(async move {
        while let Some(Incoming::Request(request)) = incoming.recv().await {
            tokio::spawn(async move {
                let delay = rand::rng().random_range(0..50);
                tokio::time::sleep(Duration::from_millis(delay)).await;
                let result = match request.body {
                    Request::Execute { args, .. } => Ok(Response::Value {
                        value: args,
                        executed_by: "edge:site-1".into(),
                    }),
                    _ => Err(RemoteError::new(ErrorCode::Unsupported, "test")),
                };
                request.responder.respond(result).await;
            });
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_requests_in_flight_complete_correctly_out_of_order() {
    let (edge, edge_incoming, master, _master_incoming, _dir, _stop) = pair(1 << 20).await;
    echo_with_random_delays(edge_incoming);

    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut calls = Vec::new();
    for n in 0..500u64 {
        let master = master.clone();
        let order = order.clone();
        calls.push(tokio::spawn(async move {
            let answer = master
                .request(execute(n), Duration::from_secs(10))
                .await
                .unwrap();
            order.lock().unwrap().push(n);
            answer
        }));
    }
    for (n, call) in calls.into_iter().enumerate() {
        match call.await.unwrap() {
            Response::Value { value, executed_by } => {
                assert_eq!(
                    value,
                    Json(n.to_string()),
                    "request {n} got another's answer"
                );
                assert_eq!(executed_by, "edge:site-1");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let order = order.lock().unwrap();
    assert_eq!(order.len(), 500);
    assert!(
        order.windows(2).any(|w| w[0] > w[1]),
        "answers came in order: the test proves nothing"
    );
    assert!(!master.is_closed() && !edge.is_closed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_flow_both_ways_and_deadlines_streams_and_errors_hold() {
    let (edge, mut edge_incoming, master, master_incoming, _dir, _stop) = pair(64 * 1024).await;
    echo_with_random_delays(master_incoming);

    // Edge to master works too.
    let answer = edge
        .request(execute(7), Duration::from_secs(5))
        .await
        .unwrap();
    assert!(matches!(answer, Response::Value { value, .. } if value == Json("7".into())));

    // The master asks the edge; the test plays the edge by hand.
    let master2 = master.clone();
    let pending = tokio::spawn(async move {
        master2
            .request(Request::MasterReady, Duration::from_millis(300))
            .await
    });
    let Some(Incoming::Request(unanswered)) = edge_incoming.recv().await else {
        panic!()
    };
    // No answer: the requester gives up at its deadline, and says so.
    let err = pending.await.unwrap().unwrap_err();
    assert!(matches!(err, LinkError::Timeout(_)), "{err}");
    drop(unanswered); // a late drop answers an error the master ignores.

    // An error answer carries its code.
    let master2 = master.clone();
    let pending = tokio::spawn(async move {
        master2
            .request(Request::MasterReady, Duration::from_secs(5))
            .await
    });
    let Some(Incoming::Request(request)) = edge_incoming.recv().await else {
        panic!()
    };
    request
        .responder
        .respond(Err(RemoteError::new(ErrorCode::NotFound, "no such module")))
        .await;
    match pending.await.unwrap() {
        Err(LinkError::Remote(remote)) => assert_eq!(remote.code, ErrorCode::NotFound),
        other => panic!("{other:?}"),
    }

    // A streamed answer arrives in order and ends.
    let module = ModuleRef {
        system: "room".into(),
        name: "Display".into(),
        index: 1,
    };
    let mut stream = master
        .request_stream(Request::DebugSubscribe { module }, Duration::from_secs(5))
        .await
        .unwrap();
    let Some(Incoming::Request(request)) = edge_incoming.recv().await else {
        panic!()
    };
    for i in 0..20 {
        request
            .responder
            .item(StreamItem::Debug {
                time_ms: i,
                line: format!("line {i}"),
            })
            .await
            .unwrap();
    }
    request.responder.end(Ok(())).await;
    for i in 0..20 {
        match stream.next().await {
            Some(Ok(StreamItem::Debug { time_ms, .. })) => assert_eq!(time_ms, i),
            other => panic!("{other:?}"),
        }
    }
    assert!(stream.next().await.is_none());

    // A request larger than the frame bound fails alone; the link carries on.
    let huge = Request::LiveReload {
        driver: "x".repeat(100_000),
    };
    let err = master
        .request(huge, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(matches!(err, LinkError::TooLarge(_)), "{err}");
    let answer = edge
        .request(execute(8), Duration::from_secs(5))
        .await
        .unwrap();
    assert!(matches!(answer, Response::Value { .. }));

    // Closing fails what waits and tells the peer why.
    let master2 = master.clone();
    let pending = tokio::spawn(async move {
        master2
            .request(Request::MasterReady, Duration::from_secs(5))
            .await
    });
    let Some(Incoming::Request(_held)) = edge_incoming.recv().await else {
        panic!()
    };
    edge.close("edge shutting down");
    assert!(matches!(pending.await.unwrap(), Err(LinkError::Closed(_))));
    tokio::time::timeout(Duration::from_secs(2), master.closed())
        .await
        .unwrap();
    assert!(
        master
            .close_reason()
            .unwrap()
            .contains("edge shutting down")
    );
}
