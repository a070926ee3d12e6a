//! Turning a site file into model writes: for a new data dir (`seed` in master.toml) and
//! for `tether-master import FILE`. Each driver's file is checked here; the code itself is
//! read when the master starts (see `crate::repos`).

use std::path::Path;

use anyhow::Context;
use tether_common::control::EdgeId;
use tether_common::model::{
    DriverRecord, EdgeRecord, Model, ModuleRecord, RepositoryRecord, Settings, SystemRecord,
};
use tether_common::protocol::EntityKind;
use tether_common::store::Write;
use tether_config::SiteFile;

use crate::repos::RepositoriesRoot;

fn settings(table: &toml::Table) -> anyhow::Result<Settings> {
    match serde_json::to_value(table)? {
        serde_json::Value::Object(map) => Ok(map),
        _ => Ok(Settings::new()),
    }
}

fn write<R: serde::Serialize>(kind: EntityKind, id: &str, record: &R) -> anyhow::Result<Write> {
    Ok((kind, id.to_string(), Some(serde_json::to_string(record)?)))
}

/// A path as the model stores it: absolute, so it means the same from any folder.
fn absolute(path: &Path) -> String {
    std::path::absolute(path)
        .unwrap_or_else(|_| path.to_path_buf())
        .display()
        .to_string()
}

/// Checks that a driver's script is a readable file inside its repository folder.
pub fn check_source(repository_path: &Path, file: &str) -> Result<(), String> {
    let path = repository_path.join(file);
    if Path::new(file).is_absolute() || file.split(['/', '\\']).any(|part| part == "..") {
        return Err(format!(
            "driver file {file:?} must be a path inside its repository"
        ));
    }
    std::fs::metadata(&path)
        .map(|_| ())
        .map_err(|err| format!("cannot read {}: {err}", path.display()))
}

/// Site-file writes that keep what the master set in the current model: an edge's
/// reported commit, and a repository's commit while its folder stays the same.
pub fn keep_commits(model: &Model, writes: Vec<Write>) -> Vec<Write> {
    writes
        .into_iter()
        .map(|(kind, id, json)| {
            let kept = match kind {
                EntityKind::Edge => model.edges.get(&id).and_then(|e| e.commit.clone()),
                EntityKind::Repository => model.repositories.get(&id).and_then(|current| {
                    let new: RepositoryRecord = serde_json::from_str(json.as_deref()?).ok()?;
                    (new.path == current.path).then(|| current.commit.clone())?
                }),
                _ => None,
            };
            let json = match (kept, json) {
                (Some(commit), Some(json)) => {
                    let mut record: serde_json::Value =
                        serde_json::from_str(&json).unwrap_or_default();
                    record["commit"] = serde_json::Value::String(commit);
                    Some(record.to_string())
                }
                (_, json) => json,
            };
            (kind, id, json)
        })
        .collect()
}

/// Every record of a site file, as writes (what it references first). Each repository
/// must be inside `root`.
pub fn site_writes(site: &SiteFile, root: &RepositoriesRoot) -> anyhow::Result<Vec<Write>> {
    let mut writes = Vec::new();
    for repository in &site.repositories {
        let path = absolute(&repository.path);
        root.folder(&path)
            .map_err(|err| anyhow::anyhow!("repository {}: {err}", repository.id))?;
        let record = RepositoryRecord {
            id: repository.id.clone(),
            name: repository.name.clone(),
            path,
            commit: None,
        };
        writes.push(write(EntityKind::Repository, &record.id, &record)?);
    }
    for driver in &site.drivers {
        let repository = site
            .repositories
            .iter()
            .find(|r| r.id == driver.repository)
            .context("a driver's repository is checked when the site file loads")?;
        check_source(&repository.path, &driver.file)
            .map_err(|err| anyhow::anyhow!("driver {}: {err}", driver.id))?;
        let record = DriverRecord {
            id: driver.id.clone(),
            name: driver.name.clone(),
            repository: driver.repository.clone(),
            file: driver.file.clone(),
            kind: driver.kind,
            transport: driver.transport,
            default_port: driver.default_port,
            default_settings: settings(&driver.default_settings)?,
            delimiter: driver.delimiter.clone(),
            frame_length: driver.frame_length,
            concurrency: driver.concurrency,
            timeout_ms: driver.timeout_ms,
            shared_polling: driver.shared_polling,
        };
        writes.push(write(EntityKind::Driver, &record.id, &record)?);
    }
    for edge in &site.edges {
        let record = EdgeRecord {
            id: edge.id.clone(),
            name: edge.name.clone(),
            description: edge.description.clone(),
            failover: edge.failover,
            timeout_ms: edge.timeout_ms,
            restore_window: edge.restore_window.clone(),
            time_zone: edge.time_zone.clone(),
            standby: edge.standby,
            admins: edge.admins.clone(),
            commit: None,
            secret_file: Some(absolute(&edge.secret_file)),
            nodes: edge.nodes.clone(),
            pair_timeout_ms: edge.pair_timeout_ms,
            isolation: edge.isolation,
            unwitnessed_takeover_ms: edge.unwitnessed_takeover_ms,
            device_hold_down_ms: edge.device_hold_down_ms,
        };
        writes.push(write(EntityKind::Edge, &record.id, &record)?);
    }
    for module in &site.modules {
        let record = ModuleRecord {
            id: module.id.clone(),
            driver: module.driver.clone(),
            name: module.name.clone(),
            host: module.host.clone(),
            port: module.port,
            uri: module.uri.clone(),
            settings: settings(&module.settings)?,
            edge: module.edge.clone().map(EdgeId::new),
        };
        writes.push(write(EntityKind::Module, &record.id, &record)?);
    }
    for system in &site.systems {
        let record = SystemRecord {
            id: system.id.clone(),
            name: system.name.clone(),
            edge: system.edge.clone().map(EdgeId::new),
            modules: system.modules.clone(),
            settings: settings(&system.settings)?,
        };
        writes.push(write(EntityKind::System, &record.id, &record)?);
    }
    Ok(writes)
}
