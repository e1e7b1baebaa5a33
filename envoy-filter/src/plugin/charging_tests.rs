//! Costs read from request headers, usage charged after the response, and
//! gRPC statuses excluded from counting, against a scripted host.

use super::tests::{plugin, reply};
use super::*;
use crate::host::fake::FakeHost;
use sluice_core::store::InProcessShared;

/// One request with `headers` as context `id`: whether it was let through.
fn admitted(
    p: &mut Plugin<&InProcessShared>,
    host: &FakeHost,
    id: u32,
    headers: &[(&str, &str)],
) -> bool {
    host.request("POST", "/v1/chat", headers);
    p.on_request_headers(host, id) == Step::Continue
}

#[test]
fn a_request_header_sets_the_cost_within_max() -> Result<(), String> {
    let (host, shared) = (FakeHost::default(), InProcessShared::default());
    let mut p = plugin(
        &host,
        &shared,
        r#"{"rules":[{"name":"batch","limit":{"count":100,"per":"1h"},"cost_from":{"header":"x-cost","max":60}}],
            "headers":{"sets":["x_ratelimit"]}}"#,
    )?;
    assert!(admitted(&mut p, &host, 1, &[("x-cost", "30")]));
    // Far above max: charged max (60), never the default.
    assert!(admitted(
        &mut p,
        &host,
        2,
        &[("x-cost", "18446744073709551616000")]
    ));
    host.respond(200);
    p.on_response_headers(&host, 2);
    assert_eq!(
        host.response_header("x-ratelimit-remaining").as_deref(),
        Some("10")
    );
    // Unreadable: the rule's cost (1).
    assert!(admitted(&mut p, &host, 3, &[("x-cost", "a lot")]));
    assert!(!admitted(&mut p, &host, 4, &[("x-cost", "10")]));
    assert!(admitted(&mut p, &host, 5, &[("x-cost", "9")]));
    Ok(())
}

const LLM: &str = r#"{"rules":[{"name":"llm","key":["header:x-api-key"],"limit":{"count":1000,"per":"1h"},
    "charge":{"response_header":"x-tokens-used","max":5000}}],"exclude_statuses":["5xx"],
    "headers":{"sets":["x_ratelimit"]}}"#;

#[test]
fn usage_reported_in_a_header_is_charged_into_debt() -> Result<(), String> {
    let (host, shared) = (FakeHost::default(), InProcessShared::default());
    let mut p = plugin(&host, &shared, LLM)?;
    let key = [("x-api-key", "k1")];
    assert!(admitted(&mut p, &host, 1, &key));
    host.respond(200);
    host.set_response_header("x-tokens-used", "600");
    p.on_response_headers(&host, 1);
    // The headers show the admission (1 taken); the usage counts from now.
    assert_eq!(
        host.response_header("x-ratelimit-remaining").as_deref(),
        Some("999")
    );
    p.on_done(&host, 1);
    assert!(admitted(&mut p, &host, 2, &key));
    host.respond(200);
    // Above max: charged max.
    host.set_response_header("x-tokens-used", "99999999");
    p.on_response_headers(&host, 2);
    assert_eq!(
        host.response_header("x-ratelimit-remaining").as_deref(),
        Some("399")
    );
    p.on_done(&host, 2);
    // 5600 spent of 1000: a debt of 4600 at 1000 an hour, repaid after 4.6 h + 1 token.
    host.request("POST", "/v1/chat", &key);
    let refused = reply(p.on_request_headers(&host, 3))?;
    assert_eq!(refused.status, 429);
    let retry = refused
        .headers
        .iter()
        .find(|(n, _)| *n == "retry-after")
        .map(|(_, v)| v.clone());
    assert_eq!(retry.as_deref(), Some("16564"));
    // Another key is not in debt.
    assert!(admitted(&mut p, &host, 4, &[("x-api-key", "k2")]));
    // Repaid at the limit's pace.
    host.now.set(host.now.get() + 16_564 * 1_000_000_000);
    assert!(admitted(&mut p, &host, 5, &key));
    Ok(())
}

#[test]
fn a_missing_report_keeps_the_cost_and_an_excluded_status_charges_nothing() -> Result<(), String> {
    let (host, shared) = (FakeHost::default(), InProcessShared::default());
    let mut p = plugin(&host, &shared, LLM)?;
    let key = [("x-api-key", "k1")];
    for id in 1..=3 {
        assert!(admitted(&mut p, &host, id, &key));
        host.respond(503);
        host.set_response_header("x-tokens-used", "900");
        p.on_response_headers(&host, id);
        p.on_done(&host, id);
    }
    // Nothing reported (or nonsense): the request's cost of 1 stands.
    for (id, report) in [(4, None), (5, Some("n/a")), (6, Some("0"))] {
        assert!(admitted(&mut p, &host, id, &key));
        host.respond(200);
        if let Some(report) = report {
            host.set_response_header("x-tokens-used", report);
        }
        p.on_response_headers(&host, id);
        p.on_done(&host, id);
    }
    host.request("POST", "/v1/chat", &key);
    assert_eq!(p.on_request_headers(&host, 7), Step::Continue);
    host.respond(200);
    p.on_response_headers(&host, 7);
    // 1000 − 3 (two stood, "0" charged nothing, this one) − 0 (excluded).
    assert_eq!(
        host.response_header("x-ratelimit-remaining").as_deref(),
        Some("997")
    );
    Ok(())
}

const GRPC: &str = r#"{"rules":[{"name":"gen","match":{"grpc":{}},"limit":{"count":100,"per":"1h"},
    "charge":{"response_trailer":"x-tokens-used","max":1000}}],
    "exclude_statuses":["grpc:UNAVAILABLE","grpc:4"],"headers":{"sets":["x_ratelimit"]}}"#;

/// A gRPC call as context `id`, answered with `headers`, then `trailers`
/// (none: a trailers-only response); the remaining permits the next call sees.
fn grpc_call(
    p: &mut Plugin<&InProcessShared>,
    host: &FakeHost,
    id: u32,
    headers: &[(&str, &str)],
    trailers: Option<&[(&str, &str)]>,
) -> Result<(), String> {
    host.request(
        "POST",
        "/gen.Gen/Complete",
        &[("content-type", "application/grpc")],
    );
    if p.on_request_headers(host, id) != Step::Continue {
        return Err(format!("call {id} refused"));
    }
    host.respond(200);
    for (n, v) in headers {
        host.set_response_header(n, v);
    }
    p.on_response_headers(host, id);
    if let Some(trailers) = trailers {
        for (n, v) in trailers {
            host.set_response_trailer(n, v);
        }
        p.on_response_trailers(host, id);
    }
    p.on_done(host, id);
    Ok(())
}

#[test]
fn grpc_usage_in_trailers_and_failed_calls_refunded() -> Result<(), String> {
    let (host, shared) = (FakeHost::default(), InProcessShared::default());
    let mut p = plugin(&host, &shared, GRPC)?;
    // Usage in trailers: 40.
    grpc_call(
        &mut p,
        &host,
        1,
        &[],
        Some(&[("grpc-status", "0"), ("x-tokens-used", "40")]),
    )?;
    // Failed with an excluded status in trailers, or trailers-only:
    // refunded, usage and all.
    grpc_call(
        &mut p,
        &host,
        2,
        &[],
        Some(&[("grpc-status", "14"), ("x-tokens-used", "30")]),
    )?;
    grpc_call(&mut p, &host, 3, &[("grpc-status", "4")], None)?;
    // A status not excluded (INTERNAL) counts; a trailers-only response
    // carries its usage in the headers.
    grpc_call(
        &mut p,
        &host,
        4,
        &[("grpc-status", "13"), ("x-tokens-used", "9")],
        None,
    )?;
    grpc_call(&mut p, &host, 5, &[], Some(&[("grpc-status", "0")]))?;
    assert_eq!(
        host.response_header("x-ratelimit-remaining").as_deref(),
        Some("50")
    );
    Ok(())
}
