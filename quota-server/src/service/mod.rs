//! The gRPC server: rate limit service, health, deadlines, graceful shutdown.

pub mod admission;
pub mod bounds;
pub mod decide;
pub mod leases;
pub mod quota;
pub mod rls;
pub mod sync;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer;
use tokio::net::TcpListener;
use tonic::service::interceptor::{InterceptedService, Interceptor};
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;
use tonic::Status;

use crate::auth;
use crate::config::ServerConfig;
use crate::proto::quota_server::QuotaServer;
use crate::shared::Shared;

pub use decide::{Decided, Decider, Source};
pub use quota::QuotaService;
pub use rls::Rls;

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The gRPC transport failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The listen address could not be read.
    #[error("listen address: {0}")]
    Listen(std::io::Error),
}

/// Serves Envoy's rate limit service, Sluice's `Quota` API and gRPC
/// health on `listener` over `shared`, until `shutdown` resolves; then lets
/// in-flight calls finish. `ready` runs once the services are in place and
/// calls are about to be served.
pub async fn serve(
    config: &ServerConfig,
    shared: Arc<Shared>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
    ready: impl FnOnce() + Send,
) -> Result<(), ServeError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<RateLimitServiceServer<Rls>>().await;
    let max_keys = usize::try_from(config.storage.max_keys).unwrap_or(usize::MAX);
    let decider = Arc::new(Decider::new(max_keys));
    ready();
    let quota = QuotaServer::new(QuotaService::new(shared.clone(), decider.clone()))
        .max_decoding_message_size(bounds::MAX_REQUEST_BYTES);
    let rls = RateLimitServiceServer::new(Rls::new(shared, decider))
        .max_decoding_message_size(bounds::MAX_REQUEST_BYTES);
    // Without a token the services are added as they are: an interceptor
    // that lets everything through still takes every call apart and
    // together again.
    let (open, guarded) = match grpc_token(config) {
        None => ((Some(rls), Some(quota)), (None, None)),
        Some(token) => {
            let token = RequireToken(Arc::from(token));
            (
                (None, None),
                (
                    Some(InterceptedService::new(rls, token.clone())),
                    Some(InterceptedService::new(quota, token)),
                ),
            )
        }
    };
    let deadline = Duration::from_nanos(config.request_timeout().as_nanos());
    let stopping = Arc::new(tokio::sync::Notify::new());
    let server = Server::builder()
        .timeout(deadline)
        .add_service(health_service)
        .add_optional_service(open.0)
        .add_optional_service(open.1)
        .add_optional_service(guarded.0)
        .add_optional_service(guarded.1)
        .serve_with_incoming_shutdown(incoming(listener), {
            let stopping = stopping.clone();
            async move {
                shutdown.await;
                tracing::info!("shutting down: finishing in-flight calls");
                health
                    .set_not_serving::<RateLimitServiceServer<Rls>>()
                    .await;
                stopping.notify_one();
            }
        });
    // Clients such as Envoy keep idle connections open; waiting for them
    // would never end. In-flight calls end within the request deadline, so
    // once it has passed after the signal, whatever is left is idle.
    let grace = async {
        stopping.notified().await;
        tokio::time::sleep(deadline).await;
    };
    tokio::select! {
        result = server => result.map_err(ServeError::from),
        () = grace => {
            tracing::info!("closing idle connections");
            Ok(())
        }
    }
}

/// The environment variable holding the gRPC token (it wins over the file).
pub const GRPC_TOKEN_ENV: &str = "SLUICE_GRPC_TOKEN";

/// The gRPC token in force: `SLUICE_GRPC_TOKEN`, else `listen.grpc_token`;
/// empty counts as none.
pub fn grpc_token(config: &ServerConfig) -> Option<String> {
    std::env::var(GRPC_TOKEN_ENV)
        .ok()
        .or_else(|| config.listen.grpc_token.clone())
        .filter(|t| !t.is_empty())
}

/// Refuses rate limit and `Quota` calls without `authorization: Bearer
/// <token>` metadata (health stays open, for probes).
#[derive(Clone, Debug)]
struct RequireToken(Arc<str>);

impl Interceptor for RequireToken {
    fn call(&mut self, request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        let expected = &self.0;
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(auth::bearer);
        match presented {
            Some(t) if auth::matches(t, expected) => Ok(request),
            Some(_) => Err(Status::unauthenticated("wrong gRPC token")),
            None => Err(Status::unauthenticated(
                "missing `authorization: Bearer <token>` metadata (listen.grpc_token or SLUICE_GRPC_TOKEN)",
            )),
        }
    }
}

/// The connections `listener` accepts, each with `TCP_NODELAY` set (the
/// builder's `tcp_nodelay` does not reach a listener passed in): an answer
/// is several small writes, which Nagle's algorithm would hold back until
/// the client's delayed ACK, about 40 ms a call.
pub fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// Binds the configured gRPC address (port 0 picks a free one).
pub async fn bind(config: &ServerConfig) -> Result<TcpListener, ServeError> {
    TcpListener::bind(&config.listen.grpc)
        .await
        .map_err(ServeError::Listen)
}

#[cfg(test)]
mod tests {
    use tokio_stream::StreamExt;

    use super::*;

    #[tokio::test]
    async fn accepted_connections_have_nodelay() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let mut accepted = incoming(listener);
        let _client = tokio::net::TcpStream::connect(address).await.unwrap();
        let connection = accepted.next().await.unwrap().unwrap();
        assert!(connection.nodelay().unwrap());
    }
}
