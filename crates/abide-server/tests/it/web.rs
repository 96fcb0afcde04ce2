//! The web page and `/metrics`: sign-in with the admin token, a rollout with its stages and
//! controls, a control that pauses it, escaping of what devices send; and the page in headless
//! Chromium (driven over the DevTools protocol): it shows a running rollout, a click on pause
//! pauses it, and the page then says paused.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use abide_testkit::{Fixture, key};
use axum::http::{Method, StatusCode};
use serde_json::{Value, json};

use crate::{Backend, Harness, on_both};

on_both!(
    the_page_and_its_controls,
    metrics_in_the_prometheus_format,
    a_scrape_serves_the_latest_aggregates_which_refresh_in_the_background,
);

/// A release, a device, and a running rollout of it; returns the rollout id.
async fn running_rollout(h: &Harness, reason: &str) -> String {
    let admin = h.admin.clone();
    let up = h
        .call(
            Method::POST,
            "/api/v1/releases",
            Some(&admin),
            &[],
            Fixture::default().build(&[&key(0)]),
        )
        .await;
    let rel = up.json()["id"].as_str().unwrap().to_owned();
    let devices: Vec<String> = {
        let mut v = Vec::new();
        for i in 0..3 {
            v.push(h.enroll(&format!("gw-{i}"), "lab").await);
        }
        v
    };
    let ro = h
        .json(
            Method::POST,
            "/api/v1/rollouts",
            Some(&admin),
            json!({"release": rel, "stages": "100", "failure_threshold": "50%"}),
        )
        .await
        .json();
    let id = ro["id"].as_str().unwrap().to_owned();
    let c = h
        .json(
            Method::POST,
            "/api/v1/device/checkin",
            Some(&devices[0]),
            json!({"nonce": "0123456789abcdef0123", "version": "1.0.0", "state": "idle"}),
        )
        .await;
    let a: Value = serde_json::from_str(c.json()["payload"].as_str().unwrap()).unwrap();
    for (seq, (status, seconds)) in [
        ("downloading", None),
        ("staged", Some(12.0)),
        ("rebooting", Some(3.0)),
        ("trial", None),
    ]
    .iter()
    .enumerate()
    {
        h.json(Method::POST, "/api/v1/device/report", Some(&devices[0]),
               json!({"seq": seq + 1, "status": status, "rollout_id": id, "release_id": a["release"]["release_id"], "seconds": seconds}))
            .await;
    }
    h.json(Method::POST, "/api/v1/device/report", Some(&devices[0]),
           json!({"seq": 5, "status": "rolled_back", "rollout_id": id, "release_id": a["release"]["release_id"], "reason": reason}))
        .await;
    id
}

/// The web page's sign-in with the admin token.
async fn sign_in(h: &Harness) -> crate::Answer {
    h.call(
        Method::POST,
        "/ui/login",
        None,
        &[("content-type", "application/x-www-form-urlencoded")],
        format!("token={}", h.admin).into_bytes(),
    )
    .await
}

fn cookie_of(a: &crate::Answer) -> String {
    a.headers["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned()
}

async fn the_page_and_its_controls(backend: Backend) {
    let h = Harness::new(backend).await;
    let id = running_rollout(&h, "<script>alert(1)</script> & more").await;
    // Signed out: the sign-in form, nothing else.
    let page = h.call(Method::GET, "/", None, &[], vec![]).await;
    let text = String::from_utf8(page.body).unwrap();
    assert!(
        text.contains("name=\"token\"") && !text.contains(&id),
        "{text}"
    );
    let wrong = h
        .call(
            Method::POST,
            "/ui/login",
            None,
            &[("content-type", "application/x-www-form-urlencoded")],
            b"token=nope".to_vec(),
        )
        .await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    let login = sign_in(&h).await;
    assert_eq!(login.status, StatusCode::SEE_OTHER);
    let set = login.headers["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict"),
        "{set}"
    );
    let cookie = cookie_of(&login);
    let page = h
        .call(Method::GET, "/", None, &[("cookie", &cookie)], vec![])
        .await;
    let text = String::from_utf8(page.body).unwrap();
    for want in [
        id.as_str(),
        "running",
        "value=\"pause\"",
        "Failing devices",
        "gw-0",
        "acme-gateway",
        "1.4.0",
    ] {
        assert!(text.contains(want), "the page shows {want:?}:\n{text}");
    }
    assert!(!text.contains("<script>alert(1)"), "device text is escaped");
    assert!(text.contains("&lt;script&gt;alert(1)&lt;/script&gt; &amp; more"));
    // A control without the cookie is refused; with it, the rollout pauses.
    let path = format!("/ui/rollouts/{id}/pause");
    assert_eq!(
        h.call(Method::POST, &path, None, &[], vec![]).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        h.get(&format!("/api/v1/rollouts/{id}")).await.json()["status"],
        "running"
    );
    let r = h
        .call(Method::POST, &path, None, &[("cookie", &cookie)], vec![])
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert_eq!(
        h.get(&format!("/api/v1/rollouts/{id}")).await.json()["status"],
        "paused"
    );
    let page = String::from_utf8(
        h.call(Method::GET, "/", None, &[("cookie", &cookie)], vec![])
            .await
            .body,
    )
    .unwrap();
    assert!(page.contains("paused by an operator") && page.contains("value=\"resume\""));
    // A refused control says why.
    let again = h
        .call(Method::POST, &path, None, &[("cookie", &cookie)], vec![])
        .await;
    assert_eq!(again.status, StatusCode::CONFLICT);
    assert!(
        String::from_utf8(again.body)
            .unwrap()
            .contains("cannot be paused")
    );
    let out = h
        .call(
            Method::POST,
            "/ui/logout",
            None,
            &[("cookie", &cookie)],
            vec![],
        )
        .await;
    assert!(
        out.headers["set-cookie"]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
    // The cookie held a session id, not the admin token, and signing out ended the session:
    // the same cookie, kept by someone, signs nobody in.
    assert!(!cookie.contains(&h.admin), "{cookie}");
    let page = h
        .call(Method::GET, "/", None, &[("cookie", &cookie)], vec![])
        .await;
    assert!(
        String::from_utf8(page.body)
            .unwrap()
            .contains("name=\"token\"")
    );
    let path = format!("/ui/rollouts/{id}/resume");
    let r = h
        .call(Method::POST, &path, None, &[("cookie", &cookie)], vec![])
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        h.get(&format!("/api/v1/rollouts/{id}")).await.json()["status"],
        "paused"
    );
    let metrics = h
        .call(
            Method::GET,
            "/metrics",
            None,
            &[("cookie", &cookie)],
            vec![],
        )
        .await;
    assert_eq!(metrics.status, StatusCode::UNAUTHORIZED);
}

/// A sign-in lasts `session_ttl`; over HTTPS its cookie is `Secure`.
#[test]
fn a_web_session_expires_and_is_secure_over_https() {
    crate::run(async {
        let mut h = Harness::new(Backend::Sqlite).await;
        let mut config = h.server.config.clone();
        config.session_ttl = std::time::Duration::from_secs(1);
        config.tls = Some(abide_server::tls::TlsConfig {
            cert: "unused.pem".into(),
            key: "unused.key".into(),
            device_ca: None,
            require_device_cert: false,
        });
        h.server = abide_server::Server::start(config).await.unwrap().0;
        let login = sign_in(&h).await;
        let set = login.headers["set-cookie"].to_str().unwrap().to_owned();
        assert!(
            set.contains("; Secure") && set.contains("Max-Age=1"),
            "{set}"
        );
        let cookie = cookie_of(&login);
        let signed_in = |cookie: String| {
            let h = &h;
            async move {
                let page = h
                    .call(Method::GET, "/", None, &[("cookie", &cookie)], vec![])
                    .await;
                !String::from_utf8(page.body)
                    .unwrap()
                    .contains("name=\"token\"")
            }
        };
        assert!(signed_in(cookie.clone()).await);
        tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
        assert!(!signed_in(cookie).await, "expired");
    });
}

async fn metrics_in_the_prometheus_format(backend: Backend) {
    let h = Harness::new(backend).await;
    let id = running_rollout(&h, "health check failed").await;
    // /metrics shows what is written (the server writes check-ins every half second; here,
    // now), reading beside the writer.
    abide_server::devices::flush_last_seen(&h.server)
        .await
        .unwrap();
    // Not open to anyone: the metrics token (or the admin token) reads it.
    let open = h.call(Method::GET, "/metrics", None, &[], vec![]).await;
    assert_eq!(open.status, StatusCode::UNAUTHORIZED);
    let guess = h
        .call(
            Method::GET,
            "/metrics",
            Some("abide-metrics-guess"),
            &[],
            vec![],
        )
        .await;
    assert_eq!(guess.status, StatusCode::UNAUTHORIZED);
    let token = std::fs::read_to_string(h.server.config.data.join("metrics.token")).unwrap();
    let m = h
        .call(Method::GET, "/metrics", Some(token.trim()), &[], vec![])
        .await;
    assert_eq!(m.status, StatusCode::OK);
    let by_admin = h
        .call(Method::GET, "/metrics", Some(&h.admin.clone()), &[], vec![])
        .await;
    assert_eq!(by_admin.status, StatusCode::OK);
    assert!(
        m.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text; version=1.0.0")
    );
    let text = String::from_utf8(m.body).unwrap();
    for want in [
        "abide_devices{state=\"rolled_back\"} 1",
        "abide_devices{state=\"idle\"} 2",
        "abide_checkins_total 1",
        "abide_reports_total{status=\"staged\"} 1",
        "abide_rollbacks_total 1",
        &format!("abide_rollout_devices{{rollout=\"{id}\",state=\"rolled_back\"}} 1"),
        &format!("abide_rollout_success_ratio{{rollout=\"{id}\"}} 0"),
        "# TYPE abide_reports counter",
        "# TYPE abide_download_seconds histogram",
        "abide_download_seconds_bucket{le=\"5.0\"} 0",
        "abide_download_seconds_bucket{le=\"15.0\"} 1",
        "abide_download_seconds_bucket{le=\"+Inf\"} 1",
        "abide_download_seconds_sum 12",
        "abide_apply_seconds_count 1",
        "abide_reboot_to_healthy_seconds_count 0",
    ] {
        assert!(text.contains(want), "metrics have {want:?}:\n{text}");
    }
    assert!(
        text.ends_with("# EOF\n"),
        "OpenMetrics ends with # EOF:\n{text}"
    );
    // Every line is a comment or `name{labels} value`.
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let value = line.rsplit(' ').next().unwrap();
        assert!(value.parse::<f64>().is_ok(), "{line}");
    }
}

/// A DevTools session on one page, over tungstenite's WebSocket client.
struct Page {
    ws: tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<TcpStream>>,
    next: u64,
}

impl Page {
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        self.ws
            .send(tungstenite::Message::text(
                json!({"id": id, "method": method, "params": params}).to_string(),
            ))
            .unwrap();
        loop {
            let tungstenite::Message::Text(text) = self.ws.read().unwrap() else {
                continue;
            };
            let m: Value = serde_json::from_str(text.as_str()).unwrap();
            if m["id"] == id {
                assert!(m.get("error").is_none(), "{method}: {m}");
                return m["result"].clone();
            }
        }
    }

    fn eval(&mut self, expr: &str) -> Value {
        self.call(
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true}),
        )["result"]["value"]
            .clone()
    }

    /// Waits until the page's text contains `want`.
    fn wait_for_text(&mut self, want: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text =
                self.eval("document.readyState === 'complete' ? document.body.innerText : ''");
            let text = text.as_str().unwrap_or("").to_owned();
            if text.contains(want) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "the page never said {want:?}: {text}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A real mouse click in the middle of the element `selector`.
    fn click(&mut self, selector: &str) {
        let rect = self.eval(&format!(
            "(() => {{ const r = document.querySelector({selector:?}).getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; }})()"
        ));
        let (x, y) = (rect[0].as_f64().unwrap(), rect[1].as_f64().unwrap());
        for kind in ["mousePressed", "mouseReleased"] {
            self.call(
                "Input.dispatchMouseEvent",
                json!({"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1}),
            );
        }
    }
}

#[test]
fn the_page_in_headless_chromium_pauses_a_rollout_on_click() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let h = runtime.block_on(Harness::new(Backend::Sqlite));
    let id = runtime.block_on(running_rollout(&h, "health check api failed"));
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    runtime.spawn(abide_server::serve(h.server.clone(), listener));

    let profile = tempfile::tempdir().unwrap();
    let mut chromium = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--remote-debugging-port=0",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("chromium runs (Debian's chromium package; .ci/run installs it)");
    let mut lines = BufReader::new(chromium.stderr.take().unwrap()).lines();
    let browser = loop {
        let line = lines
            .next()
            .expect("chromium prints its DevTools address")
            .unwrap();
        if let Some(url) = line.strip_prefix("DevTools listening on ") {
            break url.trim().to_owned();
        }
    };
    // Keep draining chromium's messages so it never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    let devtools = browser
        .strip_prefix("ws://")
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let mut s = TcpStream::connect(&devtools).unwrap();
    write!(
        s,
        "PUT /json/new?about:blank HTTP/1.1\r\nHost: {devtools}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    // Read the headers, then exactly Content-Length bytes.
    let mut reader = BufReader::new(s);
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap();
        }
        if line == "\r\n" || line.is_empty() {
            break;
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).unwrap();
    let answer = format!("\r\n\r\n{}", String::from_utf8(body).unwrap());
    let target: Value = serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    let mut page = Page {
        ws: tungstenite::connect(target["webSocketDebuggerUrl"].as_str().unwrap())
            .expect("the DevTools WebSocket opens")
            .0,
        next: 0,
    };
    page.call("Page.enable", json!({}));
    page.call(
        "Page.navigate",
        json!({"url": format!("http://127.0.0.1:{port}/")}),
    );
    page.wait_for_text("Admin token");
    page.eval(&format!(
        "document.querySelector('input[name=token]').value = {:?}; true",
        h.admin
    ));
    page.click("button[type=submit]");
    let text = page.wait_for_text(&id);
    assert!(text.contains("running"), "{text}");
    assert!(text.contains("health check api failed"), "{text}");
    page.click("button[value=pause]");
    let text = page.wait_for_text("paused by an operator");
    assert!(text.contains("paused"), "{text}");
    let status = runtime
        .block_on(h.get(&format!("/api/v1/rollouts/{id}")))
        .json();
    assert_eq!(status["status"], "paused");
    let _ = chromium.kill();
    let _ = chromium.wait();
}

async fn a_scrape_serves_the_latest_aggregates_which_refresh_in_the_background(backend: Backend) {
    let h = Harness::with(backend, |c| {
        c.metrics_refresh = std::time::Duration::from_millis(300);
    })
    .await;
    let admin = h.admin.clone();
    let scrape = || async {
        String::from_utf8(
            h.call(Method::GET, "/metrics", Some(&admin), &[], vec![])
                .await
                .body,
        )
        .unwrap()
    };
    h.enroll("gw-1", "lab").await;
    assert!(scrape().await.contains("abide_devices{state=\"idle\"} 1"));
    // A second device: the next scrape is served from the rendering before it.
    h.enroll("gw-2", "lab").await;
    let cached = scrape().await;
    assert!(
        cached.contains("abide_devices{state=\"idle\"} 1"),
        "{cached}"
    );
    assert!(cached.contains("abide_metrics_age_seconds "), "{cached}");
    // The background refresh brings it in.
    let start = std::time::Instant::now();
    loop {
        if scrape().await.contains("abide_devices{state=\"idle\"} 2") {
            break;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "refreshed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
