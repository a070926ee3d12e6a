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
        let rest = self
            .url
            .strip_prefix("https://")
            .or_else(|| self.url.strip_prefix("http://"));
        if rest.is_none_or(|rest| rest.is_empty() || rest.starts_with('/')) {
            return Err(ConfigError::invalid(
                file,
                key("url"),
                format!("an http:// or https:// URL, not {:?}", self.url),
            ));
        }
        check_range(file, &key("max_pending"), self.max_pending, 1..=10_000_000)?;
        Ok(())
    }
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
        for bad in ["ftp://x", "hooks.example", "https://", "https:///path"] {
            let err = alert(bad, 10).validate(file, 2).unwrap_err().to_string();
            assert!(err.contains("alerts[2].url"), "{bad}: {err}");
        }
        let err = alert("https://x", 0)
            .validate(file, 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("alerts[0].max_pending"), "{err}");
    }
}
