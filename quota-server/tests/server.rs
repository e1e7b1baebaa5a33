//! The real `sluice` binary answering Envoy's rate limit service over gRPC.

// Test helpers fail loudly: a panic is the report.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::RedisServer;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{rate_limit::Unit, Code};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use sluice_quota_server::launcher::QuotaServer;
use support::{client, descriptor, launcher, write};
use tonic::transport::Channel;

/// The client's own deadline: a correctness bound (the server must answer,
/// not hang), far above the storage timeout.
const CLIENT_DEADLINE: Duration = Duration::from_secs(1);

/// Starts `sluice serve` on the configuration file at `config`.
fn start(config: &Path) -> QuotaServer {
    launcher().start_file(config).unwrap()
}

/// One call, bounded by the client deadline; returns the answer and how long it took.
async fn ask(
    client: &mut RateLimitServiceClient<Channel>,
    domain: &str,
    descriptors: Vec<RateLimitDescriptor>,
    hits: u32,
) -> (RateLimitResponse, Duration) {
    let mut request = tonic::Request::new(RateLimitRequest {
        domain: domain.into(),
        descriptors,
        hits_addend: hits,
    });
    request.set_timeout(CLIENT_DEADLINE);
    let started = Instant::now();
    let response = tokio::time::timeout(CLIENT_DEADLINE, client.should_rate_limit(request))
        .await
        .expect("the server must answer before the client's deadline")
        .expect("the call must succeed")
        .into_inner();
    (response, started.elapsed())
}

fn header<'a>(response: &'a RateLimitResponse, name: &str) -> Option<&'a str> {
    response
        .response_headers_to_add
        .iter()
        .find(|h| h.key == name)
        .map(|h| h.value.as_str())
}

const ENVOY_FILE: &str = r#"
domain: edge
descriptors:
  - key: remote_address
    rate_limit: {unit: day, requests_per_unit: 2}
  - key: path
    value: /login
    rate_limit: {name: login, unit: day, requests_per_unit: 1}
  - key: path
    value: /health
    rate_limit: {unlimited: true}
  - key: client
    descriptors:
      - key: plan
        value: free
        rate_limit: {unit: day, requests_per_unit: 1}
      - key: plan
        value: trial
        shadow_mode: true
        rate_limit: {unit: day, requests_per_unit: 1}
  - key: vip
    rate_limit:
      unit: day
      requests_per_unit: 5
      replaces: [{name: login}]
"#;

const SERVER: &str = r#"
listen: {grpc: "127.0.0.1:0"}
domains:
  - name: api
    descriptors:
      - key: user
        rate_limit: {unit: hour, requests_per_unit: 3, algorithm: token_bucket}
    negative_hits: true
descriptor_files:
  - path: edge.yaml
"#;

#[tokio::test]
async fn boundary_hits_and_headers() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir, "edge.yaml", ENVOY_FILE);
    let mut server = start(&write(&dir, "sluice.yaml", SERVER));
    let mut client = client(&server).await;
    let user = |u: &str| vec![descriptor(&[("user", u)])];

    for expected in [2, 1, 0] {
        let (r, _) = ask(&mut client, "api", user("a"), 0).await;
        assert_eq!(r.overall_code, Code::Ok as i32);
        let s = &r.statuses[0];
        assert_eq!(s.limit_remaining, expected);
        let limit = s.current_limit.as_ref().unwrap();
        assert_eq!(
            (limit.requests_per_unit, limit.unit),
            (3, Unit::Hour as i32)
        );
        assert_eq!(header(&r, "x-ratelimit-limit"), Some("3"));
    }
    let (r, _) = ask(&mut client, "api", user("a"), 0).await;
    assert_eq!(r.overall_code, Code::OverLimit as i32);
    let s = &r.statuses[0];
    assert_eq!((s.code, s.limit_remaining), (Code::OverLimit as i32, 0));
    // A full bucket of 3 per hour refills in an hour, less the few ms since the first call.
    let reset = s.duration_until_reset.unwrap();
    assert!((3_590..=3_600).contains(&reset.seconds), "reset {reset:?}");
    // One token comes back every 20 minutes.
    assert_eq!(header(&r, "retry-after"), Some("1200"));
    assert_eq!(header(&r, "x-ratelimit-remaining"), Some("0"));
    assert!(header(&r, "ratelimit-policy").is_some());

    // hits_addend is the cost.
    let (r, _) = ask(&mut client, "api", user("b"), 2).await;
    assert_eq!(
        (r.overall_code, r.statuses[0].limit_remaining),
        (Code::Ok as i32, 1)
    );
    let (r, _) = ask(&mut client, "api", user("b"), 2).await;
    assert_eq!(r.overall_code, Code::OverLimit as i32);
    let (r, _) = ask(&mut client, "api", user("b"), 1).await;
    assert_eq!(
        (r.overall_code, r.statuses[0].limit_remaining),
        (Code::Ok as i32, 0)
    );

    // Negative hits give permits back; two descriptors on one counter add up.
    let mut refund = descriptor(&[("user", "b")]);
    refund.is_negative_hits = true;
    refund.hits_addend = Some(envoy_types::pb::google::protobuf::UInt64Value { value: 2 });
    let (r, _) = ask(&mut client, "api", vec![refund], 0).await;
    assert_eq!(r.overall_code, Code::Ok as i32);
    let (r, _) = ask(&mut client, "api", [user("b"), user("b")].concat(), 0).await;
    assert_eq!(r.overall_code, Code::Ok as i32);
    assert_eq!(
        (r.statuses[0].limit_remaining, r.statuses[1].limit_remaining),
        (0, 0),
        "both descriptors took one permit each from the same counter"
    );

    // An unknown domain is not limited (as envoyproxy/ratelimit answers).
    let (r, _) = ask(&mut client, "nope", user("a"), 0).await;
    assert_eq!(r.overall_code, Code::Ok as i32);
    assert_eq!(r.statuses.len(), 1);
    assert!(r.statuses[0].current_limit.is_none());

    // An empty domain is a client error, as in envoyproxy/ratelimit.
    let err = client
        .should_rate_limit(RateLimitRequest {
            domain: String::new(),
            descriptors: user("a"),
            hits_addend: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    let status = server.terminate(Duration::from_secs(5)).unwrap();
    assert!(status.success(), "SIGTERM is a clean stop");
}

#[tokio::test]
async fn envoyproxy_descriptor_file() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir, "edge.yaml", ENVOY_FILE);
    let server = start(&write(&dir, "sluice.yaml", SERVER));
    let mut client = client(&server).await;
    let ip = || descriptor(&[("remote_address", "10.0.0.1")]);
    let login = || descriptor(&[("path", "/login")]);

    // Two descriptors: the request is over when either is, and a request
    // over one limit takes nothing from the other.
    let (r, _) = ask(&mut client, "edge", vec![ip(), login()], 0).await;
    assert_eq!(r.overall_code, Code::Ok as i32);
    assert_eq!(
        (r.statuses[0].limit_remaining, r.statuses[1].limit_remaining),
        (1, 0)
    );
    let (r, _) = ask(&mut client, "edge", vec![ip(), login()], 0).await;
    assert_eq!(r.overall_code, Code::OverLimit as i32);
    assert_eq!(r.statuses[0].code, Code::Ok as i32);
    assert_eq!(r.statuses[1].code, Code::OverLimit as i32);
    let (r, _) = ask(&mut client, "edge", vec![ip()], 0).await;
    assert_eq!(
        r.statuses[0].limit_remaining, 0,
        "the refused request took nothing"
    );

    // Unlimited, and a path without a value rule: no limit.
    let (r, _) = ask(
        &mut client,
        "edge",
        vec![descriptor(&[("path", "/health")])],
        0,
    )
    .await;
    assert_eq!(r.overall_code, Code::Ok as i32);
    assert!(r.statuses[0].current_limit.is_none());

    // Nested: client + plan.
    let free = || vec![descriptor(&[("client", "c1"), ("plan", "free")])];
    assert_eq!(
        ask(&mut client, "edge", free(), 0).await.0.overall_code,
        Code::Ok as i32
    );
    assert_eq!(
        ask(&mut client, "edge", free(), 0).await.0.overall_code,
        Code::OverLimit as i32
    );
    let other_client = vec![descriptor(&[("client", "c2"), ("plan", "free")])];
    assert_eq!(
        ask(&mut client, "edge", other_client, 0)
            .await
            .0
            .overall_code,
        Code::Ok as i32,
        "each client value has its own counter"
    );

    // Shadow mode: counted and reported, never over.
    let trial = || vec![descriptor(&[("client", "c1"), ("plan", "trial")])];
    for remaining in [0, 0] {
        let (r, _) = ask(&mut client, "edge", trial(), 0).await;
        assert_eq!(r.overall_code, Code::Ok as i32);
        assert_eq!(r.statuses[0].limit_remaining, remaining);
        assert!(r.statuses[0].current_limit.is_some());
    }

    // `vip` replaces `login`: with both, only vip's limit counts.
    let vip = || descriptor(&[("vip", "v")]);
    let (r, _) = ask(&mut client, "edge", vec![vip(), login()], 0).await;
    assert_eq!(
        r.overall_code,
        Code::Ok as i32,
        "login (exhausted) is replaced"
    );
    assert_eq!(r.statuses[0].limit_remaining, 4);
    assert!(r.statuses[1].current_limit.is_none());
}

#[tokio::test]
async fn health_reports_serving() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir, "edge.yaml", ENVOY_FILE);
    let server = start(&write(&dir, "sluice.yaml", SERVER));
    let channel = Channel::from_shared(server.grpc_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    for service in ["", "envoy.service.ratelimit.v3.RateLimitService"] {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service:?}"
        );
    }
}

const REDIS_SERVER: &str = r#"
listen: {grpc: "127.0.0.1:0"}
storage:
  backend: redis
  # Generous: these tests check failure modes, and a busy CI machine must
  # not turn a slow answer from a healthy Redis into a failure.
  redis: {url: "REDIS_URL", timeout: 500ms}
domains:
  - name: open
    failure_mode: open
    descriptors:
      - key: user
        rate_limit: {unit: hour, requests_per_unit: 3, algorithm: gcra}
  - name: guarded
    failure_mode: open
    fallback: {count: 2, per: 1h}
    descriptors:
      - key: user
        rate_limit: {unit: hour, requests_per_unit: 3, algorithm: sliding_window_log}
  - name: closed
    failure_mode: closed
    descriptors:
      - key: user
        rate_limit: {unit: hour, requests_per_unit: 3, algorithm: token_bucket}
    negative_hits: true
"#;

/// Codes for `calls` requests by user `u` in `domain`, with the latencies.
async fn codes(
    client: &mut RateLimitServiceClient<Channel>,
    domain: &str,
    u: &str,
    calls: usize,
    latencies: &mut Vec<Duration>,
) -> Vec<i32> {
    let mut out = Vec::new();
    for _ in 0..calls {
        let (r, took) = ask(client, domain, vec![descriptor(&[("user", u)])], 0).await;
        latencies.push(took);
        out.push(r.overall_code);
    }
    out
}

#[tokio::test]
async fn redis_killed_and_restarted() {
    const OK: i32 = Code::Ok as i32;
    const OVER: i32 = Code::OverLimit as i32;
    let mut redis = RedisServer::start();
    let port = redis.port;
    let dir = tempfile::tempdir().unwrap();
    let config = REDIS_SERVER.replace("REDIS_URL", &redis.url());
    let server = start(&write(&dir, "sluice.yaml", &config));
    let mut client = client(&server).await;
    let mut up = Vec::new();
    for domain in ["open", "guarded", "closed"] {
        assert_eq!(
            codes(&mut client, domain, "a", 4, &mut up).await,
            [OK, OK, OK, OVER],
            "{domain} with Redis up"
        );
    }

    redis.stop();
    let mut down = Vec::new();
    assert_eq!(codes(&mut client, "open", "a", 5, &mut down).await, [OK; 5]);
    assert_eq!(
        codes(&mut client, "guarded", "b", 3, &mut down).await,
        [OK, OK, OVER],
        "the fallback limit (2 per hour) holds while Redis is down"
    );
    assert_eq!(
        codes(&mut client, "closed", "c", 3, &mut down).await,
        [OVER; 3]
    );
    let slowest = down.iter().max().unwrap();
    println!("Redis up: {up:?}\nRedis down: {down:?}\nslowest with Redis down: {slowest:?}");

    // A fresh Redis: counting starts over, exactly again.
    let _restarted = RedisServer::start_on(port);
    let mut recovered = false;
    for _ in 0..100 {
        let (r, _) = ask(&mut client, "closed", vec![descriptor(&[("user", "r")])], 0).await;
        if r.overall_code == OK {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(recovered, "no OK within 100 tries after Redis restarted");
    let mut after = Vec::new();
    assert_eq!(
        codes(&mut client, "closed", "r", 3, &mut after).await,
        [OK, OK, OVER]
    );
}

/// Redis that accepts connections but never answers (a hung host): every
/// call is still answered, by the failure modes, well before the client's
/// deadline.
#[tokio::test]
async fn redis_that_never_answers() {
    const OK: i32 = Code::Ok as i32;
    const OVER: i32 = Code::OverLimit as i32;
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("redis://127.0.0.1:{}", silent.local_addr().unwrap().port());
    let dir = tempfile::tempdir().unwrap();
    let server = start(&write(
        &dir,
        "sluice.yaml",
        &REDIS_SERVER.replace("REDIS_URL", &url),
    ));
    let mut client = client(&server).await;
    let mut latencies = Vec::new();
    assert_eq!(
        codes(&mut client, "open", "a", 4, &mut latencies).await,
        [OK; 4]
    );
    assert_eq!(
        codes(&mut client, "guarded", "a", 3, &mut latencies).await,
        [OK, OK, OVER]
    );
    assert_eq!(
        codes(&mut client, "closed", "a", 3, &mut latencies).await,
        [OVER; 3]
    );
    println!("Redis silent: {latencies:?}");
}

fn sluice(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn config_validate_reports_each_error_with_its_location() {
    let dir = tempfile::tempdir().unwrap();
    let bad = write(
        &dir,
        "bad.yaml",
        r#"
listen: {grpc: "127.0.0.1:0"}
storage: {backend: redis, redis: {url: "redis://127.0.0.1:1", timeout: 10s}}
domains:
  - name: api
    descriptors:
      - key: user
        rate_limit: {unit: second}
      - key: ip
        rate_limit: {unit: day, requests_per_unit: 100000000000, algorithm: gcra}
"#,
    );
    let out = sluice(&["config", "validate", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    for path in [
        "storage.redis.timeout: ",
        "domains[0].descriptors[0].rate_limit.requests_per_unit: ",
        "domains[0].descriptors[1].rate_limit: too large for the Redis backend",
    ] {
        assert!(stderr.contains(path), "missing {path:?} in:\n{stderr}");
    }

    let envoy = write(&dir, "edge.yaml", ENVOY_FILE);
    let out = sluice(&["config", "validate", envoy.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let good = write(&dir, "sluice.yaml", SERVER);
    let out = sluice(&["config", "show", good.to_str().unwrap()]);
    assert!(out.status.success());
    let shown = String::from_utf8(out.stdout).unwrap();
    assert!(
        shown.contains("name: edge"),
        "descriptor files are inlined:\n{shown}"
    );
    assert!(
        shown.contains("backend: memory"),
        "defaults are shown:\n{shown}"
    );

    let filter = write(
        &dir,
        "filter.json",
        r#"{"rules": [{"name": "r", "limit": {"count": 0, "per": "1s"}}]}"#,
    );
    let out = sluice(&["config", "validate", filter.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8(out.stderr)
        .unwrap()
        .contains("rules[0].limit.count"));
}

/// Sequential calls on one connection are not held back by Nagle's
/// algorithm: with it, each answer's last small write waits for the
/// client's delayed ACK (about 40 ms a call on Linux); without it a call
/// takes well under a millisecond here. The bound is wide (20 ms a call).
#[tokio::test]
async fn sequential_calls_on_one_connection_are_not_delayed() {
    const CALLS: u32 = 200;
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        &dir,
        "sluice.yaml",
        "listen: {grpc: \"127.0.0.1:0\"}\ndomains: [{name: api, descriptors: [{key: user, rate_limit: {unit: second, requests_per_unit: 1000000}}]}]\n",
    );
    let server = start(&config);
    // One channel is one HTTP/2 connection; calls are made one at a time.
    let mut client = client(&server).await;
    ask(&mut client, "api", vec![descriptor(&[("user", "warm")])], 1).await;
    let started = Instant::now();
    for _ in 0..CALLS {
        let (response, _) = ask(&mut client, "api", vec![descriptor(&[("user", "u")])], 1).await;
        assert_eq!(response.overall_code, Code::Ok as i32);
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(4),
        "{CALLS} sequential calls took {took:?} (Nagle's algorithm on the server's sockets?)"
    );
}
