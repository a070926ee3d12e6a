//! The admin token: written once to `DATA_DIR/admin.token` (0600) for the operator to
//! read; the server keeps only its SHA-256 and compares in constant time.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::pki::{PkiError, write_atomic};

/// The admin token file could not be read or created.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Reading failed.
    #[error("{}: cannot read the admin token: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Writing failed.
    #[error("cannot create the admin token: {0}")]
    Write(#[from] PkiError),
    /// The file is empty.
    #[error("{}: the admin token file is empty; remove it to have a new one created", .0.display())]
    Empty(PathBuf),
}

/// A token's hash, which is all a server keeps.
#[derive(Clone)]
pub struct AdminToken {
    hash: [u8; 32],
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

fn hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl AdminToken {
    /// The file name inside a data folder.
    pub const FILE: &'static str = "admin.token";

    /// Reads `DATA_DIR/admin.token`, creating a new random token there on first start.
    pub fn load_or_create(data_dir: &Path) -> Result<Self, TokenError> {
        let path = data_dir.join(Self::FILE);
        if !path.exists() {
            let mut bytes = [0u8; 32];
            rand::Rng::fill(&mut rand::rng(), &mut bytes[..]);
            let token = format!("tth_{}", hex::encode(bytes));
            write_atomic(&path, format!("{token}\n").as_bytes(), 0o600)?;
            tracing::info!("created admin token at {}", path.display());
        }
        let text = std::fs::read_to_string(&path).map_err(|source| TokenError::Read {
            path: path.clone(),
            source,
        })?;
        let token = text.trim();
        if token.is_empty() {
            return Err(TokenError::Empty(path));
        }
        Ok(AdminToken { hash: hash(token) })
    }

    /// The token's SHA-256 in hex (what a cluster shares, so that every master takes
    /// every master's admin token).
    pub fn hash_hex(&self) -> String {
        hex::encode(self.hash)
    }

    /// Whether `presented` is this token, in time independent of where they differ.
    pub fn matches(&self, presented: &str) -> bool {
        let other = hash(presented);
        self.hash
            .iter()
            .zip(other.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_is_created_once_private_and_matched_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let token = AdminToken::load_or_create(dir.path()).unwrap();
        let text = std::fs::read_to_string(dir.path().join(AdminToken::FILE)).unwrap();
        assert!(token.matches(text.trim()));
        assert!(!token.matches("tth_wrong"));
        assert!(!token.matches(""));
        let again = AdminToken::load_or_create(dir.path()).unwrap();
        assert!(again.matches(text.trim()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(AdminToken::FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
