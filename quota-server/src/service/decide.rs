//! Deciding a request's items against storage, and what happens when
//! storage fails: per domain, fail open (optionally under a local fallback
//! limit) or fail closed.

use std::sync::atomic::{AtomicU64, Ordering};

use sluice_core::algorithm::Outcome;
use sluice_core::time::Span;

use crate::config::FailureMode;
use crate::limits::{Domain, Limits};
use crate::storage::{Backend, Item, MemoryBackend, StorageError};

/// Where a decision came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The configured storage answered.
    Storage,
    /// Storage failed; the domain fails open (under its fallback if set).
    FailedOpen,
    /// Storage failed; the domain fails closed.
    FailedClosed,
}

/// The outcomes for a request's items, or none when storage failed open
/// without a fallback (nothing is known about the counters then).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decided {
    /// One outcome per item, in order.
    pub outcomes: Option<Vec<Outcome>>,
    /// Where it came from.
    pub source: Source,
}

/// Counters of storage trouble, for logs now and metrics later.
#[derive(Debug, Default)]
pub struct FailureStats {
    /// Storage calls that failed or timed out.
    pub storage_errors: AtomicU64,
    /// Requests decided by a domain's fallback limit.
    pub fallbacks: AtomicU64,
}

/// A backend plus the failure policy around it.
#[derive(Debug)]
pub struct Decider<B> {
    backend: B,
    fallback: MemoryBackend,
    /// Failures seen so far.
    pub stats: FailureStats,
}

/// What a client is told to wait when a domain fails closed: storage
/// state is unknown, so a short retry rather than a window.
const CLOSED_RETRY: Span = Span::SECOND;

impl<B: Backend> Decider<B> {
    /// Wraps `backend`; fallback limits keep at most `max_keys` keys each.
    pub fn new(backend: B, max_keys: usize) -> Decider<B> {
        Decider {
            backend,
            fallback: MemoryBackend::new(max_keys),
            stats: FailureStats::default(),
        }
    }

    /// The wrapped backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Gives back `items` (a request's negative hits). A storage failure
    /// only loses the refund, which errs on the strict side; it is counted.
    pub async fn refund(&self, domain: &Domain, items: &[Item<'_>]) {
        if items.is_empty() {
            return;
        }
        if let Err(error) = self.backend.refund(items, None).await {
            self.storage_failed(domain, &error);
        }
    }

    pub(crate) fn storage_failed(&self, domain: &Domain, error: &StorageError) {
        let errors = self.stats.storage_errors.fetch_add(1, Ordering::Relaxed) + 1;
        // Log the 1st, 2nd, 4th, 8th... failure: an outage must not flood the log.
        if errors.is_power_of_two() {
            tracing::warn!(%error, errors, domain = %domain.name, mode = ?domain.failure_mode, "storage failed");
        }
    }

    /// Decides `items` (all of `domain`) against storage, applying the
    /// domain's failure mode if storage fails.
    pub async fn decide(&self, limits: &Limits, domain: &Domain, items: &[Item<'_>]) -> Decided {
        let error = match self.backend.check(items, None).await {
            Ok(outcomes) => {
                return Decided {
                    outcomes: Some(outcomes),
                    source: Source::Storage,
                }
            }
            Err(e) => e,
        };
        self.storage_failed(domain, &error);
        match domain.failure_mode {
            FailureMode::Closed => Decided {
                outcomes: Some(
                    items
                        .iter()
                        .map(|_| Outcome {
                            allowed: false,
                            remaining: 0,
                            reset_after: Span::ZERO,
                            retry_after: CLOSED_RETRY,
                        })
                        .collect(),
                ),
                source: Source::FailedClosed,
            },
            FailureMode::Open => {
                let fallback = domain.fallback.and_then(|id| limits.limit(id));
                let outcomes = fallback.and_then(|limit| {
                    self.stats.fallbacks.fetch_add(1, Ordering::Relaxed);
                    let local: Vec<Item<'_>> = items
                        .iter()
                        .map(|it| Item {
                            limit,
                            key: it.key.clone(),
                            cost: it.cost,
                            enforce: it.enforce,
                        })
                        .collect();
                    // The local store cannot fail short of a bug; then the
                    // request fails open without a limit, as with no fallback.
                    self.fallback
                        .decide(&local, crate::storage::system_now())
                        .ok()
                });
                Decided {
                    outcomes,
                    source: Source::FailedOpen,
                }
            }
        }
    }
}
