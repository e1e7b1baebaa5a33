//! Synced rules through real fleets: three Envoys of two workers each share
//! limits kept by quota servers (`sluice serve`), one in memory or two
//! replicas on one Redis; then faults: the quota server killed and
//! restarted mid-traffic, Redis killed and restarted behind two replicas,
//! and a quota server slower than the rules' timeout (a delaying TCP proxy
//! between the Envoys and it). Each fault test checks that every failure
//! mode does what it says, that no request waits past its rule's timeout,
//! that no filter VM failed, and that the fleet is accurate again
//! afterwards.
//!
//! Each test body takes the sync mode and runs in both: exact (every
//! request asks, so the fleet admits exactly the limit) and leased (each
//! Envoy with its sync service; the fleet admits at most the limit and at
//! least the documented floor `limit − 2 × N × L`). The quota server
//! killed in leased mode is in `leased.rs`.
//!
//! Needs Envoy (`make setup`), `redis-server`, the filter (`make wasm`) and
//! the `sluice` binary (`cargo build -p sluice-quota-server`, or
//! `SLUICE_BIN`).

// Test code: failing means panicking.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

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

/// Envoys in a fleet, and workers per Envoy.
const ENVOYS: usize = 3;
const WORKERS: u32 = 2;
/// Leased mode: every Envoy of the fleet shares each budget, 20 permits a
/// lease at most.
const LEASED: SyncMode = SyncMode::Leased {
    replicas: ENVOYS as u64,
    max_lease: 20,
};
/// What the quota server admits per key of rule `fleet` in exact mode.
const EXACT_LIMIT: usize = 20;
/// The same in leased mode: large enough that the documented floor
/// (`300 − 2 × 3 × 20 = 180`) says something.
const LEASED_LIMIT: usize = 300;
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
/// How long leases may keep serving once the quota server stops granting:
/// until their next sync attempt (two intervals) or their expiry (1 s),
/// plus room for a loaded machine.
const LEASES_GONE: Duration = Duration::from_secs(3);
/// How long the fleet is probed after sustained demand: past every lease's
/// expiry, so that what leases held unused is back in the budget.
const SETTLE: Duration = Duration::from_millis(2_000);

/// What the quota server admits per key of rule `fleet`.
fn limit(mode: SyncMode) -> usize {
    match mode {
        SyncMode::Exact => EXACT_LIMIT,
        SyncMode::Leased { .. } => LEASED_LIMIT,
    }
}

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
fn domains(mode: SyncMode) -> Vec<Domain> {
    let fallback = StorageFailure::Fallback {
        count: SERVER_FALLBACK as u64,
    };
    vec![
        Domain::new(
            "edge",
            fallback,
            &[("fleet", limit(mode) as u64), ("fallback", UNLIMITED)],
        ),
        Domain::new("loose", StorageFailure::Open, &[("open", UNLIMITED)]),
        Domain::new("strict", StorageFailure::Closed, &[("closed", UNLIMITED)]),
    ]
}

/// A quota server for `mode`'s fleet on 127.0.0.1:`port` (0: any) keeping
/// counts in `storage`.
fn quota_server(mode: SyncMode, port: u16, storage: &Storage) -> QuotaServer {
    start_quota_server(&quota_server_config(port, storage, &domains(mode)))
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// The fleet for `test` (suffixed with the mode's name) in `mode`, Envoy
/// `i` calling the quota server on `quota_ports[i % len]`.
async fn start_fleet(
    test: &str,
    mode: SyncMode,
    upstream: &Upstream,
    quota_ports: &[u16],
) -> Fleet {
    Fleet::start(
        &format!("{test}_{}", mode.name()),
        upstream.port(),
        quota_ports,
        ENVOYS,
        WORKERS,
        mode,
        &filter_config(mode),
    )
    .await
    .unwrap_or_else(|e| panic!("starting the fleet: {e:#}"))
}

/// The keys' requests to rule `fleet`, all at once: twice the limit each,
/// spread over every Envoy. Per key, the fleet admits at most the limit and
/// at least the mode's floor (exact: the limit); the quota server answered
/// every call, once per request in exact mode, for few requests in leased
/// mode (most are admitted from leases). Returns what each key admitted.
async fn assert_per_key(fleet: &Fleet, mode: SyncMode, keys: &[&str]) -> Vec<usize> {
    let limit = limit(mode);
    let floor = mode.floor(limit as u64) as usize;
    let clients = fleet.clients();
    let before = fleet.sync_outcomes_settled("fleet").await.unwrap();
    let allowed_before = fleet.allowed("fleet").await.unwrap();
    let bursts = keys.iter().map(|key| {
        let clients = clients.clone();
        async move { burst(&clients, "/fleet", &[("x-client", key)], 2 * limit, 4).await }
    });
    let results = futures_util::future::join_all(bursts).await;
    let mut admitted = Vec::new();
    for (key, sent) in keys.iter().zip(results) {
        let sent = sent.unwrap();
        let ok = count(&sent, 200);
        eprintln!(
            "{} mode, key {key}: admitted {ok} of {limit} (floor {floor})",
            mode.name()
        );
        assert_eq!(
            ok + count(&sent, 429),
            sent.len(),
            "{key}: {:?}",
            statuses(&sent)
        );
        assert!(ok <= limit, "{key}: overshoot: {ok} > {limit}");
        assert!(ok >= floor, "{key}: {ok} below the floor {floor}");
        admitted.push(ok);
    }
    // Outcome counters reach Envoy in batches: once every admission shows,
    // so do the calls counted with them.
    let total: usize = admitted.iter().sum();
    let allowed = wait::until(
        "the fleet's allowed count",
        Duration::from_secs(5),
        || async {
            match fleet.allowed("fleet").await {
                Ok(n) if n - allowed_before == total as u64 => Ok(()),
                Ok(n) => Err((n - allowed_before).to_string()),
                Err(e) => Err(format!("{e:#}")),
            }
        },
    )
    .await;
    assert!(allowed.is_ok(), "{allowed:?}: {total} admitted");
    let sent = (keys.len() * 2 * limit) as u64;
    let asked = match mode {
        SyncMode::Exact => fleet.sync_outcomes_since("fleet", before, sent).await,
        SyncMode::Leased { .. } => fleet.sync_outcomes("fleet").await.map(|now| now - before),
    }
    .unwrap();
    eprintln!("{} mode: {asked:?} for {sent} requests", mode.name());
    assert_eq!(
        asked.ok,
        asked.total(),
        "the quota server answered: {asked:?}"
    );
    match mode {
        SyncMode::Exact => assert_eq!(asked.ok, sent, "every request asked once"),
        SyncMode::Leased { .. } => assert!(
            (asked.ok as usize) < total / 2,
            "{asked:?}: most admissions did not come from leases ({total} admitted)"
        ),
    }
    admitted
}

/// Requests for `key` on rule `fleet`, a few at a time over every Envoy,
/// for [`SETTLE`]: long enough for every lease to come back or expire.
/// Returns how many were admitted.
async fn admitted_while_settling(fleet: &Fleet, key: &str) -> usize {
    let clients = fleet.clients();
    let until = Instant::now() + SETTLE;
    let mut admitted = 0;
    while Instant::now() < until {
        let sent = burst(&clients, "/fleet", &[("x-client", key)], ENVOYS, ENVOYS)
            .await
            .unwrap();
        admitted += count(&sent, 200);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    admitted
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

/// Waits until every client's `/closed` (a rule that fails closed) is
/// refused as unavailable: each Envoy's leases, if any, are gone.
async fn wait_until_refused(clients: &[Client]) {
    for (i, client) in clients.iter().enumerate() {
        wait::until(
            &format!("Envoy {i} refusing /closed"),
            LEASES_GONE,
            || async {
                let reply = client.get("/closed").await.map_err(|e| format!("{e:#}"))?;
                match reply.status {
                    429 => Ok(()),
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

/// Three keys at once through the fleet, each its own budget whatever the
/// others use; every Envoy takes part; then, once every lease is back or
/// expired, one key never gets more than its limit in all.
async fn share_per_key(fleet: &Fleet, mode: SyncMode, upstream: &Upstream) {
    let admitted = assert_per_key(fleet, mode, &["alice", "bob", "carol"]).await;
    for (i, envoy) in fleet.envoys().iter().enumerate() {
        let allowed = envoy
            .stat_when(
                "wasmcustom.sluice_http.rule.fleet.outcome.allowed",
                "> 0",
                |n| n > 0,
            )
            .await
            .unwrap();
        assert!(allowed > 0, "Envoy {i} admitted nothing");
    }
    let more = admitted_while_settling(fleet, "alice").await;
    eprintln!(
        "{} mode: alice admitted {more} more once her leases were back",
        mode.name()
    );
    assert!(
        admitted[0] + more <= limit(mode),
        "{} + {more} > {}",
        admitted[0],
        limit(mode)
    );
    let total: usize = admitted.iter().sum::<usize>() + more;
    assert_eq!(
        upstream.requests(),
        total as u64,
        "the upstream saw exactly the admitted requests"
    );
    fleet.check_vms().await.unwrap();
}

async fn through_one_quota_server(mode: SyncMode) {
    let server = quota_server(mode, 0, &Storage::Memory);
    let upstream = Upstream::start().await.unwrap();
    let ports = [server.grpc.port()];
    let fleet = start_fleet("fleet_one_quota_server", mode, &upstream, &ports).await;
    share_per_key(&fleet, mode, &upstream).await;
}

async fn through_two_replicas_on_redis(mode: SyncMode) {
    let redis = Redis::start().unwrap();
    let storage = Storage::Redis { url: redis.url() };
    let replicas = [
        quota_server(mode, 0, &storage),
        quota_server(mode, 0, &storage),
    ];
    let upstream = Upstream::start().await.unwrap();
    // Envoys 0 and 2 call the first replica, Envoy 1 the second: every
    // Envoy admitting some means both replicas took part.
    let ports = replicas.each_ref().map(|r| r.grpc.port());
    let fleet = start_fleet("fleet_two_replicas", mode, &upstream, &ports).await;
    share_per_key(&fleet, mode, &upstream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exact_three_envoys_admit_exactly_the_limit_per_key_through_one_quota_server() {
    through_one_quota_server(SyncMode::Exact).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leased_three_envoys_stay_within_the_limit_and_reach_their_share_through_one_quota_server()
{
    through_one_quota_server(LEASED).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exact_three_envoys_admit_exactly_the_limit_per_key_through_two_replicas_on_redis() {
    through_two_replicas_on_redis(SyncMode::Exact).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leased_three_envoys_stay_within_the_limit_and_reach_their_share_through_two_replicas_on_redis(
) {
    through_two_replicas_on_redis(LEASED).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exact_failure_modes_hold_while_the_quota_server_is_down_and_accuracy_returns() {
    let mode = SyncMode::Exact;
    let port = free_port().unwrap();
    let mut server = quota_server(mode, port, &Storage::Memory);
    let upstream = Upstream::start().await.unwrap();
    let fleet = start_fleet("fleet_quota_server_down", mode, &upstream, &[port]).await;
    let clients = fleet.clients();
    wait_until_decided_again(&clients).await;
    let rules = ["open", "closed", "fallback"];
    let mut before = Vec::new();
    for rule in rules {
        before.push(fleet.sync_outcomes_settled(rule).await.unwrap());
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
        let requests = on(&sent, &format!("/{rule}")).len() as u64;
        let calls = fleet
            .sync_outcomes_since(rule, before, requests)
            .await
            .unwrap();
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
    let _server = quota_server(mode, port, &Storage::Memory);
    wait_until_decided_again(&clients).await;
    assert_per_key(&fleet, mode, &["carol"]).await;
    fleet.check_vms().await.unwrap();
}

/// Redis killed behind two replicas mid-traffic, then restarted empty.
async fn redis_down_behind_two_replicas(mode: SyncMode) {
    let mut redis = Redis::start().unwrap();
    let redis_port = redis.port();
    let storage = Storage::Redis { url: redis.url() };
    let replicas = [
        quota_server(mode, 0, &storage),
        quota_server(mode, 0, &storage),
    ];
    let upstream = Upstream::start().await.unwrap();
    let ports = replicas.each_ref().map(|r| r.grpc.port());
    let fleet = start_fleet("fleet_redis_down", mode, &upstream, &ports).await;
    let clients = fleet.clients();
    wait_until_decided_again(&clients).await;

    let traffic = Traffic::start(&clients, &["/open", "/closed"], &[], 4, 3000);
    traffic.wait_for(40, Duration::from_secs(20)).await.unwrap();
    redis.stop();
    // Until no Envoy admits /closed any more (in leased mode, once the
    // leases held at the kill are gone).
    wait_until_refused(&clients).await;
    let sent = traffic.stop().await.unwrap();
    assert_bounded_and_alive(&sent);
    let closed = on(&sent, "/closed");
    assert!(
        closed.iter().any(|s| s.reply.status == 429),
        "no /closed request was refused"
    );

    // Redis down: the replicas answer, each domain's failure mode decides.
    let fleet_before = fleet.sync_outcomes_settled("fleet").await.unwrap();
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
    // Each replica admits at most its fallback limit; in leased mode part
    // of it may sit unused in leases.
    let dave = on(&down, "/fleet");
    let admitted = dave.iter().filter(|s| s.reply.status == 200).count();
    let fallbacks = 2 * SERVER_FALLBACK;
    eprintln!(
        "{} mode, Redis down: admitted {admitted} of the replicas' {fallbacks}",
        mode.name()
    );
    assert!(admitted <= fallbacks, "{admitted} > {fallbacks}");
    assert!(
        admitted >= mode.floor(fallbacks as u64) as usize,
        "{admitted} below the floor"
    );
    let calls = match mode {
        SyncMode::Exact => {
            fleet
                .sync_outcomes_since("fleet", fleet_before, dave.len() as u64)
                .await
        }
        SyncMode::Leased { .. } => fleet
            .sync_outcomes("fleet")
            .await
            .map(|now| now - fleet_before),
    }
    .unwrap();
    assert_eq!(calls.ok, calls.total(), "the replicas answered: {calls:?}");
    if mode == SyncMode::Exact {
        assert_eq!(admitted, fallbacks, "each replica admits its fallback");
        assert_eq!(calls.ok, dave.len() as u64, "one call per request");
    }
    fleet.check_vms().await.unwrap();
    fleet
        .check_local_rule_on_every_worker("/local")
        .await
        .unwrap();

    // Redis back on its port (empty): both replicas use it again, and the
    // fleet is accurate through them.
    let _redis = Redis::start_on(redis_port).unwrap();
    wait_until_decided_again(&clients).await;
    assert_per_key(&fleet, mode, &["erin"]).await;
    fleet.check_vms().await.unwrap();
}

/// The quota server's answers delayed past every rule's timeout, then
/// prompt again.
async fn slow_quota_server(mode: SyncMode) {
    let server = quota_server(mode, 0, &Storage::Memory);
    let proxy = DelayProxy::start(server.grpc).await.unwrap();
    let upstream = Upstream::start().await.unwrap();
    let fleet = start_fleet("fleet_slow_quota_server", mode, &upstream, &[proxy.port()]).await;
    let clients = fleet.clients();
    wait_until_decided_again(&clients).await;

    // Answers now come back later than any request may wait; in leased
    // mode, the leases held serve until their next sync fails.
    proxy.set_delay(SLOW);
    wait_until_refused(&clients).await;
    let rules = ["open", "closed", "fallback"];
    let mut before = Vec::new();
    for rule in rules {
        before.push(fleet.sync_outcomes_settled(rule).await.unwrap());
    }
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
    // No lease left: every request asked, every call timed out, and the
    // filter counted it so.
    for (rule, before) in rules.iter().zip(before) {
        let calls = fleet
            .sync_outcomes_since(rule, before, per_rule as u64)
            .await
            .unwrap();
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

    // Prompt again once the late answers queued are out (on every
    // connection: the sync service has its own): accurate again.
    proxy.set_delay(Duration::ZERO);
    wait::until("the late answers out", RECOVERY, || async {
        match proxy.queued() {
            0 => Ok(()),
            n => Err(format!("{n} chunks queued")),
        }
    })
    .await
    .unwrap();
    wait_until_decided_again(&clients).await;
    assert_per_key(&fleet, mode, &["gina"]).await;
    fleet.check_vms().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exact_server_failure_modes_hold_while_redis_is_down_behind_two_replicas_and_accuracy_returns(
) {
    redis_down_behind_two_replicas(SyncMode::Exact).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leased_server_failure_modes_hold_while_redis_is_down_behind_two_replicas_and_accuracy_returns(
) {
    redis_down_behind_two_replicas(LEASED).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exact_a_slow_quota_server_times_out_within_the_rule_timeout_and_accuracy_returns() {
    slow_quota_server(SyncMode::Exact).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leased_a_slow_quota_server_times_out_within_the_rule_timeout_and_accuracy_returns() {
    slow_quota_server(LEASED).await;
}
