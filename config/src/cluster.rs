//! `[cluster]` in master.toml: several masters sharing their state in etcd. Absent: one
//! master on its embedded redb.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::ConfigError;
use crate::load::{check_id, check_range, resolve};

/// The cluster this master belongs to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// This master's id in the cluster, unique among the masters.
    pub master_id: String,
    /// etcd's client endpoints, `http://host:port` or `https://host:port`.
    pub etcd: Vec<String>,
    /// The presence lease's time to live; kept alive every third of it. A master cut off
    /// from etcd stops its units within it, and a survivor takes them over after it.
    #[serde(default = "default_lease_ms")]
    pub lease_ms: u64,
    /// The prefix of every key the cluster writes (several clusters may share an etcd).
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Client TLS to etcd.
    #[serde(default)]
    pub tls: Option<ClusterTls>,
}

/// TLS to etcd: the CA its certificate chains to, and optionally a client identity.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterTls {
    /// PEM CA of etcd's server certificate.
    pub ca: PathBuf,
    /// PEM client certificate, when etcd asks for one.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    #[serde(default)]
    pub key: Option<PathBuf>,
}

fn default_lease_ms() -> u64 {
    crate::defaults::LEASE_MS
}

fn default_prefix() -> String {
    "/tether/".into()
}

impl ClusterConfig {
    /// Resolves the TLS paths against the file's folder.
    pub(crate) fn resolve(&mut self, base: &Path) {
        if let Some(tls) = &mut self.tls {
            tls.ca = resolve(base, &tls.ca);
            tls.cert = tls.cert.as_ref().map(|p| resolve(base, p));
            tls.key = tls.key.as_ref().map(|p| resolve(base, p));
        }
    }

    pub(crate) fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        check_id(file, "cluster.master_id", &self.master_id)?;
        check_range(file, "cluster.lease_ms", self.lease_ms, 2_000..=120_000)?;
        if self.etcd.is_empty() {
            return Err(ConfigError::invalid(
                file,
                "cluster.etcd",
                "at least one etcd endpoint, such as \"http://10.0.0.5:2379\"",
            ));
        }
        for endpoint in &self.etcd {
            let rest = endpoint
                .strip_prefix("http://")
                .or_else(|| endpoint.strip_prefix("https://"));
            let port_ok = rest
                .and_then(|r| r.rsplit_once(':'))
                .is_some_and(|(host, port)| {
                    !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
                });
            if !port_ok {
                return Err(ConfigError::invalid(
                    file,
                    "cluster.etcd",
                    format!("http://host:port or https://host:port, not {endpoint:?}"),
                ));
            }
            if endpoint.starts_with("https://") && self.tls.is_none() {
                return Err(ConfigError::invalid(
                    file,
                    "cluster.tls",
                    format!("a [cluster.tls] table with the CA of {endpoint}"),
                ));
            }
        }
        if !self.prefix.starts_with('/') || !self.prefix.ends_with('/') {
            return Err(ConfigError::invalid(
                file,
                "cluster.prefix",
                format!(
                    "a key prefix starting and ending with /, not {:?}",
                    self.prefix
                ),
            ));
        }
        if let Some(tls) = &self.tls
            && tls.cert.is_some() != tls.key.is_some()
        {
            return Err(ConfigError::invalid(
                file,
                "cluster.tls",
                "both cert and key, or neither",
            ));
        }
        Ok(())
    }
}
