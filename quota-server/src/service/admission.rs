//! The steps every API (`ShouldRateLimit`, `Check`, `Sync`) shares around
//! its limits: the admin controls first (allow list, deny list, bans,
//! overrides), then the storage decision, both recorded in the metrics.

use std::time::Instant;

use sluice_core::access::Grant;

use super::decide::{Decided, Decider, Source};
use crate::controls::{applicable, raise, Gate};
use crate::limits::{Domain, Limit, Limits, Resolved};
use crate::metrics::Outcome as MetricOutcome;
use crate::shared::Shared;
use crate::storage::Item;

/// What the admin controls make of one request.
#[derive(Debug)]
pub enum Admission<'a> {
    /// Allow-listed (`true`) or deny-listed or banned (`false`): the whole
    /// request is answered so, nothing counted.
    Settled(bool),
    /// Limits apply, as overrides leave them.
    Limits(Overridden<'a>),
}

/// Each unit's limit (descriptor or item) after overrides.
#[derive(Debug)]
pub struct Overridden<'a> {
    resolved: Vec<Resolved<'a>>,
    grants: Vec<Option<Grant>>,
    /// Per unit, its raised limit; empty when no override raises one (the
    /// usual case, which so allocates nothing for it).
    raised: Vec<Option<Limit>>,
}

/// The raised limit of a unit that has none.
static NOT_RAISED: Option<Limit> = None;

impl Overridden<'_> {
    /// The limit unit `index` is charged against, if any (none when
    /// unlimited by config or override, or when no limit matched).
    pub fn limit(&self, index: usize) -> Option<&Limit> {
        let resolved = *self.resolved.get(index)?;
        let raised = self.raised.get(index).unwrap_or(&NOT_RAISED);
        applicable(resolved, *self.grants.get(index)?, raised)
    }

    /// Whether an override lifts unit `index`'s limit entirely.
    pub fn unlimited(&self, index: usize) -> bool {
        matches!(self.grants.get(index), Some(Some(Grant::Unlimited)))
    }
}

/// Passes a request of `domain` through the admin controls: `gate` is what
/// the controls decided for its units, `resolved` each unit's configured
/// limit (in the same order). A settled request is counted in the metrics
/// under the rule `access`.
pub fn admit<'a>(
    shared: &Shared,
    domain: &Domain,
    gate: Gate,
    resolved: Vec<Resolved<'a>>,
) -> Admission<'a> {
    let grants = match gate {
        Gate::Limits(grants) => grants,
        Gate::Allowed => return settled(shared, domain, true),
        Gate::Denied => return settled(shared, domain, false),
    };
    Admission::Limits(overridden(resolved, grants))
}

/// Each unit's limit once its override (`grants`, in the same order as
/// `resolved`) applies.
pub fn overridden(resolved: Vec<Resolved<'_>>, grants: Vec<Option<Grant>>) -> Overridden<'_> {
    let raises = grants.iter().any(|g| matches!(g, Some(Grant::Limit(_))));
    let raised = if raises {
        resolved
            .iter()
            .zip(&grants)
            .map(|(r, g)| raise(*r, *g))
            .collect()
    } else {
        Vec::new()
    };
    Overridden {
        resolved,
        grants,
        raised,
    }
}

fn settled<'a>(shared: &Shared, domain: &Domain, allowed: bool) -> Admission<'a> {
    count_settled(shared, domain, allowed);
    Admission::Settled(allowed)
}

/// Counts a unit the access lists settled (allowed when `allowed`) in the
/// metrics, under the rule `access`.
pub fn count_settled(shared: &Shared, domain: &Domain, allowed: bool) {
    shared.metrics.access(&domain.name, allowed);
}

/// Decides `items` against storage, recording the round trip and each
/// item's outcome in the metrics.
pub async fn decide(
    shared: &Shared,
    decider: &Decider,
    limits: &Limits,
    domain: &Domain,
    items: &[Item<'_>],
) -> Decided {
    let started = Instant::now();
    let decided = decider.decide(shared, limits, domain, items).await;
    if !items.is_empty() {
        shared.metrics.storage_call(started.elapsed());
    }
    for (i, item) in items.iter().enumerate() {
        let got = decided.outcomes.as_ref().and_then(|o| o.get(i));
        let outcome = match (decided.source, got) {
            (Source::FailedClosed, _) => MetricOutcome::FailureClosed,
            (Source::FailedOpen, _) => MetricOutcome::FailureOpen,
            (Source::Storage, Some(o)) if !o.allowed && item.enforce => MetricOutcome::OverLimit,
            (Source::Storage, Some(o)) if !o.allowed => MetricOutcome::Shadow,
            (Source::Storage, _) => MetricOutcome::Ok,
        };
        shared.metrics.decision(&domain.name, item.limit, outcome);
    }
    decided
}
