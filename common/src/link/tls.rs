//! TLS configuration for both listeners and the edge's connector: TLS 1.3 only, PEM files
//! read through `rustls-pki-types`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// A certificate, key or CA that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{}: {what}: {source}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What was being read.
        what: &'static str,
        /// Why.
        source: rustls_pki_types::pem::Error,
    },
    /// The file held no certificate.
    #[error("{}: no certificate in the file", .0.display())]
    NoCertificate(PathBuf),
    /// rustls refused the configuration (a key that does not match its certificate ...).
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client verifier could not be built (an empty CA ...).
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// The master's name is not a valid DNS name or IP address.
    #[error("master_name {0:?} is not a DNS name or an IP address")]
    ServerName(String),
}

/// Installs the process's crypto provider (ring). Call once at start; later calls are no-ops.
pub fn install_crypto_provider() {
    // Err means one is installed already, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Reads every certificate in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Pem {
            path: path.to_path_buf(),
            what: "reading certificates",
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_path_buf()));
    }
    Ok(certs)
}

/// Reads the private key in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| TlsError::Pem {
        path: path.to_path_buf(),
        what: "reading the private key",
        source,
    })
}

/// The certificates of a CA file as a root store.
pub fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert)?;
    }
    Ok(roots)
}

/// Server configuration: TLS 1.3 only; with `client_ca`, clients must present a
/// certificate that chains to it.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let builder = rustls::ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS13]);
    let builder = match client_ca {
        Some(ca) => {
            let verifier = WebPkiClientVerifier::builder(Arc::new(load_roots(ca)?)).build()?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(load_certs(cert)?, load_key(key)?)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Server configuration for the edge link: like [`server_config`], without ALPN.
pub fn link_server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut config = Arc::unwrap_or_clone(server_config(cert, key, client_ca)?);
    config.alpn_protocols.clear();
    Ok(Arc::new(config))
}

/// Client configuration for the edge: TLS 1.3 only, trusting `ca`, presenting a client
/// certificate when one is given.
pub fn client_config(
    ca: &Path,
    client_cert: Option<(&Path, &Path)>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let builder = rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
        .with_root_certificates(load_roots(ca)?);
    let config = match client_cert {
        Some((cert, key)) => builder.with_client_auth_cert(load_certs(cert)?, load_key(key)?)?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// Client configuration for the client API (the CLI, the demo, the tests): trusting `ca`,
/// no client certificate, the default protocol versions.
pub fn api_client_config(ca: &Path) -> Result<rustls::ClientConfig, TlsError> {
    install_crypto_provider();
    Ok(rustls::ClientConfig::builder()
        .with_root_certificates(load_roots(ca)?)
        .with_no_client_auth())
}

/// The name the edge expects on the master's certificate.
pub fn server_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(name.to_string()).map_err(|_| TlsError::ServerName(name.to_string()))
}

/// Whether the end-entity certificate a client presented names `edge_id` (a DNS name in
/// its subject alternative names): an edge's link certificate is tied to its id, so one
/// site's certificate cannot carry another site's secret. The error says why not.
pub fn names_edge(certificate: &CertificateDer<'_>, edge_id: &str) -> Result<(), String> {
    let name = ServerName::try_from(edge_id.to_string()).map_err(|_| {
        format!("edge id {edge_id:?} is not a DNS name, so no certificate can name it")
    })?;
    let parsed = webpki::EndEntityCert::try_from(certificate)
        .map_err(|err| format!("the client certificate cannot be read: {err}"))?;
    parsed
        .verify_is_valid_for_subject_name(&name)
        .map_err(|_| format!("the client certificate does not name edge {edge_id}"))
}
