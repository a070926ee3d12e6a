//! Alerts: every audit event (a change of holder, refused code, a refused request over an
//! edge's link) POSTed as JSON to each `[[alerts]]` receiver, one at a time and in order,
//! until the receiver answers 2xx; retried with backoff while it does not.
//!
//! The audit log on disk is the queue: each receiver has a mark in the store of the last
//! event it took, moved on only after a 2xx, so nothing is lost across a restart or while
//! the receiver (or the network to it) is down, and an edge cut off from its master still
//! alerts. Each receiver keeps at most `max_pending` events: beyond, the oldest are
//! dropped (the mark moved past them) and counted in `tether_alerts_dropped_total`, as are
//! events the audit log let go before they were delivered. A crash between a 2xx and the
//! mark may send one event again: each carries `id` (`SERVER:SEQ`), the same every time,
//! for a receiver to drop a repeat.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tether_config::AlertConfig;

use crate::api::audit_entry_json;
use crate::metrics::Metrics;
use crate::store::{AuditEntry, Store};

/// The first pause after a failed delivery; doubled each failure up to [`BACKOFF_MAX`].
const BACKOFF_START: Duration = Duration::from_millis(250);
/// The longest pause between tries: a receiver back up gets its events within this.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// One POST takes at most this long (connect included).
const POST_TIMEOUT: Duration = Duration::from_secs(10);
/// Events read from the store at a time.
const BATCH: usize = 1000;
/// Without a new event, the log is looked at this often anyway (a lagging subscription).
const IDLE_LOOK: Duration = Duration::from_secs(5);

/// Why the alerts could not be set up (a receiver's file).
#[derive(Debug, thiserror::Error)]
pub enum AlertError {
    /// A token or CA file could not be read.
    #[error("alerts to {url}: cannot read {what} {path}: {err}")]
    File {
        /// The receiver.
        url: String,
        /// `token_file` or `ca_file`.
        what: &'static str,
        /// The file.
        path: String,
        /// Why.
        err: String,
    },
    /// The HTTP client could not be built (a CA file that is not PEM).
    #[error("alerts to {url}: {err}")]
    Client {
        /// The receiver.
        url: String,
        /// Why.
        err: String,
    },
}

/// Starts one delivery task per receiver of `receivers`, sending `store`'s audit events
/// as `server` (`master:ID` or `edge:ID`), counted in `metrics`.
pub fn start(
    store: Arc<Store>,
    receivers: &[AlertConfig],
    server: &str,
    metrics: Arc<Metrics>,
) -> Result<(), AlertError> {
    let mut senders = Vec::new();
    for receiver in receivers {
        senders.push(Sender::new(
            store.clone(),
            receiver,
            server.to_string(),
            metrics.clone(),
        )?);
    }
    for sender in senders {
        tokio::spawn(sender.run());
    }
    Ok(())
}

/// One receiver's delivery.
struct Sender {
    store: Arc<Store>,
    url: String,
    /// The receiver as metrics and logs name it: the URL without query or credentials.
    label: String,
    token: Option<String>,
    http: reqwest::Client,
    max_pending: u64,
    /// The store's mark of the last event this receiver took.
    mark: String,
    server: String,
    metrics: Arc<Metrics>,
}

fn read(url: &str, what: &'static str, path: &std::path::Path) -> Result<String, AlertError> {
    std::fs::read_to_string(path).map_err(|err| AlertError::File {
        url: url.to_string(),
        what,
        path: path.display().to_string(),
        err: err.to_string(),
    })
}

impl Sender {
    fn new(
        store: Arc<Store>,
        receiver: &AlertConfig,
        server: String,
        metrics: Arc<Metrics>,
    ) -> Result<Sender, AlertError> {
        let url = receiver.url.clone();
        let token = match &receiver.token_file {
            Some(path) => Some(read(&url, "token_file", path)?.trim().to_string()),
            None => None,
        };
        crate::link::tls::install_crypto_provider();
        let mut http = reqwest::Client::builder()
            .timeout(POST_TIMEOUT)
            .connect_timeout(POST_TIMEOUT);
        if let Some(path) = &receiver.ca_file {
            let pem = read(&url, "ca_file", path)?;
            let ca = reqwest::Certificate::from_pem(pem.as_bytes()).map_err(|err| {
                AlertError::Client {
                    url: url.clone(),
                    err: format!("ca_file {} is not a PEM certificate: {err}", path.display()),
                }
            })?;
            http = http.add_root_certificate(ca);
        }
        let http = http.build().map_err(|err| AlertError::Client {
            url: url.clone(),
            err: err.to_string(),
        })?;
        Ok(Sender {
            store,
            label: label(&url),
            mark: format!("alerts_sent {url}"),
            url,
            token,
            http,
            max_pending: receiver.max_pending,
            server,
            metrics,
        })
    }

    async fn run(self) {
        let mut appended = self.store.subscribe_audit();
        let mut backoff = BACKOFF_START;
        loop {
            match self.deliver_pending().await {
                Ok(()) => {
                    backoff = BACKOFF_START;
                    let _ = tokio::time::timeout(IDLE_LOOK, appended.recv()).await;
                }
                Err(err) => {
                    // Once per failure streak at warn; the retries at debug.
                    if backoff == BACKOFF_START {
                        tracing::warn!(receiver = %self.label, "alert not delivered: {err}; trying again, and keeping the events until it is");
                    } else {
                        tracing::debug!(receiver = %self.label, "alert not delivered: {err}");
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    /// The events after the mark, oldest first, at most [`BATCH`]; the pending count.
    async fn pending(&self) -> Result<(u64, Vec<AuditEntry>, u64), String> {
        let (store, mark, max) = (self.store.clone(), self.mark.clone(), self.max_pending);
        let metrics = (self.metrics.clone(), self.label.clone());
        tokio::task::spawn_blocking(move || {
            let newest = store.newest_audit_seq().map_err(|e| e.to_string())?;
            // A receiver new to this server starts from now, not from its history.
            let Some(mut sent) = store.audit_mark(&mark).map_err(|e| e.to_string())? else {
                store
                    .set_audit_mark(&mark, newest)
                    .map_err(|e| e.to_string())?;
                return Ok((newest, Vec::new(), 0));
            };
            // Over the bound: the oldest go, counted.
            let over = newest.saturating_sub(sent).saturating_sub(max);
            if over > 0 {
                sent += over;
                store
                    .set_audit_mark(&mark, sent)
                    .map_err(|e| e.to_string())?;
                metrics.0.alerts_dropped(&metrics.1, over);
            }
            let mut entries = store.audit_after(sent).map_err(|e| e.to_string())?;
            // Events the log itself let go before delivery (it keeps its newest).
            let first = entries.first().map_or(newest + 1, |e| e.seq);
            let gone = first.saturating_sub(sent + 1);
            if gone > 0 {
                sent = first - 1;
                store
                    .set_audit_mark(&mark, sent)
                    .map_err(|e| e.to_string())?;
                metrics.0.alerts_dropped(&metrics.1, gone);
            }
            let pending = entries.len() as u64;
            entries.truncate(BATCH);
            Ok((sent, entries, pending))
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// Delivers every pending event in order; an error stops at the first not taken.
    async fn deliver_pending(&self) -> Result<(), String> {
        loop {
            let (_, entries, mut pending) = self.pending().await?;
            self.metrics.alerts_pending(&self.label, pending);
            if entries.is_empty() {
                return Ok(());
            }
            for entry in entries {
                self.post(&entry).await?;
                let (store, mark, seq) = (self.store.clone(), self.mark.clone(), entry.seq);
                tokio::task::spawn_blocking(move || store.set_audit_mark(&mark, seq))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
                pending = pending.saturating_sub(1);
                self.metrics.alerts_pending(&self.label, pending);
            }
        }
    }

    async fn post(&self, entry: &AuditEntry) -> Result<(), String> {
        let mut body = audit_entry_json(entry);
        if let Some(map) = body.as_object_mut() {
            map.insert("server".into(), Value::String(self.server.clone()));
            map.insert("seq".into(), entry.seq.into());
            map.insert(
                "id".into(),
                Value::String(format!("{}:{}", self.server, entry.seq)),
            );
        }
        let mut request = self.http.post(&self.url).json(&body);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let answer = request.send().await.map_err(|err| err.to_string())?;
        match answer.status() {
            status if status.is_success() => Ok(()),
            status => Err(format!("the receiver answered {status}")),
        }
    }
}

/// A receiver's URL as metrics and logs may show it: without credentials or query.
fn label(url: &str) -> String {
    let without_query = url.split(['?', '#']).next().unwrap_or(url);
    match without_query.split_once("://") {
        Some((scheme, rest)) => {
            let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
            format!("{scheme}://{rest}")
        }
        None => without_query.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_receiver_is_named_without_its_credentials_or_query() {
        assert_eq!(
            label("https://user:secret@hooks.example/x?token=t"),
            "https://hooks.example/x"
        );
        assert_eq!(
            label("http://127.0.0.1:9/alerts"),
            "http://127.0.0.1:9/alerts"
        );
    }
}
