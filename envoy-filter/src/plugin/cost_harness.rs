//! The instructions a request costs the filter's own code, counted
//! natively: `make filter-instructions` runs this harness under callgrind
//! with two request counts, so setup cancels out and what is left is per
//! request, repeatable on a loaded machine where timings are not. The host
//! answers from constants and its setters do nothing, so only Sluice's
//! code (and the in-process stand-in for Envoy's shared data) is counted.

use std::cell::Cell;

use sluice_core::policy::Direction;
use sluice_core::store::InProcessShared;
use sluice_core::time::{Nanos, Span};

use super::*;
use crate::host::MetricId;

/// What the harness's requests are.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `GET /direct`.
    Http,
    /// Unary calls of `/user.UserService/GetUser` whose messages are
    /// [`GRPC_MESSAGE`].
    Grpc,
    /// Messages echoed on one WebSocket connection to `/ws`: a 64-byte
    /// text frame each way ([`WS_CLIENT_FRAME`], [`WS_SERVER_FRAME`]).
    WebSocket,
}

/// A host that answers like Envoy for a request of `kind` from 127.0.0.1
/// and does nothing else; its clock moves a microsecond per reading.
struct Bare {
    now: Cell<u64>,
    kind: Kind,
}

/// One gRPC message: flag 0, length 2, then field 1 (varint) = 1.
const GRPC_MESSAGE: &[u8] = &[0, 0, 0, 0, 2, 0x08, 0x01];

/// A masked client text frame of 64 bytes (as `make bench-filter` sends).
const WS_CLIENT_FRAME: &[u8] = &{
    let mut f = [b'm'; 70];
    f[0] = 0x81;
    f[1] = 0x80 | 64;
    // A zero mask leaves the payload as it is.
    f[2] = 0;
    f[3] = 0;
    f[4] = 0;
    f[5] = 0;
    f
};
/// The server's unmasked echo.
const WS_SERVER_FRAME: &[u8] = &{
    let mut f = [b'm'; 66];
    f[0] = 0x81;
    f[1] = 64;
    f
};

impl Host for Bare {
    fn now(&self) -> Nanos {
        let n = self.now.get().wrapping_add(1000);
        self.now.set(n);
        Nanos(n)
    }
    fn request_header(&self, name: &str) -> Option<String> {
        match (name, self.kind) {
            (":path", Kind::Http) => Some("/direct".into()),
            (":method", Kind::Http | Kind::WebSocket) => Some("GET".into()),
            (":path", Kind::Grpc) => Some("/user.UserService/GetUser".into()),
            (":method", Kind::Grpc) => Some("POST".into()),
            ("content-type", Kind::Grpc) => Some("application/grpc".into()),
            (":path", Kind::WebSocket) => Some("/ws".into()),
            ("upgrade", Kind::WebSocket) => Some("websocket".into()),
            _ => None,
        }
    }
    fn set_request_header(&self, _: &str, _: &str) {}
    fn remove_request_header(&self, _: &str) {}
    fn response_header(&self, name: &str) -> Option<String> {
        let status = if self.kind == Kind::WebSocket {
            "101"
        } else {
            "200"
        };
        (name == ":status").then(|| status.into())
    }
    #[inline(never)]
    fn set_response_header(&self, name: &str, value: &str) {
        std::hint::black_box((name, value));
    }
    fn peer_address(&self) -> Option<String> {
        Some("127.0.0.1:41234".into())
    }
    fn response_trailer(&self, _: &str) -> Option<String> {
        None
    }
    fn set_response_trailer(&self, _: &str, _: &str) {}
    fn body(&self, direction: Direction, _: usize) -> Option<Vec<u8>> {
        match (self.kind, direction) {
            (Kind::Http, _) => None,
            (Kind::Grpc, _) => Some(GRPC_MESSAGE.to_vec()),
            (Kind::WebSocket, Direction::Client) => Some(WS_CLIENT_FRAME.to_vec()),
            (Kind::WebSocket, Direction::Server) => Some(WS_SERVER_FRAME.to_vec()),
        }
    }
    fn set_body(&self, _: Direction, _: usize, _: &[u8]) {}
    fn set_tick_millis(&self, _: u32) {}
    fn define_counter(&self, _: &str) -> Option<MetricId> {
        Some(MetricId(1))
    }
    fn define_gauge(&self, _: &str) -> Option<MetricId> {
        Some(MetricId(2))
    }
    fn increment(&self, m: MetricId, by: u64) {
        std::hint::black_box((m, by));
    }
    fn add_to_gauge(&self, _: MetricId, _: i64) {}
    fn warn(&self, _: &str) {}
    fn random_u64(&self) -> Option<u64> {
        Some(7)
    }
    fn grpc_call(&self, _: &str, _: &str, _: &str, _: &[u8], _: Span) -> Option<u32> {
        None
    }
    fn enqueue(&self, _: &str, _: &[u8]) -> bool {
        false
    }
    fn register_queue(&self, _: &str) -> Option<u32> {
        None
    }
    fn dequeue(&self, _: u32) -> Option<Vec<u8>> {
        None
    }
    fn node_id(&self) -> Option<String> {
        None
    }
}

/// One allowed request's callbacks, as Envoy makes them.
#[inline(never)]
fn one_request<B: SharedBytes>(p: &mut Plugin<B>, host: &Bare, id: u32) {
    let _ = std::hint::black_box(p.on_request_headers(host, id));
    if host.kind == Kind::Grpc {
        let size = GRPC_MESSAGE.len();
        let _ = p.on_body(host, id, Direction::Client, size, true);
        p.on_response_headers(host, id);
        let _ = p.on_body(host, id, Direction::Server, size, false);
        p.on_response_trailers(host, id);
    } else {
        p.on_response_headers(host, id);
        let _ = p.on_body(host, id, Direction::Server, 2, true);
    }
    p.on_done(host, id);
}

/// One message echoed on the upgraded connection `id`, as Envoy makes
/// its callbacks.
#[inline(never)]
fn one_echo<B: SharedBytes>(p: &mut Plugin<B>, host: &Bare, id: u32) {
    let client = p.on_body(host, id, Direction::Client, WS_CLIENT_FRAME.len(), false);
    let server = p.on_body(host, id, Direction::Server, WS_SERVER_FRAME.len(), false);
    std::hint::black_box((client, server));
}

/// `SLUICE_COST_REQUESTS` requests (default 1000) under the
/// `SLUICE_COST_CONFIG` policy (default: `make bench-filter`'s one per-IP
/// rule with the default headers); gRPC unary calls when
/// `SLUICE_COST_GRPC` is set, messages echoed on one WebSocket connection
/// when `SLUICE_COST_WS` is (then the policy defaults to `make
/// bench-filter`'s WebSocket rules).
#[test]
#[ignore = "a harness for callgrind: make filter-instructions"]
fn request_cost() -> Result<(), String> {
    let n: u32 = std::env::var("SLUICE_COST_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let kind = if std::env::var_os("SLUICE_COST_WS").is_some() {
        Kind::WebSocket
    } else if std::env::var_os("SLUICE_COST_GRPC").is_some() {
        Kind::Grpc
    } else {
        Kind::Http
    };
    let default_config = match kind {
        Kind::WebSocket => {
            r#"{"rules":[{"name":"bench-ws-msgs","match":{"websocket":true},"counts":"messages","limit":{"count":1000000000,"per":"1s"},"algorithm":"token_bucket"},{"name":"bench-ws-bytes","match":{"websocket":true},"counts":"bytes","limit":{"count":1000000000,"per":"1s"},"algorithm":"token_bucket"}]}"#
        }
        _ => {
            r#"{"rules":[{"name":"bench-per-ip","key":["client_ip"],"limit":{"count":1000000000,"per":"1s"},"algorithm":"token_bucket"}]}"#
        }
    };
    let config = std::env::var("SLUICE_COST_CONFIG").unwrap_or_else(|_| default_config.into());
    let host = Bare {
        now: Cell::new(1_800_000_000_000_000_000),
        kind,
    };
    let shared = InProcessShared::default();
    let mut p = Plugin::configure(&host, &shared, config.as_bytes()).map_err(|e| e.to_string())?;
    if kind == Kind::WebSocket {
        let _ = p.on_request_headers(&host, 1);
        p.on_response_headers(&host, 1);
        for _ in 0..n {
            one_echo(&mut p, &host, 1);
        }
        return Ok(());
    }
    for id in 1..=n {
        one_request(&mut p, &host, id);
    }
    Ok(())
}
