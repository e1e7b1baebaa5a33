//! End-to-end tests of Sluice's gRPC limiting through a real Envoy, against
//! README.md, "gRPC and WebSocket": a tonic client, Envoy with the filter,
//! and a tonic upstream that records what reached it.
//!
//! Needs Envoy (`make setup`) and the filter (`make wasm`). Windows are an
//! hour, so no count refills during a test; nothing sleeps: effects are
//! polled with bounded deadlines.

// Test code: failing means panicking (the workspace denies these in
// library code; helpers here are outside #[test] functions).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use serde_json::{json, Value};
use sluice_e2e::envoy::{prometheus_value, Envoy};
use sluice_e2e::grpc::chat::chat_service_client::ChatServiceClient;
use sluice_e2e::grpc::chat::{ChatMessage, SubscribeRequest};
use sluice_e2e::grpc::connect;
use sluice_e2e::grpc::user::user_service_client::UserServiceClient;
use sluice_e2e::grpc::user::{GetUserRequest, ListUsersRequest, User};
use sluice_e2e::grpc_upstream::GrpcUpstream;
use sluice_e2e::py_client;
use sluice_e2e::routes::with_upstreams;
use sluice_e2e::stream_stats::{self, Protocol};
use sluice_e2e::wait;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataMap;
use tonic::transport::Channel;
use tonic::{Code, Request, Status, Streaming};

/// How long one call or one stream message may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The gRPC upstream, Envoy with the filter routing gRPC to it, and a
/// channel through Envoy.
struct Setup {
    upstream: GrpcUpstream,
    envoy: Envoy,
    channel: Channel,
}

async fn setup(test: &str, config: Value) -> Setup {
    let upstream = GrpcUpstream::start()
        .await
        .expect("starting the gRPC upstream");
    // Two workers, as in production: a call's callbacks all run on one.
    let envoy = with_upstreams(Envoy::builder(test), Some(upstream.port()), None)
        .concurrency(2)
        .sluice(&config)
        .start()
        .await
        .unwrap_or_else(|e| panic!("starting Envoy with the Sluice filter: {e:#}"));
    let channel = connect(envoy.addr()).await.expect("gRPC channel to Envoy");
    Setup {
        upstream,
        envoy,
        channel,
    }
}

impl Setup {
    fn users(&self) -> UserServiceClient<Channel> {
        UserServiceClient::new(self.channel.clone())
    }

    fn chat(&self) -> ChatServiceClient<Channel> {
        ChatServiceClient::new(self.channel.clone())
    }

    /// One call by the independent grpcio client (`tests/clients/grpc_client.py`):
    /// `args` as that script documents, `target` filled in.
    async fn grpcio(&self, mut args: Value) -> Value {
        args["target"] = json!(self.envoy.addr().to_string());
        py_client::run("grpc_client.py", &args)
            .await
            .unwrap_or_else(|e| panic!("grpcio client: {e:#}"))
    }

    /// Waits until the upstream saw `expected` (clean, broken) ends of
    /// `method`'s requests.
    async fn wait_ends(&self, method: &str, expected: (u64, u64)) {
        wait::until(
            &format!("{method} ends {expected:?}"),
            CALL_TIMEOUT,
            || async {
                match self.upstream.ends(method) {
                    got if got == expected => Ok(()),
                    got => Err(format!("{got:?}")),
                }
            },
        )
        .await
        .unwrap();
    }

    /// Waits until Envoy is done with the one call to `method` the filter
    /// cut, and checks the upstream never saw it end cleanly. Envoy may
    /// reset the call before its upstream stream is up (the client sent
    /// faster than the upstream connected): then the upstream never sees
    /// it. Otherwise it sees one broken end.
    async fn wait_cut(&self, method: &str) {
        wait::until("the call done in Envoy", CALL_TIMEOUT, || async {
            match self
                .envoy
                .stat("http.ingress_http.downstream_rq_active")
                .await
            {
                Ok(Some(0)) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await
        .unwrap();
        if self.upstream.calls(method) > 0 {
            self.wait_ends(method, (0, 1)).await;
        } else {
            assert_eq!(self.upstream.ends(method), (0, 0), "{method} ends");
        }
    }

    /// The counter once it reads `expected` (or what it reads after 5 s).
    async fn counter(&self, rule: &str, outcome: &str, expected: u64) -> u64 {
        stream_stats::outcome_settled(&self.envoy, Protocol::Grpc, rule, outcome, expected)
            .await
            .expect("reading Envoy's stats")
    }

    /// `GetUser` as user `user_id`, with `x-user-id` metadata.
    async fn get_user(&self, user_id: u64) -> Result<tonic::Response<User>, Status> {
        let mut request = Request::new(GetUserRequest { user_id });
        request
            .metadata_mut()
            .insert("x-user-id", user_id.to_string().parse().unwrap());
        bounded("GetUser", self.users().get_user(request)).await
    }

    /// Opens a `Subscribe` stream that holds after its first message, and
    /// waits for that message (so the call is surely in flight).
    async fn open_subscription(&self, what: &str) -> Result<Streaming<ChatMessage>, Status> {
        let request = SubscribeRequest {
            count: 1,
            hold: true,
            interval_ms: 0,
        };
        let mut stream = bounded(what, self.chat().subscribe(request))
            .await?
            .into_inner();
        let first = next(&mut stream, what).await;
        assert!(
            matches!(&first, Ok(Some(m)) if m.text == "event-1"),
            "{what}: expected event-1, got {first:?}"
        );
        Ok(stream)
    }
}

/// `call`, failing the test if it takes longer than [`CALL_TIMEOUT`].
async fn bounded<T>(what: &str, call: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {CALL_TIMEOUT:?}"))
}

/// The next message of a response stream, bounded.
async fn next<T>(stream: &mut Streaming<T>, what: &str) -> Result<Option<T>, Status> {
    bounded(what, stream.message()).await
}

fn grpc_rule(name: &str, service: &str, method: &str, extra: Value) -> Value {
    let mut rule = json!({"name": name, "match": {"grpc": {"service": service, "method": method}}});
    if let (Some(rule), Some(extra)) = (rule.as_object_mut(), extra.as_object()) {
        rule.extend(extra.clone());
    }
    rule
}

fn metadata_text(metadata: &MetadataMap) -> String {
    format!("{:?}", metadata.clone().into_headers())
}

fn meta<'a>(metadata: &'a MetadataMap, name: &str) -> Option<&'a str> {
    metadata.get(name).and_then(|v| v.to_str().ok())
}

/// A RESOURCE_EXHAUSTED from `rule` with its `grpc-message`, `retry-after`
/// (within `1..=window_s`) and the IETF rate-limit metadata; returns the
/// retry-after.
fn assert_exhausted(status: &Status, rule: &str, limit: u64, window_s: u64, what: &str) -> u64 {
    let md = status.metadata();
    assert_eq!(
        status.code(),
        Code::ResourceExhausted,
        "{what}: expected RESOURCE_EXHAUSTED (8), got {status:?}"
    );
    let retry_after: u64 = meta(md, "retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "{what}: expected retry-after metadata, got {}",
                metadata_text(md)
            )
        });
    assert!(
        (1..=window_s).contains(&retry_after),
        "{what}: retry-after {retry_after} not in 1..={window_s}"
    );
    assert_eq!(
        status.message(),
        format!("rate limited by rule {rule}; retry after {retry_after}s"),
        "{what}: grpc-message"
    );
    assert!(
        meta(md, "ratelimit").is_some_and(|v| v.starts_with(&format!("\"{rule}\";r=0;t="))),
        "{what}: {}",
        metadata_text(md)
    );
    assert_eq!(
        meta(md, "ratelimit-policy"),
        Some(format!("\"{rule}\";q={limit};w={window_s}").as_str()),
        "{what}: {}",
        metadata_text(md)
    );
    retry_after
}

/// A stream that ended with RESOURCE_EXHAUSTED after the response started:
/// only the status and message are promised (the response headers are gone).
fn assert_exhausted_mid_stream(
    got: &Result<Option<impl std::fmt::Debug>, Status>,
    rule: &str,
    what: &str,
) {
    match got {
        Err(status) if status.code() == Code::ResourceExhausted => assert!(
            status
                .message()
                .starts_with(&format!("rate limited by rule {rule}; retry after ")),
            "{what}: grpc-message {:?}",
            status.message()
        ),
        other => panic!("{what}: expected RESOURCE_EXHAUSTED (8), got {other:?}"),
    }
}

/// A `requests` rule on `GetUser` keyed on `x-user-id`: the 4th call of a
/// user is the first refused, with a real gRPC status and metadata; allowed
/// calls carry the rate-limit metadata; other users and other methods are
/// not limited; stats count each outcome.
#[tokio::test]
async fn requests_limit_starts_at_the_exact_call() {
    let config = json!({
        "headers": {"sets": ["ietf", "x_ratelimit"], "on_allowed": true},
        "rules": [grpc_rule("get-user", "user.UserService", "GetUser",
            json!({"key": ["header:x-user-id"], "limit": {"count": 3, "per": "1h"}}))]
    });
    let s = setup("grpc_requests_limit_starts_at_the_exact_call", config).await;

    for call in 1..=3u64 {
        let what = format!("GetUser call {call} of user 7");
        let reply = s
            .get_user(7)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e:?}"));
        assert_eq!(reply.get_ref().user_id, 7, "{what}");
        let md = reply.metadata();
        let remaining = (3 - call).to_string();
        assert_eq!(
            meta(md, "x-ratelimit-remaining"),
            Some(remaining.as_str()),
            "{what}: {}",
            metadata_text(md)
        );
        assert_eq!(
            meta(md, "ratelimit-policy"),
            Some("\"get-user\";q=3;w=3600"),
            "{what}: {}",
            metadata_text(md)
        );
        assert!(
            meta(md, "retry-after").is_none(),
            "{what}: retry-after on an allowed call"
        );
    }
    let refused = s
        .get_user(7)
        .await
        .expect_err("GetUser call 4 of user 7 must be refused");
    assert_exhausted(&refused, "get-user", 3, 3600, "GetUser call 4 of user 7");
    assert_eq!(
        s.upstream.calls("GetUser"),
        3,
        "GetUser calls that reached the upstream"
    );

    // The key is the metadata: user 8 has its own budget.
    let reply = s.get_user(8).await.expect("GetUser of user 8");
    assert_eq!(meta(reply.metadata(), "x-ratelimit-remaining"), Some("2"));

    // The rule matches GetUser only: ListUsers of user 7 goes through.
    let mut request = Request::new(ListUsersRequest { count: 2 });
    request
        .metadata_mut()
        .insert("x-user-id", "7".parse().unwrap());
    let mut stream = bounded("ListUsers", s.users().list_users(request))
        .await
        .expect("ListUsers of user 7 is not limited by a GetUser rule")
        .into_inner();
    let mut users = Vec::new();
    while let Some(user) = next(&mut stream, "ListUsers")
        .await
        .expect("ListUsers stream")
    {
        users.push(user.user_id);
    }
    assert_eq!(users, [1, 2]);

    // Without the key's metadata the rule does not apply.
    let anonymous = bounded("GetUser", s.users().get_user(GetUserRequest { user_id: 9 })).await;
    assert!(
        anonymous.is_ok(),
        "GetUser without x-user-id: {anonymous:?}"
    );

    assert_eq!(
        s.counter("get-user", "allowed", 4).await,
        4,
        "allowed calls"
    );
    assert_eq!(
        s.counter("get-user", "limited", 1).await,
        1,
        "limited calls"
    );
    let text = s.envoy.prometheus().await.expect("/stats/prometheus");
    assert_eq!(
        prometheus_value(
            &text,
            "sluice_grpc",
            &[("rule", "get-user"), ("outcome", "limited")]
        ),
        Some(1.0),
        "sluice_grpc{{rule=\"get-user\",outcome=\"limited\"}} in /stats/prometheus:\n{}",
        text.lines()
            .filter(|l| l.contains("sluice"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// An `in_flight` rule on `Subscribe`: with 2 streams open the 3rd call is
/// refused; cancelling one frees its permit; the gauge returns to 0 once
/// every stream has ended.
#[tokio::test]
async fn in_flight_calls_are_released_when_streams_end() {
    let config = json!({"rules": [grpc_rule("subscribe-open", "chat.ChatService", "Subscribe",
        json!({"counts": "in_flight", "limit": {"count": 2}}))]});
    let s = setup("grpc_in_flight_calls_are_released_when_streams_end", config).await;

    let first = s
        .open_subscription("subscription 1")
        .await
        .expect("subscription 1");
    let second = s
        .open_subscription("subscription 2")
        .await
        .expect("subscription 2");
    stream_stats::wait_gauge(&s.envoy, Protocol::Grpc, "subscribe-open", 2)
        .await
        .unwrap();
    let refused = s
        .open_subscription("subscription 3")
        .await
        .expect_err("subscription 3 must be refused");
    assert_eq!(
        refused.code(),
        Code::ResourceExhausted,
        "subscription 3: {refused:?}"
    );
    assert!(
        refused
            .message()
            .starts_with("rate limited by rule subscribe-open; retry after "),
        "subscription 3: grpc-message {:?}",
        refused.message()
    );
    assert_eq!(
        s.upstream.calls("Subscribe"),
        2,
        "Subscribe calls that reached the upstream"
    );

    // The client cancels one stream: its permit comes back.
    drop(first);
    stream_stats::wait_gauge(&s.envoy, Protocol::Grpc, "subscribe-open", 1)
        .await
        .unwrap();
    let fourth = s
        .open_subscription("subscription 4 (after a cancel)")
        .await
        .expect("subscription 4");
    let refused = s
        .open_subscription("subscription 5")
        .await
        .expect_err("subscription 5 must be refused");
    assert_eq!(
        refused.code(),
        Code::ResourceExhausted,
        "subscription 5: {refused:?}"
    );

    // The upstream ends the rest normally.
    s.upstream.release_held();
    for (mut stream, what) in [(second, "subscription 2"), (fourth, "subscription 4")] {
        let end = next(&mut stream, what).await;
        assert!(
            matches!(end, Ok(None)),
            "{what}: expected a clean end, got {end:?}"
        );
    }
    stream_stats::wait_gauge(&s.envoy, Protocol::Grpc, "subscribe-open", 0)
        .await
        .unwrap();
    wait::until("upstream streams closed", CALL_TIMEOUT, || async {
        match s.upstream.open_streams() {
            0 => Ok(()),
            n => Err(n.to_string()),
        }
    })
    .await
    .unwrap();
    assert_eq!(
        s.counter("subscribe-open", "limited", 2).await,
        2,
        "limited calls"
    );
    stream_stats::wait_prometheus_gauge(&s.envoy, Protocol::Grpc, "subscribe-open", 0)
        .await
        .unwrap();
}

/// A `messages` rule on client streaming: the 4th message, before any
/// response, ends the call with RESOURCE_EXHAUSTED and never reaches the
/// upstream.
#[tokio::test]
async fn messages_limit_in_client_streaming() {
    let config = json!({"rules": [grpc_rule("upload-msgs", "chat.ChatService", "Upload",
        json!({"counts": "messages", "direction": "client", "limit": {"count": 3, "per": "1h"}}))]});
    let s = setup("grpc_messages_limit_in_client_streaming", config).await;

    let (tx, rx) = mpsc::channel(8);
    let mut chat = s.chat();
    let call = tokio::spawn(async move { chat.upload(ReceiverStream::new(rx)).await });
    for n in 1..=3u64 {
        tx.send(ChatMessage {
            text: format!("m{n}"),
        })
        .await
        .unwrap();
        // One at a time, so "exactly 3 reached the upstream" is meaningful.
        wait::until(
            &format!("upload message {n} at the upstream"),
            CALL_TIMEOUT,
            || async {
                match s.upstream.received("Upload") {
                    got if got == n => Ok(()),
                    got => Err(got.to_string()),
                }
            },
        )
        .await
        .unwrap();
    }
    tx.send(ChatMessage { text: "m4".into() }).await.unwrap();
    let result = bounded("Upload after message 4", call).await.expect("join");
    let status = result.expect_err("Upload must end RESOURCE_EXHAUSTED after message 4");
    assert_eq!(
        status.code(),
        Code::ResourceExhausted,
        "Upload after message 4: {status:?}"
    );
    assert_eq!(
        s.upstream.received("Upload"),
        3,
        "Upload messages that reached the upstream"
    );
    assert_eq!(
        s.counter("upload-msgs", "limited", 1).await,
        1,
        "limited messages"
    );
    assert_exhausted(&status, "upload-msgs", 3, 3600, "Upload after message 4");
}

/// A `messages` rule on server streaming, once the response has started:
/// the client gets the 3 allowed messages, then RESOURCE_EXHAUSTED.
#[tokio::test]
async fn messages_limit_in_server_streaming() {
    let config = json!({"rules": [grpc_rule("list-msgs", "user.UserService", "ListUsers",
        json!({"counts": "messages", "direction": "server", "limit": {"count": 3, "per": "1h"}}))]});
    let s = setup("grpc_messages_limit_in_server_streaming", config).await;

    let mut stream = bounded(
        "ListUsers",
        s.users().list_users(ListUsersRequest { count: 10 }),
    )
    .await
    .expect("ListUsers starts")
    .into_inner();
    let mut users = Vec::new();
    let end = loop {
        match next(&mut stream, "ListUsers").await {
            Ok(Some(user)) => users.push(user.user_id),
            other => break other,
        }
    };
    assert_eq!(users, [1, 2, 3], "messages before the end (then {end:?})");
    assert_exhausted_mid_stream(&end, "list-msgs", "ListUsers after 3 messages");
    assert_eq!(s.upstream.calls("ListUsers"), 1);
}

/// A `messages` rule in both directions on bidi streaming: message, echo,
/// message, echo use the 4 permits; the 3rd client message is not passed on.
/// When the client half-closes, the request is known to be cut: the call is
/// reset at once on both sides, so the upstream never takes 2 messages for
/// the whole request.
#[tokio::test]
async fn messages_limit_in_bidi_streaming() {
    let config = json!({"rules": [grpc_rule("chat-msgs", "chat.ChatService", "Chat",
        json!({"counts": "messages", "limit": {"count": 4, "per": "1h"}}))]});
    let s = setup("grpc_messages_limit_in_bidi_streaming", config).await;

    let (tx, rx) = mpsc::channel(8);
    let mut responses = bounded("Chat", s.chat().chat(ReceiverStream::new(rx)))
        .await
        .expect("Chat starts")
        .into_inner();
    for n in 1..=2 {
        let text = format!("m{n}");
        tx.send(ChatMessage { text: text.clone() }).await.unwrap();
        let echo = next(&mut responses, &format!("echo of {text}")).await;
        assert!(
            matches!(&echo, Ok(Some(m)) if m.text == text),
            "echo of {text}: got {echo:?}"
        );
    }
    tx.send(ChatMessage { text: "m3".into() }).await.unwrap();
    drop(tx);
    let end = next(&mut responses, "Chat after message 3 and the half-close").await;
    assert!(
        matches!(&end, Err(status) if status.code() != Code::Ok),
        "Chat after message 3 and the half-close: expected a reset, got {end:?}"
    );
    s.wait_ends("Chat", (0, 1)).await;
    assert_eq!(
        s.upstream.received("Chat"),
        2,
        "Chat messages that reached the upstream"
    );
}

/// The fields of a grpcio client report.
fn report_code(report: &Value) -> &str {
    report["code"].as_str().unwrap_or("?")
}

fn report_received(report: &Value) -> usize {
    report["received"].as_array().map_or(0, Vec::len)
}

/// Seconds from the last message the client got (or the call's start) to
/// the call's end.
fn silence_before_end(report: &Value) -> f64 {
    let ended = report["ended_s"].as_f64().unwrap_or(f64::MAX);
    ended - report["last_message_s"].as_f64().unwrap_or(0.0)
}

/// A `message_size` rule on `Upload`: a 100,000-byte message compressed
/// with gzip (grpcio, `grpc-encoding: gzip`) is refused with UNIMPLEMENTED
/// and a message that says why, and never reaches the upstream, which takes
/// gzip; sent uncompressed it is refused as too large, with no retry hint.
#[tokio::test]
async fn compressed_messages_are_refused_where_sizes_are_limited() {
    let config = json!({"rules": [grpc_rule("grpc-size", "chat.ChatService", "Upload",
        json!({"counts": "message_size", "direction": "client", "limit": {"count": 1024}}))]});
    let s = setup(
        "grpc_compressed_messages_are_refused_where_sizes_are_limited",
        config,
    )
    .await;

    let report = s
        .grpcio(json!({"mode": "upload", "count": 1, "size": 100_000, "gzip": true}))
        .await;
    assert_eq!(
        report_code(&report),
        "UNIMPLEMENTED",
        "gzip upload: {report}"
    );
    assert!(
        report["details"]
            .as_str()
            .is_some_and(|d| d.starts_with("compressed messages are refused: rule grpc-size")),
        "gzip upload: {report}"
    );
    let report = s
        .grpcio(json!({"mode": "upload", "count": 1, "size": 100_000}))
        .await;
    assert_eq!(
        report_code(&report),
        "RESOURCE_EXHAUSTED",
        "plain upload: {report}"
    );
    assert_eq!(
        report["details"], "message too large for rule grpc-size",
        "plain upload: {report}"
    );
    // The decision is per message: grpcio sends a message that gzip would
    // not shrink uncompressed, and it passes.
    let report = s
        .grpcio(json!({"mode": "upload", "count": 2, "size": 10, "gzip": true}))
        .await;
    assert_eq!(report_code(&report), "OK", "small gzip upload: {report}");
    assert_eq!(s.upstream.received("Upload"), 2, "messages at the upstream");
    assert_eq!(
        s.counter("grpc-size", "limited", 2).await,
        2,
        "limited messages"
    );
}

/// Unary: a `messages` rule on responses refuses the second call's
/// response after its headers went out; the upstream ends the call at once,
/// so the client gets RESOURCE_EXHAUSTED from the rewritten trailers.
#[tokio::test]
async fn unary_response_over_the_limit_ends_resource_exhausted() {
    let config = json!({"rules": [grpc_rule("user-replies", "user.UserService", "GetUser",
        json!({"counts": "messages", "direction": "server", "limit": {"count": 1, "per": "1h"}}))]});
    let s = setup(
        "grpc_unary_response_over_the_limit_ends_resource_exhausted",
        config,
    )
    .await;
    let first = s.grpcio(json!({"mode": "unary"})).await;
    assert_eq!(report_code(&first), "OK", "call 1: {first}");
    let second = s.grpcio(json!({"mode": "unary"})).await;
    assert_eq!(
        report_code(&second),
        "RESOURCE_EXHAUSTED",
        "call 2: {second}"
    );
    assert!(
        second["ended_s"].as_f64().is_some_and(|t| t < 1.0),
        "call 2 took too long: {second}"
    );
}

/// Client streaming, batch client: 8 messages against a limit of 5. The
/// response has not started, so the call ends RESOURCE_EXHAUSTED; the
/// upstream's request is reset (or never reached it), never ended cleanly:
/// the upload is not committed.
#[tokio::test]
async fn cut_upload_is_never_committed() {
    let config = json!({"rules": [grpc_rule("upload-msgs", "chat.ChatService", "Upload",
        json!({"counts": "messages", "direction": "client", "limit": {"count": 5, "per": "1h"}}))]});
    let s = setup("grpc_cut_upload_is_never_committed", config).await;
    let report = s.grpcio(json!({"mode": "upload", "count": 8})).await;
    assert_eq!(
        report_code(&report),
        "RESOURCE_EXHAUSTED",
        "upload: {report}"
    );
    s.wait_cut("Upload").await;
    assert!(
        s.upstream.received("Upload") <= 5,
        "messages at the upstream"
    );
}

/// Bidi streaming, batch client: 8 messages then a half-close, against a
/// limit of 5 client messages, after the response started. The upstream
/// must not see the half-close (it would take 5 messages for the whole
/// request): its side is reset, and so is the client's, at once.
#[tokio::test]
async fn cut_bidi_request_is_reset_not_half_closed() {
    let config = json!({"rules": [grpc_rule("chat-up", "chat.ChatService", "Chat",
        json!({"counts": "messages", "direction": "client", "limit": {"count": 5, "per": "1h"}}))]});
    let s = setup("grpc_cut_bidi_request_is_reset_not_half_closed", config).await;
    let report = s.grpcio(json!({"mode": "chat_batch", "count": 8})).await;
    assert_ne!(report_code(&report), "OK", "batch chat: {report}");
    assert_ne!(
        report_code(&report),
        "DEADLINE_EXCEEDED",
        "batch chat: {report}"
    );
    assert!(
        report["ended_s"].as_f64().is_some_and(|t| t < 1.0),
        "batch chat should end at once: {report}"
    );
    s.wait_cut("Chat").await;
    assert!(s.upstream.received("Chat") <= 5, "messages at the upstream");
}

/// Bidi streaming, interactive client (each message waits for its echo),
/// a limit of 5 messages both ways: 2 echoes, then the 3rd echo is the 6th
/// message. The upstream waits for the client, which waits for the echo:
/// nothing would end the call, so the filter resets it after
/// `grpc_cut_grace` (default 1 s), long before the client's deadline.
#[tokio::test]
async fn interactive_bidi_client_learns_within_the_grace() {
    let config = json!({"rules": [grpc_rule("chat-both", "chat.ChatService", "Chat",
        json!({"counts": "messages", "limit": {"count": 5, "per": "1h"}}))]});
    let s = setup(
        "grpc_interactive_bidi_client_learns_within_the_grace",
        config,
    )
    .await;
    let report = s
        .grpcio(json!({"mode": "chat_interactive", "count": 10, "deadline": 10}))
        .await;
    assert_eq!(report_received(&report), 2, "echoes: {report}");
    assert!(
        !matches!(report_code(&report), "OK" | "DEADLINE_EXCEEDED"),
        "interactive chat: {report}"
    );
    let silence = silence_before_end(&report);
    assert!(
        (0.9..2.0).contains(&silence),
        "the call should end about 1 s (the default grace) after echo 2: {report}"
    );
    s.wait_ends("Chat", (0, 1)).await;
    wait::until("upstream streams closed", CALL_TIMEOUT, || async {
        match s.upstream.open_streams() {
            0 => Ok(()),
            n => Err(n.to_string()),
        }
    })
    .await
    .unwrap();
}

/// Server streaming: 60 messages at 10/s against a limit of 5, a 4 s
/// deadline, `grpc_cut_grace` 200ms. The client gets 5 messages and then the
/// call's end within the grace, not its deadline; the upstream is reset, so
/// it stops sending.
#[tokio::test]
async fn long_server_stream_is_reset_after_the_grace() {
    let config = json!({"grpc_cut_grace": "200ms",
        "rules": [grpc_rule("events", "chat.ChatService", "Subscribe",
        json!({"counts": "messages", "direction": "server", "limit": {"count": 5, "per": "1h"}}))]});
    let s = setup("grpc_long_server_stream_is_reset_after_the_grace", config).await;
    let report = s
        .grpcio(json!({"mode": "subscribe", "count": 60, "interval_ms": 100, "deadline": 4}))
        .await;
    assert_eq!(report_received(&report), 5, "messages: {report}");
    assert!(
        !matches!(report_code(&report), "OK" | "DEADLINE_EXCEEDED"),
        "subscribe: {report}"
    );
    // The 6th message comes 0.1 s after the 5th; then 0.2 s of grace and
    // at most one 10 ms tick.
    let silence = silence_before_end(&report);
    assert!(
        silence < 0.8,
        "the call should end 0.3 s after message 5: {report}"
    );
    wait::until("upstream streams closed", CALL_TIMEOUT, || async {
        match s.upstream.open_streams() {
            0 => Ok(()),
            n => Err(n.to_string()),
        }
    })
    .await
    .unwrap();
    assert!(
        s.upstream.sent("Subscribe") < 30,
        "the upstream kept sending: {} messages",
        s.upstream.sent("Subscribe")
    );
}

/// One `Upload` call whose request body is `body` as it is (gRPC framing
/// written by hand, sent in one piece, then the half-close): the status it
/// ended with, trailers-only or in the trailers.
async fn raw_upload(s: &Setup, body: Vec<u8>) -> Result<Status, String> {
    use http_body_util::BodyExt as _;
    use tonic::codegen::{http, Service as _};

    let request = http::Request::post(format!("http://{}/chat.ChatService/Upload", s.envoy.addr()))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(tonic::body::Body::new(http_body_util::Full::new(
            bytes::Bytes::from(body),
        )))
        .unwrap();
    let mut channel = s.channel.clone();
    let call = async move {
        std::future::poll_fn(|cx| channel.poll_ready(cx))
            .await
            .map_err(|e| e.to_string())?;
        let response = channel.call(request).await.map_err(|e| e.to_string())?;
        if let Some(status) = Status::from_header_map(response.headers()) {
            return Ok(status);
        }
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        let trailers = body.trailers().cloned().unwrap_or_default();
        Ok::<_, String>(
            Status::from_header_map(&trailers)
                .unwrap_or_else(|| Status::unknown("no grpc-status in the trailers")),
        )
    };
    bounded("raw Upload", call).await
}

/// gRPC framing of one plain message: flag, length, payload.
fn grpc_frame(payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
    [&[0u8][..], &len, payload].concat()
}

/// A message whose prefix declares more than gRPC's default 4 MiB meets
/// the `message_size` rule like any other (the call ends RESOURCE_EXHAUSTED
/// before anything reaches the upstream, not counted past); a prefix that
/// cannot be parsed ends the call with INTERNAL, and what follows it never
/// reaches the upstream as a clean stream.
#[tokio::test]
async fn oversized_and_malformed_prefixes_end_the_call() {
    use prost::Message as _;

    let config = json!({"rules": [grpc_rule("upload-size", "chat.ChatService", "Upload",
        json!({"counts": "message_size", "direction": "client", "limit": {"count": 1024}}))]});
    let s = setup("grpc_oversized_and_malformed_prefixes_end_the_call", config).await;
    let small = grpc_frame(&ChatMessage { text: "hi".into() }.encode_to_vec());

    // 4 MiB + 1 declared, 10 bytes of it sent, then three small messages.
    let huge = [
        &[0u8][..],
        &((4u32 << 20) + 1).to_be_bytes(),
        &[7; 10],
        &small,
        &small,
        &small,
    ]
    .concat();
    let status = raw_upload(&s, huge).await.unwrap();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(status.message(), "message too large for rule upload-size");
    assert_eq!(s.upstream.received("Upload"), 0, "messages at the upstream");
    assert_eq!(
        s.counter("upload-size", "limited", 1).await,
        1,
        "limited messages"
    );

    // Flag 2 is neither "plain" nor "compressed".
    let mut malformed = small.clone();
    malformed[0] = 2;
    let status = raw_upload(&s, [small.clone(), malformed, small].concat())
        .await
        .unwrap();
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert_eq!(
        status.message(),
        "malformed gRPC message stream: invalid gRPC compressed flag 0x02: must be 0 or 1"
    );
    assert_eq!(s.upstream.received("Upload"), 0, "messages at the upstream");
    assert_eq!(s.upstream.ends("Upload").0, 0, "clean ends at the upstream");
}

/// Large messages reach Envoy in many body chunks, most of them payload
/// alone, which the filter passes on unread: every message is still
/// counted once, whatever the chunks, and the fourth is refused.
#[tokio::test]
async fn large_messages_over_many_chunks_are_counted_exactly() {
    use prost::Message as _;

    let config = json!({"rules": [grpc_rule("upload-msgs", "chat.ChatService", "Upload",
        json!({"counts": "messages", "direction": "client", "limit": {"count": 3, "per": "1h"}}))]});
    let s = setup("grpc_large_messages_over_many_chunks", config).await;
    let large = |c: char| {
        grpc_frame(
            &ChatMessage {
                text: c.to_string().repeat(300_000),
            }
            .encode_to_vec(),
        )
    };
    let body = [large('a'), large('b'), large('c'), large('d')].concat();
    let status = raw_upload(&s, body).await.unwrap();
    assert_exhausted(
        &status,
        "upload-msgs",
        3,
        3600,
        "Upload of 4 large messages",
    );
    assert_eq!(
        s.counter("upload-msgs", "allowed", 3).await,
        3,
        "allowed messages"
    );
    assert_eq!(
        s.counter("upload-msgs", "limited", 1).await,
        1,
        "limited messages"
    );
}
