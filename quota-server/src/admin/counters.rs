//! What the admin API needs of storage, over any backend: the state of
//! one key, a reset, and the failure counts.
//!
//! Both use the backend's ordinary batched call, so every backend supports
//! them without new storage code: a peek is a check of cost 0 (it consumes
//! nothing), a reset refunds a whole allowance.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;

use sluice_core::algorithm::Outcome;

use crate::limits::Limit;
use crate::metrics::FailureCounts;
use crate::service::Decider;
use crate::storage::{Backend, Item, StorageError};

/// A boxed future, so the trait can be used as an object.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Counter access for the admin API, independent of the backend type.
pub trait CounterStore: Send + Sync {
    /// The state of `key` under `limit`, consuming nothing.
    fn peek<'a>(
        &'a self,
        limit: &'a Limit,
        key: String,
    ) -> BoxFuture<'a, Result<Outcome, StorageError>>;

    /// Gives `key` its whole allowance back.
    fn reset<'a>(
        &'a self,
        limit: &'a Limit,
        key: String,
    ) -> BoxFuture<'a, Result<(), StorageError>>;

    /// Storage failures so far.
    fn failures(&self) -> FailureCounts;
}

impl<B: Backend> CounterStore for Decider<B> {
    fn peek<'a>(
        &'a self,
        limit: &'a Limit,
        key: String,
    ) -> BoxFuture<'a, Result<Outcome, StorageError>> {
        Box::pin(async move {
            let items = [Item {
                limit,
                key,
                cost: 0,
                enforce: false,
            }];
            let outcomes = self.backend().check(&items, None).await?;
            outcomes
                .into_iter()
                .next()
                .ok_or_else(|| StorageError::Reply("no outcome for the peeked key".into()))
        })
    }

    fn reset<'a>(
        &'a self,
        limit: &'a Limit,
        key: String,
    ) -> BoxFuture<'a, Result<(), StorageError>> {
        Box::pin(async move {
            let quota = limit.quota();
            let items = [Item {
                limit,
                key,
                cost: quota.count().max(quota.burst()),
                enforce: false,
            }];
            self.backend().refund(&items, None).await
        })
    }

    fn failures(&self) -> FailureCounts {
        FailureCounts {
            storage_errors: self.stats.storage_errors.load(Ordering::Relaxed),
            fallbacks: self.stats.fallbacks.load(Ordering::Relaxed),
        }
    }
}

/// The server's counter store, registered once the backend is built.
#[derive(Default)]
pub struct StoreSlot(std::sync::OnceLock<std::sync::Arc<dyn CounterStore>>);

impl StoreSlot {
    /// Registers `store`; a second registration is ignored.
    pub fn set(&self, store: std::sync::Arc<dyn CounterStore>) {
        let _ = self.0.set(store);
    }

    /// The store, once registered.
    pub fn get(&self) -> Option<&dyn CounterStore> {
        self.0.get().map(|s| &**s)
    }
}

impl std::fmt::Debug for StoreSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreSlot")
            .field("registered", &self.0.get().is_some())
            .finish()
    }
}
