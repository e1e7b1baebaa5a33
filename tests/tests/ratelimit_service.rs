//! Envoy's native global rate limit filter (`envoy.filters.http.ratelimit`)
//! in a real Envoy, calling `sluice serve` as its rate limit service
//! (`envoy/ratelimit-service.template.yaml`), with envoyproxy/ratelimit
//! descriptor files.
//!
//! Needs Envoy (`make setup`), `redis-server`, and the `sluice` binary
//! (`cargo build -p sluice-quota-server`, or `SLUICE_BIN`).

// Test code: failing means panicking.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::{Duration, Instant};

use sluice_e2e::client::{Client, Reply};
use sluice_e2e::envoy::Envoy;
use sluice_e2e::redis::Redis;
use sluice_e2e::sluice_binary;
use sluice_e2e::upstream::Upstream;
use sluice_quota_server::launcher::{Launcher, QuotaServer};

/// The envoyproxy/ratelimit file both tests use (domain set per test):
/// per client address 5 a minute; with `plan: free` also 2 a minute.
fn descriptor_file(domain: &str) -> String {
    format!(
        r#"domain: {domain}
descriptors:
  - key: remote_address
    rate_limit: {{unit: minute, requests_per_unit: 5}}
    descriptors:
      - key: plan
        value: free
        rate_limit: {{unit: minute, requests_per_unit: 2}}
"#
    )
}

/// `sluice serve` on the configuration file at `config`; killed when dropped.
fn start_sluice(config: &Path) -> QuotaServer {
    Launcher::new(sluice_binary().unwrap_or_else(|e| panic!("{e}")))
        .start_file(config)
        .unwrap_or_else(|e| panic!("{e}"))
}

async fn envoy(
    test: &str,
    instance: &str,
    upstream: u16,
    quota: u16,
    domain: &str,
    deny: bool,
) -> Envoy {
    Envoy::builder(test)
        .instance(instance)
        .upstream(upstream)
        .rate_limit_service(quota, domain, deny, true)
        .start()
        .await
        .unwrap_or_else(|e| panic!("starting Envoy with the ratelimit filter: {e:#}"))
}

async fn get(client: &Client, headers: &[(&str, &str)]) -> Reply {
    client
        .get_with("/", headers)
        .await
        .unwrap_or_else(|e| panic!("GET /: {e:#}"))
}

#[tokio::test]
async fn native_filter_is_limited_by_sluice() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("edge.yaml"), descriptor_file("edge")).unwrap();
    let config = dir.path().join("sluice.yaml");
    // The envoyproxy/ratelimit file as it is; memory backend; any free port.
    std::fs::write(
        &config,
        "listen: {grpc: \"127.0.0.1:0\"}\ndescriptor_files: [{path: edge.yaml}]\n",
    )
    .unwrap();
    let sluice = start_sluice(&config);
    let upstream = Upstream::start().await.unwrap();
    let envoy = envoy(
        "native_filter_is_limited_by_sluice",
        "envoy",
        upstream.port(),
        sluice.grpc.port(),
        "edge",
        true,
    )
    .await;
    let client = envoy.client();
    let free = [("x-plan", "free")];

    for expected_remaining in [1, 0] {
        let r = get(&client, &free).await;
        assert_eq!(r.status, 200, "{}", r.headers_text());
        assert_eq!(
            r.header_u64("x-ratelimit-remaining"),
            Some(expected_remaining),
            "the most restrictive limit is shown\n{}",
            r.headers_text()
        );
    }
    let over = get(&client, &free).await;
    assert_eq!(over.status, 429, "{}", over.headers_text());
    assert_eq!(over.header("x-envoy-ratelimited"), Some("true"));
    assert_eq!(over.header_u64("x-ratelimit-limit"), Some(2));
    assert_eq!(over.header_u64("x-ratelimit-remaining"), Some(0));
    assert!(
        over.header_u64("retry-after")
            .is_some_and(|s| (1..=60).contains(&s)),
        "{}",
        over.headers_text()
    );
    assert!(
        over.header("ratelimit-policy").is_some(),
        "{}",
        over.headers_text()
    );

    // All or nothing: the refused request took nothing from the address's
    // limit (5), so 3 more pass without a plan, then the 6th is refused.
    for _ in 0..3 {
        let r = get(&client, &[]).await;
        assert_eq!(r.status, 200, "{}", r.headers_text());
    }
    let over = get(&client, &[]).await;
    assert_eq!(over.status, 429, "{}", over.headers_text());
    assert_eq!(over.header_u64("x-ratelimit-limit"), Some(5));
    assert_eq!(upstream.requests(), 5);
}

#[tokio::test]
async fn failure_modes_of_server_and_envoy() {
    let dir = tempfile::tempdir().unwrap();
    for domain in ["open", "closed"] {
        std::fs::write(
            dir.path().join(format!("{domain}.yaml")),
            descriptor_file(domain),
        )
        .unwrap();
    }
    let mut redis = Redis::start().unwrap();
    let config = dir.path().join("sluice.yaml");
    std::fs::write(
        &config,
        format!(
            r#"listen: {{grpc: "127.0.0.1:0", request_timeout: 1s}}
storage:
  backend: redis
  redis: {{url: "redis://127.0.0.1:{}", timeout: 200ms}}
descriptor_files:
  - {{path: open.yaml, failure_mode: open}}
  - {{path: closed.yaml, failure_mode: closed}}
"#,
            redis.port()
        ),
    )
    .unwrap();
    let mut sluice = start_sluice(&config);
    let upstream = Upstream::start().await.unwrap();
    let test = "failure_modes_of_server_and_envoy";
    // Envoy's own failure_mode_deny: off for "open", on for "closed".
    let open = envoy(
        test,
        "open",
        upstream.port(),
        sluice.grpc.port(),
        "open",
        false,
    )
    .await;
    let closed = envoy(
        test,
        "closed",
        upstream.port(),
        sluice.grpc.port(),
        "closed",
        true,
    )
    .await;
    let (open, closed) = (open.client(), closed.client());
    assert_eq!(get(&open, &[]).await.status, 200);
    let r = get(&closed, &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header_u64("x-ratelimit-remaining"),
        Some(4),
        "counted in Redis\n{}",
        r.headers_text()
    );

    // Redis down: the server applies each domain's failure mode, quickly.
    redis.stop();
    let started = Instant::now();
    let r = get(&open, &[]).await;
    assert_eq!(r.status, 200, "fail-open domain\n{}", r.headers_text());
    let r = get(&closed, &[]).await;
    assert_eq!(r.status, 429, "fail-closed domain\n{}", r.headers_text());
    assert_eq!(r.header("x-envoy-ratelimited"), Some("true"));
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );

    // The server down: Envoy's failure_mode_deny decides.
    sluice.kill();
    let r = get(&open, &[]).await;
    assert_eq!(
        r.status,
        200,
        "failure_mode_deny: false lets requests through\n{}",
        r.headers_text()
    );
    let r = get(&closed, &[]).await;
    assert_eq!(
        r.status,
        500,
        "failure_mode_deny: true refuses\n{}",
        r.headers_text()
    );
}
