//! Requests of leased rules (sync mode `leased`), decided in this VM from
//! the Envoy's leases in shared data (see `sluice_core::lease`):
//!
//! - a lease with room admits the request (one read and one
//!   compare-and-swap of the key's cell);
//! - when the last sync found the key's budget exhausted and it has not
//!   reset yet, the request is refused without asking anyone;
//! - otherwise (a new key, or its leases ran dry) the request is decided
//!   by the quota server as in exact mode, so it is never wrongly refused
//!   nor over the limit, and the sync service is woken through the demand
//!   queue to lease the key at once.
//!
//! Permits taken from a lease for a request that another rule then refuses
//! are given back while their lease still serves.

use std::collections::HashMap;

use sluice_core::decision::Decision;
use sluice_core::engine::{RuleDecision, Verdict, VerdictKind};
use sluice_core::lease::{self, cell, demand, Cell, Take, Taken};
use sluice_core::policy::{Leasing, SyncMode};
use sluice_core::store::SharedBytes;
use sluice_core::time::{Nanos, Span};

use super::delay::DelayedRequest;
use super::{Plugin, Wake};
use crate::host::Host;

/// Keys this VM remembers having sent to the service, at most: the table
/// is cleared when full (a key then may be sent once more).
const MAX_WOKEN: usize = 4096;

/// Permits taken from a lease for a request.
#[derive(Clone, Debug)]
pub(super) struct LeaseTaken {
    rule_index: usize,
    cell: u32,
    owner: u64,
    taken: Taken,
}

/// A rule (by position) and a key.
type RuleKey = (usize, String);

/// What a request's key found in its leases.
enum LeaseUse {
    /// Admitted: what was taken, and the cell as written.
    Taken(LeaseTaken, Cell),
    /// Refused: the budget is exhausted until then (as of the last sync).
    Exhausted(Cell, Nanos),
    /// The quota server decides (the service was woken).
    Ask,
}

/// Keys sent to the service lately, so that a key without lease wakes it
/// once per fraction of an interval, not once per request.
#[derive(Debug, Default)]
pub(super) struct Woken(HashMap<(usize, String), Nanos>);

impl<B: SharedBytes> Plugin<B> {
    /// Takes the leased items among `remote` (synced rules and keys of a
    /// request its local rules allowed with `verdict`) from their leases,
    /// adding their decisions to `verdict`. Returns the items left for the
    /// quota server and the permits taken, or the refusal when a key's
    /// budget is exhausted (everything taken is then given back).
    pub(super) fn use_leases(
        &mut self,
        host: &impl Host,
        request: &DelayedRequest,
        verdict: &mut Verdict,
        remote: Vec<RuleKey>,
        now: Nanos,
    ) -> Result<(Vec<RuleKey>, Vec<LeaseTaken>), Wake> {
        let mut ask = Vec::new();
        let mut taken = Vec::new();
        for (rule_index, key) in remote {
            let Some(leasing) = self.leasing(rule_index) else {
                ask.push((rule_index, key));
                continue;
            };
            let cost = request.costs.get(rule_index);
            let decision = match self.take_lease(host, rule_index, &key, cost, leasing, now) {
                LeaseUse::Taken(t, cell) => {
                    taken.push(t);
                    allowed(&cell, now)
                }
                LeaseUse::Exhausted(cell, retry_at) => exhausted(&cell, retry_at, now),
                LeaseUse::Ask => {
                    ask.push((rule_index, key));
                    continue;
                }
            };
            let refused = !decision.allowed;
            verdict.decisions.push(RuleDecision {
                rule_index,
                decision,
                shadow_limited: false,
                degraded: false,
            });
            if refused {
                self.give_back_leases(host, &taken);
                self.give_back(host, &verdict.charges);
                verdict.charges.clear();
                verdict.decisions.sort_by_key(|d| d.rule_index);
                verdict.kind = VerdictKind::Limited { rule_index };
                return Err(self.refuse(
                    host,
                    request.context_id,
                    request.protocol,
                    verdict,
                    rule_index,
                ));
            }
        }
        Ok((ask, taken))
    }

    /// The leasing options of the rule at `rule_index`, if it is leased.
    fn leasing(&self, rule_index: usize) -> Option<Leasing> {
        match self.policy.sync_of(rule_index)?.mode {
            SyncMode::Leased(leasing) => Some(leasing),
            SyncMode::Exact => None,
        }
    }

    /// Takes the request's `cost` under the rule (`None`: the rule's own
    /// cost) for `key` from its leases.
    fn take_lease(
        &mut self,
        host: &impl Host,
        rule_index: usize,
        key: &str,
        cost: Option<u64>,
        leasing: Leasing,
        now: Nanos,
    ) -> LeaseUse {
        let Some(rule) = self.policy.rules.get(rule_index) else {
            return LeaseUse::Ask;
        };
        let owner = lease::fingerprint(self.store.seed(), &rule.name, key);
        let cost = cost.unwrap_or(rule.cost);
        let found = cell::take(
            self.store.backend_mut(),
            &mut self.lease_name,
            &rule.name,
            leasing.max_keys,
            owner,
            cost,
            now,
        );
        let found = match found {
            Ok(found) => found,
            Err(e) => {
                self.metrics.error(host);
                host.warn(&format!("sluice: reading a lease failed: {e}"));
                None
            }
        };
        match found {
            Some((index, Take::Taken(taken), cell)) => {
                if cell.runs_low(now) {
                    self.wake_service(host, rule_index, key, leasing, now);
                }
                LeaseUse::Taken(
                    LeaseTaken {
                        rule_index,
                        cell: index,
                        owner,
                        taken,
                    },
                    cell,
                )
            }
            Some((_, Take::Exhausted { retry_at }, cell)) => LeaseUse::Exhausted(cell, retry_at),
            Some((_, Take::Empty, _)) | None => {
                self.wake_service(host, rule_index, key, leasing, now);
                LeaseUse::Ask
            }
        }
    }

    /// Tells the sync service that `key` of the rule at `rule_index` has no
    /// lease with room or is running low, at most once per quarter interval
    /// per key and VM.
    fn wake_service(
        &mut self,
        host: &impl Host,
        rule_index: usize,
        key: &str,
        leasing: Leasing,
        now: Nanos,
    ) {
        let id = (rule_index, key.to_owned());
        let again_after = Span(leasing.interval.as_nanos() / 4);
        if self
            .woken
            .0
            .get(&id)
            .is_some_and(|&at| now < at.plus(again_after))
        {
            return;
        }
        let Some(rule) = self.policy.rules.get(rule_index) else {
            return;
        };
        // A key too long to lease is always decided by the quota server.
        let Some(message) = demand::encode(&rule.name, key) else {
            return;
        };
        if self.woken.0.len() >= MAX_WOKEN {
            self.woken.0.clear();
        }
        if host.enqueue(lease::DEMAND_QUEUE, &message) {
            self.woken.0.insert(id, now);
        }
    }

    /// Gives back permits taken from leases for a request refused after all.
    pub(super) fn give_back_leases(&mut self, host: &impl Host, taken: &[LeaseTaken]) {
        for t in taken {
            let Some(rule) = self.policy.rules.get(t.rule_index) else {
                continue;
            };
            lease::cell_name(&mut self.lease_name, &rule.name, t.cell);
            let backend = self.store.backend_mut();
            if let Err(e) = cell::give_back(backend, &self.lease_name, t.owner, &t.taken) {
                self.metrics.error(host);
                host.warn(&format!("sluice: giving back a leased permit failed: {e}"));
            }
        }
    }
}

/// A leased admission's decision, as of the key's last sync: the budget
/// left then plus this Envoy's leases' room.
fn allowed(cell: &Cell, now: Nanos) -> Decision {
    let mut remaining = cell.remaining.saturating_add(cell.room(now));
    if cell.limit > 0 {
        remaining = remaining.min(cell.limit);
    }
    Decision {
        allowed: true,
        limit: cell.limit,
        capacity: cell.limit,
        window: cell.window,
        remaining,
        reset_after: cell.reset_at.since(now),
        retry_after: Span::ZERO,
    }
}

/// The refusal of a key whose budget is exhausted until `retry_at`.
fn exhausted(cell: &Cell, retry_at: Nanos, now: Nanos) -> Decision {
    Decision {
        allowed: false,
        limit: cell.limit,
        capacity: cell.limit,
        window: cell.window,
        remaining: 0,
        reset_after: retry_at.since(now),
        retry_after: retry_at.since(now),
    }
}
