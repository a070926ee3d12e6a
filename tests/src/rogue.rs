//! A rogue edge: the test harness's own link client, holding a real edge's certificate and
//! secret, that sends the master whatever a test asks, for testing what an authenticated
//! but hostile edge can and cannot do. It answers the master's own requests as a meek
//! edge would (acknowledges decisions, takes model changes and code), so that its link
//! stays up while it misbehaves.

use std::time::Duration;

use tether_common::link::{
    ConnectorConfig, Incoming, Link, LinkConfig, LinkError, ResponseStream, Secret, connect_once,
    tls,
};
use tether_common::protocol::{
    ControlOwner, ModuleRef, Notice, OnBehalf, Request, Response, StreamItem,
};

use crate::cluster::Cluster;

/// A link to the master under a real edge's identity.
pub struct RogueEdge {
    /// The edge id it speaks as.
    pub edge_id: String,
    /// The link.
    pub link: Link,
    answering: tokio::task::JoinHandle<()>,
}

impl Drop for RogueEdge {
    fn drop(&mut self) {
        self.answering.abort();
        self.link.close("the rogue edge is done");
    }
}

/// The connector settings of `edge` in `cluster` (its certificate and secret).
pub fn edge_connector(cluster: &Cluster, edge: &str, link: LinkConfig) -> ConnectorConfig {
    let certs = cluster.path("certs");
    ConnectorConfig {
        master_addrs: vec![cluster.link_addr.to_string()],
        server_name: tls::server_name("localhost").expect("a server name"),
        tls: tls::client_config(
            &cluster.ca(),
            Some((
                &certs.join(format!("{edge}.pem")),
                &certs.join(format!("{edge}.key")),
            )),
        )
        .expect("the edge's TLS files"),
        edge_id: edge.into(),
        secret: Secret::load(&certs.join(format!("{edge}.secret"))).expect("the edge's secret"),
        handshake_timeout: Duration::from_secs(5),
        reconnect: Duration::from_secs(3),
        link,
    }
}

impl RogueEdge {
    /// Connects as `edge` (whose real process should not be running) and reports an edge
    /// that holds nothing, so the master decides and the link settles.
    pub async fn connect(cluster: &Cluster, edge: &str) -> RogueEdge {
        Self::connect_with(
            cluster,
            edge,
            LinkConfig::with_heartbeat(Duration::from_secs(1), 16 << 20),
        )
        .await
    }

    /// [`connect`](Self::connect) with the link's settings (a small stream queue, say).
    pub async fn connect_with(cluster: &Cluster, edge: &str, link: LinkConfig) -> RogueEdge {
        let config = edge_connector(cluster, edge, link);
        let (link, incoming) = connect_once(&config)
            .await
            .unwrap_or_else(|err| panic!("the rogue edge cannot link as {edge}: {err}"));
        let answering = tokio::spawn(answer_meekly(incoming));
        let rogue = RogueEdge {
            edge_id: edge.into(),
            link,
            answering,
        };
        let report = Request::ControlReport {
            owner: ControlOwner::Edge,
            epoch: tether_common::control::Epoch::ZERO,
            controlling: false,
        };
        rogue
            .request(report)
            .await
            .expect("the master takes the rogue's control report");
        rogue
    }

    /// Sends `body` and waits up to 10 s for the answer.
    pub async fn request(&self, body: Request) -> Result<Response, LinkError> {
        self.link.request(body, Duration::from_secs(10)).await
    }

    /// Sends `body` on behalf of a client token.
    pub async fn request_as(&self, body: Request, token: &str) -> Result<Response, LinkError> {
        self.link
            .request_as(
                body,
                Duration::from_secs(10),
                Some(OnBehalf(token.to_string())),
            )
            .await
    }

    /// Opens a streamed request and waits for its first item or its end.
    pub async fn stream(
        &self,
        body: Request,
    ) -> (ResponseStream, Option<Result<StreamItem, LinkError>>) {
        let mut stream = self
            .link
            .request_stream(body, Duration::from_secs(10))
            .await
            .expect("a stream request goes out");
        let first = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .unwrap_or_else(|_| panic!("no first item or end within 10 s"));
        (stream, first)
    }

    /// Sends a status notice, as an edge syncing its modules' status does.
    pub async fn notify_status(
        &self,
        module_id: &str,
        key: &str,
        value: serde_json::Value,
        epoch: u64,
    ) {
        self.link
            .notify(Notice::StatusChanged {
                module_id: module_id.to_string(),
                key: key.to_string(),
                value: tether_common::protocol::Json(value.to_string()),
                epoch: tether_common::control::Epoch(epoch),
            })
            .await
            .expect("the notice goes out");
    }
}

/// A module addressed by system, name and index, as a client would.
pub fn module(system: &str, name: &str, index: u32) -> ModuleRef {
    ModuleRef::new(system, name, index)
}

/// Answers the master as a meek edge: acknowledges every decision and update.
async fn answer_meekly(mut incoming: tokio::sync::mpsc::Receiver<Incoming>) {
    while let Some(item) = incoming.recv().await {
        let Incoming::Request(request) = item else {
            continue;
        };
        let answer = match &request.body {
            Request::ControlDecision { epoch, .. } => Response::ControlAck { epoch: *epoch },
            _ => Response::Ack,
        };
        request.responder.respond(Ok(answer)).await;
    }
}

type TlsClient = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;
type FrameWriter = tokio_util::codec::FramedWrite<
    tokio::io::WriteHalf<TlsClient>,
    tether_common::protocol::FrameCodec<tether_common::protocol::Envelope>,
>;

/// A rogue edge that writes and never reads: whatever the master answers piles up on the
/// master's side of the connection. It sends a heartbeat every half second, so the master
/// keeps the link (a silent peer would be dropped for missed heartbeats).
pub struct DeafRogue {
    writer: std::sync::Arc<tokio::sync::Mutex<FrameWriter>>,
    _unread: tokio::io::ReadHalf<TlsClient>,
    pinger: tokio::task::JoinHandle<()>,
    next_id: u64,
}

impl Drop for DeafRogue {
    fn drop(&mut self) {
        self.pinger.abort();
    }
}

impl DeafRogue {
    /// Connects and authenticates as `edge`.
    pub async fn connect(cluster: &Cluster, edge: &str) -> DeafRogue {
        use futures::SinkExt;
        use tether_common::link::{client_exporter, edge_handshake};
        use tether_common::protocol::{Envelope, FrameCodec};
        let config = edge_connector(
            cluster,
            edge,
            LinkConfig::with_heartbeat(Duration::from_secs(1), 16 << 20),
        );
        let tcp = tokio::net::TcpStream::connect(&config.master_addrs[0])
            .await
            .expect("connect to the link port");
        let tls = tokio_rustls::TlsConnector::from(config.tls.clone())
            .connect(config.server_name.clone(), tcp)
            .await
            .expect("TLS with the master");
        let exporter = client_exporter(&tls).expect("an exporter");
        let done = edge_handshake(tls, &exporter, edge, &config.secret)
            .await
            .expect("the deaf rogue authenticates");
        let (read, write) = tokio::io::split(done.stream);
        let writer = std::sync::Arc::new(tokio::sync::Mutex::new(
            tokio_util::codec::FramedWrite::new(write, FrameCodec::<Envelope>::new(16 << 20)),
        ));
        let pinger = tokio::spawn({
            let writer = writer.clone();
            async move {
                for seq in 0.. {
                    let ping = Envelope::Ping { seq, sent_us: 0 };
                    if writer.lock().await.send(&ping).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        });
        DeafRogue {
            writer,
            _unread: read,
            pinger,
            next_id: 1,
        }
    }

    /// Sends a request (never reading its answer).
    pub async fn send(&mut self, body: Request) {
        use futures::SinkExt;
        let envelope = tether_common::protocol::Envelope::Request {
            id: self.next_id,
            deadline_ms: 60_000,
            body,
            on_behalf: None,
        };
        self.next_id += 1;
        self.writer
            .lock()
            .await
            .send(&envelope)
            .await
            .expect("the deaf rogue writes");
    }
}
