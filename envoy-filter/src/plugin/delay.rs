//! Requests a `delay` rule makes wait: queued with the time to decide
//! them again, and released (or refused) on the VM's ticks.

use sluice_core::policy::Protocol;
use sluice_core::store::SharedBytes;
use sluice_core::time::Nanos;

use super::{Decided, Plugin, Wake};
use crate::host::Host;

/// How often a VM with delayed requests checks them again. A delayed
/// request is released at most this late after its permit frees up.
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

    /// The tick period to ask for: none once the queue is empty.
    fn tick_millis(&self) -> u32 {
        if self.requests.is_empty() {
            0
        } else {
            DELAY_TICK_MILLIS
        }
    }
}

impl<B: SharedBytes> Plugin<B> {
    /// Releases or refuses delayed requests whose wait is over.
    pub fn on_tick(&mut self, host: &impl Host) -> Vec<(u32, Wake)> {
        let now = host.now();
        let mut wakes = Vec::new();
        for request in self.delayed.take_due(now) {
            let context_id = request.context_id;
            if let Decided::Now(wake) = self.decide(host, request, now) {
                wakes.push((context_id, wake));
            }
        }
        host.set_tick_millis(self.delayed.tick_millis());
        wakes
    }

    /// Requests currently delayed.
    pub fn delayed(&self) -> usize {
        self.delayed.requests.len()
    }
}
