//! Synced rules through real fleets: three Envoys of two workers each share
//! limits kept by quota servers (`sluice serve`), one in memory or two
//! replicas on one Redis; then faults: the quota server killed and
//! restarted mid-traffic, Redis killed and restarted behind two replicas,
//! and a quota server slower than the rules' timeout (a delaying TCP proxy
//! between the Envoys and it). Each fault test checks that every failure
//! mode does what it says, that no request waits past its rule's timeout,
//! that no filter VM failed, and that the fleet is exact again afterwards.
//!
//! The helpers (`sluice_e2e::fleet`) take the sync mode as a parameter;
//! these tests run [`MODE`].
//!
//! Needs Envoy (`make setup`), `redis-server`, the filter (`make wasm`) and
//! the `sluice` binary (`cargo build -p sluice-quota-server`, or
//! `SLUICE_BIN`).

// Test code: failing means panicking.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use serde_json::{json, Value};
use sluice_e2e::client::Client;
use sluice_e2e::delay_proxy::DelayProxy;
use sluice_e2e::fleet::{
    burst, count, local_rule, quota_server_config, start_quota_server, synced_rule, Domain, Fleet,
    OnFailure, Sent, Storage, StorageFailure, SyncMode, SyncOutcomes, Traffic,
};
use sluice_e2e::redis::Redis;
use sluice_e2e::upstream::Upstream;
use sluice_e2e::{free_port, wait};
use sluice_quota_server::launcher::QuotaServer;

/// The sync mode under test.
const MODE: SyncMode = SyncMode::Exact;
/// Envoys in a fleet, and workers per Envoy.
const ENVOYS: usize = 3;
const WORKERS: u32 = 2;
/// What the quota server admits per key of rule `fleet`, for the fleet.
const LIMIT: usize = 20;
/// The timeout of rules `open`, `closed` and `fallback`.
const TIMEOUT: Duration = Duration::from_millis(200);
/// The timeout of rule `fleet`: long, so that a loaded machine never makes
/// it fail closed while the quota server is up.
const FLEET_TIMEOUT: Duration = Duration::from_secs(1);
/// What a request may take beyond its rule's timeout here: six Envoy
/// workers, the quota servers and the test share two cores.
const MARGIN: Duration = Duration::from_millis(800);
/// How late the slow quota server answers: past any rule's timeout plus
/// the margin, so a request that waited for an answer would show.
const SLOW: Duration = Duration::from_millis(1500);
/// Rule `fallback`'s local limit per Envoy and key while the quota server
/// fails.
const FILTER_FALLBACK: usize = 2;
/// Domain `edge`'s limit per replica and key while Redis fails.
const SERVER_FALLBACK: usize = 3;
/// A limit no test reaches.
const UNLIMITED: u64 = 1_000_000;
/// How long the quota server may take to be used again after a recovery.
const RECOVERY: Duration = Duration::from_secs(15);

/// The filter's rules: `fleet` per `x-client` (fails closed, so a failed
/// call can only lower the count), `open`, `closed` and `fallback` (per
/// `x-client`) for the failure modes, and `local` (this Envoy alone).
fn filter_config(mode: SyncMode) -> Value {
    let fallback = OnFailure::Fallback {
        count: FILTER_FALLBACK as u64,
    };
    let client = ["header:x-client"];
    json!({"rules": [
        synced_rule("fleet", "/fleet", &client, mode.sync("edge", FLEET_TIMEOUT, OnFailure::Closed)),
        synced_rule("open", "/open", &[], mode.sync("loose", TIMEOUT, OnFailure::Open)),
        synced_rule("closed", "/closed", &[], mode.sync("strict", TIMEOUT, OnFailure::Closed)),
        synced_rule("fallback", "/fallback", &client, mode.sync("edge", TIMEOUT, fallback)),
        local_rule("local", "/local", UNLIMITED),
    ]})
}

/// The quota server's domains, whose failure modes apply when Redis fails:
/// `edge` falls back on a per-replica limit, `loose` fails open, `strict`
/// closed.
fn domains() -> Vec<Domain> {
    let fallback = StorageFailure::Fallback {
        count: SERVER_FALLBACK as u64,
    };
    vec![
        Domain::new(
            "edge",
            fallback,
            &[("fleet", LIMIT as u64), ("fallback", UNLIMITED)],
        ),
        Domain::new("loose", StorageFailure::Open, &[("open", UNLIMITED)]),
        Domain::new("strict", StorageFailure::Closed, &[("closed", UNLIMITED)]),
    ]
}

/// A quota server on 127.0.0.1:`port` (0: any) keeping counts in `storage`.
fn quota_server(port: u16, storage: &Storage) -> QuotaServer {
    start_quota_server(&quota_server_config(port, storage, &domains()))
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// The fleet for `test`, Envoy `i` calling the quota server on
/// `quota_ports[i % len]`.
async fn start_fleet(test: &str, upstream: &Upstream, quota_ports: &[u16]) -> Fleet {
    Fleet::start(
        test,
        upstream.port(),
        quota_ports,
        ENVOYS,
        WORKERS,
        &filter_config(MODE),
    )
    .await
    .unwrap_or_else(|e| panic!("starting the fleet: {e:#}"))
}

/// The keys' requests to rule `fleet`, all at once: twice the limit each,
/// spread over every Envoy. The fleet must admit exactly the limit per key,
/// each request asking the quota server once.
async fn assert_exact_per_key(fleet: &Fleet, keys: &[&str]) {
    let clients = fleet.clients();
    let before = fleet.sync_outcomes("fleet").await.unwrap();
    let allowed_before = fleet.allowed("fleet").await.unwrap();
    let bursts = keys.iter().map(|key| {
        let clients = clients.clone();
        async move { burst(&clients, "/fleet", &[("x-client", key)], 2 * LIMIT, 4).await }
    });
    let results = futures_util::future::join_all(bursts).await;
    for (key, sent) in keys.iter().zip(results) {
        let sent = sent.unwrap();
        assert_eq!(count(&sent, 200), LIMIT, "{key}: {:?}", statuses(&sent));
        assert_eq!(count(&sent, 429), LIMIT, "{key}: {:?}", statuses(&sent));
    }
    let asked = fleet.sync_outcomes("fleet").await.unwrap() - before;
    let sent = (keys.len() * 2 * LIMIT) as u64;
    assert_eq!(
        asked,
        SyncOutcomes {
            ok: sent,
            ..SyncOutcomes::default()
        },
        "every request asked the quota server once"
    );
    assert_eq!(
        fleet.allowed("fleet").await.unwrap() - allowed_before,
        (keys.len() * LIMIT) as u64
    );
}

fn statuses(sent: &[Sent]) -> Vec<u16> {
    sent.iter().map(|s| s.reply.status).collect()
}

/// Waits until every client's `/closed` (a rule that fails closed) is
/// admitted again: each Envoy reaches a quota server that decides.
async fn wait_until_decided_again(clients: &[Client]) {
    for (i, client) in clients.iter().enumerate() {
        wait::until(
            &format!("Envoy {i} using the quota server again"),
            RECOVERY,
            || async {
                let reply = client.get("/closed").await.map_err(|e| format!("{e:#}"))?;
                match reply.status {
                    200 => Ok(()),
                    status => Err(format!("{status} {}", reply.text())),
                }
            },
        )
        .await
        .unwrap();
    }
}

/// What holds for every request while something fails: never a 503 (a
/// failed filter VM) nor another error, never a wait past its rule's
/// timeout, and `/open` always admitted.
fn assert_bounded_and_alive(sent: &[Sent]) {
    for s in sent {
        let reply = &s.reply;
        assert!(
            matches!(reply.status, 200 | 429),
            "{} via Envoy {}: status {}: {}",
            s.path,
            s.envoy,
            reply.status,
            reply.text()
        );
        assert!(
            reply.elapsed < TIMEOUT + MARGIN,
            "{} via Envoy {} waited {:?}",
            s.path,
            s.envoy,
            reply.elapsed
        );
        if s.path == "/open" {
            assert_eq!(reply.status, 200, "open never refuses: {}", reply.text());
        }
    }
}

/// The replies to `path` among `sent`.
fn on<'a>(sent: &'a [Sent], path: &str) -> Vec<&'a Sent> {
    sent.iter().filter(|s| s.path == path).collect()
}

/// The `error` of a 429's JSON body, after checking that it names `rule`.
fn refusal_of(sent: &Sent, rule: &str) -> String {
    let body = sent.reply.json().unwrap();
    assert_eq!(body["rule"], rule, "{}", sent.reply.text());
    body["error"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_envoys_admit_exactly_the_limit_per_key_through_one_quota_server() {
    let server = quota_server(0, &Storage::Memory);
    let upstream = Upstream::start().await.unwrap();
    let fleet = start_fleet("fleet_one_quota_server", &upstream, &[server.grpc.port()]).await;

    // Three keys at once: each its own budget, whatever the others use.
    assert_exact_per_key(&fleet, &["alice", "bob", "carol"]).await;
    for (i, envoy) in fleet.envoys().iter().enumerate() {
        let allowed = envoy.sluice_counter("fleet", "allowed").await.unwrap();
        assert!(allowed > 0, "Envoy {i} admitted nothing");
    }
    assert_eq!(upstream.requests(), (3 * LIMIT) as u64);
    fleet.check_vms().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_envoys_admit_exactly_the_limit_per_key_through_two_replicas_on_redis() {
    let redis = Redis::start().unwrap();
    let storage = Storage::Redis { url: redis.url() };
    let replicas = [quota_server(0, &storage), quota_server(0, &storage)];
    let upstream = Upstream::start().await.unwrap();
    // Envoys 0 and 2 call the first replica, Envoy 1 the second.
    let ports = replicas.each_ref().map(|r| r.grpc.port());
    let fleet = start_fleet("fleet_two_replicas", &upstream, &ports).await;

    assert_exact_per_key(&fleet, &["alice", "bob", "carol"]).await;
    // Both replicas took part: every Envoy admitted some.
    for (i, envoy) in fleet.envoys().iter().enumerate() {
        let allowed = envoy.sluice_counter("fleet", "allowed").await.unwrap();
        assert!(allowed > 0, "Envoy {i} admitted nothing");
    }
    assert_eq!(upstream.requests(), (3 * LIMIT) as u64);
    fleet.check_vms().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failure_modes_hold_while_the_quota_server_is_down_and_accuracy_returns() {
    let port = free_port().unwrap();
    let mut server = quota_server(port, &Storage::Memory);
    let upstream = Upstream::start().await.unwrap();
    let fleet = start_fleet("fleet_quota_server_down", &upstream, &[port]).await;
    let clients = fleet.clients();
    wait_until_decided_again(&clients).await;
    let rules = ["open", "closed", "fallback"];
    let mut before = Vec::new();
    for rule in rules {
        before.push(fleet.sync_outcomes(rule).await.unwrap());
    }

    // Traffic on the three rules through every Envoy while the server is
    // killed.
    let traffic = Traffic::start(
        &clients,
        &["/open", "/closed", "/fallback"],
        &[("x-client", "traffic")],
        6,
        300,
    );
    traffic.wait_for(60, Duration::from_secs(20)).await.unwrap();
    server.kill();
    let killed_at = traffic.answered();
    traffic
        .wait_for(killed_at + 90, Duration::from_secs(20))
        .await
        .unwrap();
    let sent = traffic.stop().await.unwrap();
    assert_bounded_and_alive(&sent);
    let closed = on(&sent, "/closed");
    let refused: Vec<_> = closed.iter().filter(|s| s.reply.status == 429).collect();
    assert!(!refused.is_empty(), "no /closed request was refused");
    for s in refused {
        assert_eq!(refusal_of(s, "closed"), "rate_limit_unavailable");
    }
    // One call per request, each with one outcome; the failure modes said
    // which.
    for (rule, before) in rules.iter().zip(before) {
        let calls = fleet.sync_outcomes(rule).await.unwrap() - before;
        let requests = on(&sent, &format!("/{rule}")).len() as u64;
        assert_eq!(calls.total(), requests, "{rule}: {calls:?}");
        match *rule {
            "closed" => assert!(calls.failed_closed > 0, "{rule}: {calls:?}"),
            _ => assert!(calls.failed_open > 0, "{rule}: {calls:?}"),
        }
    }

    // Down: open admits, closed refuses, fallback admits its local limit
    // per Envoy (for a fresh key), all within the timeout.
    let down = [
        burst(&clients, "/open", &[], 2 * ENVOYS, 3).await.unwrap(),
        burst(&clients, "/closed", &[], 2 * ENVOYS, 3)
            .await
            .unwrap(),
        burst(
            &clients,
            "/fallback",
            &[("x-client", "frank")],
            ENVOYS * (FILTER_FALLBACK + 3),
            3,
        )
        .await
        .unwrap(),
    ]
    .concat();
    assert_bounded_and_alive(&down);
    for s in on(&down, "/closed") {
        assert_eq!(s.reply.status, 429);
        assert_eq!(refusal_of(s, "closed"), "rate_limit_unavailable");
    }
    let fallback = on(&down, "/fallback");
    let admitted = fallback.iter().filter(|s| s.reply.status == 200).count();
    assert_eq!(
        admitted,
        ENVOYS * FILTER_FALLBACK,
        "each Envoy its own fallback"
    );
    fleet.check_vms().await.unwrap();
    fleet
        .check_local_rule_on_every_worker("/local")
        .await
        .unwrap();

    // Back on the same port: the fleet is exact again.
    let _server = quota_server(port, &Storage::Memory);
    wait_until_decided_again(&clients).await;
    assert_exact_per_key(&fleet, &["carol"]).await;
    fleet.check_vms().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server_failure_modes_hold_while_redis_is_down_behind_two_replicas_and_accuracy_returns() {
    let mut redis = Redis::start().unwrap();
    let redis_port = redis.port();
    let storage = Storage::Redis { url: redis.url() };
    let replicas = [quota_server(0, &storage), quota_server(0, &storage)];
    let upstream = Upstream::start().await.unwrap();
    let ports = replicas.each_ref().map(|r| r.grpc.port());
    let fleet = start_fleet("fleet_redis_down", &upstream, &ports).await;
    let clients = fleet.clients();
    wait_until_decided_again(&clients).await;

    let traffic = Traffic::start(&clients, &["/open", "/closed"], &[], 4, 300);
    traffic.wait_for(40, Duration::from_secs(20)).await.unwrap();
    redis.stop();
    let killed_at = traffic.answered();
    traffic
        .wait_for(killed_at + 80, Duration::from_secs(20))
        .await
        .unwrap();
    let sent = traffic.stop().await.unwrap();
    assert_bounded_and_alive(&sent);
    let closed = on(&sent, "/closed");
    assert!(
        closed.iter().any(|s| s.reply.status == 429),
        "no /closed request was refused"
    );

    // Redis down: the replicas answer, each domain's failure mode decides.
    let fleet_before = fleet.sync_outcomes("fleet").await.unwrap();
    let down = [
        burst(&clients, "/open", &[], 2 * ENVOYS, 3).await.unwrap(),
        burst(&clients, "/closed", &[], 2 * ENVOYS, 3)
            .await
            .unwrap(),
        // Envoy 1 alone calls the second replica: a third of these.
        burst(
            &clients,
            "/fleet",
            &[("x-client", "dave")],
            ENVOYS * (SERVER_FALLBACK + 3),
            3,
        )
        .await
        .unwrap(),
    ]
    .concat();
    assert_bounded_and_alive(&down);
    for s in on(&down, "/closed") {
        assert_eq!(
            s.reply.status,
            429,
            "strict fails closed: {}",
            s.reply.text()
        );
        refusal_of(s, "closed");
    }
    let dave = on(&down, "/fleet");
    let admitted = dave.iter().filter(|s| s.reply.status == 200).count();
    assert_eq!(
        admitted,
        2 * SERVER_FALLBACK,
        "each replica admits its fallback limit"
    );
    let calls = fleet.sync_outcomes("fleet").await.unwrap() - fleet_before;
    assert_eq!(
        calls.ok,
        dave.len() as u64,
        "the replicas answered every call: {calls:?}"
    );
    fleet.check_vms().await.unwrap();
    fleet
        .check_local_rule_on_every_worker("/local")
        .await
        .unwrap();

    // Redis back on its port (empty): both replicas use it again, and the
    // fleet is exact through them.
    let _redis = Redis::start_on(redis_port).unwrap();
    wait_until_decided_again(&clients).await;
    assert_exact_per_key(&fleet, &["erin"]).await;
    fleet.check_vms().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_quota_server_times_out_within_the_rule_timeout_and_accuracy_returns() {
    let server = quota_server(0, &Storage::Memory);
    let proxy = DelayProxy::start(server.grpc).await.unwrap();
    let upstream = Upstream::start().await.unwrap();
    let fleet = start_fleet("fleet_slow_quota_server", &upstream, &[proxy.port()]).await;
    let clients = fleet.clients();
    wait_until_decided_again(&clients).await;
    let rules = ["open", "closed", "fallback"];
    let mut before = Vec::new();
    for rule in rules {
        before.push(fleet.sync_outcomes(rule).await.unwrap());
    }

    // Answers now come back later than any request may wait.
    proxy.set_delay(SLOW);
    let per_rule = ENVOYS * (FILTER_FALLBACK + 2);
    let (open, closed, fallback) = tokio::join!(
        burst(&clients, "/open", &[], per_rule, 4),
        burst(&clients, "/closed", &[], per_rule, 4),
        burst(&clients, "/fallback", &[("x-client", "grace")], per_rule, 4),
    );
    let sent = [open.unwrap(), closed.unwrap(), fallback.unwrap()].concat();
    assert_bounded_and_alive(&sent);
    for s in on(&sent, "/closed") {
        assert_eq!(s.reply.status, 429);
        assert_eq!(refusal_of(s, "closed"), "rate_limit_unavailable");
    }
    let admitted = on(&sent, "/fallback")
        .iter()
        .filter(|s| s.reply.status == 200)
        .count();
    assert_eq!(
        admitted,
        ENVOYS * FILTER_FALLBACK,
        "each Envoy its own fallback"
    );
    // Every call timed out, and the filter counted it so.
    for (rule, before) in rules.iter().zip(before) {
        let calls = fleet.sync_outcomes(rule).await.unwrap() - before;
        assert_eq!(
            calls,
            SyncOutcomes {
                timeout: per_rule as u64,
                ..SyncOutcomes::default()
            },
            "{rule}"
        );
    }
    fleet.check_vms().await.unwrap();
    fleet
        .check_local_rule_on_every_worker("/local")
        .await
        .unwrap();

    // Prompt again (once the late answers queued are out): exact again.
    proxy.set_delay(Duration::ZERO);
    wait_until_decided_again(&clients).await;
    assert_exact_per_key(&fleet, &["gina"]).await;
    fleet.check_vms().await.unwrap();
}
