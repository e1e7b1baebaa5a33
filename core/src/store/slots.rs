//! State in a table of named byte slots with compare-and-swap: the shape
//! of Envoy's shared data, which every worker's VM can see.
//!
//! Envoy's shared data can neither delete a name nor create one
//! atomically (a write to a missing name always succeeds), so each rule
//! gets a table of at most `max_keys` slots, each created the first time a
//! key needs it and reused forever: memory grows with the keys seen, up to
//! the bound, and configuring costs the same whatever the bound. A slot is
//! created under the table's creation lock (a name created when the store
//! is opened, taken by compare-and-swap), so two workers never both create
//! it; every other write is a compare-and-swap.
//!
//! A key lives in one of [`PROBES`] slots after its hash, seeded with a
//! random secret kept in shared data ([`SlotStore::open`]) so that clients
//! cannot aim keys at one another's slots. A new key takes an empty slot,
//! else one whose state is fresh, else a missing one (created), else the
//! least recently used slot whose key is [`Standing::Live`] (a live
//! eviction, counted). A key refused by its limit is marked limited until
//! its state would be fresh again, and a key holding in-flight permits
//! keeps them: neither is evicted. When all its slots are protected, a new
//! key shares the rule's overflow slot or is refused, as [`WhenFull`] says.

use crate::text::push_decimal;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};

use hashbrown::HashMap;
use siphasher::sip::SipHasher13;
use siphasher::sip128::SipHasher13 as Sip128;

use super::{
    limited_for, Loaded, Marks, Room, Saved, Slot, Standing, StateStore, StoreError, WhenFull,
};
use crate::algorithm::{Outcome, State};
use crate::policy::{Policy, Rule, Scope};
use crate::time::{Nanos, Span};

/// How many consecutive slots a key may live in.
pub const PROBES: u64 = 4;

/// The shared-data name holding the key hash's 16-byte seed (a new name
/// for the 128-bit seed, so that a VM of an older Sluice, which kept an
/// 8-byte one under `sluice/seed`, never overwrites it).
pub const SEED_NAME: &str = "sluice/seed128";

/// The key hash's secret seed.
pub type Seed = [u8; 16];

/// A creation lock older than this was left by a VM that died holding it,
/// and may be taken over. Holding it takes three host calls.
pub const LOCK_TIMEOUT: Span = Span::SECOND;

/// How many times a creation waits for the lock before reporting a
/// conflict (the engine then retries the whole decision).
const LOCK_TRIES: usize = 64;

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

/// Which name a checked-out state belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place {
    /// A slot of the rule's table.
    Slot(u64),
    /// The rule's overflow slot.
    Overflow,
    /// Nowhere: the key was refused for want of room.
    Nowhere,
}

/// Where a load found (or chose) the key's state.
#[derive(Clone, Copy, Debug)]
pub struct SlotVersion {
    place: Place,
    cas: u32,
    /// The key was found there (not new).
    held: bool,
    /// The name does not exist yet: saving creates it under the lock.
    missing: bool,
    /// The slot holds another key whose state is still live.
    evicts_live: bool,
    /// The key's stored marks (zero for a new key).
    marks: Marks,
    /// `cas` is the token this store's own last write most likely got
    /// ([`OwnWrites`]), not one read back.
    guessed: bool,
}

#[derive(Debug)]
struct Table {
    /// `sluice/<rule>/`: names stay the same across config reloads, so a
    /// reload reuses the table instead of leaking a new one, and (the seed
    /// living in shared data) a rule that keeps its name keeps its counts.
    /// A new `max_keys` moves keys to other slots: those keys start over.
    prefix: String,
    slots: u64,
}

/// What happened to keys that needed room, so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotStats {
    /// New keys that displaced a live (not limited) key.
    pub live_evictions: u64,
    /// Requests of new keys that used the overflow slot.
    pub overflowed: u64,
    /// Requests of new keys refused for want of room.
    pub refused: u64,
}

/// See the module doc.
#[derive(Debug)]
pub struct SlotStore<B> {
    backend: B,
    tables: Vec<Table>,
    seed: Seed,
    when_full: WhenFull,
    name: String,
    value: Vec<u8>,
    stats: SlotStats,
    own_writes: OwnWrites,
}

/// Slot value layout: format byte, key length (u16 LE), key, last use (u64
/// LE), limited until (u64 LE), blocked until (u64 LE), then the encoded
/// state. An empty value (or one of another format) is a free slot.
/// Format 4 added the block (format 3 slots are free: their keys start
/// over).
const FORMAT: u8 = 4;
/// Longer keys are stored as a hash of themselves, to keep slots small.
pub const MAX_STORED_KEY: usize = 256;

/// Bytes of a slot besides its stored key and state: the value's format
/// byte, key length and three timestamps (27), the name (`sluice/`, a rule
/// name of up to 64 characters, `/` and an index: at most 80), and the
/// host's map entry (two strings, a token, allocator headers: about 100).
pub const SLOT_OVERHEAD: u64 = 208;

/// The most bytes one slot of `rule` takes in shared data: the longest
/// stored key, the rule's largest state and [`SLOT_OVERHEAD`].
pub fn slot_bytes(rule: &Rule) -> u64 {
    let state = State::max_encoded_len(rule.limiter.kind(), rule.quota.count());
    SLOT_OVERHEAD + MAX_STORED_KEY as u64 + state
}

impl<B: SharedBytes> SlotStore<B> {
    /// Opens the store for `policy` over `backend`: reads the shared seed
    /// (creating it from `random` if this is the first VM) and creates the
    /// per-rule names. Call once per VM at configuration time.
    pub fn open(
        mut backend: B,
        policy: &Policy,
        random: impl FnMut() -> Option<u64>,
    ) -> Result<SlotStore<B>, StoreError> {
        let seed = shared_seed(&mut backend, random)?;
        let mut store = SlotStore::new(backend, policy, seed);
        store.prepare()?;
        Ok(store)
    }

    /// A store for `policy`'s rules over `backend`, hashing keys with
    /// `seed` (see [`SlotStore::open`], which reads the shared one).
    pub fn new(backend: B, policy: &Policy, seed: Seed) -> SlotStore<B> {
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
            when_full: policy.when_full,
            name: String::new(),
            value: Vec::new(),
            stats: SlotStats::default(),
            own_writes: OwnWrites::new(),
        }
    }

    /// Whether loads may start from this store's own last write at a name
    /// instead of reading it ([`OwnWrites`]; on unless a test turns it off
    /// to compare). Decisions stay exact either way.
    #[cfg(test)]
    pub(crate) fn reuse_own_writes(&mut self, reuse: bool) {
        self.own_writes.enabled = reuse;
    }

    /// Reads `self.name`.
    fn read(&mut self) -> Result<(Option<Vec<u8>>, u32), StoreError> {
        self.backend.get(&self.name)
    }

    /// Reads the slot `self.name`; with reuse on, its token is seen by
    /// [`OwnWrites`] if its last write was at most [`OWN_WRITE_FRESH`]
    /// before `now`.
    fn read_slot(&mut self, now: Nanos) -> Result<(Option<Vec<u8>>, u32), StoreError> {
        let read = self.backend.get(&self.name)?;
        // Only reuse needs the floor.
        if !self.own_writes.enabled {
            return Ok(read);
        }
        if let Some(value) = read.0.as_deref().and_then(parse_value) {
            self.own_writes.saw(read.1, value.last_used, now);
        }
        Ok(read)
    }

    /// A guessed token at `self.name` missed: another writer's tokens came
    /// between. Reuse pauses, and the name this store wrote last, if
    /// another, is read back, whose token (when no one wrote since) brings
    /// what it knows of the tokens up to date: reading the name that
    /// missed alone would not, when another name was written after it.
    /// The name that missed is read again by the decision's retry.
    fn missed(&mut self, now: Nanos) -> Result<(), StoreError> {
        self.own_writes.pause();
        // Misses are rare: one copy of the name that missed.
        let missed = self.name.clone();
        if let Some(last) = self.own_writes.last().filter(|last| last.name != missed) {
            self.name.clear();
            self.name.push_str(&last.name);
            let guessed = last.token;
            let (_, token) = self.read_slot(now)?;
            if token != guessed {
                let name = core::mem::take(&mut self.name);
                self.own_writes.forget(&name);
                self.name = name;
            }
        }
        self.own_writes.forget(&missed);
        self.name = missed;
        Ok(())
    }

    /// Creates each table's creation lock and overflow slot if missing:
    /// two names per rule, whatever `max_keys` is. Slots are created as
    /// keys need them.
    pub fn prepare(&mut self) -> Result<(), StoreError> {
        for t in 0..self.tables.len() {
            for suffix in [LOCK, OVERFLOW] {
                self.set_name(t, suffix);
                if self.read()?.0.is_none() {
                    put(&mut self.backend, &mut self.own_writes, &self.name, &[], 0)?;
                }
            }
        }
        Ok(())
    }

    /// What happened to keys that needed room, so far.
    pub fn stats(&self) -> SlotStats {
        self.stats
    }

    /// The backend, e.g. to inspect a test double.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The backend, to keep other shared values next to the slots (the
    /// lease cells of leased rules).
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// The key hash's secret seed.
    pub fn seed(&self) -> &Seed {
        &self.seed
    }

    fn set_name(&mut self, table: usize, suffix: &str) {
        self.name.clear();
        if let Some(t) = self.tables.get(table) {
            self.name.push_str(&t.prefix);
            self.name.push_str(suffix);
        }
    }

    /// Names slot `index` of `table` (every probe and write does).
    fn set_slot_name(&mut self, table: usize, index: u64) {
        self.set_name(table, "");
        push_decimal(&mut self.name, index);
    }

    fn home(&self, table: usize, key: &[u8]) -> (u64, u64) {
        let slots = self.tables.get(table).map_or(1, |t| t.slots);
        (hash(&self.seed, key) % slots, slots)
    }

    /// Writes `self.value` to the missing slot `index` unless someone
    /// created it meanwhile, holding the table's creation lock.
    fn create(&mut self, table: usize, index: u64, now: Nanos) -> Result<Saved, StoreError> {
        let Some(lock_cas) = self.lock(table, now)? else {
            return Ok(Saved::Conflict);
        };
        self.set_slot_name(table, index);
        // Released whatever happened, or every creation would wait for it
        // to go stale.
        let created = self.create_unless_present();
        // A mismatch means our lock was taken over as stale: it is not
        // ours to release any more.
        self.set_name(table, LOCK);
        let released = put(
            &mut self.backend,
            &mut self.own_writes,
            &self.name,
            &[],
            lock_cas,
        );
        let created = created?;
        released?;
        Ok(created)
    }

    /// Writes `self.value` at `self.name` unless the name exists.
    fn create_unless_present(&mut self) -> Result<Saved, StoreError> {
        Ok(match self.read()?.0 {
            Some(_) => Saved::Conflict,
            None => match put(
                &mut self.backend,
                &mut self.own_writes,
                &self.name,
                &self.value,
                0,
            )? {
                WriteOutcome::Written => Saved::Stored,
                WriteOutcome::CasMismatch => Saved::Conflict,
            },
        })
    }

    /// Takes the table's creation lock; the token to release it with, or
    /// `None` if another VM kept it through every try.
    fn lock(&mut self, table: usize, now: Nanos) -> Result<Option<u32>, StoreError> {
        self.set_name(table, LOCK);
        let stamp = now.get().to_le_bytes();
        for _ in 0..LOCK_TRIES {
            let (value, cas) = self.read()?;
            let held_since = value
                .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
                .map(|b| Nanos(u64::from_le_bytes(b)));
            if held_since.is_some_and(|t| now < t.plus(LOCK_TIMEOUT)) {
                continue;
            }
            let taken = put(
                &mut self.backend,
                &mut self.own_writes,
                &self.name,
                &stamp,
                cas,
            )?;
            if taken == WriteOutcome::Written {
                return match self.read() {
                    Ok((_, token)) => Ok(Some(token)),
                    Err(e) => {
                        // Just taken, so no other VM may hold it yet: give
                        // it back unconditionally rather than leave it held.
                        let _ = self.backend.set(&self.name, &[], 0);
                        Err(e)
                    }
                };
            }
        }
        Ok(None)
    }
}

/// Names of the per-rule lock and overflow slot (slots are numbers).
const LOCK: &str = "lock";
const OVERFLOW: &str = "overflow";

/// The seed stored at [`SEED_NAME`], written from `random` if missing.
///
/// Envoy configures the main thread's VM before it starts the workers'
/// VMs, so the first VM creates the seed and every later one reads it. A
/// missing name cannot be created atomically: two VMs configured at the
/// same instant for the very first time could each write their own and
/// keep different seeds (their workers would then count a key in two
/// places). Reading the value back after writing narrows that window to
/// the two writes.
pub fn shared_seed<B: SharedBytes>(
    backend: &mut B,
    mut random: impl FnMut() -> Option<u64>,
) -> Result<Seed, StoreError> {
    let read = |backend: &B| -> Result<Option<Seed>, StoreError> {
        Ok(backend
            .get(SEED_NAME)?
            .0
            .and_then(|v| Seed::try_from(v.as_slice()).ok()))
    };
    if let Some(seed) = read(backend)? {
        return Ok(seed);
    }
    let no_random = StoreError::Unavailable("no random source for the key hash seed");
    let mut candidate = Seed::default();
    for half in candidate.chunks_exact_mut(8) {
        half.copy_from_slice(&random().ok_or(no_random.clone())?.to_le_bytes());
    }
    backend.set(SEED_NAME, &candidate, 0)?;
    read(backend)?.ok_or(StoreError::Unavailable("the key hash seed did not stick"))
}

/// The key as stored: itself, or a hash of itself when long.
fn stored_key<'a>(key: &'a str, seed: &Seed, buf: &'a mut [u8; 16]) -> &'a [u8] {
    if key.len() <= MAX_STORED_KEY {
        return key.as_bytes();
    }
    *buf = Sip128::new_with_key(seed).hash(key.as_bytes()).as_bytes();
    buf
}

/// A parsed slot value.
struct SlotValue<'a> {
    key: &'a [u8],
    last_used: Nanos,
    marks: Marks,
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
    let (last_used, rest) = rest.split_first_chunk::<8>()?;
    let (limited_until, rest) = rest.split_first_chunk::<8>()?;
    let (blocked_until, state) = rest.split_first_chunk::<8>()?;
    Some(SlotValue {
        key,
        last_used: Nanos(u64::from_le_bytes(*last_used)),
        marks: Marks {
            limited_until: Nanos(u64::from_le_bytes(*limited_until)),
            blocked_until: Nanos(u64::from_le_bytes(*blocked_until)),
        },
        state,
    })
}

fn write_value(out: &mut Vec<u8>, key: &[u8], now: Nanos, marks: Marks, state: &State) {
    out.clear();
    out.push(FORMAT);
    // Keys are at most MAX_STORED_KEY bytes, so the length fits in a u16.
    out.extend_from_slice(&(key.len() as u16).to_le_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(&now.get().to_le_bytes());
    out.extend_from_slice(&marks.limited_until.get().to_le_bytes());
    out.extend_from_slice(&marks.blocked_until.get().to_le_bytes());
    state.encode(out);
}

/// SipHash-1-3 of the key under the 128-bit secret `seed`: a keyed hash,
/// so that clients who do not know the seed cannot choose keys that share
/// slots. Stable across processes and platforms, so every Envoy worker
/// finds a key in the same slots.
pub fn hash(seed: &Seed, key: &[u8]) -> u64 {
    SipHasher13::new_with_key(seed).hash(key)
}

/// A free place a new key could take; lower ranks first, then older.
#[derive(Clone, Copy)]
struct Candidate {
    /// 0 empty, 1 fresh, 2 missing (to create), 3 live and not limited.
    rank: u8,
    last_used: Nanos,
    index: u64,
    cas: u32,
}

/// What probing a key's slots found.
enum Probed {
    /// The key's own state.
    Held(Loaded<SlotVersion>),
    /// Not there; the best place it could take, if any.
    Free(Option<Candidate>),
}

impl SlotVersion {
    /// The version of a state at `place` that is not the key's own.
    fn unheld(place: Place, cas: u32) -> SlotVersion {
        SlotVersion {
            place,
            cas,
            held: false,
            missing: false,
            evicts_live: false,
            marks: Marks::default(),
            guessed: false,
        }
    }
}

impl<B: SharedBytes> SlotStore<B> {
    /// Looks for the key in its [`PROBES`] slots, ranking the free ones.
    fn probe(&mut self, slot: Slot<'_>, now: Nanos) -> Result<Probed, StoreError> {
        let mut hashed = [0u8; 16];
        let key = stored_key(slot.key, &self.seed, &mut hashed);
        let (home, slots) = self.home(slot.rule_index, key);
        let mut best: Option<Candidate> = None;
        for probe in 0..PROBES.min(slots) {
            let index = (home + probe) % slots;
            self.set_slot_name(slot.rule_index, index);
            let read;
            // Only the key's own state is guessed: a refusal for want of
            // room, or a new key's choice of slot, rests on other keys'
            // states that no save of this key's confirms.
            let own = self
                .own_writes
                .reuse(&self.name, now)
                .filter(|(value, _)| parse_value(value).is_some_and(|v| v.key == key));
            let (bytes, cas, guessed) = match own {
                Some((value, cas)) => (Some(value), cas, true),
                None => {
                    read = self.read_slot(now)?;
                    (read.0.as_deref(), read.1, false)
                }
            };
            let rank = match bytes.map(parse_value) {
                None => (2, Nanos::ZERO),
                Some(None) => (0, Nanos::ZERO),
                Some(Some(value)) if value.key == key => {
                    let state = State::decode(value.state).map_err(StoreError::Corrupt)?;
                    let version = SlotVersion {
                        place: Place::Slot(index),
                        cas,
                        held: true,
                        missing: false,
                        evicts_live: false,
                        marks: value.marks,
                        guessed,
                    };
                    return Ok(Probed::Held(Loaded {
                        state,
                        version,
                        room: Room::Own,
                        blocked_until: value.marks.blocked_until,
                    }));
                }
                Some(Some(value)) => {
                    let standing = State::decode(value.state).map_or(Standing::Fresh, |s| {
                        Standing::of(&slot.rule.limiter, &s, value.marks, now)
                    });
                    match standing {
                        Standing::Fresh => (1, Nanos::ZERO),
                        Standing::Live => (3, value.last_used),
                        Standing::Protected => continue,
                    }
                }
            };
            let candidate = Candidate {
                rank: rank.0,
                last_used: rank.1,
                index,
                cas,
            };
            if best.is_none_or(|b| (candidate.rank, candidate.last_used) < (b.rank, b.last_used)) {
                best = Some(candidate);
            }
        }
        Ok(Probed::Free(best))
    }

    /// Checks out the rule's overflow state.
    fn load_overflow(&mut self, slot: Slot<'_>) -> Result<Loaded<SlotVersion>, StoreError> {
        self.set_name(slot.rule_index, OVERFLOW);
        let (bytes, cas) = self.read()?;
        let state = match bytes.as_deref().and_then(parse_value) {
            Some(value) => State::decode(value.state).map_err(StoreError::Corrupt)?,
            None => slot.rule.limiter.fresh_state(),
        };
        Ok(Loaded {
            state,
            version: SlotVersion::unheld(Place::Overflow, cas),
            room: Room::Overflow,
            blocked_until: Nanos::ZERO,
        })
    }
}

impl<B: SharedBytes> StateStore for SlotStore<B> {
    type Version = SlotVersion;

    fn load(&mut self, slot: Slot<'_>, now: Nanos) -> Result<Loaded<SlotVersion>, StoreError> {
        let best = match self.probe(slot, now)? {
            Probed::Held(loaded) => return Ok(loaded),
            Probed::Free(best) => best,
        };
        let fresh = slot.rule.limiter.fresh_state();
        if let Some(b) = best {
            let version = SlotVersion {
                place: Place::Slot(b.index),
                cas: b.cas,
                held: false,
                missing: b.rank == 2,
                evicts_live: b.rank == 3,
                marks: Marks::default(),
                // Only a key's own state is guessed: this one was read.
                guessed: false,
            };
            return Ok(Loaded {
                state: fresh,
                version,
                room: Room::Own,
                blocked_until: Nanos::ZERO,
            });
        }
        match self.when_full {
            WhenFull::Overflow => {
                self.stats.overflowed += 1;
                self.load_overflow(slot)
            }
            WhenFull::Refuse => {
                self.stats.refused += 1;
                Ok(Loaded {
                    state: fresh,
                    version: SlotVersion::unheld(Place::Nowhere, 0),
                    room: Room::Full,
                    blocked_until: Nanos::ZERO,
                })
            }
        }
    }

    fn confirm(
        &mut self,
        slot: Slot<'_>,
        version: &SlotVersion,
        now: Nanos,
    ) -> Result<bool, StoreError> {
        let (true, Place::Slot(index)) = (version.guessed, version.place) else {
            return Ok(true);
        };
        // The slot still holds this store's write only if its token is
        // the one guessed (see [`OwnWrites`]): a read, as without reuse.
        self.set_slot_name(slot.rule_index, index);
        let (_, token) = self.read_slot(now)?;
        if token == version.cas {
            return Ok(true);
        }
        self.missed(now)?;
        Ok(false)
    }

    fn load_charged(
        &mut self,
        slot: Slot<'_>,
        room: Room,
        now: Nanos,
    ) -> Result<Option<Loaded<SlotVersion>>, StoreError> {
        match room {
            Room::Own => Ok(match self.probe(slot, now)? {
                Probed::Held(loaded) => Some(loaded),
                Probed::Free(_) => None,
            }),
            Room::Overflow => self.load_overflow(slot).map(Some),
            Room::Full => Ok(None),
        }
    }

    fn save(
        &mut self,
        slot: Slot<'_>,
        state: State,
        version: SlotVersion,
        now: Nanos,
    ) -> Result<Saved, StoreError> {
        self.write(slot, &state, version, version.marks, now)
    }

    fn save_marked(
        &mut self,
        slot: Slot<'_>,
        state: State,
        version: SlotVersion,
        limited: Span,
        now: Nanos,
    ) -> Result<Saved, StoreError> {
        let marks = if version.held {
            version.marks.limited_for_at_least(limited, now)
        } else {
            version.marks
        };
        self.write(slot, &state, version, marks, now)
    }

    fn release(&mut self, _slot: Slot<'_>, _state: State, _version: SlotVersion, _now: Nanos) {}

    fn refuse(
        &mut self,
        slot: Slot<'_>,
        state: State,
        version: SlotVersion,
        outcome: &Outcome,
        blocked_until: Nanos,
        now: Nanos,
    ) {
        // Only a key that holds its slot is marked: a new key refused is
        // not stored, and the overflow slot is never evicted nor blocked.
        if !version.held {
            return;
        }
        let limited = limited_for(outcome);
        let wanted = Marks {
            // An eighth more than needed: a key refused again and again is
            // rewritten at most about eight times per limited period.
            limited_until: now.plus(limited).plus(Span(limited.as_nanos() / 8)),
            blocked_until,
        };
        let needs = |marks: Marks| {
            marks.limited_until < now.plus(limited) || marks.blocked_until < blocked_until
        };
        if !needs(version.marks) {
            return;
        }
        let marks = version.marks.max(wanted);
        if self.write(slot, &state, version, marks, now) != Ok(Saved::Conflict) {
            return;
        }
        // Another writer got in first. It may have kept the key (then the
        // marks must still be set, on the state it wrote) or evicted it
        // for a new key (then there is nothing left to mark). A block must
        // stick, so that every worker refuses the key: keep trying.
        for _ in 0..crate::engine::MAX_ATTEMPTS {
            let Ok(Probed::Held(current)) = self.probe(slot, now) else {
                return;
            };
            let marks = current.version.marks;
            if !needs(marks) {
                return;
            }
            let marks = marks.max(wanted);
            let written = self.write(slot, &current.state, current.version, marks, now);
            if written != Ok(Saved::Conflict) {
                return;
            }
        }
    }
}

impl<B: SharedBytes> SlotStore<B> {
    /// Writes the key's state at its place (creating a missing slot).
    fn write(
        &mut self,
        slot: Slot<'_>,
        state: &State,
        version: SlotVersion,
        marks: Marks,
        now: Nanos,
    ) -> Result<Saved, StoreError> {
        let mut hashed = [0u8; 16];
        let key = match version.place {
            Place::Slot(index) => {
                self.set_slot_name(slot.rule_index, index);
                stored_key(slot.key, &self.seed, &mut hashed)
            }
            Place::Overflow => {
                self.set_name(slot.rule_index, OVERFLOW);
                &[]
            }
            Place::Nowhere => return Ok(Saved::Stored),
        };
        write_value(&mut self.value, key, now, marks, state);
        let outcome = match (version.place, version.missing) {
            (Place::Slot(index), true) => self.create(slot.rule_index, index, now)?,
            _ => match put(
                &mut self.backend,
                &mut self.own_writes,
                &self.name,
                &self.value,
                version.cas,
            )? {
                WriteOutcome::Written => {
                    // The overflow slot is always read back
                    // (`load_overflow`): remembering it would be wasted.
                    if let Place::Slot(_) = version.place {
                        let at = (self.name.as_str(), self.value.as_slice());
                        self.own_writes.keep(at, version.guessed, now);
                    }
                    Saved::Stored
                }
                WriteOutcome::CasMismatch => {
                    if version.guessed {
                        self.missed(now)?;
                    } else {
                        self.own_writes.forget(&self.name);
                    }
                    Saved::Conflict
                }
            },
        };
        if outcome == Saved::Stored && version.evicts_live {
            self.stats.live_evictions += 1;
        }
        Ok(outcome)
    }
}

/// Writes `value` at `name` presenting `cas`; a write that succeeded took
/// the next token, which `own` counts.
fn put<B: SharedBytes>(
    backend: &mut B,
    own: &mut OwnWrites,
    name: &str,
    value: &[u8],
    cas: u32,
) -> Result<WriteOutcome, StoreError> {
    let outcome = backend.set(name, value, cas)?;
    if outcome == WriteOutcome::Written {
        own.took_token();
    }
    Ok(outcome)
}

/// How many of its last writes a store remembers ([`OwnWrites`]): the
/// slots of a few hot keys (clients, streams) and their rules.
const OWN_WRITES_KEPT: usize = 8;

/// How long a remembered write may stand in for a read, and a token read
/// back may raise the floor or be compared with it. Tokens come from one
/// 32-bit counter that every write in Envoy advances, and wrap: [`later`]
/// orders two tokens right only while they are under 2^31 writes apart.
/// A token compared was written at most this long ago, and the floor it
/// is compared with was raised at most this long ago to a token then at
/// most this long old: the two are at most about 20 s of writes apart, so
/// the order holds below about 100 million writes a second (2^31 in 20 s),
/// far beyond what Envoy's shared data takes.
const OWN_WRITE_FRESH: Span = Span::from_secs(10);

/// The longest pause of reuse after a miss, in slots probed (each load
/// probes one to [`PROBES`] slots: 16 to 64 loads).
const MAX_REUSE_PAUSE: u32 = 64;

/// The longest value a store remembers ([`OwnWrites`]). Each remembered
/// value is copied at every write and held until replaced: a
/// sliding-window log of 16 bytes per permit (up to about 160 KB) would
/// be copied whole on every write, reused or not, and eight of them would
/// hold over a megabyte per worker. Every other state (at most 26 bytes,
/// plus 27 of slot layout) fits beside the longest stored key, and so
/// does a log of a few entries beside a short key; longer values are read
/// back as without reuse.
const MAX_KEPT_VALUE: usize = MAX_STORED_KEY + 64;

/// A store's last writes, so that deciding the same key again can skip
/// reading its slot back (one shared-data read, a host call and a copy,
/// per rule and decision).
///
/// Envoy gives each write the next value of one counter shared by every
/// name, and tells the writer nothing. A write that succeeded got a token
/// `Y` above every token already given out, so above the floor: the
/// highest token seen among values written in the last [`OWN_WRITE_FRESH`],
/// plus one for each write of this store since. The guess is the floor
/// after the write, so `guess <= Y`. A name's token is always that of its
/// last write, and any write after ours gets more than `Y`, so a
/// compare-and-swap presenting the guess succeeds only if the name still
/// holds exactly this write: reusing the value remembered is exact. The
/// tokens compared are at most about 20 s of writes apart
/// ([`OWN_WRITE_FRESH`]), so the counter's 32-bit wrap cannot confuse
/// their order. (The guess is right
/// when nothing but this store wrote since the floor was seen.)
/// A refusal saves nothing, so it rests on a guessed state only once a
/// read finds the guessed token still there ([`StateStore::confirm`]).
/// Only the key's own state is guessed: other keys' states, which decide
/// where a new key goes or that it finds no room, are read.
/// A wrong guess (some other name was written between, or
/// another worker wrote this one) fails the swap; the load is then read
/// back as usual, and reuse pauses for a number of slots probed, twice as
/// many after each miss, half as many after each hit. A miss costs a
/// failed swap, a hit saves a read, about as much: where fewer than half
/// the guesses hit (busy workers writing in between), the pause grows to
/// [`MAX_REUSE_PAUSE`] slots probed and reuse costs at most one failed
/// write in that many probes (16 to 64 loads); where keys vary, the names
/// read are not remembered ones, and cost what they would without reuse.
#[derive(Debug)]
struct OwnWrites {
    /// Reuse is on (tests turn it off to compare).
    enabled: bool,
    /// Names with the value last written there, its guessed token and when.
    kept: Vec<OwnWrite>,
    /// Where the next new name goes once `kept` is full.
    next: usize,
    /// The index in `kept` of the last write.
    last: Option<usize>,
    /// A token no higher than the last one given out (in serial order:
    /// tokens wrap): the highest read back among those written lately,
    /// raised by one for each write of this store. `None` until a token is
    /// seen.
    floor: Option<u32>,
    /// When `floor` last rose to a token written lately: past
    /// [`OWN_WRITE_FRESH`], it may lag too far behind the counter to be
    /// compared with new tokens (they wrap), and is not used.
    floor_at: Nanos,
    /// Slots left to probe before reuse resumes after a miss: each probe
    /// counts one, so a load counts one to [`PROBES`].
    probes_left: u32,
    /// The pause, in slots probed, that the next miss starts.
    next_pause: u32,
}

#[derive(Debug)]
struct OwnWrite {
    name: String,
    value: Vec<u8>,
    token: u32,
    at: Nanos,
}

/// Whether token `a` came after `b` (serial number order: the counter wraps).
fn later(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

impl OwnWrites {
    /// Nothing remembered yet, reuse on.
    fn new() -> OwnWrites {
        OwnWrites {
            enabled: true,
            kept: Vec::new(),
            next: 0,
            last: None,
            floor: None,
            floor_at: Nanos::ZERO,
            probes_left: 0,
            next_pause: 0,
        }
    }

    /// The value and token this store last wrote at `name`, if reuse is on,
    /// not paused, and the write is fresh at `now`. Called once per slot
    /// probed, which a pause counts down.
    fn reuse(&mut self, name: &str, now: Nanos) -> Option<(&[u8], u32)> {
        if !self.enabled {
            return None;
        }
        if self.probes_left > 0 {
            self.probes_left -= 1;
            return None;
        }
        self.kept
            .iter()
            .find(|w| w.name == name && w.at <= now && now.since(w.at) <= OWN_WRITE_FRESH)
            .map(|w| (w.value.as_slice(), w.token))
    }

    /// The floor, unless it is stale at `now`.
    fn fresh_floor(&self, now: Nanos) -> Option<u32> {
        self.floor
            .filter(|_| self.floor_at <= now && now.since(self.floor_at) <= OWN_WRITE_FRESH)
    }

    /// A token read back at `now` from a value written at `written`. Only
    /// a token written lately is compared with the floor: an old one (a
    /// slot left alone while billions of writes went by elsewhere) could
    /// look later than it once tokens wrap.
    fn saw(&mut self, token: u32, written: Nanos, now: Nanos) {
        let lately = written <= now && now.since(written) <= OWN_WRITE_FRESH;
        if token == 0 || !lately {
            return;
        }
        if self
            .fresh_floor(now)
            .is_none_or(|floor| later(token, floor))
        {
            self.floor = Some(token);
            self.floor_at = now;
        }
    }

    /// A write succeeded: it took a token above every token given out
    /// before (the token it presented included: one read back, older than
    /// the floor unless seen, or one guessed from the floor).
    fn took_token(&mut self) {
        // Never 0: the counter skips it (a write presenting 0 is
        // unconditional).
        self.floor = self.floor.map(|floor| floor.wrapping_add(1).max(1));
    }

    /// Remembers the write of `value` at `name` that just succeeded at
    /// `now` (presenting a `guessed` token or one read back), under the
    /// token it most likely took; a value longer than [`MAX_KEPT_VALUE`]
    /// is not remembered.
    fn keep(&mut self, (name, value): (&str, &[u8]), guessed: bool, now: Nanos) {
        if !self.enabled {
            return;
        }
        if guessed {
            // A hit: the next miss pauses half as long.
            self.next_pause /= 2;
        }
        let token = match self.fresh_floor(now) {
            Some(token) if value.len() <= MAX_KEPT_VALUE => token,
            // What was kept at `name` is older than this write.
            _ => {
                self.forget(name);
                return;
            }
        };
        let index = match self.kept.iter().position(|w| w.name == name) {
            Some(i) => i,
            None if self.kept.len() < OWN_WRITES_KEPT => {
                self.kept.push(OwnWrite {
                    name: String::new(),
                    value: Vec::new(),
                    token: 0,
                    at: now,
                });
                self.kept.len() - 1
            }
            None => {
                let i = self.next;
                self.next = (i + 1) % OWN_WRITES_KEPT;
                i
            }
        };
        if let Some(w) = self.kept.get_mut(index) {
            w.name.clear();
            w.name.push_str(name);
            w.value.clear();
            w.value.extend_from_slice(value);
            w.token = token;
            w.at = now;
            self.last = Some(index);
        }
    }

    /// The last write remembered.
    fn last(&self) -> Option<&OwnWrite> {
        self.kept.get(self.last?)
    }

    /// What is remembered at `name` is stale.
    fn forget(&mut self, name: &str) {
        if let Some(i) = self.kept.iter().position(|w| w.name == name) {
            // The entry at the end moves to `i`.
            let moved = self.kept.len() - 1;
            self.kept.swap_remove(i);
            self.last = match self.last {
                Some(last) if last == i => None,
                Some(last) if last == moved => Some(i),
                last => last,
            };
            self.next = 0;
        }
    }

    /// A guessed token missed: reuse pauses, longer after each miss.
    fn pause(&mut self) {
        self.next_pause = (self.next_pause * 2).clamp(1, MAX_REUSE_PAUSE);
        self.probes_left = self.next_pause;
    }
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

    const SEC: u64 = 1_000_000_000;

    fn policy(max_keys: u64) -> Policy {
        crate::policy::Policy::from_json(&alloc::format!(
            r#"{{"rules":[{{"name":"r","key":["header:k"],"limit":{{"count":2,"per":"1s"}}}}],"max_keys":{max_keys}}}"#
        ))
        .unwrap()
    }

    #[test]
    fn opening_creates_two_names_per_rule_whatever_max_keys() {
        let shared = InProcessShared::default();
        let p = policy(2_000_000);
        let store = SlotStore::open(&shared, &p, || Some(7)).unwrap();
        assert_eq!(shared.len(), 3, "seed, lock, overflow");
        assert_eq!(store.seed, [7, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0]);
        let writes = shared.writes();
        let again = SlotStore::open(&shared, &p, || None).unwrap();
        assert_eq!(shared.writes(), writes, "a second VM must not write");
        assert_eq!(again.seed, store.seed, "every VM uses the stored seed");
    }

    #[test]
    fn the_key_hash_is_siphash_1_3_under_the_whole_128_bit_seed() {
        // Worked out with a separate implementation of SipHash-1-3 (itself
        // checked against the SipHash paper's 2-4 test vector).
        let seed: Seed = core::array::from_fn(|i| i as u8);
        assert_eq!(hash(&seed, b""), 0xabac_0158_050f_c4dc);
        assert_eq!(hash(&seed, b"10.0.0.1"), 0x3028_d8e4_151d_147f);
        for bit in 0..128 {
            let mut other = seed;
            other[bit / 8] ^= 1 << (bit % 8);
            assert_ne!(hash(&other, b"10.0.0.1"), hash(&seed, b"10.0.0.1"));
        }
    }

    #[test]
    fn opening_without_a_seed_or_randomness_is_an_error() {
        let shared = InProcessShared::default();
        assert!(SlotStore::open(&shared, &policy(8), || None).is_err());
    }

    /// Shared bytes that count their reads.
    struct CountingReads<'a> {
        inner: &'a InProcessShared,
        reads: &'a Cell<u32>,
    }

    impl SharedBytes for CountingReads<'_> {
        fn get(&self, name: &str) -> Result<(Option<Vec<u8>>, u32), StoreError> {
            self.reads.set(self.reads.get() + 1);
            self.inner.get(name)
        }
        fn set(&mut self, name: &str, value: &[u8], cas: u32) -> Result<WriteOutcome, StoreError> {
            let mut inner = self.inner;
            inner.set(name, value, cas)
        }
    }

    fn limit_of(count: u64) -> Policy {
        crate::policy::Policy::from_json(&alloc::format!(
            r#"{{"rules":[{{"name":"r","key":["header:k"],"limit":{{"count":{count},"per":"1h"}}}},
                {{"name":"s","key":["header:k"],"limit":{{"count":{count},"per":"1h"}}}}]}}"#
        ))
        .unwrap()
    }

    #[test]
    fn a_store_reusing_its_own_writes_reads_a_key_once_while_no_one_else_writes() {
        let shared = InProcessShared::default();
        let reads = Cell::new(0);
        let backend = CountingReads {
            inner: &shared,
            reads: &reads,
        };
        let p = limit_of(1000);
        let mut store = SlotStore::new(backend, &p, [5; 16]);
        store.prepare().unwrap();
        store.reuse_own_writes(true);
        let slots = [0, 1].map(|rule_index| Slot {
            rule_index,
            rule: &p.rules[rule_index],
            key: "a",
        });
        let now = Nanos(SEC);
        // Creating the slots writes tokens the store does not see: its
        // first guesses may miss, and it reads back.
        for _ in 0..3 {
            for slot in slots {
                while store.check(slot, 1, now).unwrap().is_none() {}
            }
        }
        // Two rules' slots written in turn: each write's token is guessed
        // right although the other's write came between.
        let before = reads.get();
        for _ in 0..10 {
            for slot in slots {
                assert!(store.check(slot, 1, now).unwrap().unwrap().0.allowed);
            }
        }
        assert_eq!(reads.get(), before, "no read back");
        // After the freshness bound, it reads again.
        let later = now.plus(OWN_WRITE_FRESH).plus(Span(1));
        store.check(slots[0], 1, later).unwrap().unwrap();
        assert_eq!(reads.get(), before + 1);
        // Without reuse, every decision reads.
        store.reuse_own_writes(false);
        store.check(slots[0], 1, later).unwrap().unwrap();
        assert_eq!(reads.get(), before + 2);
    }

    #[test]
    fn a_long_log_is_read_back_instead_of_remembered() {
        let shared = InProcessShared::default();
        let reads = Cell::new(0);
        let backend = CountingReads {
            inner: &shared,
            reads: &reads,
        };
        let p = crate::policy::Policy::from_json(
            r#"{"rules":[{"name":"r","key":["header:k"],"algorithm":"sliding_window_log","limit":{"count":1000,"per":"1h"}}],"max_keys":8}"#,
        )
        .unwrap();
        let mut store = SlotStore::new(backend, &p, [5; 16]);
        store.prepare().unwrap();
        let mut now = Nanos(SEC);
        // Reads of `decisions` decisions a millisecond apart (each a new
        // entry of the log, 16 bytes).
        let mut reads_of_decisions = |decisions: u64| {
            let before = reads.get();
            for _ in 0..decisions {
                now = now.plus(Span::from_millis(1));
                while store.check(slot(&p, "a"), 1, now).unwrap().is_none() {}
            }
            reads.get() - before
        };
        // A log of a few entries is decided from the store's own writes,
        // but for the first reads and guesses.
        assert!(reads_of_decisions(10) < 10);
        // Grown past what is remembered, it is read before every decision.
        reads_of_decisions(20);
        assert_eq!(reads_of_decisions(10), 10);
    }

    #[test]
    fn writes_to_the_overflow_slot_are_not_remembered() {
        let shared = InProcessShared::default();
        let p = policy(1);
        let mut store = SlotStore::open(&shared, &p, || Some(1)).unwrap();
        let now = Nanos(SEC);
        // `a`, refused, holds the only slot: `b` overflows.
        for key in ["a", "a", "a", "b", "b"] {
            decided(&mut store, slot(&p, key), 1, now);
        }
        assert_eq!(store.stats().overflowed, 2, "b went to the overflow slot");
        let kept: Vec<&str> = store
            .own_writes
            .kept
            .iter()
            .map(|w| w.name.as_str())
            .collect();
        assert_eq!(kept, ["sluice/r/0"]);
    }

    /// What a worker does next in [`reusing_own_writes_stays_exact_between_workers`].
    #[derive(Clone, Copy, Debug)]
    enum Step {
        /// Decides one rule (or both, all or nothing) for a key.
        Decide { both: bool, rule: usize, key: usize },
        /// Gives back one permit a decision took (a request excluded from
        /// counting, or a stream ending), if the model holds one.
        Refund { rule: usize, key: usize },
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            3 => (any::<bool>(), 0usize..2, 0usize..2)
                .prop_map(|(both, rule, key)| Step::Decide { both, rule, key }),
            1 => (0usize..2, 0usize..2).prop_map(|(rule, key)| Step::Refund { rule, key }),
        ]
    }

    proptest::proptest! {
        /// Workers deciding and refunding two keys of two rules in any
        /// interleaving, reusing their own writes or not, never admit more
        /// than the limit, nor less: a decision from a remembered write
        /// stands only if no one else wrote since. The table is small, so
        /// the keys' probes cross each other's slots.
        #[test]
        fn reusing_own_writes_stays_exact_between_workers(
            schedule in proptest::collection::vec((0usize..3, step()), 1..160),
            reuse in proptest::array::uniform3(proptest::bool::ANY),
        ) {
            const LIMIT: u64 = 6;
            const KEYS: [&str; 2] = ["a", "b"];
            let shared = InProcessShared::default();
            let mut p = limit_of(LIMIT);
            p.max_keys = 4;
            let mut workers: Vec<SlotStore<&InProcessShared>> = (0..3)
                .map(|_| SlotStore::new(&shared, &p, [9; 16]))
                .collect();
            workers[0].prepare().unwrap();
            for (w, on) in workers.iter_mut().zip(reuse) {
                w.reuse_own_writes(on);
            }
            let now = Nanos(SEC);
            let claim = |i: usize, key: usize| crate::engine::Claim {
                slot: Slot { rule_index: i, rule: &p.rules[i], key: KEYS[key] },
                cost: 1,
            };
            // What one worker alone would admit, decision by decision.
            let mut model = [[0u64; 2]; 2];
            for (worker, step) in schedule {
                let store = &mut workers[worker];
                match step {
                    Step::Decide { both, rule, key } => {
                        let rules: &[usize] = if both { &[0, 1] } else { core::slice::from_ref(&rule) };
                        let claims: Vec<_> = rules.iter().map(|&i| claim(i, key)).collect();
                        let verdict = crate::engine::decide_claims(store, &claims, now, Span::ZERO).unwrap();
                        // All or nothing.
                        let admits = rules.iter().all(|&i| model[i][key] < LIMIT);
                        if admits {
                            for &i in rules {
                                model[i][key] += 1;
                            }
                        }
                        proptest::prop_assert_eq!(verdict.charges.len(), if admits { rules.len() } else { 0 });
                    }
                    Step::Refund { rule, key } if model[rule][key] > 0 => {
                        crate::engine::refund_claims(store, &[claim(rule, key)], now).unwrap();
                        model[rule][key] -= 1;
                    }
                    Step::Refund { .. } => {}
                }
            }
            // Each count in shared data is what was admitted.
            let mut reader = SlotStore::new(&shared, &p, [9; 16]);
            for (i, counts) in model.into_iter().enumerate() {
                for (key, admitted) in counts.into_iter().enumerate() {
                    let mut loaded = reader.load(claim(i, key).slot, now).unwrap();
                    let left = p.rules[i].limiter.check(&mut loaded.state, now, 0).remaining;
                    proptest::prop_assert_eq!(left, LIMIT - admitted);
                }
            }
        }
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
        let mut one = SlotStore::new(&shared, &p, [1; 16]);
        let mut two = SlotStore::new(&shared, &p, [1; 16]);
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
        let mut store = SlotStore::new(&shared, &p, [3; 16]);
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
        assert_eq!(shared.len(), 6, "4 slots + lock + overflow, never more");
        assert_eq!(store.stats().live_evictions, 1);
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
        assert_eq!(store.stats().live_evictions, 1);
    }

    /// `store`'s outcome for `cost` at `slot`, checked again (as the
    /// engine does) while another writer got in first or a guess of the
    /// store's own last write there missed.
    fn decided<B: SharedBytes>(
        store: &mut SlotStore<B>,
        slot: Slot<'_>,
        cost: u64,
        now: Nanos,
    ) -> Outcome {
        (0..crate::engine::MAX_ATTEMPTS)
            .find_map(|_| store.check(slot, cost, now).unwrap())
            .expect("decided within the engine's attempts")
            .0
    }

    fn slot<'a>(p: &'a Policy, key: &'a str) -> Slot<'a> {
        Slot {
            rule_index: 0,
            rule: &p.rules[0],
            key,
        }
    }

    #[test]
    fn two_vms_creating_one_slot_never_overwrite_each_other() {
        let shared = InProcessShared::default();
        let p = policy(1);
        let mut one = SlotStore::open(&shared, &p, || Some(1)).unwrap();
        let mut two = SlotStore::open(&shared, &p, || None).unwrap();
        let now = Nanos(SEC);
        // Both see the only slot missing and want it for different keys.
        let a = one.load(slot(&p, "a"), now).unwrap();
        let b = two.load(slot(&p, "b"), now).unwrap();
        assert_eq!(
            one.save(slot(&p, "a"), a.state, a.version, now),
            Ok(Saved::Stored)
        );
        assert_eq!(
            two.save(slot(&p, "b"), b.state, b.version, now),
            Ok(Saved::Conflict)
        );
        let again = one.load(slot(&p, "a"), now).unwrap();
        assert!(again.version.held, "a's state survived");
    }

    #[test]
    fn creation_waits_for_the_lock_and_breaks_a_stale_one() {
        let shared = InProcessShared::default();
        let p = policy(8);
        let mut store = SlotStore::open(&shared, &p, || Some(1)).unwrap();
        let now = Nanos(100 * SEC);
        // Another VM holds the lock since just now: no creation.
        (&shared)
            .set("sluice/r/lock", &now.get().to_le_bytes(), 0)
            .unwrap();
        let a = store.load(slot(&p, "a"), now).unwrap();
        assert!(a.version.missing);
        assert_eq!(
            store.save(slot(&p, "a"), a.state, a.version, now),
            Ok(Saved::Conflict)
        );
        // A VM that died holding it: taken over after the timeout, then released.
        let later = now.plus(LOCK_TIMEOUT);
        let a = store.load(slot(&p, "a"), later).unwrap();
        assert_eq!(
            store.save(slot(&p, "a"), a.state, a.version, later),
            Ok(Saved::Stored)
        );
        assert_eq!((&shared).get("sluice/r/lock").unwrap().0, Some(Vec::new()));
    }

    #[test]
    fn a_refused_key_is_marked_at_most_about_eight_times_a_period() {
        let shared = InProcessShared::default();
        let p = policy(8);
        let mut store = SlotStore::open(&shared, &p, || Some(1)).unwrap();
        let rule = &p.rules[0];
        let mut now = Nanos(SEC);
        let mut writes_while_refused = 0;
        for _ in 0..1_000 {
            let before = shared.writes();
            let outcome = decided(&mut store, slot(&p, "a"), 1, now);
            if !outcome.allowed {
                writes_while_refused += shared.writes() - before;
            }
            now = now.plus(Span::from_millis(1));
        }
        // 2 per second, token bucket: about half a second to refill fully.
        assert!(rule.limiter.kind() == crate::algorithm::AlgorithmKind::TokenBucket);
        assert!(
            writes_while_refused <= 8 * 2 + 2,
            "{writes_while_refused} writes"
        );
        assert!(writes_while_refused > 0, "refusals do mark the key");
    }

    /// Shared bytes whose reads of one name fail once armed.
    struct Failing<'a> {
        inner: &'a InProcessShared,
        name: &'static str,
        armed: Cell<bool>,
    }

    impl SharedBytes for Failing<'_> {
        fn get(&self, name: &str) -> Result<(Option<Vec<u8>>, u32), StoreError> {
            if self.armed.get() && name == self.name {
                return Err(StoreError::Unavailable("test double failure"));
            }
            self.inner.get(name)
        }

        fn set(&mut self, name: &str, value: &[u8], cas: u32) -> Result<WriteOutcome, StoreError> {
            self.inner.set(name, value, cas)
        }
    }

    #[test]
    fn a_failure_while_creating_a_slot_releases_the_lock() {
        let shared = InProcessShared::default();
        let p = policy(1);
        let failing = Failing {
            inner: &shared,
            name: "sluice/r/0",
            armed: Cell::new(false),
        };
        let mut store = SlotStore::open(failing, &p, || Some(1)).unwrap();
        let now = Nanos(SEC);
        let a = store.load(slot(&p, "a"), now).unwrap();
        assert!(a.version.missing);
        store.backend().armed.set(true);
        assert!(store.save(slot(&p, "a"), a.state, a.version, now).is_err());
        assert_eq!(
            (&shared).get("sluice/r/lock").unwrap().0,
            Some(Vec::new()),
            "the creation lock is still held"
        );
    }

    #[test]
    fn a_refusal_losing_a_race_still_marks_the_key() {
        let shared = InProcessShared::default();
        let p = policy(8);
        let rule = &p.rules[0];
        let mut one = SlotStore::open(&shared, &p, || Some(1)).unwrap();
        let mut two = SlotStore::open(&shared, &p, || None).unwrap();
        let now = Nanos(SEC);
        for _ in 0..2 {
            assert!(decided(&mut one, slot(&p, "a"), 1, now).allowed);
        }
        let mut l = one.load(slot(&p, "a"), now).unwrap();
        let refused = l.acquire(rule, now, 1, crate::algorithm::Mode::Consume);
        assert!(!refused.allowed);
        // Another VM writes the key meanwhile (a request of no cost).
        assert!(two.check(slot(&p, "a"), 0, now).unwrap().is_some());
        one.refuse(
            slot(&p, "a"),
            l.state,
            l.version,
            &refused,
            Nanos::ZERO,
            now,
        );
        let again = one.load(slot(&p, "a"), now).unwrap();
        assert!(
            again.version.marks.limited_until > now,
            "the refused key lost its limited mark"
        );
    }

    /// An in-flight rule: at most 2 held at once, `max_keys` keys.
    fn in_flight_policy(max_keys: u64) -> Policy {
        crate::policy::Policy::from_json(&alloc::format!(
            r#"{{"rules":[{{"name":"r","match":{{"websocket":true}},"counts":"in_flight","key":["header:k"],"limit":{{"count":2}}}}],"max_keys":{max_keys}}}"#
        ))
        .unwrap()
    }

    #[test]
    fn a_key_holding_in_flight_permits_is_never_evicted() {
        let shared = InProcessShared::default();
        let p = in_flight_policy(4);
        let mut store = SlotStore::open(&shared, &p, || Some(1)).unwrap();
        let mut now = Nanos(SEC);
        // The victim opens its two streams long before anyone else.
        for _ in 0..2 {
            assert!(decided(&mut store, slot(&p, "victim"), 1, now).allowed);
        }
        for i in 0..8 {
            now = now.plus(Span::SECOND);
            let key = alloc::format!("made-up-{i}");
            decided(&mut store, slot(&p, &key), 1, now);
        }
        assert_eq!(store.stats().live_evictions, 0, "every key holds a permit");
        let more = decided(&mut store, slot(&p, "victim"), 1, now);
        assert!(
            !more.allowed,
            "the victim got its in-flight allowance again"
        );
    }

    #[test]
    fn long_keys_are_hashed_and_garbage_is_an_error_not_a_panic() {
        let shared = InProcessShared::default();
        let p = policy(2);
        let rule = &p.rules[0];
        let long = "k".repeat(1000);
        let mut store = SlotStore::new(&shared, &p, [3; 16]);
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
        assert_eq!(shared.len(), 3, "one slot + lock + overflow");
        shared.corrupt(|value| value.truncate(value.len() - 1));
        assert!(matches!(
            store.load(slot, Nanos(0)),
            Err(StoreError::Corrupt(_))
        ));
    }
}
