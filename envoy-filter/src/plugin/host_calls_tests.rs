//! The host calls a request makes: each is a crossing between the VM and
//! Envoy (and one that returns bytes also calls back into the VM for
//! memory), so the hot paths make only those they need. The common paths'
//! host calls and heap allocations are pinned here: a change that adds one
//! shows.

use std::cell::RefCell;
use std::collections::BTreeMap;

use sluice_core::store::{InProcessShared, StoreError, WriteOutcome};
use sluice_core::time::Span;
use sluice_proto::prost::Message;
use sluice_proto::quota::v1::{CheckResponse, Code, GroupResult, ItemResult, Source};

use super::*;
use crate::host::fake::FakeHost;
use crate::host::MetricId;
use sluice_alloc_count::{allocations, uncounted};
use sluice_core::policy::Direction;
use sluice_core::time::Nanos;

/// A host that records the name of every call, in order. Its own work
/// (and the fake's) is not counted as the filter's allocations; what a
/// call returns is a buffer the real host allocates too.
struct Counting<'a> {
    host: &'a FakeHost,
    calls: &'a RefCell<Vec<&'static str>>,
}

impl Counting<'_> {
    /// Records `call`, then makes it.
    fn note<T>(&self, call: &'static str, make: impl FnOnce() -> T) -> T {
        uncounted(|| {
            self.calls.borrow_mut().push(call);
            make()
        })
    }
}

impl Host for Counting<'_> {
    fn now(&self) -> Nanos {
        self.note("now", || self.host.now())
    }
    fn request_header(&self, name: &str) -> Option<String> {
        self.note("request_header", || self.host.request_header(name))
    }
    fn set_request_header(&self, name: &str, value: &str) {
        self.note("set_request_header", || {
            self.host.set_request_header(name, value)
        });
    }
    fn remove_request_header(&self, name: &str) {
        self.note("remove_request_header", || {
            self.host.remove_request_header(name)
        });
    }
    fn response_header(&self, name: &str) -> Option<String> {
        self.note("response_header", || self.host.response_header(name))
    }
    fn set_response_header(&self, name: &str, value: &str) {
        self.note("set_response_header", || {
            self.host.set_response_header(name, value)
        });
    }
    fn peer_address(&self) -> Option<String> {
        self.note("peer_address", || self.host.peer_address())
    }
    fn response_trailer(&self, name: &str) -> Option<String> {
        self.note("response_trailer", || self.host.response_trailer(name))
    }
    fn set_response_trailer(&self, name: &str, value: &str) {
        self.note("set_response_trailer", || {
            self.host.set_response_trailer(name, value)
        });
    }
    fn body(&self, direction: Direction, size: usize) -> Option<Vec<u8>> {
        self.note("body", || self.host.body(direction, size))
    }
    fn set_body(&self, direction: Direction, size: usize, bytes: &[u8]) {
        self.note("set_body", || self.host.set_body(direction, size, bytes));
    }
    fn set_tick_millis(&self, millis: u32) {
        self.note("set_tick_millis", || self.host.set_tick_millis(millis));
    }
    fn define_counter(&self, name: &str) -> Option<MetricId> {
        self.note("define_counter", || self.host.define_counter(name))
    }
    fn define_gauge(&self, name: &str) -> Option<MetricId> {
        self.note("define_gauge", || self.host.define_gauge(name))
    }
    fn increment(&self, metric: MetricId, by: u64) {
        self.note("increment", || self.host.increment(metric, by));
    }
    fn add_to_gauge(&self, metric: MetricId, delta: i64) {
        self.note("add_to_gauge", || self.host.add_to_gauge(metric, delta));
    }
    fn warn(&self, message: &str) {
        self.note("warn", || self.host.warn(message));
    }
    fn random_u64(&self) -> Option<u64> {
        self.note("random_u64", || self.host.random_u64())
    }
    fn grpc_call(
        &self,
        cluster: &str,
        service: &str,
        method: &str,
        message: &[u8],
        timeout: Span,
    ) -> Option<u32> {
        self.note("grpc_call", || {
            self.host
                .grpc_call(cluster, service, method, message, timeout)
        })
    }
    fn enqueue(&self, name: &str, message: &[u8]) -> bool {
        self.note("enqueue", || self.host.enqueue(name, message))
    }
    fn register_queue(&self, name: &str) -> Option<u32> {
        self.note("register_queue", || self.host.register_queue(name))
    }
    fn dequeue(&self, queue: u32) -> Option<Vec<u8>> {
        self.note("dequeue", || self.host.dequeue(queue))
    }
    fn node_id(&self) -> Option<String> {
        self.note("node_id", || self.host.node_id())
    }
}

/// Shared data that records its reads and writes.
struct CountingShared<'a> {
    inner: &'a InProcessShared,
    calls: &'a RefCell<Vec<&'static str>>,
}

impl SharedBytes for CountingShared<'_> {
    fn get(&self, name: &str) -> Result<(Option<Vec<u8>>, u32), StoreError> {
        uncounted(|| {
            self.calls.borrow_mut().push("shared_get");
            (&self.inner).get(name)
        })
    }
    fn set(&mut self, name: &str, value: &[u8], cas: u32) -> Result<WriteOutcome, StoreError> {
        uncounted(|| {
            self.calls.borrow_mut().push("shared_set");
            let mut inner = self.inner;
            inner.set(name, value, cas)
        })
    }
}

/// How many of `calls` are `name`.
fn times(calls: &[&str], name: &str) -> usize {
    calls.iter().filter(|c| **c == name).count()
}

/// A test host at a fixed time, with a seed and a client address.
fn client_host() -> FakeHost {
    let fake = FakeHost::default();
    fake.now.set(1_800_000_000_000_000_000);
    fake.random.set(Some(7));
    *fake.peer.borrow_mut() = Some("10.0.0.7:41234".into());
    fake
}

/// A client host whose calls (and shared-data reads and writes) are
/// recorded in one list: what each cost test sets up.
struct Recorded {
    fake: FakeHost,
    calls: RefCell<Vec<&'static str>>,
    inner: InProcessShared,
}

impl Recorded {
    fn new() -> Self {
        Recorded {
            fake: client_host(),
            calls: RefCell::new(Vec::new()),
            inner: InProcessShared::default(),
        }
    }

    /// The host, recording its calls.
    fn host(&self) -> Counting<'_> {
        Counting {
            host: &self.fake,
            calls: &self.calls,
        }
    }

    /// A filter configured with `config`, its shared data recorded.
    fn plugin(&self, config: &str) -> Result<Plugin<CountingShared<'_>>, String> {
        let shared = CountingShared {
            inner: &self.inner,
            calls: &self.calls,
        };
        Plugin::configure(&self.host(), shared, config.as_bytes()).map_err(|e| e.to_string())
    }
}

#[test]
fn a_request_with_only_an_exact_rule_reads_what_its_rule_needs_and_no_shared_data(
) -> Result<(), String> {
    let recorded = Recorded::new();
    let (fake, calls) = (&recorded.fake, &recorded.calls);
    let host = recorded.host();
    let config = r#"{"rules":[{"name":"fleet","key":["client_ip"],
        "match":{"path":{"prefix":"/"}},"sync":{"mode":"exact","domain":"edge"}}]}"#;
    let mut p = recorded.plugin(config)?;
    // The quota server's answer, once its controls are known (not sent).
    let answer = CheckResponse {
        groups: vec![GroupResult {
            allowed: true,
            items: vec![ItemResult {
                code: Code::Ok as i32,
                limit: 10,
                remaining: 9,
                ..ItemResult::default()
            }],
            headers: Vec::new(),
            source: Source::Storage as i32,
        }],
        controls: None,
    }
    .encode_to_vec();
    fake.request("GET", "/x", &[]);
    calls.borrow_mut().clear();

    assert_eq!(p.on_request_headers(&host, 1), Step::Pause);
    let asked = calls.borrow().clone();
    assert_eq!(
        p.on_quota_answer(&host, 1, Ok(&answer)),
        Some((1, Wake::Resume))
    );
    fake.respond(200);
    p.on_response_headers(&host, 1);
    p.on_body(&host, 1, Direction::Server, 0, true);
    p.on_done(&host, 1);
    let all = calls.borrow().clone();

    assert_eq!(
        times(&asked, "request_header"),
        1,
        "the path only: {asked:?}"
    );
    assert_eq!(times(&asked, "peer_address"), 1, "{asked:?}");
    assert_eq!(times(&asked, "grpc_call"), 1, "{asked:?}");
    assert_eq!(
        times(&all, "shared_get") + times(&all, "shared_set"),
        0,
        "no local rule, no slot: {all:?}"
    );
    assert_eq!(
        times(&all, "increment"),
        0,
        "sync ok and allowed wait for a flush: {all:?}"
    );
    assert_eq!(
        times(&all, "response_header"),
        0,
        "nothing reads the status: {all:?}"
    );
    assert_eq!(
        fake.response_header("ratelimit").as_deref(),
        Some("\"fleet\";r=9;t=0")
    );
    p.flush_metrics(&host);
    assert_eq!(fake.counter("sluice_sync.rule.fleet.outcome.ok"), 1);
    assert_eq!(fake.counter("sluice_http.rule.fleet.outcome.allowed"), 1);
    println!("host calls of one exact request: {all:?}");
    Ok(())
}

/// The host calls of a request, once a first request set its key up (and,
/// for a leased rule, the sync service leased it permits).
fn calls_of_a_settled_request(config: &str) -> Result<Vec<&'static str>, String> {
    use crate::sync_service::SyncService;
    use sluice_proto::quota::v1::{Lease, SyncResponse};
    let recorded = Recorded::new();
    let (fake, calls) = (&recorded.fake, &recorded.calls);
    let host = recorded.host();
    let mut service = SyncService::configure(&host, &recorded.inner, config.as_bytes())
        .map_err(|e| e.to_string())?;
    let mut p = recorded.plugin(config)?;
    fake.request("GET", "/x", &[]);
    p.on_request_headers(&host, 1);
    service.on_queue_ready(&host);
    let secs = |seconds| Some(sluice_proto::Duration { seconds, nanos: 0 });
    let answer = SyncResponse {
        leases: vec![Lease {
            code: Code::Ok as i32,
            permits: 1000,
            expires_after: secs(1),
            remaining: 5000,
            limit: 10000,
            window: secs(60),
            reset_after: secs(30),
        }],
        source: Source::Storage as i32,
        controls: None,
    }
    .encode_to_vec();
    let token = fake.grpc_calls.borrow().len() as u32;
    service.on_sync_answer(&host, token, Ok(&answer));
    fake.request("GET", "/x", &[]);
    calls.borrow_mut().clear();
    assert_eq!(p.on_request_headers(&host, 2), Step::Continue);
    fake.respond(200);
    p.on_response_headers(&host, 2);
    p.on_done(&host, 2);
    // Stats flushes and the ticks that make them depend on what the VM
    // did before, not on this request.
    let calls = calls.take();
    Ok(calls
        .into_iter()
        .filter(|c| !matches!(*c, "increment" | "set_tick_millis"))
        .collect())
}

#[test]
fn a_request_decided_from_a_lease_costs_the_host_calls_of_a_local_rule() -> Result<(), String> {
    let local = calls_of_a_settled_request(
        r#"{"rules":[{"name":"api","key":["client_ip"],"limit":{"count":100000,"per":"1m"}}]}"#,
    )?;
    let leased = calls_of_a_settled_request(
        r#"{"rules":[{"name":"api","key":["client_ip"],
            "sync":{"mode":"leased","domain":"edge","max_lease":1000}}]}"#,
    )?;
    assert_eq!(leased, local);
    assert_eq!(
        leased.iter().filter(|c| c.starts_with("shared_")).count(),
        2,
        "one read and one compare-and-swap: {leased:?}"
    );
    Ok(())
}

/// What one request costs the filter once its key is set up: its host
/// calls by kind (shared-data reads and writes included), and the heap
/// allocations of the filter's own code (not the buffers host calls
/// return, which the real host allocates too).
#[derive(Debug, PartialEq, Eq)]
struct Cost {
    calls: BTreeMap<&'static str, usize>,
    allocations: u64,
}

/// One exchange as Envoy drives the filter through it.
struct Exchange {
    path: &'static str,
    headers: &'static [(&'static str, &'static str)],
    /// A gRPC unary call: one message each way, then trailers.
    grpc: bool,
}

const GRPC: &[(&str, &str)] = &[("content-type", "application/grpc"), ("te", "trailers")];
/// One gRPC message: flag 0, length 2, then field 1 (varint) = 1.
const GRPC_MESSAGE: &[u8] = &[0, 0, 0, 0, 2, 0x08, 0x01];

impl Exchange {
    const HTTP: Exchange = Exchange {
        path: "/direct",
        headers: &[("user-agent", "wrk")],
        grpc: false,
    };
    const GRPC_UNARY: Exchange = Exchange {
        path: "/user.UserService/GetUser",
        headers: GRPC,
        grpc: true,
    };

    /// Runs request `id` through the plugin, from its headers to its end;
    /// the step its headers got.
    fn run<B: SharedBytes>(&self, p: &mut Plugin<B>, host: &Counting<'_>, id: u32) -> Step {
        let fake = host.host;
        uncounted(|| fake.request("POST", self.path, self.headers));
        let step = p.on_request_headers(host, id);
        if step == Step::Continue {
            if self.grpc {
                uncounted(|| fake.chunk(Direction::Client, GRPC_MESSAGE));
                p.on_body(host, id, Direction::Client, GRPC_MESSAGE.len(), true);
            }
            uncounted(|| {
                fake.respond(200);
                let content_type = if self.grpc {
                    "application/grpc"
                } else {
                    "text/plain"
                };
                fake.response
                    .borrow_mut()
                    .insert("content-type".into(), content_type.into());
            });
            p.on_response_headers(host, id);
            uncounted(|| fake.chunk(Direction::Server, GRPC_MESSAGE));
            p.on_body(host, id, Direction::Server, GRPC_MESSAGE.len(), !self.grpc);
            if self.grpc {
                uncounted(|| {
                    fake.trailers
                        .borrow_mut()
                        .insert("grpc-status".into(), "0".into())
                });
                p.on_response_trailers(host, id);
            }
        } else {
            // The filter's own reply comes back through the response callback.
            uncounted(|| fake.respond(429));
            p.on_response_headers(host, id);
        }
        p.on_done(host, id);
        step
    }
}

/// The cost of the fourth of four `exchange`s under `config`: the first
/// sets the key up, the next two leave it as every later one finds it (a
/// stream message's first guess at its slot's token may miss: the slot's
/// creation wrote tokens the worker did not see).
fn cost_of(config: &str, exchange: &Exchange) -> Result<(Step, Cost), String> {
    let recorded = Recorded::new();
    let calls = &recorded.calls;
    let host = recorded.host();
    let mut p = recorded.plugin(config)?;
    for id in 1..=3 {
        exchange.run(&mut p, &host, id);
    }
    calls.borrow_mut().clear();
    let (step, allocations) = allocations(|| exchange.run(&mut p, &host, 4));
    let calls = calls.take();
    let by_kind = calls.iter().map(|c| (*c, times(&calls, c))).collect();
    Ok((
        step,
        Cost {
            calls: by_kind,
            allocations,
        },
    ))
}

/// `(call, times)` pairs as a map, for comparing with a [`Cost`].
fn calls(pairs: &[(&'static str, usize)]) -> BTreeMap<&'static str, usize> {
    pairs.iter().copied().collect()
}

const PER_IP: &str =
    r#"{"rules":[{"name":"per-ip","key":["client_ip"],"limit":{"count":1000000,"per":"1s"}}]}"#;

#[test]
fn an_allowed_request_of_one_per_ip_rule_with_default_headers() -> Result<(), String> {
    let (step, cost) = cost_of(PER_IP, &Exchange::HTTP)?;
    assert_eq!(step, Step::Continue);
    // No read: the key's slot holds this worker's own last write.
    assert_eq!(
        cost,
        Cost {
            calls: calls(&[
                ("now", 1),
                ("peer_address", 1),
                ("set_response_header", 2),
                ("shared_set", 1)
            ]),
            allocations: 5,
        }
    );
    Ok(())
}

#[test]
fn an_allowed_request_of_one_per_ip_rule_without_headers() -> Result<(), String> {
    let config = r#"{"rules":[{"name":"per-ip","key":["client_ip"],"limit":{"count":1000000,"per":"1s"}}],
        "headers":{"on_allowed":false}}"#;
    let (step, cost) = cost_of(config, &Exchange::HTTP)?;
    assert_eq!(step, Step::Continue);
    assert_eq!(
        cost,
        Cost {
            calls: calls(&[("now", 1), ("peer_address", 1), ("shared_set", 1)]),
            allocations: 5,
        }
    );
    Ok(())
}

/// Shared-data reads and writes of `rounds` rounds of requests under
/// [`PER_IP`] by `workers` filters over one shared data (Envoy's workers),
/// each round one request per client address in `clients`, the workers
/// taking turns; after three rounds that leave the keys as every later
/// one finds them (the first creates their slots, which writes tokens no
/// worker sees, so the next guesses may miss).
fn shared_calls_of_rounds(
    workers: usize,
    clients: &[&str],
    rounds: usize,
) -> Result<(usize, usize), String> {
    let recorded = Recorded::new();
    let host = recorded.host();
    let mut plugins = (0..workers)
        .map(|_| recorded.plugin(PER_IP))
        .collect::<Result<Vec<_>, _>>()?;
    let mut turns = (0..workers).cycle();
    let mut id = 0u32;
    for round in 0..rounds.saturating_add(3) {
        if round == 3 {
            recorded.calls.borrow_mut().clear();
        }
        for client in clients {
            *recorded.fake.peer.borrow_mut() = Some(format!("{client}:41234"));
            let Some(p) = turns.next().and_then(|w| plugins.get_mut(w)) else {
                return Err("no worker".into());
            };
            id = id.wrapping_add(1);
            assert_eq!(Exchange::HTTP.run(p, &host, id), Step::Continue);
        }
    }
    let calls = recorded.calls.take();
    Ok((times(&calls, "shared_get"), times(&calls, "shared_set")))
}

#[test]
fn a_key_two_workers_take_turns_on_is_read_as_without_reuse_but_for_rare_misses(
) -> Result<(), String> {
    // Each worker's guess misses (the other wrote in between): a failed
    // compare-and-swap, then the slot is read and written as without
    // reuse. Reuse then pauses twice as long after each miss (1, 2, 4 ...
    // 64 slots probed; one per load here, the only key being in its first
    // slot, and the miss's retry is one): a worker misses at its 1st, 2nd,
    // 4th ... 128th request, then once every 64.
    let requests = 2 * 130;
    let (gets, sets) = shared_calls_of_rounds(2, &["10.0.0.7"], requests)?;
    assert_eq!((gets, sets), (requests, requests + 2 * 8));
    Ok(())
}

#[test]
fn varying_keys_are_read_as_without_reuse() -> Result<(), String> {
    // More keys in turn than a worker remembers writes (8): each is read
    // and written once per request, as without reuse.
    let clients: Vec<String> = (0..16).map(|i| format!("10.0.{i}.7")).collect();
    let clients: Vec<&str> = clients.iter().map(String::as_str).collect();
    let (gets, sets) = shared_calls_of_rounds(1, &clients, 4)?;
    assert_eq!((gets, sets), (4 * 16, 4 * 16));
    // A few keys in turn are each decided from the worker's own last
    // write: no read.
    let (gets, sets) = shared_calls_of_rounds(1, &clients[..8], 4)?;
    assert_eq!((gets, sets), (0, 4 * 8));
    Ok(())
}

#[test]
fn access_lists_and_rules_share_one_clock_read() -> Result<(), String> {
    let config = r#"{"rules":[{"name":"per-ip","key":["client_ip"],"limit":{"count":1000000,"per":"1s"}}],
        "access":{"deny":["192.0.2.0/24"]}}"#;
    let (step, cost) = cost_of(config, &Exchange::HTTP)?;
    assert_eq!(step, Step::Continue);
    assert_eq!(
        cost,
        Cost {
            calls: calls(&[
                ("now", 1),
                ("peer_address", 1),
                ("set_response_header", 2),
                ("shared_set", 1)
            ]),
            allocations: 5,
        }
    );
    Ok(())
}

#[test]
fn a_limited_request_of_one_per_ip_rule() -> Result<(), String> {
    let config =
        r#"{"rules":[{"name":"per-ip","key":["client_ip"],"limit":{"count":1,"per":"1h"}}]}"#;
    let (step, cost) = cost_of(config, &Exchange::HTTP)?;
    assert!(
        matches!(step, Step::Reply(ref r) if r.status == 429),
        "{step:?}"
    );
    assert_eq!(
        cost,
        Cost {
            calls: calls(&[
                ("now", 1),
                ("peer_address", 1),
                ("request_header", 1),
                ("shared_get", 1)
            ]),
            allocations: 10,
        }
    );
    Ok(())
}

#[test]
fn a_request_no_rule_matches() -> Result<(), String> {
    let config = r#"{"rules":[{"name":"api","key":["client_ip"],
        "match":{"path":{"prefix":"/api/"}},"limit":{"count":1,"per":"1h"}}]}"#;
    let (step, cost) = cost_of(config, &Exchange::HTTP)?;
    assert_eq!(step, Step::Continue);
    assert_eq!(
        cost,
        Cost {
            calls: calls(&[("peer_address", 1), ("request_header", 1)]),
            // The path is the host's string, cut: nothing of the filter's own.
            allocations: 0,
        }
    );
    Ok(())
}

#[test]
fn a_grpc_unary_call_under_a_requests_rule() -> Result<(), String> {
    let config = r#"{"rules":[{"name":"calls","match":{"grpc":{}},
        "limit":{"count":1000000,"per":"1s"}}]}"#;
    let (step, cost) = cost_of(config, &Exchange::GRPC_UNARY)?;
    assert_eq!(step, Step::Continue);
    assert_eq!(
        cost,
        Cost {
            calls: calls(&[
                ("now", 1),
                ("peer_address", 1),
                ("request_header", 3),
                ("set_response_header", 2),
                ("shared_set", 1)
            ]),
            allocations: 6,
        }
    );
    Ok(())
}

/// `make bench-filter`'s gRPC variant: calls and messages, never reached.
const BENCH_GRPC: &str = r#"{"rules":[
    {"name":"bench-grpc-calls","match":{"grpc":{}},"limit":{"count":1000000000,"per":"1s"}},
    {"name":"bench-grpc-msgs","match":{"grpc":{}},"counts":"messages",
     "limit":{"count":1000000000,"per":"1s"}}]}"#;

#[test]
fn a_grpc_unary_call_under_calls_and_messages_rules() -> Result<(), String> {
    let (step, cost) = cost_of(BENCH_GRPC, &Exchange::GRPC_UNARY)?;
    assert_eq!(step, Step::Continue);
    // No slot is read back: the call and each message start from this
    // worker's own last write there. The open-calls gauges' moves (up at
    // the headers, down at the end) cancel out before a flush: no call.
    assert_eq!(
        cost,
        Cost {
            calls: calls(&[
                ("body", 2),
                ("now", 3),
                ("peer_address", 1),
                ("request_header", 3),
                ("set_response_header", 2),
                ("shared_set", 3)
            ]),
            // The request: its key list and keys, the stream rules split
            // off, the decision's charge (and its key) and decisions, the
            // gauges' list; each message: its decisions.
            allocations: 10,
        }
    );
    Ok(())
}

/// `make bench-filter`'s WebSocket variant: messages and bytes, never reached.
const BENCH_WS: &str = r#"{"rules":[
    {"name":"bench-ws-msgs","match":{"websocket":true},"counts":"messages",
     "limit":{"count":1000000000,"per":"1s"}},
    {"name":"bench-ws-bytes","match":{"websocket":true},"counts":"bytes",
     "limit":{"count":1000000000,"per":"1s"}}]}"#;

/// A masked client text frame "hello", and the server's unmasked echo.
const WS_CLIENT_FRAME: &[u8] = &[
    0x81,
    0x85,
    1,
    2,
    3,
    4,
    b'h' ^ 1,
    b'e' ^ 2,
    b'l' ^ 3,
    b'l' ^ 4,
    b'o' ^ 1,
];
const WS_SERVER_FRAME: &[u8] = &[0x81, 0x05, b'h', b'e', b'l', b'l', b'o'];

/// The cost of the third of three echoed WebSocket messages (one frame
/// each way) on one upgraded connection under `config`.
fn ws_message_cost(config: &str) -> Result<Cost, String> {
    let recorded = Recorded::new();
    let (fake, calls) = (&recorded.fake, &recorded.calls);
    let host = recorded.host();
    let mut p = recorded.plugin(config)?;
    fake.request("GET", "/ws", &[("upgrade", "websocket")]);
    assert_eq!(p.on_request_headers(&host, 1), Step::Continue);
    fake.respond(101);
    p.on_response_headers(&host, 1);
    let echo = |p: &mut Plugin<_>| {
        uncounted(|| fake.chunk(Direction::Client, WS_CLIENT_FRAME));
        let client = p.on_body(&host, 1, Direction::Client, WS_CLIENT_FRAME.len(), false);
        uncounted(|| fake.chunk(Direction::Server, WS_SERVER_FRAME));
        let server = p.on_body(&host, 1, Direction::Server, WS_SERVER_FRAME.len(), false);
        assert_eq!((client, server), (Step::Continue, Step::Continue));
        // The fake's copies of what passed are not the filter's allocations.
        let passed = uncounted(|| {
            [Direction::Client, Direction::Server].map(|direction| fake.passed(direction))
        });
        assert_eq!(passed, [WS_CLIENT_FRAME, WS_SERVER_FRAME]);
    };
    echo(&mut p);
    echo(&mut p);
    calls.borrow_mut().clear();
    let ((), allocations) = allocations(|| echo(&mut p));
    let calls = calls.take();
    let by_kind = calls.iter().map(|c| (*c, times(&calls, c))).collect();
    Ok(Cost {
        calls: by_kind,
        allocations,
    })
}

#[test]
fn a_websocket_upgrade_reads_one_request_header() -> Result<(), String> {
    let recorded = Recorded::new();
    let host = recorded.host();
    let mut p = recorded.plugin(BENCH_WS)?;
    recorded
        .fake
        .request("GET", "/ws", &[("upgrade", "websocket")]);
    recorded.calls.borrow_mut().clear();
    assert_eq!(p.on_request_headers(&host, 1), Step::Continue);
    let calls = recorded.calls.take();
    // `upgrade` says WebSocket whatever the content type: that is not read.
    assert_eq!(times(&calls, "request_header"), 1, "{calls:?}");
    Ok(())
}

#[test]
fn a_websocket_message_echoed_under_messages_and_bytes_rules() -> Result<(), String> {
    let cost = ws_message_cost(BENCH_WS)?;
    // One compare-and-swap per rule and message, no read: each starts from
    // this worker's own last write.
    assert_eq!(
        cost,
        Cost {
            calls: calls(&[("body", 2), ("now", 2), ("shared_set", 4)]),
            // Per message: the engine's states, outcomes and rollback list
            // for two rules, and the decisions (no charges: a message's
            // permits are never given back).
            allocations: 8,
        }
    );
    Ok(())
}

#[test]
fn a_grpc_call_whose_rules_count_only_requests_messages_leaves_the_response_body_unread(
) -> Result<(), String> {
    let config = r#"{"rules":[{"name":"msgs","match":{"grpc":{}},"counts":"messages",
        "direction":"client","limit":{"count":1000000000,"per":"1s"}}]}"#;
    let (step, cost) = cost_of(config, &Exchange::GRPC_UNARY)?;
    assert_eq!(step, Step::Continue);
    // One body read, clock read and compare-and-swap: the request's message.
    assert_eq!(
        cost,
        Cost {
            calls: calls(&[
                ("body", 1),
                ("now", 2),
                ("peer_address", 1),
                ("request_header", 3),
                ("shared_set", 1)
            ]),
            allocations: 4,
        }
    );
    Ok(())
}

#[test]
fn a_large_grpc_message_is_read_only_where_its_prefix_is() -> Result<(), String> {
    let recorded = Recorded::new();
    let (fake, calls) = (&recorded.fake, &recorded.calls);
    let host = recorded.host();
    let config = r#"{"rules":[{"name":"msgs","match":{"grpc":{}},"counts":"messages",
        "limit":{"count":2,"per":"1h"}}]}"#;
    let mut p = recorded.plugin(config)?;
    fake.request("POST", "/user.UserService/GetUser", GRPC);
    assert_eq!(p.on_request_headers(&host, 1), Step::Continue);
    // A streaming call whose response started: a refusal cuts the request.
    fake.respond(200);
    p.on_response_headers(&host, 1);
    let mut stream = vec![0u8, 0, 0, 0x30, 0];
    stream.extend([7u8; 0x3000]);
    stream.extend_from_slice(GRPC_MESSAGE);
    stream.extend_from_slice(GRPC_MESSAGE);
    let chunks = [
        &stream[..0x1000],
        &stream[0x1000..0x2000],
        &stream[0x2000..],
    ];
    calls.borrow_mut().clear();
    let mut passed = Vec::new();
    let mut steps = Vec::new();
    for (i, chunk) in chunks.iter().enumerate() {
        fake.chunk(Direction::Client, chunk);
        let ends = i == chunks.len() - 1;
        steps.push(p.on_body(&host, 1, Direction::Client, chunk.len(), ends));
        passed.extend(fake.passed(Direction::Client));
    }
    // The first chunk holds the large message's prefix, the second only its
    // payload, the third its end and two more messages, the last refused:
    // the request is cut before it, and its end resets the call.
    assert_eq!(times(&calls.borrow(), "body"), 2, "{:?}", calls.borrow());
    assert_eq!(steps, [Step::Continue, Step::Continue, Step::Reset]);
    assert_eq!(passed.len(), stream.len() - GRPC_MESSAGE.len());
    Ok(())
}
