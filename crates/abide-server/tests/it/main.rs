//! The fleet server's API, driven in-process through its router, on SQLite and on a real
//! PostgreSQL started for the test. Each scenario runs on both.

mod api;
mod audit;
mod deltas;
mod hostile;
mod roles;
mod rollouts;
mod tls;
mod web;

use abide_server::{Config, Server};
use abide_testkit::pg::Postgres;
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::BodyExt as _;
use tower::ServiceExt as _;

/// Which database a harness runs on.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Backend {
    Sqlite,
    Postgres,
}

/// A server in a temporary data directory, with its admin token.
pub(crate) struct Harness {
    pub(crate) server: Server,
    pub(crate) dir: tempfile::TempDir,
    pub(crate) admin: String,
    pub(crate) pg: Option<Postgres>,
}

/// An answer: status, headers, body.
pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Vec<u8>,
}

impl Answer {
    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }
    /// The error code of an error answer.
    pub(crate) fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    }
}

/// The fleet's trust root for tests: test keys 0 and 1, threshold 1.
pub(crate) fn trust_file(dir: &std::path::Path) {
    std::fs::write(
        dir.join("trust.json"),
        abide_testkit::trust(&[0, 1], 1).to_file_bytes().unwrap(),
    )
    .unwrap();
}

impl Harness {
    pub(crate) async fn new(backend: Backend) -> Harness {
        Harness::with(backend, |_| {}).await
    }

    /// A harness whose configuration `edit` changes before the server starts.
    pub(crate) async fn with(backend: Backend, edit: impl FnOnce(&mut Config)) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        trust_file(dir.path());
        let pg = matches!(backend, Backend::Postgres).then(Postgres::start);
        let mut config = Config::new(dir.path());
        config.db = pg.as_ref().map(Postgres::url);
        // Requests made in-process all come from one address; the rate limit has its own test.
        config.enroll_per_minute = 100_000;
        edit(&mut config);
        let (server, _) = Server::start(config).await.unwrap();
        let admin = std::fs::read_to_string(dir.path().join("admin.token"))
            .unwrap()
            .trim()
            .to_owned();
        Harness {
            server,
            dir,
            admin,
            pg,
        }
    }

    /// A request with optional bearer credential and extra headers.
    pub(crate) async fn call(
        &self,
        method: Method,
        path: &str,
        auth: Option<&str>,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Answer {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(a) = auth {
            req = req.header("authorization", format!("Bearer {a}"));
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = abide_server::app(self.server.clone())
            .oneshot(req.body(Body::from(body)).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec();
        Answer {
            status,
            headers,
            body,
        }
    }

    /// A JSON request.
    pub(crate) async fn json(
        &self,
        method: Method,
        path: &str,
        auth: Option<&str>,
        value: serde_json::Value,
    ) -> Answer {
        self.call(
            method,
            path,
            auth,
            &[("content-type", "application/json")],
            value.to_string().into_bytes(),
        )
        .await
    }

    /// An admin GET.
    pub(crate) async fn get(&self, path: &str) -> Answer {
        self.call(
            Method::GET,
            path,
            Some(&self.admin.clone()),
            &[],
            Vec::new(),
        )
        .await
    }

    /// Uploads `bundle` as the admin; returns the release id.
    pub(crate) async fn upload(&self, bundle: Vec<u8>) -> String {
        let admin = self.admin.clone();
        let r = self
            .call(Method::POST, "/api/v1/releases", Some(&admin), &[], bundle)
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.json());
        r.json()["id"].as_str().unwrap().to_owned()
    }

    /// Creates an enrolment token for `group` and enrols `id` with it; returns the credential.
    pub(crate) async fn enroll(&self, id: &str, group: &str) -> String {
        let admin = self.admin.clone();
        let t = self
            .json(
                Method::POST,
                "/api/v1/enroll-tokens",
                Some(&admin),
                serde_json::json!({"group": group}),
            )
            .await;
        assert_eq!(t.status, StatusCode::CREATED, "{}", t.json());
        let e = self
            .json(
                Method::POST,
                "/api/v1/device/enroll",
                None,
                serde_json::json!({"token": t.json()["token"], "device_id": id,
                    "product": "acme-gateway", "compatible": ["acme-gw"]}),
            )
            .await;
        assert_eq!(e.status, StatusCode::CREATED, "{}", e.json());
        e.json()["credential"].as_str().unwrap().to_owned()
    }
}

/// Runs an async scenario on a fresh runtime.
pub(crate) fn run<F: std::future::Future<Output = ()>>(f: F) {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(f);
}

/// One test per backend for each scenario.
#[macro_export]
macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn sqlite() {
                    $crate::run(super::$name($crate::Backend::Sqlite));
                }
                #[test]
                fn postgres() {
                    $crate::run(super::$name($crate::Backend::Postgres));
                }
            }
        )*
    };
}
