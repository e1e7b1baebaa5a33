//! Deciding a request's items against storage, and what happens when
//! storage fails: per domain, fail open (optionally under a local fallback
//! limit) or fail closed.

use sluice_core::algorithm::Outcome;
use sluice_core::time::Span;

use crate::config::FailureMode;
use crate::limits::{Domain, Limits};
use crate::shared::Shared;
use crate::storage::{system_now, Item, MemoryBackend, StorageError};

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

/// The failure policy around the shared store: the local fallback
/// counters used while storage is down.
#[derive(Debug)]
pub struct Decider {
    fallback: MemoryBackend,
}

/// What a client is told to wait when a domain fails closed: storage
/// state is unknown, so a short retry rather than a window.
const CLOSED_RETRY: Span = Span::SECOND;

impl Decider {
    /// A decider whose fallback limits keep at most `max_keys` keys each.
    pub fn new(max_keys: usize) -> Decider {
        Decider {
            fallback: MemoryBackend::new(max_keys),
        }
    }

    /// Gives back `items` (a request's negative hits). A storage failure
    /// only loses the refund, which errs on the strict side; it is counted.
    pub async fn refund(&self, shared: &Shared, domain: &Domain, items: &[Item<'_>]) {
        if items.is_empty() {
            return;
        }
        if let Err(error) = shared.store.refund(items, None).await {
            storage_failed(shared, domain, &error);
        }
    }

    /// Decides `items` (all of `domain`) against storage, applying the
    /// domain's failure mode if storage fails.
    pub async fn decide(
        &self,
        shared: &Shared,
        limits: &Limits,
        domain: &Domain,
        items: &[Item<'_>],
    ) -> Decided {
        let error = match shared.store.check(items, None).await {
            Ok(outcomes) => {
                return Decided {
                    outcomes: Some(outcomes),
                    source: Source::Storage,
                }
            }
            Err(e) => e,
        };
        storage_failed(shared, domain, &error);
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
                    shared.metrics.fallback();
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
                    self.fallback.decide(&local, system_now()).ok()
                });
                Decided {
                    outcomes,
                    source: Source::FailedOpen,
                }
            }
        }
    }
}

/// Counts a storage failure of `domain`, logging the 1st, 2nd, 4th, 8th...
/// so that an outage does not flood the log.
pub fn storage_failed(shared: &Shared, domain: &Domain, error: &StorageError) {
    let errors = shared.metrics.storage_error();
    if errors.is_power_of_two() {
        tracing::warn!(%error, errors, domain = %domain.name, mode = ?domain.failure_mode, "storage failed");
    }
}
