//! Synced rules in exact mode against a scripted host: the call, the
//! answers, the failure modes, and all-or-nothing with the local rules.

use sluice_core::store::InProcessShared;
use sluice_core::time::Span;
use sluice_proto::prost::Message;
use sluice_proto::quota::v1::{
    CheckGroup, CheckItem, CheckRequest, CheckResponse, Code, GroupResult, ItemResult, Source,
};
use sluice_proto::Duration;

use super::*;
use crate::host::fake::FakeHost;
use crate::quota::{GRPC_DEADLINE_EXCEEDED, METHOD, SERVICE};

const SEC: u64 = 1_000_000_000;
const UNAVAILABLE: u32 = 14;

/// A local rule of one request per minute per client, and synced rules:
/// `fleet` and `keyed` in domain `edge`, `other` in domain `core`, each
/// with the failure handling `failure` (JSON members of `sync`).
fn config(failure: &str) -> String {
    format!(
        r#"{{"rules":[
            {{"name":"local","limit":{{"count":1,"per":"1m"}},"algorithm":"fixed_window"}},
            {{"name":"fleet","sync":{{"mode":"exact","domain":"edge","timeout":"80ms"{failure}}}}},
            {{"name":"keyed","key":["header:x-api-key"],"cost":2,
              "sync":{{"mode":"exact","domain":"edge","timeout":"30ms"{failure}}}}},
            {{"name":"other","match":{{"path":{{"prefix":"/core"}}}},
              "sync":{{"mode":"exact","domain":"core"{failure}}}}}
        ]}}"#
    )
}

fn plugin<'a>(
    host: &FakeHost,
    shared: &'a InProcessShared,
    json: &str,
) -> Result<Plugin<&'a InProcessShared>, String> {
    host.now.set(1_800_000_000 * SEC);
    host.random.set(Some(7));
    *host.peer.borrow_mut() = Some("10.0.0.7:41234".into());
    Plugin::configure(host, shared, json.as_bytes()).map_err(|e| e.to_string())
}

fn item(code: Code, remaining: u64, retry_secs: Option<i64>) -> ItemResult {
    let secs = |seconds| Duration { seconds, nanos: 0 };
    ItemResult {
        code: code as i32,
        limit: 10,
        window: Some(secs(60)),
        remaining,
        reset_after: Some(secs(30)),
        retry_after: retry_secs.map(secs),
    }
}

fn answer(groups: Vec<(bool, Vec<ItemResult>)>) -> Vec<u8> {
    CheckResponse {
        groups: groups
            .into_iter()
            .map(|(allowed, items)| GroupResult {
                allowed,
                items,
                headers: Vec::new(),
                source: Source::Storage as i32,
            })
            .collect(),
        controls: None,
    }
    .encode_to_vec()
}

fn reply_of(wake: Option<(u32, Wake)>, id: u32) -> Result<LocalReply, String> {
    match wake {
        Some((got, Wake::Reply(r))) if got == id => Ok(r),
        other => Err(format!("expected a reply to {id}, got {other:?}")),
    }
}

fn body(reply: &LocalReply) -> serde_json::Value {
    serde_json::from_slice(&reply.body).unwrap_or_default()
}

#[test]
fn one_call_carries_every_synced_rule_grouped_by_domain() -> Result<(), String> {
    let (host, shared) = (FakeHost::default(), InProcessShared::default());
    let mut p = plugin(&host, &shared, &config(""))?;
    host.request("GET", "/core/x", &[("x-api-key", "k1")]);
    assert_eq!(p.on_request_headers(&host, 1), Step::Pause);
    let calls = host.grpc_calls.borrow();
    assert_eq!(calls.len(), 1);
    let call = &calls[0];
    assert_eq!(
        (
            call.cluster.as_str(),
            call.service.as_str(),
            call.method.as_str()
        ),
        ("sluice_quota", SERVICE, METHOD)
    );
    assert_eq!(call.timeout, Span::from_millis(30), "the shortest timeout");
    let sent = CheckRequest::decode(call.message.as_slice()).map_err(|e| e.to_string())?;
    let item = |rule: &str, key: &str, cost| CheckItem {
        rule: rule.into(),
        key: key.into(),
        cost,
    };
    assert_eq!(
        sent,
        CheckRequest {
            groups: vec![
                CheckGroup {
                    domain: "edge".into(),
                    items: vec![item("fleet", "8:10.0.0.7", 1), item("keyed", "2:k1", 2)],
                },
                CheckGroup {
                    domain: "core".into(),
                    items: vec![item("other", "8:10.0.0.7", 1)],
                },
            ],
            // No access controls yet: the answer is to carry them.
            controls_version: Some(0),
            // Headers come from the items' numbers.
            omit_headers: true,
        }
    );
    Ok(())
}

#[test]
fn an_allowing_answer_admits_with_local_and_remote_headers() -> Result<(), String> {
    let (host, shared) = (FakeHost::default(), InProcessShared::default());
    let mut p = plugin(&host, &shared, &config(""))?;
    host.request("GET", "/x", &[("x-api-key", "k1")]);
    assert_eq!(p.on_request_headers(&host, 1), Step::Pause);
    let ok = answer(vec![(
        true,
        vec![item(Code::Ok, 7, None), item(Code::Ok, 2, None)],
    )]);
    assert_eq!(
        p.on_quota_answer(&host, 1, Ok(&ok)),
        Some((1, Wake::Resume))
    );
    host.respond(200);
    p.on_response_headers(&host, 1);
    assert_eq!(
        host.response_header("ratelimit").as_deref(),
        Some("\"local\";r=0;t=60, \"fleet\";r=7;t=30, \"keyed\";r=2;t=30")
    );
    p.flush_metrics(&host);
    assert_eq!(host.counter("sluice_sync.rule.fleet.outcome.ok"), 1);
    assert_eq!(host.counter("sluice_http.rule.keyed.outcome.allowed"), 1);
    assert_eq!(p.asking(), 0);
    Ok(())
}

#[test]
fn a_remote_refusal_gives_the_local_permit_back() -> Result<(), String> {
    let (host, shared) = (FakeHost::default(), InProcessShared::default());
    let mut p = plugin(&host, &shared, &config(""))?;
    host.request("GET", "/x", &[("x-api-key", "k1")]);
    assert_eq!(p.on_request_headers(&host, 1), Step::Pause);
    let refused = answer(vec![(
        false,
        vec![item(Code::Ok, 7, None), item(Code::OverLimit, 0, Some(12))],
    )]);
    let r = reply_of(p.on_quota_answer(&host, 1, Ok(&refused)), 1)?;
    assert_eq!(r.status, 429);
    assert_eq!(body(&r)["rule"], "keyed");
    assert!(r.headers.contains(&("retry-after", "12".into())));
    p.flush_metrics(&host);
    assert_eq!(host.counter("sluice_http.rule.keyed.outcome.limited"), 1);
    // The local rule (one per minute) has its permit back: the next
    // request passes it and asks the quota server again.
    assert_eq!(p.on_request_headers(&host, 2), Step::Pause);
    assert_eq!(host.grpc_calls.borrow().len(), 2);
    Ok(())
}

#[test]
fn a_local_refusal_makes_no_call() -> Result<(), String> {
    let (host, shared) = (FakeHost::default(), InProcessShared::default());
    let mut p = plugin(&host, &shared, &config(""))?;
    host.request("GET", "/x", &[("x-api-key", "k1")]);
    assert_eq!(p.on_request_headers(&host, 1), Step::Pause);
    let r = match p.on_request_headers(&host, 2) {
        Step::Reply(r) => r,
        other => return Err(format!("expected a refusal, got {other:?}")),
    };
    assert_eq!(body(&r)["rule"], "local");
    assert_eq!(host.grpc_calls.borrow().len(), 1);
    Ok(())
}

#[test]
fn failing_open_lets_requests_through_and_counts_why() -> Result<(), String> {
    let (host, shared) = (FakeHost::default(), InProcessShared::default());
    let mut p = plugin(&host, &shared, &config(""))?;
    host.request("GET", "/x", &[("x-api-key", "k1")]);
    assert_eq!(p.on_request_headers(&host, 1), Step::Pause);
    assert_eq!(
        p.on_quota_answer(&host, 1, Err(UNAVAILABLE)),
        Some((1, Wake::Resume))
    );
    p.flush_metrics(&host);
    assert_eq!(
        host.counter("sluice_sync.rule.fleet.outcome.failed_open"),
        1
    );
    assert_eq!(
        host.counter("sluice_sync.rule.keyed.outcome.failed_open"),
        1
    );
    // A timeout is counted as such; an unreadable answer as a failure.
    host.now.set(host.now.get() + 60 * SEC);
    assert_eq!(p.on_request_headers(&host, 2), Step::Pause);
    assert_eq!(
        p.on_quota_answer(&host, 2, Err(GRPC_DEADLINE_EXCEEDED)),
        Some((2, Wake::Resume))
    );
    p.flush_metrics(&host);
    assert_eq!(host.counter("sluice_sync.rule.fleet.outcome.timeout"), 1);
    host.now.set(host.now.get() + 60 * SEC);
    assert_eq!(p.on_request_headers(&host, 3), Step::Pause);
    assert_eq!(
        p.on_quota_answer(&host, 3, Ok(b"\xff\xff")),
        Some((3, Wake::Resume))
    );
    p.flush_metrics(&host);
    assert_eq!(
        host.counter("sluice_sync.rule.fleet.outcome.failed_open"),
        2
    );
    // A late answer for a settled call is ignored.
    assert_eq!(p.on_quota_answer(&host, 3, Err(UNAVAILABLE)), None);
    // Envoy ends a call whose timeout passed with UNAVAILABLE, its timer
    // firing a little early: in the last quarter of the shortest timeout
    // (30 ms), that is a timeout too; before, a failure.
    for (token, after_ms, timeouts, failures) in [(4, 23, 2, 2), (5, 20, 2, 3)] {
        host.now.set(host.now.get() + 60 * SEC);
        assert_eq!(p.on_request_headers(&host, token), Step::Pause);
        host.now.set(host.now.get() + after_ms * 1_000_000);
        assert_eq!(
            p.on_quota_answer(&host, token, Err(UNAVAILABLE)),
            Some((token, Wake::Resume))
        );
        p.flush_metrics(&host);
        assert_eq!(
            host.counter("sluice_sync.rule.fleet.outcome.timeout"),
            timeouts
        );
        assert_eq!(
            host.counter("sluice_sync.rule.fleet.outcome.failed_open"),
            failures
        );
    }
    Ok(())
}

#[test]
fn failing_closed_refuses_and_gives_the_local_permit_back() -> Result<(), String> {
    let (host, shared) = (FakeHost::default(), InProcessShared::default());
    let mut p = plugin(&host, &shared, &config(r#","failure_mode":"closed""#))?;
    host.request("GET", "/x", &[("x-api-key", "k1")]);
    assert_eq!(p.on_request_headers(&host, 1), Step::Pause);
    let r = reply_of(p.on_quota_answer(&host, 1, Err(GRPC_DEADLINE_EXCEEDED)), 1)?;
    assert_eq!(r.status, 429);
    assert_eq!(body(&r)["error"], "rate_limit_unavailable");
    assert_eq!(body(&r)["rule"], "fleet");
    p.flush_metrics(&host);
    assert_eq!(host.counter("sluice_sync.rule.fleet.outcome.timeout"), 1);
    // The local permit is back: the next request asks again.
    assert_eq!(p.on_request_headers(&host, 2), Step::Pause);
    // Envoy refusing to start the call (unknown cluster) fails at once.
    host.refuse_grpc.set(true);
    host.now.set(host.now.get() + 60 * SEC);
    let r = match p.on_request_headers(&host, 3) {
        Step::Reply(r) => r,
        other => return Err(format!("expected a refusal, got {other:?}")),
    };
    assert_eq!(body(&r)["error"], "rate_limit_unavailable");
    p.flush_metrics(&host);
    assert_eq!(
        host.counter("sluice_sync.rule.fleet.outcome.failed_closed"),
        1
    );
    // gRPC calls get RESOURCE_EXHAUSTED.
    host.refuse_grpc.set(false);
    host.now.set(host.now.get() + 60 * SEC);
    host.request("POST", "/a.B/C", &[("content-type", "application/grpc")]);
    assert_eq!(p.on_request_headers(&host, 4), Step::Pause);
    let r = reply_of(p.on_quota_answer(&host, 3, Err(UNAVAILABLE)), 4)?;
    assert_eq!(r.grpc_status, Some(8));
    Ok(())
}

#[test]
fn failing_open_with_a_fallback_applies_it_locally() -> Result<(), String> {
    let (host, shared) = (FakeHost::default(), InProcessShared::default());
    let json = r#"{"rules":[{"name":"fleet","key":["header:x-api-key"],
        "sync":{"mode":"exact","domain":"edge","fallback":{"count":2,"per":"1h"}}}]}"#;
    let mut p = plugin(&host, &shared, json)?;
    let mut admitted = 0;
    for id in 1..=4 {
        host.request("GET", "/", &[("x-api-key", "k1")]);
        assert_eq!(p.on_request_headers(&host, id), Step::Pause);
        if p.on_quota_answer(&host, id, Err(UNAVAILABLE)) == Some((id, Wake::Resume)) {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 2);
    p.flush_metrics(&host);
    assert_eq!(host.counter("sluice_http.rule.fleet.outcome.limited"), 2);
    // Another key has its own fallback budget.
    host.request("GET", "/", &[("x-api-key", "k2")]);
    assert_eq!(p.on_request_headers(&host, 5), Step::Pause);
    assert_eq!(
        p.on_quota_answer(&host, 5, Err(UNAVAILABLE)),
        Some((5, Wake::Resume))
    );
    // While the quota server answers, the fallback is not consulted.
    host.request("GET", "/", &[("x-api-key", "k1")]);
    assert_eq!(p.on_request_headers(&host, 6), Step::Pause);
    let ok = answer(vec![(true, vec![item(Code::Ok, 5, None)])]);
    assert_eq!(
        p.on_quota_answer(&host, 6, Ok(&ok)),
        Some((6, Wake::Resume))
    );
    Ok(())
}

#[test]
fn an_unknown_remote_rule_applies_the_failure_mode() -> Result<(), String> {
    let (host, shared) = (FakeHost::default(), InProcessShared::default());
    let json = r#"{"rules":[{"name":"fleet","sync":{"mode":"exact","domain":"edge","failure_mode":"closed"}}]}"#;
    let mut p = plugin(&host, &shared, json)?;
    host.request("GET", "/", &[]);
    assert_eq!(p.on_request_headers(&host, 1), Step::Pause);
    let unknown = answer(vec![(true, vec![item(Code::UnknownLimit, 0, None)])]);
    let r = reply_of(p.on_quota_answer(&host, 1, Ok(&unknown)), 1)?;
    assert_eq!(body(&r)["error"], "rate_limit_unavailable");
    assert!(host.warnings.borrow().iter().any(|w| w.contains("no rule")));
    Ok(())
}

#[test]
fn a_request_that_ends_while_asking_gives_its_local_permit_back() -> Result<(), String> {
    let (host, shared) = (FakeHost::default(), InProcessShared::default());
    let mut p = plugin(&host, &shared, &config(""))?;
    host.request("GET", "/x", &[("x-api-key", "k1")]);
    assert_eq!(p.on_request_headers(&host, 1), Step::Pause);
    p.on_done(&host, 1);
    assert_eq!(p.asking(), 0);
    let ok = answer(vec![(
        true,
        vec![item(Code::Ok, 7, None), item(Code::Ok, 2, None)],
    )]);
    assert_eq!(p.on_quota_answer(&host, 1, Ok(&ok)), None);
    // The local rule's permit is back.
    assert_eq!(p.on_request_headers(&host, 2), Step::Pause);
    Ok(())
}

#[test]
fn an_outage_is_logged_once_not_once_per_request() -> Result<(), String> {
    let (host, shared) = (FakeHost::default(), InProcessShared::default());
    let mut p = plugin(&host, &shared, &config(""))?;
    let mut ask = |id: u32, outcome: Result<&[u8], u32>| {
        *host.peer.borrow_mut() = Some(format!("10.0.0.{id}:41234"));
        host.request("GET", "/", &[]);
        assert_eq!(p.on_request_headers(&host, id), Step::Pause);
        let token = host.grpc_calls.borrow().len() as u32;
        p.on_quota_answer(&host, token, outcome)
    };
    for id in 1..=3 {
        ask(id, Err(UNAVAILABLE));
    }
    let logged = |host: &FakeHost| {
        host.warnings
            .borrow()
            .iter()
            .filter(|w| w.contains("quota server"))
            .count()
    };
    assert_eq!(logged(&host), 1, "{:?}", host.warnings.borrow());
    let ok = answer(vec![(true, vec![item(Code::Ok, 5, None)])]);
    ask(4, Ok(&ok));
    assert_eq!(logged(&host), 2, "recovery is logged once");
    ask(5, Ok(&ok));
    ask(6, Err(UNAVAILABLE));
    assert_eq!(logged(&host), 3, "a new outage is logged again");
    Ok(())
}
