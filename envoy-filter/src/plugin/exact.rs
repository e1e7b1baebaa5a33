//! Requests whose synced rules (sync mode `exact`, or `leased` without a
//! lease with room) the quota server decides: once the local rules allow a request, one `Check` call carries
//! all its synced rules, and the request waits for the answer.
//!
//! All or nothing across local and remote rules: the local rules' permits
//! are given back when the quota server refuses, or when a synced rule
//! that fails closed cannot get an answer.

use sluice_core::engine::{self, Charge, RuleDecision, Verdict, VerdictKind};
use sluice_core::policy::OnFailure;
use sluice_core::store::SharedBytes;
use sluice_core::time::{Nanos, Span};

use super::delay::DelayedRequest;
use super::leased::LeaseTaken;
use super::{Decided, Plugin, Wake};
use crate::host::Host;
use crate::http::unavailable;
use crate::metrics::SyncOutcome;
use crate::quota::{Call, ItemAnswer, GRPC_DEADLINE_EXCEEDED, METHOD, SERVICE};

/// A request waiting for the quota server.
#[derive(Debug)]
pub(super) struct Asking {
    request: DelayedRequest,
    /// The local rules' allowing verdict: its permits are taken.
    local: Verdict,
    /// The synced rules and keys asked about, in call order.
    remote: Vec<(usize, String)>,
    /// Permits taken from leases for the request's other leased rules.
    leased: Vec<LeaseTaken>,
    call: Call,
    /// From when a failed call counts as timed out (see [`timed_out_from`]).
    timed_out_from: Nanos,
    /// A delay rule held the request before.
    delayed: bool,
}

/// From when a call made at `asked` with `timeout` that fails counts as
/// timed out. Envoy ends a call whose timeout passed with UNAVAILABLE, as it
/// does a refused connection, so what tells them apart is when; and its
/// timer counts from the start of its event loop's turn, so it fires up to
/// a few milliseconds before the filter's clock says the timeout passed:
/// the last quarter of the timeout counts.
fn timed_out_from(asked: Nanos, timeout: Span) -> Nanos {
    asked.plus(Span(
        timeout.as_nanos().saturating_sub(timeout.as_nanos() / 4),
    ))
}

/// Why the quota server did not decide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failure {
    /// No answer in time.
    Timeout,
    /// The call failed, its answer was unreadable, or the quota server
    /// does not know the rule.
    Failed,
}

impl<B: SharedBytes> Plugin<B> {
    /// Asks the quota server about `remote` (the request's synced rules and
    /// keys) for a request the local rules allowed with `local`.
    pub(super) fn ask(
        &mut self,
        host: &impl Host,
        request: DelayedRequest,
        local: Verdict,
        remote: Vec<(usize, String)>,
        leased: Vec<LeaseTaken>,
        delayed: bool,
    ) -> Decided {
        let version = self.controls.version();
        let Some(call) = Call::new(&self.policy, &remote, &request.costs, version) else {
            return Decided::Now(self.admit(host, request, local, delayed));
        };
        let token = host.grpc_call(&call.cluster, SERVICE, METHOD, &call.message, call.timeout);
        let asking = Asking {
            request,
            local,
            remote,
            timed_out_from: timed_out_from(host.now(), call.timeout),
            leased,
            call,
            delayed,
        };
        match token {
            Some(token) => {
                self.asking.insert(token, asking);
                Decided::Asking
            }
            None => {
                let cluster = asking.call.cluster.clone();
                self.quota_failed(host, || {
                    format!("cannot call the quota server on cluster {cluster:?}")
                });
                let failed = asking.remote.clone();
                Decided::Now(self.fail_over(host, asking, &failed, Failure::Failed))
            }
        }
    }

    /// Decides the request waiting for call `token` from its `answer`: the
    /// response message, or the gRPC status the call failed with. Returns
    /// the request's context id and what to do with it; `None` when no
    /// request waits for that call any more.
    pub fn on_quota_answer(
        &mut self,
        host: &impl Host,
        token: u32,
        answer: Result<&[u8], u32>,
    ) -> Option<(u32, Wake)> {
        let asking = self.asking.remove(&token)?;
        let context_id = asking.request.context_id;
        let items = match answer {
            Ok(bytes) => match asking.call.read(bytes) {
                Ok(answer) => {
                    if std::mem::take(&mut self.quota_failing) {
                        host.warn("sluice: the quota server answers again");
                    }
                    // The controls apply from the next request: this one
                    // the quota server has decided.
                    if let Some(controls) = &answer.controls {
                        self.adopt_controls(host, controls);
                    }
                    Ok(answer.items)
                }
                Err(e) => {
                    self.quota_failed(host, || e.to_string());
                    Err(Failure::Failed)
                }
            },
            Err(status)
                if status == GRPC_DEADLINE_EXCEEDED || host.now() >= asking.timed_out_from =>
            {
                Err(Failure::Timeout)
            }
            Err(status) => {
                self.quota_failed(host, || {
                    format!("the quota server call failed with gRPC status {status}")
                });
                Err(Failure::Failed)
            }
        };
        let wake = match items {
            Ok(items) => self.settle(host, asking, items),
            Err(failure) => {
                let failed = asking.remote.clone();
                self.fail_over(host, asking, &failed, failure)
            }
        };
        Some((context_id, wake))
    }

    /// Logs why a quota server call failed, once per outage: the failure
    /// modes' stats (`sluice_sync`) count every failed call.
    fn quota_failed(&mut self, host: &impl Host, why: impl FnOnce() -> String) {
        if !std::mem::replace(&mut self.quota_failing, true) {
            host.warn(&format!(
                "sluice: {}; the synced rules' failure modes apply, and further failures are \
                 only counted (sluice_sync) until the quota server answers again",
                why()
            ));
        }
    }

    /// Admits or refuses a request from the quota server's answers, one
    /// per synced item.
    fn settle(&mut self, host: &impl Host, mut asking: Asking, answers: Vec<ItemAnswer>) -> Wake {
        let mut unknown = Vec::new();
        let mut refused_by = None;
        for ((rule_index, key), answer) in asking.remote.iter().zip(answers) {
            match answer {
                ItemAnswer::Decided {
                    decision,
                    refused,
                    shadow_limited,
                } => {
                    self.metrics.sync(host, *rule_index, SyncOutcome::Ok);
                    asking.local.decisions.push(RuleDecision {
                        rule_index: *rule_index,
                        decision,
                        shadow_limited,
                        degraded: false,
                    });
                    if refused {
                        refused_by.get_or_insert(*rule_index);
                    }
                }
                ItemAnswer::Unknown => {
                    let name = self.rule_name(*rule_index);
                    host.warn(&format!(
                        "sluice: the quota server has no rule {name:?} in the rule's domain"
                    ));
                    unknown.push((*rule_index, key.clone()));
                }
            }
        }
        if let Some(rule_index) = refused_by {
            self.give_back_leases(host, &asking.leased);
            return self.refuse_all(host, asking.request, asking.local, rule_index);
        }
        self.fail_over(host, asking, &unknown, Failure::Failed)
    }

    /// Applies the failure mode of the synced rules in `failed` (the quota
    /// server did not decide them), then admits or refuses the request.
    fn fail_over(
        &mut self,
        host: &impl Host,
        asking: Asking,
        failed: &[(usize, String)],
        failure: Failure,
    ) -> Wake {
        let Asking {
            request,
            local: mut verdict,
            leased,
            delayed,
            ..
        } = asking;
        let mut closed_by = None;
        let mut fallback = Vec::new();
        for (rule_index, key) in failed {
            let on_failure = self.policy.sync_of(*rule_index).map(|s| s.on_failure);
            let outcome = match (failure, on_failure) {
                (Failure::Timeout, _) => SyncOutcome::Timeout,
                (Failure::Failed, Some(OnFailure::Refuse)) => SyncOutcome::FailedClosed,
                (Failure::Failed, _) => SyncOutcome::FailedOpen,
            };
            self.metrics.sync(host, *rule_index, outcome);
            match on_failure {
                Some(OnFailure::Refuse) => {
                    closed_by.get_or_insert(*rule_index);
                }
                Some(OnFailure::Fallback) => fallback.push((*rule_index, key.clone())),
                Some(OnFailure::Allow) | None => {}
            }
        }
        if let Some(rule_index) = closed_by {
            self.give_back_leases(host, &leased);
            self.give_back(host, &verdict.charges);
            let protocol = self.answering_protocol(host, request.protocol);
            self.answered_locally(request.context_id, protocol);
            return Wake::Reply(unavailable(self.rule_name(rule_index), protocol));
        }
        if !fallback.is_empty() {
            // The fallback limits are the synced rules' local quotas.
            let now = host.now();
            let costs = &request.costs;
            match engine::decide_keys(
                &self.policy,
                &mut self.store,
                &fallback,
                costs,
                now,
                Span::ZERO,
            ) {
                Ok(local) => {
                    verdict.decisions.extend(local.decisions);
                    // Synced rules reject, never delay: Wait does not occur.
                    if let VerdictKind::Limited { rule_index } = local.kind {
                        self.give_back_leases(host, &leased);
                        return self.refuse_all(host, request, verdict, rule_index);
                    }
                    verdict.charges.extend(local.charges);
                }
                Err(e) => {
                    self.metrics.error(host);
                    host.warn(&format!("sluice: fallback limit not applied: {e}"));
                }
            }
            self.report_keys(host);
        }
        verdict.decisions.sort_by_key(|d| d.rule_index);
        self.admit(host, request, verdict, delayed)
    }

    /// Refuses a request because of the rule at `rule_index` after its
    /// local rules took permits: gives them back first.
    fn refuse_all(
        &mut self,
        host: &impl Host,
        request: DelayedRequest,
        mut verdict: Verdict,
        rule_index: usize,
    ) -> Wake {
        self.give_back(host, &verdict.charges);
        verdict.charges.clear();
        verdict.kind = VerdictKind::Limited { rule_index };
        verdict.decisions.sort_by_key(|d| d.rule_index);
        self.refuse(
            host,
            request.context_id,
            request.protocol,
            &verdict,
            rule_index,
        )
    }

    /// Drops what a request that ended while waiting for the quota server
    /// kept, giving back its local permits.
    pub(super) fn forget_asking(&mut self, host: &impl Host, context_id: u32) {
        let tokens: Vec<u32> = self
            .asking
            .iter()
            .filter(|(_, a)| a.request.context_id == context_id)
            .map(|(token, _)| *token)
            .collect();
        for token in tokens {
            if let Some(asking) = self.asking.remove(&token) {
                self.give_back(host, &asking.local.charges);
                self.give_back_leases(host, &asking.leased);
            }
        }
    }

    /// Gives back permits a request took but will not use.
    pub(super) fn give_back(&mut self, host: &impl Host, charges: &[Charge]) {
        if charges.is_empty() {
            return;
        }
        if let Err(e) = engine::refund(&self.policy, &mut self.store, charges, host.now()) {
            self.metrics.error(host);
            host.warn(&format!("sluice: giving back local permits failed: {e}"));
        }
    }

    /// The name of the rule at `rule_index`.
    fn rule_name(&self, rule_index: usize) -> &str {
        self.policy
            .rules
            .get(rule_index)
            .map_or("", |r| r.name.as_str())
    }

    /// Requests waiting for the quota server.
    pub fn asking(&self) -> usize {
        self.asking.len()
    }
}
