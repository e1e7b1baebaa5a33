//! State in a fixed table of named byte slots with compare-and-swap: the
//! shape of Envoy's shared data, which every worker's VM can see.
//!
//! Envoy's shared data can neither delete a name nor create one
//! atomically (a write to a missing name always succeeds), so each rule
//! gets a table of `max_keys` slots created up front by [`SlotStore::prepare`]
//! and reused forever: memory is bounded, and every later write is a
//! compare-and-swap. A key lives in one of [`PROBES`] slots after its hash;
//! a new key takes an empty slot, else one whose state is fresh, else the
//! least recently used one (a live eviction, counted).

use alloc::string::String;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};
use core::fmt::Write;

use hashbrown::HashMap;

use super::{Loaded, Saved, Slot, StateStore, StoreError};
use crate::algorithm::State;
use crate::policy::{Policy, Scope};
use crate::time::Nanos;

/// How many consecutive slots a key may live in.
pub const PROBES: u64 = 4;

/// Bytes shared between threads, with compare-and-swap (Envoy shared data).
pub trait SharedBytes {
    /// The bytes at `name` (`None` if the name was never written) and the
    /// token a conditional write must present.
    fn get(&self, name: &str) -> Result<(Option<Vec<u8>>, u32), StoreError>;
    /// Writes `value` if the name's token is still `cas` (0: unconditionally).
    fn set(&mut self, name: &str, value: &[u8], cas: u32) -> Result<WriteOutcome, StoreError>;
}

/// The result of a conditional write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteOutcome {
    /// The value was written.
    Written,
    /// Someone else wrote since the token was read.
    CasMismatch,
}

/// Where a load found (or chose) the key's slot.
#[derive(Clone, Copy, Debug)]
pub struct SlotVersion {
    index: u64,
    cas: u32,
    /// The slot holds another key whose state is still live.
    evicts_live: bool,
}

#[derive(Debug)]
struct Table {
    /// `sluice/<rule>/`: names stay the same across config reloads, so a
    /// reload reuses the table instead of leaking a new one. Counts still
    /// restart: the seed comes from the config, so a new config puts every
    /// key in different slots under a different stored key.
    prefix: String,
    slots: u64,
}

/// See the module doc.
#[derive(Debug)]
pub struct SlotStore<B> {
    backend: B,
    tables: Vec<Table>,
    seed: u64,
    name: String,
    value: Vec<u8>,
    live_evictions: u64,
}

/// Slot value layout: format byte, key length (u16 LE), key, last use (u64
/// LE), then the encoded state. An empty value is a free slot.
const FORMAT: u8 = 1;
/// Longer keys are stored as a hash of themselves, to keep slots small.
const MAX_STORED_KEY: usize = 256;

impl<B: SharedBytes> SlotStore<B> {
    /// A store for `policy`'s rules over `backend`. `seed` varies the key
    /// hash (use something clients cannot see, such as a hash of the
    /// config) so they cannot aim their keys at one another's slots.
    pub fn new(backend: B, policy: &Policy, seed: u64) -> SlotStore<B> {
        let tables = policy
            .rules
            .iter()
            .map(|rule| Table {
                prefix: alloc::format!("sluice/{}/", rule.name),
                slots: match rule.scope {
                    Scope::Global => 1,
                    Scope::PerKey => policy.max_keys.max(1) as u64,
                },
            })
            .collect();
        SlotStore {
            backend,
            tables,
            seed,
            name: String::new(),
            value: Vec::new(),
            live_evictions: 0,
        }
    }

    /// Creates every slot that does not exist yet. Call once per VM at
    /// configuration time, before traffic; a marker per table makes later
    /// calls (other workers, reloads) one read each.
    pub fn prepare(&mut self) -> Result<(), StoreError> {
        for t in 0..self.tables.len() {
            let slots = self.tables[t].slots;
            self.name.clear();
            let _ = write!(self.name, "{}ready/{slots}", self.tables[t].prefix);
            if self.backend.get(&self.name)?.0.is_some() {
                continue;
            }
            for index in 0..slots {
                self.set_name(t, index);
                if self.backend.get(&self.name)?.0.is_none() {
                    self.backend.set(&self.name, &[], 0)?;
                }
            }
            self.name.clear();
            let _ = write!(self.name, "{}ready/{slots}", self.tables[t].prefix);
            self.backend.set(&self.name, &[1], 0)?;
        }
        Ok(())
    }

    /// Keys that displaced a live key so far.
    pub fn live_evictions(&self) -> u64 {
        self.live_evictions
    }

    /// The backend, e.g. to inspect a test double.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    fn set_name(&mut self, table: usize, index: u64) {
        self.name.clear();
        if let Some(t) = self.tables.get(table) {
            let _ = write!(self.name, "{}{index}", t.prefix);
        }
    }

    fn home(&self, table: usize, key: &[u8]) -> (u64, u64) {
        let slots = self.tables.get(table).map_or(1, |t| t.slots);
        (hash(self.seed, key) % slots, slots)
    }
}

/// The key as stored: itself, or a hash of itself when long.
fn stored_key<'a>(key: &'a str, seed: u64, buf: &'a mut [u8; 16]) -> &'a [u8] {
    if key.len() <= MAX_STORED_KEY {
        return key.as_bytes();
    }
    buf[..8].copy_from_slice(&hash(seed, key.as_bytes()).to_le_bytes());
    buf[8..].copy_from_slice(&hash(!seed, key.as_bytes()).to_le_bytes());
    buf
}

/// A parsed slot value.
struct SlotValue<'a> {
    key: &'a [u8],
    last_used: Nanos,
    state: &'a [u8],
}

fn parse_value(bytes: &[u8]) -> Option<SlotValue<'_>> {
    let (&format, rest) = bytes.split_first()?;
    if format != FORMAT {
        return None;
    }
    let (len, rest) = rest.split_at_checked(2)?;
    let len = usize::from(u16::from_le_bytes([len[0], len[1]]));
    let (key, rest) = rest.split_at_checked(len)?;
    let (time, state) = rest.split_at_checked(8)?;
    let mut time_bytes = [0u8; 8];
    time_bytes.copy_from_slice(time);
    Some(SlotValue {
        key,
        last_used: Nanos(u64::from_le_bytes(time_bytes)),
        state,
    })
}

fn write_value(out: &mut Vec<u8>, key: &[u8], now: Nanos, state: &State) {
    out.clear();
    out.push(FORMAT);
    // Keys are at most MAX_STORED_KEY bytes, so the length fits in a u16.
    out.extend_from_slice(&(key.len() as u16).to_le_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(&now.get().to_le_bytes());
    state.encode(out);
}

/// FNV-1a over the seed and the key, then a final mix so neighbouring
/// keys spread over the table. Stable across processes and platforms, so
/// every Envoy worker finds a key in the same slots.
pub fn hash(seed: u64, key: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for &b in key {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h
}

impl<B: SharedBytes> StateStore for SlotStore<B> {
    type Version = SlotVersion;

    fn load(&mut self, slot: Slot<'_>, now: Nanos) -> Result<Loaded<SlotVersion>, StoreError> {
        let mut hashed = [0u8; 16];
        let key = stored_key(slot.key, self.seed, &mut hashed);
        let (home, slots) = self.home(slot.rule_index, key);
        // Best place for a new key: (rank, index, cas); lower rank wins:
        // 0 empty, 1 fresh, 2 live (ordered by last use).
        let mut best: Option<(u8, Nanos, u64, u32)> = None;
        for probe in 0..PROBES.min(slots) {
            let index = (home + probe) % slots;
            self.set_name(slot.rule_index, index);
            let (bytes, cas) = self.backend.get(&self.name)?;
            let bytes = bytes.unwrap_or_default();
            let candidate = match parse_value(&bytes) {
                Some(value) if value.key == key => {
                    let state = State::decode(value.state).map_err(StoreError::Corrupt)?;
                    return Ok(Loaded {
                        state,
                        version: SlotVersion {
                            index,
                            cas,
                            evicts_live: false,
                        },
                    });
                }
                Some(value) => {
                    let fresh = State::decode(value.state)
                        .map_or(true, |s| slot.rule.limiter.is_fresh(&s, now));
                    if fresh {
                        (1, Nanos::ZERO, index, cas)
                    } else {
                        (2, value.last_used, index, cas)
                    }
                }
                None => (0, Nanos::ZERO, index, cas),
            };
            if best.is_none_or(|b| (candidate.0, candidate.1) < (b.0, b.1)) {
                best = Some(candidate);
            }
        }
        let (rank, _, index, cas) = best.unwrap_or((0, Nanos::ZERO, home, 0));
        Ok(Loaded {
            state: slot.rule.limiter.fresh_state(),
            version: SlotVersion {
                index,
                cas,
                evicts_live: rank == 2,
            },
        })
    }

    fn save(
        &mut self,
        slot: Slot<'_>,
        state: State,
        version: SlotVersion,
        now: Nanos,
    ) -> Result<Saved, StoreError> {
        let mut hashed = [0u8; 16];
        let key = stored_key(slot.key, self.seed, &mut hashed);
        let mut value = core::mem::take(&mut self.value);
        write_value(&mut value, key, now, &state);
        self.set_name(slot.rule_index, version.index);
        let outcome = self.backend.set(&self.name, &value, version.cas);
        self.value = value;
        match outcome? {
            WriteOutcome::Written => {
                if version.evicts_live {
                    self.live_evictions += 1;
                }
                Ok(Saved::Stored)
            }
            WriteOutcome::CasMismatch => Ok(Saved::Conflict),
        }
    }

    fn release(&mut self, _slot: Slot<'_>, _state: State, _version: SlotVersion, _now: Nanos) {}
}

/// Shared bytes inside one process with Envoy's semantics (a token per
/// write; a write to a missing name always succeeds): the test double for
/// Envoy's shared data.
#[derive(Debug, Default)]
pub struct InProcessShared {
    map: RefCell<HashMap<String, (Vec<u8>, u32)>>,
    writes: Cell<u32>,
}

impl InProcessShared {
    /// Names written so far.
    pub fn len(&self) -> usize {
        self.map.borrow().len()
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.map.borrow().is_empty()
    }

    /// Writes so far (each write gets the next token).
    pub fn writes(&self) -> u32 {
        self.writes.get()
    }

    /// Overwrites every non-empty value with `f(value)` (to simulate damage).
    pub fn corrupt(&self, f: impl Fn(&mut Vec<u8>)) {
        for (value, _) in self.map.borrow_mut().values_mut() {
            if !value.is_empty() {
                f(value);
            }
        }
    }
}

impl SharedBytes for &InProcessShared {
    fn get(&self, name: &str) -> Result<(Option<Vec<u8>>, u32), StoreError> {
        Ok(match self.map.borrow().get(name) {
            Some((v, cas)) => (Some(v.clone()), *cas),
            None => (None, 0),
        })
    }

    fn set(&mut self, name: &str, value: &[u8], cas: u32) -> Result<WriteOutcome, StoreError> {
        let mut map = self.map.borrow_mut();
        if let Some((_, current)) = map.get(name) {
            if cas != 0 && cas != *current {
                return Ok(WriteOutcome::CasMismatch);
            }
        }
        let token = self.writes.get().wrapping_add(1).max(1);
        self.writes.set(token);
        map.insert(String::from(name), (Vec::from(value), token));
        Ok(WriteOutcome::Written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max_keys: u64) -> Policy {
        crate::policy::Policy::from_json(&alloc::format!(
            r#"{{"rules":[{{"name":"r","key":["header:k"],"limit":{{"count":2,"per":"1s"}}}}],"max_keys":{max_keys}}}"#
        ))
        .unwrap()
    }

    #[test]
    fn prepare_creates_the_table_once() {
        let shared = InProcessShared::default();
        let p = policy(8);
        let mut store = SlotStore::new(&shared, &p, 7);
        store.prepare().unwrap();
        assert_eq!(shared.len(), 9);
        let writes = shared.writes();
        SlotStore::new(&shared, &p, 7).prepare().unwrap();
        assert_eq!(shared.writes(), writes, "second prepare must not write");
    }

    #[test]
    fn conflicting_writer_is_detected() {
        let shared = InProcessShared::default();
        let p = policy(8);
        let rule = &p.rules[0];
        let slot = Slot {
            rule_index: 0,
            rule,
            key: "a",
        };
        let mut one = SlotStore::new(&shared, &p, 1);
        let mut two = SlotStore::new(&shared, &p, 1);
        one.prepare().unwrap();
        let mut a = one.load(slot, Nanos(0)).unwrap();
        let mut b = two.load(slot, Nanos(0)).unwrap();
        assert!(rule.limiter.check(&mut a.state, Nanos(0), 1).allowed);
        assert!(rule.limiter.check(&mut b.state, Nanos(0), 1).allowed);
        assert_eq!(
            one.save(slot, a.state, a.version, Nanos(0)).unwrap(),
            Saved::Stored
        );
        assert_eq!(
            two.save(slot, b.state, b.version, Nanos(0)).unwrap(),
            Saved::Conflict
        );
        let mut again = two.load(slot, Nanos(0)).unwrap();
        assert_eq!(
            rule.limiter.check(&mut again.state, Nanos(0), 1).remaining,
            0
        );
    }

    #[test]
    fn table_stays_bounded_and_evicts_least_recent_live_key() {
        let shared = InProcessShared::default();
        let p = policy(4);
        let rule = &p.rules[0];
        let mut store = SlotStore::new(&shared, &p, 3);
        store.prepare().unwrap();
        for (i, key) in ["a", "b", "c", "d", "e"].iter().enumerate() {
            let slot = Slot {
                rule_index: 0,
                rule,
                key,
            };
            let now = Nanos(i as u64);
            let mut loaded = store.load(slot, now).unwrap();
            rule.limiter.check(&mut loaded.state, now, 1);
            store.save(slot, loaded.state, loaded.version, now).unwrap();
        }
        assert_eq!(shared.len(), 5, "4 slots + marker, never more");
        assert_eq!(store.live_evictions(), 1);
        // "a" was least recently used: it starts over.
        let slot = Slot {
            rule_index: 0,
            rule,
            key: "a",
        };
        let loaded = store.load(slot, Nanos(10)).unwrap();
        assert_eq!(loaded.state, rule.limiter.fresh_state());
        // A fresh slot is reused before a live one is evicted.
        let slot_e = Slot {
            rule_index: 0,
            rule,
            key: "e",
        };
        let mut e = store.load(slot_e, Nanos(10)).unwrap();
        assert_eq!(rule.limiter.check(&mut e.state, Nanos(10), 1).remaining, 0);
        let later = Nanos(5_000_000_000);
        let mut z = store.load(Slot { key: "z", ..slot_e }, later).unwrap();
        rule.limiter.check(&mut z.state, later, 1);
        store
            .save(Slot { key: "z", ..slot_e }, z.state, z.version, later)
            .unwrap();
        assert_eq!(store.live_evictions(), 1);
    }

    #[test]
    fn long_keys_are_hashed_and_garbage_is_an_error_not_a_panic() {
        let shared = InProcessShared::default();
        let p = policy(2);
        let rule = &p.rules[0];
        let long = "k".repeat(1000);
        let mut store = SlotStore::new(&shared, &p, 3);
        store.prepare().unwrap();
        let slot = Slot {
            rule_index: 0,
            rule,
            key: &long,
        };
        let mut loaded = store.load(slot, Nanos(0)).unwrap();
        rule.limiter.check(&mut loaded.state, Nanos(0), 1);
        store
            .save(slot, loaded.state, loaded.version, Nanos(0))
            .unwrap();
        assert_eq!(shared.len(), 3);
        shared.corrupt(|value| value.truncate(value.len() - 1));
        assert!(matches!(
            store.load(slot, Nanos(0)),
            Err(StoreError::Corrupt(_))
        ));
    }
}
