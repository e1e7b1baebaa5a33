//! Calendar windows (a day, an ISO week, a month of a time zone) through
//! storage: one test body over memory and Redis, at replayed times around
//! local boundaries; Redis's choice among the windows the server sends
//! when its clock differs from the server's; key expiry at the window's
//! end; and `sluice serve` answering with the next local boundary.

// Test helpers fail loudly: a panic is the report.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod support;

use std::time::Duration;

use common::RedisServer;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use jiff::ToSpan;
use sluice_core::algorithm::Outcome;
use sluice_core::time::{Nanos, Span};
use sluice_quota_server::config::RateLimitConfig;
use sluice_quota_server::limits::calendar::CalendarUnit;
use sluice_quota_server::limits::{Limit, Limits};
use sluice_quota_server::proto::quota_client::QuotaClient;
use sluice_quota_server::proto::{CheckGroup, CheckItem, CheckRequest, SyncEntry, SyncRequest};
use sluice_quota_server::storage::redis::script_call;
use sluice_quota_server::storage::{system_now, Item, MemoryBackend, RedisBackend, Store};

const HOUR: u64 = 3_600_000_000_000;

/// The instant of the local time `local` (`2024-02-29T23:59:59`) in `zone`.
fn at(zone: &str, local: &str) -> Nanos {
    let tz = jiff::tz::TimeZone::get(zone).unwrap();
    let dt: jiff::civil::DateTime = local.parse().unwrap();
    let ns = dt.to_zoned(tz).unwrap().timestamp().as_nanosecond();
    Nanos(u64::try_from(ns).unwrap())
}

/// Limits `k0`, `k1`... of domain `t`: `count` per calendar `unit` in `zone`.
fn limits(cases: &[(CalendarUnit, &str, u64)]) -> Limits {
    common::domain_limits(cases.iter().map(|(unit, zone, count)| RateLimitConfig {
        requests_per_unit: Some(*count),
        calendar: Some(*unit),
        time_zone: Some((*zone).into()),
        ..RateLimitConfig::default()
    }))
}

fn item<'a>(limit: &'a Limit, cost: u64) -> Item<'a> {
    Item {
        limit,
        key: limit.storage_key(&[("k", "alice")]),
        cost,
        enforce: true,
    }
}

async fn check(store: &Store, limit: &Limit, cost: u64, now: Nanos) -> Outcome {
    store.check(&[item(limit, cost)], Some(now)).await.unwrap()[0]
}

/// A monthly plan resets on the 1st at local midnight, whatever the
/// month's length; a day across a daylight-saving change lasts 25 hours;
/// a week ends on Monday; refunds land only in the window still open.
async fn calendar_windows(store: &Store) {
    let paris = "Europe/Paris";
    let ny = "America/New_York";
    let limits = limits(&[
        (CalendarUnit::Month, paris, 3),
        (CalendarUnit::Day, ny, 2),
        (CalendarUnit::Week, paris, 1),
    ]);
    let (month, day, week) = (
        limits.limit(0).unwrap(),
        limits.limit(1).unwrap(),
        limits.limit(2).unwrap(),
    );

    // The last second of February 2024 (a leap year).
    let late = at(paris, "2024-02-29T23:59:59");
    let march = at(paris, "2024-03-01T00:00");
    for left in [2, 1, 0] {
        let o = check(store, month, 1, late).await;
        assert!(o.allowed);
        assert_eq!(o.remaining, left);
        assert_eq!(
            o.reset_after,
            Span(march.0 - late.0),
            "to March 1st, 00:00 Paris"
        );
    }
    let refused = check(store, month, 1, late).await;
    assert!(!refused.allowed);
    assert_eq!(refused.retry_after, Span::from_secs(1));
    // A refund before the window's end gives a permit back.
    store.refund(&[item(month, 1)], Some(late)).await.unwrap();
    assert!(check(store, month, 1, late).await.allowed);
    // March starts whole, and lasts 31 days less the hour summer time takes.
    let o = check(store, month, 1, march).await;
    assert!(o.allowed);
    assert_eq!(o.remaining, 2);
    assert_eq!(o.reset_after, Span((31 * 24 - 1) * HOUR));

    // New York's 2024-11-03 lasts 25 hours: reset 25 h after its midnight.
    let midnight = at(ny, "2024-11-03T00:00");
    let o = check(store, day, 2, midnight).await;
    assert!(o.allowed);
    assert_eq!(o.reset_after, Span(25 * HOUR));
    // 23:59 that day is 24 h 59 min later; still the same day's count.
    let o = check(store, day, 1, at(ny, "2024-11-03T23:59")).await;
    assert!(!o.allowed);
    assert_eq!(o.retry_after, Span::from_secs(60));
    assert!(
        check(store, day, 2, at(ny, "2024-11-04T00:00"))
            .await
            .allowed
    );

    // Sunday night in Paris is the end of the ISO week (2024-12-23 to 30).
    let sunday = at(paris, "2024-12-29T23:00");
    assert!(check(store, week, 1, sunday).await.allowed);
    let o = check(store, week, 1, sunday).await;
    assert!(!o.allowed);
    assert_eq!(o.retry_after, Span(HOUR));
    // Monday midnight: a new week, across the year end (until 2025-01-06).
    let monday = at(paris, "2024-12-30T00:00");
    let o = check(store, week, 1, monday).await;
    assert!(o.allowed);
    assert_eq!(o.reset_after, Span(7 * 24 * HOUR));
}

#[tokio::test]
async fn calendar_windows_in_memory() {
    calendar_windows(&Store::Memory(MemoryBackend::new(100))).await;
}

#[tokio::test]
async fn calendar_windows_in_redis() {
    let redis = RedisServer::start();
    let backend = RedisBackend::new(&redis.url(), Duration::from_secs(2), 1).unwrap();
    calendar_windows(&Store::Redis(backend)).await;
}

/// Redis decides with its own clock: when it reads a time just past the
/// boundary while the server's clock is just before (or the reverse), the
/// script picks the window containing Redis's time among those sent.
#[tokio::test]
async fn redis_picks_the_window_of_its_own_clock() {
    let redis = RedisServer::start();
    let limits = limits(&[(CalendarUnit::Month, "Europe/Paris", 1)]);
    let month = limits.limit(0).unwrap();
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let march = at("Europe/Paris", "2024-03-01T00:00");
    // Returns (allowed, reset_after in ticks) for the server's time
    // `server` and Redis's time `redis`.
    let mut run = async |server: Nanos, redis_time: Nanos| {
        let mut call = script_call("check", &[item(month, 1)], Some(server)).unwrap();
        call.args[1] = (redis_time.0 / 1000).to_string();
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(include_str!("../lua/decide.lua"))
            .arg(call.keys.len())
            .arg(&call.keys)
            .arg(call.argv_alone().collect::<Vec<_>>());
        // A batch of one decision: its four numbers per item.
        let reply: Vec<Vec<i64>> = cmd.query_async(&mut conn).await.unwrap();
        let reply = &reply[0];
        (reply[0] == 1, u64::try_from(reply[2]).unwrap())
    };
    let tick_ns = month.tick_us.unwrap() * 1000;
    let ms = 1_000_000;
    // Server 5 ms ahead, Redis still in February: February's count.
    let (allowed, reset) = run(Nanos(march.0 + 5 * ms), Nanos(march.0 - 5 * ms)).await;
    assert!(allowed);
    assert_eq!(reset, 5 * ms / tick_ns, "February ends in 5 ms");
    // Server 5 ms behind, Redis already in March: March's own permit.
    let (allowed, reset) = run(Nanos(march.0 - 5 * ms), Nanos(march.0 + 5 * ms)).await;
    assert!(allowed, "March starts afresh");
    let march_ticks = (31 * 24 - 1) * HOUR / tick_ns;
    assert_eq!(reset, march_ticks - (5 * ms / tick_ns));
    // Both in March: March's one permit was taken above.
    let (allowed, _) = run(Nanos(march.0 + 6 * ms), Nanos(march.0 + 6 * ms)).await;
    assert!(!allowed);
}

/// With Redis's own clock, a calendar window's key expires a second after
/// the window's end (the next local midnight), not a nominal length later.
#[tokio::test]
async fn redis_keys_of_calendar_windows_expire_after_the_window_end() {
    let redis = RedisServer::start();
    let backend = RedisBackend::new(&redis.url(), Duration::from_secs(2), 1).unwrap();
    let limits = limits(&[(CalendarUnit::Day, "Asia/Kolkata", 5)]);
    let day = limits.limit(0).unwrap();
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    // Redis's clock is this machine's: its time of the call lies between.
    let before = system_now();
    let outcome = backend.check(&[item(day, 1)], None).await.unwrap()[0];
    let after = system_now();
    let ttl_ms: u64 = redis::cmd("PTTL")
        .arg(item(day, 1).key)
        .query_async(&mut conn)
        .await
        .unwrap();
    let read = system_now();
    let end = day.calendar_window(before).unwrap().end;
    assert_eq!(
        day.calendar_window(read).unwrap().end,
        end,
        "ran across a midnight in Kolkata: run again"
    );
    let ms = |n: Nanos| n.0 / 1_000_000;
    // Expiry is the window's end rounded up to the millisecond, plus one,
    // plus the script's second of margin.
    let to_expiry = |at: Nanos| ms(end) - ms(at) + 1_000;
    assert!(
        ttl_ms <= to_expiry(before) + 2 && ttl_ms + 1 >= to_expiry(read),
        "ttl {ttl_ms} ms, window ends in {} ms",
        ms(end) - ms(before)
    );
    // reset_after counts from Redis's time, in whole microseconds.
    assert!(outcome.reset_after.0 <= end.0 - before.0 + 1_000);
    assert!(outcome.reset_after.0 + 1_000 >= end.0 - after.0);
}

/// A state older than every window the server sent says nothing of its
/// key's expiry: with Redis's clock a day behind the server's, the state
/// moved into Redis's day gets the expiry of that day's end (the script
/// must not take the clamped window's end for the old key's).
#[tokio::test]
async fn a_state_older_than_the_windows_sent_gets_its_expiry_set() {
    let redis = RedisServer::start();
    let limits = limits(&[(CalendarUnit::Day, "UTC", 5)]);
    let day = limits.limit(0).unwrap();
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    // Redis's clock is this machine's. Waits out a midnight too close for
    // the few calls below (bounded: at most the margin).
    let margin = Span::from_secs(30);
    let mut before = system_now();
    while day.calendar_window(before).unwrap().end.0 - before.0 < margin.0 {
        let end = day.calendar_window(before).unwrap().end;
        tokio::time::sleep(Duration::from_nanos(end.0 - before.0 + 1)).await;
        before = system_now();
    }
    let today = day.calendar_window(before).unwrap();
    let tick_ns = day.tick_us.unwrap() * 1000;
    // Three days old, its key about to expire (as it then may: its window
    // is long over).
    let key = item(day, 1).key;
    let _: () = redis::pipe()
        .cmd("HSET")
        .arg(&key)
        .arg("s")
        .arg((today.start.0 - 3 * 24 * HOUR) / tick_ns)
        .arg("u")
        .arg(5)
        .cmd("PEXPIRE")
        .arg(&key)
        .arg(1_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    // The server's windows are those around tomorrow; Redis's own time.
    let mut call = script_call("check", &[item(day, 1)], Some(Nanos(today.end.0 + HOUR))).unwrap();
    call.args[1] = String::new();
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(include_str!("../lua/decide.lua"))
        .arg(call.keys.len())
        .arg(&call.keys)
        .arg(call.argv_alone().collect::<Vec<_>>());
    let reply: Vec<Vec<i64>> = cmd.query_async(&mut conn).await.unwrap();
    assert_eq!(reply[0][..2], [1, 4], "today's window, afresh");
    let ttl_ms: u64 = redis::cmd("PTTL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    let read = system_now();
    assert_eq!(
        day.calendar_window(read).unwrap(),
        today,
        "within the margin"
    );
    let ms = |n: Nanos| n.0 / 1_000_000;
    // Today's end rounded up to the millisecond, plus one, plus the
    // script's second of margin.
    let to_expiry = |at: Nanos| ms(today.end) - ms(at) + 1_000;
    assert!(
        ttl_ms <= to_expiry(before) + 2 && ttl_ms + 1 >= to_expiry(read),
        "ttl {ttl_ms} ms, today ends in {} ms",
        ms(today.end) - ms(read)
    );
}

/// The next local midnight starting a day (`month: false`) or a month in
/// `zone`, after the current time, computed here from jiff directly.
fn next_boundary(zone: &str, month: bool) -> Nanos {
    let tz = jiff::tz::TimeZone::get(zone).unwrap();
    let today = jiff::Zoned::now().with_time_zone(tz.clone()).date();
    let next = if month {
        today.first_of_month().checked_add(1.month()).unwrap()
    } else {
        today.tomorrow().unwrap()
    };
    let ns = next.to_zoned(tz).unwrap().timestamp().as_nanosecond();
    Nanos(u64::try_from(ns).unwrap())
}

/// A proto duration as nanoseconds.
fn nanos(seconds: i64, nanos: i32) -> u64 {
    u64::try_from(seconds).unwrap() * 1_000_000_000 + u64::try_from(nanos).unwrap()
}

/// Through `sluice serve`'s gRPC API (Sluice's `Check` and `Sync`, Envoy's
/// `ShouldRateLimit`), a calendar window's reset is the time to the next
/// local boundary as read before and after the call, and Envoy is told
/// the calendar's own unit.
async fn answers_reset_at_the_next_local_boundary(storage: &str) {
    let scratch = tempfile::tempdir().unwrap();
    let domains = format!(
        "{storage}\n\
         domains:\n\
         - name: api\n\
         \x20 rules:\n\
         \x20   - {{name: monthly, key: [\"header:x-api-key\"], \
                   limit: {{count: 10000, calendar: month, time_zone: Europe/Paris}}}}\n\
         \x20 descriptors:\n\
         \x20   - {{key: user, rate_limit: {{calendar: day, time_zone: America/New_York, \
                   requests_per_unit: 100}}}}\n"
    );
    let config = support::write(&scratch, "sluice.yaml", &support::config(&domains));
    let server = support::Sluice::start(&config);
    let mut quota = QuotaClient::connect(format!("http://{}", server.grpc))
        .await
        .unwrap();
    // Within [end - after, end - before], rounded to Redis's microseconds.
    let within = |reset: u64, before: Nanos, after: Nanos, end: Nanos, what: &str| {
        assert!(
            reset <= end.0 - before.0 + 1_000 && reset + 1_000 >= end.0 - after.0,
            "{what}: reset in {reset} ns, the boundary is {} ns away",
            end.0 - before.0
        );
    };

    let before = system_now();
    let check = quota
        .check(CheckRequest {
            groups: vec![CheckGroup {
                domain: "api".into(),
                items: vec![CheckItem {
                    rule: "monthly".into(),
                    key: "5:alice".into(),
                    cost: 1,
                }],
            }],
            controls_version: None,
            omit_headers: false,
        })
        .await
        .unwrap()
        .into_inner();
    let after = system_now();
    let end = next_boundary("Europe/Paris", true);
    let item = &check.groups[0].items[0];
    assert_eq!((item.limit, item.remaining), (10000, 9999));
    let reset = item.reset_after.unwrap();
    within(
        nanos(reset.seconds, reset.nanos),
        before,
        after,
        end,
        "Check",
    );
    let window = item.window.unwrap();
    let hours = window.seconds / 3_600;
    assert!(
        (28 * 24 - 1..=31 * 24 + 1).contains(&hours),
        "a month's hours: {hours}"
    );
    let reset_header = &check.groups[0]
        .headers
        .iter()
        .find(|h| h.name == "x-ratelimit-reset")
        .unwrap()
        .value;
    let secs: u64 = reset_header.parse().unwrap();
    assert!(
        secs * 1_000_000_000 >= end.0 - after.0 && (secs - 1) * 1_000_000_000 < end.0 - before.0
    );

    let before = system_now();
    let sync = quota
        .sync(SyncRequest {
            domain: "api".into(),
            replicas: 1,
            entries: vec![SyncEntry {
                rule: "monthly".into(),
                key: "5:alice".into(),
                held: 0,
                used: 0,
                want: 10,
            }],
            caller: "edge#0".into(),
            controls_version: None,
        })
        .await
        .unwrap()
        .into_inner();
    let after = system_now();
    let lease = &sync.leases[0];
    assert_eq!((lease.permits, lease.remaining), (10, 9989));
    let reset = lease.reset_after.unwrap();
    within(
        nanos(reset.seconds, reset.nanos),
        before,
        after,
        end,
        "Lease",
    );
    let expires = lease.expires_after.unwrap();
    assert!(
        nanos(expires.seconds, expires.nanos) <= 1_000_000_000,
        "a lease lasts at most 1 s"
    );

    let mut rls = support::client(&server.server).await;
    let before = system_now();
    let answer = rls
        .should_rate_limit(RateLimitRequest {
            domain: "api".into(),
            descriptors: vec![support::descriptor(&[("user", "bob")])],
            hits_addend: 1,
        })
        .await
        .unwrap()
        .into_inner();
    let after = system_now();
    let status = &answer.statuses[0];
    let limit = status.current_limit.as_ref().unwrap();
    assert_eq!(
        (limit.requests_per_unit, limit.unit),
        (100, Unit::Day as i32)
    );
    assert_eq!(status.limit_remaining, 99);
    let reset = status.duration_until_reset.as_ref().unwrap();
    let end = next_boundary("America/New_York", false);
    within(
        nanos(reset.seconds, reset.nanos),
        before,
        after,
        end,
        "ShouldRateLimit",
    );
}

#[tokio::test]
async fn served_in_memory() {
    answers_reset_at_the_next_local_boundary("storage: {backend: memory}").await;
}

#[tokio::test]
async fn served_on_redis() {
    let redis = RedisServer::start();
    let storage = format!(
        "storage: {{backend: redis, redis: {{url: {:?}, timeout: 2s}}}}",
        redis.url()
    );
    answers_reset_at_the_next_local_boundary(&storage).await;
}
