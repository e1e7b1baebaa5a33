//! Client-controlled input is bounded: long descriptor values do not grow
//! the server's (or Redis's) memory with their size, and requests beyond
//! the per-request bounds are refused with a clear status.

// Test helpers fail loudly: a panic is the report.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod support;

use std::time::Duration;

use common::RedisServer;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use sluice_quota_server::proto::quota_client::QuotaClient;
use sluice_quota_server::proto::{CheckGroup, CheckRequest, SyncEntry, SyncRequest};
use support::{client, descriptor, launcher};
use tonic::transport::Channel;

/// A value as large as a header Envoy accepts by default (60 KiB).
const VALUE_BYTES: usize = 59_000;

const DOMAINS: &str = "domains: [{name: api, descriptors: [{key: user, rate_limit: {unit: hour, requests_per_unit: 1}}]}]\n";

async fn call(
    client: &mut RateLimitServiceClient<Channel>,
    descriptors: Vec<RateLimitDescriptor>,
) -> Result<Code, tonic::Status> {
    let mut request = tonic::Request::new(RateLimitRequest {
        domain: "api".into(),
        descriptors,
        hits_addend: 0,
    });
    request.set_timeout(Duration::from_secs(5));
    let response = client.should_rate_limit(request).await?.into_inner();
    Ok(Code::try_from(response.overall_code).unwrap())
}

/// The `n`th long value: all share a prefix of `VALUE_BYTES - 8` bytes and
/// differ only in their last eight.
fn long_value(n: usize) -> String {
    format!("{}{n:08}", "p".repeat(VALUE_BYTES - 8))
}

/// Resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("a VmRSS line")
}

/// Sends one request per long value `from..to`; each has its own counter,
/// so each is allowed.
async fn send_long_values(client: &mut RateLimitServiceClient<Channel>, from: usize, to: usize) {
    for n in from..to {
        let value = long_value(n);
        let code = call(client, vec![descriptor(&[("user", &value)])])
            .await
            .unwrap();
        assert_eq!(code, Code::Ok, "value {n} must have its own counter");
    }
}

#[tokio::test]
async fn long_distinct_values_do_not_grow_memory_with_their_size() {
    const VALUES: usize = 1_500;
    let server = launcher()
        .start_text(&format!("listen: {{grpc: \"127.0.0.1:0\"}}\n{DOMAINS}"))
        .unwrap();
    let mut client = client(&server).await;
    // Warm up buffers and allocator arenas before the baseline.
    send_long_values(&mut client, 0, 50).await;
    let before = rss_kib(server.pid());
    send_long_values(&mut client, 50, VALUES).await;
    let grown_mib = rss_kib(server.pid()).saturating_sub(before) / 1024;
    // Values kept whole would hold 1,450 x 59 KB = 82 MiB.
    assert!(
        grown_mib < 30,
        "memory grew by {grown_mib} MiB for {VALUES} long values"
    );
    // Long values are counted whole: the same one again is over its limit.
    let again = call(&mut client, vec![descriptor(&[("user", &long_value(7))])]).await;
    assert_eq!(again.unwrap(), Code::OverLimit);
}

#[tokio::test]
async fn redis_keys_of_long_values_are_short_and_distinct() {
    const VALUES: usize = 100;
    let redis = RedisServer::start();
    let server = launcher()
        .start_text(&format!(
            "listen: {{grpc: \"127.0.0.1:0\"}}\nstorage: {{backend: redis, redis: {{url: \"{}\", timeout: 2s}}}}\n{DOMAINS}",
            redis.url()
        ))
        .unwrap();
    let mut client = client(&server).await;
    send_long_values(&mut client, 0, VALUES).await;
    let again = call(&mut client, vec![descriptor(&[("user", &long_value(3))])]).await;
    assert_eq!(again.unwrap(), Code::OverLimit);
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut conn).unwrap();
    assert_eq!(keys.len(), VALUES, "one counter per value: {keys:?}");
    let longest = keys.iter().map(String::len).max().unwrap();
    assert!(longest < 200, "a key of {longest} bytes");
}

fn assert_refused(
    result: Result<impl std::fmt::Debug, tonic::Status>,
    code: tonic::Code,
    says: &str,
) {
    let status = result.expect_err("the request must be refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(status.message().contains(says), "{status:?}");
}

#[tokio::test]
async fn requests_beyond_the_bounds_are_refused() {
    let server = launcher()
        .start_text(&format!("listen: {{grpc: \"127.0.0.1:0\"}}\n{DOMAINS}"))
        .unwrap();
    let mut rls = client(&server).await;
    let invalid = tonic::Code::InvalidArgument;
    let many = vec![descriptor(&[("user", "a")]); 129];
    assert_refused(
        call(&mut rls, many).await,
        invalid,
        "129 descriptors: at most 128",
    );
    let deep: Vec<(&str, &str)> = vec![("user", "a"); 17];
    assert_refused(
        call(&mut rls, vec![descriptor(&deep)]).await,
        invalid,
        "17 entries in descriptor 0: at most 16",
    );
    let huge = "h".repeat(2 << 20);
    assert_refused(
        call(&mut rls, vec![descriptor(&[("user", &huge)])]).await,
        tonic::Code::OutOfRange,
        "message length too large",
    );
    // Within the bounds, calls still pass.
    let ok = call(&mut rls, vec![descriptor(&[("user", "a")]); 128]).await;
    assert!(ok.is_ok(), "{ok:?}");

    let mut quota = QuotaClient::connect(server.grpc_url()).await.unwrap();
    let groups = vec![CheckGroup::default(); 17];
    assert_refused(
        quota
            .check(CheckRequest {
                groups,
                controls_version: None,
                omit_headers: false,
            })
            .await,
        invalid,
        "17 groups: at most 16",
    );
    let entries = vec![SyncEntry::default(); 129];
    let sync = SyncRequest {
        domain: "api".into(),
        replicas: 1,
        entries,
        caller: String::new(),
        controls_version: None,
    };
    assert_refused(quota.sync(sync).await, invalid, "129 entries: at most 128");
}
