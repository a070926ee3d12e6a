//! Development PKI: a CA, a master certificate, client certificates and shared secrets,
//! created where missing so the examples and tests run on a fresh machine.
//!
//! Production brings its own PKI (certs/README.md). Here the CA key sits beside the CA
//! certificate (`ca.pem` and `ca.key`), so any process that needs a certificate can issue
//! one. Creation takes a lock file in the folder, since a master and its edges started
//! together would otherwise race to create the same CA. Files are written to a temporary
//! name and renamed, so a reader never sees half a file; keys and secrets get mode 0600.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::link::Secret;

/// A dev PKI file could not be created.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// File system trouble.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// rcgen could not build a certificate.
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// Half of a pair exists; we will not guess which half is right.
    #[error("{} exists but {} does not; remove both to have them created again", present.display(), missing.display())]
    HalfPair {
        /// The file that exists.
        present: PathBuf,
        /// The one that does not.
        missing: PathBuf,
    },
    /// Another process holds the lock for too long.
    #[error("{}: another process is creating certificates here; remove the file if none is", .0.display())]
    Locked(PathBuf),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What a certificate is for.
#[derive(Debug, Clone)]
pub enum Role {
    /// The master: a server certificate for these names (DNS names or IP addresses).
    Master(Vec<String>),
    /// An edge: a client certificate for the link, also used to serve its own API on
    /// these names.
    Edge {
        /// The edge id (the certificate's common name).
        edge_id: String,
        /// Names it serves its API under.
        names: Vec<String>,
    },
}

/// Names the dev master and edge certificates cover: loopback only.
pub fn loopback_names() -> Vec<String> {
    vec!["localhost".into(), "127.0.0.1".into(), "::1".into()]
}

/// The CA key's path for a CA certificate path: `ca.pem` keeps its key in `ca.key`.
pub fn ca_key_path(ca: &Path) -> PathBuf {
    ca.with_extension("key")
}

fn ca_params(key: &KeyPair) -> Result<CertificateParams, rcgen::Error> {
    // Derived from the key alone, so an `Issuer` rebuilt from the saved key names the same
    // CA; the fingerprint in the name keeps two dev CAs apart, so that mixing their files
    // is reported as an unknown issuer rather than a bad signature.
    use sha2::Digest;
    let fingerprint = sha2::Sha256::digest(key.public_key_raw());
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(
        DnType::CommonName,
        format!("Tether development CA {}", hex::encode(&fingerprint[..6])),
    );
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

/// Creates the CA at `ca` (and its key beside it) unless both exist; returns an issuer.
fn ensure_ca(ca: &Path, created: &mut Vec<PathBuf>) -> Result<Issuer<'static, KeyPair>, PkiError> {
    let key_path = ca_key_path(ca);
    let key = match (ca.exists(), key_path.exists()) {
        (true, true) => {
            let pem = fs::read_to_string(&key_path).map_err(io(&key_path))?;
            KeyPair::from_pem(&pem)?
        }
        (false, false) => {
            let key = KeyPair::generate()?;
            let cert = ca_params(&key)?.self_signed(&key)?;
            write_atomic(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
            write_atomic(ca, cert.pem().as_bytes(), 0o644)?;
            created.extend([ca.to_path_buf(), key_path]);
            key
        }
        (true, false) => {
            return Err(PkiError::HalfPair {
                present: ca.to_path_buf(),
                missing: key_path,
            });
        }
        (false, true) => {
            return Err(PkiError::HalfPair {
                present: key_path,
                missing: ca.to_path_buf(),
            });
        }
    };
    Ok(Issuer::new(ca_params(&key)?, key))
}

fn ensure_leaf(
    issuer: &Issuer<'static, KeyPair>,
    cert_path: &Path,
    key_path: &Path,
    role: &Role,
    created: &mut Vec<PathBuf>,
) -> Result<(), PkiError> {
    match (cert_path.exists(), key_path.exists()) {
        (true, true) => return Ok(()),
        (false, false) => {}
        (true, false) => {
            return Err(PkiError::HalfPair {
                present: cert_path.to_path_buf(),
                missing: key_path.to_path_buf(),
            });
        }
        (false, true) => {
            return Err(PkiError::HalfPair {
                present: key_path.to_path_buf(),
                missing: cert_path.to_path_buf(),
            });
        }
    }
    let (common_name, names, usages) = match role {
        Role::Master(names) => (
            "Tether master".to_string(),
            names.clone(),
            vec![ExtendedKeyUsagePurpose::ServerAuth],
        ),
        Role::Edge { edge_id, names } => (
            edge_id.clone(),
            names.clone(),
            vec![
                ExtendedKeyUsagePurpose::ClientAuth,
                ExtendedKeyUsagePurpose::ServerAuth,
            ],
        ),
    };
    let mut params = CertificateParams::new(names)?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.extended_key_usages = usages;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    write_atomic(key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_atomic(cert_path, cert.pem().as_bytes(), 0o644)?;
    created.extend([cert_path.to_path_buf(), key_path.to_path_buf()]);
    Ok(())
}

/// Creates a random secret at `path` unless it exists.
pub fn ensure_secret(path: &Path, created: &mut Vec<PathBuf>) -> Result<(), PkiError> {
    if path.exists() {
        return Ok(());
    }
    write_atomic(path, Secret::generate().to_file_text().as_bytes(), 0o600)?;
    created.push(path.to_path_buf());
    Ok(())
}

/// One certificate (and key) to have, with its role.
#[derive(Debug, Clone)]
pub struct Leaf {
    /// Certificate path.
    pub cert: PathBuf,
    /// Key path.
    pub key: PathBuf,
    /// What it is for.
    pub role: Role,
}

/// Makes sure the CA at `ca`, every leaf and every secret exist, creating what is missing
/// and leaving what exists alone. Returns the files it created.
pub fn ensure(ca: &Path, leaves: &[Leaf], secrets: &[PathBuf]) -> Result<Vec<PathBuf>, PkiError> {
    let lock_dir = ca.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(lock_dir).map_err(io(lock_dir))?;
    let _lock = DirLock::acquire(lock_dir)?;
    let mut created = Vec::new();
    let issuer = ensure_ca(ca, &mut created)?;
    for leaf in leaves {
        ensure_leaf(&issuer, &leaf.cert, &leaf.key, &leaf.role, &mut created)?;
    }
    for secret in secrets {
        ensure_secret(secret, &mut created)?;
    }
    Ok(created)
}

/// The layout `tether-master certs --dir DIR --edges a,b` writes: `ca.pem`/`ca.key`,
/// `master.pem`/`master.key`, and per edge `ID.pem`, `ID.key`, `ID.secret`.
pub fn write_dir(dir: &Path, edges: &[String]) -> Result<Vec<PathBuf>, PkiError> {
    let mut leaves = vec![Leaf {
        cert: dir.join("master.pem"),
        key: dir.join("master.key"),
        role: Role::Master(loopback_names()),
    }];
    let mut secrets = Vec::new();
    for edge in edges {
        leaves.push(Leaf {
            cert: dir.join(format!("{edge}.pem")),
            key: dir.join(format!("{edge}.key")),
            role: Role::Edge {
                edge_id: edge.clone(),
                names: loopback_names(),
            },
        });
        secrets.push(dir.join(format!("{edge}.secret")));
    }
    ensure(&dir.join("ca.pem"), &leaves, &secrets)
}

/// Writes `bytes` to `path` through a temporary file and a rename, with `mode` (Unix).
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PkiError> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(io(parent))?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(&tmp).map_err(io(&tmp))?;
    file.write_all(bytes).map_err(io(&tmp))?;
    file.sync_all().map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))
}

/// An exclusive lock on a folder, held as a file created with `create_new`.
struct DirLock(PathBuf);

impl DirLock {
    fn acquire(dir: &Path) -> Result<Self, PkiError> {
        let path = dir.join(".tether-pki.lock");
        let give_up = SystemTime::now() + Duration::from_secs(10);
        loop {
            match fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(_) => return Ok(DirLock(path)),
                Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {
                    // A lock older than a minute belongs to a process that died mid-way.
                    let stale = fs::metadata(&path)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.elapsed().ok())
                        .is_some_and(|age| age > Duration::from_secs(60));
                    if stale {
                        let _ = fs::remove_file(&path);
                    } else if SystemTime::now() > give_up {
                        return Err(PkiError::Locked(path));
                    } else {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
                Err(err) => return Err(io(&path)(err)),
            }
        }
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_certs_layout_is_complete_and_keys_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let created = write_dir(dir.path(), &["site-1".into(), "site-2".into()]).unwrap();
        for name in [
            "ca.pem",
            "ca.key",
            "master.pem",
            "master.key",
            "site-1.pem",
            "site-1.key",
            "site-1.secret",
            "site-2.pem",
            "site-2.key",
            "site-2.secret",
        ] {
            assert!(
                created.contains(&dir.path().join(name)),
                "{name} not created"
            );
        }
        #[cfg(unix)]
        for name in ["ca.key", "master.key", "site-1.key", "site-1.secret"] {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(dir.path().join(name))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{name}");
        }
        Secret::load(&dir.path().join("site-1.secret")).unwrap();
        // Running again creates nothing and changes nothing.
        let before = fs::read(dir.path().join("site-1.secret")).unwrap();
        assert!(
            write_dir(dir.path(), &["site-1".into()])
                .unwrap()
                .is_empty()
        );
        assert_eq!(before, fs::read(dir.path().join("site-1.secret")).unwrap());
    }

    #[test]
    fn a_new_edge_is_signed_by_the_existing_ca() {
        let dir = tempfile::tempdir().unwrap();
        write_dir(dir.path(), &["site-1".into()]).unwrap();
        let ca_before = fs::read(dir.path().join("ca.pem")).unwrap();
        let created = write_dir(dir.path(), &["site-3".into()]).unwrap();
        assert_eq!(created.len(), 3);
        assert_eq!(ca_before, fs::read(dir.path().join("ca.pem")).unwrap());
    }

    #[test]
    fn half_a_pair_is_an_error_not_a_guess() {
        let dir = tempfile::tempdir().unwrap();
        write_dir(dir.path(), &[]).unwrap();
        fs::remove_file(dir.path().join("master.key")).unwrap();
        let err = write_dir(dir.path(), &[]).unwrap_err().to_string();
        assert!(err.contains("master.pem exists but"), "{err}");
    }
}
