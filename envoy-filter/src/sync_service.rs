//! The sync service of leased rules: one per Envoy, a singleton
//! `WasmService` on the main thread sharing the filter's `vm_id` (so it
//! sees the workers' shared data and queues).
//!
//! It keeps a table of the keys it leases (in its own VM memory: workers
//! never need it) and, on each tick, syncs every key in use whose last
//! sync is an interval old: it retires one of the key's two halves in its
//! cell, reports what that half held and used, asks for a new lease sized
//! by the key's recent demand, and writes the answer into the half
//! (`sluice_core::lease::cell`). Calls are batched per domain and half (one
//! caller identity per half, `<caller>#0` and `<caller>#1`, because the
//! quota server keeps one lease per caller and key). A key whose leases ran
//! dry, or that has none yet, comes from the workers through the demand
//! queue and is synced at once; a key has at most one call in flight.
//!
//! Bounded: at most `max_keys` keys per rule (each owns one of the rule's
//! `max_keys` cells, probed from its hashed home); a key without demand for
//! [`idle_after`] gives its permits back (a sync wanting 0) and leaves the
//! table, freeing its cell; new keys beyond the bound are left to the quota
//! server's per-request decisions. When the quota server does not answer,
//! the half synced is emptied (what it held is not reported twice), the
//! other expires by itself (leases last at most a second), and the next
//! tick tries again.

use std::collections::{HashMap, HashSet};

use sluice_core::access::wire::span;
use sluice_core::lease::{self, cell, demand, want, Grant, Usage, LEASE_TIME};
use sluice_core::policy::{Leasing, Policy, SyncMode};
use sluice_core::store::{shared_seed, Seed, SharedBytes};
use sluice_core::time::{Nanos, Span};
use sluice_proto::prost::Message;
use sluice_proto::quota::v1::{Code, Lease, SyncEntry, SyncRequest, SyncResponse};

use crate::controls::{self, CONTROLS_TICK_MILLIS};
use crate::host::Host;
use crate::plugin::{read_policy, ConfigureError};
use crate::quota::{MAX_ANSWER_BYTES, SERVICE};

/// The quota server's lease method.
pub const SYNC_METHOD: &str = "Sync";
/// Entries per call: the quota server's bound on a request.
const MAX_ENTRIES: usize = 128;
/// Demand messages read per callback: the main thread has other work; the
/// rest waits for the next tick.
const MAX_DRAIN: usize = 4096;
/// Shortest tick period.
const MIN_TICK: Span = Span::from_millis(5);

/// How long a key may go without demand before it leaves the table.
pub fn idle_after(leasing: &Leasing) -> Span {
    LEASE_TIME.max(Span(leasing.interval.as_nanos().saturating_mul(4)))
}

/// One leased key.
#[derive(Debug)]
struct Leased {
    /// Its cell and fingerprint.
    cell: u32,
    owner: u64,
    /// The half the next sync retires and refills.
    next_half: usize,
    in_flight: bool,
    last_sync: Nanos,
    /// The cell's `admitted` counter at the last sync.
    admitted_seen: u64,
    /// Demand messages since the last sync.
    woken: u64,
    /// Last time the key had demand.
    last_active: Nanos,
    /// What each half was last granted.
    granted: [u64; 2],
}

/// A key in a call: what to do with its lease when the answer comes.
#[derive(Debug)]
struct Synced {
    rule_index: usize,
    key: String,
    half: usize,
    sent_at: Nanos,
}

/// Keys synced in one call: rules of one domain and cluster (those of
/// the rule at `first`), all retiring the same half.
#[derive(Debug)]
struct Batch {
    first: usize,
    half: usize,
    entries: Vec<(SyncEntry, Synced)>,
}

/// See the module doc.
#[derive(Debug)]
pub struct SyncService<B> {
    policy: Policy,
    backend: B,
    seed: Seed,
    caller: String,
    queue: Option<u32>,
    keys: HashMap<(usize, String), Leased>,
    /// Cells owned by a key of the table, per rule.
    cells: HashSet<(usize, u32)>,
    /// Keys of the table per rule.
    per_rule: Vec<u32>,
    /// Calls in flight by token.
    calls: HashMap<u32, Vec<Synced>>,
    /// The last call failed (warned once until one succeeds).
    failing: bool,
    /// Rules the quota server said it does not know (warned once each).
    unknown: HashSet<usize>,
    name: String,
    /// When the last call left: every call fetches newer access controls,
    /// and without calls for [`CONTROLS_EVERY`] an empty one does.
    last_call: Nanos,
}

/// Longest time without a `Sync` call while the policy has synced rules:
/// the quota server's access controls reach every VM within it plus a
/// worker tick.
const CONTROLS_EVERY: Span = Span::from_millis(CONTROLS_TICK_MILLIS as u64);

impl<B: SharedBytes> SyncService<B> {
    /// Reads the plugin configuration (the filter's own JSON), registers
    /// the demand queue if a rule is leased, and starts the ticks if a rule
    /// is synced (leases to keep, access controls to fetch).
    pub fn configure(
        host: &impl Host,
        mut backend: B,
        config: &[u8],
    ) -> Result<SyncService<B>, ConfigureError> {
        let policy = read_policy(config)?;
        let seed =
            shared_seed(&mut backend, || host.random_u64()).map_err(ConfigureError::Store)?;
        let caller = match host.node_id().filter(|n| !n.is_empty()) {
            Some(node) => node,
            None => format!("envoy-{:016x}", host.random_u64().unwrap_or(0)),
        };
        let intervals: Vec<Span> = (0..policy.rules.len())
            .filter_map(|i| leasing_of(&policy, i))
            .map(|l| l.interval)
            .collect();
        let mut service = SyncService {
            per_rule: vec![0; policy.rules.len()],
            policy,
            backend,
            seed,
            caller,
            queue: None,
            keys: HashMap::new(),
            cells: HashSet::new(),
            calls: HashMap::new(),
            failing: false,
            unknown: HashSet::new(),
            name: String::new(),
            last_call: Nanos(0),
        };
        let shortest = intervals.into_iter().min();
        if shortest.is_some() {
            service.queue = host.register_queue(lease::DEMAND_QUEUE);
            if service.queue.is_none() {
                host.warn("sluice: cannot register the lease demand queue");
            }
        }
        // Exact-mode rules need no leases but still get the controls.
        if !service.policy.synced.is_empty() {
            let tick = shortest
                .map_or(CONTROLS_EVERY, |i| {
                    Span(i.as_nanos() / 2).min(CONTROLS_EVERY)
                })
                .max(MIN_TICK);
            host.set_tick_millis(u32::try_from(tick.as_millis_ceil()).unwrap_or(u32::MAX));
        }
        Ok(service)
    }

    /// Who this Envoy is to the quota server.
    pub fn caller(&self) -> &str {
        &self.caller
    }

    /// Keys leased now.
    pub fn keys(&self) -> usize {
        self.keys.len()
    }

    /// Workers asked for keys: syncs them at once.
    pub fn on_queue_ready(&mut self, host: &impl Host) {
        let now = host.now();
        let woken = self.drain(host, now);
        self.sync(host, woken, now);
    }

    /// Syncs every key due, drops idle ones, and reads demand left over.
    pub fn on_tick(&mut self, host: &impl Host) {
        let now = host.now();
        let mut due = self.drain(host, now);
        for ((rule_index, key), leased) in &self.keys {
            let Some(leasing) = leasing_of(&self.policy, *rule_index) else {
                continue;
            };
            if !leased.in_flight && now.since(leased.last_sync) >= leasing.interval {
                due.push((*rule_index, key.clone()));
            }
        }
        due.sort();
        due.dedup();
        self.sync(host, due, now);
        if now.since(self.last_call) >= CONTROLS_EVERY {
            self.fetch_controls(host);
        }
    }

    /// An empty `Sync` call, for the access controls alone.
    fn fetch_controls(&mut self, host: &impl Host) {
        let Some(first) = self.policy.synced.first().map(|s| s.rule_index) else {
            return;
        };
        self.call(
            host,
            Batch {
                first,
                half: 0,
                entries: Vec::new(),
            },
        );
    }

    /// Reads the demand queue: the keys woken that are not being synced.
    fn drain(&mut self, host: &impl Host, now: Nanos) -> Vec<(usize, String)> {
        let mut woken = Vec::new();
        let Some(queue) = self.queue else {
            return woken;
        };
        for _ in 0..MAX_DRAIN {
            let Some(message) = host.dequeue(queue) else {
                break;
            };
            let Some((rule, key)) = demand::decode(&message) else {
                continue;
            };
            let Some(rule_index) = self.policy.rules.iter().position(|r| r.name == rule) else {
                continue;
            };
            let id = (rule_index, key.to_owned());
            if !self.keys.contains_key(&id) && !self.admit_key(host, rule_index, key, now) {
                continue;
            }
            if let Some(leased) = self.keys.get_mut(&id) {
                leased.woken = leased.woken.saturating_add(1);
                leased.last_active = now;
                if !leased.in_flight {
                    woken.push(id);
                }
            }
        }
        woken.sort();
        woken.dedup();
        woken
    }

    /// Adds `key` of the rule at `rule_index` to the table with a cell of
    /// its own; false when the rule's table is full or its cells are taken.
    fn admit_key(&mut self, host: &impl Host, rule_index: usize, key: &str, now: Nanos) -> bool {
        let (Some(rule), Some(leasing)) = (
            self.policy.rules.get(rule_index),
            leasing_of(&self.policy, rule_index),
        ) else {
            return false;
        };
        let count = self.per_rule.get(rule_index).copied().unwrap_or(u32::MAX);
        if count >= leasing.max_keys {
            return false;
        }
        let owner = lease::fingerprint(&self.seed, &rule.name, key);
        let Some(index) =
            lease::probe(owner, leasing.max_keys).find(|i| !self.cells.contains(&(rule_index, *i)))
        else {
            return false;
        };
        lease::cell_name(&mut self.name, &rule.name, index);
        match cell::claim(&mut self.backend, &self.name, owner) {
            Ok(true) => {}
            Ok(false) => return false,
            Err(e) => {
                host.warn(&format!("sluice: cannot set up a lease cell: {e}"));
                return false;
            }
        }
        self.cells.insert((rule_index, index));
        if let Some(n) = self.per_rule.get_mut(rule_index) {
            *n = n.saturating_add(1);
        }
        self.keys.insert(
            (rule_index, key.to_owned()),
            Leased {
                cell: index,
                owner,
                next_half: 0,
                in_flight: false,
                // Its first sync covers one interval of demand.
                last_sync: Nanos(now.get().saturating_sub(leasing.interval.as_nanos())),
                admitted_seen: 0,
                woken: 0,
                last_active: now,
                granted: [0; 2],
            },
        );
        true
    }

    /// Retires a half of each key in `ids` and asks for new leases, in one
    /// call per domain and half (of at most [`MAX_ENTRIES`]).
    fn sync(&mut self, host: &impl Host, ids: Vec<(usize, String)>, now: Nanos) {
        let mut batches: Vec<Batch> = Vec::new();
        for id in ids {
            let Some((entry, synced)) = self.prepare(host, &id, now) else {
                continue;
            };
            let Some(sync) = self.policy.sync_of(id.0) else {
                continue;
            };
            let replicas = leasing_of(&self.policy, id.0).map_or(1, |l| l.replicas);
            let batch = batches.iter_mut().find(|b| {
                b.half == synced.half
                    && b.entries.len() < MAX_ENTRIES
                    && self
                        .policy
                        .sync_of(b.first)
                        .is_some_and(|s| s.domain == sync.domain && s.cluster == sync.cluster)
                    && leasing_of(&self.policy, b.first).map_or(1, |l| l.replicas) == replicas
            });
            match batch {
                Some(b) => b.entries.push((entry, synced)),
                None => batches.push(Batch {
                    first: id.0,
                    half: synced.half,
                    entries: vec![(entry, synced)],
                }),
            }
        }
        for batch in batches {
            self.call(host, batch);
        }
    }

    /// Retires the next half of key `id`: its entry in the sync request.
    fn prepare(
        &mut self,
        host: &impl Host,
        id: &(usize, String),
        now: Nanos,
    ) -> Option<(SyncEntry, Synced)> {
        let rule = self.policy.rules.get(id.0)?;
        let leasing = leasing_of(&self.policy, id.0)?;
        let leased = self.keys.get_mut(id)?;
        if leased.in_flight {
            return None;
        }
        lease::cell_name(&mut self.name, &rule.name, leased.cell);
        // Halves take turns; a worker that found the key running low asks
        // for the emptier one, so that the other keeps serving meanwhile.
        let half = match cell::load(&self.backend, &self.name) {
            Ok(Some((c, _))) if leased.woken > 0 && c.owner == leased.owner => {
                c.emptier_half(leased.next_half, now)
            }
            _ => leased.next_half,
        };
        let retired = match cell::retire(&mut self.backend, &self.name, leased.owner, half) {
            Ok(Some((retired, _))) => retired,
            Ok(None) => return None, // busy cell: the next tick tries again
            Err(e) => {
                host.warn(&format!("sluice: cannot retire a lease: {e}"));
                return None;
            }
        };
        let usage = Usage {
            // A permit given back into the other half after the last
            // retire lowers the counter below what that retire read: no
            // demand, not a wrap to the most a lease may hold.
            admitted: retired.admitted.saturating_sub(leased.admitted_seen),
            // A worker that found the cell dry counted a miss there and
            // woke the service: the same demand, counted once. A key with
            // no cell yet has only the wakes.
            missed: retired.missed.max(leased.woken),
            over: now.since(leased.last_sync),
            last_grant: retired.held,
        };
        if usage.admitted > 0 || usage.missed > 0 {
            leased.last_active = now;
        }
        leased.admitted_seen = retired.admitted;
        leased.woken = 0;
        leased.in_flight = true;
        leased.last_sync = now;
        leased.next_half = 1usize.saturating_sub(half);
        let entry = SyncEntry {
            rule: rule.name.clone(),
            key: id.1.clone(),
            held: retired.held,
            used: retired.used,
            want: want(&usage, &leasing),
        };
        let synced = Synced {
            rule_index: id.0,
            key: id.1.clone(),
            half,
            sent_at: now,
        };
        Some((entry, synced))
    }

    /// Sends one `Sync` call for `batch`, as this Envoy's identity for the
    /// batch's half.
    fn call(&mut self, host: &impl Host, batch: Batch) {
        let Batch {
            first,
            half,
            entries,
        } = batch;
        let Some(sync) = self.policy.sync_of(first) else {
            return;
        };
        let leasing = leasing_of(&self.policy, first);
        let (entries, synced): (Vec<SyncEntry>, Vec<Synced>) = entries.into_iter().unzip();
        let request = SyncRequest {
            domain: sync.domain.clone(),
            replicas: leasing.as_ref().map_or(1, |l| l.replicas),
            entries,
            caller: format!("{}#{half}", self.caller),
            controls_version: Some(controls::published_version(&self.backend)),
        };
        self.last_call = host.now();
        // A sync slower than an interval is late anyway; never past a lease.
        let interval = leasing.map_or(Span::ZERO, |l| l.interval);
        let timeout = sync.timeout.max(interval).min(LEASE_TIME);
        let cluster = sync.cluster.clone();
        match host.grpc_call(
            &cluster,
            SERVICE,
            SYNC_METHOD,
            &request.encode_to_vec(),
            timeout,
        ) {
            Some(token) => {
                self.calls.insert(token, synced);
            }
            None => self.failed(host, synced, "the call could not start"),
        }
    }

    /// Writes the leases of call `token` from its `answer` (the response
    /// message, or the gRPC status the call failed with).
    pub fn on_sync_answer(&mut self, host: &impl Host, token: u32, answer: Result<&[u8], u32>) {
        let Some(synced) = self.calls.remove(&token) else {
            return;
        };
        let leases = match answer {
            Ok(bytes) if bytes.len() > MAX_ANSWER_BYTES => {
                return self.failed(host, synced, "answer over 9 MiB");
            }
            Ok(bytes) => match SyncResponse::decode(bytes) {
                Ok(r) if r.leases.len() >= synced.len() => {
                    if let Some(c) = &r.controls {
                        if let Err(e) = controls::publish(&mut self.backend, c, host.now()) {
                            host.warn(&format!("sluice: {e}"));
                        }
                    }
                    r.leases
                }
                _ => return self.failed(host, synced, "unreadable answer"),
            },
            Err(status) => {
                return self.failed(host, synced, &format!("gRPC status {status}"));
            }
        };
        if self.failing {
            self.failing = false;
            host.warn("sluice: syncing leases with the quota server again");
        }
        let now = host.now();
        for (s, l) in synced.into_iter().zip(leases) {
            let unknown = Code::try_from(l.code) == Ok(Code::UnknownLimit);
            if unknown && self.unknown.insert(s.rule_index) {
                host.warn(&format!(
                    "sluice: the quota server has no rule {:?} in the rule's domain",
                    self.policy
                        .rules
                        .get(s.rule_index)
                        .map_or("", |r| r.name.as_str())
                ));
            }
            let grant = grant(&l, s.sent_at, unknown);
            self.settle(host, s, Some(grant), now);
        }
    }

    /// Empties the halves of a failed call's keys: the quota server may
    /// have taken their unused permits back, so they are not reported again.
    fn failed(&mut self, host: &impl Host, synced: Vec<Synced>, why: &str) {
        if !self.failing {
            self.failing = true;
            host.warn(&format!(
                "sluice: syncing leases with the quota server failed ({why}); requests of \
                 leased rules are decided per request until it answers"
            ));
        }
        let now = host.now();
        for s in synced {
            self.settle(host, s, None, now);
        }
    }

    /// Writes `grant` (or, without one, an empty lease) into the synced
    /// half, and drops the key if it is idle with nothing leased.
    fn settle(&mut self, host: &impl Host, s: Synced, grant: Option<Grant>, now: Nanos) {
        let (Some(rule), Some(leasing)) = (
            self.policy.rules.get(s.rule_index),
            leasing_of(&self.policy, s.rule_index),
        ) else {
            return;
        };
        let id = (s.rule_index, s.key);
        let Some(leased) = self.keys.get_mut(&id) else {
            return;
        };
        leased.in_flight = false;
        lease::cell_name(&mut self.name, &rule.name, leased.cell);
        let written = match &grant {
            Some(g) => cell::install(&mut self.backend, &self.name, leased.owner, s.half, g),
            None => cell::clear(&mut self.backend, &self.name, leased.owner, s.half),
        };
        if let Err(e) = written {
            host.warn(&format!("sluice: cannot write a lease: {e}"));
        }
        if let Some(g) = leased.granted.get_mut(s.half) {
            *g = grant.map_or(0, |g| g.permits);
        }
        let idle = now.since(leased.last_active) > idle_after(&leasing);
        if idle && leased.granted == [0, 0] {
            let (cell, owner) = (leased.cell, leased.owner);
            if let Err(e) = cell::release(&mut self.backend, &self.name, owner) {
                host.warn(&format!("sluice: cannot free a lease cell: {e}"));
            }
            self.keys.remove(&id);
            self.cells.remove(&(id.0, cell));
            if let Some(n) = self.per_rule.get_mut(id.0) {
                *n = n.saturating_sub(1);
            }
        }
    }
}

/// The leasing options of the rule at `rule_index`, if it is leased.
fn leasing_of(policy: &Policy, rule_index: usize) -> Option<Leasing> {
    match policy.sync_of(rule_index)?.mode {
        SyncMode::Leased(leasing) => Some(leasing),
        SyncMode::Exact => None,
    }
}

/// A lease as a cell's grant; times count from `sent_at`, before the
/// quota server started them, so the lease ends no later than it says.
/// An unknown rule leases nothing (its requests keep asking the quota
/// server, which applies the rule's failure mode).
fn grant(lease: &Lease, sent_at: Nanos, unknown: bool) -> Grant {
    let after = |d: &Option<sluice_proto::Duration>| d.as_ref().map_or(Span::ZERO, span);
    Grant {
        permits: if unknown { 0 } else { lease.permits },
        expires_at: sent_at.plus(after(&lease.expires_after).min(LEASE_TIME)),
        remaining: if unknown { u64::MAX } else { lease.remaining },
        limit: lease.limit,
        window: after(&lease.window),
        reset_at: sent_at.plus(after(&lease.reset_after)),
    }
}
