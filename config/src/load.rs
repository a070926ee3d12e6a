//! Reading a TOML file into a typed configuration with errors that name the key.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use crate::ConfigError;

/// Reads and parses `path` as `T`. The error names the file, the line, the dotted key and
/// what was expected. Validation beyond types is the caller's (see each format's `load`).
pub fn load_file<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        file: path.to_path_buf(),
        source,
    })?;
    parse_str(path, &text)
}

pub(crate) fn parse_str<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigError> {
    let parse_error = |err: toml::de::Error, key: Option<String>| ConfigError::Parse {
        file: path.to_path_buf(),
        line: err.span().map(|span| line_of(text, span.start)),
        key,
        message: one_line(err.message()),
    };
    let deserializer = toml::Deserializer::parse(text).map_err(|e| parse_error(e, None))?;
    serde_path_to_error::deserialize(deserializer).map_err(|err| {
        let key = err.path().to_string();
        let key = (key != ".").then_some(key);
        parse_error(err.into_inner(), key)
    })
}

/// The folder relative paths in `file` are resolved against.
pub(crate) fn base_dir(file: &Path) -> PathBuf {
    match file.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// `path` as written in a file in `base`: absolute paths stay, relative ones join `base`.
pub(crate) fn resolve(base: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Checks an identifier (edge, module, system ...): it appears in URLs and file names.
pub(crate) fn check_id(file: &Path, key: &str, id: &str) -> Result<(), ConfigError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            file,
            key,
            format!("an id of 1 to 64 letters, digits, '-', '_' or '.', not {id:?}"),
        ))
    }
}

/// Checks the link settings both sides share: heartbeat, frame bound, handshake deadline.
pub(crate) fn check_link_settings(
    file: &Path,
    heartbeat_ms: u64,
    max_frame_bytes: u32,
    handshake_timeout_ms: u64,
) -> Result<(), ConfigError> {
    check_range(file, "heartbeat_ms", heartbeat_ms, 50..=60_000)?;
    check_range(
        file,
        "max_frame_bytes",
        u64::from(max_frame_bytes),
        4096..=1 << 30,
    )?;
    check_range(
        file,
        "handshake_timeout_ms",
        handshake_timeout_ms,
        100..=60_000,
    )
}

/// Checks that a number lies in `range`, naming the key and the range otherwise.
pub(crate) fn check_range(
    file: &Path,
    key: &str,
    value: u64,
    range: std::ops::RangeInclusive<u64>,
) -> Result<(), ConfigError> {
    if range.contains(&value) {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            file,
            key,
            format!(
                "a number from {} to {}, not {value}",
                range.start(),
                range.end()
            ),
        ))
    }
}

/// Checks a public API address: `https://` and a host, with nothing that breaks a header.
pub(crate) fn check_api_url(file: &Path, url: &str) -> Result<(), ConfigError> {
    let host = url.strip_prefix("https://").unwrap_or_default();
    if host.is_empty() || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ConfigError::invalid(
            file,
            "api_url",
            format!("an address such as \"https://tether.example.org:8443\", not {url:?}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        port: u16,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Outer {
        name: String,
        inner: Inner,
    }

    #[test]
    fn a_wrong_type_names_file_line_and_key() {
        let err = parse_str::<Outer>(
            Path::new("x.toml"),
            "name = \"a\"\n[inner]\nport = \"no\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("x.toml:3: key `inner.port`:"), "{err}");
        assert!(!err.contains('\n'), "one line: {err}");
    }

    #[test]
    fn an_unknown_key_is_named_with_the_expected_ones() {
        let err = parse_str::<Outer>(
            Path::new("x.toml"),
            "name = \"a\"\nnmae = 1\n[inner]\nport = 1\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("nmae"), "{err}");
        assert!(err.contains("expected"), "{err}");
    }

    #[test]
    fn broken_toml_names_the_line() {
        let err = parse_str::<Outer>(Path::new("x.toml"), "name = \"a\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("x.toml:1:"), "{err}");
    }
}
