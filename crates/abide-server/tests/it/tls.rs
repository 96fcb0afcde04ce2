//! HTTPS with device certificates: a device whose certificate names it is served; a
//! credential used over another device's certificate gets 403; a server that requires
//! certificates refuses devices without one; a certificate from another CA fails the handshake.

use std::sync::Arc;

use abide_server::tls::{TlsConfig, serve_tls, server_config};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{Backend, Harness};

struct Pki {
    dir: tempfile::TempDir,
    ca: CertificateDer<'static>,
}

/// A CA, a server certificate for 127.0.0.1, and device certificates on demand.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert: rcgen::Certificate,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.self_signed(&key).unwrap();
    Ca {
        issuer: Issuer::new(params, key),
        cert,
    }
}

fn leaf(ca: &Ca, cn: &str, san: &[&str]) -> (rcgen::Certificate, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(san.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    (params.signed_by(&key, &ca.issuer).unwrap(), key)
}

fn write_pki(fleet: &Ca) -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let (server, key) = leaf(fleet, "abide server", &["127.0.0.1", "localhost"]);
    std::fs::write(dir.path().join("server.pem"), server.pem()).unwrap();
    std::fs::write(dir.path().join("server.key"), key.serialize_pem()).unwrap();
    std::fs::write(dir.path().join("ca.pem"), fleet.cert.pem()).unwrap();
    Pki {
        dir,
        ca: fleet.cert.der().clone(),
    }
}

/// One HTTP/1.1 request over TLS, with an optional client certificate; returns the status, or
/// `None` when the handshake failed.
async fn request(
    port: u16,
    ca: &CertificateDer<'static>,
    client: Option<(&rcgen::Certificate, &KeyPair)>,
    method: &str,
    path: &str,
    auth: Option<&str>,
    body: &str,
) -> Option<(u16, String)> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match client {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut tls = connector
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .ok()?;
    let auth = auth
        .map(|a| format!("Authorization: Bearer {a}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(req.as_bytes()).await.ok()?;
    let mut answer = Vec::new();
    // A refused client certificate shows up as an error at the first read.
    tls.read_to_end(&mut answer).await.ok()?;
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, text))
}

#[test]
fn devices_with_certificates_over_https() {
    crate::run(async {
        let fleet = ca("fleet device CA");
        let pki = write_pki(&fleet);
        for required in [false, true] {
            let mut h = Harness::new(Backend::Sqlite).await;
            let tls = TlsConfig {
                cert: pki.dir.path().join("server.pem"),
                key: pki.dir.path().join("server.key"),
                device_ca: Some(pki.dir.path().join("ca.pem")),
                require_device_cert: required,
            };
            let mut inner = h.server.config.clone();
            inner.tls = Some(tls.clone());
            // The server's configuration says whether certificates are required.
            let (server, _) = abide_server::Server::start(inner).await.unwrap();
            h.server = server;
            let config = server_config(&tls).unwrap();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            tokio::spawn(serve_tls(h.server.clone(), listener, config));

            let admin = h.admin.clone();
            let (gw1, gw1_key) = leaf(&fleet, "gw-1", &[]);
            let (gw2, gw2_key) = leaf(&fleet, "gw-2", &[]);
            let token = request(
                port,
                &pki.ca,
                None,
                "POST",
                "/api/v1/enroll-tokens",
                Some(&admin),
                r#"{"group":"lab"}"#,
            )
            .await
            .expect("the admin needs no certificate");
            assert_eq!(token.0, 201, "{}", token.1);
            let t: serde_json::Value =
                serde_json::from_str(token.1.split("\r\n\r\n").nth(1).unwrap()).unwrap();
            let enroll = |id: &str| {
                format!(
                    r#"{{"token":"{}","device_id":"{id}","product":"acme-gateway","compatible":["acme-gw"]}}"#,
                    t["token"].as_str().unwrap()
                )
            };
            // Enrolment with another device's certificate is refused.
            let wrong = request(
                port,
                &pki.ca,
                Some((&gw2, &gw2_key)),
                "POST",
                "/api/v1/device/enroll",
                None,
                &enroll("gw-1"),
            )
            .await
            .unwrap();
            assert_eq!(wrong.0, 403, "{}", wrong.1);
            let e = request(
                port,
                &pki.ca,
                Some((&gw1, &gw1_key)),
                "POST",
                "/api/v1/device/enroll",
                None,
                &enroll("gw-1"),
            )
            .await
            .unwrap();
            assert_eq!(e.0, 201, "{}", e.1);
            let e: serde_json::Value =
                serde_json::from_str(e.1.split("\r\n\r\n").nth(1).unwrap()).unwrap();
            let cred = e["credential"].as_str().unwrap().to_owned();
            let checkin = r#"{"nonce":"00112233445566778899","version":"1.0.0","state":"idle"}"#;
            let ok = request(
                port,
                &pki.ca,
                Some((&gw1, &gw1_key)),
                "POST",
                "/api/v1/device/checkin",
                Some(&cred),
                checkin,
            )
            .await
            .unwrap();
            assert_eq!(ok.0, 200, "{}", ok.1);
            // gw-1's credential over gw-2's certificate: 403.
            let stolen = request(
                port,
                &pki.ca,
                Some((&gw2, &gw2_key)),
                "POST",
                "/api/v1/device/checkin",
                Some(&cred),
                checkin,
            )
            .await
            .unwrap();
            assert_eq!(stolen.0, 403, "{}", stolen.1);
            assert!(
                stolen.1.contains("for device gw-2, not gw-1"),
                "{}",
                stolen.1
            );
            // Without a certificate: served unless the server requires one.
            let bare = request(
                port,
                &pki.ca,
                None,
                "POST",
                "/api/v1/device/checkin",
                Some(&cred),
                checkin,
            )
            .await
            .unwrap();
            assert_eq!(
                bare.0,
                if required { 403 } else { 200 },
                "required {required}: {}",
                bare.1
            );
            // A certificate from another CA does not get through the handshake.
            let rogue = ca("rogue CA");
            let (fake, fake_key) = leaf(&rogue, "gw-1", &[]);
            let refused = request(
                port,
                &pki.ca,
                Some((&fake, &fake_key)),
                "POST",
                "/api/v1/device/checkin",
                Some(&cred),
                checkin,
            )
            .await;
            assert!(refused.is_none(), "{refused:?}");
        }
    });
}

#[test]
fn a_tls_handshake_that_does_not_finish_in_time_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    crate::run(async {
        let fleet = ca("fleet device CA");
        let pki = write_pki(&fleet);
        let mut h = Harness::new(Backend::Sqlite).await;
        let tls = TlsConfig {
            cert: pki.dir.path().join("server.pem"),
            key: pki.dir.path().join("server.key"),
            device_ca: None,
            require_device_cert: false,
        };
        let mut inner = h.server.config.clone();
        inner.tls = Some(tls.clone());
        inner.header_timeout = std::time::Duration::from_secs(1);
        h.server = abide_server::Server::start(inner).await.unwrap().0;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve_tls(
            h.server.clone(),
            listener,
            server_config(&tls).unwrap(),
        ));
        // One client says nothing, one sends the first bytes of a ClientHello and stalls.
        let silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut partial = tokio::net::TcpStream::connect(addr).await.unwrap();
        partial
            .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
            .await
            .unwrap();
        let started = std::time::Instant::now();
        for mut s in [silent, partial] {
            let mut buf = [0u8; 64];
            let n = tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut buf))
                .await
                .expect("the server closes the connection")
                .unwrap_or(0);
            assert_eq!(n, 0, "closed without an answer");
        }
        let took = started.elapsed();
        assert!(
            took >= std::time::Duration::from_millis(800)
                && took < std::time::Duration::from_secs(4),
            "{took:?}"
        );
        // A real client still gets through.
        let (status, _) = request(
            addr.port(),
            &pki.ca,
            None,
            "GET",
            "/api/v1/health",
            None,
            "",
        )
        .await
        .unwrap();
        assert_eq!(status, 200);
    });
}
