//! Leased rules against a scripted host: the worker side (this plugin)
//! and the sync service share one host and one shared-data double, as the
//! workers and the singleton share Envoy's.

use sluice_core::lease::{self, cell};
use sluice_core::store::InProcessShared;
use sluice_core::time::{Nanos, Span};
use sluice_proto::prost::Message;
use sluice_proto::quota::v1::{
    CheckRequest, CheckResponse, Code, GroupResult, ItemResult, Lease, Source, SyncRequest,
    SyncResponse,
};
use sluice_proto::Duration;

use super::*;
use crate::host::fake::{FakeHost, GrpcCall};
use crate::quota::{METHOD, SERVICE};
use crate::sync_service::{idle_after, SyncService, SYNC_METHOD};

const SEC: u64 = 1_000_000_000;
const MS: u64 = 1_000_000;
const UNAVAILABLE: u32 = 14;

/// `fleet` leased per `x-client` (interval 100ms, leases of at most 8),
/// `gate` an exact rule on `/gate`.
const CONFIG: &str = r#"{"rules":[
    {"name":"fleet","key":["header:x-client"],
     "sync":{"mode":"leased","domain":"edge","max_lease":8,"replicas":3,"max_keys":16}},
    {"name":"gate","match":{"path":{"prefix":"/gate"}},"sync":{"mode":"exact","domain":"edge"}}
]}"#;

struct Fleet<'a> {
    host: FakeHost,
    plugin: Plugin<&'a InProcessShared>,
    service: SyncService<&'a InProcessShared>,
}

fn fleet(shared: &InProcessShared) -> Fleet<'_> {
    let host = FakeHost::default();
    host.now.set(1_800_000_000 * SEC);
    host.random.set(Some(7));
    *host.node.borrow_mut() = Some("edge-1".into());
    // The service starts first (bootstrap extensions do) and registers
    // the demand queue.
    let service = SyncService::configure(&host, shared, CONFIG.as_bytes()).unwrap();
    assert_eq!(
        host.tick_millis.get(),
        50,
        "the service ticks every half interval"
    );
    let plugin = Plugin::configure(&host, shared, CONFIG.as_bytes()).unwrap();
    Fleet {
        host,
        plugin,
        service,
    }
}

fn secs(seconds: i64) -> Option<Duration> {
    Some(Duration { seconds, nanos: 0 })
}

fn lease(permits: u64, remaining: u64) -> Lease {
    Lease {
        code: if permits == 0 && remaining == 0 {
            Code::OverLimit
        } else {
            Code::Ok
        } as i32,
        permits,
        expires_after: secs(1),
        remaining,
        limit: 100,
        window: secs(60),
        reset_after: secs(30),
    }
}

fn sync_answer(leases: Vec<Lease>) -> Vec<u8> {
    SyncResponse {
        leases,
        source: Source::Storage as i32,
        controls: None,
    }
    .encode_to_vec()
}

/// The quota server's refusal of the `gate` rule's one item.
fn gate_refused() -> Vec<u8> {
    CheckResponse {
        groups: vec![GroupResult {
            allowed: false,
            items: vec![ItemResult {
                code: Code::OverLimit as i32,
                limit: 1,
                window: secs(1),
                remaining: 0,
                reset_after: secs(1),
                retry_after: secs(1),
            }],
            headers: Vec::new(),
            source: Source::Storage as i32,
        }],
        controls: None,
    }
    .encode_to_vec()
}

fn last_call(host: &FakeHost) -> GrpcCall {
    host.grpc_calls.borrow().last().cloned().unwrap()
}

fn calls(host: &FakeHost) -> usize {
    host.grpc_calls.borrow().len()
}

impl Fleet<'_> {
    fn request(&mut self, id: u32, client: &str) -> Step {
        self.host.request("GET", "/x", &[("x-client", client)]);
        self.plugin.on_request_headers(&self.host, id)
    }

    /// Runs the service on the demand queue; the Sync call it made.
    fn serve_demand(&mut self) -> (u32, SyncRequest) {
        let before = calls(&self.host);
        self.service.on_queue_ready(&self.host);
        assert_eq!(calls(&self.host), before.saturating_add(1), "one Sync call");
        let call = last_call(&self.host);
        assert_eq!(
            (call.service.as_str(), call.method.as_str()),
            (SERVICE, SYNC_METHOD)
        );
        let token = calls(&self.host) as u32;
        (token, SyncRequest::decode(call.message.as_slice()).unwrap())
    }

    /// Request 1 of `key` finds no lease and wakes the service, which is
    /// granted `permits` with `remaining` left in the budget.
    fn lease_first(&mut self, key: &str, permits: u64, remaining: u64) {
        assert_eq!(self.request(1, key), Step::Pause);
        let (token, _) = self.serve_demand();
        self.service.on_sync_answer(
            &self.host,
            token,
            Ok(&sync_answer(vec![lease(permits, remaining)])),
        );
    }

    fn advance(&self, millis: u64) {
        let later = self
            .host
            .now
            .get()
            .saturating_add(millis.saturating_mul(MS));
        self.host.now.set(later);
    }
}

#[test]
fn a_key_without_lease_asks_the_quota_server_and_wakes_the_service() {
    let shared = InProcessShared::default();
    let mut f = fleet(&shared);
    assert_eq!(f.request(1, "alice"), Step::Pause);
    let check = last_call(&f.host);
    assert_eq!(check.method, METHOD, "decided by Check meanwhile");
    let sent = CheckRequest::decode(check.message.as_slice()).unwrap();
    assert_eq!(sent.groups[0].items[0].rule, "fleet");
    // A second request of the key within a quarter interval does not wake
    // the service again.
    assert_eq!(f.request(2, "alice"), Step::Pause);
    let (_, sync) = f.serve_demand();
    assert_eq!(sync.caller, "edge-1#0");
    assert_eq!((sync.domain.as_str(), sync.replicas), ("edge", 3));
    assert_eq!(sync.entries.len(), 1);
    let entry = &sync.entries[0];
    assert_eq!(
        (entry.rule.as_str(), entry.key.as_str()),
        ("fleet", "5:alice")
    );
    assert_eq!((entry.held, entry.used, entry.want), (0, 0, 2));
    assert_eq!(f.service.keys(), 1);
}

#[test]
fn a_lease_admits_locally_up_to_its_permits_then_asks_again() {
    let shared = InProcessShared::default();
    let mut f = fleet(&shared);
    f.lease_first("alice", 2, 40);
    let before = calls(&f.host);
    assert_eq!(f.request(2, "alice"), Step::Continue);
    assert_eq!(f.request(3, "alice"), Step::Continue);
    assert_eq!(calls(&f.host), before, "no call while the lease has room");
    f.host.respond(200);
    f.plugin.on_response_headers(&f.host, 3);
    assert_eq!(
        f.host.response_header("ratelimit").as_deref(),
        Some("\"fleet\";r=40;t=30"),
        "the budget as of the last sync"
    );
    f.plugin.flush_metrics(&f.host);
    assert_eq!(f.host.counter("sluice_http.rule.fleet.outcome.allowed"), 2);
    // Dry: the next request asks, and wakes the service (a quarter
    // interval after it last did), whose sync of the other half asks for
    // one and a half intervals of the demand seen (two admitted, one
    // miss), above double the dry lease.
    f.advance(30);
    assert_eq!(f.request(4, "alice"), Step::Pause);
    assert_eq!(last_call(&f.host).method, METHOD);
    let (_, sync) = f.serve_demand();
    assert_eq!(sync.caller, "edge-1#1");
    assert_eq!(sync.entries[0].want, 5);
}

#[test]
fn halves_alternate_and_report_what_they_held_and_used() {
    let shared = InProcessShared::default();
    let mut f = fleet(&shared);
    f.lease_first("alice", 8, 40);
    for id in 2..5 {
        assert_eq!(f.request(id, "alice"), Step::Continue);
    }
    // The tick syncs the key once an interval has passed: half 1 first
    // (it held nothing), then half 0 with its counts.
    f.advance(100);
    f.service.on_tick(&f.host);
    let sync = SyncRequest::decode(last_call(&f.host).message.as_slice()).unwrap();
    assert_eq!(sync.caller, "edge-1#1");
    assert_eq!((sync.entries[0].held, sync.entries[0].used), (0, 0));
    let token = calls(&f.host) as u32;
    f.service
        .on_sync_answer(&f.host, token, Ok(&sync_answer(vec![lease(5, 30)])));
    f.advance(50);
    f.service.on_tick(&f.host);
    assert_eq!(calls(&f.host) as u32, token, "not due yet");
    f.advance(50);
    f.service.on_tick(&f.host);
    let sync = SyncRequest::decode(last_call(&f.host).message.as_slice()).unwrap();
    assert_eq!(sync.caller, "edge-1#0");
    assert_eq!((sync.entries[0].held, sync.entries[0].used), (8, 3));
    // While half 0 is retired, half 1 keeps serving: no gap.
    assert_eq!(f.request(9, "alice"), Step::Continue);
}

#[test]
fn an_exhausted_budget_is_refused_locally_until_it_resets() {
    let shared = InProcessShared::default();
    let mut f = fleet(&shared);
    f.lease_first("alice", 0, 0);
    let before = calls(&f.host);
    let Step::Reply(reply) = f.request(2, "alice") else {
        panic!("expected a local refusal");
    };
    assert_eq!(reply.status, 429);
    assert!(reply.headers.contains(&("retry-after", "30".into())));
    assert_eq!(calls(&f.host), before, "no call for a refused key");
    f.plugin.flush_metrics(&f.host);
    assert_eq!(f.host.counter("sluice_http.rule.fleet.outcome.limited"), 1);
    // Another key is independent.
    assert_eq!(f.request(3, "bob"), Step::Pause);
    // Past the reset the key asks again.
    f.advance(30_000);
    assert_eq!(f.request(4, "alice"), Step::Pause);
}

#[test]
fn a_permit_taken_for_a_request_refused_by_another_rule_comes_back() {
    let shared = InProcessShared::default();
    let mut f = fleet(&shared);
    f.lease_first("alice", 1, 40);
    f.host.request("GET", "/gate", &[("x-client", "alice")]);
    assert_eq!(f.plugin.on_request_headers(&f.host, 2), Step::Pause);
    let gate = last_call(&f.host);
    assert_eq!(gate.method, METHOD);
    let token = calls(&f.host) as u32;
    let wake = f
        .plugin
        .on_quota_answer(&f.host, token, Ok(&gate_refused()));
    assert!(matches!(wake, Some((2, Wake::Reply(_)))), "{wake:?}");
    // The leased permit is back: the next request of the key passes.
    assert_eq!(f.request(3, "alice"), Step::Continue);
}

#[test]
fn a_permit_given_back_after_the_other_half_was_retired_is_not_seen_as_demand() {
    let shared = InProcessShared::default();
    let mut f = fleet(&shared);
    f.lease_first("alice", 8, 40);
    // A request takes a permit from half 0, then waits for the exact rule.
    f.host.request("GET", "/gate", &[("x-client", "alice")]);
    assert_eq!(f.plugin.on_request_headers(&f.host, 2), Step::Pause);
    let gate_token = calls(&f.host) as u32;
    // Meanwhile the service retires half 1, reading the cell's counter
    // with that permit in it.
    f.advance(100);
    f.service.on_tick(&f.host);
    let token = calls(&f.host) as u32;
    f.service
        .on_sync_answer(&f.host, token, Ok(&sync_answer(vec![lease(0, 40)])));
    // The exact rule refuses: the permit goes back into half 0.
    let wake = f
        .plugin
        .on_quota_answer(&f.host, gate_token, Ok(&gate_refused()));
    assert!(matches!(wake, Some((2, Wake::Reply(_)))), "{wake:?}");
    // No request was admitted since: the next sync wants nothing, not
    // the most a lease may hold.
    f.advance(100);
    f.service.on_tick(&f.host);
    let sync = SyncRequest::decode(last_call(&f.host).message.as_slice()).unwrap();
    assert_eq!(sync.caller, "edge-1#0");
    assert_eq!((sync.entries[0].held, sync.entries[0].used), (8, 0));
    assert_eq!(sync.entries[0].want, 0);
}

#[test]
fn a_failed_sync_empties_its_half_and_the_next_tick_tries_again() {
    let shared = InProcessShared::default();
    let mut f = fleet(&shared);
    assert_eq!(f.request(1, "alice"), Step::Pause);
    let (token, _) = f.serve_demand();
    f.service.on_sync_answer(&f.host, token, Err(UNAVAILABLE));
    assert_eq!(f.host.warnings.borrow().len(), 1);
    assert_eq!(f.request(2, "alice"), Step::Pause, "still no lease: ask");
    f.advance(100);
    f.service.on_tick(&f.host);
    let token = calls(&f.host) as u32;
    f.service.on_sync_answer(&f.host, token, Err(UNAVAILABLE));
    assert_eq!(f.host.warnings.borrow().len(), 1, "warned once");
    f.advance(100);
    f.service.on_tick(&f.host);
    let sync = SyncRequest::decode(last_call(&f.host).message.as_slice()).unwrap();
    assert_eq!(
        (sync.entries[0].held, sync.entries[0].used),
        (0, 0),
        "a failed half is not reported again"
    );
    let token = calls(&f.host) as u32;
    f.service
        .on_sync_answer(&f.host, token, Ok(&sync_answer(vec![lease(3, 40)])));
    assert!(f.host.warnings.borrow()[1].contains("again"));
    assert_eq!(f.request(3, "alice"), Step::Continue, "leased again");
    // A call the host refuses to start fails the same way.
    f.host.refuse_grpc.set(true);
    f.advance(100);
    f.service.on_tick(&f.host);
    assert_eq!(f.service.keys(), 1);
}

#[test]
fn an_answer_over_the_bound_is_not_read() {
    let shared = InProcessShared::default();
    let mut f = fleet(&shared);
    assert_eq!(f.request(1, "alice"), Step::Pause);
    let (token, _) = f.serve_demand();
    // A well-formed answer padded with an unknown field past the bound.
    let mut answer = sync_answer(vec![lease(3, 40)]);
    let padding = crate::quota::MAX_ANSWER_BYTES;
    sluice_proto::prost::encoding::bytes::encode(15, &vec![0u8; padding], &mut answer);
    f.service.on_sync_answer(&f.host, token, Ok(&answer));
    assert!(f.host.warnings.borrow()[0].contains("over 9 MiB"));
    assert_eq!(f.request(2, "alice"), Step::Pause, "no lease: ask");
}

#[test]
fn an_idle_key_gives_its_permits_back_and_leaves_the_table() {
    let shared = InProcessShared::default();
    let mut f = fleet(&shared);
    f.lease_first("alice", 4, 40);
    assert_eq!(f.request(2, "alice"), Step::Continue);
    let idle = idle_after(&sluice_core::policy::Leasing {
        interval: Span::from_millis(100),
        max_lease: 8,
        replicas: 3,
        max_keys: 16,
    });
    let mut wants = Vec::new();
    let mut held = Vec::new();
    for _ in 0..(idle.as_nanos() / (100 * MS) + 4) {
        f.advance(100);
        f.service.on_tick(&f.host);
        let Some(call) = f.host.grpc_calls.borrow().last().cloned() else {
            break;
        };
        let token = calls(&f.host) as u32;
        if call.method != SYNC_METHOD || f.service.keys() == 0 {
            break;
        }
        let sync = SyncRequest::decode(call.message.as_slice()).unwrap();
        wants.push(sync.entries[0].want);
        held.push((sync.entries[0].held, sync.entries[0].used));
        f.service
            .on_sync_answer(&f.host, token, Ok(&sync_answer(vec![lease(0, 40)])));
    }
    assert_eq!(f.service.keys(), 0, "dropped once idle: {wants:?}");
    assert!(
        held.contains(&(4, 1)),
        "its unused permits went back: {held:?}"
    );
    assert!(wants.iter().skip(1).all(|&w| w == 0), "{wants:?}");
    // Its cell is free: no worker finds a lease for it.
    let owner = lease::fingerprint(f.plugin.store.seed(), "fleet", "5:alice");
    let mut name = String::new();
    let mut backend = &shared;
    assert_eq!(
        cell::take(
            &mut backend,
            &mut name,
            "fleet",
            16,
            owner,
            1,
            Nanos(f.host.now.get())
        )
        .unwrap(),
        None
    );
}

#[test]
fn the_table_is_bounded_by_max_keys() {
    let shared = InProcessShared::default();
    let mut f = fleet(&shared);
    for i in 0..40 {
        f.request(i + 1, &format!("client-{i}"));
    }
    f.service.on_queue_ready(&f.host);
    assert_eq!(f.service.keys(), 16);
    let sync = SyncRequest::decode(last_call(&f.host).message.as_slice()).unwrap();
    assert_eq!(sync.entries.len(), 16, "one batched call");
}

#[test]
fn a_rule_the_quota_server_does_not_know_leases_nothing_and_warns_once() {
    let shared = InProcessShared::default();
    let mut f = fleet(&shared);
    assert_eq!(f.request(1, "alice"), Step::Pause);
    let unknown = Lease {
        code: Code::UnknownLimit as i32,
        ..Lease::default()
    };
    for _ in 0..2 {
        let (token, _) = f.serve_demand();
        f.service
            .on_sync_answer(&f.host, token, Ok(&sync_answer(vec![unknown])));
        f.advance(30);
        assert_eq!(f.request(2, "alice"), Step::Pause, "asks per request");
        assert_eq!(last_call(&f.host).method, METHOD);
    }
    assert_eq!(f.host.warnings.borrow().len(), 1, "{:?}", f.host.warnings);
}

#[test]
fn without_a_node_id_the_caller_is_a_random_name_kept_for_the_service_life() {
    let shared = InProcessShared::default();
    let host = FakeHost::default();
    host.now.set(1_800_000_000 * SEC);
    host.random.set(Some(0xabc));
    let service = SyncService::configure(&host, &shared, CONFIG.as_bytes()).unwrap();
    assert_eq!(service.caller(), "envoy-0000000000000abc");
    *host.node.borrow_mut() = Some(String::new());
    let service = SyncService::configure(&host, &shared, CONFIG.as_bytes()).unwrap();
    assert!(service.caller().starts_with("envoy-"), "an empty node id");
}

#[test]
fn a_key_running_low_is_refilled_before_its_lease_runs_dry() {
    let shared = InProcessShared::default();
    let mut f = fleet(&shared);
    f.lease_first("alice", 8, 40);
    f.advance(30);
    let before = calls(&f.host);
    // Four of eight left: not low yet, so the service is not woken.
    for id in 2..6 {
        assert_eq!(f.request(id, "alice"), Step::Continue);
    }
    f.service.on_queue_ready(&f.host);
    assert_eq!(
        calls(&f.host),
        before,
        "no sync while half the lease is left"
    );
    // Three left and nothing else leased: the worker wakes the service,
    // which refills the empty half while this one still serves.
    assert_eq!(f.request(6, "alice"), Step::Continue);
    let (_, sync) = f.serve_demand();
    assert_eq!(sync.caller, "edge-1#1", "the empty half");
    assert_eq!((sync.entries[0].held, sync.entries[0].used), (0, 0));
    assert_eq!(f.request(7, "alice"), Step::Continue, "no gap meanwhile");
    let checks = f
        .host
        .grpc_calls
        .borrow()
        .iter()
        .filter(|c| c.method == METHOD)
        .count();
    assert_eq!(checks, 1, "only the first request asked the quota server");
}
