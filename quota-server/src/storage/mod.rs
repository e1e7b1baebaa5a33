//! Where counters live: one batched, all-or-nothing call per request.

pub mod breaker;
pub mod memory;
pub mod redis;
pub mod tls;

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sluice_core::algorithm::Outcome;
use sluice_core::time::Nanos;

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
    /// Redis refused or the connection failed.
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
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
    /// The limit cannot run on this backend (checked at config validation).
    #[error("limit {0:?} cannot run on Redis: its values exceed exact double arithmetic")]
    Unrepresentable(String),
}

/// A counter store shared by all requests.
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
pub trait Backend: Send + Sync + 'static {
    /// Checks and consumes; see the trait doc.
    fn check(
        &self,
        items: &[Item<'_>],
        now: Option<Nanos>,
    ) -> impl Future<Output = Result<Vec<Outcome>, StorageError>> + Send;

    /// Gives back each item's cost (e.g. a request that was not served).
    fn refund(
        &self,
        items: &[Item<'_>],
        now: Option<Nanos>,
    ) -> impl Future<Output = Result<(), StorageError>> + Send;
}

/// The system clock as core time (nanoseconds since the Unix epoch).
pub fn system_now() -> Nanos {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    Nanos(u64::try_from(since.as_nanos()).unwrap_or(u64::MAX))
}
