//! The gRPC test services (`tests/proto`) and a client channel through Envoy.

use std::net::SocketAddr;

use anyhow::{Context as _, Result};
use tonic::transport::{Channel, Endpoint};

/// `user.UserService`: unary `GetUser`, server-streaming `ListUsers`.
pub mod user {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("user");
}

/// `chat.ChatService`: client-streaming `Upload`, bidi `Chat`,
/// server-streaming `Subscribe`.
pub mod chat {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("chat");
}

/// An h2c channel to `addr` (Envoy's listener), connected eagerly so a
/// refused connection fails here rather than in the first call.
pub async fn connect(addr: SocketAddr) -> Result<Channel> {
    Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await
        .with_context(|| format!("gRPC connection to {addr}"))
}
