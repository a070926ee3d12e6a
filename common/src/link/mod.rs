//! The edge link's tokio shell: TLS, authentication, request multiplexing, heartbeats and
//! reconnects. The rules of who controls what live elsewhere (`control`); this only moves
//! messages and says when a link is up or down.

pub mod auth;
mod connection;
mod connector;
mod handshake;
mod listener;
mod outbox;
mod secret;
pub mod tls;

pub use connection::{
    Incoming, IncomingRequest, Link, LinkConfig, LinkError, ObserveRtt, Responder, ResponseStream,
    RttObserver, RttSink, refuse_all,
};
pub use connector::{ConnectorConfig, LinkEvent, connect_once, maintain_link, reconnect_delay};
pub use handshake::{
    AuthError, Handshaken, client_exporter, edge_handshake, master_handshake, server_exporter,
};
pub use listener::{
    AuthenticatedEdge, ConnectionGauges, EdgeSecrets, ListenerConfig, run_listener,
};
pub use secret::{MIN_SECRET_BYTES, Secret, SecretError};
