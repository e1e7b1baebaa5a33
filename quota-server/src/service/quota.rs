//! Sluice's own API, `sluice.quota.v1.Quota` (`proto/sluice/quota/v1/quota.proto`):
//! batched checks of named rules, and leases for distributed callers.

use std::sync::Arc;

use sluice_core::algorithm::Outcome;
use sluice_core::decision::Decision;
use sluice_core::time::Span;
use tonic::{Request, Response, Status};

use super::decide::Decider;
use super::rls::{duration, headers};
use super::sync::{self, storage_key, Entry, Grant};
use super::{Shared, Source};
use crate::config::FailureMode;
use crate::limits::{Domain, Limit, Limits};
use crate::proto::quota_server::Quota;
use crate::proto::{
    CheckGroup, CheckRequest, CheckResponse, Code, GroupResult, Header, ItemResult, Lease,
    Source as ProtoSource, SyncRequest, SyncResponse,
};
use crate::storage::{Backend, Item};

/// The `Quota` gRPC service over a backend.
#[derive(Debug)]
pub struct QuotaService<B> {
    shared: Arc<Shared>,
    decider: Arc<Decider<B>>,
}

impl<B> QuotaService<B> {
    /// A service reading limits from `shared` and deciding with `decider`.
    pub fn new(shared: Arc<Shared>, decider: Arc<Decider<B>>) -> QuotaService<B> {
        QuotaService { shared, decider }
    }
}

#[tonic::async_trait]
impl<B: Backend> Quota for QuotaService<B> {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let limits = self.shared.limits();
        let mut groups = Vec::with_capacity(request.get_ref().groups.len());
        for group in &request.get_ref().groups {
            groups.push(self.check_group(&limits, group).await?);
        }
        Ok(Response::new(CheckResponse { groups }))
    }

    async fn sync(&self, request: Request<SyncRequest>) -> Result<Response<SyncResponse>, Status> {
        let request = request.into_inner();
        let limits = self.shared.limits();
        let unknown = Lease {
            code: Code::UnknownLimit as i32,
            ..Lease::default()
        };
        let Some(domain) = limits.domain(&request.domain) else {
            return Ok(Response::new(SyncResponse {
                leases: request.entries.iter().map(|_| unknown).collect(),
                source: ProtoSource::Storage as i32,
            }));
        };
        let mut entries = Vec::with_capacity(request.entries.len());
        let mut entry_of = Vec::with_capacity(request.entries.len());
        for e in &request.entries {
            if e.used > e.held {
                return Err(Status::invalid_argument(format!(
                    "rule {:?} key {:?}: used ({}) exceeds the lease held ({})",
                    e.rule, e.key, e.used, e.held
                )));
            }
            let limit = limits.rule(domain, &e.rule);
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
            entry_of.push(limit.map(|limit| {
                entries.push(Entry {
                    limit,
                    key: e.key.clone(),
                    unused: e.held - e.used,
                    want: e.want,
                });
                entries.len() - 1
            }));
        }
        let replicas = u64::from(request.replicas.max(1));
        let (grants, source) = match sync::sync(self.decider.backend(), &entries, replicas).await {
            Ok(grants) => (grants, Source::Storage),
            Err(error) => {
                self.decider.storage_failed(domain, &error);
                // Nothing can be leased without storage: the caller falls
                // back on its local limit (open) or denies (closed).
                (vec![Grant::none(0); entries.len()], failed_source(domain))
            }
        };
        let leases = entry_of
            .iter()
            .map(|at| match at {
                None => unknown,
                Some(i) => lease(&grants[*i], source),
            })
            .collect();
        Ok(Response::new(SyncResponse {
            leases,
            source: proto_source(source) as i32,
        }))
    }
}

impl<B: Backend> QuotaService<B> {
    async fn check_group(
        &self,
        limits: &Limits,
        group: &CheckGroup,
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
        let mut items: Vec<Item<'_>> = Vec::with_capacity(group.items.len());
        let mut index_of = Vec::with_capacity(group.items.len());
        for (index, it) in group.items.iter().enumerate() {
            let Some(limit) = limits.rule(domain, &it.rule) else {
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
        let decided = self.decider.decide(limits, domain, &items).await;
        let Some(outcomes) = &decided.outcomes else {
            // Failed open without a fallback: allowed, with nothing known.
            for (item, &index) in items.iter().zip(&index_of) {
                results[index] = ItemResult {
                    code: Code::Ok as i32,
                    limit: item.limit.quota().count(),
                    window: Some(duration(item.limit.quota().per())),
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
        let mut decisions: Vec<(&str, Decision)> = Vec::new();
        for ((item, outcome), &index) in items.iter().zip(outcomes).zip(&index_of) {
            allowed &= outcome.allowed || !item.enforce;
            results[index] = item_result(item.limit, outcome);
            if item.enforce {
                decisions.push((
                    item.limit.name.as_str(),
                    Decision::new(&item.limit.quota(), outcome),
                ));
            }
        }
        Ok(GroupResult {
            allowed,
            items: results,
            headers: headers(&decisions)
                .into_iter()
                .map(|h| Header {
                    name: h.key,
                    value: h.value,
                })
                .collect(),
            source: proto_source(decided.source) as i32,
        })
    }
}

fn item_result(limit: &Limit, outcome: &Outcome) -> ItemResult {
    ItemResult {
        code: if outcome.allowed {
            Code::Ok
        } else {
            Code::OverLimit
        } as i32,
        limit: limit.quota().count(),
        window: Some(duration(limit.quota().per())),
        remaining: outcome.remaining,
        reset_after: Some(duration(outcome.reset_after)),
        retry_after: (outcome.retry_after != Span::NEVER).then(|| duration(outcome.retry_after)),
    }
}

fn lease(grant: &Grant, source: Source) -> Lease {
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
