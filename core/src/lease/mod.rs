//! Leased sync mode: each Envoy admits a synced rule's requests locally
//! from permits leased from the quota server (`sluice.quota.v1.Quota/Sync`)
//! per (rule, key), and one place per Envoy (a singleton service) syncs in
//! the background: it gives back what a lease left unused and takes a new
//! one.
//!
//! A lease's permits are taken from the global budget before they are
//! granted, and a worker admits only within a lease before its expiry, so
//! the fleet never admits more than the limit. The price is undershoot:
//! permits leased and not (yet) used are unavailable to other Envoys.
//!
//! - [`cell`]: the shared-data value per (rule, key) that workers consume
//!   from and the service retires and refills, by compare-and-swap.
//! - [`want`]: how many permits to ask for, from recent use.
//! - [`demand`]: the message a worker sends the service for a key without
//!   a usable lease.
//!
//! # Worst-case undershoot
//!
//! With `N` Envoys sharing the budget, a lease bound `L` (`max_lease`) and
//! a sync interval `I`, each Envoy holds at most two leases per key (its
//! two cells, renewed alternately every `I`), so at any moment at most
//! [`worst_case_undershoot`] `= 2 × N × L` permits of a key are taken from
//! the budget without being admitted yet. They come back within `2 × I`
//! (the next sync of their cell) while the quota server answers. When it
//! does not, they serve until their cell's next sync attempt or their
//! expiry (at most [`LEASE_TIME`], never past a fixed window's end),
//! whichever is first, and their unused part is lost for the window. So per window the fleet admits
//! at least `limit − 2 × N × L` while every Envoy has demand for the key.
//! With the adaptive want ([`want::want`]), a lease is about one and a half
//! intervals of its Envoy's recent rate `r`, so the undershoot is typically
//! `N × 3 × r × I`, bounded by `2 × N × L`.

pub mod cell;
pub mod demand;
pub mod want;

use alloc::string::String;
use core::fmt::Write;

use siphasher::sip::SipHasher13;

use crate::store::Seed;
use crate::time::Span;

pub use cell::{Cell, Grant, Half, Retired, Take, Taken};
pub use want::{want, Usage};

/// The longest lease the quota server grants (its `LEASE_TIME`): a lease
/// held when the quota server becomes unreachable is used at most this
/// long.
pub const LEASE_TIME: Span = Span::SECOND;

/// Consecutive cells a key may live in after its hashed home cell.
pub const PROBES: u32 = 4;

/// Bytes one cell takes in Envoy's shared data: the value
/// ([`cell::VALUE_BYTES`]), its name (`sluice/lease/`, a rule name of up
/// to 64 characters, `/` and an index) and the host's entry (about 100).
pub const CELL_BYTES: u64 = 300;

/// The shared queue the sync service registers: workers send it the keys
/// that have no usable lease ([`demand`]).
pub const DEMAND_QUEUE: &str = "sluice/lease/demand";

/// The shared-data name of cell `index` of `rule`:
/// `sluice/lease/<rule>/<index>`.
pub fn cell_name(out: &mut String, rule: &str, index: u32) {
    out.clear();
    let _ = write!(out, "sluice/lease/{rule}/{index}");
}

/// Who a cell belongs to: a keyed hash of rule and key, never 0 (0 marks
/// a free cell). Keyed with the shared secret seed so that clients cannot
/// aim keys at one another's cells.
pub fn fingerprint(seed: &Seed, rule: &str, key: &str) -> u64 {
    let mut hasher = SipHasher13::new_with_key(seed);
    core::hash::Hasher::write(&mut hasher, &(rule.len() as u64).to_le_bytes());
    core::hash::Hasher::write(&mut hasher, rule.as_bytes());
    core::hash::Hasher::write(&mut hasher, key.as_bytes());
    core::hash::Hasher::finish(&hasher).max(1)
}

/// The cells a key with `fingerprint` may live in, of a rule with `cells`
/// cells: its home and the next ones, [`PROBES`] at most.
pub fn probe(fingerprint: u64, cells: u32) -> impl Iterator<Item = u32> {
    let cells = cells.max(1);
    let home = fingerprint % u64::from(cells);
    (0..u64::from(PROBES.min(cells)))
        .map(move |p| u32::try_from(home.wrapping_add(p) % u64::from(cells)).unwrap_or(0))
}

/// The most permits of one key that the fleet may hold leased without
/// admitting them: two leases of at most `max_lease` per Envoy.
pub fn worst_case_undershoot(envoys: u64, max_lease: u64) -> u64 {
    envoys.saturating_mul(max_lease).saturating_mul(2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    #[test]
    fn probes_wrap_and_stay_in_range() {
        let cells: Vec<u32> = probe(10, 12).collect();
        assert_eq!(cells, [10, 11, 0, 1]);
        let cells: Vec<u32> = probe(7, 2).collect();
        assert_eq!(cells, [1, 0]);
    }

    #[test]
    fn fingerprints_depend_on_seed_rule_and_key_and_are_never_zero() {
        let seed = [1u8; 16];
        let a = fingerprint(&seed, "r", "k");
        assert_ne!(a, 0);
        assert_ne!(a, fingerprint(&[2u8; 16], "r", "k"));
        assert_ne!(a, fingerprint(&seed, "rk", ""));
        assert_ne!(a, fingerprint(&seed, "r", "k2"));
    }

    #[test]
    fn names_and_undershoot() {
        let mut name = String::from("junk");
        cell_name(&mut name, "api", 7);
        assert_eq!(name, "sluice/lease/api/7");
        assert_eq!(worst_case_undershoot(3, 50), 300);
    }
}
