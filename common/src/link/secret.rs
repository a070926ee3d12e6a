//! An edge's shared secret: 32 random bytes kept hex-encoded in a file of mode 0600.

use std::path::{Path, PathBuf};

/// A shared secret. Its `Debug` never shows the bytes, so it cannot leak into logs.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// A secret file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// Could not read it.
    #[error("{}: cannot read the secret file: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not hex, or too short to be a secret.
    #[error("{}: expected at least 32 hex-encoded bytes (64 hex digits)", .0.display())]
    Format(PathBuf),
}

/// The least a secret may hold.
pub const MIN_SECRET_BYTES: usize = 32;

impl Secret {
    /// A secret from its bytes.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Secret(bytes)
    }

    /// A new random secret.
    pub fn generate() -> Self {
        let mut bytes = vec![0u8; MIN_SECRET_BYTES];
        rand::Rng::fill(&mut rand::rng(), &mut bytes[..]);
        Secret(bytes)
    }

    /// Reads a secret file (hex, surrounding white space ignored).
    pub fn load(path: &Path) -> Result<Self, SecretError> {
        let text = std::fs::read_to_string(path).map_err(|source| SecretError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        match hex::decode(text.trim()) {
            Ok(bytes) if bytes.len() >= MIN_SECRET_BYTES => Ok(Secret(bytes)),
            _ => Err(SecretError::Format(path.to_path_buf())),
        }
    }

    /// The file's content for this secret.
    pub fn to_file_text(&self) -> String {
        format!("{}\n", hex::encode(&self.0))
    }

    /// The key bytes, for the MAC.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.0
    }
}
