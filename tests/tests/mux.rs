//! The link's multiplexing over real TLS on loopback, in process (see `inproc`), and what
//! it does when the peer stops reading.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tether_common::link::{Incoming, LinkError};
use tether_common::protocol::{
    ErrorCode, Json, ModuleRef, RemoteError, Request, Response, StreamItem,
};
use tether_tests::inproc::pair;
use tokio::sync::mpsc;

fn execute(n: u64) -> Request {
    Request::Execute {
        module: ModuleRef::new("room", "Display", 1),
        method: "echo".into(),
        args: Json(n.to_string()),
        epoch: None,
        holder: None,
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
    let (edge, edge_incoming, master, _master_incoming, _keep) = pair(1 << 20, false).await;
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
    let (edge, mut edge_incoming, master, master_incoming, _keep) = pair(64 * 1024, false).await;
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
    let module = ModuleRef::new("room", "Display", 1);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_reading_cannot_hang_the_sender() {
    // 200 ms heartbeats: the link is declared dead 600 ms into the silence.
    let (edge, mut edge_incoming, master, _master_incoming, keep) = pair(1 << 20, true).await;
    let module = ModuleRef::new("room", "Display", 1);
    let mut stream = master
        .request_stream(Request::DebugSubscribe { module }, Duration::from_secs(30))
        .await
        .unwrap();
    let Some(Incoming::Request(request)) = edge_incoming.recv().await else {
        panic!()
    };
    keep.proxy.as_ref().unwrap().cut();

    // The edge streams far more than the socket buffers and its queue hold: its writer
    // blocks on a peer that reads nothing.
    let started = std::time::Instant::now();
    let writer = tokio::spawn(async move {
        let line = "x".repeat(16 * 1024);
        let mut sent = 0u64;
        while request
            .responder
            .item(StreamItem::Debug {
                time_ms: sent,
                line: line.clone(),
            })
            .await
            .is_ok()
        {
            sent += 1;
        }
        sent
    });
    // Missed heartbeats (or the writes the peer stopped taking) close the link, and the
    // stalled sender is released with an error.
    let sent = tokio::time::timeout(Duration::from_secs(5), writer)
        .await
        .expect("the sender hung on a link whose peer stopped reading")
        .unwrap();
    assert!(sent > 0);
    assert!(edge.is_closed());
    let reason = edge.close_reason().unwrap();
    assert!(
        reason.contains("missed heartbeats") || reason.contains("the peer read nothing"),
        "{reason}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    // The other side sees the same silence and closes too.
    tokio::time::timeout(Duration::from_secs(3), master.closed())
        .await
        .unwrap();
    let mut outcome = None;
    while let Some(item) = stream.next().await {
        if let Err(err) = item {
            outcome = Some(err);
            break;
        }
    }
    assert!(matches!(outcome, Some(LinkError::Closed(_)) | None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_its_reader_falls_behind_on_is_cut_off_in_bytes() {
    // Frames up to 2 MiB; the reader's side keeps at most 32 MiB of what waits for it.
    let (edge, mut edge_incoming, master, _master_incoming, _keep) = pair(2 << 20, false).await;
    let module = ModuleRef::new("room", "Display", 1);
    let mut stream = master
        .request_stream(Request::DebugSubscribe { module }, Duration::from_secs(30))
        .await
        .unwrap();
    let Some(Incoming::Request(request)) = edge_incoming.recv().await else {
        panic!()
    };
    // Forty items of 1.5 MiB, far fewer than the stream's 256 slots, but 60 MiB.
    let line = "x".repeat(1536 * 1024);
    for sent in 0..40u64 {
        let item = StreamItem::Debug {
            time_ms: sent,
            line: line.clone(),
        };
        if request.responder.item(item).await.is_err() {
            break;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut items = 0;
    let outcome = loop {
        match tokio::time::timeout(Duration::from_secs(5), stream.next()).await {
            Ok(Some(Ok(_))) => items += 1,
            Ok(Some(Err(err))) => break Some(err),
            Ok(None) | Err(_) => break None,
        }
    };
    assert!(
        matches!(outcome, Some(LinkError::Overflow)),
        "{items} items, then {outcome:?}"
    );
    assert!(items < 30, "{items} items of 1.5 MiB waited for the reader");
    // The link itself carries on.
    assert!(!edge.is_closed() && !master.is_closed());
}
