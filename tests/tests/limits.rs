//! What a peer may make a server hold before (or without) authenticating, and what a
//! client may send or leave unread, against the real binaries: the caps on the master's
//! link connections and handshakes in progress (floods of them: `floods.rs`), the API's body and WebSocket message
//! limits, and the deadlines that cut off slow clients. Each test fails without its limit
//! (the handshake deadline itself is tested in `auth.rs`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tether_common::link::tls;
use tether_tests::api::ApiClient;
use tether_tests::cluster::{Cluster, ClusterSpec};
use tether_tests::wait_for;
use tether_tests::ws::WsClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// The master's `tether_link_connections{stage}` gauge.
async fn connections(api: &ApiClient, stage: &str) -> u64 {
    let (status, _, text) = api.get_text("/metrics").await;
    assert_eq!(status, 200, "{text}");
    let prefix = format!("tether_link_connections{{stage=\"{stage}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix)?.trim().parse().ok())
        .unwrap_or(0)
}

/// Whether the peer closed `stream` (EOF or an error) within `limit`; data is skipped.
async fn closed_within<S: AsyncReadExt + Unpin>(stream: &mut S, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

async fn start(edges: usize, master_extra: &str) -> Cluster {
    let mut spec = ClusterSpec::edges(edges);
    spec.handshake_timeout_ms = 1500;
    spec.master_extra = master_extra.to_string();
    Cluster::start(spec).await
}

#[tokio::test]
async fn handshakes_in_progress_are_capped_and_the_quietest_make_room() {
    let cluster = start(1, "[limits]\nmax_pending_handshakes = 3\n").await;
    cluster
        .wait_edge_online("site-1", true, Duration::from_secs(10))
        .await;
    let master = cluster.master_api();
    assert_eq!(connections(&master, "link").await, 1);

    // Twelve peers connect and say nothing: the table holds three; each newer one made
    // the master drop an older one at once, without ever pausing its accept loop.
    let mut silent = Vec::new();
    for _ in 0..12 {
        silent.push(TcpStream::connect(cluster.link_addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pending = connections(&master, "handshake").await;
    assert!(
        pending <= 3,
        "{pending} handshakes in progress at a cap of 3"
    );
    for (i, peer) in silent.iter_mut().take(9).enumerate() {
        assert!(
            closed_within(peer, Duration::from_millis(500)).await,
            "silent peer {i} was not dropped for a newer one"
        );
    }
    // The last three go at their deadline (the handshake's 1.5 s).
    let started = Instant::now();
    for (i, peer) in silent.iter_mut().enumerate().skip(9) {
        assert!(
            closed_within(peer, Duration::from_secs(5)).await,
            "silent peer {i} was never dropped"
        );
    }
    eprintln!(
        "the last silent peers dropped within {} ms",
        started.elapsed().as_millis()
    );
    wait_for("no handshakes left", Duration::from_secs(2), || async {
        (connections(&master, "handshake").await == 0).then_some(())
    })
    .await;
    // The edge's link carried on through it.
    assert_eq!(master.edge_online("site-1").await, Some(true));
    assert_eq!(connections(&master, "link").await, 1);
}

#[tokio::test]
async fn links_beyond_the_cap_wait_until_one_ends() {
    let mut cluster = start(2, "[limits]\nmax_links = 1\nmax_pending_handshakes = 1\n").await;
    let master = cluster.master_api();
    let first = wait_for("one edge online", Duration::from_secs(10), || async {
        for (i, edge) in ["site-1", "site-2"].iter().enumerate() {
            if master.edge_online(edge).await == Some(true) {
                return Some(i);
            }
        }
        None
    })
    .await;
    let other = 1 - first;
    let other_id = cluster.spec.edges[other].clone();
    // Longer than the other edge's handshake deadline and reconnect period: it stays out.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(master.edge_online(&other_id).await, Some(false));
    assert_eq!(connections(&master, "link").await, 1);

    // The first link ends: its slot goes to the other edge.
    cluster.edges[first].kill();
    cluster
        .wait_edge_online(&other_id, true, Duration::from_secs(15))
        .await;
    assert_eq!(connections(&master, "link").await, 1);
}

#[tokio::test]
async fn request_bodies_over_the_limit_are_answered_413() {
    let cluster = start(1, "[limits]\napi_body_bytes = 65536\n").await;
    let master = cluster.master_api();
    let record = |size: usize| json!({"id": "big", "name": "x".repeat(size), "edge": "site-1"});

    // Over the limit, with a Content-Length: read and thrown away, then refused (so the
    // client, still sending, gets the answer).
    let (status, body) = master.post("/api/v1/systems", record(100_000)).await;
    assert_eq!(
        (status, &body["error"]),
        (413, &json!("too_large")),
        "{body}"
    );
    assert!(
        body["message"].as_str().unwrap().contains("65536"),
        "{body}"
    );
    // Under it: read and judged on its content.
    let (status, body) = master.post("/api/v1/systems", record(60_000)).await;
    assert_eq!(status, 201, "{body}");
    // Without a length (chunked): read to its end, only the limit kept, then refused.
    let mut stream = api_stream(&cluster.api_addr, &cluster).await;
    let token = std::fs::read_to_string(cluster.path("data/master/admin.token")).unwrap();
    let chunk = "x".repeat(30_000);
    let head = format!(
        "POST /api/v1/systems HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
        token.trim()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    for _ in 0..4 {
        let framed = format!("{:x}\r\n{chunk}\r\n", chunk.len());
        stream.write_all(framed.as_bytes()).await.unwrap();
    }
    stream.write_all(b"0\r\n\r\n").await.unwrap();
    let answer = read_some(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("too_large"), "{answer}");
    // A client without a token is refused before its body is read.
    let anonymous = master.with_token(None);
    let (status, _) = anonymous.post("/api/v1/systems", record(100_000)).await;
    assert_eq!(status, 401);

    // The edge's API has the same limit, at its default of 1 MiB.
    cluster.wait_edge_api_up(0).await;
    let edge = cluster.edge_admin(0);
    let args = json!({"method": "ping", "args": ["x".repeat(1_100_000)]});
    let (status, body) = edge
        .post("/api/v1/systems/none/modules/None/1/exec", args)
        .await;
    assert_eq!(
        (status, &body["error"]),
        (413, &json!("too_large")),
        "{body}"
    );
}

#[tokio::test]
async fn a_websocket_message_over_64_kib_closes_that_socket_only() {
    let cluster = start(1, "").await;
    let token = std::fs::read_to_string(cluster.path("data/master/admin.token")).unwrap();
    let base = cluster.master_api().base().to_string();
    let mut big = WsClient::connect(&base, &cluster.ca(), token.trim())
        .await
        .unwrap();
    let mut small = WsClient::connect(&base, &cluster.ca(), token.trim())
        .await
        .unwrap();
    let padding = "x".repeat(100 * 1024);
    let _ = big
        .send_text(json!({"id": 1, "cmd": "watch", "topic": "edges", "pad": padding}).to_string())
        .await;
    // 1009: message too big.
    assert_eq!(big.close_code(Duration::from_secs(5)).await, Some(1009));
    small
        .send(json!({"id": 2, "cmd": "watch", "topic": "edges"}))
        .await;
    let answer = small.answer(2, Duration::from_secs(5)).await;
    assert_eq!(answer["type"], "success", "{answer}");
}

#[tokio::test]
async fn slow_clients_are_cut_off() {
    let cluster = start(1, "[limits]\nclient_timeout_ms = 1000\n").await;
    let addr = cluster.api_addr;
    let limit = Duration::from_secs(4);

    // A peer that never starts TLS.
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    assert!(closed_within(&mut tcp, limit).await, "silent TCP peer kept");

    // A request head that never ends.
    let mut stream = api_stream(&addr, &cluster).await;
    stream
        .write_all(b"GET /api/v1/health HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .unwrap();
    assert!(closed_within(&mut stream, limit).await, "half a head kept");

    // A kept-alive connection that sends nothing more.
    let mut stream = api_stream(&addr, &cluster).await;
    stream
        .write_all(b"GET /api/v1/health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let answer = read_some(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        closed_within(&mut stream, limit).await,
        "idle connection kept"
    );

    // A body that stops short of its length: 408.
    let token = std::fs::read_to_string(cluster.path("data/master/admin.token")).unwrap();
    let mut stream = api_stream(&addr, &cluster).await;
    let head = format!(
        "POST /api/v1/systems HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"id\":",
        token.trim()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let answer = read_some(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");

    // A client that sends requests and never reads the answers: once the server's
    // writes have been blocked for the timeout, the connection is closed.
    let stream = api_stream(&addr, &cluster).await;
    let (mut reader, mut writer) = tokio::io::split(stream);
    let request = format!(
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\n\r\n",
        token.trim()
    );
    let pipelined = tokio::spawn(async move {
        for _ in 0..100_000 {
            if writer.write_all(request.as_bytes()).await.is_err() {
                return;
            }
        }
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        closed_within(&mut reader, Duration::from_secs(5)).await,
        "a client that does not read was kept"
    );
    pipelined.abort();

    // Through all of it the API served others.
    let (status, body) = cluster.master_api().get("/api/v1/health").await;
    assert_eq!(status, 200, "{body}");
}

/// A TLS connection to an API (trusting the cluster's CA), ready for raw HTTP/1.1.
async fn api_stream(addr: &std::net::SocketAddr, cluster: &Cluster) -> TlsStream<TcpStream> {
    let config = Arc::new(tls::api_client_config(&cluster.ca()).unwrap());
    let tcp = TcpStream::connect(addr).await.unwrap();
    TlsConnector::from(config)
        .connect(tls::server_name("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

/// What arrives within 5 s, up to the first pause, as text.
async fn read_some(stream: &mut TlsStream<TcpStream>) -> String {
    let mut buf = vec![0u8; 64 * 1024];
    match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
        Ok(Ok(n)) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        other => format!("no answer: {other:?}"),
    }
}

/// A refused HTTP/2 request with a small body gets its 401, not a reset stream: the
/// server reads the body to its end before it refuses. (curl is the client here: it
/// reports a reset that arrives before it has sent the whole body as an error, exit 92,
/// as many clients do.)
#[tokio::test]
async fn a_refused_http2_post_gets_its_answer() {
    let cluster = start(1, "").await;
    let url = format!(
        "https://localhost:{}/api/v1/systems",
        cluster.api_addr.port()
    );
    let body = cluster.path("body.json");
    std::fs::write(
        &body,
        json!({"id": "x", "name": "y".repeat(30_000)}).to_string(),
    )
    .unwrap();
    for i in 0..20 {
        let mut curl = std::process::Command::new("curl");
        curl.args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--http2"])
            .arg("--cacert")
            .arg(cluster.ca())
            .args(["-H", "content-type: application/json", "--data-binary"])
            .arg(format!("@{}", body.display()))
            .arg(&url);
        if i % 2 == 0 {
            curl.args(["-H", "authorization: Bearer ttu_not_a_token"]);
        }
        let out = curl.output().expect("curl runs (.ci/run installs it)");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "401",
            "request {i}: curl {:?} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
