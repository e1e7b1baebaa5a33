//! Envoy's rate limit service, `envoy.service.ratelimit.v3.RateLimitService`,
//! answering as envoyproxy/ratelimit does so Envoy's native filter works
//! unchanged.
//!
//! - An unknown domain, or a descriptor no limit matches, is `OK` without a
//!   limit (envoyproxy/ratelimit does the same).
//! - `hits_addend` (per descriptor, else per request) is the cost; 0 means 1.
//!   A descriptor with `is_negative_hits` gives its hits back (a refund, at
//!   most a full allowance) only in a domain with `negative_hits: true`;
//!   elsewhere the request is refused (`INVALID_ARGUMENT`).
//! - All or nothing: a request over one limit consumes nothing from the others.
//! - Shadow-mode descriptors are counted and reported (remaining, reset)
//!   but their code stays `OK`, as in envoyproxy/ratelimit.
//! - `current_limit` must use a calendar unit: a window that is exactly a
//!   unit is reported as is; any other window is reported in the smallest
//!   unit at least as long, with `requests_per_unit` the same rate rounded
//!   down (5 per 10 s is reported as 30 per minute), at least 1. A
//!   calendar window is its own unit (`DAY`, `WEEK`, `MONTH`) and count:
//!   Envoy's units carry no length, so a calendar month is truly `MONTH`.
//! - Before any limit, the admin controls apply (see `crate::controls`):
//!   deny list and bans answer `OVER_LIMIT`, the allow list `OK`, both
//!   without counting; overrides lift or raise a descriptor's limit.

use std::cell::RefCell;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::HeaderValue;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    rate_limit::Unit, Code, DescriptorStatus, RateLimit,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitService;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::Duration as ProtoDuration;
use sluice_core::algorithm::Outcome;
use sluice_core::decision::{render_headers_in, Decision, HeaderSets};
use sluice_core::time::Span;
use tonic::{Request, Response, Status};

use super::admission::{admit, decide, Admission};
use super::bounds;
use super::decide::Decider;
use crate::limits::calendar::CalendarUnit;
use crate::limits::Limit;
use crate::shared::Shared;
use crate::storage::{system_now, Item};

/// The gRPC service over the shared state.
#[derive(Debug)]
pub struct Rls {
    shared: Arc<Shared>,
    decider: Arc<Decider>,
}

impl Rls {
    /// A service reading limits from `shared` and deciding with `decider`.
    pub fn new(shared: Arc<Shared>, decider: Arc<Decider>) -> Rls {
        Rls { shared, decider }
    }
}

/// One descriptor that resolved to a limit.
struct Charged<'a> {
    /// Position of the descriptor in the request.
    index: usize,
    /// What it asks of storage.
    item: Item<'a>,
}

#[tonic::async_trait]
impl RateLimitService for Rls {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let mut request = request.into_inner();
        bounds::rate_limit_request(&request)?;
        if request.domain.is_empty() {
            return Err(Status::invalid_argument(
                "rate limit domain must not be empty",
            ));
        }
        if request.descriptors.is_empty() {
            return Err(Status::invalid_argument(
                "rate limit descriptor list must not be empty",
            ));
        }
        let limits = self.shared.limits();
        let ok = || DescriptorStatus {
            code: Code::Ok as i32,
            ..DescriptorStatus::default()
        };
        let mut statuses: Vec<DescriptorStatus> =
            request.descriptors.iter().map(|_| ok()).collect();
        let Some(domain) = limits.domain(&request.domain) else {
            return Ok(Response::new(RateLimitResponse {
                overall_code: Code::Ok as i32,
                statuses,
                ..RateLimitResponse::default()
            }));
        };
        if !domain.negative_hits && request.descriptors.iter().any(|d| d.is_negative_hits) {
            return Err(Status::invalid_argument(format!(
                "domain {:?} does not accept is_negative_hits (a refund any caller could \
                 send); set negative_hits: true on the domain to allow it",
                domain.name
            )));
        }

        // Moved out of the request (read no further), not copied.
        let entries: Vec<Vec<(String, String)>> = request
            .descriptors
            .iter_mut()
            .map(|d| {
                std::mem::take(&mut d.entries)
                    .into_iter()
                    .map(|e| (e.key, e.value))
                    .collect()
            })
            .collect();
        let gate = self.shared.controls.gate(&entries, system_now());
        let resolved = entries.iter().map(|e| limits.resolve(domain, e)).collect();
        let overridden = match admit(&self.shared, domain, gate, resolved) {
            Admission::Limits(overridden) => overridden,
            Admission::Settled(allowed) => {
                let code = if allowed { Code::Ok } else { Code::OverLimit };
                statuses.iter_mut().for_each(|s| s.code = code as i32);
                return Ok(Response::new(RateLimitResponse {
                    overall_code: code as i32,
                    statuses,
                    ..RateLimitResponse::default()
                }));
            }
        };

        let mut charged = Vec::new();
        let mut refunds = Vec::new();
        for (index, descriptor) in request.descriptors.iter().enumerate() {
            let Some(limit) = overridden.limit(index) else {
                continue;
            };
            let entries = &entries[index];
            let hits = descriptor
                .hits_addend
                .map_or(u64::from(request.hits_addend), |v| v.value);
            let item = Item {
                limit,
                key: limit.storage_key(entries),
                cost: hits.max(1),
                enforce: !limit.shadow,
            };
            if descriptor.is_negative_hits {
                // At most a full allowance, whatever the count sent.
                let quota = limit.quota();
                let cost = item.cost.min(quota.count().max(quota.burst()));
                refunds.push(Item { cost, ..item });
            } else {
                charged.push(Charged { index, item });
            }
        }
        drop_replaced(&mut charged);
        let (items, placed) = merge_same_counter(charged);

        let decided = decide(&self.shared, &self.decider, &limits, domain, &items).await;
        let now = system_now();
        self.decider.refund(&self.shared, domain, &refunds).await;
        let mut over = false;
        if let Some(outcomes) = &decided.outcomes {
            for &(index, limit, i) in &placed {
                let limited = !outcomes[i].allowed && items[i].enforce;
                over |= limited;
                statuses[index] = status(limit, &outcomes[i], limited);
            }
        }
        let decisions: Vec<(&str, Decision)> = decided
            .outcomes
            .iter()
            .flat_map(|outcomes| items.iter().zip(outcomes))
            .filter(|(item, _)| item.enforce)
            .map(|(item, o)| (&*item.limit.name, item.limit.decision(o, now)))
            .collect();
        Ok(Response::new(RateLimitResponse {
            overall_code: if over { Code::OverLimit } else { Code::Ok } as i32,
            statuses,
            response_headers_to_add: headers(&decisions, |key, value| HeaderValue {
                key,
                value,
                ..HeaderValue::default()
            }),
            ..RateLimitResponse::default()
        }))
    }
}

/// Drops limits that another applicable limit `replaces`.
fn drop_replaced(charged: &mut Vec<Charged<'_>>) {
    // The usual request replaces nothing: no list of what to keep.
    if charged.iter().all(|c| c.item.limit.replaces.is_empty()) {
        return;
    }
    let replaced: Vec<bool> = charged
        .iter()
        .map(|c| {
            let limit = c.item.limit;
            charged.iter().any(|o| {
                o.item.limit.id != limit.id
                    && o.item.limit.replaces.iter().any(|r| **r == *limit.name)
            })
        })
        .collect();
    let mut keep = replaced.into_iter().map(|r| !r);
    charged.retain(|_| keep.next().unwrap_or(true));
}

/// One item per counter: descriptors of one request that land on the same
/// limit and key add their costs (as envoyproxy/ratelimit increments the
/// key once per descriptor), since a batch must not name a key twice.
/// Also returns, per charged descriptor, its position in the request, its
/// limit and the position of its item. The items take the descriptors'
/// keys over, not copies.
fn merge_same_counter<'a>(
    charged: Vec<Charged<'a>>,
) -> (Vec<Item<'a>>, Vec<(usize, &'a Limit, usize)>) {
    let mut items: Vec<Item<'a>> = Vec::with_capacity(charged.len());
    let mut placed = Vec::with_capacity(charged.len());
    for c in charged {
        let same = items
            .iter()
            .position(|it| it.limit.id == c.item.limit.id && it.key == c.item.key);
        match same {
            Some(i) => {
                items[i].cost = items[i].cost.saturating_add(c.item.cost);
                placed.push((c.index, c.item.limit, i));
            }
            None => {
                placed.push((c.index, c.item.limit, items.len()));
                items.push(c.item);
            }
        }
    }
    (items, placed)
}

fn status(limit: &Limit, outcome: &Outcome, limited: bool) -> DescriptorStatus {
    DescriptorStatus {
        code: if limited { Code::OverLimit } else { Code::Ok } as i32,
        current_limit: Some(current_limit(limit)),
        limit_remaining: u32::try_from(outcome.remaining).unwrap_or(u32::MAX),
        duration_until_reset: Some(duration(outcome.reset_after)),
        ..DescriptorStatus::default()
    }
}

const UNITS: [(Unit, u64); 7] = [
    (Unit::Second, 1),
    (Unit::Minute, 60),
    (Unit::Hour, 3_600),
    (Unit::Day, 86_400),
    (Unit::Week, 7 * 86_400),
    (Unit::Month, 30 * 86_400),
    (Unit::Year, 365 * 86_400),
];

/// The limit in envoy's terms; see the module doc for windows that are not a unit.
pub fn current_limit(limit: &Limit) -> RateLimit {
    let quota = limit.quota();
    if let Some(calendar) = &limit.calendar {
        let unit = match calendar.unit() {
            CalendarUnit::Day => Unit::Day,
            CalendarUnit::Week => Unit::Week,
            CalendarUnit::Month => Unit::Month,
        };
        return RateLimit {
            name: String::from(&*limit.name),
            requests_per_unit: u32::try_from(quota.count()).unwrap_or(u32::MAX),
            unit: unit as i32,
        };
    }
    let per = u128::from(quota.per().as_nanos());
    let (unit, secs) = UNITS
        .iter()
        .find(|(_, secs)| u128::from(*secs) * 1_000_000_000 >= per)
        .copied()
        .unwrap_or((Unit::Year, 365 * 86_400));
    let scaled = u128::from(quota.count()) * u128::from(secs) * 1_000_000_000 / per;
    RateLimit {
        name: String::from(&*limit.name),
        requests_per_unit: u32::try_from(scaled.max(1)).unwrap_or(u32::MAX),
        unit: unit as i32,
    }
}

/// A protobuf `Duration` of either API: Envoy's (envoy-types) and
/// Sluice's (`sluice-proto`, prost-types) are distinct Rust types.
pub(crate) trait WireDuration {
    /// The duration of `seconds` plus `nanos`.
    fn from_parts(seconds: i64, nanos: i32) -> Self;
}

impl WireDuration for ProtoDuration {
    fn from_parts(seconds: i64, nanos: i32) -> Self {
        ProtoDuration { seconds, nanos }
    }
}

impl WireDuration for sluice_proto::Duration {
    fn from_parts(seconds: i64, nanos: i32) -> Self {
        sluice_proto::Duration { seconds, nanos }
    }
}

/// `span` as a protobuf `Duration` of the API being answered.
pub(crate) fn duration<D: WireDuration>(span: Span) -> D {
    let ns = span.as_nanos();
    D::from_parts(
        i64::try_from(ns / 1_000_000_000).unwrap_or(i64::MAX),
        i32::try_from(ns % 1_000_000_000).unwrap_or(0),
    )
}

/// Most headers [`headers`] renders: `Retry-After`, three `X-RateLimit-*`
/// and the two IETF fields.
const MOST_HEADERS: usize = 6;

thread_local! {
    /// The buffer each header value is rendered in before it is copied
    /// out at its size: one per serving thread, kept between calls.
    static RENDERED: RefCell<String> = const { RefCell::new(String::new()) };
}

/// The rate-limit headers (IETF draft and `X-RateLimit-*`) for the
/// enforced limits: the denying or most restrictive one is summarised.
/// `header` makes the API's header from a name and a value.
pub(crate) fn headers<H>(
    decisions: &[(&str, Decision)],
    mut header: impl FnMut(String, String) -> H,
) -> Vec<H> {
    let Some(shown) = decisions
        .iter()
        .map(|(_, d)| *d)
        .reduce(Decision::more_restrictive)
    else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(MOST_HEADERS);
    let mut emit = |name: &str, value: &str| out.push(header(name.into(), value.into()));
    // `header` only builds a value (the callers' closures never render
    // again), so the thread's buffer is never borrowed twice.
    RENDERED.with_borrow_mut(|buffer| {
        render_headers_in(
            decisions.iter().copied(),
            shown,
            HeaderSets::ALL,
            buffer,
            &mut emit,
        );
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BackendKind, DescriptorFile, DomainConfig, Problems};
    use crate::limits::Limits;

    fn limits(yaml: &str) -> Limits {
        let file: DescriptorFile = serde_norway::from_str(yaml).unwrap();
        let domain = DomainConfig {
            name: file.domain,
            descriptors: file.descriptors,
            ..DomainConfig::default()
        };
        let mut problems = Problems::default();
        let l = Limits::build(&[("d".into(), domain)], BackendKind::Memory, &mut problems);
        assert!(problems.is_empty());
        l
    }

    #[test]
    fn windows_map_to_units() {
        let l = limits(
            r#"
domain: d
descriptors:
  - {key: a, rate_limit: {unit: minute, requests_per_unit: 7}}
  - {key: b, rate_limit: {per: 10s, requests_per_unit: 5}}
  - {key: c, rate_limit: {per: 500ms, requests_per_unit: 3}}
  - {key: d, rate_limit: {calendar: month, time_zone: Europe/Paris, requests_per_unit: 10000}}
  - {key: e, rate_limit: {calendar: week, requests_per_unit: 700}}
  - {key: f, rate_limit: {unit: month, requests_per_unit: 10000}}
"#,
        );
        // Calendar windows are their unit; `unit: month` is 30 days, also MONTH.
        let expected = [
            (7, Unit::Minute),
            (30, Unit::Minute),
            (6, Unit::Second),
            (10000, Unit::Month),
            (700, Unit::Week),
            (10000, Unit::Month),
        ];
        for (id, (count, unit)) in expected.into_iter().enumerate() {
            let rl = current_limit(l.limit(id).unwrap());
            assert_eq!(
                (rl.requests_per_unit, rl.unit),
                (count, unit as i32),
                "limit {id}"
            );
        }
    }

    #[test]
    fn durations_split_seconds_and_nanos() {
        let d: ProtoDuration = duration(Span(2_500_000_001));
        assert_eq!((d.seconds, d.nanos), (2, 500_000_001));
    }
}
