//! The Abide agent's local API: the gRPC service of `proto/abide/agent/v1/agent.proto`, the
//! code generated from it, and its transports — a Unix socket and TCP with mutual TLS served
//! over hyper's HTTP/2, and a client for each.

#[allow(missing_docs, clippy::all, clippy::pedantic)]
mod generated {
    tonic::include_proto!("abide.agent.v1");
}

pub use generated::*;

pub mod transport;

pub use transport::{ApiError, Client};
