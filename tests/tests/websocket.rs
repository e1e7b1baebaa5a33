//! End-to-end tests of Sluice's WebSocket limiting through a real Envoy,
//! against README.md, "gRPC and WebSocket": WebSocket clients (tungstenite,
//! and frames written by hand), Envoy with the filter, and a WebSocket
//! upstream that records the messages and Close frames it got.
//!
//! Needs Envoy (`make setup`) and the filter (`make wasm`). Windows are an
//! hour, so no count refills during a test; nothing sleeps: effects are
//! polled with bounded deadlines.

// Test code: failing means panicking (the workspace denies these in
// library code; helpers here are outside #[test] functions).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use futures_util::SinkExt as _;
use serde_json::{json, Value};
use sluice_e2e::envoy::{prometheus_value, Envoy};
use sluice_e2e::py_client::{self, PyServer};
use sluice_e2e::routes::with_upstreams;
use sluice_e2e::stream_stats::{self, Protocol};
use sluice_e2e::wait;
use sluice_e2e::ws_client::{connect, kill, next_message, until_closed, RawWs, Upgrade, Ws};
use sluice_e2e::ws_frame::{self, opcode, Frame};
use sluice_e2e::ws_upstream::{WsUpstream, QUIET_PATH};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

/// How long the upstream may take to see an effect.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(10);

/// The WebSocket upstream and Envoy with the filter routing `/ws` and
/// `/room/` to it.
struct Setup {
    upstream: WsUpstream,
    envoy: Envoy,
}

async fn setup(test: &str, rules: Value) -> Setup {
    let upstream = WsUpstream::start()
        .await
        .expect("starting the WebSocket upstream");
    let envoy = with_upstreams(Envoy::builder(test), None, Some(upstream.port()))
        .sluice(&json!({"rules": rules}))
        .start()
        .await
        .unwrap_or_else(|e| panic!("starting Envoy with the Sluice filter: {e:#}"));
    Setup { upstream, envoy }
}

impl Setup {
    async fn upgrade(&self, path: &str) -> Upgrade {
        connect(self.envoy.addr(), path, &[])
            .await
            .unwrap_or_else(|e| panic!("upgrade of {path}: {e:#}"))
    }

    /// An open connection to `path`, proven end to end by one echo.
    async fn open(&self, path: &str, what: &str) -> Box<Ws> {
        let mut ws = self.upgrade(path).await.open(what);
        send_echoed(&mut ws, &format!("hello from {what}"), what).await;
        ws
    }

    async fn raw(&self, path: &str) -> RawWs {
        RawWs::connect(self.envoy.addr(), path)
            .await
            .unwrap_or_else(|e| panic!("raw upgrade of {path}: {e:#}"))
    }

    /// The counter once it reads `expected` (or what it reads after 5 s).
    async fn counter(&self, rule: &str, outcome: &str, expected: u64) -> u64 {
        stream_stats::outcome_settled(&self.envoy, Protocol::WebSocket, rule, outcome, expected)
            .await
            .expect("reading Envoy's stats")
    }

    /// Waits until the upstream got a Close with `code` and `reason` on
    /// `path`.
    async fn upstream_close(&self, path: &str, code: u16, reason: &str) -> anyhow::Result<()> {
        let expected = (path.to_owned(), Some((code, reason.to_owned())));
        wait::until(
            &format!("upstream Close {code} {reason:?} on {path}"),
            UPSTREAM_TIMEOUT,
            || async {
                let closes = self.upstream.closes();
                if closes.contains(&expected) {
                    Ok(())
                } else {
                    let open = self.upstream.open();
                    Err(format!("closes {closes:?}, {open} connection(s) open"))
                }
            },
        )
        .await
    }

    /// Waits until the upstream has no connection open.
    async fn upstream_idle(&self) {
        wait::until("upstream connections closed", UPSTREAM_TIMEOUT, || async {
            match self.upstream.open() {
                0 => Ok(()),
                n => Err(n.to_string()),
            }
        })
        .await
        .unwrap();
    }
}

fn ws_rule(name: &str, counts: &str, limit: Value, extra: Value) -> Value {
    let mut rule =
        json!({"name": name, "match": {"websocket": true}, "counts": counts, "limit": limit});
    if let (Some(rule), Some(extra)) = (rule.as_object_mut(), extra.as_object()) {
        rule.extend(extra.clone());
    }
    rule
}

/// Sends `text` and expects it back (echo or room broadcast).
async fn send_echoed(ws: &mut Ws, text: &str, what: &str) {
    ws.send(Message::text(text))
        .await
        .unwrap_or_else(|e| panic!("{what}: sending {text:?}: {e}"));
    let got = next_message(ws).await;
    assert!(
        matches!(&got, Ok(Message::Text(t)) if t.as_str() == text),
        "{what}: expected the echo of {text:?}, got {got:?}"
    );
}

/// Sends `text` and expects a Close with `code` and `reason` instead of its
/// echo.
async fn send_closed(ws: &mut Ws, text: &str, code: u16, reason: &str, what: &str) {
    ws.send(Message::text(text))
        .await
        .unwrap_or_else(|e| panic!("{what}: sending {text:?}: {e}"));
    let got = next_message(ws).await;
    let expected = |f: &CloseFrame| u16::from(f.code) == code && f.reason.as_str() == reason;
    assert!(
        matches!(&got, Ok(Message::Close(Some(f))) if expected(f)),
        "{what}: after {text:?} expected Close {code} {reason:?}, got {got:?}"
    );
    until_closed(ws)
        .await
        .unwrap_or_else(|e| panic!("{what}: after the Close: {e:#}"));
}

/// The status and headers of a refused upgrade (the default header set);
/// `windowed` rules (not `in_flight`) also have the IETF `RateLimit` field.
fn assert_refused(upgrade: Upgrade, rule: &str, windowed: bool, what: &str) {
    let response = match upgrade {
        Upgrade::Refused(response) => response,
        Upgrade::Open(_) => panic!("{what}: expected 429, the upgrade succeeded"),
    };
    let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok());
    assert_eq!(
        response.status().as_u16(),
        429,
        "{what}: {:?}",
        response.headers()
    );
    assert!(
        header("retry-after")
            .and_then(|v| v.parse::<u64>().ok())
            .is_some(),
        "{what}: expected retry-after: {:?}",
        response.headers()
    );
    assert_eq!(
        header("x-ratelimit-remaining"),
        None,
        "{what}: x_ratelimit is opt-in: {:?}",
        response.headers()
    );
    assert!(
        !windowed
            || header("ratelimit").is_some_and(|v| v.starts_with(&format!("\"{rule}\";r=0;"))),
        "{what}: expected ratelimit: \"{rule}\";r=0;t=<n>: {:?}",
        response.headers()
    );
}

/// A `requests` rule: the 3rd upgrade is refused with 429 and headers, and
/// never reaches the upstream.
#[tokio::test]
async fn upgrade_refused_at_the_exact_connection() {
    let s = setup(
        "ws_upgrade_refused_at_the_exact_connection",
        json!([ws_rule(
            "ws-connects",
            "requests",
            json!({"count": 2, "per": "1h"}),
            json!({})
        )]),
    )
    .await;
    let _first = s.open("/ws", "connection 1").await;
    let _second = s.open("/ws", "connection 2").await;
    assert_refused(s.upgrade("/ws").await, "ws-connects", true, "connection 3");
    assert_eq!(s.upstream.open(), 2, "connections at the upstream");
    assert_eq!(
        s.counter("ws-connects", "allowed", 2).await,
        2,
        "allowed connections"
    );
    assert_eq!(
        s.counter("ws-connects", "limited", 1).await,
        1,
        "limited connections"
    );
    let text = s.envoy.prometheus().await.expect("/stats/prometheus");
    assert_eq!(
        prometheus_value(
            &text,
            "sluice_websocket",
            &[("rule", "ws-connects"), ("outcome", "limited")]
        ),
        Some(1.0),
        "sluice_websocket{{rule=\"ws-connects\",outcome=\"limited\"}} in /stats/prometheus"
    );
}

/// An `in_flight` rule: 2 open, the 3rd refused; clients that vanish (a
/// reset, a FIN without Close) give their permits back: the gauge returns
/// to 0 and 2 new connections open.
#[tokio::test]
async fn open_connections_return_to_zero_after_abrupt_disconnects() {
    let s = setup(
        "ws_open_connections_return_to_zero_after_abrupt_disconnects",
        json!([ws_rule(
            "ws-open",
            "in_flight",
            json!({"count": 2}),
            json!({})
        )]),
    )
    .await;
    let first = s.open("/ws", "connection 1").await;
    let second = s.open("/ws", "connection 2").await;
    stream_stats::wait_gauge(&s.envoy, Protocol::WebSocket, "ws-open", 2)
        .await
        .unwrap();
    assert_refused(s.upgrade("/ws").await, "ws-open", false, "connection 3");

    kill(first).expect("resetting connection 1");
    drop(second);
    stream_stats::wait_gauge(&s.envoy, Protocol::WebSocket, "ws-open", 0)
        .await
        .unwrap();
    s.upstream_idle().await;

    let mut third = s.open("/ws", "connection 4 (after the disconnects)").await;
    let _fourth = s.open("/ws", "connection 5").await;
    assert_refused(s.upgrade("/ws").await, "ws-open", false, "connection 6");
    (*third).close(None).await.expect("closing connection 4");
    stream_stats::wait_gauge(&s.envoy, Protocol::WebSocket, "ws-open", 1)
        .await
        .unwrap();
    stream_stats::wait_prometheus_gauge(&s.envoy, Protocol::WebSocket, "ws-open", 1)
        .await
        .unwrap();
}

/// Sends `allowed` text messages (each echoed), then `over`, with a raw
/// client that never answers a Close. The filter sends Close `code`
/// `reason` to the upstream; the upstream answers it, as RFC 6455 asks, and
/// the filter turns that answer into its own Close towards the client (a
/// proxy-wasm callback can only write to its own direction). Expects the
/// Close at both ends and exactly the allowed messages at the upstream.
async fn assert_closes_both_ends(s: &Setup, allowed: &[&str], over: &str, code: u16, reason: &str) {
    let path = "/ws";
    let mut raw = s.raw(path).await;
    for text in allowed {
        raw.send_frame(true, opcode::TEXT, text.as_bytes(), usize::MAX)
            .await
            .unwrap();
        let (echo, _) = read_data(&mut raw, &format!("echo of {text:?}")).await;
        assert_eq!(echo.text(), *text, "echo of {text:?}: {echo:?}");
    }
    raw.send_frame(true, opcode::TEXT, over.as_bytes(), usize::MAX)
        .await
        .unwrap();
    // Both ends at once: report what each saw.
    let (client, upstream) = tokio::join!(raw.read_frame(), s.upstream_close(path, code, reason));
    let client_closed = matches!(&client, Ok(f) if f.close() == Some((code, reason.to_owned())));
    assert!(
        client_closed && upstream.is_ok(),
        "after {over:?}: expected Close {code} {reason:?} at both ends;\n  client got: {client:?}\n  upstream: {upstream:?}"
    );
    assert_eq!(s.upstream.texts(path), allowed, "messages at the upstream");
}

/// A `messages` rule: the 4th client message gets Close 1008 to the client
/// and to the upstream, which never sees that message.
#[tokio::test]
async fn messages_rule_closes_both_ends_with_1008() {
    let s = setup(
        "ws_messages_rule_closes_both_ends_with_1008",
        json!([ws_rule(
            "ws-msgs",
            "messages",
            json!({"count": 3, "per": "1h"}),
            json!({"direction": "client"})
        )]),
    )
    .await;
    assert_closes_both_ends(&s, &["m1", "m2", "m3"], "m4", 1008, "rate limited: ws-msgs").await;
    assert_eq!(
        s.counter("ws-msgs", "limited", 1).await,
        1,
        "limited messages"
    );
}

/// Large messages reach Envoy in many body chunks each way, most of them
/// payload alone, which the filter passes on unread: every message is still
/// counted once, whatever the chunks (three echoes are six messages), and
/// the seventh closes both ends.
#[tokio::test]
async fn large_messages_over_many_chunks_are_counted_exactly() {
    let s = setup(
        "ws_large_messages_over_many_chunks",
        json!([ws_rule(
            "ws-msgs",
            "messages",
            json!({"count": 6, "per": "1h"}),
            json!({})
        )]),
    )
    .await;
    let large: Vec<String> = ["a", "b", "c", "d"]
        .iter()
        .map(|c| c.repeat(200_000))
        .collect();
    let allowed: Vec<&str> = large.iter().take(3).map(String::as_str).collect();
    assert_closes_both_ends(&s, &allowed, &large[3], 1008, "rate limited: ws-msgs").await;
    assert_eq!(
        s.counter("ws-msgs", "allowed", 6).await,
        6,
        "allowed messages"
    );
    assert_eq!(
        s.counter("ws-msgs", "limited", 1).await,
        1,
        "limited messages"
    );
}

/// The same through tungstenite on both sides: the client sees the Close
/// and the connection ends (the client answers the Close, as RFC 6455 asks).
#[tokio::test]
async fn messages_rule_ends_a_library_client_connection() {
    let s = setup(
        "ws_messages_rule_ends_a_library_client_connection",
        json!([ws_rule(
            "ws-msgs",
            "messages",
            json!({"count": 3, "per": "1h"}),
            json!({"direction": "client"})
        )]),
    )
    .await;
    let mut ws = s.upgrade("/ws").await.open("connection");
    for n in 1..=3 {
        send_echoed(&mut ws, &format!("m{n}"), "within the limit").await;
    }
    send_closed(&mut ws, "m4", 1008, "rate limited: ws-msgs", "message 4").await;
    s.upstream_close("/ws", 1008, "rate limited: ws-msgs")
        .await
        .unwrap();
    s.upstream_idle().await;
}

/// A `messages` rule on the `server` direction counts the upstream's
/// messages: the 3rd echo is replaced by Close 1008 to the client, while
/// the client's 3rd message (not counted) reaches the upstream. The upstream
/// never answers Closes; the client answers the filter's Close (with a
/// different code, to show the filter replaces it), and the filter sends
/// its own Close 1008 upstream in its place.
#[tokio::test]
async fn server_direction_counts_upstream_messages() {
    let s = setup(
        "ws_server_direction_counts_upstream_messages",
        json!([ws_rule(
            "ws-down",
            "messages",
            json!({"count": 2, "per": "1h"}),
            json!({"direction": "server"})
        )]),
    )
    .await;
    let mut raw = s.raw(QUIET_PATH).await;
    for text in ["m1", "m2"] {
        raw.send_frame(true, opcode::TEXT, text.as_bytes(), usize::MAX)
            .await
            .unwrap();
        let (echo, _) = read_data(&mut raw, &format!("echo of {text}")).await;
        assert_eq!(echo.text(), text, "echo of {text}: {echo:?}");
    }
    raw.send_frame(true, opcode::TEXT, b"m3", usize::MAX)
        .await
        .unwrap();
    let client = raw.read_frame().await;
    let client_closed =
        matches!(&client, Ok(f) if f.close() == Some((1008, "rate limited: ws-down".to_owned())));
    assert!(
        client_closed,
        "instead of echo 3: expected Close 1008 at the client, got {client:?}"
    );
    raw.send_frame(true, opcode::CLOSE, &1000u16.to_be_bytes(), usize::MAX)
        .await
        .unwrap();
    s.upstream_close(QUIET_PATH, 1008, "rate limited: ws-down")
        .await
        .unwrap();
    wait::until("m3 at the upstream", UPSTREAM_TIMEOUT, || async {
        let texts = s.upstream.texts(QUIET_PATH);
        if texts == ["m1", "m2", "m3"] {
            Ok(())
        } else {
            Err(format!("{texts:?}"))
        }
    })
    .await
    .unwrap();
}

/// A `bytes` rule: the frame that takes the payload past 10 bytes closes
/// with 1008.
#[tokio::test]
async fn bytes_rule_closes_with_1008() {
    let s = setup(
        "ws_bytes_rule_closes_with_1008",
        json!([ws_rule(
            "ws-bytes",
            "bytes",
            json!({"count": 10, "per": "1h"}),
            json!({"direction": "client"})
        )]),
    )
    .await;
    assert_closes_both_ends(&s, &["hello", "world"], "!", 1008, "rate limited: ws-bytes").await;
}

/// A `message_size` rule: a message over 8 bytes closes with 1009.
#[tokio::test]
async fn message_size_rule_closes_with_1009() {
    let s = setup(
        "ws_message_size_rule_closes_with_1009",
        json!([ws_rule(
            "ws-size",
            "message_size",
            json!({"count": 8}),
            json!({"direction": "client"})
        )]),
    )
    .await;
    assert_closes_both_ends(
        &s,
        &["12345678"],
        "123456789",
        1009,
        "message too big: ws-size",
    )
    .await;
}

/// `drop`: over-limit messages never reach the upstream and the connection
/// stays open: a ping sent after each is answered by the upstream, which by
/// then has seen everything sent before it.
#[tokio::test]
async fn drop_action_discards_and_keeps_the_connection() {
    let s = setup(
        "ws_drop_action_discards_and_keeps_the_connection",
        json!([ws_rule(
            "ws-drop",
            "messages",
            json!({"count": 2, "per": "1h"}),
            json!({"direction": "client", "action": "drop"})
        )]),
    )
    .await;
    let mut ws = s.upgrade("/ws").await.open("connection");
    send_echoed(&mut ws, "m1", "message 1").await;
    send_echoed(&mut ws, "m2", "message 2").await;
    for n in 3..=4 {
        ws.send(Message::text(format!("m{n}"))).await.unwrap();
        let ping = format!("alive after m{n}");
        ws.send(Message::Ping(ping.clone().into())).await.unwrap();
        let got = next_message(&mut ws).await;
        assert!(
            matches!(&got, Ok(Message::Pong(p)) if p.as_ref() == ping.as_bytes()),
            "after the dropped m{n}: expected the pong {ping:?}, got {got:?}"
        );
    }
    assert_eq!(
        s.upstream.texts("/ws"),
        ["m1", "m2"],
        "messages at the upstream"
    );
    assert!(
        s.upstream.closes().is_empty(),
        "closes at the upstream: {:?}",
        s.upstream.closes()
    );
    assert_eq!(
        s.counter("ws-drop", "dropped", 2).await,
        2,
        "dropped messages"
    );
}

/// Rooms keyed on `path_segment:1`: room a and room b each have 2 messages.
#[tokio::test]
async fn rooms_have_separate_budgets() {
    let s = setup(
        "ws_rooms_have_separate_budgets",
        json!([{"name": "room-msgs", "match": {"websocket": true, "path": {"glob": "/room/*"}},
            "key": ["path_segment:1"], "counts": "messages", "direction": "client",
            "limit": {"count": 2, "per": "1h"}}]),
    )
    .await;
    let mut a = s.upgrade("/room/a").await.open("room a");
    let mut b = s.upgrade("/room/b").await.open("room b");
    send_echoed(&mut a, "a1", "room a").await;
    send_echoed(&mut a, "a2", "room a").await;
    send_echoed(&mut b, "b1", "room b, after room a used its budget").await;
    send_echoed(&mut b, "b2", "room b").await;
    send_closed(
        &mut a,
        "a3",
        1008,
        "rate limited: room-msgs",
        "room a, message 3",
    )
    .await;
    send_closed(
        &mut b,
        "b3",
        1008,
        "rate limited: room-msgs",
        "room b, message 3",
    )
    .await;
    // Another member of room a shares its (spent) budget.
    let mut a2 = s.upgrade("/room/a").await.open("room a, second member");
    send_closed(
        &mut a2,
        "a4",
        1008,
        "rate limited: room-msgs",
        "room a, second member",
    )
    .await;
    assert_eq!(s.upstream.texts("/room/a"), ["a1", "a2"]);
    assert_eq!(s.upstream.texts("/room/b"), ["b1", "b2"]);
}

/// Reads frames until a data frame, returning it and the pongs before it.
async fn read_data(raw: &mut RawWs, what: &str) -> (Frame, Vec<String>) {
    let mut pongs = Vec::new();
    loop {
        let frame = raw
            .read_frame()
            .await
            .unwrap_or_else(|e| panic!("{what}: {e:#}"));
        if frame.opcode == opcode::PONG {
            pongs.push(frame.text());
        } else {
            return (frame, pongs);
        }
    }
}

/// Expects a Close frame with `code` and `reason` next (pongs skipped).
async fn expect_raw_close(raw: &mut RawWs, code: u16, reason: &str, what: &str) {
    let (frame, _) = read_data(raw, what).await;
    assert_eq!(
        frame.close(),
        Some((code, reason.to_owned())),
        "{what}: expected Close {code} {reason:?}, got {frame:?}"
    );
}

/// Frames written in arbitrary TCP chunks (byte by byte; 7- 16- and 64-bit
/// lengths) are counted exactly: 3 messages pass, the 4th closes.
#[tokio::test]
async fn frames_split_across_tcp_writes_are_counted_exactly() {
    let s = setup(
        "ws_frames_split_across_tcp_writes_are_counted_exactly",
        json!([ws_rule(
            "ws-msgs",
            "messages",
            json!({"count": 3, "per": "1h"}),
            json!({"direction": "client"})
        )]),
    )
    .await;
    let mut raw = s.raw("/ws").await;
    let payloads: [(Vec<u8>, usize); 3] = [
        (b"tiny".to_vec(), 1),
        (vec![b'm'; 300], 1),
        (vec![b'l'; 70_000], 3),
    ];
    for (payload, chunk) in &payloads {
        let what = format!("a {}-byte frame in {chunk}-byte writes", payload.len());
        raw.send_frame(true, opcode::BINARY, payload, *chunk)
            .await
            .unwrap();
        let (echo, _) = read_data(&mut raw, &what).await;
        assert!(
            echo.opcode == opcode::BINARY && echo.payload == *payload,
            "{what}: echo {} bytes, opcode {}",
            echo.payload.len(),
            echo.opcode
        );
    }
    raw.send_frame(true, opcode::TEXT, b"over", 1)
        .await
        .unwrap();
    expect_raw_close(
        &mut raw,
        1008,
        "rate limited: ws-msgs",
        "message 4, byte by byte",
    )
    .await;
    s.upstream_close("/ws", 1008, "rate limited: ws-msgs")
        .await
        .unwrap();
    let sizes: Vec<usize> = s
        .upstream
        .messages()
        .iter()
        .map(|m| m.payload.len())
        .collect();
    assert_eq!(sizes, [4, 300, 70_000], "message sizes at the upstream");
}

/// A masked client frame of `payload` (under 126 bytes) whose length is
/// written in the 16-bit form, which RFC 6455 asks senders not to do and
/// common servers accept.
fn long_form_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let short = ws_frame::encode(true, opcode, payload, Some([9, 8, 7, 6]));
    let len = u16::try_from(payload.len()).unwrap();
    [&[short[0], 0x80 | 126][..], &len.to_be_bytes(), &short[2..]].concat()
}

/// A frame with its length in a longer form than needed is counted like
/// any other: over a budget of 1, the next message closes the connection
/// instead of 100 messages passing uncounted.
#[tokio::test]
async fn non_minimal_lengths_are_counted() {
    let s = setup(
        "ws_non_minimal_lengths_are_counted",
        json!([ws_rule(
            "ws-msgs",
            "messages",
            json!({"count": 1, "per": "1h"}),
            json!({"direction": "client"})
        )]),
    )
    .await;
    let mut raw = s.raw("/ws").await;
    let mut bytes = long_form_frame(opcode::TEXT, b"first");
    for i in 0..100 {
        bytes.extend(ws_frame::encode(
            true,
            opcode::TEXT,
            format!("more {i}").as_bytes(),
            Some([1, 2, 3, 4]),
        ));
    }
    raw.send_bytes(&bytes).await.unwrap();
    // The upstream's echo of "first" races the filter's Close, which takes
    // the place of the upstream's next chunk: only the Close is sure.
    expect_raw_close(&mut raw, 1008, "rate limited: ws-msgs", "message 2").await;
    s.upstream_close("/ws", 1008, "rate limited: ws-msgs")
        .await
        .unwrap();
    assert_eq!(
        s.upstream.texts("/ws"),
        ["first"],
        "messages at the upstream"
    );
}

/// Where a size rule took the permessage-deflate offer out, a compressed
/// message (RSV1) sent anyway closes both ends with 1008; a frame that
/// breaks the framing closes them with 1002. Nothing after either passes.
#[tokio::test]
async fn compressed_and_malformed_frames_close_the_connection() {
    let s = setup(
        "ws_compressed_and_malformed_frames_close_the_connection",
        json!([ws_rule(
            "ws-size",
            "message_size",
            json!({"count": 1024}),
            json!({"direction": "client"})
        )]),
    )
    .await;
    let key = Some([1, 2, 3, 4]);
    let mut compressed = ws_frame::encode(true, opcode::TEXT, b"zzz", key);
    compressed[0] |= 0x40;
    // Opcode 0x3 is reserved.
    let malformed = ws_frame::encode(true, 0x3, b"yyy", key);
    let cases = [
        (compressed, 1008, "compressed message refused: ws-size"),
        (
            malformed,
            1002,
            "malformed frame: unknown WebSocket opcode 0x3",
        ),
    ];
    for (bad, code, reason) in cases {
        let mut raw = s.raw("/ws").await;
        raw.send_frames(&[(true, opcode::TEXT, b"before")])
            .await
            .unwrap();
        let (echo, _) = read_data(&mut raw, reason).await;
        assert_eq!(echo.text(), "before", "{reason}: echo");
        let after = ws_frame::encode(true, opcode::TEXT, b"after", key);
        raw.send_bytes(&[bad, after].concat()).await.unwrap();
        expect_raw_close(&mut raw, code, reason, reason).await;
        s.upstream_close("/ws", code, reason).await.unwrap();
    }
    assert_eq!(
        s.upstream.texts("/ws"),
        ["before", "before"],
        "messages at the upstream"
    );
    assert_eq!(
        s.counter("ws-size", "limited", 1).await,
        1,
        "limited messages"
    );
}

/// A message in three fragments with pings between them counts once: two
/// such messages pass a limit of 2, the next message closes.
#[tokio::test]
async fn fragmented_messages_with_pings_count_once() {
    let s = setup(
        "ws_fragmented_messages_with_pings_count_once",
        json!([ws_rule(
            "ws-msgs",
            "messages",
            json!({"count": 2, "per": "1h"}),
            json!({"direction": "client"})
        )]),
    )
    .await;
    let mut raw = s.raw("/ws").await;
    for n in 1..=2 {
        let what = format!("fragmented message {n}");
        raw.send_frame(false, opcode::TEXT, b"hel", 2)
            .await
            .unwrap();
        raw.send_frame(true, opcode::PING, format!("p{n}a").as_bytes(), 2)
            .await
            .unwrap();
        raw.send_frame(false, opcode::CONTINUATION, b"lo ", 2)
            .await
            .unwrap();
        raw.send_frame(true, opcode::PING, format!("p{n}b").as_bytes(), 2)
            .await
            .unwrap();
        raw.send_frame(
            true,
            opcode::CONTINUATION,
            format!("world {n}").as_bytes(),
            2,
        )
        .await
        .unwrap();
        let (echo, pongs) = read_data(&mut raw, &what).await;
        assert_eq!(
            (echo.opcode, echo.text()),
            (opcode::TEXT, format!("hello world {n}")),
            "{what}: echo"
        );
        assert_eq!(pongs, [format!("p{n}a"), format!("p{n}b")], "{what}: pongs");
    }
    raw.send_frame(true, opcode::TEXT, b"third", 2)
        .await
        .unwrap();
    expect_raw_close(&mut raw, 1008, "rate limited: ws-msgs", "message 3").await;
    assert_eq!(s.upstream.texts("/ws"), ["hello world 1", "hello world 2"]);
}

/// A `drop` size rule and a message over it whose fragments all arrive in
/// one write: none of it was passed on when the verdict came, so the whole
/// message is dropped and the connection stays open.
#[tokio::test]
async fn fragmented_message_in_one_write_is_dropped_whole() {
    let s = setup(
        "ws_fragmented_message_in_one_write_is_dropped_whole",
        json!([ws_rule(
            "ws-size",
            "message_size",
            json!({"count": 8}),
            json!({"direction": "client", "action": "drop"})
        )]),
    )
    .await;
    let mut raw = s.raw("/ws").await;
    // 5 bytes pass the bound, the second fragment makes 10.
    raw.send_frames(&[
        (false, opcode::TEXT, b"abcde"),
        (true, opcode::PING, b"between"),
        (true, opcode::CONTINUATION, b"fghij"),
    ])
    .await
    .unwrap();
    raw.send_frame(true, opcode::TEXT, b"next", 64)
        .await
        .unwrap();
    let (echo, pongs) = read_data(&mut raw, "after the dropped message").await;
    assert_eq!(
        (echo.opcode, echo.text()),
        (opcode::TEXT, "next".to_owned()),
        "the message after the dropped one: expected its echo, got {echo:?}"
    );
    assert_eq!(pongs, ["between"], "the ping inside the dropped message");
    assert_eq!(
        s.upstream.texts("/ws"),
        ["next"],
        "messages at the upstream"
    );
    assert!(
        s.upstream.closes().is_empty(),
        "closes at the upstream: {:?}",
        s.upstream.closes()
    );
    assert_eq!(s.counter("ws-size", "dropped", 1).await, 1, "stat dropped");
    assert_eq!(s.counter("ws-size", "limited", 0).await, 0, "stat limited");
}

/// Reads frames until a pong, which proves everything written before its
/// ping went through the filter and the upstream.
async fn read_pong(raw: &mut RawWs, what: &str) -> String {
    loop {
        let frame = raw
            .read_frame()
            .await
            .unwrap_or_else(|e| panic!("{what}: {e:#}"));
        assert_ne!(frame.opcode, opcode::CLOSE, "{what}: closed: {frame:?}");
        if frame.opcode == opcode::PONG {
            return frame.text();
        }
    }
}

/// Every message counts exactly once per rule, under what happened to it
/// (README.md, "Metrics"): a size rule counts what it allows; a message
/// its `drop` rule discards is `dropped`; a message it cannot drop because
/// part of it was already passed on closes the connection and is
/// `limited`, as is every message the closed direction discards after it.
#[tokio::test]
async fn stream_outcomes_are_counted_once_each() {
    let s = setup(
        "ws_stream_outcomes_are_counted_once_each",
        json!([
            ws_rule(
                "sz-drop",
                "message_size",
                json!({"count": 8}),
                json!({"direction": "client", "action": "drop",
                    "match": {"websocket": true, "path": {"prefix": "/ws"}}})
            ),
            ws_rule(
                "sz-close",
                "message_size",
                json!({"count": 8}),
                json!({"direction": "client",
                    "match": {"websocket": true, "path": {"prefix": "/room/"}}})
            ),
        ]),
    )
    .await;

    // The drop rule: two messages pass, one is dropped, one passes, and
    // one that grows past the bound after its first fragment went through
    // closes the connection.
    let mut raw = s.raw("/ws").await;
    for text in ["m1", "m2"] {
        raw.send_frame(true, opcode::TEXT, text.as_bytes(), 64)
            .await
            .unwrap();
        let (echo, _) = read_data(&mut raw, text).await;
        assert_eq!(echo.text(), text);
    }
    raw.send_frame(true, opcode::TEXT, b"0123456789", 64)
        .await
        .unwrap();
    raw.send_frame(true, opcode::TEXT, b"m3", 64).await.unwrap();
    let (echo, _) = read_data(&mut raw, "m3, after a dropped message").await;
    assert_eq!(echo.text(), "m3");
    raw.send_frame(false, opcode::TEXT, b"abcde", 64)
        .await
        .unwrap();
    raw.send_frame(true, opcode::PING, b"passed", 64)
        .await
        .unwrap();
    assert_eq!(read_pong(&mut raw, "first fragment").await, "passed");
    raw.send_frame(true, opcode::CONTINUATION, b"fghij", 64)
        .await
        .unwrap();
    expect_raw_close(
        &mut raw,
        1009,
        "message too big: sz-drop",
        "second fragment",
    )
    .await;
    s.upstream_close("/ws", 1009, "message too big: sz-drop")
        .await
        .unwrap();

    // The closing rule: one message passes; of two over the bound in one
    // write, the first closes and the second is discarded with it.
    let mut raw = s.raw("/room/r").await;
    raw.send_frame(true, opcode::TEXT, b"ok", 64).await.unwrap();
    let (echo, _) = read_data(&mut raw, "ok").await;
    assert_eq!(echo.text(), "ok");
    raw.send_frames(&[
        (true, opcode::TEXT, b"too big #1"),
        (true, opcode::TEXT, b"too big #2"),
    ])
    .await
    .unwrap();
    expect_raw_close(&mut raw, 1009, "message too big: sz-close", "two too big").await;

    let expected = [
        ("sz-drop", "allowed", 3),
        ("sz-drop", "dropped", 1),
        ("sz-drop", "limited", 1),
        ("sz-close", "allowed", 1),
        ("sz-close", "dropped", 0),
        ("sz-close", "limited", 2),
    ];
    let mut counts = Vec::new();
    for (rule, outcome, n) in expected {
        counts.push((rule, outcome, s.counter(rule, outcome, n).await));
    }
    assert_eq!(counts, expected);
}

/// Envoy (two workers) in front of the `websockets` echo server, which
/// negotiates permessage-deflate as browsers' servers do.
async fn deflate_setup(test: &str, rules: Value) -> (PyServer, Envoy) {
    let upstream = PyServer::start("ws_echo_server.py")
        .await
        .expect("starting the websockets echo server");
    let envoy = with_upstreams(Envoy::builder(test), None, Some(upstream.port()))
        .concurrency(2)
        .sluice(&json!({"rules": rules}))
        .start()
        .await
        .unwrap_or_else(|e| panic!("starting Envoy with the Sluice filter: {e:#}"));
    (upstream, envoy)
}

/// The `websockets` client (permessage-deflate offered) on `path`.
async fn deflate_client(envoy: &Envoy, path: &str, count: u64, size: u64) -> Value {
    let args = json!({"url": format!("ws://{}{path}", envoy.addr()), "count": count, "size": size});
    py_client::run("ws_client.py", &args)
        .await
        .unwrap_or_else(|e| panic!("websockets client: {e:#}"))
}

/// The sizes of the messages the echo server received.
fn upstream_messages(upstream: &PyServer) -> Vec<u64> {
    upstream
        .events()
        .iter()
        .filter_map(|e| e["message"].as_u64())
        .collect()
}

/// A `message_size` rule of 1024 bytes against a client and a server that
/// both speak permessage-deflate: the offer is taken out of the upgrade, so
/// the 100,000-byte message travels as it is and is closed with 1009. A
/// path with only a `messages` rule keeps compression.
#[tokio::test]
async fn message_size_applies_to_compressing_clients() {
    let (upstream, envoy) = deflate_setup(
        "ws_message_size_applies_to_compressing_clients",
        json!([
            {"name": "ws-size", "match": {"websocket": true, "path": {"exact": "/ws"}},
             "counts": "message_size", "direction": "client", "limit": {"count": 1024}},
            {"name": "room-msgs", "match": {"websocket": true, "path": {"glob": "/room/*"}},
             "counts": "messages", "limit": {"count": 100, "per": "1h"}}
        ]),
    )
    .await;
    let report = deflate_client(&envoy, "/ws", 1, 100_000).await;
    assert_eq!(report["extensions"], Value::Null, "negotiated: {report}");
    assert_eq!(
        (report["close"].as_u64(), report["reason"].as_str()),
        (Some(1009), Some("message too big: ws-size")),
        "a 100,000-byte message: {report}"
    );
    let room = deflate_client(&envoy, "/room/a", 2, 100_000).await;
    assert!(
        room["extensions"]
            .as_str()
            .is_some_and(|e| e.starts_with("permessage-deflate")),
        "a messages rule keeps compression: {room}"
    );
    assert_eq!(room["echoes"], 2, "room: {room}");
    assert_eq!(
        upstream_messages(&upstream),
        [100_002, 100_002],
        "messages at the upstream: only the room's"
    );
}

/// A `bytes` rule of 2,000 bytes a minute: ten 10,000-byte messages from a
/// compressing client. The first already exceeds it: Close 1008, nothing
/// reaches the upstream.
#[tokio::test]
async fn bytes_rule_applies_to_compressing_clients() {
    let (upstream, envoy) = deflate_setup(
        "ws_bytes_rule_applies_to_compressing_clients",
        json!([ws_rule(
            "ws-bytes",
            "bytes",
            json!({"count": 2000, "per": "1m"}),
            json!({"direction": "client"})
        )]),
    )
    .await;
    let report = deflate_client(&envoy, "/ws", 10, 10_000).await;
    assert_eq!(
        (
            report["echoes"].as_u64(),
            report["close"].as_u64(),
            report["reason"].as_str()
        ),
        (Some(0), Some(1008), Some("rate limited: ws-bytes")),
        "ten 10,000-byte messages: {report}"
    );
    assert_eq!(upstream_messages(&upstream), Vec::<u64>::new());
}

/// `match.websocket: false` is not a condition: Envoy refuses the
/// configuration instead of applying the rule to every upgrade.
#[tokio::test]
async fn websocket_false_is_refused_at_startup() {
    let upstream = WsUpstream::start()
        .await
        .expect("starting the WebSocket upstream");
    let started = with_upstreams(
        Envoy::builder("ws_websocket_false_is_refused_at_startup"),
        None,
        Some(upstream.port()),
    )
    .sluice(&json!({"rules": [ws_rule("not-ws", "requests",
        json!({"count": 1, "per": "1h"}), json!({"match": {"websocket": false}}))]}))
    .start()
    .await;
    assert!(
        started.is_err(),
        "Envoy took a rule with match.websocket: false"
    );
}
