//! How the API is reached: gRPC and `GET /metrics` over HTTP/2 on one Unix socket, and gRPC
//! on TCP with mutual TLS. HTTP/2 only (with prior knowledge on the socket: `curl
//! --http2-prior-knowledge`): an HTTP/1.1 server would cost the device build 150 KB. Served with hyper's connection builders and dialled with
//! hyper's HTTP/2 client, so tonic contributes only its generated code and codec.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

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

/// How many connections the API holds and for how long: so that nobody who can reach it (a
/// member of the socket's group, anyone on the TCP port before its handshake) can use up the
/// agent's file descriptors or hold connections that say nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections a listener holds at once from every peer but root.
    pub total: usize,
    /// Connections one peer holds at once: a user on the socket (root too), an address on TCP.
    pub per_peer: usize,
    /// How long a TLS handshake may take.
    pub handshake: Duration,
    /// How long a connection may go without the client sending a byte; the server pings every
    /// third of it, and a live client's answers keep it open.
    pub idle: Duration,
}

impl Default for ConnectionLimits {
    /// 256 connections a listener, 32 a peer, 10 s for a handshake, 60 s of silence.
    fn default() -> Self {
        ConnectionLimits {
            total: 256,
            per_peer: 32,
            handshake: Duration::from_secs(10),
            idle: Duration::from_secs(60),
        }
    }
}

/// Who a connection comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Peer {
    /// A user on the Unix socket.
    User(u32),
    /// An address on TCP.
    Addr(std::net::IpAddr),
}

/// The connections a listener holds, by peer.
#[derive(Default)]
struct Held {
    by_peer: Mutex<HashMap<Peer, usize>>,
}

/// One held connection, given back when dropped.
struct Ticket {
    held: Arc<Held>,
    peer: Peer,
}

impl Held {
    /// Takes a place for `peer` within `limits`, or says why not.
    fn take(self: &Arc<Self>, peer: Peer, limits: &ConnectionLimits) -> Result<Ticket, String> {
        let mut by_peer = self.by_peer.lock().expect("not poisoned");
        let mine = by_peer.get(&peer).copied().unwrap_or(0);
        if mine >= limits.per_peer {
            return Err(format!("{mine} connections from this peer already"));
        }
        if peer != Peer::User(0) {
            let total: usize = by_peer
                .iter()
                .filter(|(p, _)| **p != Peer::User(0))
                .map(|(_, n)| n)
                .sum();
            if total >= limits.total {
                return Err(format!("{total} connections already"));
            }
        }
        *by_peer.entry(peer).or_insert(0) += 1;
        Ok(Ticket {
            held: self.clone(),
            peer,
        })
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut by_peer = self.held.by_peer.lock().expect("not poisoned");
        if let Some(n) = by_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                by_peer.remove(&self.peer);
            }
        }
    }
}

/// Serves `agent` on the Unix socket until the task is dropped: gRPC, and `GET /metrics`
/// (Prometheus text), over HTTP/2, within `limits` (a connection over them is closed as it is
/// accepted).
pub async fn serve_unix<T: Agent>(
    listener: UnixListener,
    agent: Arc<T>,
    metrics: MetricsText,
    limits: ConnectionLimits,
) {
    let held = Arc::new(Held::default());
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let Ok(cred) = stream.peer_cred() else {
                    continue;
                };
                match held.take(Peer::User(cred.uid()), &limits) {
                    Ok(ticket) => {
                        tokio::spawn(connection(
                            stream,
                            agent.clone(),
                            metrics.clone(),
                            limits,
                            ticket,
                        ));
                    }
                    Err(why) => {
                        tracing::debug!(uid = cred.uid(), why, "API connection refused");
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "accepting on the API socket");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Serves `agent` on TCP with mutual TLS until the task is dropped, within `limits`; a failed
/// or slow handshake (no client certificate, one from another CA, none in time) closes that
/// connection only.
pub async fn serve_tls<T: Agent>(
    listener: TcpListener,
    tls: tokio_rustls::TlsAcceptor,
    agent: Arc<T>,
    metrics: MetricsText,
    limits: ConnectionLimits,
) {
    let held = Arc::new(Held::default());
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accepting on the API port");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let ticket = match held.take(Peer::Addr(peer.ip()), &limits) {
            Ok(ticket) => ticket,
            Err(why) => {
                tracing::debug!(%peer, why, "API connection refused");
                continue;
            }
        };
        let (tls, agent, metrics) = (tls.clone(), agent.clone(), metrics.clone());
        tokio::spawn(async move {
            match tokio::time::timeout(limits.handshake, tls.accept(stream)).await {
                Ok(Ok(stream)) => connection(stream, agent, metrics, limits, ticket).await,
                Ok(Err(e)) => {
                    tracing::info!(%peer, error = %e, "API client refused in the TLS handshake")
                }
                Err(_) => {
                    tracing::info!(%peer, "API client's TLS handshake did not finish in time")
                }
            }
        });
    }
}

/// An I/O stream that notes when its client last sent something.
struct Watched<I> {
    io: I,
    since: Instant,
    last: Arc<AtomicU64>,
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            let at = self.since.elapsed().as_millis() as u64;
            self.last.store(at, Ordering::Relaxed);
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Serves one connection until it ends, or its client has sent nothing for `limits.idle`.
async fn connection<I, T>(
    io: I,
    agent: Arc<T>,
    metrics: MetricsText,
    limits: ConnectionLimits,
    _ticket: Ticket,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    T: Agent,
{
    let last = Arc::new(AtomicU64::new(0));
    let since = Instant::now();
    let io = Watched {
        io,
        since,
        last: last.clone(),
    };
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
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(Some(limits.idle / 3))
        .keep_alive_timeout(limits.idle / 3);
    let served = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(served);
    let every = (limits.idle / 4).max(Duration::from_millis(50));
    loop {
        tokio::select! {
            ended = &mut served => {
                if let Err(e) = ended {
                    tracing::debug!(error = %e, "API connection ended");
                }
                return;
            }
            () = tokio::time::sleep(every) => {
                let quiet = since.elapsed().saturating_sub(Duration::from_millis(last.load(Ordering::Relaxed)));
                if quiet >= limits.idle {
                    tracing::debug!("API connection closed: its client sent nothing for {:?}", limits.idle);
                    return;
                }
            }
        }
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
