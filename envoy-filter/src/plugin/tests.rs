//! The filter's request lifecycle against a scripted host.

use super::*;
use crate::host::fake::FakeHost;
use sluice_core::policy::Direction;
use sluice_core::store::{hash, InProcessShared, PROBES, SEED_NAME};

const SEC: u64 = 1_000_000_000;

pub(super) fn plugin<'a>(
    host: &FakeHost,
    shared: &'a InProcessShared,
    json: &str,
) -> Result<Plugin<&'a InProcessShared>, String> {
    host.now.set(1_800_000_000 * SEC);
    host.random.set(Some(0x0123_4567_89ab_cdef));
    *host.peer.borrow_mut() = Some("10.0.0.7:41234".into());
    Plugin::configure(host, shared, json.as_bytes()).map_err(|e| e.to_string())
}

pub(super) fn reply(step: Step) -> Result<LocalReply, String> {
    match step {
        Step::Reply(r) => Ok(r),
        other => Err(format!("expected a reply, got {other:?}")),
    }
}

fn header<'a>(reply: &'a LocalReply, name: &str) -> Option<&'a str> {
    reply
        .headers
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.as_str())
}

#[test]
fn limits_at_the_boundary_and_answers_429_with_headers() -> Result<(), String> {
    let (host, shared) = (FakeHost::default(), InProcessShared::default());
    let mut p = plugin(
        &host,
        &shared,
        r#"{"rules":[{"name":"api","limit":{"count":2,"per":"1m"},"algorithm":"fixed_window"}]}"#,
    )?;
    for (id, remaining) in [(1, "1"), (2, "0")] {
        host.request("GET", "/x", &[]);
        assert_eq!(p.on_request_headers(&host, id), Step::Continue);
        host.respond(200);
        p.on_response_headers(&host, id);
        let state = host.response_header("ratelimit").unwrap_or_default();
        assert!(
            state.starts_with(&format!("\"api\";r={remaining};t=")),
            "{state}"
        );
        assert_eq!(
            host.response_header("x-ratelimit-remaining"),
            None,
            "x_ratelimit is opt-in"
        );
        assert_eq!(
            host.response_header("ratelimit-policy").as_deref(),
            Some("\"api\";q=2;w=60")
        );
    }
    host.request("GET", "/x", &[]);
    let r = reply(p.on_request_headers(&host, 3))?;
    assert_eq!(r.status, 429);
    assert_eq!(header(&r, "retry-after"), Some("60"));
    assert_eq!(header(&r, "content-type"), Some("application/json"));
    let body: serde_json::Value = serde_json::from_slice(&r.body).map_err(|e| e.to_string())?;
    assert_eq!(body["rule"], "api");
    assert_eq!(body["retry_after"], 60);
    // Our own reply comes back through the response callback untouched.
    host.respond(429);
    p.on_response_headers(&host, 3);
    assert_eq!(host.response_header("ratelimit"), None);
    p.flush_metrics(&host);
    assert_eq!(host.counter("sluice_http.rule.api.outcome.allowed"), 2);
    assert_eq!(host.counter("sluice_http.rule.api.outcome.limited"), 1);
    Ok(())
}

#[test]
fn two_vms_share_one_budget() -> Result<(), String> {
    let (host, shared) = (FakeHost::default(), InProcessShared::default());
    let json = r#"{"rules":[{"name":"api","limit":{"count":3,"per":"1h"}}]}"#;
    let mut a = plugin(&host, &shared, json)?;
    let mut b = plugin(&host, &shared, json)?;
    let mut allowed = 0;
    for id in 0..10 {
        host.request("GET", "/", &[]);
        let vm = if id % 2 == 0 { &mut a } else { &mut b };
        if vm.on_request_headers(&host, id) == Step::Continue {
            allowed += 1;
        }
    }
    assert_eq!(allowed, 3);
    Ok(())
}

#[test]
fn a_connection_closed_on_one_vm_frees_its_permit_for_another() -> Result<(), String> {
    let (host, shared) = (FakeHost::default(), InProcessShared::default());
    let json = r#"{"rules":[{"name":"open","match":{"websocket":true},"counts":"in_flight","limit":{"count":2}}]}"#;
    let mut a = plugin(&host, &shared, json)?;
    let mut b = plugin(&host, &shared, json)?;
    host.request("GET", "/ws", &[("upgrade", "websocket")]);
    assert_eq!(b.on_request_headers(&host, 1), Step::Continue);
    assert_eq!(a.on_request_headers(&host, 2), Step::Continue);
    assert_eq!(reply(a.on_request_headers(&host, 3))?.status, 429);
    // The last write `a` made at the key's slot is full; `b` then frees a
    // permit there: `a` must not refuse from its own write.
    b.on_done(&host, 1);
    assert_eq!(a.on_request_headers(&host, 4), Step::Continue);
    assert_eq!(reply(b.on_request_headers(&host, 5))?.status, 429);
    Ok(())
}

#[test]
fn delay_waits_then_releases_on_tick() -> Result<(), String> {
    let (host, shared) = (FakeHost::default(), InProcessShared::default());
    let mut p = plugin(
        &host,
        &shared,
        r#"{"rules":[{"name":"slow","limit":{"count":1,"per":"1s"},"action":"delay","max_delay":"2s"}]}"#,
    )?;
    host.request("GET", "/", &[]);
    assert_eq!(p.on_request_headers(&host, 1), Step::Continue);
    assert_eq!(p.on_request_headers(&host, 2), Step::Pause);
    assert_eq!(host.tick_millis.get(), DELAY_TICK_MILLIS);
    host.now.set(host.now.get() + SEC / 2);
    assert!(p.on_tick(&host).is_empty());
    assert_eq!(p.delayed(), 1);
    host.now.set(host.now.get() + SEC / 2);
    assert_eq!(p.on_tick(&host), vec![(2, Wake::Resume)]);
    assert_eq!(host.tick_millis.get(), 0);
    p.flush_metrics(&host);
    assert_eq!(host.counter("sluice_http.rule.slow.outcome.delayed"), 1);
    Ok(())
}

#[test]
fn fast_ticks_flush_stats_no_more_often_than_requests() -> Result<(), String> {
    let (host, shared) = (FakeHost::default(), InProcessShared::default());
    let mut p = plugin(
        &host,
        &shared,
        r#"{"rules":[
            {"name":"slow","match":{"path":{"prefix":"/slow"}},"limit":{"count":1,"per":"1s"},
             "action":"delay","max_delay":"2s"},
            {"name":"api","match":{"path":{"prefix":"/api"}},"limit":{"count":100,"per":"1s"}}]}"#,
    )?;
    let allowed = || host.counter("sluice_http.rule.api.outcome.allowed");
    host.request("GET", "/api", &[]);
    assert_eq!(p.on_request_headers(&host, 1), Step::Continue);
    assert_eq!(allowed(), 1, "the first request flushes");
    host.request("GET", "/slow", &[]);
    assert_eq!(p.on_request_headers(&host, 2), Step::Continue);
    assert_eq!(p.on_request_headers(&host, 3), Step::Pause);
    host.request("GET", "/api", &[]);
    assert_eq!(p.on_request_headers(&host, 4), Step::Continue);
    // Ticks every 10 ms while request 3 waits: they leave request 4's
    // count waiting until a second after the last flush.
    assert_eq!(host.tick_millis.get(), DELAY_TICK_MILLIS);
    host.now.set(host.now.get() + SEC / 100);
    assert!(p.on_tick(&host).is_empty());
    assert_eq!(
        allowed(),
        1,
        "a fast tick within a second of the last flush"
    );
    host.now.set(host.now.get() + SEC);
    assert_eq!(p.on_tick(&host), vec![(3, Wake::Resume)]);
    assert_eq!(
        allowed(),
        2,
        "a second after the last flush, a tick flushes"
    );
    Ok(())
}

#[test]
fn delay_counts_the_requests_already_waiting() -> Result<(), String> {
    let (host, shared) = (FakeHost::default(), InProcessShared::default());
    let mut p = plugin(
        &host,
        &shared,
        r#"{"rules":[{"name":"slow","limit":{"count":1,"per":"1s"},"action":"delay","max_delay":"2s"}]}"#,
    )?;
    host.request("GET", "/", &[]);
    assert_eq!(p.on_request_headers(&host, 1), Step::Continue);
    assert_eq!(p.on_request_headers(&host, 2), Step::Pause);
    assert_eq!(p.on_request_headers(&host, 3), Step::Pause);
    // Third in line: its turn would come after 3 s.
    assert_eq!(reply(p.on_request_headers(&host, 4))?.status, 429);
    p.flush_metrics(&host);
    assert_eq!(host.counter("sluice_http.rule.slow.outcome.limited"), 1);
    // The others are woken in turn: one after 1 s, the next after 2 s.
    host.now.set(host.now.get() + SEC);
    assert_eq!(p.on_tick(&host), vec![(2, Wake::Resume)]);
    host.now.set(host.now.get() + SEC);
    assert_eq!(p.on_tick(&host), vec![(3, Wake::Resume)]);
    p.flush_metrics(&host);
    assert_eq!(host.counter("sluice_http.rule.slow.outcome.delayed"), 2);
    Ok(())
}

#[test]
fn delay_beyond_max_is_refused_and_abandoned_requests_are_forgotten() -> Result<(), String> {
    let (host, shared) = (FakeHost::default(), InProcessShared::default());
    let mut p = plugin(
        &host,
        &shared,
        r#"{"rules":[{"name":"slow","limit":{"count":1,"per":"10s"},"action":"delay","max_delay":"1s"}]}"#,
    )?;
    host.request("GET", "/", &[]);
    assert_eq!(p.on_request_headers(&host, 1), Step::Continue);
    assert_eq!(reply(p.on_request_headers(&host, 2))?.status, 429);
    let mut q = plugin(
        &host,
        &shared,
        r#"{"rules":[{"name":"q","limit":{"count":1,"per":"1s"},"action":"delay","max_delay":"5s"}]}"#,
    )?;
    assert_eq!(q.on_request_headers(&host, 1), Step::Continue);
    assert_eq!(q.on_request_headers(&host, 2), Step::Pause);
    q.on_done(&host, 2);
    assert_eq!(q.delayed(), 0);
    Ok(())
}

#[test]
fn excluded_statuses_are_refunded() -> Result<(), String> {
    let (host, shared) = (FakeHost::default(), InProcessShared::default());
    let mut p = plugin(
        &host,
        &shared,
        r#"{"rules":[{"name":"r","limit":{"count":1,"per":"1h"}}],"exclude_statuses":["5xx"]}"#,
    )?;
    for id in 0..5 {
        host.request("GET", "/", &[]);
        assert_eq!(
            p.on_request_headers(&host, id),
            Step::Continue,
            "request {id}"
        );
        host.respond(503);
        p.on_response_headers(&host, id);
        p.on_done(&host, id);
    }
    host.request("GET", "/", &[]);
    assert_eq!(p.on_request_headers(&host, 9), Step::Continue);
    host.respond(200);
    p.on_response_headers(&host, 9);
    host.request("GET", "/", &[]);
    assert_eq!(reply(p.on_request_headers(&host, 10))?.status, 429);
    Ok(())
}

#[test]
fn forwarded_for_is_trusted_only_as_configured() -> Result<(), String> {
    let (host, shared) = (FakeHost::default(), InProcessShared::default());
    let untrusting = r#"{"rules":[{"name":"r","limit":{"count":1,"per":"1h"}}]}"#;
    let mut p = plugin(&host, &shared, untrusting)?;
    host.request("GET", "/", &[("x-forwarded-for", "1.1.1.1")]);
    assert_eq!(p.on_request_headers(&host, 1), Step::Continue);
    host.request("GET", "/", &[("x-forwarded-for", "2.2.2.2")]);
    assert_eq!(reply(p.on_request_headers(&host, 2))?.status, 429);

    let shared = InProcessShared::default();
    let trusting =
        r#"{"rules":[{"name":"r","limit":{"count":1,"per":"1h"}}],"client_ip":{"trusted_hops":1}}"#;
    let mut p = plugin(&host, &shared, trusting)?;
    host.request("GET", "/", &[("x-forwarded-for", "1.1.1.1")]);
    assert_eq!(p.on_request_headers(&host, 1), Step::Continue);
    host.request("GET", "/", &[("x-forwarded-for", "2.2.2.2")]);
    assert_eq!(p.on_request_headers(&host, 2), Step::Continue);
    Ok(())
}

#[test]
fn headers_off_for_allowed_responses_when_configured() -> Result<(), String> {
    let (host, shared) = (FakeHost::default(), InProcessShared::default());
    let mut p = plugin(
        &host,
        &shared,
        r#"{"rules":[{"name":"r","limit":{"count":5,"per":"1h"}}],"headers":{"on_allowed":false}}"#,
    )?;
    host.request("GET", "/", &[]);
    assert_eq!(p.on_request_headers(&host, 1), Step::Continue);
    host.respond(200);
    p.on_response_headers(&host, 1);
    assert_eq!(host.response.borrow().len(), 1, "only :status");
    Ok(())
}

#[test]
fn grpc_calls_are_refused_with_resource_exhausted_not_429() -> Result<(), String> {
    let (host, shared) = (FakeHost::default(), InProcessShared::default());
    let mut p = plugin(
        &host,
        &shared,
        r#"{"rules":[{"name":"calls","match":{"grpc":{"service":"chat.*"}},"limit":{"count":1,"per":"1h"}}]}"#,
    )?;
    let grpc = [("content-type", "application/grpc")];
    host.request("POST", "/chat.ChatService/Send", &grpc);
    assert_eq!(p.on_request_headers(&host, 1), Step::Continue);
    host.request("POST", "/user.UserService/Get", &grpc);
    assert_eq!(
        p.on_request_headers(&host, 2),
        Step::Continue,
        "other service"
    );
    host.request("POST", "/chat.ChatService/Send", &grpc);
    let r = reply(p.on_request_headers(&host, 3))?;
    assert_eq!((r.status, r.grpc_status), (200, Some(8)));
    assert_eq!(r.body, b"rate limited by rule calls; retry after 3600s");
    assert_eq!(header(&r, "retry-after"), Some("3600"));
    p.flush_metrics(&host);
    assert_eq!(host.counter("sluice_grpc.rule.calls.outcome.limited"), 1);
    Ok(())
}

#[test]
fn plain_rules_answer_grpc_calls_in_grpc_too() -> Result<(), String> {
    let (host, shared) = (FakeHost::default(), InProcessShared::default());
    let mut p = plugin(
        &host,
        &shared,
        r#"{"rules":[{"name":"all","limit":{"count":1,"per":"1h"}}]}"#,
    )?;
    host.request("POST", "/a.B/C", &[("content-type", "application/grpc")]);
    assert_eq!(p.on_request_headers(&host, 1), Step::Continue);
    assert_eq!(reply(p.on_request_headers(&host, 2))?.grpc_status, Some(8));
    Ok(())
}

#[test]
fn in_flight_permits_last_until_the_stream_ends() -> Result<(), String> {
    let (host, shared) = (FakeHost::default(), InProcessShared::default());
    let mut p = plugin(
        &host,
        &shared,
        r#"{"rules":[{"name":"open","match":{"websocket":true},"counts":"in_flight","limit":{"count":2}}]}"#,
    )?;
    host.request("GET", "/ws", &[("upgrade", "websocket")]);
    assert_eq!(p.on_request_headers(&host, 1), Step::Continue);
    assert_eq!(p.on_request_headers(&host, 2), Step::Continue);
    let refused = reply(p.on_request_headers(&host, 3))?;
    assert_eq!(refused.status, 429);
    let gauge = "sluice_websocket.rule.open.connections";
    // The first request found no flush yet and flushed its own move; the
    // second's waits.
    assert_eq!(host.counter(gauge), 1, "gauge moves wait for a flush");
    // The tick flushes them, then stops: nothing else waits.
    p.on_tick(&host);
    assert_eq!(host.counter(gauge), 2);
    assert_eq!(host.tick_millis.get(), 0);
    p.on_done(&host, 3);
    p.on_done(&host, 1);
    assert_eq!(
        host.tick_millis.get(),
        crate::metrics::FLUSH_TICK_MILLIS,
        "an end asks for the tick that flushes its move"
    );
    p.on_tick(&host);
    assert_eq!(host.counter(gauge), 1);
    assert_eq!(p.on_request_headers(&host, 4), Step::Continue);
    // Plain HTTP requests are not WebSocket connections.
    host.request("GET", "/ws", &[]);
    assert_eq!(p.on_request_headers(&host, 5), Step::Continue);
    assert_eq!(p.on_request_headers(&host, 6), Step::Continue);
    Ok(())
}

#[test]
fn grpc_messages_over_the_limit_end_the_call_or_rewrite_the_trailers() -> Result<(), String> {
    let (host, shared) = (FakeHost::default(), InProcessShared::default());
    let mut p = plugin(
        &host,
        &shared,
        r#"{"rules":[{"name":"msgs","match":{"grpc":{}},"counts":"messages","limit":{"count":2,"per":"1h"}}],"headers":{"on_allowed":false}}"#,
    )?;
    let message = [0u8, 0, 0, 0, 1, 42];
    host.request(
        "POST",
        "/chat.ChatService/Chat",
        &[("content-type", "application/grpc")],
    );
    assert_eq!(p.on_request_headers(&host, 1), Step::Continue);
    host.chunk(Direction::Client, &message);
    assert_eq!(
        p.on_body(&host, 1, Direction::Client, 6, false),
        Step::Continue
    );
    host.respond(200);
    p.on_response_headers(&host, 1);
    // Server messages count in the same budget: the 2nd passes, the 3rd is cut.
    host.chunk(Direction::Server, &[message, message].concat());
    assert_eq!(
        p.on_body(&host, 1, Direction::Server, 12, false),
        Step::Continue
    );
    assert_eq!(host.passed(Direction::Server), message);
    // The upstream has the grace to end the call: a tick before it does
    // nothing, the trailers then carry RESOURCE_EXHAUSTED.
    assert_eq!(host.tick_millis.get(), DELAY_TICK_MILLIS);
    assert_eq!(p.on_tick(&host), vec![]);
    p.on_response_trailers(&host, 1);
    assert_eq!(
        host.trailers
            .borrow()
            .get("grpc-status")
            .map(String::as_str),
        Some("8")
    );
    host.now.set(host.now.get() + 2 * SEC);
    assert_eq!(p.on_tick(&host), vec![], "ended in time: no reset");
    assert_eq!(host.tick_millis.get(), 0);

    // Before the response started, the call is refused cleanly.
    let (host, shared) = (FakeHost::default(), InProcessShared::default());
    let mut p = plugin(
        &host,
        &shared,
        r#"{"rules":[{"name":"msgs","match":{"grpc":{}},"counts":"messages","direction":"client","limit":{"count":1,"per":"1h"}}]}"#,
    )?;
    host.request(
        "POST",
        "/chat.ChatService/Upload",
        &[("content-type", "application/grpc")],
    );
    assert_eq!(p.on_request_headers(&host, 1), Step::Continue);
    host.chunk(Direction::Client, &[message, message].concat());
    let r = reply(p.on_body(&host, 1, Direction::Client, 12, false))?;
    assert_eq!(r.grpc_status, Some(8));
    assert!(header(&r, "ratelimit").is_some_and(|v| v.starts_with("\"msgs\";r=0;")));
    assert_eq!(header(&r, "ratelimit-policy"), Some("\"msgs\";q=1;w=3600"));
    assert_eq!(header(&r, "retry-after"), Some("3600"));
    p.flush_metrics(&host);
    assert_eq!(host.counter("sluice_grpc.rule.msgs.outcome.allowed"), 1);
    assert_eq!(host.counter("sluice_grpc.rule.msgs.outcome.limited"), 1);
    Ok(())
}

#[test]
fn cut_grpc_calls_are_reset_when_the_upstream_does_not_end_them() -> Result<(), String> {
    let (host, shared) = (FakeHost::default(), InProcessShared::default());
    let mut p = plugin(
        &host,
        &shared,
        r#"{"grpc_cut_grace":"300ms","rules":[{"name":"msgs","match":{"grpc":{}},"counts":"messages","limit":{"count":1,"per":"1h"}}]}"#,
    )?;
    let message = [0u8, 0, 0, 0, 1, 42];
    let grpc = [("content-type", "application/grpc")];
    // A server message cut: reset once the grace is over, not before.
    host.request("POST", "/chat.ChatService/Chat", &grpc);
    assert_eq!(p.on_request_headers(&host, 1), Step::Continue);
    host.respond(200);
    p.on_response_headers(&host, 1);
    host.chunk(Direction::Server, &[message, message].concat());
    assert_eq!(
        p.on_body(&host, 1, Direction::Server, 12, false),
        Step::Continue
    );
    assert_eq!(host.passed(Direction::Server), message);
    host.now.set(host.now.get() + 299_000_000);
    assert_eq!(p.on_tick(&host), vec![]);
    host.now.set(host.now.get() + 1_000_000);
    assert_eq!(p.on_tick(&host), vec![(1, Wake::Reset)]);
    assert_eq!(host.tick_millis.get(), 0);

    // A client message cut: the client's end of stream is never passed
    // on; the call is reset at once instead.
    host.request("POST", "/chat.ChatService/Chat", &grpc);
    assert_eq!(p.on_request_headers(&host, 2), Step::Continue);
    host.respond(200);
    p.on_response_headers(&host, 2);
    host.chunk(Direction::Client, &message);
    assert_eq!(
        p.on_body(&host, 2, Direction::Client, 6, false),
        Step::Continue
    );
    host.chunk(Direction::Client, &[]);
    assert_eq!(p.on_body(&host, 2, Direction::Client, 0, true), Step::Reset);
    assert_eq!(p.on_tick(&host), vec![], "already reset");
    Ok(())
}

#[test]
fn compression_is_kept_off_where_sizes_are_limited() -> Result<(), String> {
    let (host, shared) = (FakeHost::default(), InProcessShared::default());
    let mut p = plugin(
        &host,
        &shared,
        r#"{"rules":[
            {"name":"ws-size","match":{"websocket":true},"counts":"message_size","limit":{"count":1024}},
            {"name":"grpc-bytes","match":{"grpc":{}},"counts":"bytes","direction":"server","limit":{"count":4096,"per":"1m"}}]}"#,
    )?;
    let offer = (
        "sec-websocket-extensions",
        "permessage-deflate; client_max_window_bits",
    );
    host.request("GET", "/ws", &[("upgrade", "websocket"), offer]);
    assert_eq!(p.on_request_headers(&host, 1), Step::Continue);
    assert_eq!(host.request_header("sec-websocket-extensions"), None);

    let grpc = [
        ("content-type", "application/grpc"),
        ("grpc-accept-encoding", "gzip, identity"),
    ];
    host.request("POST", "/chat.ChatService/Chat", &grpc);
    assert_eq!(p.on_request_headers(&host, 2), Step::Continue);
    assert_eq!(
        host.request_header("grpc-accept-encoding").as_deref(),
        Some("identity")
    );
    host.respond(200);
    p.on_response_headers(&host, 2);
    // A compressed response message is refused all the same: status
    // UNIMPLEMENTED once the upstream ends the call.
    let compressed = [1u8, 0, 0, 0, 1, 42];
    host.chunk(Direction::Server, &compressed);
    assert_eq!(
        p.on_body(&host, 2, Direction::Server, 6, false),
        Step::Continue
    );
    assert_eq!(host.passed(Direction::Server), Vec::<u8>::new());
    p.on_response_trailers(&host, 2);
    assert_eq!(
        host.trailers
            .borrow()
            .get("grpc-status")
            .map(String::as_str),
        Some("12")
    );
    // A plain request message is not limited (the rule counts responses).
    host.chunk(Direction::Client, &compressed);
    assert_eq!(
        p.on_body(&host, 2, Direction::Client, 6, false),
        Step::Continue
    );
    assert_eq!(host.passed(Direction::Client), compressed);
    Ok(())
}

#[test]
fn websocket_messages_are_counted_after_the_upgrade() -> Result<(), String> {
    let (host, shared) = (FakeHost::default(), InProcessShared::default());
    let mut p = plugin(
        &host,
        &shared,
        r#"{"rules":[{"name":"room","match":{"websocket":true,"path":{"glob":"/room/*"}},"key":["path_segment:1"],"counts":"messages","direction":"client","limit":{"count":1,"per":"1h"}}]}"#,
    )?;
    let frame = [0x81u8, 0x81, 1, 2, 3, 4, b'a' ^ 1];
    host.request("GET", "/room/a", &[("upgrade", "websocket")]);
    assert_eq!(p.on_request_headers(&host, 1), Step::Continue);
    host.respond(101);
    p.on_response_headers(&host, 1);
    host.chunk(Direction::Client, &[frame, frame].concat());
    assert_eq!(
        p.on_body(&host, 1, Direction::Client, 14, false),
        Step::Continue
    );
    let passed = host.passed(Direction::Client);
    assert_eq!(&passed[..7], &frame);
    assert_eq!(passed[7], 0x88, "a close frame follows the allowed message");
    // Another room has its own budget.
    host.request("GET", "/room/b", &[("upgrade", "websocket")]);
    assert_eq!(p.on_request_headers(&host, 2), Step::Continue);
    host.respond(101);
    p.on_response_headers(&host, 2);
    host.chunk(Direction::Client, &frame);
    assert_eq!(
        p.on_body(&host, 2, Direction::Client, 7, false),
        Step::Continue
    );
    assert_eq!(host.passed(Direction::Client), frame);
    Ok(())
}

#[test]
fn two_vms_passing_messages_in_any_order_share_one_message_budget() -> Result<(), String> {
    // Each VM starts a message from its own last write at the slot: the
    // other's writes in between must still count.
    let json = r#"{"rules":[{"name":"msgs","match":{"websocket":true},"counts":"messages","direction":"client","limit":{"count":20,"per":"1h"}}]}"#;
    let frame = [0x81u8, 0x81, 1, 2, 3, 4, b'a' ^ 1];
    for pattern in [[0u8, 0, 1], [0, 1, 1], [0, 1, 0]] {
        let (host, shared) = (FakeHost::default(), InProcessShared::default());
        let mut vms = [plugin(&host, &shared, json)?, plugin(&host, &shared, json)?];
        for vm in &mut vms {
            host.request("GET", "/ws", &[("upgrade", "websocket")]);
            assert_eq!(vm.on_request_headers(&host, 1), Step::Continue);
            host.respond(101);
            vm.on_response_headers(&host, 1);
        }
        let mut passed = 0;
        for i in 0..30 {
            let Some(vm) = vms.get_mut(usize::from(pattern[i % 3])) else {
                return Err("no such VM".into());
            };
            host.chunk(Direction::Client, &frame);
            vm.on_body(&host, 1, Direction::Client, frame.len(), false);
            if host.passed(Direction::Client) == frame {
                passed += 1;
            }
        }
        assert_eq!(passed, 20, "pattern {pattern:?}");
    }
    Ok(())
}

#[test]
fn a_websocket_direction_no_rule_counts_still_gets_the_close_it_is_owed() -> Result<(), String> {
    let (host, shared) = (FakeHost::default(), InProcessShared::default());
    let mut p = plugin(
        &host,
        &shared,
        r#"{"rules":[{"name":"up","match":{"websocket":true},"counts":"messages","direction":"client","limit":{"count":1,"per":"1h"}}]}"#,
    )?;
    let client_frame = [0x81u8, 0x81, 1, 2, 3, 4, b'a' ^ 1];
    let server_frame = [0x81u8, 0x01, b'b'];
    host.request("GET", "/ws", &[("upgrade", "websocket")]);
    assert_eq!(p.on_request_headers(&host, 1), Step::Continue);
    host.respond(101);
    p.on_response_headers(&host, 1);
    // The server's messages count for no rule: passed on as they are.
    for _ in 0..3 {
        host.chunk(Direction::Server, &server_frame);
        assert_eq!(
            p.on_body(&host, 1, Direction::Server, 3, false),
            Step::Continue
        );
        assert_eq!(host.passed(Direction::Server), server_frame);
    }
    host.chunk(Direction::Client, &[client_frame, client_frame].concat());
    assert_eq!(
        p.on_body(&host, 1, Direction::Client, 14, false),
        Step::Continue
    );
    let passed = host.passed(Direction::Client);
    assert_eq!(passed.get(..7), Some(&client_frame[..]));
    assert_eq!(passed.get(7), Some(&0x88), "closed towards the upstream");
    // The client is owed the close too: the server's next chunk becomes it,
    // and nothing the server sends after reaches the client.
    host.chunk(Direction::Server, &server_frame);
    assert_eq!(
        p.on_body(&host, 1, Direction::Server, 3, false),
        Step::Continue
    );
    let close = host.passed(Direction::Server);
    assert_eq!(close.first(), Some(&0x88), "{close:?}");
    assert_eq!(
        close.get(1).map(|b| b & 0x80),
        Some(0),
        "unmasked towards the client"
    );
    host.chunk(Direction::Server, &server_frame);
    assert_eq!(
        p.on_body(&host, 1, Direction::Server, 3, false),
        Step::Continue
    );
    assert_eq!(host.passed(Direction::Server), Vec::<u8>::new());
    Ok(())
}

/// Asks as client `ip` (behind one trusted proxy): whether allowed.
fn ask_as(p: &mut Plugin<&InProcessShared>, host: &FakeHost, ip: &str) -> bool {
    host.request("GET", "/", &[("x-forwarded-for", ip)]);
    p.on_request_headers(host, 1) == Step::Continue
}

const FLOODED: &str = r#"{"rules":[{"name":"r","limit":{"count":5,"per":"1h"},"algorithm":"fixed_window"}],"client_ip":{"trusted_hops":1},"max_keys":64}"#;

#[test]
fn a_flood_of_new_clients_does_not_reset_a_limited_client() -> Result<(), String> {
    let (host, shared) = (FakeHost::default(), InProcessShared::default());
    let mut p = plugin(&host, &shared, FLOODED)?;
    let allowed = (0..10)
        .filter(|_| ask_as(&mut p, &host, "192.0.2.1"))
        .count();
    assert_eq!(allowed, 5);
    for i in 0..2_000u32 {
        let [_, _, a, b] = i.to_be_bytes();
        host.now.set(host.now.get() + 1_000_000);
        let ip = format!("10.1.{a}.{b}");
        ask_as(&mut p, &host, &ip);
        ask_as(&mut p, &host, &ip);
    }
    let allowed = (0..10)
        .filter(|_| ask_as(&mut p, &host, "192.0.2.1"))
        .count();
    assert_eq!(allowed, 0, "the limited client got a fresh allowance");
    assert!(host.counter("sluice_http.live_evictions") > 0);
    Ok(())
}

#[test]
fn keys_aimed_with_the_configuration_cannot_evict_a_limited_client() -> Result<(), String> {
    let (host, shared) = (FakeHost::default(), InProcessShared::default());
    let mut p = plugin(&host, &shared, FLOODED)?;
    // What an attacker could compute from a published configuration
    // if the seed came from it (keys are length-prefixed parts).
    let known_seed: [u8; 16] = core::array::from_fn(|i| FLOODED.as_bytes()[i]);
    let home = |ip: &str| hash(&known_seed, format!("{}:{ip}", ip.len()).as_bytes()) % 64;
    let victim = "192.0.2.1";
    // Keys with the victim's very home slot: they evict within its group.
    let aimed: Vec<String> = (0..=255u8)
        .flat_map(|a| (0..=255u8).map(move |b| format!("10.2.{a}.{b}")))
        .filter(|ip| home(ip) == home(victim))
        .take(20)
        .collect();
    assert_eq!(aimed.len(), 20);
    let allowed = (0..10).filter(|_| ask_as(&mut p, &host, victim)).count();
    assert_eq!(allowed, 5);
    for ip in &aimed {
        host.now.set(host.now.get() + 1_000_000);
        ask_as(&mut p, &host, ip);
        ask_as(&mut p, &host, ip);
    }
    let allowed = (0..10).filter(|_| ask_as(&mut p, &host, victim)).count();
    assert_eq!(allowed, 0);
    assert_eq!(PROBES, 4, "the group the aimed keys crowd");
    Ok(())
}

#[test]
fn a_flood_of_new_clients_does_not_free_a_clients_open_connections() -> Result<(), String> {
    let (host, shared) = (FakeHost::default(), InProcessShared::default());
    let mut p = plugin(
        &host,
        &shared,
        r#"{"rules":[{"name":"open","match":{"websocket":true},"counts":"in_flight","limit":{"count":2}}],"client_ip":{"trusted_hops":1},"max_keys":4}"#,
    )?;
    let open = |p: &mut Plugin<&InProcessShared>, id: u32, ip: &str| {
        host.request(
            "GET",
            "/ws",
            &[("upgrade", "websocket"), ("x-forwarded-for", ip)],
        );
        p.on_request_headers(&host, id) == Step::Continue
    };
    let victim = "192.0.2.1";
    assert!(open(&mut p, 1, victim) && open(&mut p, 2, victim));
    for i in 0..8 {
        host.now.set(host.now.get() + SEC);
        open(&mut p, 10 + i, &format!("10.1.0.{i}"));
    }
    assert!(
        !open(&mut p, 3, victim),
        "the victim got its connections back"
    );
    assert_eq!(host.counter("sluice_http.live_evictions"), 0);
    // Its connections' ends give back exactly what they took.
    p.on_done(&host, 1);
    assert!(open(&mut p, 4, victim));
    assert!(!open(&mut p, 5, victim));
    Ok(())
}

#[test]
fn the_seed_is_random_stored_once_and_shared_by_every_vm() -> Result<(), String> {
    let (host, shared) = (FakeHost::default(), InProcessShared::default());
    plugin(&host, &shared, FLOODED)?;
    let stored = (&shared).get(SEED_NAME).map_err(|e| e.to_string())?.0;
    // 128 bits: two draws (the fake host gives the same one twice).
    let draw = 0x0123_4567_89ab_cdef_u64.to_le_bytes();
    assert_eq!(stored, Some([draw, draw].concat()));
    // Later VMs read it: they need no randomness and do not replace it.
    host.random.set(None);
    Plugin::configure(&host, &shared, FLOODED.as_bytes()).map_err(|e| e.to_string())?;
    let again = (&shared).get(SEED_NAME).map_err(|e| e.to_string())?.0;
    assert_eq!(again, stored);
    // Without a stored seed or a random source, the filter refuses to start.
    let err = Plugin::configure(&host, &InProcessShared::default(), FLOODED.as_bytes())
        .err()
        .map(|e| e.to_string());
    assert_eq!(
        err.as_deref(),
        Some("cannot set up shared counters: state store unavailable: no random source for the key hash seed")
    );
    Ok(())
}

#[test]
fn new_keys_without_room_share_the_overflow_or_are_refused_and_counted() -> Result<(), String> {
    for (when_full, allowed_new, stat) in [
        ("overflow", true, "sluice_http.new_keys_overflowed"),
        ("refuse", false, "sluice_http.new_keys_refused"),
    ] {
        let (host, shared) = (FakeHost::default(), InProcessShared::default());
        let json = format!(
            r#"{{"rules":[{{"name":"r","limit":{{"count":1,"per":"1h"}}}}],"client_ip":{{"trusted_hops":1}},"max_keys":1,"when_keys_full":"{when_full}"}}"#
        );
        let mut p = plugin(&host, &shared, &json)?;
        assert!(ask_as(&mut p, &host, "192.0.2.1"));
        assert!(
            !ask_as(&mut p, &host, "192.0.2.1"),
            "limited: keeps its slot"
        );
        assert_eq!(
            ask_as(&mut p, &host, "192.0.2.2"),
            allowed_new,
            "{when_full}"
        );
        assert!(!ask_as(&mut p, &host, "192.0.2.3"), "{when_full}");
        assert_eq!(host.counter(stat), 2, "{when_full}");
    }
    Ok(())
}

#[test]
fn configuring_many_rules_with_a_large_max_keys_creates_no_slots() -> Result<(), String> {
    let (host, shared) = (FakeHost::default(), InProcessShared::default());
    let rules: Vec<String> = (0..1_000)
        .map(|i| format!(r#"{{"name":"r{i}","limit":{{"count":1,"per":"1s"}}}}"#))
        .collect();
    let json = format!(r#"{{"rules":[{}],"max_keys":2000}}"#, rules.join(","));
    plugin(&host, &shared, &json)?;
    assert_eq!(
        shared.len(),
        1 + 2 * 1_000,
        "the seed, then a lock and an overflow slot per rule"
    );
    Ok(())
}

#[test]
fn invalid_config_names_the_field() -> Result<(), String> {
    let (host, shared) = (FakeHost::default(), InProcessShared::default());
    let err = Plugin::configure(
        &host,
        &shared,
        br#"{"rules":[{"name":"r","limit":{"count":1,"per":"0s"}}]}"#,
    )
    .unwrap_err()
    .to_string();
    assert_eq!(
        err,
        "invalid sluice configuration: rules[0].limit.per: must be at least 1ms"
    );
    assert!(Plugin::configure(&host, &shared, b"\xff\xfe").is_err());
    Ok(())
}

#[test]
fn degrade_marks_over_limit_requests_for_the_upstream_and_strips_spoofs() -> Result<(), String> {
    let (host, shared) = (FakeHost::default(), InProcessShared::default());
    let mut p = plugin(
        &host,
        &shared,
        r#"{"rules":[
            {"name":"cheap","limit":{"count":1,"per":"1h"},"algorithm":"fixed_window","action":"degrade"},
            {"name":"search","match":{"path":{"prefix":"/search"}},"limit":{"count":1,"per":"1h"},"algorithm":"fixed_window","action":"degrade"},
            {"name":"hard","limit":{"count":3,"per":"1h"},"algorithm":"fixed_window"}
        ],"headers":{"on_allowed":false}}"#,
    )?;
    // Within the limit: a client's own header is removed, none added.
    host.request("GET", "/search", &[("x-sluice-limited", "none")]);
    assert_eq!(p.on_request_headers(&host, 1), Step::Continue);
    assert_eq!(host.request_header("x-sluice-limited"), None);
    host.respond(200);
    p.on_response_headers(&host, 1);
    assert_eq!(host.response_header("ratelimit"), None);
    // Over both degrade rules: marked with both, told its limits, no retry.
    host.request("GET", "/search", &[("x-sluice-limited", "")]);
    assert_eq!(p.on_request_headers(&host, 2), Step::Continue);
    assert_eq!(
        host.request_header("x-sluice-limited").as_deref(),
        Some("cheap,search")
    );
    host.respond(200);
    p.on_response_headers(&host, 2);
    let state = host.response_header("ratelimit").unwrap_or_default();
    assert!(
        state.starts_with("\"cheap\";r=0;") && state.contains("\"search\";r=0;"),
        "{state}"
    );
    assert_eq!(host.response_header("retry-after"), None);
    host.request("GET", "/other", &[]);
    assert_eq!(p.on_request_headers(&host, 3), Step::Continue);
    assert_eq!(
        host.request_header("x-sluice-limited").as_deref(),
        Some("cheap")
    );
    // The reject rule wins once over.
    host.request("GET", "/other", &[("x-sluice-limited", "cheap")]);
    let r = reply(p.on_request_headers(&host, 4))?;
    assert_eq!((r.status, header(&r, "retry-after").is_some()), (429, true));
    p.flush_metrics(&host);
    assert_eq!(host.counter("sluice_http.rule.cheap.outcome.degraded"), 2);
    assert_eq!(host.counter("sluice_http.rule.search.outcome.degraded"), 1);
    assert_eq!(host.counter("sluice_http.rule.hard.outcome.allowed"), 3);
    assert_eq!(host.counter("sluice_http.rule.hard.outcome.limited"), 1);
    Ok(())
}

#[test]
fn a_spoofed_degrade_header_is_removed_even_where_no_rule_applies() -> Result<(), String> {
    let (host, shared) = (FakeHost::default(), InProcessShared::default());
    let mut p = plugin(
        &host,
        &shared,
        r#"{"rules":[{"name":"cheap","match":{"path":{"prefix":"/api/"}},"limit":{"count":1,"per":"1h"},"action":"degrade"}],"degrade_header":"x-cheaper"}"#,
    )?;
    host.request(
        "GET",
        "/static",
        &[("x-cheaper", "cheap"), ("x-sluice-limited", "kept")],
    );
    assert_eq!(p.on_request_headers(&host, 1), Step::Continue);
    assert_eq!(host.request_header("x-cheaper"), None);
    assert_eq!(
        host.request_header("x-sluice-limited").as_deref(),
        Some("kept"),
        "only the configured name is Sluice's"
    );
    Ok(())
}

#[test]
fn a_blocked_key_is_refused_with_the_time_its_block_has_left() -> Result<(), String> {
    let (host, shared) = (FakeHost::default(), InProcessShared::default());
    let json = r#"{"rules":[{"name":"login","limit":{"count":2,"per":"1s"},"algorithm":"fixed_window","block_duration":"10m"}]}"#;
    let mut a = plugin(&host, &shared, json)?;
    let mut b = plugin(&host, &shared, json)?;
    for id in 0..2 {
        host.request("POST", "/login", &[]);
        assert_eq!(a.on_request_headers(&host, id), Step::Continue);
    }
    host.request("POST", "/login", &[]);
    let r = reply(a.on_request_headers(&host, 2))?;
    assert_eq!(header(&r, "retry-after"), Some("600"));
    assert_eq!(header(&r, "ratelimit"), Some("\"login\";r=0;t=600"));
    // Another worker, a minute later: the budget is back, the block is not.
    host.now.set(host.now.get() + 60 * SEC);
    host.request("POST", "/login", &[]);
    let r = reply(b.on_request_headers(&host, 3))?;
    assert_eq!(header(&r, "retry-after"), Some("540"));
    a.flush_metrics(&host);
    b.flush_metrics(&host);
    assert_eq!(host.counter("sluice_http.rule.login.outcome.limited"), 2);
    host.now.set(host.now.get() + 540 * SEC);
    host.request("POST", "/login", &[]);
    assert_eq!(b.on_request_headers(&host, 4), Step::Continue);
    Ok(())
}

/// Admits request `id` (GET /x) from its headers to its end.
fn admit_one(p: &mut Plugin<&InProcessShared>, host: &FakeHost, id: u32) {
    host.request("GET", "/x", &[]);
    assert_eq!(p.on_request_headers(host, id), Step::Continue);
    p.on_done(host, id);
}

#[test]
fn stats_reach_the_host_in_batches_and_a_tick_settles_them() -> Result<(), String> {
    let (host, shared) = (FakeHost::default(), InProcessShared::default());
    let json = r#"{"rules":[{"name":"api","limit":{"count":100,"per":"1m"}}]}"#;
    let mut p = plugin(&host, &shared, json)?;
    let allowed = || host.counter("sluice_http.rule.api.outcome.allowed");
    admit_one(&mut p, &host, 1);
    assert_eq!(allowed(), 1, "the first request flushes");
    assert_eq!(host.tick_millis.get(), 0, "nothing waits");
    admit_one(&mut p, &host, 2);
    admit_one(&mut p, &host, 3);
    assert_eq!(allowed(), 1, "within a second of the last flush: waiting");
    assert_eq!(host.tick_millis.get(), crate::metrics::FLUSH_TICK_MILLIS);
    host.now.set(host.now.get() + SEC);
    admit_one(&mut p, &host, 4);
    assert_eq!(allowed(), 4, "a second later, a request flushes");
    admit_one(&mut p, &host, 5);
    assert_eq!(p.on_tick(&host), vec![]);
    assert_eq!(allowed(), 5, "the tick flushes");
    assert_eq!(host.tick_millis.get(), 0, "nothing waits: no more ticks");
    Ok(())
}
