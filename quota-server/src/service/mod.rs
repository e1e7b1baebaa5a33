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
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Barrier};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt as _;
use tonic::service::interceptor::{InterceptedService, Interceptor};
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
    /// A thread serving calls could not be started, or died.
    #[error("serving thread: {0}")]
    Thread(std::io::Error),
}

/// Serves Envoy's rate limit service, Sluice's `Quota` API and gRPC
/// health on `listener` over `shared`, with `threads` threads (at least
/// one), until `shutdown` resolves; then lets in-flight calls finish.
/// `ready` runs once the services are in place and calls are about to be
/// served.
///
/// Each thread runs its own single-threaded runtime and serves the
/// connections handed to it whole: the calling thread accepts them and
/// deals them out in turn. A call never moves between threads, so none
/// pays for a work-stealing scheduler's hand-offs and wake-ups (measured:
/// about a quarter of the transport's CPU per call), while several
/// connections still use several CPUs.
pub async fn serve(
    config: &ServerConfig,
    shared: Arc<Shared>,
    listener: TcpListener,
    threads: usize,
    shutdown: impl Future<Output = ()> + Send,
    ready: impl FnOnce() + Send,
) -> Result<(), ServeError> {
    let max_keys = usize::try_from(config.storage.max_keys).unwrap_or(usize::MAX);
    let decider = Arc::new(Decider::new(max_keys));
    let stop = Arc::new(watch::Sender::new(false));
    // Every runtime lives until all have served: tasks one started (a
    // Redis lane is started by the first call that needs it) serve the
    // other threads' calls too.
    let finished = Arc::new(Barrier::new(threads.max(1)));
    let (mut queues, mut served) = (Vec::new(), Vec::new());
    for index in 1..threads.max(1) {
        let (queue, connections) = mpsc::channel(ACCEPT_QUEUE);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ServeError::Thread)?;
        let (config, shared, decider, stop, finished) = (
            config.clone(),
            shared.clone(),
            decider.clone(),
            stop.clone(),
            finished.clone(),
        );
        let thread = std::thread::Builder::new()
            .name(format!("sluice-grpc-{index}"))
            .spawn(move || {
                runtime.block_on(async {
                    let result =
                        serve_connections(&config, shared, decider, connections, &stop).await;
                    finished.wait().await;
                    result
                })
            })
            .map_err(ServeError::Thread)?;
        queues.push(queue);
        served.push(thread);
    }
    let (queue, connections) = mpsc::channel(ACCEPT_QUEUE);
    queues.push(queue);
    ready();
    let accepting = accept(listener, queues, &stop, shutdown);
    let here = async {
        let result = serve_connections(config, shared, decider, connections, &stop).await;
        finished.wait().await;
        result
    };
    let ((), mut result) = tokio::join!(accepting, here);
    for thread in served {
        let joined = tokio::task::spawn_blocking(move || thread.join()).await;
        let outcome = match joined {
            Ok(Ok(outcome)) => outcome,
            _ => Err(ServeError::Thread(std::io::Error::other(
                "a serving thread panicked",
            ))),
        };
        result = result.and(outcome);
    }
    result
}

/// Connections accepted but not yet taken up by their thread.
const ACCEPT_QUEUE: usize = 1024;

/// Accepts connections on `listener` (with `TCP_NODELAY`) and deals them
/// out to `queues` in turn, until `shutdown` resolves or `stop` is set
/// (a serving thread failed); then sets `stop` and closes the listener,
/// so new clients are refused at once.
async fn accept(
    listener: TcpListener,
    queues: Vec<mpsc::Sender<std::net::TcpStream>>,
    stop: &watch::Sender<bool>,
    shutdown: impl Future<Output = ()> + Send,
) {
    let mut stopped = stop.subscribe();
    let mut shutdown = std::pin::pin!(shutdown);
    for queue in queues.iter().cycle() {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            _ = stopped.wait_for(|stop| *stop) => break,
            accepted = listener.accept() => accepted,
        };
        // Handed over as a std stream: each thread registers it with its
        // own runtime.
        let connection = accepted.and_then(|(connection, _)| {
            connection.set_nodelay(true)?;
            connection.into_std()
        });
        match connection {
            Ok(connection) => {
                if queue.send(connection).await.is_err() {
                    break;
                }
            }
            // As tonic's own listener does: a failed accept (out of file
            // descriptors, a reset before accept) loses one connection.
            Err(e) => tracing::debug!(%e, "accepting a gRPC connection failed"),
        }
    }
    stop.send_replace(true);
}

/// Serves the connections arriving on `connections` on the current
/// (single-threaded) runtime until `stop` is set, then lets in-flight
/// calls finish; a failure sets `stop` for every thread.
async fn serve_connections(
    config: &ServerConfig,
    shared: Arc<Shared>,
    decider: Arc<Decider>,
    connections: mpsc::Receiver<std::net::TcpStream>,
    stop: &watch::Sender<bool>,
) -> Result<(), ServeError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<RateLimitServiceServer<Rls>>().await;
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
    let incoming = ReceiverStream::new(connections).map(TcpStream::from_std);
    let deadline = Duration::from_nanos(config.request_timeout().as_nanos());
    let stopped = || {
        let mut stopped = stop.subscribe();
        async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        }
    };
    let server = Server::builder()
        .timeout(deadline)
        .add_service(health_service)
        .add_optional_service(open.0)
        .add_optional_service(open.1)
        .add_optional_service(guarded.0)
        .add_optional_service(guarded.1)
        .serve_with_incoming_shutdown(incoming, stopped());
    // Clients such as Envoy keep idle connections open; waiting for them
    // would never end. In-flight calls end within the request deadline, so
    // once it has passed after the signal, whatever is left is idle. Timed
    // from `stop` itself: tonic stops polling its own signal once the
    // incoming connections end, which they do when accepting stops.
    let grace = async {
        stopped().await;
        tracing::info!("shutting down: finishing in-flight calls");
        health
            .set_not_serving::<RateLimitServiceServer<Rls>>()
            .await;
        tokio::time::sleep(deadline).await;
    };
    let result = tokio::select! {
        result = server => result.map_err(ServeError::from),
        () = grace => {
            tracing::info!("closing idle connections");
            Ok(())
        }
    };
    if result.is_err() {
        stop.send_replace(true);
    }
    result
}

/// The threads serving calls for `listen.worker_threads`: itself, or one
/// per CPU for 0.
pub fn threads(worker_threads: u32) -> usize {
    match worker_threads {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        n => usize::try_from(n).unwrap_or(1),
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

/// Binds the configured gRPC address (port 0 picks a free one).
pub async fn bind(config: &ServerConfig) -> Result<TcpListener, ServeError> {
    TcpListener::bind(&config.listen.grpc)
        .await
        .map_err(ServeError::Listen)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_threads_zero_is_one_per_cpu() {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        assert_eq!(threads(0), cpus);
        assert_eq!(threads(1), 1);
        assert_eq!(threads(3), 3);
    }

    #[tokio::test]
    async fn connections_are_dealt_out_in_turn_with_nodelay() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (first, mut to_first) = mpsc::channel(4);
        let (second, mut to_second) = mpsc::channel(4);
        let stop = watch::Sender::new(false);
        let (end, ended) = tokio::sync::oneshot::channel::<()>();
        let accepting = accept(listener, vec![first, second], &stop, async {
            let _ = ended.await;
        });
        let clients = async {
            let mut clients = Vec::new();
            for _ in 0..3 {
                clients.push(TcpStream::connect(address).await.unwrap());
            }
            let dealt = [
                to_first.recv().await.unwrap(),
                to_second.recv().await.unwrap(),
                to_first.recv().await.unwrap(),
            ];
            for (client, connection) in clients.iter().zip(&dealt) {
                assert_eq!(
                    connection.peer_addr().unwrap(),
                    client.local_addr().unwrap()
                );
                assert!(connection.nodelay().unwrap());
            }
            end.send(()).unwrap();
        };
        tokio::join!(accepting, clients);
        assert!(*stop.borrow(), "the shutdown stops every thread");
    }
}
