use std::path::{Path, PathBuf};

/// A configuration file that cannot be used. Its `Display` is one line naming the file,
/// the key and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read at all.
    #[error("{}: cannot read the file: {source}", file.display())]
    Read {
        /// The file.
        file: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML, or a key has a value of the wrong type, or is unknown.
    #[error("{}{}: {}", file.display(), line.map(|l| format!(":{l}")).unwrap_or_default(), describe(key, message))]
    Parse {
        /// The file.
        file: PathBuf,
        /// The line the problem is on, when known.
        line: Option<usize>,
        /// The dotted key, when known (`tls.cert`, `edges[1].timeout_ms`).
        key: Option<String>,
        /// What was wrong, on one line.
        message: String,
    },
    /// A value parsed but is not acceptable (out of range, a dangling reference, a duplicate).
    #[error("{}: key `{key}`: expected {expected}", file.display())]
    Invalid {
        /// The file.
        file: PathBuf,
        /// The dotted key.
        key: String,
        /// What would have been accepted.
        expected: String,
    },
}

fn describe(key: &Option<String>, message: &str) -> String {
    match key {
        Some(key) => format!("key `{key}`: {message}"),
        None => message.to_string(),
    }
}

impl ConfigError {
    pub(crate) fn invalid(
        file: &Path,
        key: impl Into<String>,
        expected: impl Into<String>,
    ) -> Self {
        ConfigError::Invalid {
            file: file.to_path_buf(),
            key: key.into(),
            expected: expected.into(),
        }
    }
}
