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

/// A host that answers like Envoy for `GET /direct` from 127.0.0.1 (or,
/// when `grpc`, a unary call of `/user.UserService/GetUser` whose
/// messages are [`GRPC_MESSAGE`]) and does nothing else; its clock moves a
/// microsecond per reading.
struct Bare {
    now: Cell<u64>,
    grpc: bool,
}

/// One gRPC message: flag 0, length 2, then field 1 (varint) = 1.
const GRPC_MESSAGE: &[u8] = &[0, 0, 0, 0, 2, 0x08, 0x01];

impl Host for Bare {
    fn now(&self) -> Nanos {
        let n = self.now.get().wrapping_add(1000);
        self.now.set(n);
        Nanos(n)
    }
    fn request_header(&self, name: &str) -> Option<String> {
        match (name, self.grpc) {
            (":path", false) => Some("/direct".into()),
            (":method", false) => Some("GET".into()),
            (":path", true) => Some("/user.UserService/GetUser".into()),
            (":method", true) => Some("POST".into()),
            ("content-type", true) => Some("application/grpc".into()),
            _ => None,
        }
    }
    fn set_request_header(&self, _: &str, _: &str) {}
    fn remove_request_header(&self, _: &str) {}
    fn response_header(&self, name: &str) -> Option<String> {
        (name == ":status").then(|| "200".into())
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
    fn body(&self, _: Direction, _: usize) -> Option<Vec<u8>> {
        self.grpc.then(|| GRPC_MESSAGE.to_vec())
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
    if host.grpc {
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

/// `SLUICE_COST_REQUESTS` requests (default 1000) under the
/// `SLUICE_COST_CONFIG` policy (default: `make bench-filter`'s one per-IP
/// rule with the default headers); gRPC unary calls when
/// `SLUICE_COST_GRPC` is set.
#[test]
#[ignore = "a harness for callgrind: make filter-instructions"]
fn request_cost() -> Result<(), String> {
    let n: u32 = std::env::var("SLUICE_COST_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let config = std::env::var("SLUICE_COST_CONFIG").unwrap_or_else(|_| {
        r#"{"rules":[{"name":"bench-per-ip","key":["client_ip"],"limit":{"count":1000000000,"per":"1s"},"algorithm":"token_bucket"}]}"#.into()
    });
    let host = Bare {
        now: Cell::new(1_800_000_000_000_000_000),
        grpc: std::env::var_os("SLUICE_COST_GRPC").is_some(),
    };
    let shared = InProcessShared::default();
    let mut p = Plugin::configure(&host, &shared, config.as_bytes()).map_err(|e| e.to_string())?;
    for id in 1..=n {
        one_request(&mut p, &host, id);
    }
    Ok(())
}
