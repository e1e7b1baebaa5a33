//! Maps keyed by ids the host hands out (context ids, call tokens).
//!
//! The standard map hashes with SipHash, a defence against keys chosen to
//! collide; these ids are Envoy's counters, which no client chooses, and
//! the request map is touched several times per request. One multiply
//! spreads them instead.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A map from host-assigned ids.
pub(crate) type ById<V> = HashMap<u32, V, BuildHasherDefault<IdHasher>>;

/// Fibonacci hashing: an odd multiplier near 2^64 / φ spreads consecutive
/// ids over the high bits (the map's tags) and, being a bijection, keeps
/// them apart in the low bits (its buckets).
const SPREAD: u64 = 0x9E37_79B9_7F4A_7C15;

/// The hasher of [`ById`].
#[derive(Default)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write_u32(&mut self, id: u32) {
        self.0 = u64::from(id).wrapping_mul(SPREAD);
    }

    /// Not used by `u32` keys; any other bytes still hash, byte by byte.
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(SPREAD);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::hash::BuildHasher;

    #[test]
    fn consecutive_ids_land_apart() {
        let build = BuildHasherDefault::<IdHasher>::default();
        let tags: HashSet<u64> = (1..=128u32).map(|id| build.hash_one(id) >> 57).collect();
        assert!(tags.len() >= 100, "high 7 bits spread: {}", tags.len());
        let buckets: HashSet<u64> = (1..=64u32).map(|id| build.hash_one(id) & 63).collect();
        assert_eq!(buckets.len(), 64, "low bits keep ids apart");
    }

    #[test]
    fn a_map_by_id_finds_what_it_holds() {
        let mut map = ById::default();
        for id in 0..1000u32 {
            map.insert(id, id.wrapping_mul(3));
        }
        assert!((0..1000u32).all(|id| map.get(&id) == Some(&id.wrapping_mul(3))));
        assert_eq!(map.remove(&7), Some(21));
        assert_eq!(map.get(&7), None);
    }
}
