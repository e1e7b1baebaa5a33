//! The leases `Sync` granted, per caller, so that a refund gives back at
//! most what the server leased that caller and has not had back: a caller
//! cannot refill a key by claiming a lease it never held.
//!
//! A lease is identified by the SHA-256 of (caller, domain, rule, key), so
//! an entry's size does not depend on what the caller sends. The ledger
//! holds at most [`MAX_LEASES`]; beyond that (after dropping expired ones)
//! a lease is granted but not recorded, and its unused permits do not come
//! back: the error is on the strict side.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ring::digest::{Context, SHA256};

/// Most leases recorded at once (about 80 bytes each).
pub const MAX_LEASES: usize = 1 << 18;

/// How long after its expiry a lease's unused permits may still be given
/// back: a caller syncing once per lease time arrives a little late.
pub const REFUND_GRACE: Duration = Duration::from_secs(1);

/// Which lease: a digest of caller, domain, rule and key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LeaseId([u8; 32]);

impl LeaseId {
    /// The lease `caller` holds on `key` under `rule` of `domain`.
    pub fn new(caller: &str, domain: &str, rule: &str, key: &str) -> LeaseId {
        let mut digest = Context::new(&SHA256);
        for part in [caller, domain, rule, key] {
            // Lengths first, so that no split of the text collides.
            digest.update(&(part.len() as u64).to_le_bytes());
            digest.update(part.as_bytes());
        }
        let mut id = [0u8; 32];
        id.copy_from_slice(digest.finish().as_ref());
        LeaseId(id)
    }
}

/// A recorded lease: permits granted, refundable until then.
#[derive(Clone, Copy, Debug)]
struct Granted {
    permits: u64,
    until: Instant,
}

#[derive(Debug)]
struct Ledger {
    granted: HashMap<LeaseId, Granted>,
    /// When expired leases were last dropped: at most once per grace, so a
    /// full ledger does not cost a sweep per call.
    swept: Instant,
}

/// The leases granted and not yet given back or expired.
#[derive(Debug)]
pub struct Leases {
    ledger: Mutex<Ledger>,
}

impl Default for Leases {
    fn default() -> Leases {
        Leases {
            ledger: Mutex::new(Ledger {
                granted: HashMap::new(),
                swept: Instant::now(),
            }),
        }
    }
}

impl Leases {
    fn with<T>(&self, f: impl FnOnce(&mut Ledger) -> T) -> T {
        // Every operation is one insert or remove: a panic elsewhere cannot
        // leave the map half-changed, so a poisoned lock is still usable.
        let mut ledger = self.ledger.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut ledger)
    }

    /// Takes lease `id` out of the ledger: the permits it may still give
    /// back at `now` (0 if there is none or it is past its grace).
    pub fn take(&self, id: &LeaseId, now: Instant) -> u64 {
        self.with(|ledger| match ledger.granted.remove(id) {
            Some(g) if now <= g.until => g.permits,
            _ => 0,
        })
    }

    /// Records a grant of `permits` on lease `id`, refundable until `until`.
    pub fn record(&self, id: LeaseId, permits: u64, until: Instant, now: Instant) {
        self.with(|ledger| {
            if ledger.granted.len() >= MAX_LEASES && now >= ledger.swept + REFUND_GRACE {
                ledger.granted.retain(|_, g| now <= g.until);
                ledger.swept = now;
            }
            if ledger.granted.len() < MAX_LEASES {
                ledger.granted.insert(id, Granted { permits, until });
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_given_back_once_and_only_to_its_caller() {
        let leases = Leases::default();
        let now = Instant::now();
        let mine = LeaseId::new("a", "api", "r", "k");
        leases.record(mine, 4, now + Duration::from_secs(2), now);
        assert_eq!(leases.take(&LeaseId::new("b", "api", "r", "k"), now), 0);
        assert_eq!(leases.take(&mine, now), 4);
        assert_eq!(leases.take(&mine, now), 0, "taken once");
    }

    #[test]
    fn an_expired_lease_gives_nothing_back() {
        let leases = Leases::default();
        let now = Instant::now();
        let id = LeaseId::new("a", "api", "r", "k");
        leases.record(id, 4, now + Duration::from_secs(1), now);
        assert_eq!(leases.take(&id, now + Duration::from_secs(2)), 0);
    }

    #[test]
    fn ids_do_not_collide_across_field_boundaries() {
        assert_ne!(
            LeaseId::new("ab", "c", "r", "k"),
            LeaseId::new("a", "bc", "r", "k")
        );
    }
}
