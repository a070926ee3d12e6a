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
    /// An edge's link to the master: a client certificate only, naming the edge id (the
    /// master checks that the name is the id the edge authenticates as).
    EdgeLink {
        /// The edge id.
        edge_id: String,
    },
    /// An edge's client API: a server certificate only, for these names and the edge id.
    EdgeApi {
        /// The edge id.
        edge_id: String,
        /// Names it serves its API under.
        names: Vec<String>,
    },
}

/// The names of the development master's certificate: `localhost` only, which no
/// development edge certificate carries, so that no edge's key can pass for the master.
pub fn master_dev_names() -> Vec<String> {
    vec!["localhost".into()]
}

/// The names of a development edge's API certificate besides its id: the loopback
/// addresses (clients reach development edges at `https://127.0.0.1:PORT`).
pub fn edge_api_dev_names() -> Vec<String> {
    vec!["127.0.0.1".into(), "::1".into()]
}

/// The certificate and key of an edge's API beside its link certificate `cert`
/// (`site-1.pem` → `site-1-api.pem`, `site-1-api.key`).
pub fn edge_api_paths(cert: &Path) -> (PathBuf, PathBuf) {
    let stem = cert
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let folder = cert.parent().unwrap_or(Path::new(""));
    (
        folder.join(format!("{stem}-api.pem")),
        folder.join(format!("{stem}-api.key")),
    )
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
        Role::EdgeLink { edge_id } => (
            edge_id.clone(),
            vec![edge_id.clone()],
            vec![ExtendedKeyUsagePurpose::ClientAuth],
        ),
        Role::EdgeApi { edge_id, names } => (
            edge_id.clone(),
            names.iter().cloned().chain([edge_id.clone()]).collect(),
            vec![ExtendedKeyUsagePurpose::ServerAuth],
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
        role: Role::Master(master_dev_names()),
    }];
    let mut secrets = Vec::new();
    for edge in edges {
        leaves.extend(edge_leaves(
            edge,
            &dir.join(format!("{edge}.pem")),
            &dir.join(format!("{edge}.key")),
        ));
        secrets.push(dir.join(format!("{edge}.secret")));
    }
    ensure(&dir.join("ca.pem"), &leaves, &secrets)
}

/// An edge's two certificates (link, at `cert` and `key`; API, beside them) for the
/// development PKI.
pub fn edge_leaves(edge_id: &str, cert: &Path, key: &Path) -> [Leaf; 2] {
    let (api_cert, api_key) = edge_api_paths(cert);
    [
        Leaf {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            role: Role::EdgeLink {
                edge_id: edge_id.to_string(),
            },
        },
        Leaf {
            cert: api_cert,
            key: api_key,
            role: Role::EdgeApi {
                edge_id: edge_id.to_string(),
                names: edge_api_dev_names(),
            },
        },
    ]
}

/// Writes `bytes` to `path` through a temporary file and a rename, with `mode` (Unix).
/// The temporary file has a random name and is created exclusively (never through a
/// file or link that is there already), so another user of the folder can neither
/// predict it nor make the write land elsewhere.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PkiError> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(io(parent))?;
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (tmp, mut file) = loop {
        let suffix: u64 = rand::random();
        let tmp = path.with_file_name(format!(".{name}.{suffix:016x}.tmp"));
        let mut options = fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
        #[cfg(not(unix))]
        let _ = mode;
        match options.open(&tmp) {
            Ok(file) => break (tmp, file),
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(err) => return Err(io(&tmp)(err)),
        }
    };
    let written = file
        .write_all(bytes)
        .and_then(|()| file.sync_all())
        .and_then(|()| fs::rename(&tmp, path));
    if let Err(err) = written {
        let _ = fs::remove_file(&tmp);
        return Err(io(path)(err));
    }
    Ok(())
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
            "site-1-api.pem",
            "site-1-api.key",
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
        for name in [
            "ca.key",
            "master.key",
            "site-1.key",
            "site-1-api.key",
            "site-1.secret",
        ] {
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
        assert_eq!(created.len(), 5, "link and API pairs, and the secret");
        assert_eq!(ca_before, fs::read(dir.path().join("ca.pem")).unwrap());
    }

    #[test]
    fn temporary_files_are_random_and_never_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("secret");
        // Whatever sits at a name another process might guess is left alone.
        let decoy = dir.path().join("decoy");
        fs::write(&decoy, "untouched").unwrap();
        #[cfg(unix)]
        for guess in [
            format!("secret.tmp{}", std::process::id()),
            ".secret.tmp".into(),
        ] {
            std::os::unix::fs::symlink(&decoy, dir.path().join(guess)).unwrap();
        }
        write_atomic(&target, b"value", 0o600).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"value");
        assert_eq!(fs::read(&decoy).unwrap(), b"untouched");
        let left: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.ends_with(".tmp") && n.starts_with(".secret."))
            .collect();
        assert!(left.iter().all(|n| n == ".secret.tmp"), "{left:?}");
    }

    #[test]
    fn edge_certificates_split_the_link_from_the_api() {
        let dir = tempfile::tempdir().unwrap();
        write_dir(dir.path(), &["site-1".into()]).unwrap();
        let der = |name: &str| {
            let pem = fs::read_to_string(dir.path().join(name)).unwrap();
            rustls_pki_types::pem::PemObject::from_pem_slice(pem.as_bytes())
                .map(|c: rustls_pki_types::CertificateDer<'static>| c)
                .unwrap()
        };
        let link = der("site-1.pem");
        let api = der("site-1-api.pem");
        let master = der("master.pem");
        let link = webpki::EndEntityCert::try_from(&link).unwrap();
        let api = webpki::EndEntityCert::try_from(&api).unwrap();
        let master = webpki::EndEntityCert::try_from(&master).unwrap();
        let name = |n: &str| rustls_pki_types::ServerName::try_from(n.to_string()).unwrap();
        link.verify_is_valid_for_subject_name(&name("site-1"))
            .unwrap();
        assert!(
            link.verify_is_valid_for_subject_name(&name("localhost"))
                .is_err()
        );
        api.verify_is_valid_for_subject_name(&name("127.0.0.1"))
            .unwrap();
        assert!(
            api.verify_is_valid_for_subject_name(&name("localhost"))
                .is_err(),
            "no edge certificate names the master"
        );
        master
            .verify_is_valid_for_subject_name(&name("localhost"))
            .unwrap();
        assert!(
            master
                .verify_is_valid_for_subject_name(&name("127.0.0.1"))
                .is_err()
        );
        // The link certificate authenticates a client only; the API's serves only.
        let ca = der("ca.pem");
        let anchors = [webpki::anchor_from_trusted_cert(&ca).unwrap()];
        let usable_for = |cert: &webpki::EndEntityCert<'_>, usage: webpki::KeyUsage| {
            cert.verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                &anchors,
                &[],
                rustls_pki_types::UnixTime::now(),
                usage,
                None,
                None,
            )
            .is_ok()
        };
        assert!(usable_for(&link, webpki::KeyUsage::client_auth()));
        assert!(!usable_for(&link, webpki::KeyUsage::server_auth()));
        assert!(usable_for(&api, webpki::KeyUsage::server_auth()));
        assert!(!usable_for(&api, webpki::KeyUsage::client_auth()));
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
