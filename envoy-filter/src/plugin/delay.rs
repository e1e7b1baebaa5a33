//! Requests a `delay` rule makes wait: queued with the time to decide
//! them again, and released (or refused) on the VM's ticks, which also
//! poll for the quota server's access controls.

use sluice_core::engine::{self, Costs, Verdict};
use sluice_core::policy::Protocol;
use sluice_core::store::SharedBytes;
use sluice_core::time::Nanos;

use super::{Decided, Plugin, Wake};
use crate::controls::CONTROLS_TICK_MILLIS;
use crate::host::Host;
use crate::metrics::FLUSH_TICK_MILLIS;

/// How often a VM with delayed requests or cut calls checks them again. A
/// delayed request is released at most this late after its permit frees
/// up, and a cut call reset at most this late after its grace.
pub const DELAY_TICK_MILLIS: u32 = 10;

/// A request awaiting its request-time verdict: decided at once, and kept
/// in the [`DelayQueue`] while a delay rule makes it wait.
#[derive(Debug)]
pub(super) struct DelayedRequest {
    /// Envoy's id for the request.
    pub(super) context_id: u32,
    /// When to decide it again.
    pub(super) wake_at: Nanos,
    /// When it was first decided: its wait so far counts against `max_delay`.
    pub(super) since: Nanos,
    /// HTTP, gRPC or WebSocket.
    pub(super) protocol: Protocol,
    /// Request-time rules and their keys.
    pub(super) keys: Vec<(usize, String)>,
    /// What the request costs under the rules whose cost it sets.
    pub(super) costs: Costs,
    /// Stream rules and their keys, watched once it is admitted.
    pub(super) stream_keys: Vec<(usize, String)>,
}

/// The requests waiting out a delay.
#[derive(Debug, Default)]
pub(super) struct DelayQueue {
    requests: Vec<DelayedRequest>,
}

impl DelayQueue {
    /// Queues a request until its `wake_at`.
    pub(super) fn push(&mut self, request: DelayedRequest) {
        self.requests.push(request);
    }

    /// Removes and returns the requests due at `now`.
    fn take_due(&mut self, now: Nanos) -> Vec<DelayedRequest> {
        let (due, waiting) = std::mem::take(&mut self.requests)
            .into_iter()
            .partition(|r| r.wake_at <= now);
        self.requests = waiting;
        due
    }

    /// Drops a request the client abandoned.
    pub(super) fn forget(&mut self, context_id: u32) {
        self.requests.retain(|r| r.context_id != context_id);
    }

    /// How many waiting requests count against `rule_index` with `key`.
    fn queued_on(&self, rule_index: usize, key: &str) -> usize {
        self.requests
            .iter()
            .filter(|r| r.keys.iter().any(|(i, k)| *i == rule_index && k == key))
            .count()
    }

    /// Whether no request is waiting.
    fn is_empty(&self) -> bool {
        self.requests.is_empty()
    }
}

impl<B: SharedBytes> Plugin<B> {
    /// Releases or refuses delayed requests whose wait is over, and
    /// resets cut gRPC calls whose grace is over.
    pub fn on_tick(&mut self, host: &impl Host) -> Vec<(u32, Wake)> {
        self.poll_controls(host);
        let now = host.now();
        let mut wakes = Vec::new();
        for request in self.delayed.take_due(now) {
            let context_id = request.context_id;
            if let Decided::Now(wake) = self.decide(host, request, now) {
                wakes.push((context_id, wake));
            }
        }
        wakes.extend(
            self.cuts
                .take_due(now)
                .into_iter()
                .map(|id| (id, Wake::Reset)),
        );
        // A tick that runs only for the stats flushes; faster ones (waiting
        // requests, cut calls, synced rules) flush no more often than
        // requests do, or the batching would be undone.
        if self.tick_millis() == FLUSH_TICK_MILLIS {
            self.metrics.flush(host);
        } else {
            self.metrics.flush_if_due(host, now);
        }
        self.ask_ticks(host);
        wakes
    }

    /// The tick period to ask for: often while requests wait or calls
    /// are cut, else as often as a policy with synced rules polls for
    /// access controls, else while stats increments wait for a flush,
    /// else none.
    pub(super) fn tick_millis(&self) -> u32 {
        if !self.delayed.is_empty() || !self.cuts.is_empty() {
            DELAY_TICK_MILLIS
        } else if !self.policy.synced.is_empty() {
            CONTROLS_TICK_MILLIS
        } else if self.metrics.has_pending() {
            FLUSH_TICK_MILLIS
        } else {
            0
        }
    }

    /// A new request's wait behind the requests already waiting on its
    /// delay rules' keys (see [`engine::behind_queue`]).
    pub(super) fn behind_queue(
        &mut self,
        verdict: Verdict,
        keys: &[(usize, String)],
        now: Nanos,
    ) -> Verdict {
        let delayed = &self.delayed;
        engine::behind_queue(&self.policy, &mut self.store, verdict, keys, now, |i, k| {
            delayed.queued_on(i, k)
        })
    }

    /// Requests currently delayed.
    pub fn delayed(&self) -> usize {
        self.delayed.requests.len()
    }
}
