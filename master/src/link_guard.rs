//! What the master lets an edge do over its link: the link policy
//! ([`tether_common::api::link_need`]) with the master's users for calls an edge forwards,
//! and rate limits on what an edge can make the master store (audit records, and the
//! audit records of its own refusals). An authenticated edge is still a peer that may be
//! hostile: it speaks for its own site only.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use tether_common::api::{Access, LinkNeed, link_need, link_target, pin_module};
use tether_common::code::{Code, Hash};
use tether_common::link::IncomingRequest;
use tether_common::model::Model;
use tether_common::protocol::{AuditRecord, EntityKind, OnBehalf};
use tether_common::rate::TokenBucket;
use tether_common::report::printable;

/// Audit records an edge may report at once, and per second after that.
const AUDIT_BURST: u32 = 1_000;
const AUDIT_PER_SECOND: u32 = 10;
/// Audit records in one report; the edge sends more in further reports.
pub const AUDIT_BATCH_MAX: usize = 256;
/// The longest reason kept of an audit record (an edge's report, or a refusal).
pub const REASON_MAX: usize = 1_024;
/// The longest name kept in an edge's report of a code change (repository, commits,
/// driver, module).
const NAME_MAX: usize = 128;
/// Blobs one fetch may ask for (a repository of more files is fetched in several).
pub const BLOBS_PER_FETCH: usize = 4_096;
/// Refusals recorded in the audit log per edge at once, and per second after that; the
/// rest are counted in the metrics only, so a rogue edge cannot fill the log with them.
const REFUSAL_BURST: u32 = 20;
const REFUSAL_PER_SECOND: u32 = 1;

/// Per-edge state of the master's checks, shared by every link of the edge (a rogue edge
/// gains nothing by reconnecting).
pub struct LinkGuard {
    access: Access,
    audits: Mutex<HashMap<String, TokenBucket>>,
    refusals: Mutex<HashMap<String, TokenBucket>>,
}

fn take(
    buckets: &Mutex<HashMap<String, TokenBucket>>,
    edge: &str,
    n: u64,
    limit: (u32, u32),
) -> bool {
    let now = Instant::now();
    let mut buckets = buckets.lock().unwrap_or_else(|p| p.into_inner());
    buckets
        .entry(edge.to_string())
        .or_insert_with(|| TokenBucket::new(limit.0, limit.1, now))
        .take(n, now)
}

impl LinkGuard {
    /// Checks with `access`: the master's admin token and users.
    pub fn new(access: Access) -> Self {
        LinkGuard {
            access,
            audits: Mutex::default(),
            refusals: Mutex::default(),
        }
    }

    /// Whether edge `edge` may have `request` served; the refusal says why, naming the
    /// edge and what it asked. The module it addresses is pinned by id first, so the
    /// module judged is the module run.
    pub fn admit(
        &self,
        model: &Model,
        edge: &str,
        request: &mut IncomingRequest,
    ) -> Result<(), String> {
        pin_module(model, &mut request.body);
        match link_need(model, edge, &request.body) {
            LinkNeed::Own => Ok(()),
            LinkNeed::Never(what) => Err(format!(
                "edge {edge} sent {what}, which only a master sends"
            )),
            LinkNeed::User(need) => {
                let target = link_target(&request.body);
                let Some(OnBehalf(token)) = &request.on_behalf else {
                    return Err(format!(
                        "edge {edge} may not {target}: it is outside the edge's site, and no user of the master asked for it"
                    ));
                };
                let principal = self.access.authenticate(token).ok_or_else(|| {
                    format!("edge {edge} asked to {target} for a user token that is not valid here")
                })?;
                self.access.authorize(&principal, &need).map_err(|refused| {
                    format!(
                        "edge {edge} asked to {target} for user {}, who is refused: {}",
                        principal.user, refused.message
                    )
                })
            }
        }
    }

    /// Whether a refusal on `edge`'s link goes into the audit log (within its rate).
    pub fn audit_refusal(&self, edge: &str) -> bool {
        take(&self.refusals, edge, 1, (REFUSAL_BURST, REFUSAL_PER_SECOND))
    }

    /// The audit records `edge` reports, checked: about itself only, at most
    /// [`AUDIT_BATCH_MAX`] at once and within its rate (the edge sends them again later),
    /// reasons cut to a bounded length.
    pub fn edge_audits(
        &self,
        edge: &str,
        mut events: Vec<AuditRecord>,
    ) -> Result<Vec<AuditRecord>, AuditRefused> {
        if let Some(foreign) = events.iter().find(|event| event.edge != edge) {
            return Err(AuditRefused::Foreign(format!(
                "edge {edge} may report audit events of its own location only, not of {}",
                printable(&foreign.edge, 64)
            )));
        }
        if events.len() > AUDIT_BATCH_MAX {
            return Err(AuditRefused::TooMany(format!(
                "{} audit events in one report: at most {AUDIT_BATCH_MAX}",
                events.len()
            )));
        }
        if !take(
            &self.audits,
            edge,
            events.len() as u64,
            (AUDIT_BURST, AUDIT_PER_SECOND),
        ) {
            return Err(AuditRefused::Rate(format!(
                "edge {edge} reports audit events faster than {AUDIT_PER_SECOND} a second: report again later"
            )));
        }
        // Every text field cut: what an edge can make the master store is bounded in
        // bytes, not only in records.
        for event in &mut events {
            cut(&mut event.reason, REASON_MAX);
            if let Some(code) = &mut event.code {
                cut(&mut code.repository, NAME_MAX);
                cut(&mut code.to, NAME_MAX);
                if let Some(from) = &mut code.from {
                    cut(from, NAME_MAX);
                }
                if let Some((driver, module)) = &mut code.module {
                    cut(driver, NAME_MAX);
                    cut(module, NAME_MAX);
                }
            }
        }
        Ok(events)
    }
}

/// Cuts `text` to at most `max` characters.
pub fn cut(text: &mut String, max: usize) {
    if let Some((at, _)) = text.char_indices().nth(max) {
        text.truncate(at);
    }
}

/// Why an edge's audit report was not taken.
#[derive(Debug)]
pub enum AuditRefused {
    /// A record about another location.
    Foreign(String),
    /// More records than one report may hold.
    TooMany(String),
    /// Over the edge's rate: it may send them again later.
    Rate(String),
}

/// Whether edge `edge` runs module `module_id`, so that its status notices for it count.
pub fn runs_module(model: &Model, edge: &str, module_id: &str) -> bool {
    model
        .modules
        .get(module_id)
        .and_then(|module| model.module_edge(module))
        .is_some_and(|owner| owner == edge)
}

/// The hashes edge `edge` may fetch: the files of the repositories of its slice, at the
/// commits the master runs, deduplicated and in the order asked. Anything else (another
/// site's code, a blob of no manifest, more than [`BLOBS_PER_FETCH`]) is refused whole,
/// naming why.
pub fn fetchable(
    model: &Model,
    code: &Code,
    edge: &str,
    hashes: Vec<Hash>,
) -> Result<Vec<Hash>, String> {
    let mut seen = std::collections::HashSet::new();
    let hashes: Vec<Hash> = hashes.into_iter().filter(|h| seen.insert(*h)).collect();
    if hashes.len() > BLOBS_PER_FETCH {
        return Err(format!(
            "{} different blobs in one fetch: at most {BLOBS_PER_FETCH}",
            hashes.len()
        ));
    }
    let allowed: std::collections::HashSet<Hash> = model
        .slice_keys(edge)
        .into_iter()
        .filter(|(kind, _)| *kind == EntityKind::Repository)
        .filter_map(|(_, id)| code.repo(&id))
        .flat_map(|repo| repo.files.iter().map(|file| file.hash))
        .collect();
    let foreign = hashes.iter().filter(|h| !allowed.contains(*h)).count();
    if foreign > 0 {
        return Err(format!(
            "edge {edge} asked for {foreign} blob(s) outside the code of its own site (first {})",
            hashes
                .iter()
                .find(|h| !allowed.contains(*h))
                .map(hex::encode)
                .unwrap_or_default()
        ));
    }
    Ok(hashes)
}
