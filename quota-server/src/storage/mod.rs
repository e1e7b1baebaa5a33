//! Where counters live: one batched, all-or-nothing call per request.

pub mod breaker;
pub mod memory;
pub mod redis;
pub mod tls;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sluice_core::algorithm::Outcome;
use sluice_core::time::Nanos;

use crate::config::{BackendKind, ServerConfig};
use crate::limits::Limit;

pub use memory::MemoryBackend;
pub use redis::RedisBackend;

/// One limit to check for one request.
#[derive(Clone, Debug)]
pub struct Item<'a> {
    /// The limit.
    pub limit: &'a Limit,
    /// Its storage key (see [`Limit::storage_key`]).
    pub key: String,
    /// Permits wanted.
    pub cost: u64,
    /// Whether a denial stops the request (false for shadow limits).
    pub enforce: bool,
}

/// Why storage could not decide.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// No answer within the configured timeout.
    #[error("storage did not answer within {0:?}")]
    Timeout(Duration),
    /// A recent call found storage unreachable; calls fail at once until
    /// the next probe.
    #[error(
        "storage unreachable on a recent call; failing fast for up to {0:?} before probing again"
    )]
    Down(Duration),
    /// Redis refused or the connection failed (shared by every decision
    /// of the script call it hit).
    #[error("redis: {0}")]
    Redis(Arc<::redis::RedisError>),
    /// Redis decided the other requests of a batch but refused this one
    /// (e.g. one of its keys holds another type).
    #[error("redis refused this decision: {0}")]
    Refused(String),
    /// The server's queue to Redis is gone (the backend is shutting down).
    #[error("the Redis batching task stopped")]
    Stopped,
    /// The script answered something this server does not understand
    /// (a script of another version under the same name?).
    #[error("unexpected reply from the decision script: {0}")]
    Reply(String),
    /// The in-memory engine refused (a corrupt state or endless conflicts:
    /// a bug, since the memory store is used under one lock).
    #[error("in-memory engine: {0}")]
    Engine(#[from] sluice_core::store::StoreError),
    /// The TLS CA file cannot be used.
    #[error("{0}")]
    Tls(#[from] tls::TlsError),
    /// `backend: redis` without a `storage.redis` section (refused by
    /// validation, so only a caller skipping it gets this).
    #[error("storage.redis is required with backend: redis")]
    MissingRedis,
    /// The limit cannot run on this backend (checked at config validation).
    #[error("limit {0:?} cannot run on Redis: its values exceed exact double arithmetic")]
    Unrepresentable(String),
}

impl From<::redis::RedisError> for StorageError {
    fn from(error: ::redis::RedisError) -> Self {
        StorageError::Redis(Arc::new(error))
    }
}

/// The counter store the server was configured with, built once at
/// startup and shared by every API.
///
/// `check` decides every item of one request atomically: if an enforced
/// item is over its limit, no item consumes anything (the core engine's
/// all-or-nothing); otherwise every allowed item consumes its cost. Shadow
/// items (`enforce: false`) are reported but never block the others.
/// Outcomes come back in item order. A batch names each (limit, key) at
/// most once: callers merge repeats by adding their costs.
///
/// `now: None` uses the backend's own clock (Redis `TIME`, so that several
/// servers agree; the system clock in memory); `Some` replays a time, which
/// only tests do.
// One per server, built once and never moved on a hot path: the size of
// its larger variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Store {
    /// Counters in this process.
    Memory(MemoryBackend),
    /// Counters in Redis (one server or a cluster).
    Redis(RedisBackend),
}

impl Store {
    /// The store `storage` describes; Redis connects on first use, so a
    /// server may start while Redis is down.
    pub fn from_config(config: &ServerConfig) -> Result<Store, StorageError> {
        let max_keys = usize::try_from(config.storage.max_keys).unwrap_or(usize::MAX);
        match config.storage.backend {
            BackendKind::Memory => Ok(Store::Memory(MemoryBackend::new(max_keys))),
            BackendKind::Redis => {
                // Validation requires the section; its absence is a caller's bug.
                let redis = config
                    .storage
                    .redis
                    .as_ref()
                    .ok_or(StorageError::MissingRedis)?;
                let timeout = Duration::from_nanos(config.redis_timeout().as_nanos());
                Ok(Store::Redis(RedisBackend::from_config(redis, timeout)?))
            }
        }
    }

    /// Checks and consumes; see the type's doc.
    pub async fn check(
        &self,
        items: &[Item<'_>],
        now: Option<Nanos>,
    ) -> Result<Vec<Outcome>, StorageError> {
        match self {
            Store::Memory(m) => m.check(items, now),
            Store::Redis(r) => r.check(items, now).await,
        }
    }

    /// The longest a storage call takes before it fails: Redis's timeout;
    /// a memory call does not wait.
    pub fn call_bound(&self) -> Duration {
        match self {
            Store::Memory(_) => Duration::ZERO,
            Store::Redis(r) => r.timeout(),
        }
    }

    /// Gives back each item's cost (e.g. a request that was not served).
    pub async fn refund(&self, items: &[Item<'_>], now: Option<Nanos>) -> Result<(), StorageError> {
        match self {
            Store::Memory(m) => m.refund(items, now),
            Store::Redis(r) => r.refund(items, now).await,
        }
    }

    /// The state of `key` under `limit`, consuming nothing (a check of cost 0).
    pub async fn peek(&self, limit: &Limit, key: String) -> Result<Outcome, StorageError> {
        let items = [Item {
            limit,
            key,
            cost: 0,
            enforce: false,
        }];
        let outcomes = self.check(&items, None).await?;
        outcomes
            .into_iter()
            .next()
            .ok_or_else(|| StorageError::Reply("no outcome for the peeked key".into()))
    }

    /// Gives `key` its whole allowance back (a refund of all of it).
    pub async fn reset(&self, limit: &Limit, key: String) -> Result<(), StorageError> {
        let quota = limit.quota();
        let items = [Item {
            limit,
            key,
            cost: quota.count().max(quota.burst()),
            enforce: false,
        }];
        self.refund(&items, None).await
    }
}

/// The system clock as core time (nanoseconds since the Unix epoch).
pub fn system_now() -> Nanos {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    Nanos(u64::try_from(since.as_nanos()).unwrap_or(u64::MAX))
}
