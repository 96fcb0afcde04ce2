//! Clients of the fleet server's HTTP API: [`AdminClient`] for operators and tools, [`DeviceClient`] for
//! a device (or a simulated one), and [`simulate`], which runs many simulated devices in one
//! process.
//!
//! A device checks every check-in answer before acting on it: the server's signature (with the
//! key pinned at enrolment), its own id, the nonce it just sent, and the expiry.

#[cfg(feature = "simulate")]
pub mod simulate;
pub mod tls;

use abide_bundle::PublicKey;
use abide_fleet_json::{Assignment, EnrollResponse, SignedAssignment};
use serde::de::DeserializeOwned;
use serde_json::Value;

/// What a request to the server can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server could not be reached or the answer not read (the transport error is in the
    /// message, not chained, so that it is printed once).
    #[error("{what}: {detail}")]
    Http {
        /// The request.
        what: String,
        /// The transport error with its causes.
        detail: String,
    },
    /// The server answered with an error.
    #[error("{what}: the server answered {status} [{code}]: {message}")]
    Refused {
        /// The request.
        what: String,
        /// The HTTP status.
        status: u16,
        /// The error code.
        code: String,
        /// Its message.
        message: String,
    },
    /// The TLS set-up (CA file, client certificate or key) is unusable.
    #[error("TLS: {0}")]
    Tls(String),
    /// A check-in answer that must not be acted on.
    #[error("check-in answer refused: {0}")]
    BadAssignment(String),
}

impl ClientError {
    /// The server's error code, if it answered one.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Refused { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// A transport error as one line with its causes.
pub(crate) fn http(what: &str, error: &reqwest::Error) -> ClientError {
    let mut detail = error.to_string();
    let mut cause = std::error::Error::source(error);
    while let Some(c) = cause {
        let text = c.to_string();
        if !detail.contains(&text) {
            detail.push_str(": ");
            detail.push_str(&text);
        }
        cause = c.source();
    }
    ClientError::Http {
        what: what.to_owned(),
        detail,
    }
}

/// A result of this crate.
pub type Result<T> = std::result::Result<T, ClientError>;

async fn answer<T: DeserializeOwned>(what: &str, resp: reqwest::Response) -> Result<T> {
    let status = resp.status();
    let bytes = resp.bytes().await.map_err(|source| http(what, &source))?;
    if !status.is_success() {
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        return Err(ClientError::Refused {
            what: what.to_owned(),
            status: status.as_u16(),
            code: body["error"]["code"].as_str().unwrap_or("").to_owned(),
            message: body["error"]["message"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned()),
        });
    }
    serde_json::from_slice(&bytes).map_err(|e| ClientError::Refused {
        what: what.to_owned(),
        status: status.as_u16(),
        code: "bad-answer".into(),
        message: format!("not the expected JSON: {e}"),
    })
}

fn http_error(what: &str) -> impl FnOnce(reqwest::Error) -> ClientError + '_ {
    move |source| http(what, &source)
}

/// The admin API.
#[derive(Clone)]
pub struct AdminClient {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl AdminClient {
    /// A client for the server at `base` (`http://host:port`) with the admin token.
    pub fn new(base: &str, token: &str) -> AdminClient {
        tls::install_crypto_provider();
        AdminClient::with_client(reqwest::Client::new(), base, token)
    }

    /// [`AdminClient::new`] over a client of the caller's (for HTTPS: [`tls::http_client`]).
    pub fn with_client(http: reqwest::Client, base: &str, token: &str) -> AdminClient {
        AdminClient {
            http,
            base: base.trim_end_matches('/').to_owned(),
            token: token.trim().to_owned(),
        }
    }

    async fn send<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<reqwest::Body>,
        json: bool,
    ) -> Result<T> {
        let what = format!("{method} {path}");
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if json {
            req = req.header("content-type", "application/json");
        }
        if let Some(b) = body {
            req = req.body(b);
        }
        let resp = req.send().await.map_err(http_error(&what))?;
        answer(&what, resp).await
    }

    /// GET `path`, answered with a `T` (an `abide_fleet_json` type).
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.send(reqwest::Method::GET, path, None, false).await
    }

    /// DELETE `path`, answered with a `T`.
    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.send(reqwest::Method::DELETE, path, None, false).await
    }

    /// POST `body` as JSON to `path`, answered with a `T`.
    pub async fn post<B: serde::Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T> {
        self.send_json(reqwest::Method::POST, path, body).await
    }

    /// PUT `body` as JSON to `path`, answered with a `T`.
    pub async fn put<B: serde::Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T> {
        self.send_json(reqwest::Method::PUT, path, body).await
    }

    async fn send_json<B: serde::Serialize, T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &B,
    ) -> Result<T> {
        let body = serde_json::to_vec(body).expect("plain data");
        self.send(method, path, Some(body.into()), true).await
    }

    /// POST the exact bytes of a JSON document to `path` (a trust root is signed over its
    /// bytes), answered with a `T`.
    pub async fn post_raw<T: DeserializeOwned>(&self, path: &str, body: Vec<u8>) -> Result<T> {
        self.send(reqwest::Method::POST, path, Some(body.into()), true)
            .await
    }

    /// A rollout's status.
    pub async fn rollout(&self, id: &str) -> Result<abide_fleet_json::RolloutStatus> {
        self.send(
            reqwest::Method::GET,
            &format!("/api/v1/rollouts/{id}"),
            None,
            false,
        )
        .await
    }

    /// Every rollout's status, newest first.
    pub async fn rollouts(&self) -> Result<Vec<abide_fleet_json::RolloutStatus>> {
        self.send(reqwest::Method::GET, "/api/v1/rollouts", None, false)
            .await
    }

    /// Creates a rollout.
    pub async fn create_rollout(
        &self,
        request: &abide_fleet_json::RolloutRequest,
    ) -> Result<abide_fleet_json::RolloutStatus> {
        let body = serde_json::to_vec(request).expect("plain data");
        self.send(
            reqwest::Method::POST,
            "/api/v1/rollouts",
            Some(body.into()),
            true,
        )
        .await
    }

    /// An operator action on a rollout (`pause`, `resume`, `advance`, `abort`, `rollback`).
    pub async fn rollout_action(
        &self,
        id: &str,
        action: &str,
    ) -> Result<abide_fleet_json::RolloutStatus> {
        let path = format!("/api/v1/rollouts/{id}/{action}");
        self.send(reqwest::Method::POST, &path, Some("{}".into()), true)
            .await
    }

    /// Uploads a bundle file as a release.
    pub async fn upload(&self, bundle: Vec<u8>) -> Result<abide_fleet_json::Release> {
        self.send(
            reqwest::Method::POST,
            "/api/v1/releases",
            Some(bundle.into()),
            false,
        )
        .await
    }
}

/// An enrolled device's side of the API.
#[derive(Clone)]
pub struct DeviceClient {
    http: reqwest::Client,
    base: String,
    /// Its id.
    pub id: String,
    credential: String,
    server_key: PublicKey,
    /// Its group.
    pub group: String,
}

fn nonce() -> String {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("the system's random source works");
    abide_bundle::digest::encode_hex(&b)
}

impl DeviceClient {
    /// Enrols `id` with `token` and pins the server key it answers with.
    pub async fn enroll(
        http: &reqwest::Client,
        base: &str,
        token: &str,
        id: &str,
        product: &str,
        compatible: &[String],
    ) -> Result<DeviceClient> {
        let what = "POST /api/v1/device/enroll";
        let resp = http
            .post(format!(
                "{}/api/v1/device/enroll",
                base.trim_end_matches('/')
            ))
            .header("content-type", "application/json")
            .body(
                serde_json::to_vec(&abide_fleet_json::EnrollRequest {
                    token: token.to_owned(),
                    device_id: id.to_owned(),
                    product: product.to_owned(),
                    compatible: compatible.to_vec(),
                    group: None,
                    tags: Vec::new(),
                })
                .expect("plain data"),
            )
            .send()
            .await
            .map_err(http_error(what))?;
        let e: EnrollResponse = answer(what, resp).await?;
        let server_key = PublicKey::from_hex(&e.server_key)
            .map_err(|err| ClientError::BadAssignment(format!("server key: {err}")))?;
        Ok(DeviceClient {
            http: http.clone(),
            base: base.trim_end_matches('/').to_owned(),
            id: e.device_id,
            credential: e.credential,
            server_key,
            group: e.group,
        })
    }

    /// A device enrolled earlier, from what it kept: its id, credential, group and the server
    /// key it pinned (hex).
    pub fn restore(
        http: &reqwest::Client,
        base: &str,
        id: &str,
        credential: &str,
        server_key: &str,
        group: &str,
    ) -> Result<DeviceClient> {
        let server_key = PublicKey::from_hex(server_key)
            .map_err(|err| ClientError::BadAssignment(format!("pinned server key: {err}")))?;
        Ok(DeviceClient {
            http: http.clone(),
            base: base.trim_end_matches('/').to_owned(),
            id: id.to_owned(),
            credential: credential.to_owned(),
            server_key,
            group: group.to_owned(),
        })
    }

    /// The credential the device authenticates with (to be kept secret).
    pub fn credential(&self) -> &str {
        &self.credential
    }

    /// The server key pinned at enrolment, hex.
    pub fn server_key_hex(&self) -> String {
        self.server_key.to_hex()
    }

    async fn post<B: serde::Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T> {
        let what = format!("POST {path}");
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.credential)
            .header("content-type", "application/json")
            .body(serde_json::to_vec(body).expect("plain data"))
            .send()
            .await
            .map_err(http_error(&what))?;
        answer(&what, resp).await
    }

    /// Checks in with the inventory in `request` and a fresh nonce (which replaces the one in
    /// `request`), and returns the verified assignment.
    pub async fn checkin(
        &self,
        mut request: abide_fleet_json::CheckinRequest,
        now: jiff::Timestamp,
    ) -> Result<Assignment> {
        request.nonce = nonce();
        let signed: SignedAssignment = self.post("/api/v1/device/checkin", &request).await?;
        self.verify(&signed, &request.nonce, now)
    }

    /// Checks a signed assignment: signature, device, nonce, expiry.
    pub fn verify(
        &self,
        signed: &SignedAssignment,
        nonce: &str,
        now: jiff::Timestamp,
    ) -> Result<Assignment> {
        let bad = |w: &str| ClientError::BadAssignment(w.to_owned());
        let sig: [u8; 64] = abide_bundle::digest::decode_hex(&signed.signature)
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| bad("malformed signature"))?;
        if !self.server_key.verify(
            abide_fleet_json::ASSIGNMENT_DOMAIN,
            signed.payload.as_bytes(),
            &sig,
        ) {
            return Err(bad("the signature is not the server's"));
        }
        let a: Assignment =
            serde_json::from_str(&signed.payload).map_err(|e| bad(&format!("payload: {e}")))?;
        if a.device_id != self.id {
            return Err(bad("it is for another device"));
        }
        if a.nonce != nonce {
            return Err(bad("it answers another check-in (replayed)"));
        }
        let expires: jiff::Timestamp = a.expires_at.parse().map_err(|_| bad("bad expiry"))?;
        if expires <= now {
            return Err(bad("it has expired"));
        }
        Ok(a)
    }

    /// Reports a step; `Ok(true)` when recorded, `Ok(false)` when it was a duplicate.
    pub async fn report(&self, report: &abide_fleet_json::ReportRequest) -> Result<bool> {
        let r: abide_fleet_json::ReportResponse =
            self.post("/api/v1/device/report", report).await?;
        Ok(r.outcome == "recorded")
    }

    /// Asks for a reboot lease; `Ok(false)` when the server refused it for now.
    pub async fn lease(&self) -> Result<bool> {
        match self
            .post::<_, abide_fleet_json::LeaseGrant>(
                "/api/v1/device/lease",
                &std::collections::BTreeMap::<String, String>::new(),
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.code() == Some("lease-refused") => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives the lease back.
    pub async fn release_lease(&self) -> Result<()> {
        let what = "DELETE /api/v1/device/lease";
        let resp = self
            .http
            .delete(format!("{}/api/v1/device/lease", self.base))
            .bearer_auth(&self.credential)
            .send()
            .await
            .map_err(http_error(what))?;
        answer::<abide_fleet_json::LeaseReleased>(what, resp)
            .await
            .map(|_| ())
    }

    /// Starts reading `len` bytes of a release's bundle from `start` (a range request); the
    /// answer's body is read as it arrives (`Response::chunk`). Anything but 206 with the
    /// asked range is refused.
    pub async fn range(&self, url: &str, start: u64, len: u64) -> Result<reqwest::Response> {
        let what = format!("GET {url}");
        let resp = self
            .http
            .get(format!("{}{url}", self.base))
            .bearer_auth(&self.credential)
            .header("range", format!("bytes={start}-{}", start + len - 1))
            .send()
            .await
            .map_err(http_error(&what))?;
        let status = resp.status();
        if status != reqwest::StatusCode::PARTIAL_CONTENT {
            return Err(answer::<Value>(&what, resp)
                .await
                .err()
                .unwrap_or(ClientError::Refused {
                    what,
                    status: status.as_u16(),
                    code: "range".into(),
                    message: "expected 206 Partial Content".into(),
                }));
        }
        let expected = format!("bytes {start}-{}/", start + len - 1);
        let got = resp
            .headers()
            .get("content-range")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !got.starts_with(&expected) {
            return Err(ClientError::Refused {
                what,
                status: status.as_u16(),
                code: "range".into(),
                message: format!("asked for {expected}…, the server sent {got:?}"),
            });
        }
        Ok(resp)
    }

    /// Reads `len` bytes of a release's bundle from `start` (a range request).
    pub async fn fetch(&self, url: &str, start: u64, len: u64) -> Result<Vec<u8>> {
        let resp = self.range(url, start, len).await?;
        let bytes = resp
            .bytes()
            .await
            .map_err(http_error(&format!("GET {url}")))?;
        Ok(bytes.to_vec())
    }
}
