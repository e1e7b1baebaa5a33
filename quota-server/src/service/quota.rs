//! Sluice's own API, `sluice.quota.v1.Quota` (`proto/sluice/quota/v1/quota.proto`):
//! batched checks of named rules, and leases for distributed callers.
//! Both pass through the admin controls and are counted in the metrics as
//! `ShouldRateLimit` is (see `super::admission`), and both answers carry
//! the controls to a caller whose `controls_version` is stale.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_core::algorithm::{AlgorithmKind, Outcome};
use sluice_core::decision::Decision;
use sluice_core::time::{Nanos, Span};
use tonic::{Request, Response, Status};

use super::admission::{admit, count_settled, decide, overridden, Admission};
use super::bounds;
use super::decide::{storage_failed, Decider, Source};
use super::leases::{LeaseId, Leases, REFUND_GRACE};
use super::rls::{duration, headers};
use super::sync::{self, storage_key, Entry, Grant};
use crate::config::FailureMode;
use crate::controls::Gate;
use crate::limits::{Domain, Limit, Limits, Resolved};
use crate::metrics::Outcome as MetricOutcome;
use crate::proto::quota_server::Quota;
use crate::proto::{
    CheckGroup, CheckRequest, CheckResponse, Code, GroupResult, Header, ItemResult, Lease,
    Source as ProtoSource, SyncRequest, SyncResponse,
};
use crate::shared::Shared;
use crate::storage::{system_now, Item};

/// The `Quota` gRPC service over the shared state.
#[derive(Debug)]
pub struct QuotaService {
    shared: Arc<Shared>,
    decider: Arc<Decider>,
    leases: Leases,
}

impl QuotaService {
    /// A service reading limits from `shared` and deciding with `decider`.
    pub fn new(shared: Arc<Shared>, decider: Arc<Decider>) -> QuotaService {
        QuotaService {
            shared,
            decider,
            leases: Leases::default(),
        }
    }
}

#[tonic::async_trait]
impl Quota for QuotaService {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        bounds::check_request(request.get_ref())?;
        let limits = self.shared.limits();
        let with_headers = !request.get_ref().omit_headers;
        let mut groups = Vec::with_capacity(request.get_ref().groups.len());
        for group in &request.get_ref().groups {
            groups.push(self.check_group(&limits, group, with_headers).await?);
        }
        let controls = self
            .shared
            .controls
            .for_caller(request.get_ref().controls_version, system_now());
        Ok(Response::new(CheckResponse { groups, controls }))
    }

    async fn sync(&self, request: Request<SyncRequest>) -> Result<Response<SyncResponse>, Status> {
        let request = request.into_inner();
        bounds::sync_request(&request)?;
        let controls = self
            .shared
            .controls
            .for_caller(request.controls_version, system_now());
        let limits = self.shared.limits();
        let unknown = Lease {
            code: Code::UnknownLimit as i32,
            ..Lease::default()
        };
        let Some(domain) = limits.domain(&request.domain) else {
            return Ok(Response::new(SyncResponse {
                leases: request.entries.iter().map(|_| unknown).collect(),
                source: ProtoSource::Storage as i32,
                controls,
            }));
        };
        if let Some(e) = request.entries.iter().find(|e| e.used > e.held) {
            return Err(Status::invalid_argument(format!(
                "rule {:?} key {:?}: used ({}) exceeds the lease held ({})",
                e.rule, e.key, e.used, e.held
            )));
        }
        // A caller batches the keys of many clients: the access lists judge
        // each key alone, so that one banned or allow-listed key settles
        // its own entry, not the others'.
        let now_ns = system_now();
        let mut verdicts = Vec::with_capacity(request.entries.len());
        let mut grants = Vec::with_capacity(request.entries.len());
        for e in &request.entries {
            let (verdict, grant) = match self.shared.controls.gate_keys([e.key.as_str()], now_ns) {
                Gate::Limits(g) => (None, g.into_iter().next().flatten()),
                Gate::Allowed => (Some(true), None),
                Gate::Denied => (Some(false), None),
            };
            if let Some(allowed) = verdict {
                count_settled(&self.shared, domain, allowed);
            }
            verdicts.push(verdict);
            grants.push(grant);
        }
        let resolved = request
            .entries
            .iter()
            .map(|e| resolve(&limits, domain, &e.rule))
            .collect();
        let overridden = overridden(resolved, grants);
        let mut entries = Vec::with_capacity(request.entries.len());
        let mut entry_of = Vec::with_capacity(request.entries.len());
        // Per storage entry, its lease's id and the request's entry.
        let mut asked = Vec::with_capacity(request.entries.len());
        for (index, e) in request.entries.iter().enumerate() {
            if let Some(&Some(allowed)) = verdicts.get(index) {
                entry_of.push(Slot::Settled(allowed, e.want));
                continue;
            }
            if overridden.unlimited(index) {
                entry_of.push(Slot::Settled(true, e.want));
                continue;
            }
            let limit = overridden.limit(index);
            if limit.is_some_and(|l| {
                entries
                    .iter()
                    .any(|o: &Entry<'_>| o.limit.id == l.id && o.key == e.key)
            }) {
                return Err(Status::invalid_argument(format!(
                    "rule {:?} key {:?} appears twice; sync each key once",
                    e.rule, e.key
                )));
            }
            entry_of.push(limit.map_or(Slot::Unknown, |limit| {
                entries.push(Entry {
                    limit,
                    key: e.key.clone(),
                    unused: 0,
                    want: e.want,
                });
                asked.push((
                    LeaseId::new(&request.caller, &domain.name, &e.rule, &e.key),
                    e,
                ));
                Slot::Entry(entries.len() - 1)
            }));
        }
        // Only what this caller was leased and has not had back returns,
        // whatever it says it held.
        let now = Instant::now();
        for (entry, (id, e)) in entries.iter_mut().zip(&asked) {
            let leased = self.leases.take(id, now);
            entry.unused = e.held.min(leased).saturating_sub(e.used);
        }
        let replicas = u64::from(request.replicas.max(1));
        // Not timed: a sync is several storage calls, and the latency
        // histogram is of single calls.
        let (grants, source) = match sync::sync(&self.shared.store, &entries, replicas).await {
            Ok(grants) => (grants, Source::Storage),
            Err(error) => {
                storage_failed(&self.shared, domain, &error);
                // Nothing can be leased without storage: the caller falls
                // back on its local limit (open) or denies (closed).
                (
                    vec![Grant::none(0, Span::ZERO); entries.len()],
                    failed_source(domain),
                )
            }
        };
        for ((grant, (id, _)), entry) in grants.iter().zip(&asked).zip(&entries) {
            if grant.permits > 0 && source == Source::Storage {
                let expires = Duration::from_nanos(grant.expires_after.as_nanos());
                let refundable =
                    refundable_for(entry.limit, expires, self.shared.store.call_bound());
                self.leases
                    .record(*id, grant.permits, now + refundable, now);
            }
            self.shared.metrics.decision(
                &domain.name,
                entry.limit,
                lease_outcome(entry, grant, source),
            );
        }
        let leases = entry_of
            .iter()
            .map(|at| match at {
                Slot::Unknown => unknown,
                Slot::Settled(allowed, want) => settled_lease(*allowed, *want),
                Slot::Entry(i) => lease(&grants[*i], entries[*i].limit, source, now_ns),
            })
            .collect();
        Ok(Response::new(SyncResponse {
            leases,
            source: proto_source(source) as i32,
            controls,
        }))
    }
}

impl QuotaService {
    /// Decides one group; its rate-limit headers only `with_headers`.
    async fn check_group(
        &self,
        limits: &Limits,
        group: &CheckGroup,
        with_headers: bool,
    ) -> Result<GroupResult, Status> {
        let unknown = || ItemResult {
            code: Code::UnknownLimit as i32,
            ..ItemResult::default()
        };
        let mut results: Vec<ItemResult> = group.items.iter().map(|_| unknown()).collect();
        let Some(domain) = limits.domain(&group.domain) else {
            return Ok(GroupResult {
                allowed: true,
                items: results,
                headers: Vec::new(),
                source: ProtoSource::Storage as i32,
            });
        };
        let gate = self
            .shared
            .controls
            .gate_keys(group.items.iter().map(|it| it.key.as_str()), system_now());
        let resolved = group
            .items
            .iter()
            .map(|it| resolve(limits, domain, &it.rule))
            .collect();
        let overridden = match admit(&self.shared, domain, gate, resolved) {
            Admission::Limits(overridden) => overridden,
            Admission::Settled(allowed) => {
                let code = if allowed { Code::Ok } else { Code::OverLimit };
                results.iter_mut().for_each(|r| r.code = code as i32);
                return Ok(GroupResult {
                    allowed,
                    items: results,
                    headers: Vec::new(),
                    source: ProtoSource::Storage as i32,
                });
            }
        };
        let mut items: Vec<Item<'_>> = Vec::with_capacity(group.items.len());
        let mut index_of = Vec::with_capacity(group.items.len());
        for (index, it) in group.items.iter().enumerate() {
            if overridden.unlimited(index) {
                results[index].code = Code::Ok as i32;
                continue;
            }
            let Some(limit) = overridden.limit(index) else {
                continue;
            };
            let key = storage_key(limit, &it.key);
            // One counter is read once per batch (storage decides each item
            // against the state before the batch).
            if items.iter().any(|i| i.limit.id == limit.id && i.key == key) {
                return Err(Status::invalid_argument(format!(
                    "group {:?} names rule {:?} key {:?} twice; add the costs into one item",
                    group.domain, it.rule, it.key
                )));
            }
            items.push(Item {
                limit,
                key,
                cost: it.cost.max(1),
                enforce: !limit.shadow,
            });
            index_of.push(index);
        }
        let decided = decide(&self.shared, &self.decider, limits, domain, &items).await;
        let Some(outcomes) = &decided.outcomes else {
            // Failed open without a fallback: allowed, with nothing known.
            for (item, &index) in items.iter().zip(&index_of) {
                results[index] = ItemResult {
                    code: Code::Ok as i32,
                    limit: item.limit.quota().count(),
                    window: Some(duration(item.limit.window_length(system_now()))),
                    ..ItemResult::default()
                };
            }
            return Ok(GroupResult {
                allowed: true,
                items: results,
                headers: Vec::new(),
                source: proto_source(decided.source) as i32,
            });
        };
        let mut allowed = true;
        let now = system_now();
        let mut decisions: Vec<(&str, Decision)> = Vec::with_capacity(items.len());
        for ((item, outcome), &index) in items.iter().zip(outcomes).zip(&index_of) {
            allowed &= outcome.allowed || !item.enforce;
            results[index] = item_result(item.limit, outcome, now);
            if item.enforce && with_headers {
                decisions.push((&*item.limit.name, item.limit.decision(outcome, now)));
            }
        }
        Ok(GroupResult {
            allowed,
            items: results,
            headers: headers(&decisions, |name, value| Header { name, value }),
            source: proto_source(decided.source) as i32,
        })
    }
}

fn item_result(limit: &Limit, outcome: &Outcome, now: Nanos) -> ItemResult {
    ItemResult {
        code: if outcome.allowed {
            Code::Ok
        } else {
            Code::OverLimit
        } as i32,
        limit: limit.quota().count(),
        window: Some(duration(limit.window_length(now))),
        remaining: outcome.remaining,
        reset_after: Some(duration(outcome.reset_after)),
        retry_after: (outcome.retry_after != Span::NEVER).then(|| duration(outcome.retry_after)),
    }
}

/// Where a sync entry's lease comes from.
enum Slot {
    /// The rule is not configured.
    Unknown,
    /// Allow-listed or lifted by an override (`true`: the wanted permits,
    /// not counted), or banned (`false`: none).
    Settled(bool, u64),
    /// The position of its storage entry.
    Entry(usize),
}

/// A named rule of `domain` as the admin controls see it.
fn resolve<'a>(limits: &'a Limits, domain: &Domain, rule: &str) -> Resolved<'a> {
    limits
        .rule(domain, rule)
        .map_or(Resolved::NoLimit, Resolved::Limited)
}

/// A lease decided by the admin controls alone: `want` permits for the
/// lease time when allowed, none when refused; nothing counted.
fn settled_lease(allowed: bool, want: u64) -> Lease {
    if !allowed {
        return Lease {
            code: Code::OverLimit as i32,
            ..Lease::default()
        };
    }
    Lease {
        code: Code::Ok as i32,
        permits: want,
        expires_after: Some(duration(sync::LEASE_TIME)),
        ..Lease::default()
    }
}

/// The metrics outcome of one sync entry: refused when it wanted permits
/// and got none.
fn lease_outcome(entry: &Entry<'_>, grant: &Grant, source: Source) -> MetricOutcome {
    match source {
        Source::FailedOpen => MetricOutcome::FailureOpen,
        Source::FailedClosed => MetricOutcome::FailureClosed,
        Source::Storage if entry.want > 0 && grant.permits == 0 => {
            if entry.limit.shadow {
                MetricOutcome::Shadow
            } else {
                MetricOutcome::OverLimit
            }
        }
        Source::Storage => MetricOutcome::Ok,
    }
}

fn lease(grant: &Grant, limit: &Limit, source: Source, now: Nanos) -> Lease {
    let code = match source {
        Source::FailedClosed => Code::OverLimit,
        _ if grant.permits == 0 && grant.remaining == 0 && source == Source::Storage => {
            Code::OverLimit
        }
        _ => Code::Ok,
    };
    Lease {
        code: code as i32,
        permits: grant.permits,
        expires_after: Some(duration(grant.expires_after)),
        remaining: grant.remaining,
        limit: limit.quota().count(),
        window: Some(duration(limit.window_length(now))),
        reset_after: Some(duration(grant.reset_after)),
    }
}

/// Least time a fixed window's refund is taken before its lease ends.
const MIN_REFUND_MARGIN: Duration = Duration::from_millis(10);

/// How long after it was granted a lease of `expires` may give its unused
/// permits back, when a storage call takes at most `call_bound`. Other
/// algorithms: until a grace after its expiry. A fixed window: only while
/// its window surely lasts. The lease ends with the window its permits were
/// counted in, and a refund is taken from the ledger before the storage
/// call that applies it, so the margin keeps a late call from landing in
/// the next window's count (which would then admit more than its limit).
fn refundable_for(limit: &Limit, expires: Duration, call_bound: Duration) -> Duration {
    if limit.algorithm() == AlgorithmKind::FixedWindow {
        expires.saturating_sub(call_bound.max(MIN_REFUND_MARGIN))
    } else {
        expires + REFUND_GRACE
    }
}

fn failed_source(domain: &Domain) -> Source {
    match domain.failure_mode {
        FailureMode::Open => Source::FailedOpen,
        FailureMode::Closed => Source::FailedClosed,
    }
}

fn proto_source(source: Source) -> ProtoSource {
    match source {
        Source::Storage => ProtoSource::Storage,
        Source::FailedOpen => ProtoSource::FailedOpen,
        Source::FailedClosed => ProtoSource::FailedClosed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BackendKind, DescriptorFile, DomainConfig, Problems};

    /// Limit `a` (fixed window) and `b` (token bucket) of domain `d`.
    fn limits() -> Limits {
        let file: DescriptorFile = serde_norway::from_str(
            r#"
domain: d
descriptors:
  - {key: a, rate_limit: {unit: second, requests_per_unit: 5, algorithm: fixed_window}}
  - {key: b, rate_limit: {unit: second, requests_per_unit: 5, algorithm: token_bucket}}
"#,
        )
        .unwrap();
        let domain = DomainConfig {
            name: file.domain,
            descriptors: file.descriptors,
            ..DomainConfig::default()
        };
        let mut problems = Problems::default();
        let limits = Limits::build(&[("d".into(), domain)], BackendKind::Memory, &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        limits
    }

    #[test]
    fn a_fixed_window_refund_must_be_taken_a_storage_call_before_its_window_ends() {
        let limits = limits();
        let (fixed, bucket) = (limits.limit(0).unwrap(), limits.limit(1).unwrap());
        assert_eq!(fixed.algorithm(), AlgorithmKind::FixedWindow);
        let ms = Duration::from_millis;
        assert_eq!(refundable_for(fixed, ms(400), ms(150)), ms(250));
        assert_eq!(refundable_for(fixed, ms(400), Duration::ZERO), ms(390));
        assert_eq!(refundable_for(fixed, ms(5), ms(150)), Duration::ZERO);
        assert_eq!(
            refundable_for(bucket, ms(400), ms(150)),
            ms(400) + REFUND_GRACE
        );
    }
}
