//! The worked configurations in `envoy/examples/`, each loaded unchanged
//! into a real Envoy that checks it does what its `description` says; and
//! the README's copies of them, which must be the tested files.
//!
//! Needs Envoy (`make setup`) and the filter (`make wasm`). Nothing sleeps:
//! where a limit could refill while a test runs, the test bounds what it
//! sees by the time that passed instead of assuming it is short.

// Test code: failing means panicking.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures_util::SinkExt as _;
use serde_json::Value;
use sluice_e2e::client::{Client, Reply};
use sluice_e2e::envoy::Envoy;
use sluice_e2e::grpc::chat::chat_service_client::ChatServiceClient;
use sluice_e2e::grpc::chat::{ChatMessage, SubscribeRequest};
use sluice_e2e::grpc::user::user_service_client::UserServiceClient;
use sluice_e2e::grpc::user::ListUsersRequest;
use sluice_e2e::grpc_upstream::GrpcUpstream;
use sluice_e2e::routes::with_upstreams;
use sluice_e2e::upstream::Upstream;
use sluice_e2e::ws_client::{connect, next_message, until_closed, Upgrade, Ws};
use sluice_e2e::ws_upstream::WsUpstream;
use tokio_tungstenite::tungstenite::Message;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{Code, Request, Status, Streaming};

/// Every file in `envoy/examples/`, by name without `.json`: each has a
/// test below.
const EXAMPLES: &[&str] = &[
    "slowstack-per-ip",
    "websocket-rooms",
    "grpc-per-method",
    "grpc-profiles",
    "mahavishnu-defaults",
    "ratethrottle-login",
];

/// How long one gRPC call, or one message of a stream, may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

fn examples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../envoy/examples")
}

fn example_text(name: &str) -> String {
    let path = examples_dir().join(format!("{name}.json"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn example(name: &str) -> Value {
    serde_json::from_str(&example_text(name)).unwrap_or_else(|e| panic!("{name}.json: {e}"))
}

/// Envoy loading example `name`, with an HTTP, a gRPC and a WebSocket
/// upstream behind it.
struct Setup {
    _http: Upstream,
    _grpc: GrpcUpstream,
    _ws: WsUpstream,
    envoy: Envoy,
}

async fn start(name: &str) -> Setup {
    let http = Upstream::start().await.expect("starting the HTTP upstream");
    let grpc = GrpcUpstream::start()
        .await
        .expect("starting the gRPC upstream");
    let ws = WsUpstream::start()
        .await
        .expect("starting the WebSocket upstream");
    let builder =
        Envoy::builder(&format!("example_{}", name.replace('-', "_"))).upstream(http.port());
    let envoy = with_upstreams(builder, Some(grpc.port()), Some(ws.port()))
        .sluice(&example(name))
        .start()
        .await
        .unwrap_or_else(|e| panic!("starting Envoy with {name}.json: {e:#}"));
    Setup {
        _http: http,
        _grpc: grpc,
        _ws: ws,
        envoy,
    }
}

impl Setup {
    fn client(&self) -> Client {
        self.envoy.client()
    }

    async fn get(&self, path: &str) -> Reply {
        self.client()
            .get(path)
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e:#}"))
    }

    /// A gRPC connection through Envoy.
    async fn grpc(&self) -> Grpc {
        let channel = sluice_e2e::grpc::connect(self.envoy.addr())
            .await
            .expect("gRPC channel to Envoy");
        Grpc(channel)
    }

    /// A WebSocket upgrade of `path` from `client` (`X-Forwarded-For`).
    async fn upgrade(&self, path: &str, client: &str) -> Upgrade {
        connect(self.envoy.addr(), path, &[("x-forwarded-for", client)])
            .await
            .unwrap_or_else(|e| panic!("upgrade of {path}: {e:#}"))
    }
}

/// The rule a 429 names.
fn refused_by(reply: &Reply) -> String {
    assert_eq!(reply.status, 429, "expected a 429: {}", reply.text());
    let body = reply.json().expect("the 429's body");
    body["rule"].as_str().unwrap_or_default().to_owned()
}

/// Intervals of `every` started since `since`: how many permits a rule
/// refilling one per `every` may have gained.
fn refills_since(since: Instant, every: Duration) -> u64 {
    let whole = since.elapsed().as_nanos() / every.as_nanos();
    u64::try_from(whole).unwrap_or(u64::MAX).saturating_add(1)
}

/// gRPC metadata of a call: (name, value) pairs.
type Metadata<'a> = &'a [(&'static str, &'a str)];

/// gRPC calls on one connection through Envoy. Each says whether the
/// filter let it through (`Ok`) or which rule refused it (`Err`).
struct Grpc(Channel);

impl Grpc {
    /// A call of `path` (`/<service>/<method>`) with an empty message. The
    /// upstream serves `user.UserService` and `chat.ChatService` and
    /// answers UNIMPLEMENTED to any other method, so any path shows what
    /// the filter decided.
    async fn call(&self, path: &str, metadata: Metadata<'_>) -> Result<(), String> {
        let mut grpc = tonic::client::Grpc::new(self.0.clone());
        grpc.ready().await.expect("the gRPC channel is ready");
        let route = PathAndQuery::try_from(path).expect("a gRPC path");
        let codec = tonic_prost::ProstCodec::<(), ()>::default();
        let answer = bounded(path, grpc.unary(request((), metadata), route, codec)).await;
        match answer {
            Ok(_) => Ok(()),
            Err(status) if status.code() == Code::Unimplemented => Ok(()),
            Err(status) => Err(refusing_rule(&status, path)),
        }
    }

    /// Calls `path` until the filter refuses a call: how many passed
    /// before, and the rule that refused it.
    async fn calls_until_refused(&self, path: &str, metadata: Metadata<'_>) -> (u64, String) {
        for passed in 0..10_000 {
            if let Err(rule) = self.call(path, metadata).await {
                return (passed, rule);
            }
        }
        panic!("{path}: 10000 calls passed without a refusal");
    }

    /// A `Subscribe` stream holding after its first message, once that
    /// message arrived (the call surely holds its permits).
    async fn held_subscription(
        &self,
        metadata: Metadata<'_>,
    ) -> Result<Streaming<ChatMessage>, String> {
        let subscribe = SubscribeRequest {
            count: 1,
            hold: true,
            interval_ms: 0,
        };
        let mut client = ChatServiceClient::new(self.0.clone());
        let what = "Subscribe";
        let mut stream = bounded(what, client.subscribe(request(subscribe, metadata)))
            .await
            .map_err(|status| refusing_rule(&status, what))?
            .into_inner();
        let first = bounded(what, stream.message()).await;
        assert!(
            matches!(&first, Ok(Some(m)) if m.text == "event-1"),
            "{what}: expected event-1, got {first:?}"
        );
        Ok(stream)
    }

    /// `ListUsers` asking for `count` users: the users received before the
    /// stream ended, and how it ended (`Err`: the rule that cut it).
    async fn list_users(&self, count: u32, metadata: Metadata<'_>) -> (u64, Result<(), String>) {
        let mut client = UserServiceClient::new(self.0.clone());
        let what = "ListUsers";
        let started = bounded(
            what,
            client.list_users(request(ListUsersRequest { count }, metadata)),
        );
        let mut stream = match started.await {
            Ok(response) => response.into_inner(),
            Err(status) => return (0, Err(refusing_rule(&status, what))),
        };
        let mut received = 0;
        loop {
            match bounded(what, stream.message()).await {
                Ok(Some(_user)) => received += 1,
                Ok(None) => return (received, Ok(())),
                Err(status) => return (received, Err(refusing_rule(&status, what))),
            }
        }
    }
}

/// A request of `message` carrying `metadata`.
fn request<T>(message: T, metadata: Metadata<'_>) -> Request<T> {
    let mut request = Request::new(message);
    for &(name, value) in metadata {
        let value = value.parse().expect("an ASCII metadata value");
        request.metadata_mut().insert(name, value);
    }
    request
}

/// The rule a RESOURCE_EXHAUSTED names (`rate limited by rule <name>; …`).
fn refusing_rule(status: &Status, what: &str) -> String {
    assert_eq!(
        status.code(),
        Code::ResourceExhausted,
        "{what}: expected a refusal, got {status:?}"
    );
    status
        .message()
        .strip_prefix("rate limited by rule ")
        .and_then(|rest| rest.split_once(';'))
        .map(|(rule, _)| rule.to_owned())
        .unwrap_or_else(|| panic!("{what}: grpc-message {:?}", status.message()))
}

/// `call`, failing the test if it takes longer than [`CALL_TIMEOUT`].
async fn bounded<T>(what: &str, call: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {CALL_TIMEOUT:?}"))
}

#[test]
fn every_example_is_tested_valid_and_described() {
    let mut files: Vec<String> = std::fs::read_dir(examples_dir())
        .expect("envoy/examples")
        .map(|entry| entry.expect("a directory entry").file_name())
        .map(|name| name.to_string_lossy().into_owned())
        .collect();
    files.sort();
    let mut tested: Vec<String> = EXAMPLES.iter().map(|n| format!("{n}.json")).collect();
    tested.sort();
    assert_eq!(files, tested, "every example file has a test here");
    for name in EXAMPLES {
        let text = example_text(name);
        if let Err(e) = sluice_core::policy::Policy::from_json(&text) {
            panic!("{name}.json is not a valid configuration: {e}");
        }
        let config = example(name);
        assert!(
            config["description"]
                .as_str()
                .is_some_and(|d| !d.is_empty()),
            "{name}.json: says what it does in its description"
        );
        for rule in config["rules"].as_array().expect("rules") {
            assert!(
                rule["description"].as_str().is_some_and(|d| !d.is_empty()),
                "{name}.json: rule {} has a description",
                rule["name"]
            );
        }
    }
}

/// README.md shows an example as a JSON block right after a line
/// `<!-- example: envoy/examples/<name>.json -->`: the block must be the
/// file, byte for byte, so what users copy is what the tests ran.
#[test]
fn readme_examples_are_the_tested_files() {
    let readme_path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let readme = std::fs::read_to_string(&readme_path).expect("README.md");
    let marker = "<!-- example: envoy/examples/";
    let mut shown = 0;
    for (at, _) in readme.match_indices(marker) {
        let rest = &readme[at + marker.len()..];
        let name = rest.split(".json -->").next().expect("a file name");
        let block = rest
            .split_once("```json\n")
            .and_then(|(_, b)| b.split_once("```"))
            .map(|(b, _)| b)
            .unwrap_or_else(|| panic!("README: no JSON block after the marker of {name}"));
        assert_eq!(
            block,
            example_text(name),
            "README's copy of envoy/examples/{name}.json differs from the file"
        );
        shown += 1;
    }
    assert!(shown > 0, "README shows at least one example");
}

/// Every JSON block in README.md is a configuration, or one rule of one,
/// that core's validator accepts: the documentation cannot drift from what
/// the filter reads.
#[test]
fn readme_json_blocks_are_valid() {
    let readme_path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let readme = std::fs::read_to_string(&readme_path).expect("README.md");
    let mut checked = 0;
    for block in readme.split("```json\n").skip(1) {
        let text = block.split("```").next().unwrap_or_default();
        let value: Value = serde_json::from_str(text)
            .unwrap_or_else(|e| panic!("README JSON block is not JSON ({e}):\n{text}"));
        let config = if value.get("name").is_some() {
            serde_json::json!({ "rules": [value] }).to_string()
        } else {
            text.to_owned()
        };
        if let Err(e) = sluice_core::policy::Policy::from_json(&config) {
            panic!("README JSON block refused: {e}\n{text}");
        }
        checked += 1;
    }
    assert!(checked >= 10, "only {checked} JSON blocks found");
}

/// slowstack-per-ip.json: 10 requests per 10 s per IP, 1 per second per IP
/// and endpoint, failed requests not counted.
#[tokio::test]
async fn slowstack_per_ip() {
    let s = start("slowstack-per-ip").await;
    let since = Instant::now();
    // Failures give their permits back: more of them than either limit.
    for i in 0..12 {
        let reply = s.get("/status/503").await;
        assert_eq!(reply.status, 503, "failed request {i} reaches the upstream");
    }
    // One endpoint: the query string does not make another one.
    assert_eq!(s.get("/items").await.status, 200);
    let again_at = Instant::now();
    let again = s.get("/items?page=2").await;
    if again.status == 200 {
        assert!(
            again_at.duration_since(since) >= Duration::from_secs(1),
            "a second request to /items within a second was admitted"
        );
    } else {
        assert_eq!(refused_by(&again), "per-ip-endpoint");
    }
    // Every other endpoint once: the per-IP budget runs out after the 9
    // permits /items left, plus what refilled meanwhile.
    let mut admitted = 0u64;
    let refusal = loop {
        let reply = s.get(&format!("/e/{admitted}")).await;
        if reply.status != 200 {
            break reply;
        }
        admitted += 1;
        assert!(
            admitted <= 9 + refills_since(since, Duration::from_secs(1)),
            "admitted {admitted}"
        );
    };
    assert_eq!(refused_by(&refusal), "per-ip");
    assert!(
        admitted >= 9,
        "per-IP budget of 10 ran out after {admitted} + 1"
    );
}

/// websocket-rooms.json: per-client and per-room limits on a chat. Clients
/// are told apart by `X-Forwarded-For` (the example trusts one proxy).
#[tokio::test]
async fn websocket_rooms() {
    let s = start("websocket-rooms").await;
    let since = Instant::now();
    // A message over 10 KiB closes the connection with 1009.
    let mut ws = open(&s, "/room/lobby", "192.0.2.1").await;
    let (passed, close) = until_refused(&mut ws, Message::text("x".repeat(10241))).await;
    assert_eq!(passed, 0);
    assert_eq!(close, (1009, "message too big: chat-max-size".to_owned()));
    // Five connections open at once per client; the sixth is refused.
    let mut held = Vec::new();
    for i in 0..5 {
        held.push(open(&s, &format!("/room/r{i}"), "192.0.2.2").await);
    }
    match s.upgrade("/room/r5", "192.0.2.2").await {
        Upgrade::Refused(response) => assert_eq!(response.status().as_u16(), 429),
        Upgrade::Open(_) => panic!("a sixth connection at once was admitted"),
    }
    // A room takes 500 messages a minute from all its members together:
    // five clients send their 100 each (the most one client may), one
    // after another; then a sixth client's messages are refused, past what
    // refilled meanwhile (one every 120 ms).
    for client in 10..15 {
        let mut ws = open(&s, "/room/busy", &format!("192.0.2.{client}")).await;
        for i in 1..100 {
            echo(&mut ws, &format!("message {i}")).await;
        }
    }
    let mut late = s
        .upgrade("/room/busy", "192.0.2.20")
        .await
        .open("sixth member");
    let (passed, close) = until_refused(&mut late, Message::text("late")).await;
    let refilled = refills_since(since, Duration::from_millis(120));
    assert!(
        passed <= refilled,
        "{passed} messages passed after the room's 500"
    );
    assert_eq!(close, (1008, "rate limited: room-msgs".to_owned()));
}

/// grpc-per-method.json: per-method budgets per caller, keyed by
/// `x-user-id` or else the client IP; unlisted methods share a default.
/// Every caller here comes from 127.0.0.1.
#[tokio::test]
async fn grpc_per_method() {
    let s = start("grpc-per-method").await;
    let grpc = s.grpc().await;
    let delete_user = "/user.UserService/DeleteUser";
    let alice: Metadata = &[("x-user-id", "alice")];
    // DeleteUser: 5 a minute (one more every 12 s).
    let since = Instant::now();
    let (passed, rule) = grpc.calls_until_refused(delete_user, alice).await;
    assert_eq!(rule, "delete-user");
    let refilled = refills_since(since, Duration::from_secs(12));
    assert!(
        (5..=5 + refilled).contains(&passed),
        "alice's DeleteUser refused after {passed}"
    );
    // Other methods have budgets of their own, and other users too.
    let get_user = "/user.UserService/GetUser";
    assert_eq!(grpc.call(get_user, alice).await, Ok(()), "alice's GetUser");
    let (users, end) = grpc.list_users(3, alice).await;
    assert_eq!((users, end), (3, Ok(())), "alice's ListUsers");
    let bob: Metadata = &[("x-user-id", "bob")];
    assert_eq!(
        grpc.call(delete_user, bob).await,
        Ok(()),
        "bob's DeleteUser"
    );
    // A caller without x-user-id is keyed by its address; a user whose id
    // reads like that address keeps a budget of its own.
    let since = Instant::now();
    let (passed, rule) = grpc.calls_until_refused(delete_user, &[]).await;
    assert_eq!(rule, "delete-user");
    let refilled = refills_since(since, Duration::from_secs(12));
    assert!(
        (5..=5 + refilled).contains(&passed),
        "127.0.0.1's DeleteUser refused after {passed}"
    );
    let lookalike: Metadata = &[("x-user-id", "127.0.0.1")];
    assert_eq!(
        grpc.call(delete_user, lookalike).await,
        Ok(()),
        "DeleteUser of user 127.0.0.1"
    );
    // Orders: CreateOrder 5 a minute.
    let create_order = "/order.OrderService/CreateOrder";
    let since = Instant::now();
    let (passed, rule) = grpc.calls_until_refused(create_order, bob).await;
    assert_eq!(rule, "create-order");
    let refilled = refills_since(since, Duration::from_secs(12));
    assert!(
        (5..=5 + refilled).contains(&passed),
        "bob's CreateOrder refused after {passed}"
    );
    // Unlisted methods share the default's 100 a minute (one more every
    // 600 ms), and take nothing from the methods with a rule.
    let dave: Metadata = &[("x-user-id", "dave")];
    let since = Instant::now();
    let (passed, rule) = grpc
        .calls_until_refused("/user.UserService/UpdateUser", dave)
        .await;
    assert_eq!(rule, "default");
    let (more, rule) = grpc
        .calls_until_refused("/product.ProductService/SearchProducts", dave)
        .await;
    assert_eq!(rule, "default");
    let refilled = refills_since(since, Duration::from_millis(600));
    assert!(
        (100..=100 + refilled).contains(&(passed + more)),
        "dave's unlisted methods refused after {passed} + {more}"
    );
    for path in [get_user, delete_user, create_order] {
        assert_eq!(grpc.call(path, dave).await, Ok(()), "dave's {path}");
    }
}

/// grpc-profiles.json: internal, authenticated and public tiers of calls,
/// open calls and messages. Clients are told apart by `X-Forwarded-For`
/// (the example trusts one proxy).
#[tokio::test]
async fn grpc_profiles() {
    let s = start("grpc-profiles").await;
    let grpc = s.grpc().await;
    let get_user = "/user.UserService/GetUser";
    // A public caller: 60 calls a minute (one more a second)...
    let public: Metadata = &[("x-forwarded-for", "192.0.2.1")];
    let since = Instant::now();
    let (passed, rule) = grpc.calls_until_refused(get_user, public).await;
    assert_eq!(rule, "public-calls");
    let refilled = refills_since(since, Duration::from_secs(1));
    assert!(
        (60..=60 + refilled).contains(&passed),
        "public caller refused after {passed}"
    );
    // ...while an authenticated caller from the same address is counted
    // by its key only.
    let authenticated: Metadata = &[("x-forwarded-for", "192.0.2.1"), ("x-api-key", "key-1")];
    assert_eq!(
        grpc.call(get_user, authenticated).await,
        Ok(()),
        "authenticated caller from the public caller's address"
    );
    // An internal caller passes beyond the authenticated 300, its API key
    // notwithstanding: the internal tier comes first.
    let internal: Metadata = &[("x-forwarded-for", "10.1.2.3"), ("x-api-key", "key-2")];
    for i in 0..400 {
        assert_eq!(
            grpc.call(get_user, internal).await,
            Ok(()),
            "internal call {i}"
        );
    }
    // A public caller holds 5 calls open at once; the 6th is refused, but
    // an authenticated caller from the same address may open more.
    let public: Metadata = &[("x-forwarded-for", "192.0.2.2")];
    let mut held = Vec::new();
    for i in 0..5 {
        let stream = grpc.held_subscription(public).await;
        held.push(stream.unwrap_or_else(|rule| panic!("public subscription {i}: {rule}")));
    }
    let refused = grpc.held_subscription(public).await.err();
    assert_eq!(refused.as_deref(), Some("public-concurrent"));
    let authenticated: Metadata = &[("x-forwarded-for", "192.0.2.2"), ("x-api-key", "key-3")];
    let stream = grpc.held_subscription(authenticated).await;
    held.push(stream.expect("an authenticated subscription beside 5 public ones"));
    // A public caller's stream is cut after 600 messages a minute (one
    // more every 100 ms): the request message and 599 users.
    let public: Metadata = &[("x-forwarded-for", "192.0.2.3")];
    let since = Instant::now();
    let (users, end) = grpc.list_users(1000, public).await;
    assert_eq!(end, Err("public-stream-msgs".to_owned()));
    let refilled = refills_since(since, Duration::from_millis(100));
    assert!(
        (599..=599 + refilled).contains(&users),
        "public stream cut after {users} users"
    );
}

/// Sends `first`, then more messages, until the filter closes the
/// connection: how many were echoed first, and the Close's code and reason.
async fn until_refused(ws: &mut Ws, first: Message) -> (u64, (u16, String)) {
    let mut message = first;
    for passed in 0..1000 {
        ws.send(message).await.expect("sending");
        match next_message(ws).await.expect("an answer") {
            Message::Text(_) => message = Message::text(format!("more {passed}")),
            Message::Close(Some(frame)) => {
                until_closed(ws).await.expect("closed after the Close");
                return (passed, (u16::from(frame.code), frame.reason.to_string()));
            }
            other => panic!("expected an echo or a Close, got {other:?}"),
        }
    }
    panic!("1000 messages passed without a refusal");
}

/// Sends `text` and expects its echo.
async fn echo(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text))
        .await
        .unwrap_or_else(|e| panic!("sending {text:?}: {e}"));
    let got = next_message(ws).await;
    assert!(
        matches!(&got, Ok(Message::Text(t)) if t.as_str() == text),
        "expected the echo of {text:?}, got {got:?}"
    );
}

/// An open connection to `path` from `client`, proven by one echo.
async fn open(s: &Setup, path: &str, client: &str) -> Box<Ws> {
    let mut ws = s.upgrade(path, client).await.open(path);
    echo(&mut ws, &format!("hello {path}")).await;
    ws
}

/// A GET from `client` (`X-Forwarded-For`) with extra `headers`.
async fn get_from(s: &Setup, path: &str, client: &str, headers: &[(&str, &str)]) -> Reply {
    let mut all = vec![("x-forwarded-for", client)];
    all.extend_from_slice(headers);
    s.client()
        .get_with(path, &all)
        .await
        .unwrap_or_else(|e| panic!("GET {path} from {client}: {e:#}"))
}

/// What the upstream saw of the degrade header on an admitted request.
fn degraded_as(reply: &Reply) -> Option<String> {
    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = reply.json().expect("the upstream's echo");
    seen["headers"]["x-sluice-limited"]
        .as_str()
        .map(str::to_owned)
}

/// mahavishnu-defaults.json: expensive endpoints share a budget, signed-in
/// users and anonymous addresses are held to different rules, and the API
/// as a whole degrades rather than refuses past its global rate.
#[tokio::test]
async fn mahavishnu_defaults() {
    let s = start("mahavishnu-defaults").await;
    let since = Instant::now();
    // Requests the global rule counted (admitted, not degraded).
    let mut counted = 0u64;
    // Search and export share 10 a minute per user.
    let alice = [("x-user-id", "alice")];
    let mut expensive = 0u64;
    let refusal = loop {
        let path = ["/api/search", "/api/export"][(expensive % 2) as usize];
        let reply = get_from(&s, path, "192.0.2.1", &alice).await;
        if reply.status != 200 {
            break reply;
        }
        assert_eq!(degraded_as(&reply), None);
        expensive += 1;
        counted += 1;
        assert!(
            expensive <= 10 + refills_since(since, Duration::from_secs(6)),
            "alice made {expensive} expensive calls"
        );
    };
    assert!(expensive >= 10, "alice refused after {expensive}");
    assert_eq!(refused_by(&refusal), "expensive_operations");
    // A signed-in user gets 100 a minute, more than the 50 of an address:
    // bob passes 60 from one address where an anonymous client stops at 50.
    for i in 0..60 {
        let reply = get_from(&s, "/api/items", "192.0.2.2", &[("x-user-id", "bob")]).await;
        assert_eq!(reply.status, 200, "bob's request {i}: {}", reply.text());
        counted += 1;
    }
    let mut anonymous = 0u64;
    let refusal = loop {
        let reply = get_from(&s, "/api/items", "192.0.2.2", &[]).await;
        if reply.status != 200 {
            break reply;
        }
        anonymous += 1;
        counted += 1;
        assert!(
            anonymous <= 50 + refills_since(since, Duration::from_millis(1200)),
            "{anonymous} anonymous requests"
        );
    };
    assert!(anonymous >= 50, "anonymous refused after {anonymous}");
    assert_eq!(refused_by(&refusal), "api_per_ip");
    // Past 1000 a minute for the whole API, requests still pass, marked.
    let mut client = 10u32;
    let mut from_client = 0u32;
    let marked = loop {
        let address = format!("192.0.2.{client}");
        let reply = get_from(&s, "/api/items", &address, &[]).await;
        from_client += 1;
        if from_client == 45 {
            client += 1;
            from_client = 0;
        }
        if let Some(rules) = degraded_as(&reply) {
            break rules;
        }
        counted += 1;
        assert!(
            counted <= 1000 + refills_since(since, Duration::from_millis(60)),
            "{counted} requests passed unmarked"
        );
    };
    assert!(counted >= 1000, "degraded after {counted}");
    assert_eq!(marked, "api_global");
}

/// ratethrottle-login.json: the 6th login attempt in a minute locks the
/// client out of the login for 15 minutes, not just until its window
/// slides; other endpoints still serve it.
#[tokio::test]
async fn ratethrottle_login() {
    let s = start("ratethrottle-login").await;
    let since = Instant::now();
    let mut attempts = 0u64;
    let refusal = loop {
        let reply = s.get("/api/auth").await;
        if reply.status != 200 {
            break reply;
        }
        attempts += 1;
        assert!(
            attempts <= 5 + refills_since(since, Duration::from_secs(12)),
            "{attempts} login attempts passed"
        );
    };
    assert!(attempts >= 5, "login refused after {attempts}");
    assert_eq!(refused_by(&refusal), "auth_strict");
    // The lockout, not the window, sets Retry-After: near 15 minutes.
    let retry = refusal.header_u64("retry-after").expect("retry-after");
    assert!((880..=900).contains(&retry), "retry-after {retry}");
    let again = s.get("/api/auth").await;
    assert_eq!(refused_by(&again), "auth_strict");
    let retry_again = again.header_u64("retry-after").expect("retry-after");
    assert!(
        retry_again <= retry && retry_again >= 880,
        "retry-after {retry_again}"
    );
    // Other endpoints count against the hourly budget only.
    assert_eq!(s.get("/api/profile").await.status, 200);
}
