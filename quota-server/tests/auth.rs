//! Who may give quota back, and who may call at all: negative hits only
//! where a domain allows them, `Sync` refunds only of leases the server
//! granted that caller, and the gRPC token when one is set. Through the
//! real binary.

// Test helpers fail loudly: a panic is the report.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use envoy_types::pb::google::protobuf::UInt64Value;
use sluice_quota_server::launcher::QuotaServer;
use sluice_quota_server::proto::quota_client::QuotaClient;
use sluice_quota_server::proto::{Lease, SyncEntry, SyncRequest};
use support::launcher;
use tonic::transport::Channel;

const CONFIG: &str = r#"
listen: {grpc: "127.0.0.1:0"}
domains:
  - name: locked
    descriptors:
      - key: user
        rate_limit: {unit: hour, requests_per_unit: 2}
    rules:
      - {name: narrow, limit: {count: 3, per: 1h}}
  - name: refunds
    negative_hits: true
    descriptors:
      - key: user
        rate_limit: {unit: hour, requests_per_unit: 2}
"#;

fn start(text: &str) -> QuotaServer {
    launcher().start_text(text).unwrap()
}

async fn rls(server: &QuotaServer) -> RateLimitServiceClient<Channel> {
    RateLimitServiceClient::connect(server.grpc_url())
        .await
        .unwrap()
}

/// One `user` descriptor; with `refund`, negative hits of that many.
fn request(domain: &str, user: &str, refund: Option<u64>) -> RateLimitRequest {
    RateLimitRequest {
        domain: domain.into(),
        descriptors: vec![RateLimitDescriptor {
            entries: vec![Entry {
                key: "user".into(),
                value: user.into(),
            }],
            hits_addend: refund.map(|value| UInt64Value { value }),
            is_negative_hits: refund.is_some(),
            ..RateLimitDescriptor::default()
        }],
        hits_addend: 0,
    }
}

async fn code(
    client: &mut RateLimitServiceClient<Channel>,
    request: RateLimitRequest,
) -> Result<Code, tonic::Status> {
    let response = client.should_rate_limit(request).await?.into_inner();
    Ok(Code::try_from(response.overall_code).unwrap())
}

/// How many requests in a row `user` gets before OVER_LIMIT (up to 5).
async fn allowance(client: &mut RateLimitServiceClient<Channel>, domain: &str, user: &str) -> u32 {
    for n in 0..5 {
        if code(client, request(domain, user, None)).await.unwrap() == Code::OverLimit {
            return n;
        }
    }
    5
}

#[tokio::test]
async fn negative_hits_need_the_domain_to_allow_them() {
    let server = start(CONFIG);
    let mut client = rls(&server).await;
    assert_eq!(allowance(&mut client, "locked", "u").await, 2);
    let refused = code(&mut client, request("locked", "u", Some(u64::MAX))).await;
    let status = refused.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("negative_hits: true"),
        "{status:?}"
    );
    assert_eq!(
        allowance(&mut client, "locked", "u").await,
        0,
        "still exhausted"
    );

    // Where allowed, a refund gives back at most a full allowance.
    assert_eq!(allowance(&mut client, "refunds", "u").await, 2);
    let refund = code(&mut client, request("refunds", "u", Some(u64::MAX))).await;
    assert_eq!(refund.unwrap(), Code::Ok);
    assert_eq!(allowance(&mut client, "refunds", "u").await, 2);
}

async fn sync(
    client: &mut QuotaClient<Channel>,
    caller: &str,
    held: u64,
    used: u64,
    want: u64,
) -> Lease {
    let request = SyncRequest {
        domain: "locked".into(),
        replicas: 1,
        caller: caller.into(),
        entries: vec![SyncEntry {
            rule: "narrow".into(),
            key: "k".into(),
            held,
            used,
            want,
        }],
        controls_version: None,
    };
    client
        .sync(request)
        .await
        .unwrap()
        .into_inner()
        .leases
        .remove(0)
}

#[tokio::test]
async fn sync_gives_back_only_leases_granted_to_that_caller() {
    let server = start(CONFIG);
    let mut client = QuotaClient::connect(server.grpc_url()).await.unwrap();
    let a = sync(&mut client, "replica-a", 0, 0, 2).await;
    assert_eq!((a.permits, a.remaining), (2, 1));
    let b = sync(&mut client, "replica-b", 0, 0, 1).await;
    assert_eq!((b.permits, b.remaining), (1, 0), "the budget is exhausted");
    // Callers claiming leases they were never granted get nothing back.
    for caller in ["intruder", ""] {
        let claim = sync(&mut client, caller, u64::MAX, 0, 0).await;
        assert_eq!(claim.remaining, 0, "caller {caller:?} refilled the key");
    }
    // A caller gets back at most its own unused lease, once.
    let back = sync(&mut client, "replica-a", u64::MAX, 0, 0).await;
    assert_eq!(back.remaining, 2, "replica-a's two unused permits");
    let again = sync(&mut client, "replica-a", u64::MAX, 0, 0).await;
    assert_eq!(again.remaining, 2, "a lease comes back once");
    let used = sync(&mut client, "replica-b", 1, 1, 0).await;
    assert_eq!(used.remaining, 2, "a used lease gives nothing back");
}

fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", token.parse().unwrap());
    request
}

#[tokio::test]
async fn the_grpc_token_is_required_when_set() {
    let text = CONFIG.replace(
        "listen: {grpc: \"127.0.0.1:0\"}",
        "listen: {grpc: \"127.0.0.1:0\", grpc_token: \"grpc-secret\"}",
    );
    let server = start(&text);
    let mut client = rls(&server).await;
    let missing = code(&mut client, request("locked", "t", None)).await;
    assert_eq!(missing.unwrap_err().code(), tonic::Code::Unauthenticated);
    for wrong in ["Bearer nope", "Basic grpc-secret", "Bearer grpc-secret2"] {
        let call = client
            .should_rate_limit(with_token(request("locked", "t", None), wrong))
            .await;
        assert_eq!(
            call.unwrap_err().code(),
            tonic::Code::Unauthenticated,
            "{wrong}"
        );
    }
    for right in ["Bearer grpc-secret", "bearer grpc-secret"] {
        let call = client
            .should_rate_limit(with_token(request("locked", "t", None), right))
            .await;
        assert!(call.is_ok(), "{right}: {call:?}");
    }
    let mut quota = QuotaClient::connect(server.grpc_url()).await.unwrap();
    let unsigned = quota
        .check(sluice_quota_server::proto::CheckRequest::default())
        .await;
    assert_eq!(unsigned.unwrap_err().code(), tonic::Code::Unauthenticated);
    // Health stays open for probes.
    let channel = Channel::from_shared(server.grpc_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let status = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

#[tokio::test]
async fn the_token_from_the_environment_wins() {
    let text = CONFIG.replace(
        "listen: {grpc: \"127.0.0.1:0\"}",
        "listen: {grpc: \"127.0.0.1:0\", grpc_token: \"from-file\"}",
    );
    let server = launcher()
        .env("SLUICE_GRPC_TOKEN", "from-env")
        .start_text(&text)
        .unwrap();
    let mut client = rls(&server).await;
    let file = client
        .should_rate_limit(with_token(request("locked", "t", None), "Bearer from-file"))
        .await;
    assert_eq!(file.unwrap_err().code(), tonic::Code::Unauthenticated);
    let env = client
        .should_rate_limit(with_token(request("locked", "t", None), "Bearer from-env"))
        .await;
    assert!(env.is_ok(), "{env:?}");
}
