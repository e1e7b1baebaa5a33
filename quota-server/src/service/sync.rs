//! Leases for distributed callers (`Quota/Sync`), the API of the filter's
//! sync mode `leased`.
//!
//! A caller decides locally from a lease: a number of permits taken from
//! the global budget when granted, valid until an expiry. Because the
//! permits are consumed (as a check of that cost) before the caller may
//! use them, the sum of outstanding leases never exceeds what remained at
//! grant time, and callers that admit only within their leases never make
//! the total admitted exceed the limit: no overshoot, only undershoot while
//! leased permits sit unused. Unused permits come back on the next sync as
//! a refund, of at most what the server leased that caller (see
//! `super::leases`). A lease is at most `ceil(remaining / replicas)` so
//! that every replica can get a share, and at most what the caller wants.
//!
//! Each sync is a few batched storage calls, none per entry: refund the
//! unused permits, read what remains (a check of cost 0), take the leases
//! (each entry independently: the batch is checked with every item in
//! shadow mode, so one exhausted key does not block another), and retry
//! entries that lost a race with the remaining they were told.

use sluice_core::algorithm::{AlgorithmKind, Outcome};
use sluice_core::time::Span;

use crate::limits::Limit;
use crate::storage::{Item, StorageError, Store};

/// Longest a lease is valid: short, so that a replica that stops leaves
/// its permits unused only briefly, and time-based algorithms see permits
/// used close to when they were counted.
pub const LEASE_TIME: Span = Span::SECOND;

/// Grant rounds per sync: a grant loses a race only to another replica
/// taking the same budget at the same moment.
const ROUNDS: usize = 3;

/// One entry of a sync, resolved to its limit.
#[derive(Clone, Debug)]
pub struct Entry<'a> {
    /// The rule.
    pub limit: &'a Limit,
    /// The caller's key.
    pub key: String,
    /// Permits of the previous lease not used: given back first.
    pub unused: u64,
    /// Permits wanted for the next period.
    pub want: u64,
}

/// A lease granted for one entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grant {
    /// Permits the caller may admit locally.
    pub permits: u64,
    /// How long they may be used.
    pub expires_after: Span,
    /// The global budget left once they were taken.
    pub remaining: u64,
    /// Time until the budget is fully restored.
    pub reset_after: Span,
}

impl Grant {
    /// No lease, with what the budget has left and when it is whole again.
    pub fn none(remaining: u64, reset_after: Span) -> Grant {
        Grant {
            permits: 0,
            expires_after: Span::ZERO,
            remaining,
            reset_after,
        }
    }
}

/// Returns unused permits and grants new leases, one per entry in order.
/// `replicas` (at least 1) is how many callers share each budget.
pub async fn sync(
    store: &Store,
    entries: &[Entry<'_>],
    replicas: u64,
) -> Result<Vec<Grant>, StorageError> {
    let returned: Vec<Item<'_>> = entries
        .iter()
        .filter(|e| e.unused > 0)
        .map(|e| item(e, e.unused))
        .collect();
    if !returned.is_empty() {
        store.refund(&returned, None).await?;
    }
    let probe: Vec<Item<'_>> = entries.iter().map(|e| item(e, 0)).collect();
    let (mut remaining, mut reset_after): (Vec<u64>, Vec<Span>) = store
        .check(&probe, None)
        .await?
        .iter()
        .map(|o| (o.remaining, o.reset_after))
        .unzip();
    let mut grants: Vec<Option<Grant>> = vec![None; entries.len()];
    for _ in 0..ROUNDS {
        let asks: Vec<(usize, u64)> = (0..entries.len())
            .filter(|&i| grants[i].is_none())
            .map(|i| (i, share(entries[i].want, remaining[i], replicas)))
            .collect();
        let (zero, positive): (Vec<_>, Vec<_>) = asks.into_iter().partition(|(_, n)| *n == 0);
        for (i, _) in zero {
            grants[i] = Some(Grant::none(remaining[i], reset_after[i]));
        }
        if positive.is_empty() {
            break;
        }
        let items: Vec<Item<'_>> = positive
            .iter()
            .map(|&(i, n)| item(&entries[i], n))
            .collect();
        let outcomes = store.check(&items, None).await?;
        for (&(i, n), o) in positive.iter().zip(&outcomes) {
            remaining[i] = o.remaining;
            reset_after[i] = o.reset_after;
            if o.allowed {
                grants[i] = Some(Grant {
                    permits: n,
                    expires_after: expiry(entries[i].limit, o),
                    remaining: o.remaining,
                    reset_after: o.reset_after,
                });
            }
        }
    }
    Ok(grants
        .into_iter()
        .zip(remaining.into_iter().zip(reset_after))
        .map(|(g, (remaining, reset))| g.unwrap_or(Grant::none(remaining, reset)))
        .collect())
}

/// The storage key of a caller's key under a rule (shared by `Check` and
/// `Sync`, so both count on one counter): written as a one-entry
/// descriptor, so it cannot collide with any descriptor's key.
pub fn storage_key(limit: &Limit, key: &str) -> String {
    limit.storage_key(&[("key", key)])
}

/// A storage item for an entry; in shadow mode, so that in a batch each
/// entry is granted or refused on its own.
fn item<'a>(e: &Entry<'a>, cost: u64) -> Item<'a> {
    Item {
        limit: e.limit,
        key: storage_key(e.limit, &e.key),
        cost,
        enforce: false,
    }
}

/// `min(want, ceil(remaining / replicas))`: the rounding up lets the last
/// permits be leased; it cannot overshoot, since a lease is consumed before
/// it is granted and a grant larger than what remains is refused.
fn share(want: u64, remaining: u64, replicas: u64) -> u64 {
    want.min(remaining.div_ceil(replicas.max(1)))
}

/// A lease lasts [`LEASE_TIME`], never past the window for a fixed window
/// (its permits were counted in that window), nor past the rule's window.
fn expiry(limit: &Limit, outcome: &Outcome) -> Span {
    let mut until = LEASE_TIME.min(limit.quota().per());
    if limit.algorithm() == AlgorithmKind::FixedWindow {
        until = until.min(outcome.reset_after);
    }
    until
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_round_up_and_respect_the_want() {
        assert_eq!(share(10, 9, 3), 3);
        assert_eq!(share(10, 1, 3), 1);
        assert_eq!(share(2, 100, 3), 2);
        assert_eq!(share(10, 0, 3), 0);
        assert_eq!(share(10, 7, 0), 7);
    }
}
