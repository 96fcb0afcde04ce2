//! HTTPS for the clients: rustls with ring (the tree's one crypto provider), the server vouched
//! for by a CA file or else the system's roots, and a client certificate when one is given
//! (mutual TLS; the fleet server checks that a device certificate's common name is the device
//! id).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::{ClientError, Result};

fn bad(path: &Path, what: impl std::fmt::Display) -> ClientError {
    ClientError::Tls(format!("{}: {what}", path.display()))
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(path, format!("reading certificates: {e}")))?
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| bad(path, format!("reading certificates: {e}")))?;
    if certs.is_empty() {
        return Err(bad(path, "no PEM certificate in it"));
    }
    Ok(certs)
}

/// Makes ring the process's rustls crypto provider (the HTTP client needs one even for plain
/// HTTP); done once, before any client is built.
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Err means a provider is installed already, which is as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// The TLS configuration: the server's CA (`None`: the system's roots) and the client's
/// certificate chain and key files.
pub fn client_config(
    ca_file: Option<&Path>,
    identity: Option<(&Path, &Path)>,
) -> Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(ca) => {
            for cert in certificates(ca)? {
                roots
                    .add(cert)
                    .map_err(|e| bad(ca, format!("not a CA certificate: {e}")))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(Path::new("tls"), e))?
        .with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = certificates(cert)?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| bad(key, format!("reading the private key: {e}")))?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                bad(
                    cert,
                    format!("the certificate and key do not go together: {e}"),
                )
            })?
        }
    };
    Ok(config)
}

/// An HTTP client for `url`: with the TLS configuration above when it is https://.
pub fn http_client(
    url: &str,
    ca_file: Option<&Path>,
    identity: Option<(&Path, &Path)>,
) -> Result<reqwest::Client> {
    install_crypto_provider();
    let mut builder = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(10))
        .read_timeout(std::time::Duration::from_secs(60));
    if url.starts_with("https://") {
        builder = builder.tls_backend_preconfigured(client_config(ca_file, identity)?);
    }
    builder
        .build()
        .map_err(|e| ClientError::Tls(format!("building the HTTP client: {e}")))
}
