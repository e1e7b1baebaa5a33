//! Calendar windows through a real Envoy: synced filter rules whose quota
//! server rules count per calendar month (Europe/Paris) and per calendar
//! day (America/New_York). The client's rate-limit headers must report the
//! quota server's window: the limit, what is left, the window's real
//! length and the seconds until the next local boundary, in exact and in
//! leased mode. The calendar arithmetic itself is unit-tested in the quota
//! server; here the boundaries are computed independently with `jiff`.
//!
//! Needs Envoy (`make setup`), the filter (`make wasm`) and the `sluice`
//! binary (`cargo build -p sluice-quota-server`, or `SLUICE_BIN`).

// Test code: failing means panicking.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::ops::RangeInclusive;

use jiff::{Timestamp, ToSpan as _, Zoned};
use serde_json::json;
use sluice_e2e::client::Reply;
use sluice_e2e::envoy::Envoy;
use sluice_e2e::upstream::Upstream;
use sluice_e2e::{free_port, sluice_binary};
use sluice_quota_server::launcher::Launcher;

/// The monthly plan per API key.
const MONTHLY: u64 = 10_000;
/// The daily allowance per API key.
const DAILY: u64 = 500;
/// The most one lease holds (the filter's default `max_lease`).
const MAX_LEASE: u64 = 100;

/// The start of the calendar month (`month`) or day around now in `zone`,
/// and the start of the next one.
fn window(zone: &str, month: bool) -> (Zoned, Zoned) {
    let now = Timestamp::now().in_tz(zone).expect("a time zone");
    let start = if month {
        now.first_of_month().expect("first of month")
    } else {
        now.clone()
    }
    .start_of_day()
    .expect("start of day");
    let next = if month {
        start.checked_add(1.month())
    } else {
        start.checked_add(1.day())
    }
    .expect("the next window")
    .start_of_day()
    .expect("start of day");
    (start, next)
}

/// Seconds from now until `at`.
fn seconds_until(at: &Zoned) -> i64 {
    at.timestamp().as_second() - Timestamp::now().as_second()
}

/// Checks `reply`'s headers against a calendar window of `limit` in
/// `zone`: admitted with a number in `remaining` left, the IETF policy's
/// `w` the window's length, and the reset the seconds to its end.
fn assert_window(
    reply: &Reply,
    rule: &str,
    limit: u64,
    remaining: RangeInclusive<u64>,
    zone: &str,
    month: bool,
) {
    assert_eq!(reply.status, 200, "{rule}: {}", reply.text());
    let (start, next) = window(zone, month);
    let length = next.timestamp().as_second() - start.timestamp().as_second();
    let until = seconds_until(&next);
    let headers = reply.headers_text();
    assert_eq!(
        reply.header_u64("x-ratelimit-limit"),
        Some(limit),
        "{headers}"
    );
    let left = reply
        .header_u64("x-ratelimit-remaining")
        .expect("x-ratelimit-remaining");
    assert!(
        remaining.contains(&left),
        "{rule}: expected {remaining:?} left: {headers}"
    );
    let reset = reply
        .header_u64("x-ratelimit-reset")
        .expect("x-ratelimit-reset");
    let reset = i64::try_from(reset).unwrap();
    // Rounded up, and a second may tick between the answer and now.
    assert!(
        (until - 2..=until + 1).contains(&reset),
        "{rule}: reset {reset}, the next local boundary is {until} s away ({next})"
    );
    let policy = reply.header("ratelimit-policy").expect("ratelimit-policy");
    assert!(
        policy.contains(&format!("\"{rule}\";q={limit};w={length}")),
        "{rule}: expected w={length} ({start} to {next}): {policy}"
    );
}

#[tokio::test]
async fn calendar_windows_reach_the_client_in_both_modes() {
    let port = free_port().expect("a free port");
    let config = format!(
        r#"listen: {{grpc: "127.0.0.1:{port}"}}
domains:
  - name: edge
    rules:
      - {{name: monthly, limit: {{count: {MONTHLY}, calendar: month, time_zone: Europe/Paris}}}}
      - {{name: daily, limit: {{count: {DAILY}, calendar: day, time_zone: America/New_York}}}}
"#
    );
    let _server = Launcher::new(sluice_binary().unwrap_or_else(|e| panic!("{e}")))
        .start_text(&config)
        .unwrap_or_else(|e| panic!("{e}"));
    let upstream = Upstream::start().await.expect("starting the upstream");
    let sync = |mode: &str| json!({"mode": mode, "domain": "edge", "failure_mode": "closed"});
    let filter = json!({"rules": [
        {"name": "monthly", "match": {"path": {"prefix": "/exact"}},
         "key": ["header:x-api-key"], "sync": sync("exact")},
        {"name": "daily", "match": {"path": {"prefix": "/leased"}},
         "key": ["header:x-api-key"], "sync": sync("leased")},
    ], "headers": {"sets": ["ietf", "x_ratelimit"]}});
    let envoy = Envoy::builder("calendar_windows_reach_the_client")
        .upstream(upstream.port())
        .quota_server(port)
        .sluice(&filter)
        .sync_service(true)
        .start()
        .await
        .unwrap_or_else(|e| panic!("starting Envoy: {e:#}"));
    let client = envoy.client();
    let key = [("x-api-key", "acme")];
    for n in 1..=3 {
        let reply = client.get_with("/exact", &key).await.expect("GET /exact");
        let left = MONTHLY - n;
        assert_window(
            &reply,
            "monthly",
            MONTHLY,
            left..=left,
            "Europe/Paris",
            true,
        );
    }
    // Leased: the first request is decided by a Check call (no lease yet),
    // so its headers are the quota server's own; the lease the request
    // asked for may reach the server first and take up to `max_lease`.
    let reply = client.get_with("/leased", &key).await.expect("GET /leased");
    let left = DAILY - 1 - MAX_LEASE..=DAILY - 1;
    assert_window(&reply, "daily", DAILY, left, "America/New_York", false);
}
