//! End-to-end tests of what a request costs when it is not a rule's fixed
//! `cost`, through a real Envoy: `cost_from` (a request header), `charge`
//! (usage the upstream reports in a response header, an HTTP trailer or a
//! gRPC trailer) and gRPC statuses in `exclude_statuses` (README.md, "Rules"
//! and "Charging by usage").
//!
//! Needs Envoy (`make setup`) and the filter (`make wasm`). Limits are token
//! buckets of an hour or more, so they refill a little while a test runs:
//! every remaining count and `Retry-After` is checked against bounds that
//! allow for the refill the elapsed time can explain, and no tighter. Nothing
//! sleeps: each request is sent once the previous response is complete, and
//! the filter settles a response's usage before passing on its headers (or
//! trailers).

// Test code: failing means panicking (the workspace denies these in
// library code; helpers here are outside #[test] functions).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sluice_e2e::client::{remaining_in, Client, Protocol, Reply};
use sluice_e2e::envoy::Envoy;
use sluice_e2e::grpc::connect;
use sluice_e2e::grpc::user::user_service_client::UserServiceClient;
use sluice_e2e::grpc::user::{GetUserRequest, ListUsersRequest, User};
use sluice_e2e::grpc_upstream::{GrpcUpstream, FAIL_WITH};
use sluice_e2e::routes::with_upstreams;
use sluice_e2e::upstream::{Upstream, ECHO_USAGE, ECHO_USAGE_TRAILER, USAGE};
use tonic::metadata::MetadataMap;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

/// How long one gRPC call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// An hour, the period of most limits here.
const HOUR: Duration = Duration::from_secs(3600);

/// A token bucket's refill, to bound what a test sees by the time it took.
#[derive(Clone, Copy)]
struct Bucket {
    count: u64,
    per: Duration,
    /// Taken before the first request that spent from the bucket.
    since: Instant,
}

impl Bucket {
    fn new(count: u64, per: Duration) -> Self {
        Self {
            count,
            per,
            since: Instant::now(),
        }
    }

    /// The most tokens the bucket can have refilled since [`Self::since`].
    fn refilled(&self) -> u64 {
        let refilled = (self.since.elapsed().as_nanos() * u128::from(self.count))
            .div_ceil(self.per.as_nanos());
        u64::try_from(refilled).unwrap()
    }

    /// The whole seconds `tokens` take to refill, widened by the time
    /// elapsed since [`Self::since`]: the `Retry-After` of a key that must
    /// win back `tokens` spent since then lies within.
    fn refill_secs(&self, tokens: u64) -> std::ops::RangeInclusive<u64> {
        let needed = u128::from(tokens) * self.per.as_nanos() / u128::from(self.count);
        let elapsed = self.since.elapsed().as_nanos();
        let lower = needed.saturating_sub(elapsed) / 1_000_000_000;
        let upper = needed.div_ceil(1_000_000_000);
        u64::try_from(lower).unwrap()..=u64::try_from(upper).unwrap()
    }

    /// Asserts `remaining` is `expected`, give or take what refilled since
    /// the bucket started spending (never above its `count`).
    fn assert_remaining(&self, remaining: Option<u64>, expected: u64, what: &str) {
        let most = expected.saturating_add(self.refilled()).min(self.count);
        assert!(
            remaining.is_some_and(|r| (expected..=most).contains(&r)),
            "{what}: remaining {remaining:?}, expected {expected} \
             (up to {most} with the refill since the start)"
        );
    }
}

fn describe(reply: &Reply) -> String {
    format!(
        "status {}\n{}body: {}",
        reply.status,
        reply.headers_text(),
        reply.text()
    )
}

/// The HTTP upstream, Envoy with the filter, and a client.
struct Http {
    upstream: Upstream,
    envoy: Envoy,
    client: Client,
}

impl Http {
    async fn start(test: &str, config: &Value) -> Self {
        let upstream = Upstream::start().await.expect("starting the upstream");
        let envoy = Envoy::builder(test)
            .upstream(upstream.port())
            .sluice(config)
            .start()
            .await
            .unwrap_or_else(|e| panic!("starting Envoy with the Sluice filter: {e:#}"));
        let client = envoy.client();
        Self {
            upstream,
            envoy,
            client,
        }
    }

    async fn post(&self, headers: &[(&str, &str)]) -> Reply {
        self.post_in(Protocol::Http1, headers).await
    }

    async fn post_in(&self, protocol: Protocol, headers: &[(&str, &str)]) -> Reply {
        self.client
            .request_in(protocol, "POST", "/v1/chat", headers)
            .await
            .unwrap_or_else(|e| panic!("POST /v1/chat {protocol:?} {headers:?}: {e:#}"))
    }

    /// A request that must be let through: the permits its `RateLimit`
    /// field says are left.
    async fn allowed(&self, headers: &[(&str, &str)], what: &str) -> Option<u64> {
        let reply = self.post(headers).await;
        assert_eq!(reply.status, 200, "{what}: {}", describe(&reply));
        reply.remaining()
    }

    /// A request that must be refused: its `Retry-After` and the permits
    /// its `RateLimit` field says are left (what the key really has left,
    /// which may be less than the request's cost yet more than 0).
    async fn refused(&self, headers: &[(&str, &str)], what: &str) -> (u64, Option<u64>) {
        let reply = self.post(headers).await;
        assert_eq!(reply.status, 429, "{what}: {}", describe(&reply));
        let retry_after = reply
            .header_u64("retry-after")
            .unwrap_or_else(|| panic!("{what}: no retry-after: {}", describe(&reply)));
        (retry_after, reply.remaining())
    }

    async fn assert_no_errors(&self) {
        let errors = self
            .envoy
            .filter_errors()
            .await
            .expect("reading Envoy's stats");
        assert_eq!(errors, 0, "sluice_http.errors");
    }
}

/// `cost_from`: a request takes the whole number in its header; a missing,
/// unreadable or zero value takes the rule's cost; a value above `max`
/// (however long) takes `max`; a request costing more than what is left is
/// refused while a cheaper one still passes.
#[tokio::test]
async fn cost_from_a_request_header() {
    let config = json!({"rules": [{
        "name": "batch", "key": ["header:x-api-key"],
        "limit": {"count": 20, "per": "1h"},
        "cost_from": {"header": "x-cost", "max": 5}
    }]});
    let s = Http::start("cost_from_a_request_header", &config).await;
    let bucket = Bucket::new(20, HOUR);
    let key = ("x-api-key", "alice");
    let steps: [(&str, Option<&str>, u64); 6] = [
        ("a cost of 3", Some("3"), 17),
        ("an unreadable cost (the rule's cost, 1)", Some("three"), 16),
        ("a cost of 0 (the rule's cost, 1)", Some("0"), 15),
        ("no cost header (the rule's cost, 1)", None, 14),
        (
            "a cost far above max (max, 5)",
            Some("99999999999999999999999"),
            9,
        ),
        ("a cost of max (5)", Some("5"), 4),
    ];
    for (what, cost, left) in steps {
        let mut headers = vec![key];
        headers.extend(cost.map(|c| ("x-cost", c)));
        let remaining = s.allowed(&headers, what).await;
        bucket.assert_remaining(remaining, left, what);
    }
    // 4 left (or a little more with the refill): 5 do not fit, 4 do.
    let remaining = s.allowed(&[key], "the rule's cost").await;
    bucket.assert_remaining(remaining, 3, "the rule's cost");
    let (retry_after, remaining) = s
        .refused(&[key, ("x-cost", "5")], "a cost of 5 with 3 left")
        .await;
    bucket.assert_remaining(remaining, 3, "a cost of 5 with 3 left");
    assert!(
        (1..=*bucket.refill_secs(2).end()).contains(&retry_after),
        "retry-after {retry_after}: 2 tokens refill in at most {:?} s",
        bucket.refill_secs(2)
    );
    let remaining = s
        .allowed(&[key, ("x-cost", "3")], "a cost of 3 with 3 left")
        .await;
    bucket.assert_remaining(remaining, 0, "a cost of 3 with 3 left");
    // Another key has its own budget.
    let remaining = s
        .allowed(&[("x-api-key", "bob"), ("x-cost", "4")], "bob")
        .await;
    assert_eq!(remaining, Some(16), "bob's first request");
    assert_eq!(
        s.upstream.requests(),
        9,
        "the refused request never reached the upstream"
    );
    s.assert_no_errors().await;
}

/// An LLM-style token quota (1000 tokens an hour per API key) charged what
/// the upstream reports in `x-tokens-used`: the report replaces the
/// admission cost, a report beyond what is left puts the key in debt, and
/// the key is refused until the debt is repaid at the limit's own rate.
#[tokio::test]
async fn usage_reported_in_a_response_header_is_charged() {
    let config = json!({"rules": [{
        "name": "llm-tokens", "key": ["header:x-api-key"],
        "limit": {"count": 1000, "per": "1h"},
        "charge": {"response_header": USAGE, "max": 5000}
    }]});
    let s = Http::start("usage_reported_in_a_response_header_is_charged", &config).await;
    let bucket = Bucket::new(1000, HOUR);
    let key = ("x-api-key", "alice");

    let reply = s.post(&[key, (ECHO_USAGE, "900")]).await;
    assert_eq!(reply.status, 200, "first request: {}", describe(&reply));
    assert_eq!(
        reply.header(USAGE),
        Some("900"),
        "the upstream's report reaches the client"
    );
    // The headers are those of the admission (1 token); the 900 show next.
    bucket.assert_remaining(reply.remaining(), 999, "first request");

    let remaining = s
        .allowed(&[key, (ECHO_USAGE, "500")], "after 900 used")
        .await;
    bucket.assert_remaining(remaining, 99, "after 900 used");

    // 1400 used of 1000: 400 in debt, plus the token the next request
    // needs, at 1000 an hour (3.6 s a token).
    let (retry_after, remaining) = s.refused(&[key], "400 tokens in debt").await;
    assert_eq!(remaining, Some(0), "400 tokens in debt");
    let expected = bucket.refill_secs(401);
    assert!(
        expected.contains(&retry_after),
        "retry-after {retry_after}: expected within {expected:?} (401 tokens at 1000/h)"
    );
    let (retry_after, _) = s.refused(&[key, (ECHO_USAGE, "0")], "still in debt").await;
    assert!(
        expected.contains(&retry_after),
        "retry-after {retry_after} again"
    );
    assert_eq!(
        s.upstream.requests(),
        2,
        "refused requests never reached the upstream"
    );

    // Another key is not affected.
    let remaining = s.allowed(&[("x-api-key", "bob")], "bob").await;
    assert_eq!(remaining, Some(999), "bob's first request");
    s.assert_no_errors().await;
}

/// A reservation (`cost_from`, the client's `max_tokens`) settled by the
/// report: a missing or unreadable report keeps the reservation, a smaller
/// one gives back the difference, `0` gives it all back, and a report above
/// `max` is charged `max`.
#[tokio::test]
async fn reported_usage_settles_a_reservation() {
    let config = json!({"rules": [{
        "name": "llm-tokens", "key": ["header:x-api-key"],
        "limit": {"count": 1000, "per": "1h"},
        "cost_from": {"header": "x-max-tokens", "max": 1000},
        "charge": {"response_header": USAGE, "max": 2000}
    }]});
    let s = Http::start("reported_usage_settles_a_reservation", &config).await;
    let bucket = Bucket::new(1000, HOUR);
    let reserve = ("x-max-tokens", "300");
    let key = ("x-api-key", "carol");
    // (what, the upstream's report, remaining at admission).
    let steps: [(&str, Option<&str>, u64); 5] = [
        ("no report: the 300 reserved stay taken", None, 700),
        ("a report of 100: 200 given back", Some("100"), 400),
        (
            "an unreadable report: the 300 stay taken",
            Some("lots"),
            300,
        ),
        ("a report of 0: all 300 given back", Some("0"), 0),
        ("a report above max: charged max (2000)", Some("99999"), 0),
    ];
    for (what, report, left) in steps {
        let mut headers = vec![key, reserve];
        headers.extend(report.map(|r| (ECHO_USAGE, r)));
        let remaining = s.allowed(&headers, what).await;
        bucket.assert_remaining(remaining, left, what);
    }
    // Spent: 300 + 100 + 300 + 0 + 2000 = 2700 of 1000; the next request
    // (1 token without a reservation) waits for 1701 tokens (6124 s), not
    // for the 99999 reported.
    let (retry_after, remaining) = s.refused(&[key], "1700 tokens in debt").await;
    assert_eq!(remaining, Some(0), "1700 tokens in debt");
    let expected = bucket.refill_secs(1701);
    assert!(
        expected.contains(&retry_after),
        "retry-after {retry_after}: expected within {expected:?} (1701 tokens at 1000/h)"
    );
    s.assert_no_errors().await;
}

/// `charge` from an HTTP response trailer (over h2c, where trailers pass):
/// charged once the trailers arrive, after the response's headers were
/// sent, so the usage shows in the next response; a header of the same
/// name is not read.
#[tokio::test]
async fn usage_reported_in_an_http_trailer_is_charged() {
    let config = json!({"rules": [{
        "name": "llm-tokens", "key": ["header:x-api-key"],
        "limit": {"count": 1000, "per": "1h"},
        "charge": {"response_trailer": USAGE, "max": 5000}
    }]});
    let s = Http::start("usage_reported_in_an_http_trailer_is_charged", &config).await;
    let bucket = Bucket::new(1000, HOUR);
    let key = ("x-api-key", "alice");
    let reply = s
        .post_in(Protocol::H2c, &[key, (ECHO_USAGE_TRAILER, "600")])
        .await;
    assert_eq!(reply.status, 200, "first request: {}", describe(&reply));
    let reported = reply.trailers.as_ref().and_then(|t| t.get(USAGE));
    assert_eq!(
        reported.and_then(|v| v.to_str().ok()),
        Some("600"),
        "the upstream's trailer reaches the client: {:?}",
        reply.trailers
    );
    bucket.assert_remaining(reply.remaining(), 999, "first request");
    // A report in a header is not what the rule reads: the admission stays.
    let reply = s.post_in(Protocol::H2c, &[key, (ECHO_USAGE, "300")]).await;
    assert_eq!(reply.status, 200, "after 600 used: {}", describe(&reply));
    bucket.assert_remaining(reply.remaining(), 399, "after 600 used");
    let reply = s.post_in(Protocol::H2c, &[key]).await;
    assert_eq!(reply.status, 200, "after 601 used: {}", describe(&reply));
    bucket.assert_remaining(reply.remaining(), 398, "after 601 used");
    s.assert_no_errors().await;
}

/// The gRPC upstream, Envoy with the filter routing gRPC to it, and a client.
struct Grpc {
    upstream: GrpcUpstream,
    envoy: Envoy,
    users: UserServiceClient<Channel>,
}

impl Grpc {
    async fn start(test: &str, config: &Value) -> Self {
        let upstream = GrpcUpstream::start()
            .await
            .expect("starting the gRPC upstream");
        // Two workers, as in production: charges and refunds go to shared data.
        let envoy = with_upstreams(Envoy::builder(test), Some(upstream.port()), None)
            .concurrency(2)
            .sluice(config)
            .start()
            .await
            .unwrap_or_else(|e| panic!("starting Envoy with the Sluice filter: {e:#}"));
        let channel = connect(envoy.addr()).await.expect("gRPC channel to Envoy");
        Self {
            upstream,
            envoy,
            users: UserServiceClient::new(channel),
        }
    }

    /// `GetUser` with `metadata`.
    async fn get_user(&self, metadata: &[(&'static str, &str)]) -> Result<MetadataMap, Status> {
        let mut request = Request::new(GetUserRequest { user_id: 7 });
        add_metadata(&mut request, metadata);
        let mut client = self.users.clone();
        let call = client.get_user(request);
        let reply = tokio::time::timeout(CALL_TIMEOUT, call)
            .await
            .unwrap_or_else(|_| {
                panic!("GetUser {metadata:?}: no answer within {CALL_TIMEOUT:?}")
            })?;
        assert_eq!(reply.get_ref().user_id, 7, "GetUser's answer");
        Ok(reply.metadata().clone())
    }

    /// `ListUsers` of 2 users with `metadata`: the users received and how
    /// the call ended.
    async fn list_users(&self, metadata: &[(&'static str, &str)]) -> (Vec<User>, Status) {
        let mut request = Request::new(ListUsersRequest { count: 2 });
        add_metadata(&mut request, metadata);
        let mut users = Vec::new();
        let mut client = self.users.clone();
        let call = async {
            let mut stream = client.list_users(request).await?.into_inner();
            while let Some(user) = stream.message().await? {
                users.push(user);
            }
            Ok::<_, Status>(())
        };
        let end = match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(Ok(())) => Status::ok(""),
            Ok(Err(status)) => status,
            Err(_) => panic!("ListUsers {metadata:?}: not done within {CALL_TIMEOUT:?}"),
        };
        (users, end)
    }

    async fn assert_no_errors(&self) {
        let errors = self
            .envoy
            .stat("wasmcustom.sluice_grpc.errors")
            .await
            .expect("reading Envoy's stats")
            .unwrap_or(0);
        assert_eq!(errors, 0, "sluice_grpc.errors");
    }
}

fn add_metadata<T>(request: &mut Request<T>, metadata: &[(&'static str, &str)]) {
    for (name, value) in metadata {
        request.metadata_mut().insert(*name, value.parse().unwrap());
    }
}

fn meta_u64(metadata: &MetadataMap, name: &str) -> Option<u64> {
    metadata.get(name)?.to_str().ok()?.parse().ok()
}

/// A RESOURCE_EXHAUSTED refusal: its `retry-after`.
fn exhausted(got: Result<MetadataMap, Status>, what: &str) -> u64 {
    let status = match got {
        Err(status) if status.code() == Code::ResourceExhausted => status,
        other => panic!("{what}: expected RESOURCE_EXHAUSTED, got {other:?}"),
    };
    meta_u64(status.metadata(), "retry-after")
        .unwrap_or_else(|| panic!("{what}: no retry-after in {status:?}"))
}

fn grpc_rule(name: &str, method: &str, extra: &Value) -> Value {
    let mut rule = json!({
        "name": name,
        "match": {"grpc": {"service": "user.UserService", "method": method}},
    });
    rule.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    rule
}

/// `charge` from a gRPC trailer: a unary call's trailing metadata reports
/// its usage, charged before the trailers reach the client; a call failing
/// trailers-only is charged what its headers report, unless its status is
/// excluded.
#[tokio::test]
async fn usage_reported_in_a_grpc_trailer_is_charged() {
    let config = json!({
        "rules": [grpc_rule("llm-tokens", "GetUser", &json!({
            "key": ["header:x-api-key"],
            "limit": {"count": 1000, "per": "1h"},
            "charge": {"response_trailer": USAGE, "max": 5000}
        }))],
        "exclude_statuses": ["grpc:UNAVAILABLE"]
    });
    let s = Grpc::start("usage_reported_in_a_grpc_trailer_is_charged", &config).await;
    let bucket = Bucket::new(1000, HOUR);

    let alice = ("x-api-key", "alice");
    let md = s
        .get_user(&[alice, (ECHO_USAGE, "900")])
        .await
        .expect("first call");
    bucket.assert_remaining(
        remaining_in(md.get("ratelimit").and_then(|v| v.to_str().ok())),
        999,
        "first call",
    );
    assert_eq!(
        meta_u64(&md, USAGE),
        Some(900),
        "the upstream's trailer reaches the client: {md:?}"
    );
    let md = s
        .get_user(&[alice, (ECHO_USAGE, "500")])
        .await
        .expect("after 900 used");
    bucket.assert_remaining(
        remaining_in(md.get("ratelimit").and_then(|v| v.to_str().ok())),
        99,
        "after 900 used",
    );
    let retry_after = exhausted(s.get_user(&[alice]).await, "400 tokens in debt");
    let expected = bucket.refill_secs(401);
    assert!(
        expected.contains(&retry_after),
        "retry-after {retry_after}: expected within {expected:?} (401 tokens at 1000/h)"
    );
    assert_eq!(
        s.upstream.calls("GetUser"),
        2,
        "the refused call never reached the upstream"
    );

    // A failure answered trailers-only: its usage is in its headers.
    let dave = ("x-api-key", "dave");
    let bucket = Bucket::new(1000, HOUR);
    let failed = s
        .get_user(&[dave, (ECHO_USAGE, "700"), (FAIL_WITH, "13")])
        .await
        .expect_err("asked to fail");
    assert_eq!(failed.code(), Code::Internal, "{failed:?}");
    let md = s.get_user(&[dave]).await.expect("after 700 used");
    bucket.assert_remaining(
        remaining_in(md.get("ratelimit").and_then(|v| v.to_str().ok())),
        299,
        "after 700 used",
    );

    // An excluded status gives everything back and charges nothing.
    let erin = ("x-api-key", "erin");
    let failed = s
        .get_user(&[erin, (ECHO_USAGE, "700"), (FAIL_WITH, "14")])
        .await
        .expect_err("asked to fail");
    assert_eq!(failed.code(), Code::Unavailable, "{failed:?}");
    let md = s
        .get_user(&[erin])
        .await
        .expect("after an excluded failure");
    assert_eq!(
        remaining_in(md.get("ratelimit").and_then(|v| v.to_str().ok())),
        Some(999),
        "after an excluded failure reporting 700: {md:?}"
    );
    s.assert_no_errors().await;
}

/// gRPC calls failing with an excluded status give their permit back,
/// whether they fail trailers-only (`GetUser`) or after their messages
/// (`ListUsers`): twice the limit of them all reach the upstream. Calls
/// that succeed, or fail with another status, are counted.
async fn excluded_grpc_statuses_are_refunded(test: &str, exclusion: &str) {
    let limit = json!({"limit": {"count": 3, "per": "1h"}});
    let config = json!({
        "rules": [grpc_rule("get", "GetUser", &limit), grpc_rule("list", "ListUsers", &limit)],
        "exclude_statuses": [exclusion]
    });
    let s = Grpc::start(test, &config).await;
    let unavailable = [(FAIL_WITH, "14")];
    for i in 1..=6 {
        let got = s.get_user(&unavailable).await;
        assert!(
            matches!(&got, Err(status) if status.code() == Code::Unavailable),
            "failing GetUser {i}: expected UNAVAILABLE, got {got:?}"
        );
        let (users, end) = s.list_users(&unavailable).await;
        assert_eq!(
            users.len(),
            2,
            "failing ListUsers {i}: its users came first"
        );
        assert_eq!(
            end.code(),
            Code::Unavailable,
            "failing ListUsers {i}: {end:?}"
        );
    }
    assert_eq!(
        s.upstream.calls("GetUser"),
        6,
        "every failing GetUser reached the upstream"
    );
    assert_eq!(
        s.upstream.calls("ListUsers"),
        6,
        "every failing ListUsers reached the upstream"
    );

    // Successful calls count: 3, then refused.
    for i in 1..=3 {
        s.get_user(&[])
            .await
            .unwrap_or_else(|e| panic!("GetUser {i} of 3: {e:?}"));
    }
    exhausted(s.get_user(&[]).await, "the 4th successful GetUser");
    // So do calls failing with a status not excluded (INTERNAL).
    for i in 1..=3 {
        let (users, end) = s.list_users(&[(FAIL_WITH, "13")]).await;
        assert_eq!(
            (users.len(), end.code()),
            (2, Code::Internal),
            "ListUsers {i}: {end:?}"
        );
    }
    let (users, end) = s.list_users(&[]).await;
    assert!(
        users.is_empty() && end.code() == Code::ResourceExhausted,
        "the 4th counted ListUsers: {} users, {end:?}",
        users.len()
    );
    assert_eq!(
        s.upstream.calls("GetUser"),
        9,
        "GetUser calls at the upstream"
    );
    assert_eq!(
        s.upstream.calls("ListUsers"),
        9,
        "ListUsers calls at the upstream"
    );
    s.assert_no_errors().await;
}

#[tokio::test]
async fn excluded_grpc_status_by_name() {
    excluded_grpc_statuses_are_refunded("excluded_grpc_status_by_name", "grpc:UNAVAILABLE").await;
}

#[tokio::test]
async fn excluded_grpc_status_by_code() {
    excluded_grpc_statuses_are_refunded("excluded_grpc_status_by_code", "grpc:14").await;
}
