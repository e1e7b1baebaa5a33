//! The state every API reads and the admin API and reloads change: the
//! limits in force (swapped whole), the access controls, the metrics and
//! the counter store.

use std::sync::{Arc, RwLock};

use crate::controls::Controls;
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::storage::Store;

/// Shared by every request, the admin API and the reload watcher.
#[derive(Debug)]
pub struct Shared {
    limits: RwLock<Arc<Limits>>,
    /// Access lists, bans and overrides, checked before the limits.
    pub controls: Controls,
    /// Decision, storage and reload metrics.
    pub metrics: Metrics,
    /// Where counters live.
    pub store: Store,
}

impl Shared {
    /// Starts with `limits`, `controls` and counters in `store`.
    pub fn new(mut limits: Limits, controls: Controls, store: Store) -> Shared {
        let metrics = Metrics::default();
        limits.bind_metrics(&metrics);
        Shared {
            limits: RwLock::new(Arc::new(limits)),
            controls,
            metrics,
            store,
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
    pub fn replace(&self, mut limits: Limits) {
        limits.bind_metrics(&self.metrics);
        *self.limits.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(limits);
    }
}
