//! End-to-end tests of rule groups (precedence) and of the configuration's
//! own access lists, through a real Envoy, against README.md, "Groups:
//! one rule among alternatives" and "Access lists".
//!
//! Needs Envoy (`make setup`) and the filter (`make wasm`). Every test
//! starts its own upstreams and Envoy, so they run in parallel.

// Test code: failing means panicking.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use serde_json::{json, Value};
use sluice_e2e::client::{Client, Reply};
use sluice_e2e::envoy::Envoy;
use sluice_e2e::grpc::connect;
use sluice_e2e::grpc::user::user_service_client::UserServiceClient;
use sluice_e2e::grpc::user::{GetUserRequest, ListUsersRequest};
use sluice_e2e::grpc_upstream::GrpcUpstream;
use sluice_e2e::routes::with_upstreams;
use sluice_e2e::upstream::Upstream;
use tonic::metadata::MetadataMap;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

/// How long one call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// An HTTP upstream and a gRPC one behind one Envoy with the filter.
struct Setup {
    upstream: Upstream,
    grpc_upstream: GrpcUpstream,
    envoy: Envoy,
    client: Client,
    channel: Channel,
}

async fn setup(test: &str, config: Value) -> Setup {
    let upstream = Upstream::start().await.expect("starting the upstream");
    let grpc_upstream = GrpcUpstream::start()
        .await
        .expect("starting the gRPC upstream");
    let builder = Envoy::builder(test).upstream(upstream.port());
    let envoy = with_upstreams(builder, Some(grpc_upstream.port()), None)
        .sluice(&config)
        .start()
        .await
        .unwrap_or_else(|e| panic!("starting Envoy with the Sluice filter: {e:#}"));
    let client = envoy.client();
    let channel = connect(envoy.addr()).await.expect("gRPC channel to Envoy");
    Setup {
        upstream,
        grpc_upstream,
        envoy,
        client,
        channel,
    }
}

impl Setup {
    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        self.client
            .get_with(path, headers)
            .await
            .unwrap_or_else(|e| panic!("GET {path} {headers:?}: {e:#}"))
    }

    /// The statuses of `n` requests to `path` with `headers`.
    async fn statuses(&self, n: usize, path: &str, headers: &[(&str, &str)]) -> Vec<u16> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.get(path, headers).await.status);
        }
        out
    }

    /// The counter `name` once it reads `expected` (or what it reads after 5 s).
    async fn stat(&self, name: &str, expected: u64) -> u64 {
        self.envoy
            .stat_settled(name, expected)
            .await
            .expect("reading Envoy's stats")
    }

    fn users(&self) -> UserServiceClient<Channel> {
        UserServiceClient::new(self.channel.clone())
    }

    /// `GetUser` with `metadata`.
    async fn get_user(&self, metadata: &[(&'static str, &str)]) -> Result<(), Status> {
        let mut request = Request::new(GetUserRequest { user_id: 7 });
        insert(request.metadata_mut(), metadata);
        bounded(self.users().get_user(request)).await.map(|_| ())
    }

    /// `ListUsers` (server streaming), its first message read.
    async fn list_users(&self) -> Result<(), Status> {
        let request = Request::new(ListUsersRequest { count: 1 });
        let mut stream = bounded(self.users().list_users(request))
            .await?
            .into_inner();
        bounded(stream.message()).await.map(|_| ())
    }

    /// The filter reported no internal failure.
    async fn assert_no_errors(&self) {
        // Errors reach Envoy at once, unbatched.
        assert_eq!(self.stat("wasmcustom.sluice_http.errors", 0).await, 0);
    }
}

fn insert(metadata: &mut MetadataMap, pairs: &[(&'static str, &str)]) {
    for (name, value) in pairs {
        metadata.insert(*name, value.parse().unwrap());
    }
}

async fn bounded<T>(call: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .expect("the call took longer than 10s")
}

/// The rule named in an answer's `ratelimit-policy`: the one that counted it.
fn policy_of(reply: &Reply) -> Option<&str> {
    reply
        .header("ratelimit-policy")
        .and_then(|p| p.split(';').next())
        .map(|name| name.trim_matches('"'))
}

fn refused_by(reply: &Reply) -> Value {
    reply
        .json()
        .map_or(Value::Null, |body| body["rule"].clone())
}

/// Three tiers in one group: internal callers (a header a trusted proxy
/// sets), callers with an API key, anonymous ones. Each request counts in
/// its own tier only: a keyed caller is not held to the anonymous per-IP
/// limit its address has used up.
#[tokio::test]
async fn tiers_count_each_request_in_its_own_tier_only() {
    let config = json!({"rules": [
        {"name": "anonymous", "group": "tier", "limit": {"count": 2, "per": "1h"}},
        {"name": "authenticated", "group": "tier", "key": ["header:x-api-key"],
         "limit": {"count": 4, "per": "1h"}, "priority": 1},
        {"name": "internal", "group": "tier",
         "match": {"headers": [{"name": "x-tier", "value": "internal"}]},
         "scope": "global", "limit": {"count": 1000, "per": "1h"}, "priority": 2}
    ]});
    let s = setup("precedence_tiers", config).await;

    assert_eq!(s.statuses(2, "/", &[]).await, [200, 200]);
    let third = s.get("/", &[]).await;
    assert_eq!(
        (third.status, refused_by(&third)),
        (429, json!("anonymous"))
    );

    let keyed = [("x-api-key", "alpha")];
    for remaining in (0..4).rev() {
        let reply = s.get("/", &keyed).await;
        assert_eq!(reply.status, 200, "keyed request from a refused address");
        assert_eq!(policy_of(&reply), Some("authenticated"));
        assert_eq!(reply.remaining(), Some(remaining));
    }
    let refused = s.get("/", &keyed).await;
    assert_eq!(
        (refused.status, refused_by(&refused)),
        (429, json!("authenticated"))
    );

    let internal = s
        .get("/", &[("x-api-key", "alpha"), ("x-tier", "internal")])
        .await;
    assert_eq!(internal.status, 200);
    assert_eq!(policy_of(&internal), Some("internal"));
    assert_eq!(internal.remaining(), Some(999));

    assert_eq!(
        s.stat("wasmcustom.sluice_http.rule.anonymous.outcome.allowed", 2)
            .await,
        2,
        "keyed and internal requests were never counted as anonymous"
    );
    assert_eq!(s.upstream.requests(), 2 + 4 + 1);
    s.assert_no_errors().await;
}

/// A per-customer exception: one customer gets more than the rule every
/// other customer has.
#[tokio::test]
async fn a_customer_exception_replaces_the_per_customer_rule() {
    let config = json!({"rules": [
        {"name": "customers", "group": "customer", "key": ["header:x-customer"],
         "limit": {"count": 2, "per": "1h"}},
        {"name": "acme", "group": "customer",
         "match": {"headers": [{"name": "x-customer", "value": "acme"}]},
         "key": ["header:x-customer"], "limit": {"count": 5, "per": "1h"}, "priority": 1}
    ]});
    let s = setup("precedence_customer_exception", config).await;
    let globex = [("x-customer", "globex")];
    assert_eq!(s.statuses(3, "/", &globex).await, [200, 200, 429]);
    let acme = [("x-customer", "acme")];
    assert_eq!(
        s.statuses(6, "/", &acme).await,
        [200, 200, 200, 200, 200, 429]
    );
    assert_eq!(refused_by(&s.get("/", &acme).await), json!("acme"));
    s.assert_no_errors().await;
}

/// gRPC: `GetUser` has a limit of its own above the default for every
/// call; its calls do not count against the default.
#[tokio::test]
async fn a_grpc_method_override_replaces_the_default() {
    let config = json!({"rules": [
        {"name": "calls", "group": "calls", "match": {"grpc": {}},
         "limit": {"count": 2, "per": "1h"}},
        {"name": "get-user", "group": "calls",
         "match": {"grpc": {"service": "user.UserService", "method": "GetUser"}},
         "limit": {"count": 4, "per": "1h"}, "priority": 1}
    ]});
    let s = setup("precedence_grpc_method_override", config).await;
    for call in 1..=4 {
        s.get_user(&[])
            .await
            .unwrap_or_else(|e| panic!("GetUser call {call}: {e:?}"));
    }
    let refused = s.get_user(&[]).await.expect_err("GetUser call 5");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused
            .message()
            .starts_with("rate limited by rule get-user;"),
        "{refused:?}"
    );
    // The default still has both its calls: GetUser took none of them.
    for call in 1..=2 {
        s.list_users()
            .await
            .unwrap_or_else(|e| panic!("ListUsers call {call}: {e:?}"));
    }
    let refused = s.list_users().await.expect_err("ListUsers call 3");
    assert!(
        refused.message().starts_with("rate limited by rule calls;"),
        "{refused:?}"
    );
    assert_eq!(s.grpc_upstream.calls("GetUser"), 4);
    s.assert_no_errors().await;
}

/// Static access lists with no synced rule: allow-listed clients bypass
/// every rule (nothing counted, no rate-limit headers), deny-listed ones
/// get 403 (gRPC: PERMISSION_DENIED) before any rule; a deny entry inside
/// an allowed network wins.
#[tokio::test]
async fn static_access_lists_allow_and_deny_before_the_rules() {
    let config = json!({
        "rules": [{"name": "per-ip", "limit": {"count": 1, "per": "1h"}}],
        "client_ip": {"trusted_hops": 1},
        "access": {"allow": ["198.51.100.0/24"], "deny": ["203.0.113.0/24", "198.51.100.66"]}
    });
    let s = setup("precedence_static_access_lists", config).await;
    let from = |ip: &'static str| [("x-forwarded-for", ip)];

    for _ in 0..3 {
        let reply = s.get("/", &from("198.51.100.7")).await;
        assert_eq!(reply.status, 200, "allow-listed");
        assert_eq!(reply.header("ratelimit"), None, "nothing counted");
    }
    for ip in ["203.0.113.9", "198.51.100.66"] {
        let reply = s.get("/", &from(ip)).await;
        assert_eq!(reply.status, 403, "deny-listed {ip}");
        assert_eq!(reply.header("content-type"), Some("application/json"));
        assert_eq!(reply.json().unwrap(), json!({"error": "access_denied"}));
    }
    // Not listed: the rule decides.
    assert_eq!(s.statuses(2, "/", &from("192.0.2.1")).await, [200, 429]);
    assert_eq!(s.upstream.requests(), 3 + 1);

    let denied = s
        .get_user(&[("x-forwarded-for", "203.0.113.9")])
        .await
        .expect_err("a deny-listed gRPC call");
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    for call in 1..=3 {
        s.get_user(&[("x-forwarded-for", "198.51.100.7")])
            .await
            .unwrap_or_else(|e| panic!("allow-listed GetUser call {call}: {e:?}"));
    }
    assert_eq!(s.grpc_upstream.calls("GetUser"), 3);

    assert_eq!(
        s.stat("wasmcustom.sluice_access.outcome.allowed", 6).await,
        6
    );
    assert_eq!(
        s.stat("wasmcustom.sluice_access.outcome.denied", 3).await,
        3
    );
    assert_eq!(
        s.stat("wasmcustom.sluice_http.rule.per-ip.outcome.allowed", 1)
            .await,
        1
    );
    s.assert_no_errors().await;
}
