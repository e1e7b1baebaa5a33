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
use sluice_e2e::grpc_upstream::GrpcUpstream;
use sluice_e2e::routes::with_upstreams;
use sluice_e2e::upstream::Upstream;
use sluice_e2e::ws_client::{connect, next_message, until_closed, Upgrade, Ws};
use sluice_e2e::ws_upstream::WsUpstream;
use tokio_tungstenite::tungstenite::Message;

/// Every file in `envoy/examples/`, by name without `.json`: each has a
/// test below.
const EXAMPLES: &[&str] = &["slowstack-per-ip", "websocket-rooms"];

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

/// Whole seconds started since `since`: how many permits a rule refilling
/// one a second may have gained.
fn refills_since(since: Instant) -> u64 {
    since.elapsed().as_secs() + 1
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
        assert!(admitted <= 9 + refills_since(since), "admitted {admitted}");
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
    let refilled = since.elapsed().as_millis() / 120 + 1;
    assert!(
        u128::from(passed) <= refilled,
        "{passed} messages passed after the room's 500"
    );
    assert_eq!(close, (1008, "rate limited: room-msgs".to_owned()));
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
