//! gRPC calls cut after their response started: each waits until its
//! deadline for the upstream to end it (the client then sees the cut's
//! status in the trailers), and is reset on the first tick after that.

use sluice_core::time::Nanos;

/// Cut calls and the time to reset each.
#[derive(Debug, Default)]
pub(super) struct CutCalls {
    deadlines: Vec<(u32, Nanos)>,
}

impl CutCalls {
    /// Resets `context_id` at `deadline` unless it ends first.
    pub(super) fn push(&mut self, context_id: u32, deadline: Nanos) {
        self.forget(context_id);
        self.deadlines.push((context_id, deadline));
    }

    /// The call ended (or was reset): nothing to do for it any more.
    pub(super) fn forget(&mut self, context_id: u32) {
        self.deadlines.retain(|(id, _)| *id != context_id);
    }

    /// Removes and returns the calls whose deadline has come.
    pub(super) fn take_due(&mut self, now: Nanos) -> Vec<u32> {
        let (due, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.deadlines)
            .into_iter()
            .partition(|(_, deadline)| *deadline <= now);
        self.deadlines = waiting;
        due.into_iter().map(|(id, _)| id).collect()
    }

    /// Whether any call awaits its reset.
    pub(super) fn is_empty(&self) -> bool {
        self.deadlines.is_empty()
    }
}
