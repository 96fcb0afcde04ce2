//! What every request passes before its handler: credentials checked before a body is read,
//! and a deadline on the body. A request that carries a body to an admin or device route
//! without valid credentials gets 401 and its body is never read; a body that does not arrive
//! within `body_timeout` (uploads: that makes no progress for `body_timeout`) gets 408 and the
//! connection is closed.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper::body::{Frame, SizeHint};

use crate::Server;
use crate::error::ApiError;

/// Who may send a body to a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sender {
    /// Anyone: the handler checks what the body carries (an enrolment token, the web
    /// sign-in), or reads no body.
    Anyone,
    /// An enrolled device.
    Device,
    /// The admin.
    Admin,
}

fn sender(method: &Method, path: &str) -> Sender {
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return Sender::Anyone;
    }
    match path {
        "/api/v1/device/enroll" => Sender::Anyone,
        p if p.starts_with("/api/v1/device/") => Sender::Device,
        p if p.starts_with("/api/v1/") => Sender::Admin,
        _ => Sender::Anyone,
    }
}

/// Largest body buffered here, the JSON routes' own limit (uploads stream): an
/// unauthenticated client cannot make the server hold more.
const MAX_BUFFERED: usize = 64 << 10;

/// The middleware; see the module documentation.
pub async fn guard(State(server): State<Server>, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let checked = match sender(&parts.method, parts.uri.path()) {
        Sender::Anyone => Ok(()),
        Sender::Admin => crate::auth::caller(&server, &parts.headers)
            .await
            .map(|_| ()),
        Sender::Device => {
            let peer = parts.extensions.get::<crate::tls::PeerIdentity>();
            crate::auth::device(&server, &parts.headers, peer)
                .await
                .map(|_| ())
        }
    };
    if let Err(e) = checked {
        return closing(e.into_response());
    }
    let timeout = server.config.body_timeout;
    let body = if parts.method == Method::POST && parts.uri.path() == "/api/v1/releases" {
        Body::new(IdleBody {
            inner: body,
            idle: timeout,
            sleep: Box::pin(tokio::time::sleep(timeout)),
        })
    } else {
        match tokio::time::timeout(timeout, axum::body::to_bytes(body, MAX_BUFFERED)).await {
            Ok(Ok(bytes)) => Body::from(bytes),
            Ok(Err(_)) => {
                return closing(
                    ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "too-large",
                        format!(
                            "the request body is larger than {MAX_BUFFERED} bytes or broken off"
                        ),
                    )
                    .into_response(),
                );
            }
            Err(_) => {
                return closing(
                    ApiError::new(
                        StatusCode::REQUEST_TIMEOUT,
                        "timeout",
                        format!(
                            "the request body did not arrive within {} s",
                            timeout.as_secs()
                        ),
                    )
                    .into_response(),
                );
            }
        }
    };
    next.run(Request::from_parts(parts, body)).await
}

/// The response with `Connection: close`: what is left of the request is not read.
fn closing(mut response: Response) -> Response {
    response.headers_mut().insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
    response
}

/// A streamed body that fails when no data arrives for `idle`.
struct IdleBody {
    inner: Body,
    idle: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl hyper::body::Body for IdleBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                let next = tokio::time::Instant::now() + this.idle;
                this.sleep.as_mut().reset(next);
                Poll::Ready(frame)
            }
            Poll::Pending => match this.sleep.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(axum::Error::new(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no data for {} s", this.idle.as_secs()),
                ))))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
