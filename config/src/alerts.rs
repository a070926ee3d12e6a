//! `[[alerts]]` in master.toml and edge.toml: where every audit event is POSTed.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::ConfigError;
use crate::load::{check_range, resolve};

/// One receiver of alerts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertConfig {
    /// Where each event is POSTed as JSON: `http://` or `https://`.
    pub url: String,
    /// A file holding a token sent as `Authorization: Bearer TOKEN`.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// A PEM CA the receiver's certificate chains to, for an `https` receiver with a
    /// private CA (public CAs are trusted without it).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Events kept for this receiver while it does not take them; beyond, the oldest are
    /// dropped and counted.
    #[serde(default = "default_max_pending")]
    pub max_pending: u64,
}

fn default_max_pending() -> u64 {
    10_000
}

impl AlertConfig {
    pub(crate) fn resolve(&mut self, base: &Path) {
        self.token_file = self.token_file.as_ref().map(|p| resolve(base, p));
        self.ca_file = self.ca_file.as_ref().map(|p| resolve(base, p));
    }

    pub(crate) fn validate(&self, file: &Path, index: usize) -> Result<(), ConfigError> {
        let key = |name: &str| format!("alerts[{index}].{name}");
        if !valid_url(&self.url) {
            // Not the URL itself: its path or query may hold the receiver's secret.
            return Err(ConfigError::invalid(
                file,
                key("url"),
                "an http:// or https:// URL with a host (and a port of 1 to 65535, if any)",
            ));
        }
        check_range(file, &key("max_pending"), self.max_pending, 1..=10_000_000)?;
        Ok(())
    }
}

/// Whether `url` is `http://` or `https://`, then a host, an optional port, and anything.
fn valid_url(url: &str) -> bool {
    let lower = url.to_ascii_lowercase();
    let Some(rest) = lower
        .strip_prefix("https://")
        .or_else(|| lower.strip_prefix("http://"))
    else {
        return false;
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (host, port) = match host_port.rsplit_once(':') {
        // An IPv6 address in brackets has colons of its own.
        Some((host, port)) if !port.contains(']') => (host, Some(port)),
        _ => (host_port, None),
    };
    !host.is_empty() && port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p > 0))
}

/// Resolves and validates every receiver of a file.
pub(crate) fn prepare(
    alerts: &mut [AlertConfig],
    base: &Path,
    file: &Path,
) -> Result<(), ConfigError> {
    for (i, alert) in alerts.iter_mut().enumerate() {
        alert.resolve(base);
        alert.validate(file, i)?;
    }
    // One receiver per URL: each keeps its own place in the audit log, by its URL.
    for (i, alert) in alerts.iter().enumerate() {
        if alerts[..i].iter().any(|other| other.url == alert.url) {
            return Err(ConfigError::invalid(
                file,
                format!("alerts[{i}].url"),
                "a URL no other [[alerts]] has",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(url: &str, max_pending: u64) -> AlertConfig {
        AlertConfig {
            url: url.into(),
            token_file: None,
            ca_file: None,
            max_pending,
        }
    }

    #[test]
    fn a_receiver_is_an_http_url_and_a_bad_one_names_the_key() {
        let file = Path::new("master.toml");
        assert!(
            alert("https://hooks.example/x", 10)
                .validate(file, 0)
                .is_ok()
        );
        assert!(alert("http://127.0.0.1:9/a", 10).validate(file, 0).is_ok());
        assert!(alert("HTTPS://[::1]:8443/a", 10).validate(file, 0).is_ok());
        for bad in [
            "ftp://x",
            "hooks.example",
            "https://",
            "https:///path",
            "http://h:badport/x",
            "http://h:0/x",
        ] {
            let err = alert(bad, 10).validate(file, 2).unwrap_err().to_string();
            assert!(err.contains("alerts[2].url"), "{bad}: {err}");
        }
        let err = alert("https://x", 0)
            .validate(file, 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("alerts[0].max_pending"), "{err}");
    }

    #[test]
    fn two_receivers_of_one_url_are_refused() {
        let mut alerts = vec![alert("https://a/x", 10), alert("https://a/x", 10)];
        let err = prepare(&mut alerts, Path::new("."), Path::new("edge.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("alerts[1].url"), "{err}");
    }
}
