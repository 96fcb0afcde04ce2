//! HTTPS, with optional mutual TLS for devices: the server presents its certificate, and a
//! device may present a client certificate issued by the fleet's device CA whose subject
//! common name is its device id. A device request over a connection with a certificate is
//! refused (403) unless the certificate's name is the device the credential belongs to; with
//! `require_device_cert`, device requests without one are refused too. Admin requests and
//! devices without certificates are served as over plain HTTP (unless required).

use std::path::PathBuf;
use std::sync::Arc;

use axum::Extension;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::{Server, StartError};

/// The TLS files.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// The server's certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The CA that issues device certificates (PEM); client certificates are asked for only
    /// when it is given.
    pub device_ca: Option<PathBuf>,
    /// Whether device requests must come with a device certificate.
    pub require_device_cert: bool,
}

/// The device a connection's client certificate names (its subject common name), if the
/// client presented one.
#[derive(Debug, Clone, Default)]
pub struct PeerIdentity(pub Option<String>);

/// The subject common name of a DER certificate.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

fn setup(what: &str, path: &std::path::Path, e: impl std::fmt::Display) -> StartError {
    StartError::Setup(format!("{what} {}: {e}", path.display()))
}

/// Builds the rustls server configuration.
pub fn server_config(c: &TlsConfig) -> Result<Arc<rustls::ServerConfig>, StartError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&c.cert)
        .map_err(|e| setup("reading the certificate", &c.cert, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| setup("reading the certificate", &c.cert, e))?;
    if certs.is_empty() {
        return Err(setup(
            "reading the certificate",
            &c.cert,
            "no certificate in it",
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&c.key)
        .map_err(|e| setup("reading the private key", &c.key, e))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| StartError::Setup(format!("TLS: {e}")))?;
    let builder = match &c.device_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca)
                .map_err(|e| setup("reading the device CA", ca, e))?
            {
                roots
                    .add(cert.map_err(|e| setup("reading the device CA", ca, e))?)
                    .map_err(|e| setup("reading the device CA", ca, e))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .allow_unauthenticated()
            .build()
            .map_err(|e| setup("using the device CA", ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| setup("using the certificate", &c.cert, e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Serves [`crate::app`] over TLS on `listener`, each connection's client certificate name
/// handed to the handlers as a [`PeerIdentity`].
pub async fn serve_tls(
    server: Server,
    listener: tokio::net::TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> std::io::Result<()> {
    crate::spawn_background(&server);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    loop {
        let (tcp, remote, held) = crate::accept(&server, &listener).await;
        let (acceptor, server) = (acceptor.clone(), server.clone());
        tokio::spawn(async move {
            let _held = held;
            let timeout = server.config.header_timeout;
            let Ok(Ok(tls)) = tokio::time::timeout(timeout, acceptor.accept(tcp)).await else {
                return;
            };
            let peer = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| common_name(c));
            let app = crate::app(server).layer(Extension(PeerIdentity(peer)));
            crate::serve_connection(tls, app, timeout, remote).await;
        });
    }
}
