//! One key's leases in Envoy's shared data: a cell per (rule, key) with
//! two halves, each a lease the worker VMs consume from by
//! compare-and-swap.
//!
//! The two halves are double buffering. Each sync, the service retires one
//! half (closes it: no permit can be taken from it any more, so its used
//! count is final and exact), reports what it held and used to the quota
//! server, and writes the new lease into it when the answer arrives; the
//! other half keeps serving meanwhile, so a busy key never waits for a
//! sync. Workers take from the open, unexpired half with room that expires
//! first.
//!
//! One value holds both halves, so a worker reads a key's leases with one
//! host call and every change is one compare-and-swap of the whole cell.
//! Only the service (a single VM) creates cells and assigns them to keys;
//! workers never create a name, so the host's non-atomic creation never
//! races. Shared data has no delete: cells are reused (see
//! [`super::probe`]), so their number is bounded by the rules' `max_keys`.

use alloc::string::String;
use alloc::vec::Vec;

use crate::store::{SharedBytes, StoreError, WriteOutcome};
use crate::time::{Nanos, Span};

/// Value layout version (first byte).
const FORMAT: u8 = 1;
/// Bytes of one half: generation (4), open (1), granted, used, expiry (8 each).
const HALF_BYTES: usize = 29;
/// Bytes of a cell's value: format, seven u64 fields, two halves.
pub const VALUE_BYTES: usize = 1 + 7 * 8 + 2 * HALF_BYTES;
/// Compare-and-swap attempts before giving up (a worker then treats the
/// key as having no lease; the service tries again at its next sync).
const TRIES: usize = 32;

/// One lease of a cell.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Half {
    /// Counts the leases this half held; a give-back names it, so that a
    /// permit is never returned into a later lease.
    pub generation: u32,
    /// Permits may be taken (closed once retired, until refilled).
    pub open: bool,
    /// Permits leased.
    pub granted: u64,
    /// Permits taken from the lease (never more than `granted`).
    pub used: u64,
    /// No permit is taken at or after this time.
    pub expires_at: Nanos,
}

impl Half {
    /// Permits that may be taken at `now`.
    pub fn room(&self, now: Nanos) -> u64 {
        if self.open && now < self.expires_at {
            self.granted.saturating_sub(self.used)
        } else {
            0
        }
    }
}

/// A key's two leases and what the last sync said about its budget.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cell {
    /// The key's fingerprint ([`super::fingerprint`]); 0: free.
    pub owner: u64,
    /// Permits taken from either half since the cell was assigned
    /// (wrapping): the service's measure of the key's rate.
    pub admitted: u64,
    /// Requests that found no room since the last retire (they asked the
    /// quota server or were refused): demand the leases did not cover.
    pub missed: u64,
    /// The global budget left as of the last sync.
    pub remaining: u64,
    /// The rule's limit and window, for headers.
    pub limit: u64,
    /// See `limit`.
    pub window: Span,
    /// When the global budget is whole again, as of the last sync.
    pub reset_at: Nanos,
    /// The two leases.
    pub halves: [Half; 2],
}

/// A permit taken from a half, to give back if the request is refused
/// after all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Taken {
    /// Which half.
    pub half: usize,
    /// Its lease at the time.
    pub generation: u32,
    /// Permits taken.
    pub cost: u64,
}

/// What a request found in its key's cell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Take {
    /// Admitted from a lease.
    Taken(Taken),
    /// No lease has room, and the last sync found the budget exhausted
    /// until `retry_at`: refuse without asking.
    Exhausted {
        /// When the budget is whole again.
        retry_at: Nanos,
    },
    /// No lease has room: ask the quota server, and wake the service.
    Empty,
}

/// A new lease from the quota server.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Grant {
    /// Permits leased (0: none).
    pub permits: u64,
    /// When the lease ends.
    pub expires_at: Nanos,
    /// The global budget left.
    pub remaining: u64,
    /// The rule's limit.
    pub limit: u64,
    /// The rule's window.
    pub window: Span,
    /// When the budget is whole again.
    pub reset_at: Nanos,
}

/// A half just retired: its final counts, and the cell's demand counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Retired {
    /// The lease the half held (0 if none).
    pub held: u64,
    /// How much of it was taken (at most `held`).
    pub used: u64,
    /// The cell's `admitted` counter.
    pub admitted: u64,
    /// Requests that found no room since the previous retire.
    pub missed: u64,
}

impl Cell {
    /// An empty cell for `owner`, whose halves' generations continue
    /// `previous`'s (so no give-back of an older owner lands in it).
    pub fn fresh(owner: u64, previous: Option<&Cell>) -> Cell {
        let mut cell = Cell {
            owner,
            ..Cell::default()
        };
        if let Some(p) = previous {
            for (half, old) in cell.halves.iter_mut().zip(&p.halves) {
                half.generation = old.generation.wrapping_add(1);
            }
        }
        cell
    }

    /// Permits that may be taken at `now`, both halves together.
    pub fn room(&self, now: Nanos) -> u64 {
        self.halves
            .iter()
            .map(|h| h.room(now))
            .fold(0, u64::saturating_add)
    }

    /// Whether the key is about to run dry at `now`: at most one half has
    /// room, and less than half of its grant. A worker then wakes the
    /// service, which refills the other half while this one still serves,
    /// so that a hot key is not left without a lease during the round trip.
    pub fn runs_low(&self, now: Nanos) -> bool {
        let mut serving = self.halves.iter().filter(|h| h.room(now) > 0);
        match (serving.next(), serving.next()) {
            (None, _) => true,
            (Some(h), None) => h.room(now).saturating_mul(2) < h.granted,
            (Some(_), Some(_)) => false,
        }
    }

    /// The half a sync asked for by a worker should refill: `preferred`
    /// (the one the service's rotation is at) unless it has more room than
    /// the other, so that the fuller half keeps serving meanwhile.
    pub fn emptier_half(&self, preferred: usize, now: Nanos) -> usize {
        let other = 1usize.saturating_sub(preferred);
        let room = |i: usize| self.halves.get(i).map_or(0, |h| h.room(now));
        if room(preferred) > room(other) {
            other
        } else {
            preferred
        }
    }

    /// Takes `cost` permits at `now` from the half with room that expires
    /// first; without room, counts a miss.
    pub fn take(&mut self, cost: u64, now: Nanos) -> Take {
        let best = self
            .halves
            .iter()
            .enumerate()
            .filter(|(_, h)| h.room(now) >= cost)
            .min_by_key(|(_, h)| h.expires_at)
            .map(|(i, _)| i);
        if let Some(half) = best.and_then(|i| self.halves.get_mut(i).map(|h| (i, h))) {
            let (index, h) = half;
            h.used = h.used.saturating_add(cost);
            self.admitted = self.admitted.wrapping_add(cost);
            return Take::Taken(Taken {
                half: index,
                generation: h.generation,
                cost,
            });
        }
        self.missed = self.missed.saturating_add(1);
        if self.remaining == 0 && now < self.reset_at {
            Take::Exhausted {
                retry_at: self.reset_at,
            }
        } else {
            Take::Empty
        }
    }

    /// Gives back permits of `taken` if its lease still serves: once the
    /// half is retired its count is final and they stay used.
    pub fn give_back(&mut self, taken: &Taken) -> bool {
        match self.halves.get_mut(taken.half) {
            Some(h) if h.open && h.generation == taken.generation && h.used >= taken.cost => {
                h.used = h.used.saturating_sub(taken.cost);
                self.admitted = self.admitted.wrapping_sub(taken.cost);
                true
            }
            _ => false,
        }
    }

    /// Closes `half` and reads its final counts (and resets the misses).
    pub fn retire(&mut self, half: usize) -> Retired {
        let missed = core::mem::take(&mut self.missed);
        let admitted = self.admitted;
        match self.halves.get_mut(half) {
            Some(h) => {
                h.open = false;
                Retired {
                    held: h.granted,
                    used: h.used.min(h.granted),
                    admitted,
                    missed,
                }
            }
            None => Retired {
                admitted,
                missed,
                ..Retired::default()
            },
        }
    }

    /// Writes a new lease into `half` (retired before), and the budget's
    /// state.
    pub fn install(&mut self, half: usize, grant: &Grant) {
        if let Some(h) = self.halves.get_mut(half) {
            *h = Half {
                generation: h.generation.wrapping_add(1),
                open: grant.permits > 0,
                granted: grant.permits,
                used: 0,
                expires_at: grant.expires_at,
            };
        }
        self.remaining = grant.remaining;
        self.limit = grant.limit;
        self.window = grant.window;
        self.reset_at = grant.reset_at;
    }

    /// Empties `half` after a sync that got no answer: whatever it held is
    /// not reported again (the quota server may have taken it back).
    pub fn clear(&mut self, half: usize) {
        if let Some(h) = self.halves.get_mut(half) {
            *h = Half {
                generation: h.generation.wrapping_add(1),
                ..Half::default()
            };
        }
    }

    /// The value as stored.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.clear();
        out.push(FORMAT);
        for v in [
            self.owner,
            self.admitted,
            self.missed,
            self.remaining,
            self.limit,
            self.window.as_nanos(),
            self.reset_at.get(),
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for h in &self.halves {
            out.extend_from_slice(&h.generation.to_le_bytes());
            out.push(u8::from(h.open));
            for v in [h.granted, h.used, h.expires_at.get()] {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
    }

    /// A stored value; `None` if it is not a cell of this format.
    pub fn decode(bytes: &[u8]) -> Option<Cell> {
        let (&format, mut rest) = bytes.split_first()?;
        if format != FORMAT || bytes.len() != VALUE_BYTES {
            return None;
        }
        let mut u64_at = || -> Option<u64> {
            let (v, r) = rest.split_first_chunk::<8>()?;
            rest = r;
            Some(u64::from_le_bytes(*v))
        };
        let mut cell = Cell {
            owner: u64_at()?,
            admitted: u64_at()?,
            missed: u64_at()?,
            remaining: u64_at()?,
            limit: u64_at()?,
            window: Span(u64_at()?),
            reset_at: Nanos(u64_at()?),
            halves: [Half::default(); 2],
        };
        for h in &mut cell.halves {
            let (generation, r) = rest.split_first_chunk::<4>()?;
            let (&open, r) = r.split_first()?;
            let (granted, r) = r.split_first_chunk::<8>()?;
            let (used, r) = r.split_first_chunk::<8>()?;
            let (expires_at, r) = r.split_first_chunk::<8>()?;
            rest = r;
            *h = Half {
                generation: u32::from_le_bytes(*generation),
                open: open == 1,
                granted: u64::from_le_bytes(*granted),
                used: u64::from_le_bytes(*used),
                expires_at: Nanos(u64::from_le_bytes(*expires_at)),
            };
        }
        Some(cell)
    }
}

/// The cell at `name` and its token; `None` if the name is missing or not
/// a cell.
pub fn load<B: SharedBytes>(backend: &B, name: &str) -> Result<Option<(Cell, u32)>, StoreError> {
    let (value, cas) = backend.get(name)?;
    Ok(value.and_then(|v| Cell::decode(&v)).map(|c| (c, cas)))
}

/// Applies `change` to the cell at `name` owned by `owner` and writes it
/// back by compare-and-swap, starting from `first` (a value just read) if
/// given; `change` says whether to write. `None` when the cell is not
/// (any more) `owner`'s, or every attempt lost a race.
pub fn update<B: SharedBytes, T>(
    backend: &mut B,
    name: &str,
    owner: u64,
    mut first: Option<(Cell, u32)>,
    mut change: impl FnMut(&mut Cell) -> (T, bool),
) -> Result<Option<T>, StoreError> {
    let mut bytes = Vec::with_capacity(VALUE_BYTES);
    for _ in 0..TRIES {
        let Some((mut cell, cas)) = first
            .take()
            .map_or_else(|| load(backend, name), |c| Ok(Some(c)))?
        else {
            return Ok(None);
        };
        if cell.owner != owner {
            return Ok(None);
        }
        let (result, write) = change(&mut cell);
        if !write {
            return Ok(Some(result));
        }
        cell.encode(&mut bytes);
        if backend.set(name, &bytes, cas)? == WriteOutcome::Written {
            return Ok(Some(result));
        }
    }
    Ok(None)
}

/// A worker's take of `cost` permits for the key with fingerprint `owner`
/// of `rule` (`cells` cells), probing its cells: the cell's index, the
/// outcome and the cell as written; `None` when no cell is the key's (no
/// lease yet) or the cell changed under every attempt.
pub fn take<B: SharedBytes>(
    backend: &mut B,
    name: &mut String,
    rule: &str,
    cells: u32,
    owner: u64,
    cost: u64,
    now: Nanos,
) -> Result<Option<(u32, Take, Cell)>, StoreError> {
    for index in super::probe(owner, cells) {
        super::cell_name(name, rule, index);
        let Some((cell, cas)) = load(backend, name)? else {
            continue;
        };
        if cell.owner != owner {
            continue;
        }
        return Ok(update(backend, name, owner, Some((cell, cas)), |c| {
            ((c.take(cost, now), *c), true)
        })?
        .map(|(take, cell)| (index, take, cell)));
    }
    Ok(None)
}

/// Gives back `taken` (from cell `name` of key `owner`), if its lease
/// still serves.
pub fn give_back<B: SharedBytes>(
    backend: &mut B,
    name: &str,
    owner: u64,
    taken: &Taken,
) -> Result<bool, StoreError> {
    Ok(update(backend, name, owner, None, |c| {
        let given = c.give_back(taken);
        (given, given)
    })?
    .unwrap_or(false))
}

/// The service assigns cell `name` to the key `owner`: creates it, keeps
/// it if it is already the key's, or takes it over (any lease of another
/// key left in it is dropped: it expires unused).
pub fn claim<B: SharedBytes>(backend: &mut B, name: &str, owner: u64) -> Result<bool, StoreError> {
    let mut bytes = Vec::with_capacity(VALUE_BYTES);
    for _ in 0..TRIES {
        let (value, cas) = backend.get(name)?;
        let previous = value.as_deref().and_then(Cell::decode);
        if previous.is_some_and(|p| p.owner == owner) {
            return Ok(true);
        }
        Cell::fresh(owner, previous.as_ref()).encode(&mut bytes);
        // A missing name is created unconditionally: only the service
        // creates cells, so no one else can be creating it.
        let cas = if value.is_some() { cas } else { 0 };
        if backend.set(name, &bytes, cas)? == WriteOutcome::Written {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The service retires `half` of `owner`'s cell `name`.
pub fn retire<B: SharedBytes>(
    backend: &mut B,
    name: &str,
    owner: u64,
    half: usize,
) -> Result<Option<(Retired, Cell)>, StoreError> {
    update(backend, name, owner, None, |c| ((c.retire(half), *c), true))
}

/// The service writes `grant` into `half` of `owner`'s cell `name`.
pub fn install<B: SharedBytes>(
    backend: &mut B,
    name: &str,
    owner: u64,
    half: usize,
    grant: &Grant,
) -> Result<bool, StoreError> {
    Ok(update(backend, name, owner, None, |c| {
        c.install(half, grant);
        ((), true)
    })?
    .is_some())
}

/// The service empties `half` of `owner`'s cell `name` after a failed sync.
pub fn clear<B: SharedBytes>(
    backend: &mut B,
    name: &str,
    owner: u64,
    half: usize,
) -> Result<bool, StoreError> {
    Ok(update(backend, name, owner, None, |c| {
        c.clear(half);
        ((), true)
    })?
    .is_some())
}

/// The service frees `owner`'s cell `name` (both halves retired and
/// empty): no key owns it until it is claimed again.
pub fn release<B: SharedBytes>(backend: &mut B, name: &str, owner: u64) -> Result<(), StoreError> {
    update(backend, name, owner, None, |c| {
        *c = Cell::fresh(0, Some(c));
        ((), true)
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::InProcessShared;

    const NOW: Nanos = Nanos(1_000);

    fn grant(permits: u64) -> Grant {
        Grant {
            permits,
            expires_at: Nanos(2_000),
            remaining: 50,
            limit: 100,
            window: Span::SECOND,
            reset_at: Nanos(5_000),
        }
    }

    #[test]
    fn encoding_round_trips_and_refuses_other_values() {
        let mut cell = Cell::fresh(7, None);
        cell.install(1, &grant(3));
        cell.take(2, NOW);
        let mut bytes = Vec::new();
        cell.encode(&mut bytes);
        assert_eq!(bytes.len(), VALUE_BYTES);
        assert_eq!(Cell::decode(&bytes), Some(cell));
        assert_eq!(Cell::decode(&bytes[..VALUE_BYTES - 1]), None);
        assert_eq!(Cell::decode(&[]), None);
        bytes[0] = 9;
        assert_eq!(Cell::decode(&bytes), None);
    }

    #[test]
    fn a_key_runs_low_when_one_half_serves_with_under_half_its_grant() {
        let mut cell = Cell::fresh(7, None);
        assert!(cell.runs_low(NOW), "no lease at all");
        cell.install(0, &grant(4));
        assert!(!cell.runs_low(NOW));
        cell.take(2, NOW);
        assert!(!cell.runs_low(NOW), "half its grant left");
        cell.take(1, NOW);
        assert!(cell.runs_low(NOW));
        cell.install(1, &grant(4));
        assert!(!cell.runs_low(NOW), "the other half serves next");
        assert!(cell.runs_low(Nanos(2_000)), "both expired");
    }

    #[test]
    fn a_worker_asked_sync_refills_the_emptier_half() {
        let mut cell = Cell::fresh(7, None);
        cell.install(0, &grant(4));
        assert_eq!(cell.emptier_half(0, NOW), 1);
        assert_eq!(cell.emptier_half(1, NOW), 1);
        cell.install(1, &grant(8));
        assert_eq!(cell.emptier_half(1, NOW), 0);
        assert_eq!(cell.emptier_half(0, NOW), 0);
    }

    #[test]
    fn takes_prefer_the_half_expiring_first_and_never_exceed_a_lease() {
        let mut cell = Cell::fresh(7, None);
        cell.install(0, &grant(2));
        cell.install(
            1,
            &Grant {
                expires_at: Nanos(1_500),
                ..grant(1)
            },
        );
        assert!(matches!(
            cell.take(1, NOW),
            Take::Taken(Taken { half: 1, .. })
        ));
        assert!(matches!(
            cell.take(1, NOW),
            Take::Taken(Taken { half: 0, .. })
        ));
        assert!(
            matches!(cell.take(2, NOW), Take::Empty),
            "one left, two asked"
        );
        assert!(matches!(
            cell.take(1, NOW),
            Take::Taken(Taken { half: 0, .. })
        ));
        assert_eq!(cell.take(1, NOW), Take::Empty);
        assert_eq!(cell.missed, 2);
        assert_eq!(cell.admitted, 3);
    }

    #[test]
    fn expired_and_retired_halves_serve_nothing() {
        let mut cell = Cell::fresh(7, None);
        cell.install(0, &grant(5));
        assert_eq!(cell.take(1, Nanos(2_000)), Take::Empty, "expired");
        let retired = cell.retire(0);
        assert_eq!((retired.held, retired.used, retired.missed), (5, 0, 1));
        assert_eq!(cell.take(1, NOW), Take::Empty, "retired");
    }

    #[test]
    fn an_exhausted_budget_refuses_until_it_resets() {
        let mut cell = Cell::fresh(7, None);
        cell.install(
            0,
            &Grant {
                remaining: 0,
                ..grant(0)
            },
        );
        assert_eq!(
            cell.take(1, NOW),
            Take::Exhausted {
                retry_at: Nanos(5_000)
            }
        );
        assert_eq!(cell.take(1, Nanos(5_000)), Take::Empty, "reset: ask again");
    }

    #[test]
    fn a_give_back_lands_only_in_the_lease_it_came_from() {
        let mut cell = Cell::fresh(7, None);
        cell.install(0, &grant(2));
        let Take::Taken(taken) = cell.take(1, NOW) else {
            panic!("no room");
        };
        assert!(cell.give_back(&taken));
        assert!(!cell.give_back(&taken), "nothing more to give back");
        let Take::Taken(taken) = cell.take(1, NOW) else {
            panic!("no room");
        };
        let retired = cell.retire(0);
        assert_eq!(retired.used, 1);
        assert!(!cell.give_back(&taken), "retired: the count is final");
        cell.install(0, &grant(2));
        assert!(!cell.give_back(&taken), "a later lease");
    }

    #[test]
    fn shared_cells_are_claimed_taken_from_and_released() {
        let shared = InProcessShared::default();
        let mut backend = &shared;
        let mut name = String::new();
        let owner = 5; // home cell 5 of 8
        assert_eq!(
            take(&mut backend, &mut name, "r", 8, owner, 1, NOW).unwrap(),
            None,
            "no cell yet"
        );
        super::super::cell_name(&mut name, "r", 6);
        assert!(claim(&mut backend, &name, owner).unwrap());
        assert!(install(&mut backend, &name, owner, 0, &grant(1)).unwrap());
        let (index, outcome, _) = take(&mut backend, &mut name, "r", 8, owner, 1, NOW)
            .unwrap()
            .unwrap();
        assert_eq!(index, 6, "found on the second probe");
        assert!(matches!(outcome, Take::Taken(_)));
        let (_, outcome, _) = take(&mut backend, &mut name, "r", 8, owner, 1, NOW)
            .unwrap()
            .unwrap();
        assert_eq!(outcome, Take::Empty);
        super::super::cell_name(&mut name, "r", 6);
        let (retired, _) = retire(&mut backend, &name, owner, 0).unwrap().unwrap();
        assert_eq!((retired.held, retired.used, retired.missed), (1, 1, 1));
        release(&mut backend, &name, owner).unwrap();
        assert_eq!(
            take(&mut backend, &mut name, "r", 8, owner, 1, NOW).unwrap(),
            None,
            "released"
        );
        // Another key takes the cell over; generations move on.
        super::super::cell_name(&mut name, "r", 6);
        assert!(claim(&mut backend, &name, 9).unwrap());
        let (cell, _) = load(&backend, &name).unwrap().unwrap();
        assert_eq!(cell.owner, 9);
        assert!(cell.halves[0].generation >= 2);
    }
}
