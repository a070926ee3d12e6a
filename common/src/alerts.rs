//! Alerts: every audit event (a change of holder, refused code, a refused request over an
//! edge's link) POSTed as JSON to each `[[alerts]]` receiver, one at a time and in order,
//! until the receiver answers 2xx; retried with backoff while it does not.
//!
//! The audit log on disk is the queue: each receiver has a mark in the store of the last
//! event it took, moved on only after a 2xx, so nothing is lost across a restart or while
//! the receiver (or the network to it) is down, and an edge cut off from its master still
//! alerts. Each receiver keeps at most `max_pending` events: beyond, the oldest are
//! dropped (the mark moved past them) and counted in `tether_alerts_dropped_total`, as are
//! events the audit log let go before they were delivered (it keeps the newest of each
//! kind, so the numbers left have gaps, counted as the mark passes them). A crash between a 2xx and the
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

/// The store's marks of the receivers, by URL (one receiver per URL: the configuration
/// refuses two).
const MARK_PREFIX: &str = "alerts_sent ";

/// Starts one delivery task per receiver of `receivers`, sending `store`'s audit events
/// as `server` (`master:ID` or `edge:ID`), counted in `metrics`. The marks of receivers
/// no longer configured are forgotten: one configured again later starts from then.
pub fn start(
    store: Arc<Store>,
    receivers: &[AlertConfig],
    server: &str,
    metrics: Arc<Metrics>,
) -> Result<(), AlertError> {
    let mut senders = Vec::new();
    for (index, receiver) in receivers.iter().enumerate() {
        senders.push(Sender::new(
            store.clone(),
            index,
            receiver,
            server.to_string(),
            metrics.clone(),
        )?);
    }
    let kept: Vec<&str> = senders.iter().map(|s| s.mark.as_str()).collect();
    match store.audit_marks(MARK_PREFIX) {
        Ok(marks) => {
            for mark in marks.iter().filter(|m| !kept.contains(&m.as_str())) {
                if let Err(err) = store.remove_audit_mark(mark) {
                    tracing::warn!(
                        "cannot forget the mark of a receiver no longer configured: {err}"
                    );
                }
            }
        }
        Err(err) => tracing::warn!("cannot read the alert receivers' marks: {err}"),
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
    /// The receiver as metrics and logs name it: its place in the file, scheme and host
    /// (a webhook's path or query may hold its secret).
    label: String,
    token: Option<String>,
    http: reqwest::Client,
    max_pending: u64,
    /// The store's mark of the last event this receiver took.
    mark: String,
    server: String,
    metrics: Arc<Metrics>,
}

fn read(label: &str, what: &'static str, path: &std::path::Path) -> Result<String, AlertError> {
    std::fs::read_to_string(path).map_err(|err| AlertError::File {
        url: label.to_string(),
        what,
        path: path.display().to_string(),
        err: err.to_string(),
    })
}

/// A page read from the store: the events to send, how many are pending, where the
/// receiver stands after the bound, and how many the bound dropped.
struct Page {
    entries: Vec<AuditEntry>,
    pending: u64,
    position: u64,
    dropped: u64,
}

impl Sender {
    fn new(
        store: Arc<Store>,
        index: usize,
        receiver: &AlertConfig,
        server: String,
        metrics: Arc<Metrics>,
    ) -> Result<Sender, AlertError> {
        let url = receiver.url.clone();
        let label = format!("alerts[{index}] {}", origin(&url));
        let token = match &receiver.token_file {
            Some(path) => Some(read(&label, "token_file", path)?.trim().to_string()),
            None => None,
        };
        crate::link::tls::install_crypto_provider();
        // A redirect would turn the POST into a GET (and drop the token on another
        // host): it is an answer like any other that is not 2xx, and tried again.
        let mut http = reqwest::Client::builder()
            .timeout(POST_TIMEOUT)
            .connect_timeout(POST_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none());
        if let Some(path) = &receiver.ca_file {
            let pem = read(&label, "ca_file", path)?;
            let ca = reqwest::Certificate::from_pem(pem.as_bytes()).map_err(|err| {
                AlertError::Client {
                    url: label.clone(),
                    err: format!("ca_file {} is not a PEM certificate: {err}", path.display()),
                }
            })?;
            http = http.add_root_certificate(ca);
        }
        let http = http.build().map_err(|err| AlertError::Client {
            url: label.clone(),
            err: err.without_url().to_string(),
        })?;
        Ok(Sender {
            store,
            label,
            mark: format!("{MARK_PREFIX}{url}"),
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
        // Where this receiver stands, read once and then kept here: a mark that could not
        // be stored is stored with the next, and no event is sent twice for it.
        let mut position = None;
        let mut backoff = BACKOFF_START;
        loop {
            match self.deliver_pending(&mut position).await {
                Ok(()) => {
                    backoff = BACKOFF_START;
                    // What was appended meanwhile was read with the page.
                    while appended.try_recv().is_ok() {}
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

    /// The next page after `known` (or after the stored mark), over the bound dropped.
    async fn page(&self, known: Option<u64>) -> Result<Page, String> {
        let (store, mark, max) = (self.store.clone(), self.mark.clone(), self.max_pending);
        tokio::task::spawn_blocking(move || -> Result<Page, crate::store::StoreError> {
            let mut position = match known {
                Some(position) => position,
                None => match store.audit_mark(&mark)? {
                    Some(position) => position,
                    // A receiver new to this server starts from now, not from its history.
                    None => {
                        let newest = store.newest_audit_seq()?;
                        store.set_audit_mark(&mark, newest)?;
                        newest
                    }
                },
            };
            let (mut entries, mut pending) = store.audit_page(position, BATCH)?;
            let mut dropped = 0;
            // Over the bound: the oldest present events go, counted.
            if pending > max {
                let excess = pending - max;
                let (skipped, _) = store.audit_page(position, excess as usize)?;
                if let Some(last) = skipped.last() {
                    position = last.seq;
                    dropped = excess;
                    (entries, pending) = store.audit_page(position, BATCH)?;
                    // Stored when it can be; kept here meanwhile.
                    let _ = store.set_audit_mark(&mark, position);
                }
            }
            Ok(Page {
                entries,
                pending,
                position,
                dropped,
            })
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
    }

    /// Delivers every pending event in order; an error stops at the first not taken.
    async fn deliver_pending(&self, position: &mut Option<u64>) -> Result<(), String> {
        loop {
            let page = self.page(*position).await?;
            let mut sent = page.position;
            *position = Some(sent);
            if page.dropped > 0 {
                self.metrics.alerts_dropped(&self.label, page.dropped);
            }
            let mut pending = page.pending;
            self.metrics.alerts_pending(&self.label, pending);
            if page.entries.is_empty() {
                return Ok(());
            }
            for entry in page.entries {
                // Events the audit log let go before they were delivered (it keeps its
                // newest of each kind): counted once, as the mark passes them.
                let gone = entry.seq.saturating_sub(sent + 1);
                if gone > 0 {
                    self.metrics.alerts_dropped(&self.label, gone);
                }
                self.post(&entry).await?;
                sent = entry.seq;
                *position = Some(sent);
                let (store, mark) = (self.store.clone(), self.mark.clone());
                let stored = tokio::task::spawn_blocking(move || store.set_audit_mark(&mark, sent))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map_err(|e| e.to_string()));
                if let Err(err) = stored {
                    tracing::warn!(receiver = %self.label, "cannot store how far alerts went: {err}; kept in memory, stored with the next");
                }
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
        // Without the URL: its path or query may hold the receiver's secret.
        let answer = request
            .send()
            .await
            .map_err(|err| err.without_url().to_string())?;
        match answer.status() {
            status if status.is_success() => Ok(()),
            status => Err(format!("the receiver answered {status}")),
        }
    }
}

/// A URL's scheme and host (with its port), without credentials, path or query.
fn origin(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let authority = rest.split(['/', '?', '#']).next().unwrap_or(rest);
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    format!("{scheme}://{host}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_receiver_is_named_without_its_credentials_path_or_query() {
        assert_eq!(
            origin("https://user:secret@hooks.example/x/T0KEN?token=t"),
            "https://hooks.example"
        );
        assert_eq!(origin("http://127.0.0.1:9/a@b"), "http://127.0.0.1:9");
    }
}
