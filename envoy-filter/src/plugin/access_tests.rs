//! Access controls against a scripted host: the quota server's published
//! in shared data, polled on ticks, enforced before the rules, expired by
//! the filter's clock, and carried back on exact-mode answers; the
//! configuration's own lists, enforced alone or with the quota server's.

use sluice_core::access::wire::duration;
use sluice_core::store::{InProcessShared, SharedBytes};
use sluice_core::time::Span;
use sluice_proto::prost::Message;
use sluice_proto::quota::v1::{
    ban_entry, AccessEntry, BanEntry, CheckRequest, CheckResponse, Code, Controls, GroupResult,
    ItemResult, Source, UnlimitedKey,
};

use super::*;
use crate::controls::{publish, CONTROLS_KEY, CONTROLS_TICK_MILLIS, CONTROLS_VERSION_KEY};
use crate::host::fake::FakeHost;

const SEC: u64 = 1_000_000_000;
const PERMISSION_DENIED: u32 = 7;

/// `local`: one request per minute per client on `/local`; `fleet`: a
/// synced rule on `/fleet` keyed by `x-api-key`.
const CONFIG: &str = r#"{"rules":[
    {"name":"local","match":{"path":{"prefix":"/local"}},"limit":{"count":1,"per":"1m"},
     "algorithm":"fixed_window"},
    {"name":"fleet","match":{"path":{"prefix":"/fleet"}},"key":["header:x-api-key"],
     "sync":{"mode":"exact","domain":"edge"}}
]}"#;

fn plugin<'a>(
    host: &FakeHost,
    shared: &'a InProcessShared,
    json: &str,
) -> Result<Plugin<&'a InProcessShared>, String> {
    if host.now.get() == 0 {
        host.now.set(1_800_000_000 * SEC);
    }
    host.random.set(Some(7));
    *host.peer.borrow_mut() = Some("10.0.0.7:41234".into());
    Plugin::configure(host, shared, json.as_bytes()).map_err(|e| e.to_string())
}

fn secs(n: u64) -> Option<sluice_proto::Duration> {
    Some(duration(Span::from_secs(n)))
}

fn network(cidr: &str, remaining: Option<u64>) -> AccessEntry {
    AccessEntry {
        cidr: cidr.into(),
        remaining: remaining.and_then(secs),
    }
}

fn ban(target: ban_entry::Target, remaining: u64) -> BanEntry {
    BanEntry {
        target: Some(target),
        remaining: secs(remaining),
    }
}

fn later(host: &FakeHost, secs: u64) {
    host.now.set(host.now().plus(Span::from_secs(secs)).get());
}

fn reply(step: Step) -> Result<LocalReply, String> {
    match step {
        Step::Reply(r) => Ok(r),
        other => Err(format!("expected a reply, got {other:?}")),
    }
}

#[test]
fn a_banned_ip_is_refused_on_every_protocol_after_a_tick_until_the_ban_ends() -> Result<(), String>
{
    let (host, shared) = (FakeHost::default(), InProcessShared::default());
    let mut p = plugin(&host, &shared, CONFIG)?;
    assert_eq!(host.tick_millis.get(), CONTROLS_TICK_MILLIS);
    // Published by the sync service (or another VM) at the filter's now.
    let controls = Controls {
        version: 41,
        bans: vec![ban(ban_entry::Target::Cidr("10.0.0.0/24".into()), 30)],
        ..Controls::default()
    };
    publish(&mut &shared, &controls, host.now()).map_err(|e| e.to_string())?;
    // Until this VM's tick polls, its traffic is its rules' alone.
    host.request("GET", "/other", &[]);
    assert_eq!(p.on_request_headers(&host, 1), Step::Continue);

    assert!(p.on_tick(&host).is_empty());
    assert_eq!(host.tick_millis.get(), CONTROLS_TICK_MILLIS);
    // A path no rule matches, a local rule's path: refused before the rules.
    for (id, path) in [(2, "/other"), (3, "/local")] {
        host.request("GET", path, &[]);
        let r = reply(p.on_request_headers(&host, id))?;
        assert_eq!(r.status, 403);
        let body: serde_json::Value = serde_json::from_slice(&r.body).map_err(|e| e.to_string())?;
        assert_eq!(body, serde_json::json!({"error": "access_denied"}));
        // Our own reply passes back untouched.
        host.respond(403);
        p.on_response_headers(&host, id);
        assert_eq!(host.response_header("ratelimit"), None);
    }
    host.request("POST", "/a.B/C", &[("content-type", "application/grpc")]);
    let r = reply(p.on_request_headers(&host, 4))?;
    assert_eq!((r.status, r.grpc_status), (200, Some(PERMISSION_DENIED)));
    host.request("GET", "/ws", &[("upgrade", "websocket")]);
    assert_eq!(reply(p.on_request_headers(&host, 5))?.status, 403);
    p.flush_metrics(&host);
    assert_eq!(host.counter("sluice_access.outcome.denied"), 4);
    assert_eq!(host.counter("sluice_http.rule.local.outcome.allowed"), 0);

    // 30 s after the sync service received it, by the filter's clock.
    later(&host, 29);
    host.request("GET", "/other", &[]);
    assert!(matches!(p.on_request_headers(&host, 6), Step::Reply(_)));
    later(&host, 1);
    p.on_tick(&host);
    host.request("GET", "/local", &[]);
    assert_eq!(p.on_request_headers(&host, 7), Step::Continue);
    p.flush_metrics(&host);
    assert_eq!(host.counter("sluice_http.rule.local.outcome.allowed"), 1);
    Ok(())
}

#[test]
fn an_allow_listed_ip_bypasses_every_rule_until_the_entry_expires() -> Result<(), String> {
    let (host, shared) = (FakeHost::default(), InProcessShared::default());
    let mut p = plugin(&host, &shared, CONFIG)?;
    let controls = Controls {
        version: 5,
        allow: vec![network("10.0.0.0/8", Some(60))],
        // Another client's network: the allow entry is not a deny.
        deny: vec![network("192.0.2.0/24", None)],
        ..Controls::default()
    };
    publish(&mut &shared, &controls, host.now()).map_err(|e| e.to_string())?;
    p.on_tick(&host);
    for id in 1..=3 {
        host.request("GET", "/local", &[]);
        assert_eq!(p.on_request_headers(&host, id), Step::Continue);
        host.request("GET", "/fleet", &[("x-api-key", "k1")]);
        assert_eq!(p.on_request_headers(&host, 10 + id), Step::Continue);
    }
    assert!(host.grpc_calls.borrow().is_empty(), "nothing asked");
    p.flush_metrics(&host);
    assert_eq!(host.counter("sluice_access.outcome.allowed"), 6);
    assert_eq!(host.counter("sluice_http.rule.local.outcome.allowed"), 0);

    later(&host, 60);
    p.on_tick(&host);
    host.request("GET", "/local", &[]);
    assert_eq!(p.on_request_headers(&host, 20), Step::Continue);
    host.request("GET", "/local", &[]);
    assert_eq!(reply(p.on_request_headers(&host, 21))?.status, 429);
    p.flush_metrics(&host);
    assert_eq!(host.counter("sluice_access.outcome.allowed"), 6);
    Ok(())
}

#[test]
fn a_key_ban_matches_the_key_a_synced_rule_computed() -> Result<(), String> {
    let (host, shared) = (FakeHost::default(), InProcessShared::default());
    let json = r#"{"rules":[
        {"name":"local","match":{"path":{"prefix":"/local"}},"key":["header:x-api-key"],
         "limit":{"count":100,"per":"1m"}},
        {"name":"fleet","match":{"path":{"prefix":"/fleet"}},"key":["header:x-api-key"],
         "sync":{"mode":"exact","domain":"edge"}}
    ]}"#;
    let mut p = plugin(&host, &shared, json)?;
    let controls = Controls {
        version: 9,
        bans: vec![ban(ban_entry::Target::Key("2:k1".into()), 60)],
        ..Controls::default()
    };
    publish(&mut &shared, &controls, host.now()).map_err(|e| e.to_string())?;
    p.on_tick(&host);
    host.request("GET", "/fleet", &[("x-api-key", "k1")]);
    assert_eq!(reply(p.on_request_headers(&host, 1))?.status, 403);
    host.request("GET", "/fleet", &[("x-api-key", "k2")]);
    assert_eq!(p.on_request_headers(&host, 2), Step::Pause, "asks");
    // A local rule's key is this Envoy's own: not what the ban names.
    host.request("GET", "/local", &[("x-api-key", "k1")]);
    assert_eq!(p.on_request_headers(&host, 3), Step::Continue);
    Ok(())
}

#[test]
fn an_unlimited_key_skips_its_synced_rule() -> Result<(), String> {
    let (host, shared) = (FakeHost::default(), InProcessShared::default());
    let mut p = plugin(&host, &shared, CONFIG)?;
    let controls = Controls {
        version: 3,
        unlimited: vec![UnlimitedKey {
            key: "2:k1".into(),
            remaining: secs(10),
        }],
        ..Controls::default()
    };
    publish(&mut &shared, &controls, host.now()).map_err(|e| e.to_string())?;
    p.on_tick(&host);
    host.request("GET", "/fleet", &[("x-api-key", "k1")]);
    assert_eq!(p.on_request_headers(&host, 1), Step::Continue);
    assert!(host.grpc_calls.borrow().is_empty());
    later(&host, 10);
    host.request("GET", "/fleet", &[("x-api-key", "k1")]);
    assert_eq!(p.on_request_headers(&host, 2), Step::Pause);
    assert_eq!(host.grpc_calls.borrow().len(), 1);
    Ok(())
}

/// An answer allowing one item, carrying `controls`.
fn answer(controls: Option<Controls>) -> Vec<u8> {
    CheckResponse {
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
        controls,
    }
    .encode_to_vec()
}

#[test]
fn a_check_answer_carries_the_controls_to_this_vm_and_the_others() -> Result<(), String> {
    let (host, shared) = (FakeHost::default(), InProcessShared::default());
    let mut a = plugin(&host, &shared, CONFIG)?;
    let mut b = plugin(&host, &shared, CONFIG)?;
    host.request("GET", "/fleet", &[("x-api-key", "k1")]);
    assert_eq!(a.on_request_headers(&host, 1), Step::Pause);
    let controls = Controls {
        version: 77,
        deny: vec![network("10.0.0.7", None)],
        ..Controls::default()
    };
    // The request the server decided passes; the controls apply after it.
    let wake = a.on_quota_answer(&host, 1, Ok(&answer(Some(controls))));
    assert_eq!(wake, Some((1, Wake::Resume)));
    host.request("GET", "/other", &[]);
    assert_eq!(reply(a.on_request_headers(&host, 2))?.status, 403);
    // The other VM takes them on its tick.
    host.request("GET", "/other", &[]);
    assert_eq!(b.on_request_headers(&host, 3), Step::Continue);
    b.on_tick(&host);
    host.request("GET", "/other", &[]);
    assert_eq!(reply(b.on_request_headers(&host, 4))?.status, 403);

    // Later calls say which version this VM enforces.
    *host.peer.borrow_mut() = Some("10.0.0.8:1".into());
    host.request("GET", "/fleet", &[("x-api-key", "k1")]);
    assert_eq!(b.on_request_headers(&host, 5), Step::Pause);
    let calls = host.grpc_calls.borrow();
    let sent = CheckRequest::decode(calls[1].message.as_slice()).map_err(|e| e.to_string())?;
    assert_eq!(sent.controls_version, Some(77));
    Ok(())
}

#[test]
fn a_poll_reads_the_lists_only_when_the_version_changes() -> Result<(), String> {
    let (host, shared) = (FakeHost::default(), InProcessShared::default());
    let controls = Controls {
        version: 1,
        deny: vec![network("10.0.0.7", None)],
        ..Controls::default()
    };
    publish(&mut &shared, &controls, host.now()).map_err(|e| e.to_string())?;
    // A VM configured after they were published enforces them at once.
    let mut p = plugin(&host, &shared, CONFIG)?;
    host.request("GET", "/other", &[]);
    assert_eq!(reply(p.on_request_headers(&host, 1))?.status, 403);

    // The lists change under the same version: not read again.
    let mut writer = &shared;
    writer
        .set(CONTROLS_KEY, b"not controls", 0)
        .map_err(|e| e.to_string())?;
    p.on_tick(&host);
    assert!(host.warnings.borrow().is_empty());
    // A new version that does not decode: a warning, once, and the
    // previous controls stay.
    writer
        .set(CONTROLS_VERSION_KEY, &2u64.to_le_bytes(), 0)
        .map_err(|e| e.to_string())?;
    p.on_tick(&host);
    p.on_tick(&host);
    assert_eq!(host.warnings.borrow().len(), 1, "{:?}", host.warnings);
    assert_eq!(host.counter("sluice_http.errors"), 1);
    host.request("GET", "/other", &[]);
    assert_eq!(reply(p.on_request_headers(&host, 2))?.status, 403);

    // A policy without synced rules neither polls nor ticks.
    let local = r#"{"rules":[{"name":"local","limit":{"count":5,"per":"1m"}}]}"#;
    let mut q = plugin(&host, &shared, local)?;
    assert_eq!(host.tick_millis.get(), 0);
    host.request("GET", "/other", &[]);
    assert_eq!(q.on_request_headers(&host, 3), Step::Continue);
    Ok(())
}

fn sync_answer(controls: Option<Controls>) -> Vec<u8> {
    sluice_proto::quota::v1::SyncResponse {
        leases: Vec::new(),
        source: Source::Storage as i32,
        controls,
    }
    .encode_to_vec()
}

#[test]
fn the_sync_service_fetches_controls_without_traffic_and_every_vm_enforces_them(
) -> Result<(), String> {
    use crate::sync_service::{SyncService, SYNC_METHOD};
    let (host, shared) = (FakeHost::default(), InProcessShared::default());
    host.now.set(1_800_000_000 * SEC);
    host.random.set(Some(7));
    let mut service =
        SyncService::configure(&host, &shared, CONFIG.as_bytes()).map_err(|e| e.to_string())?;
    // Exact-mode rules lease nothing, but the service still ticks for them.
    assert_eq!(host.tick_millis.get(), CONTROLS_TICK_MILLIS);
    let mut p = plugin(&host, &shared, CONFIG)?;

    service.on_tick(&host);
    let calls = host.grpc_calls.borrow().clone();
    let [call] = calls.as_slice() else {
        return Err(format!("expected one call, got {calls:?}"));
    };
    assert_eq!(call.method, SYNC_METHOD);
    let sent = sluice_proto::quota::v1::SyncRequest::decode(call.message.as_slice())
        .map_err(|e| e.to_string())?;
    assert!(sent.entries.is_empty(), "an empty Sync, for the controls");
    assert_eq!(sent.controls_version, Some(0));
    // No second call before the first answers and the period passes.
    service.on_tick(&host);
    assert_eq!(host.grpc_calls.borrow().len(), 1);

    let controls = Controls {
        version: 9,
        bans: vec![ban(ban_entry::Target::Cidr("10.0.0.7/32".into()), 60)],
        ..Controls::default()
    };
    service.on_sync_answer(&host, 1, Ok(&sync_answer(Some(controls))));
    p.on_tick(&host);
    host.request("GET", "/local", &[]);
    assert_eq!(reply(p.on_request_headers(&host, 1))?.status, 403);

    // The next call says which version this Envoy holds.
    host.now.set(host.now().plus(Span::from_millis(100)).get());
    service.on_tick(&host);
    let last = host.grpc_calls.borrow().last().cloned().ok_or("no call")?;
    let sent = sluice_proto::quota::v1::SyncRequest::decode(last.message.as_slice())
        .map_err(|e| e.to_string())?;
    assert_eq!(sent.controls_version, Some(9));
    Ok(())
}

#[test]
fn a_configurations_lists_apply_without_synced_rules() -> Result<(), String> {
    let (host, shared) = (FakeHost::default(), InProcessShared::default());
    // The only rule keys on a header: the lists alone read the address.
    let json = r#"{"rules":[{"name":"local","key":["header:x-api-key"],"limit":{"count":1,"per":"1m"}}],
        "access":{"allow":["10.0.0.0/24"],"deny":["192.0.2.0/24"]}}"#;
    let mut p = plugin(&host, &shared, json)?;
    for id in 1..=3 {
        host.request("GET", "/local", &[("x-api-key", "k")]);
        assert_eq!(p.on_request_headers(&host, id), Step::Continue);
    }
    p.flush_metrics(&host);
    assert_eq!(host.counter("sluice_access.outcome.allowed"), 3);
    assert_eq!(host.counter("sluice_http.rule.local.outcome.allowed"), 0);

    *host.peer.borrow_mut() = Some("192.0.2.9:1".into());
    host.request("GET", "/local", &[("x-api-key", "k")]);
    let r = reply(p.on_request_headers(&host, 4))?;
    assert_eq!(r.status, 403);
    assert_eq!(r.body, br#"{"error":"access_denied"}"#);
    host.request("POST", "/a.B/C", &[("content-type", "application/grpc")]);
    let r = reply(p.on_request_headers(&host, 5))?;
    assert_eq!(r.grpc_status, Some(PERMISSION_DENIED));
    p.flush_metrics(&host);
    assert_eq!(host.counter("sluice_access.outcome.denied"), 2);

    // Neither listed: the rules decide.
    *host.peer.borrow_mut() = Some("198.51.100.1:1".into());
    host.request("GET", "/local", &[("x-api-key", "k")]);
    assert_eq!(p.on_request_headers(&host, 6), Step::Continue);
    host.request("GET", "/local", &[("x-api-key", "k")]);
    assert_eq!(reply(p.on_request_headers(&host, 7))?.status, 429);
    Ok(())
}

#[test]
fn a_deny_from_the_quota_server_wins_over_the_configurations_allow() -> Result<(), String> {
    let (host, shared) = (FakeHost::default(), InProcessShared::default());
    let json = r#"{"rules":[{"name":"fleet","key":["header:x-api-key"],"sync":{"mode":"exact","domain":"edge"}}],
        "access":{"allow":["10.0.0.0/8"],"deny":["10.9.0.0/16"]}}"#;
    let mut p = plugin(&host, &shared, json)?;
    host.request("GET", "/x", &[("x-api-key", "k1")]);
    assert_eq!(
        p.on_request_headers(&host, 1),
        Step::Continue,
        "allow-listed"
    );
    let controls = Controls {
        version: 2,
        deny: vec![network("10.0.0.7", None)],
        // The configuration's deny is not lifted by the quota server's allow.
        allow: vec![network("10.9.0.0/16", None)],
        ..Controls::default()
    };
    publish(&mut &shared, &controls, host.now()).map_err(|e| e.to_string())?;
    p.on_tick(&host);
    host.request("GET", "/x", &[("x-api-key", "k1")]);
    assert_eq!(reply(p.on_request_headers(&host, 2))?.status, 403);
    *host.peer.borrow_mut() = Some("10.9.1.1:1".into());
    host.request("GET", "/x", &[("x-api-key", "k1")]);
    assert_eq!(reply(p.on_request_headers(&host, 3))?.status, 403);
    *host.peer.borrow_mut() = Some("10.1.1.1:1".into());
    host.request("GET", "/x", &[("x-api-key", "k1")]);
    assert_eq!(p.on_request_headers(&host, 4), Step::Continue);
    assert!(host.grpc_calls.borrow().is_empty(), "nothing asked");
    Ok(())
}
