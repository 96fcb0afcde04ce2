//! How the API is reached: gRPC and `GET /metrics` over HTTP/2 on one Unix socket, and gRPC
//! on TCP with mutual TLS. HTTP/2 only (with prior knowledge on the socket: `curl
//! --http2-prior-knowledge`): an HTTP/1.1 server would cost the device build 150 KB. Served with hyper's connection builders and dialled with
//! hyper's HTTP/2 client, so tonic contributes only its generated code and codec.

use std::convert::Infallible;
use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};

use crate::agent_client::AgentClient;
use crate::agent_server::{Agent, AgentServer};

/// Why the API could not be served or reached.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A file or socket operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
    /// A certificate, key or group setting is unusable.
    #[error("{0}")]
    Setting(String),
    /// The HTTP/2 connection failed.
    #[error("the API connection failed: {0}")]
    Connection(#[from] hyper::Error),
}

/// Makes the metrics text for `GET /metrics`.
pub type MetricsText = Arc<dyn Fn() -> String + Send + Sync>;

/// Binds the Unix socket at `path` with mode 0660 and, if given, group `group` (a name from
/// /etc/group or a number). The socket is made under a temporary name, its mode and group
/// set, then renamed into place, so it appears under its name with its mode and group already set. A socket
/// left by an agent that stopped is replaced.
pub fn bind_unix(path: &Path, group: Option<&str>) -> Result<UnixListener, ApiError> {
    let io = |op: &'static str, p: &Path| {
        let path = p.to_owned();
        move |source| ApiError::Io { op, path, source }
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io("creating the directory of", dir))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = dir.join(format!(".{name}.{}", std::process::id()));
    let _ = std::fs::remove_file(&temp);
    let listener = UnixListener::bind(&temp).map_err(io("binding the API socket", &temp))?;
    std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(0o660))
        .map_err(io("setting the mode of", &temp))?;
    if let Some(group) = group {
        let gid = gid_of(group)?;
        std::os::unix::fs::chown(&temp, None, Some(gid))
            .map_err(io("setting the group of", &temp))?;
    }
    std::fs::rename(&temp, path).map_err(io("moving the API socket to", path))?;
    Ok(listener)
}

/// The number of group `group`: a number, or a name looked up in /etc/group.
fn gid_of(group: &str) -> Result<u32, ApiError> {
    if let Ok(gid) = group.parse() {
        return Ok(gid);
    }
    let text = std::fs::read_to_string("/etc/group").map_err(|source| ApiError::Io {
        op: "reading",
        path: "/etc/group".into(),
        source,
    })?;
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            Some((f.next()?, f.nth(1)?))
        })
        .find(|(name, _)| *name == group)
        .and_then(|(_, gid)| gid.parse().ok())
        .ok_or_else(|| ApiError::Setting(format!("api.group: no group {group:?} in /etc/group")))
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, ApiError> {
    let bad = |e: &dyn std::fmt::Display| {
        ApiError::Setting(format!("{}: reading certificates: {e}", path.display()))
    };
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(&e))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad(&e))?;
    if certs.is_empty() {
        return Err(ApiError::Setting(format!(
            "{}: no PEM certificate in it",
            path.display()
        )));
    }
    Ok(certs)
}

/// The TLS settings of the TCP listener: the agent's certificate chain and key, and the CA
/// whose certificates clients must present (a client without one, or with one from another
/// CA, is refused in the handshake).
pub fn server_tls(
    cert: &Path,
    key: &Path,
    client_ca: &Path,
) -> Result<tokio_rustls::TlsAcceptor, ApiError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in certificates(client_ca)? {
        roots.add(c).map_err(|e| {
            ApiError::Setting(format!(
                "{}: not a CA certificate: {e}",
                client_ca.display()
            ))
        })?;
    }
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider.clone())
            .build()
            .map_err(|e| ApiError::Setting(format!("{}: {e}", client_ca.display())))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        ApiError::Setting(format!("{}: reading the private key: {e}", key.display()))
    })?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ApiError::Setting(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certificates(cert)?, key)
        .map_err(|e| {
            ApiError::Setting(format!(
                "{}: the certificate and key do not go together: {e}",
                cert.display()
            ))
        })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Serves `agent` on the Unix socket until the task is dropped: gRPC, and `GET /metrics`
/// (Prometheus text), over HTTP/2.
pub async fn serve_unix<T: Agent>(listener: UnixListener, agent: Arc<T>, metrics: MetricsText) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(connection(stream, agent.clone(), metrics.clone()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "accepting on the API socket");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// Serves `agent` on TCP with mutual TLS until the task is dropped; a failed handshake (no
/// client certificate, one from another CA) closes that connection only.
pub async fn serve_tls<T: Agent>(
    listener: TcpListener,
    tls: tokio_rustls::TlsAcceptor,
    agent: Arc<T>,
    metrics: MetricsText,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accepting on the API port");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let (tls, agent, metrics) = (tls.clone(), agent.clone(), metrics.clone());
        tokio::spawn(async move {
            match tls.accept(stream).await {
                Ok(stream) => connection(stream, agent, metrics).await,
                Err(e) => {
                    tracing::info!(%peer, error = %e, "API client refused in the TLS handshake")
                }
            }
        });
    }
}

async fn connection<I, T>(io: I, agent: Arc<T>, metrics: MetricsText)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    T: Agent,
{
    let grpc = AgentServer::from_arc(agent);
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let mut grpc = grpc.clone();
        let metrics = metrics.clone();
        async move {
            if req.method() == hyper::Method::GET && req.uri().path() == "/metrics" {
                let body = tonic::body::Body::new(Full::new(Bytes::from(metrics())));
                let mut res = hyper::Response::new(body);
                res.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                return Ok::<_, Infallible>(res);
            }
            use tower::Service;
            grpc.call(req).await
        }
    });
    let builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    if let Err(e) = builder.serve_connection(TokioIo::new(io), service).await {
        tracing::debug!(error = %e, "API connection ended");
    }
}

/// One HTTP/2 connection to the agent, as the generated client's transport.
#[derive(Clone)]
pub struct Connection {
    send: hyper::client::conn::http2::SendRequest<tonic::body::Body>,
}

/// The API's client over one connection.
pub type Client = AgentClient<Connection>;

impl tower::Service<hyper::Request<tonic::body::Body>> for Connection {
    type Response = hyper::Response<Incoming>;
    type Error = hyper::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, hyper::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), hyper::Error>> {
        self.send.poll_ready(cx)
    }

    fn call(&mut self, req: hyper::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.send.send_request(req))
    }
}

async fn handshake<I>(io: I) -> Result<Client, ApiError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io)).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "API connection ended");
        }
    });
    let origin = hyper::Uri::from_static("http://abide-agent");
    Ok(AgentClient::with_origin(Connection { send }, origin))
}

/// Connects to the agent's Unix socket.
pub async fn connect_unix(path: &Path) -> Result<Client, ApiError> {
    let stream = tokio::net::UnixStream::connect(path)
        .await
        .map_err(|source| ApiError::Io {
            op: "connecting to the agent's socket",
            path: path.to_owned(),
            source,
        })?;
    handshake(stream).await
}

/// Connects to the agent's TCP port `addr` (`host:port`) with TLS: the agent's certificate
/// must be valid for `server_name` under `config`'s roots, and `config` carries the client
/// certificate the agent asks for.
pub async fn connect_tls(
    addr: &str,
    server_name: &str,
    mut config: rustls::ClientConfig,
) -> Result<Client, ApiError> {
    let io = |source| ApiError::Io {
        op: "connecting to the agent at",
        path: addr.into(),
        source,
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let name = ServerName::try_from(server_name.to_owned())
        .map_err(|e| ApiError::Setting(format!("server name {server_name:?}: {e}")))?;
    let stream = tokio::net::TcpStream::connect(addr).await.map_err(io)?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, stream)
        .await
        .map_err(io)?;
    handshake(stream).await
}
