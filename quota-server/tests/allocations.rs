//! Heap allocations per decision of the memory-backed handlers
//! (`ShouldRateLimit`, `Check`), counted by a global allocator that counts
//! the calls made on the thread under test: the handler's own work, not
//! the gRPC transport's. The counts are pinned, so that a change that adds
//! work to every decision is seen here before it is seen in a benchmark.

// Test helpers fail loudly: a panic is the report.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::sync::Arc;

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitService;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use sluice_alloc_count::{allocations, Counting};
use sluice_quota_server::config::ServerConfig;
use sluice_quota_server::controls::Controls;
use sluice_quota_server::limits::Limits;
use sluice_quota_server::proto::quota_server::Quota;
use sluice_quota_server::proto::{CheckGroup, CheckItem, CheckRequest};
use sluice_quota_server::service::{Decider, QuotaService, Rls};
use sluice_quota_server::shared::Shared;
use sluice_quota_server::storage::{MemoryBackend, Store};
use tonic::Request;

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Calls counted per handler: enough that a stray allocation on some calls
/// still shows in the mean.
const CALLS: u64 = 100;

/// A memory-backed server's state: domain `d` with descriptor
/// `remote_address` and rule `r`, both far from their limits.
fn shared() -> Arc<Shared> {
    let yaml = "storage: {backend: memory}\ndomains:\n\
        - name: d\n\
        \x20 descriptors: [{key: remote_address, rate_limit: {unit: second, requests_per_unit: 1000000000}}]\n\
        \x20 rules: [{name: r, limit: {count: 1000000000, per: 1s}}]\n";
    let config = ServerConfig::from_yaml(yaml).unwrap();
    let limits = Limits::compile(&config, Path::new(".")).unwrap();
    let store = Store::Memory(MemoryBackend::new(10_000));
    Arc::new(Shared::new(limits, Controls::default(), store))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
}

/// Allocations per call of `call` on requests made by `request` (made
/// outside the count, as the transport decodes them), after one call that
/// creates the counter and the metric series.
fn per_call<R, F: std::future::Future<Output = ()>>(
    mut request: impl FnMut() -> R,
    call: impl Fn(R) -> F,
) -> u64 {
    let runtime = runtime();
    runtime.block_on(call(request()));
    let requests: Vec<R> = (0..CALLS).map(|_| request()).collect();
    let mut requests = requests.into_iter();
    let ((), total) = allocations(|| {
        runtime.block_on(async {
            for r in requests.by_ref() {
                call(r).await;
            }
        });
    });
    total / CALLS
}

/// Envoy's call: one descriptor of one entry, allowed. What is left: the
/// descriptor list, the resolution and override lists, the storage key,
/// the item lists, the storage engine's work lists and outcomes, the
/// status and its limit's name, the headers (a list, five names and five
/// values) and the response.
#[test]
fn should_rate_limit_allocations_are_pinned() {
    let shared = shared();
    let rls = Rls::new(shared, Arc::new(Decider::new(10_000)));
    let request = || {
        Request::new(RateLimitRequest {
            domain: "d".into(),
            descriptors: vec![RateLimitDescriptor {
                entries: vec![Entry {
                    key: "remote_address".into(),
                    value: "10.0.0.1".into(),
                }],
                ..RateLimitDescriptor::default()
            }],
            hits_addend: 1,
        })
    };
    let per = per_call(request, |r| async {
        let answer = rls.should_rate_limit(r).await.unwrap().into_inner();
        assert_eq!(answer.overall_code, Code::Ok as i32);
        assert_eq!(answer.response_headers_to_add.len(), 5);
    });
    println!("ShouldRateLimit: {per} allocations per decision");
    assert!(
        per <= PINNED_RLS,
        "{per} allocations per decision, pinned at {PINNED_RLS}"
    );
}

/// A `Check` of one item, with headers.
#[test]
fn check_allocations_are_pinned() {
    let shared = shared();
    let quota = QuotaService::new(shared, Arc::new(Decider::new(10_000)));
    let request = || {
        Request::new(CheckRequest {
            groups: vec![CheckGroup {
                domain: "d".into(),
                items: vec![CheckItem {
                    rule: "r".into(),
                    key: "10.0.0.1".into(),
                    cost: 1,
                }],
            }],
            ..CheckRequest::default()
        })
    };
    let per = per_call(request, |r| async {
        let answer = quota.check(r).await.unwrap().into_inner();
        assert!(answer.groups.iter().all(|g| g.allowed));
        assert_eq!(answer.groups[0].headers.len(), 5);
    });
    println!("Check: {per} allocations per decision");
    assert!(
        per <= PINNED_CHECK,
        "{per} allocations per decision, pinned at {PINNED_CHECK}"
    );
}

/// The counts measured when they were pinned.
const PINNED_RLS: u64 = 25;
/// See [`PINNED_RLS`].
const PINNED_CHECK: u64 = 23;
