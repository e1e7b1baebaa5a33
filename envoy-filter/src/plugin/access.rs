//! Access controls on every request, before the rules: deny-listed and
//! banned clients are refused, allow-listed ones bypass every rule. The
//! configuration's own lists and the quota server's (only a policy with
//! synced rules syncs with a quota server) are judged together: a deny in
//! either wins over an allow in either.
//!
//! A request's client IP is the filter's own (`client_ip` settings), and
//! its keys are those its synced rules computed: a key ban matches a
//! request when it equals one of them, the key the quota server is asked
//! about for that rule.

use sluice_core::access::{judge, Access};
use sluice_core::policy::HttpRequest;
use sluice_core::store::SharedBytes;
use sluice_core::time::Nanos;
use sluice_proto::quota::v1::Controls;

use super::{Plugin, Step};
use crate::controls::publish;
use crate::host::Host;
use crate::http::forbidden;
use crate::metrics::AccessOutcome;

impl<B: SharedBytes> Plugin<B> {
    /// Takes the controls another VM published, if they changed, and drops
    /// expired entries.
    pub(super) fn poll_controls(&mut self, host: &impl Host) {
        if self.policy.synced.is_empty() {
            return;
        }
        if let Err(e) = self.controls.poll(self.store.backend_mut()) {
            self.metrics.error(host);
            host.warn(&format!("sluice: {e}"));
        }
        if !self.controls.is_empty() {
            self.controls.expire(host.now());
        }
    }

    /// Takes `controls` from a quota server's answer, and publishes them
    /// for the other VMs.
    pub(super) fn adopt_controls(&mut self, host: &impl Host, controls: &Controls) {
        let now = host.now();
        let taken = self
            .controls
            .adopt(controls, now)
            .and_then(|()| publish(self.store.backend_mut(), controls, now));
        if let Err(e) = taken {
            self.metrics.error(host);
            host.warn(&format!("sluice: {e}"));
        }
    }

    /// What the access lists make of a request whose request-time rules
    /// have `keys`: a step when they decide it, `None` when its rules do.
    /// The clock is read into `now` (if not yet) only when lists exist, so
    /// the rules' decision in the same callback reuses it.
    pub(super) fn gate(
        &mut self,
        host: &impl Host,
        context_id: u32,
        request: &HttpRequest,
        keys: &[(usize, String)],
        now: &mut Option<Nanos>,
    ) -> Option<Step> {
        if self.policy.access.is_empty() && self.controls.is_empty() {
            return None;
        }
        let synced = keys
            .iter()
            .filter(|(i, _)| self.policy.sync_of(*i).is_some())
            .map(|(_, key)| key.as_str());
        let lists = [&self.policy.access, self.controls.lists()];
        let now = *now.get_or_insert_with(|| host.now());
        match judge(lists, request.client_ip, synced, now) {
            Access::Neutral => None,
            Access::Allowed => {
                self.metrics.access(host, AccessOutcome::Allowed);
                Some(Step::Continue)
            }
            Access::Denied => {
                self.metrics.access(host, AccessOutcome::Denied);
                let protocol = self.answering_protocol(host, request.protocol);
                self.answered_locally(context_id, protocol);
                Some(Step::Reply(forbidden(protocol)))
            }
        }
    }
}
