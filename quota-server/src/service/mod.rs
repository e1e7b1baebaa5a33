//! The gRPC server: rate limit service, health, deadlines, graceful shutdown.

pub mod admission;
pub mod decide;
pub mod quota;
pub mod rls;
pub mod sync;

use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;

use crate::admin::{Controls, StoreSlot};
use crate::config::{BackendKind, ServerConfig};
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::proto::quota_server::QuotaServer;
use crate::storage::{Backend, MemoryBackend, RedisBackend, StorageError};

pub use decide::{Decided, Decider, Source};
pub use quota::QuotaService;
pub use rls::Rls;

/// State every request reads: the current limits, swapped whole on reload,
/// and what the admin API changes and reads.
#[derive(Debug)]
pub struct Shared {
    limits: RwLock<Arc<Limits>>,
    /// Access lists, bans and overrides, checked before the limits.
    pub controls: Controls,
    /// Decision, storage and reload metrics.
    pub metrics: Metrics,
    /// The backend, for the admin API's counter routes.
    pub store: StoreSlot,
}

impl Shared {
    /// Starts with `limits` and empty default controls.
    pub fn new(limits: Limits) -> Shared {
        Shared::with_controls(limits, Controls::default())
    }

    /// Starts with `limits` and `controls`.
    pub fn with_controls(limits: Limits, controls: Controls) -> Shared {
        Shared {
            limits: RwLock::new(Arc::new(limits)),
            controls,
            metrics: Metrics::default(),
            store: StoreSlot::default(),
        }
    }

    /// The limits in force (a cheap clone of a pointer).
    pub fn limits(&self) -> Arc<Limits> {
        // The lock guards a pointer swap only; a poisoned lock still holds a valid one.
        self.limits
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Puts `limits` in force for every later request.
    pub fn replace(&self, limits: Limits) {
        *self.limits.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(limits);
    }
}

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The storage could not be set up.
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    /// The gRPC transport failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The configuration lacks something the server needs.
    #[error("configuration: {0}")]
    Config(&'static str),
    /// The listen address could not be read.
    #[error("listen address: {0}")]
    Listen(std::io::Error),
}

/// Serves on `listener` until `shutdown` resolves, then lets in-flight
/// calls finish.
pub async fn serve(
    config: &ServerConfig,
    limits: Limits,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    serve_shared(
        config,
        Arc::new(Shared::new(limits)),
        listener,
        shutdown,
        || {},
    )
    .await
}

/// Like [`serve`], over state shared with the admin API and reloads;
/// `ready` runs once storage is in place (the admin API can use it) and
/// calls are about to be served.
pub async fn serve_shared(
    config: &ServerConfig,
    shared: Arc<Shared>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
    ready: impl FnOnce() + Send,
) -> Result<(), ServeError> {
    let max_keys = usize::try_from(config.storage.max_keys).unwrap_or(usize::MAX);
    match config.storage.backend {
        BackendKind::Redis => {
            // Validation requires the section; its absence here is a caller's bug.
            let redis = config.storage.redis.as_ref().ok_or(ServeError::Config(
                "storage.redis is required with backend: redis",
            ))?;
            let timeout = Duration::from_nanos(config.redis_timeout().as_nanos());
            let backend = RedisBackend::from_config(redis, timeout)?;
            run(
                config,
                shared,
                Decider::new(backend, max_keys),
                listener,
                shutdown,
                ready,
            )
            .await
        }
        BackendKind::Memory => {
            let backend = MemoryBackend::new(max_keys);
            run(
                config,
                shared,
                Decider::new(backend, max_keys),
                listener,
                shutdown,
                ready,
            )
            .await
        }
    }
}

async fn run<B: Backend>(
    config: &ServerConfig,
    shared: Arc<Shared>,
    decider: Decider<B>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
    ready: impl FnOnce() + Send,
) -> Result<(), ServeError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<RateLimitServiceServer<Rls<B>>>().await;
    let decider = Arc::new(decider);
    shared.store.set(decider.clone());
    ready();
    let quota = QuotaServer::new(QuotaService::new(shared.clone(), decider.clone()));
    let rls = RateLimitServiceServer::new(Rls::new(shared, decider));
    let deadline = Duration::from_nanos(config.request_timeout().as_nanos());
    let stopping = Arc::new(tokio::sync::Notify::new());
    let server = Server::builder()
        .timeout(deadline)
        .add_service(health_service)
        .add_service(rls)
        .add_service(quota)
        .serve_with_incoming_shutdown(TcpIncoming::from(listener), {
            let stopping = stopping.clone();
            async move {
                shutdown.await;
                tracing::info!("shutting down: finishing in-flight calls");
                health
                    .set_not_serving::<RateLimitServiceServer<Rls<B>>>()
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

/// Binds the configured gRPC address (port 0 picks a free one).
pub async fn bind(config: &ServerConfig) -> Result<TcpListener, ServeError> {
    TcpListener::bind(&config.listen.grpc)
        .await
        .map_err(ServeError::Listen)
}
