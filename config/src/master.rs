//! `master.toml`: where the master keeps its data, where it listens, and its TLS identity.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::load::{
    base_dir, check_api_url, check_id, check_link_settings, check_range, load_file, resolve,
};
use crate::{ConfigError, Limits, defaults};

/// The master's configuration, paths resolved against the file's folder.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MasterConfig {
    /// The master's name in `/api/v1/health` and in logs.
    #[serde(default = "default_master_id")]
    pub id: String,
    /// Folder for the master's database and its admin token.
    pub data_dir: PathBuf,
    /// The client API (HTTPS).
    pub api_listen: SocketAddr,
    /// The API's address as clients reach it (`https://host:port`), sent to the other side
    /// for its `Tether-Preferred-Server` hints; `https://` + `api_listen` when unset.
    #[serde(default)]
    pub api_url: Option<String>,
    /// The edge link listener (TLS).
    pub link_listen: SocketAddr,
    /// The site file a new data folder is seeded from; it also names the edges and their secrets.
    pub seed: Option<PathBuf>,
    /// The folder every driver repository must be inside (a repository's path is
    /// relative to it, or absolute within it). It must not hold the certificates, keys,
    /// secrets or data folder: repositories are read into the code edges fetch.
    #[serde(default = "default_repositories_root")]
    pub repositories_root: PathBuf,
    /// How long to wait for edges at boot.
    #[serde(default = "default_boot_wait_ms")]
    pub boot_wait_ms: u64,
    /// Heartbeat interval on every edge link.
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    /// Largest frame accepted from an authenticated edge.
    #[serde(default = "default_max_frame_bytes")]
    pub max_frame_bytes: u32,
    /// A connection that has not authenticated by then is dropped.
    #[serde(default = "default_handshake_timeout_ms")]
    pub handshake_timeout_ms: u64,
    /// Model changes kept in the change log. An edge whose version is older than the log
    /// reaches gets a full snapshot of its slice instead of the changes.
    #[serde(default = "default_change_log_limit")]
    pub change_log_limit: u64,
    /// What a client (and, on the master, an edge link) may take: `[limits]`.
    #[serde(default)]
    pub limits: Limits,
    /// TLS identity and trust.
    pub tls: MasterTls,
    /// Several masters sharing their state in etcd; absent: this master alone on redb.
    #[serde(default)]
    pub cluster: Option<crate::ClusterConfig>,
    /// Receivers every audit event is POSTed to: `[[alerts]]`.
    #[serde(default)]
    pub alerts: Vec<crate::AlertConfig>,
}

/// The master's certificate, key and the CA its edges' client certificates chain to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MasterTls {
    /// PEM certificate chain served on both listeners.
    pub cert: PathBuf,
    /// PEM private key of `cert`.
    pub key: PathBuf,
    /// PEM CA that edge client certificates must chain to.
    pub ca: PathBuf,
    /// Whether edges must present a client certificate from `ca` (in addition to the secret).
    #[serde(default = "default_true")]
    pub require_client_cert: bool,
    /// Create a development PKI (CA, certificates, secrets) where the files are missing.
    /// For the examples and tests; production sets this to false and brings its own PKI.
    #[serde(default)]
    pub create_dev_certs: bool,
}

fn default_repositories_root() -> PathBuf {
    PathBuf::from("repositories")
}
fn default_master_id() -> String {
    "master".to_string()
}
fn default_boot_wait_ms() -> u64 {
    defaults::BOOT_WAIT_MS
}
fn default_heartbeat_ms() -> u64 {
    defaults::HEARTBEAT_MS
}
fn default_max_frame_bytes() -> u32 {
    defaults::MAX_FRAME_BYTES
}
fn default_handshake_timeout_ms() -> u64 {
    defaults::HANDSHAKE_TIMEOUT_MS
}
fn default_change_log_limit() -> u64 {
    defaults::CHANGE_LOG_LIMIT
}
fn default_true() -> bool {
    true
}

impl MasterConfig {
    /// Reads, resolves and validates `master.toml`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let mut config: MasterConfig = load_file(path)?;
        let base = base_dir(path);
        config.data_dir = resolve(&base, &config.data_dir);
        config.seed = config.seed.map(|seed| resolve(&base, &seed));
        config.repositories_root = resolve(&base, &config.repositories_root);
        config.tls.cert = resolve(&base, &config.tls.cert);
        config.tls.key = resolve(&base, &config.tls.key);
        config.tls.ca = resolve(&base, &config.tls.ca);
        if let Some(cluster) = &mut config.cluster {
            cluster.resolve(&base);
        }
        crate::alerts::prepare(&mut config.alerts, &base, path)?;
        config.validate(path)?;
        Ok(config)
    }

    /// The API's address as clients reach it.
    pub fn public_api_url(&self) -> String {
        self.api_url
            .clone()
            .unwrap_or_else(|| format!("https://{}", self.api_listen))
    }

    fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        if let Some(url) = &self.api_url {
            check_api_url(file, url)?;
        }
        check_id(file, "id", &self.id)?;
        check_range(file, "boot_wait_ms", self.boot_wait_ms, 0..=600_000)?;
        check_range(
            file,
            "change_log_limit",
            self.change_log_limit,
            1..=10_000_000,
        )?;
        self.limits.validate(file)?;
        if let Some(cluster) = &self.cluster {
            cluster.validate(file)?;
        }
        check_link_settings(
            file,
            self.heartbeat_ms,
            self.max_frame_bytes,
            self.handshake_timeout_ms,
        )?;
        if self.api_listen == self.link_listen {
            return Err(ConfigError::invalid(
                file,
                "link_listen",
                "an address other than api_listen",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("master.toml");
        std::fs::File::create(&path)
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        path
    }

    const GOOD: &str = r#"
data_dir = "data"
api_listen = "127.0.0.1:8443"
link_listen = "127.0.0.1:17400"
seed = "site.toml"
[tls]
cert = "certs/master.pem"
key = "certs/master.key"
ca = "/etc/tether/ca.pem"
"#;

    #[test]
    fn a_cluster_table_loads_and_each_key_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let cluster = format!(
            "{GOOD}[cluster]\nmaster_id = \"m1\"\netcd = [\"http://10.0.0.5:2379\", \"http://10.0.0.6:2379\"]\n"
        );
        let config = MasterConfig::load(&write(dir.path(), &cluster)).unwrap();
        let loaded = config.cluster.expect("a cluster");
        assert_eq!((loaded.master_id.as_str(), loaded.lease_ms), ("m1", 5000));
        assert_eq!(loaded.prefix, "/tether/");
        assert!(
            MasterConfig::load(&write(dir.path(), GOOD))
                .unwrap()
                .cluster
                .is_none()
        );
        for (change, named) in [
            (("\"m1\"", "\"m 1\""), "cluster.master_id"),
            (("http://10.0.0.6:2379", "10.0.0.6:2379"), "cluster.etcd"),
            (
                ("http://10.0.0.6:2379", "https://10.0.0.6:2379"),
                "cluster.tls",
            ),
            (("etcd = [", "lease_ms = 100\netcd = ["), "cluster.lease_ms"),
            (("etcd = [", "colour = 1\netcd = ["), "colour"),
        ] {
            let text = cluster.replace(change.0, change.1);
            let err = MasterConfig::load(&write(dir.path(), &text))
                .unwrap_err()
                .to_string();
            assert!(err.contains(named), "{named}: {err}");
            assert!(err.contains("master.toml"), "{err}");
        }
    }

    #[test]
    fn paths_are_relative_to_the_file_and_defaults_apply() {
        let dir = tempfile::tempdir().unwrap();
        let config = MasterConfig::load(&write(dir.path(), GOOD)).unwrap();
        assert_eq!(config.data_dir, dir.path().join("data"));
        assert_eq!(config.seed, Some(dir.path().join("site.toml")));
        assert_eq!(config.tls.ca, PathBuf::from("/etc/tether/ca.pem"));
        assert_eq!(config.boot_wait_ms, 6000);
        assert_eq!(config.heartbeat_ms, 1000);
        assert_eq!(config.max_frame_bytes, 16 * 1024 * 1024);
        assert!(config.tls.require_client_cert);
        assert!(!config.tls.create_dev_certs);
    }

    #[test]
    fn a_bad_address_names_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let text = GOOD.replace("127.0.0.1:8443", "localhost-8443");
        let err = MasterConfig::load(&write(dir.path(), &text))
            .unwrap_err()
            .to_string();
        assert!(err.contains("master.toml:3: key `api_listen`"), "{err}");
    }

    #[test]
    fn an_out_of_range_value_says_what_was_expected() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!("heartbeat_ms = 0\n{GOOD}");
        let err = MasterConfig::load(&write(dir.path(), &text))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("key `heartbeat_ms`: expected a number from 50 to 60000, not 0"),
            "{err}"
        );
    }

    #[test]
    fn a_missing_file_is_named() {
        let err = MasterConfig::load(Path::new("/nonexistent/master.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("/nonexistent/master.toml: cannot read"),
            "{err}"
        );
    }

    #[test]
    fn a_missing_key_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let text = GOOD.replace("data_dir = \"data\"\n", "");
        let err = MasterConfig::load(&write(dir.path(), &text))
            .unwrap_err()
            .to_string();
        assert!(err.contains("data_dir"), "{err}");
    }
}
