//! `tether-master import FILE --config master.toml`: load a site file into the model of a
//! stopped master. The whole file goes in as one checked write, or nothing does.

use std::path::Path;

use anyhow::Context;
use tether_config::{MasterConfig, SiteFile};

/// Imports `file`; answers a one-line summary.
pub fn run(config_path: &Path, file: &Path) -> anyhow::Result<String> {
    let config = MasterConfig::load(config_path)?;
    let site = SiteFile::load(file)?;
    let root = crate::server::repositories_root(&config, Some(&site))?;
    let writes = crate::seed::site_writes(&site, &root)?;
    tether_common::store::create_data_dir(&config.data_dir)
        .with_context(|| format!("cannot create data_dir {}", config.data_dir.display()))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let (model, _) = runtime.block_on(crate::server::open_model(&config))?;
    let changes = runtime
        .block_on(model.write(|current| Ok(crate::seed::keep_commits(current, writes.clone()))))
        .with_context(|| format!("{} does not fit the model", file.display()))?;
    let (_, version) = model.snapshot();
    Ok(format!(
        "imported {}: {} records changed, model version {version}",
        file.display(),
        changes.len()
    ))
}
