//! Sluice's own API (`sluice.quota.v1.Quota`): batched checks are exact and
//! all or nothing; leases never let replicas admit more than the limit,
//! and unused leases are credited back. In memory and in Redis.

// Test helpers fail loudly: a panic is the report.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::RedisServer;
use rand::{Rng, SeedableRng};
use sluice_core::access::{Ban, BanTarget};
use sluice_core::time::Nanos;
use sluice_quota_server::config::ServerConfig;
use sluice_quota_server::controls::Controls;
use sluice_quota_server::limits::Limits;
use sluice_quota_server::proto::quota_client::QuotaClient;
use sluice_quota_server::proto::quota_server::Quota;
use sluice_quota_server::proto::{
    CheckGroup, CheckItem, CheckRequest, Code, GroupResult, SyncEntry, SyncRequest,
};
use sluice_quota_server::service::{Decider, QuotaService};
use sluice_quota_server::shared::Shared;
use sluice_quota_server::storage::{MemoryBackend, RedisBackend, Store};
use tonic::Request;

const CONFIG: &str = r#"
domains:
  - name: api
    rules:
      - {name: narrow, limit: {count: 3, per: 1h}}
      - {name: wide, limit: {count: 5, per: 1h}}
      - {name: busy, limit: {count: 50, per: 1h}}
      - {name: leased, limit: {count: 100, per: 1h}}
      - {name: windowed, algorithm: fixed_window, limit: {count: 5, per: 1s}}
"#;

fn service(store: Store) -> Arc<QuotaService> {
    service_with(store, Controls::default())
}

fn service_with(store: Store, controls: Controls) -> Arc<QuotaService> {
    let config = ServerConfig::from_yaml(CONFIG).unwrap();
    let limits = Limits::compile(&config, Path::new(".")).unwrap();
    Arc::new(QuotaService::new(
        Arc::new(Shared::new(limits, controls, store)),
        Arc::new(Decider::new(1000)),
    ))
}

fn redis_backend(redis: &RedisServer) -> Store {
    Store::Redis(RedisBackend::new(&redis.url(), Duration::from_secs(2), 2).unwrap())
}

async fn check(svc: &QuotaService, items: &[(&str, &str, u64)]) -> GroupResult {
    check_with(svc, items, false).await
}

/// [`check`], asking the server to leave the headers out if `omit_headers`.
async fn check_with(
    svc: &QuotaService,
    items: &[(&str, &str, u64)],
    omit_headers: bool,
) -> GroupResult {
    let group = CheckGroup {
        domain: "api".into(),
        items: items
            .iter()
            .map(|(rule, key, cost)| CheckItem {
                rule: (*rule).into(),
                key: (*key).into(),
                cost: *cost,
            })
            .collect(),
    };
    let response = svc
        .check(Request::new(CheckRequest {
            groups: vec![group],
            controls_version: None,
            omit_headers,
        }))
        .await
        .unwrap()
        .into_inner();
    response.groups.into_iter().next().unwrap()
}

async fn check_exact_and_all_or_nothing(svc: Arc<QuotaService>) {
    for left in [2, 1, 0] {
        let g = check(&svc, &[("narrow", "k", 1), ("wide", "k", 1)]).await;
        assert!(g.allowed);
        assert_eq!(g.items[0].remaining, left);
        assert!(
            g.headers.iter().any(|h| h.name == "x-ratelimit-remaining"),
            "{:?}",
            g.headers
        );
    }
    let g = check(
        &svc,
        &[("narrow", "k", 1), ("wide", "k", 1), ("nope", "k", 1)],
    )
    .await;
    assert!(!g.allowed);
    assert_eq!(g.items[0].code, Code::OverLimit as i32);
    assert_eq!(g.items[2].code, Code::UnknownLimit as i32);
    assert!(g.items[0].retry_after.is_some());
    let g = check(&svc, &[("wide", "k", 2)]).await;
    assert!(g.allowed, "the refused group took nothing from `wide`");
    assert_eq!(g.items[0].remaining, 0);

    // Concurrent callers on one key: exactly the limit is admitted.
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let svc = svc.clone();
            tokio::spawn(async move {
                let mut admitted = 0;
                for _ in 0..10 {
                    admitted += u64::from(check(&svc, &[("busy", "k", 1)]).await.allowed);
                }
                admitted
            })
        })
        .collect();
    let mut admitted = 0;
    for t in tasks {
        admitted += t.await.unwrap();
    }
    assert_eq!(admitted, 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_in_memory() {
    check_exact_and_all_or_nothing(service(Store::Memory(MemoryBackend::new(1000)))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_in_redis() {
    let redis = RedisServer::start();
    check_exact_and_all_or_nothing(service(redis_backend(&redis))).await;
}

/// One replica: syncs, admits random hits within its lease, repeats;
/// finally returns what it holds. Returns what it admitted.
async fn replica(svc: Arc<QuotaService>, seed: u64) -> u64 {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (mut held, mut used, mut admitted) = (0u64, 0u64, 0u64);
    for round in 0..40 {
        let last = round == 39;
        let want = if last { 0 } else { rng.random_range(0..15) };
        let lease = svc
            .sync(Request::new(SyncRequest {
                domain: "api".into(),
                replicas: 3,
                caller: format!("replica-{seed}"),
                entries: vec![SyncEntry {
                    rule: "leased".into(),
                    key: "k".into(),
                    held,
                    used,
                    want,
                }],
                controls_version: None,
            }))
            .await
            .unwrap()
            .into_inner()
            .leases
            .remove(0);
        assert!(lease.permits <= want);
        held = lease.permits;
        let hits = rng.random_range(0..20);
        used = hits.min(held);
        admitted += used;
        tokio::task::yield_now().await;
    }
    assert_eq!(held, 0, "the last sync asks for nothing");
    admitted
}

async fn leases_never_overshoot(svc: Arc<QuotaService>) {
    let tasks: Vec<_> = (0..3)
        .map(|seed| tokio::spawn(replica(svc.clone(), seed)))
        .collect();
    let mut admitted = 0;
    for t in tasks {
        admitted += t.await.unwrap();
    }
    assert!(admitted <= 100, "admitted {admitted} of 100");
    assert!(admitted > 50, "leases were granted: {admitted}");
    // Every unused lease came back: the budget is exactly what is left.
    let g = check(&svc, &[("leased", "k", 1)]).await;
    let left = if g.allowed {
        g.items[0].remaining + 1
    } else {
        0
    };
    assert_eq!(left, 100 - admitted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_in_memory() {
    leases_never_overshoot(service(Store::Memory(MemoryBackend::new(1000)))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_in_redis() {
    let redis = RedisServer::start();
    leases_never_overshoot(service(redis_backend(&redis))).await;
}

#[tokio::test]
async fn a_check_omitting_headers_gets_the_same_numbers_without_headers() {
    let svc = service(Store::Memory(MemoryBackend::new(1000)));
    let with = check(&svc, &[("narrow", "h", 1)]).await;
    let without = check_with(&svc, &[("narrow", "h", 1)], true).await;
    assert!(!with.headers.is_empty());
    assert!(without.headers.is_empty(), "{:?}", without.headers);
    assert!(without.allowed);
    assert_eq!(without.items[0].code, Code::Ok as i32);
    assert_eq!(without.items[0].limit, 3);
    assert_eq!(without.items[0].remaining, 1, "counted like any check");
    assert_eq!(without.items[0].window, with.items[0].window);
}

#[tokio::test]
async fn returned_leases_are_credited_back() {
    let svc = service(Store::Memory(MemoryBackend::new(1000)));
    let sync = |held, used, want| {
        let svc = svc.clone();
        async move {
            svc.sync(Request::new(SyncRequest {
                domain: "api".into(),
                replicas: 1,
                entries: vec![SyncEntry {
                    rule: "narrow".into(),
                    key: "r".into(),
                    held,
                    used,
                    want,
                }],
                caller: String::new(),
                controls_version: None,
            }))
            .await
            .unwrap()
            .into_inner()
            .leases
            .remove(0)
        }
    };
    let lease = sync(0, 0, 10).await;
    assert_eq!(
        (lease.permits, lease.remaining),
        (3, 0),
        "at most what remains"
    );
    // The rule's limit and when its budget is whole again, for the
    // caller's headers and local refusals.
    assert_eq!(lease.limit, 3);
    assert!(lease.window.is_some());
    assert!(lease
        .reset_after
        .is_some_and(|d| d.seconds > 0 || d.nanos > 0));
    let exhausted = check(&svc, &[("narrow", "r", 1)]).await;
    assert!(
        !exhausted.allowed,
        "leased permits are taken from the budget"
    );
    let lease = sync(3, 1, 0).await;
    assert_eq!(
        (lease.permits, lease.remaining),
        (0, 2),
        "two unused came back"
    );
    assert!(check(&svc, &[("narrow", "r", 2)]).await.allowed);
    let bad = svc
        .sync(Request::new(SyncRequest {
            domain: "api".into(),
            replicas: 1,
            entries: vec![SyncEntry {
                rule: "narrow".into(),
                key: "r".into(),
                held: 1,
                used: 2,
                want: 0,
            }],
            caller: String::new(),
            controls_version: None,
        }))
        .await;
    assert_eq!(bad.unwrap_err().code(), tonic::Code::InvalidArgument);
}

/// A sync batches the keys of many clients: a banned key gets no lease,
/// the others of its batch get theirs (and give back what they did not use).
#[tokio::test]
async fn a_banned_key_settles_its_own_entry_not_its_batch() {
    let controls = Controls::default();
    let ban = Ban {
        target: BanTarget::Key("7:mallory".into()),
        until: Nanos(u64::MAX),
        reason: String::new(),
    };
    controls.access_mut().ban(ban, Nanos(0)).unwrap();
    let svc = service_with(Store::Memory(MemoryBackend::new(1000)), controls);
    let sync = |held, used| {
        let svc = svc.clone();
        async move {
            let entry = |key: &str| SyncEntry {
                rule: "narrow".into(),
                key: key.into(),
                held,
                used,
                want: 3,
            };
            svc.sync(Request::new(SyncRequest {
                domain: "api".into(),
                replicas: 1,
                entries: vec![entry("7:mallory"), entry("5:alice")],
                caller: "edge#0".into(),
                controls_version: None,
            }))
            .await
            .unwrap()
            .into_inner()
            .leases
        }
    };
    let leases = sync(0, 0).await;
    assert_eq!(
        (leases[0].code, leases[0].permits),
        (Code::OverLimit as i32, 0)
    );
    assert_eq!((leases[1].code, leases[1].permits), (Code::Ok as i32, 3));
    let leases = sync(3, 1).await;
    assert_eq!(leases[1].permits, 2, "two unused came back and were leased");
}

/// `sluice serve` answers the Quota service on its gRPC port.
#[tokio::test]
async fn served_next_to_envoys_api() {
    let scratch = tempfile::tempdir().unwrap();
    let config = support::write(&scratch, "sluice.yaml", &support::config(CONFIG));
    let server = support::Sluice::start(&config);
    let mut client = QuotaClient::connect(format!("http://{}", server.grpc))
        .await
        .unwrap();
    let item = CheckItem {
        rule: "narrow".into(),
        key: "k".into(),
        cost: 2,
    };
    let groups = vec![
        CheckGroup {
            domain: "api".into(),
            items: vec![item.clone()],
        },
        CheckGroup {
            domain: "api".into(),
            items: vec![item],
        },
    ];
    let response = client
        .check(CheckRequest {
            groups,
            controls_version: None,
            omit_headers: false,
        })
        .await
        .unwrap()
        .into_inner();
    let allowed: Vec<bool> = response.groups.iter().map(|g| g.allowed).collect();
    assert_eq!(
        allowed,
        [true, false],
        "groups are decided in order, each on its own"
    );
    let lease = client
        .sync(SyncRequest {
            domain: "api".into(),
            replicas: 2,
            entries: vec![SyncEntry {
                rule: "narrow".into(),
                key: "k".into(),
                held: 0,
                used: 0,
                want: 5,
            }],
            caller: String::new(),
            controls_version: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(lease.leases[0].permits, 1, "the last permit, leased");
}

#[tokio::test]
async fn a_fixed_window_lease_gives_nothing_back_once_its_window_ended() {
    let svc = service(Store::Memory(MemoryBackend::new(1000)));
    let sync = |held, used, want| {
        let svc = svc.clone();
        async move {
            svc.sync(Request::new(SyncRequest {
                domain: "api".into(),
                replicas: 1,
                entries: vec![SyncEntry {
                    rule: "windowed".into(),
                    key: "k".into(),
                    held,
                    used,
                    want,
                }],
                caller: "edge#0".into(),
                controls_version: None,
            }))
            .await
            .unwrap()
            .into_inner()
            .leases
            .remove(0)
        }
    };
    let lease = sync(0, 0, 3).await;
    assert_eq!(lease.permits, 3);
    let expires = lease.expires_after.unwrap();
    assert!(expires.seconds == 0, "never past the window: {expires:?}");
    // The next window: its whole budget is taken by others.
    let ends = Duration::from_nanos(u64::try_from(expires.nanos).unwrap());
    tokio::time::sleep(ends + Duration::from_millis(20)).await;
    assert!(check(&svc, &[("windowed", "k", 5)]).await.allowed);
    // The old lease's unused permits belong to the window that ended: a
    // refund now would let this window admit more than 5.
    sync(3, 0, 0).await;
    assert!(!check(&svc, &[("windowed", "k", 1)]).await.allowed);
}
