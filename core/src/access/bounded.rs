//! A bounded collection of entries that may expire, one per target.

use alloc::vec::Vec;

use crate::time::Nanos;

/// An entry with a target (its identity) and an optional expiry.
pub trait Expiring {
    /// What identifies the entry: adding one with the same target replaces it.
    type Target: PartialEq + ?Sized;

    /// The identity.
    fn target(&self) -> &Self::Target;

    /// When it stops applying; `None` never.
    fn until(&self) -> Option<Nanos>;

    /// Whether it still applies at `now`.
    fn live(&self, now: Nanos) -> bool {
        self.until().is_none_or(|u| now < u)
    }
}

/// A collection is full: remove entries or wait for some to expire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("full: at most {max} entries; remove some or let them expire first")]
pub struct Full {
    /// The bound.
    pub max: usize,
}

/// At most `max` entries, distinct by target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Bounded<T> {
    entries: Vec<T>,
    max: usize,
}

impl<T: Expiring> Bounded<T> {
    pub(crate) fn new(max: usize) -> Bounded<T> {
        Bounded {
            entries: Vec::new(),
            max,
        }
    }

    /// Exactly `entries`, and no room for more. Two entries of one target
    /// are not merged: lookups find either.
    pub(crate) fn fixed(entries: Vec<T>) -> Bounded<T> {
        Bounded {
            max: entries.len(),
            entries,
        }
    }

    /// Adds or replaces `entry`; expired entries make room first.
    pub(crate) fn put(&mut self, entry: T, now: Nanos) -> Result<Option<T>, Full> {
        if let Some(i) = self.position(entry.target()) {
            return Ok(Some(core::mem::replace(&mut self.entries[i], entry)));
        }
        if self.entries.len() >= self.max {
            self.purge(now);
            if self.entries.len() >= self.max {
                return Err(Full { max: self.max });
            }
        }
        self.entries.push(entry);
        Ok(None)
    }

    /// Whether there are no entries, live or expired.
    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Removes the entry for `target`, live or not.
    pub(crate) fn remove(&mut self, target: &T::Target) -> Option<T> {
        self.position(target).map(|i| self.entries.swap_remove(i))
    }

    /// Drops expired entries.
    pub(crate) fn purge(&mut self, now: Nanos) {
        self.entries.retain(|e| e.live(now));
    }

    /// The entries still applying at `now`.
    pub(crate) fn live(&self, now: Nanos) -> impl Iterator<Item = &T> {
        self.entries.iter().filter(move |e| e.live(now))
    }

    fn position(&self, target: &T::Target) -> Option<usize> {
        self.entries.iter().position(|e| e.target() == target)
    }
}
