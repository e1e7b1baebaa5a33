//! The storage backends against core: the same random sequences must give
//! the same decisions in memory, in Redis and in core's `Limiter`, and
//! concurrent callers on one Redis must never overshoot.

// Test helpers fail loudly: a panic is the report.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::RedisServer;
use sluice_core::algorithm::{AlgorithmKind, Outcome};
use sluice_core::time::{Nanos, Span};
use sluice_quota_server::config::{RateLimitConfig, ServerConfig};
use sluice_quota_server::limits::{Limit, Limits};
use sluice_quota_server::storage::redis::{script_call, MAX_BATCH};
use sluice_quota_server::storage::{Item, MemoryBackend, RedisBackend, StorageError, Store};

/// A realistic time (November 2026) so Redis sees values of real magnitude.
const START: Nanos = Nanos(1_795_000_000_000_000_000);

/// Test limits: `(algorithm, count, per, burst)`, domain `t`, keys `k0`, `k1`...
fn limits(cases: &[(AlgorithmKind, u64, &str, Option<u64>)]) -> Limits {
    common::domain_limits(
        cases
            .iter()
            .map(|(algorithm, count, per, burst)| RateLimitConfig {
                requests_per_unit: Some(*count),
                per: Some(sluice_core::config::SpanText::Text((*per).into())),
                algorithm: Some(*algorithm),
                burst: *burst,
                ..RateLimitConfig::default()
            }),
    )
}

fn item<'a>(limit: &'a Limit, key: &str, cost: u64) -> Item<'a> {
    Item {
        limit,
        key: limit.storage_key(&[("k", key)]),
        cost,
        enforce: true,
    }
}

/// A small deterministic generator: the sequences are the same every run.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// Core's duration rounded up to the backend's tick.
fn ceil_to(span: Span, tick_ns: u64) -> Span {
    if span == Span::NEVER {
        return span;
    }
    Span(span.0.div_ceil(tick_ns) * tick_ns)
}

fn same(got: &Outcome, want: &Outcome, tick_ns: u64, context: &str) {
    assert_eq!(
        (got.allowed, got.remaining),
        (want.allowed, want.remaining),
        "{context}: got {got:?}, core {want:?}"
    );
    assert_eq!(
        got.reset_after,
        ceil_to(want.reset_after, tick_ns),
        "{context}: reset"
    );
    assert_eq!(
        got.retry_after,
        ceil_to(want.retry_after, tick_ns),
        "{context}: retry"
    );
}

/// The limits the replays run: every algorithm, several shapes.
fn replay_limits() -> Limits {
    limits(&[
        (AlgorithmKind::TokenBucket, 5, "1s", None),
        (AlgorithmKind::TokenBucket, 7, "3s", Some(10)),
        (AlgorithmKind::LeakyBucket, 4, "1s", Some(6)),
        (AlgorithmKind::FixedWindow, 5, "2s", None),
        (AlgorithmKind::SlidingWindowLog, 6, "1500ms", None),
        (AlgorithmKind::SlidingWindowCounter, 7, "3s", None),
        (AlgorithmKind::Gcra, 7, "3s", Some(3)),
        (AlgorithmKind::Gcra, 3, "1s", None),
        (AlgorithmKind::SlidingWindowLog, 3, "1s", None),
        (AlgorithmKind::SlidingWindowCounter, 5, "1s", None),
        (AlgorithmKind::FixedWindow, 7, "3s", None),
        (AlgorithmKind::LeakyBucket, 7, "3s", None),
        // Too large for microsecond ticks: runs in milliseconds.
        (AlgorithmKind::TokenBucket, 10_000_000, "1000s", None),
        (AlgorithmKind::FixedWindow, 10_000_000, "1000s", None),
    ])
}

/// One step of a replay: at `now`, a check of `cost`, or its refund.
struct Step {
    now: Nanos,
    cost: u64,
    refund: bool,
}

/// A random sequence of `n` steps on limit `id` of [`replay_limits`], the
/// same every run. Advances are whole ticks (`tick_ns`): the script's
/// clock has no finer resolution.
fn steps(limit: &Limit, id: usize, tick_ns: u64, n: usize) -> Vec<Step> {
    let per = limit.quota().per().as_nanos();
    let burst = limit.quota().burst();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ id as u64);
    let mut now = START;
    (0..n)
        .map(|_| {
            // Mostly short steps (many decisions per window), sometimes long
            // ones, and now and then a step back (a caller's late clock).
            let ticks = per / tick_ns;
            now = match rng.below(20) {
                0 => Nanos(now.0 - rng.below(ticks / 4) * tick_ns).max(START),
                1 | 2 => Nanos(now.0 + rng.below(2 * ticks) * tick_ns),
                3..=8 => now,
                _ => Nanos(now.0 + rng.below(ticks / 8) * tick_ns),
            };
            let cost = match rng.below(8) {
                0 => burst + 1,
                1 => 0,
                _ => 1 + rng.below(burst.min(4)),
            };
            let refund = cost > 0 && rng.below(12) == 0;
            Step { now, cost, refund }
        })
        .collect()
}

/// Runs random (advance, cost) sequences through `backend` and core side
/// by side, with an explicit time so both see the same instants.
async fn replay(backend: &Store, tick_ns_of: impl Fn(&Limit) -> u64, run: &str) {
    let limits = replay_limits();
    for id in 0..limits.len() {
        let limit = limits.limit(id).unwrap();
        let tick_ns = tick_ns_of(limit);
        let mut state = limit.rule.limiter.fresh_state();
        let key = format!("{run}-{id}");
        for (step, Step { now, cost, refund }) in
            steps(limit, id, tick_ns, 400).into_iter().enumerate()
        {
            let context = format!("{:?} #{id} step {step} cost {cost}", limit.algorithm());
            if refund {
                let items = [item(limit, &key, cost)];
                backend.refund(&items, Some(now)).await.unwrap();
                limit.rule.limiter.refund(&mut state, now, cost);
                continue;
            }
            let want = limit.rule.limiter.check(&mut state, now, cost);
            let got = backend
                .check(&[item(limit, &key, cost)], Some(now))
                .await
                .unwrap();
            same(&got[0], &want, tick_ns, &context);
        }
    }
}

/// Many decisions on one key in one script call (as a hot key's queue
/// is sent) decide exactly as core does one after the other: the script
/// reads the key once and writes it once, and each decision in between
/// sees the state the previous one left.
#[tokio::test]
async fn one_key_batched_in_one_call_matches_core() {
    let redis = RedisServer::start();
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let limits = replay_limits();
    for id in 0..limits.len() {
        let limit = limits.limit(id).unwrap();
        let tick_ns = limit.tick_us.unwrap() * 1000;
        let mut state = limit.rule.limiter.fresh_state();
        let key = format!("batched-{id}");
        // Several calls, so that later ones start from what Redis holds.
        for (call, batch) in steps(limit, id, tick_ns, 4 * MAX_BATCH)
            .chunks(MAX_BATCH)
            .enumerate()
        {
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(include_str!("../lua/decide.lua"))
                .arg(2 * batch.len());
            let decisions: Vec<_> = batch
                .iter()
                .map(|s| {
                    let mode = if s.refund { "refund" } else { "check" };
                    script_call(mode, &[item(limit, &key, s.cost)], Some(s.now)).unwrap()
                })
                .collect();
            for d in &decisions {
                cmd.arg(&d.keys);
            }
            cmd.arg(batch.len());
            for d in &decisions {
                cmd.arg(&d.args);
            }
            let replies: Vec<Vec<i64>> = cmd.query_async(&mut conn).await.unwrap();
            for (i, (s, reply)) in batch.iter().zip(&replies).enumerate() {
                let context = format!("{:?} #{id} call {call} decision {i}", limit.algorithm());
                if s.refund {
                    limit.rule.limiter.refund(&mut state, s.now, s.cost);
                    assert!(reply.is_empty(), "{context}: {reply:?}");
                    continue;
                }
                let want = limit.rule.limiter.check(&mut state, s.now, s.cost);
                let ticks = |span: Span| match span {
                    Span::NEVER => -1,
                    span => i64::try_from(ceil_to(span, tick_ns).0 / tick_ns).unwrap(),
                };
                let want = [
                    i64::from(want.allowed),
                    i64::try_from(want.remaining).unwrap(),
                    ticks(want.reset_after),
                    ticks(want.retry_after),
                ];
                assert_eq!(reply[..], want[..], "{context}");
            }
        }
    }
}

#[tokio::test]
async fn memory_matches_core() {
    let backend = Store::Memory(MemoryBackend::new(1000));
    replay(&backend, |_| 1, "memory").await;
}

#[tokio::test]
async fn redis_matches_core() {
    let redis = RedisServer::start();
    let backend = Store::Redis(RedisBackend::new(&redis.url(), Duration::from_secs(2), 1).unwrap());
    replay(&backend, |l| l.tick_us.unwrap() * 1000, "redis").await;
}

/// Over one enforced limit, nothing is consumed from the others; a shadow
/// limit over its limit blocks nothing.
async fn all_or_nothing(backend: &Store) {
    let limits = limits(&[
        (AlgorithmKind::FixedWindow, 10, "1h", None),
        (AlgorithmKind::TokenBucket, 1, "1h", None),
        (AlgorithmKind::Gcra, 1, "1h", None),
    ]);
    let (wide, narrow, shadowed) = (
        limits.limit(0).unwrap(),
        limits.limit(1).unwrap(),
        limits.limit(2).unwrap(),
    );
    let now = Some(START);
    let both = [item(wide, "a", 1), item(narrow, "a", 1)];
    let first = backend.check(&both, now).await.unwrap();
    assert!(first[0].allowed && first[1].allowed);
    assert_eq!(first[0].remaining, 9);
    let second = backend.check(&both, now).await.unwrap();
    assert!(!second[1].allowed);
    // A refused request took nothing: the other limit reports its permits
    // as they stand (as core's engine does).
    assert_eq!(second[0].remaining, 9);
    let wide_only = backend.check(&[item(wide, "a", 1)], now).await.unwrap();
    assert_eq!(
        wide_only[0].remaining, 8,
        "the refused request took nothing"
    );
    let mut shadow = item(shadowed, "a", 1);
    shadow.enforce = false;
    let filled = backend.check(&[shadow.clone()], now).await.unwrap();
    assert!(filled[0].allowed);
    let with_shadow = backend
        .check(&[item(wide, "a", 1), shadow], now)
        .await
        .unwrap();
    assert!(with_shadow[0].allowed, "a shadow limit blocks nothing");
    assert!(!with_shadow[1].allowed);
    assert_eq!(with_shadow[0].remaining, 7);
}

#[tokio::test]
async fn all_or_nothing_in_memory() {
    all_or_nothing(&Store::Memory(MemoryBackend::new(100))).await;
}

#[tokio::test]
async fn all_or_nothing_in_redis() {
    let redis = RedisServer::start();
    let backend = RedisBackend::new(&redis.url(), Duration::from_secs(2), 1).unwrap();
    all_or_nothing(&Store::Redis(backend)).await;
}

/// Many tasks on two server instances (two backends, two connections
/// each) hammer one key per algorithm: exactly `N` are admitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_callers_on_two_instances_never_overshoot() {
    const N: u64 = 40;
    let redis = RedisServer::start();
    let instances: Vec<Arc<RedisBackend>> = (0..2)
        .map(|_| Arc::new(RedisBackend::new(&redis.url(), Duration::from_secs(2), 2).unwrap()))
        .collect();
    let cases: Vec<_> = AlgorithmKind::ALL
        .iter()
        .map(|&a| (a, N, "1h", None))
        .collect();
    let limits = Arc::new(limits(&cases));
    for id in 0..limits.len() {
        let admitted = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for t in 0..8 {
            let backend = instances[t % 2].clone();
            let limits = limits.clone();
            let admitted = admitted.clone();
            tasks.push(tokio::spawn(async move {
                let limit = limits.limit(id).unwrap();
                for _ in 0..10 {
                    let out = backend
                        .check(&[item(limit, "hot", 1)], Some(START))
                        .await
                        .unwrap();
                    if out[0].allowed {
                        admitted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let kind = limits.limit(id).unwrap().algorithm();
        assert_eq!(
            admitted.load(Ordering::Relaxed),
            N,
            "{kind:?}: 80 tries, limit {N}"
        );
    }
}

/// A stopped Redis, and one whose connection never answers, make calls
/// fail within the configured timeout instead of hanging; a restarted
/// Redis is used again.
#[tokio::test]
async fn redis_down_fails_fast_and_recovers() {
    let timeout = Duration::from_millis(20);
    let limits = limits(&[(AlgorithmKind::FixedWindow, 3, "1h", None)]);
    let limit = limits.limit(0).unwrap();
    let items = [item(limit, "x", 1)];
    // The client's own correctness bound: far above the timeout, far below a hang.
    let bound = Duration::from_secs(1);

    // Accepts TCP connections (the kernel's backlog) but never speaks.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("redis://127.0.0.1:{}", silent.local_addr().unwrap().port());
    let hanging = RedisBackend::new(&url, timeout, 1).unwrap();
    let started = Instant::now();
    let result = tokio::time::timeout(bound, hanging.check(&items, None)).await;
    println!("silent server: failed after {:?}", started.elapsed());
    assert!(
        matches!(result, Ok(Err(_))),
        "must fail, not hang: {result:?}"
    );

    let mut redis = RedisServer::start();
    let port = redis.port;
    let backend = RedisBackend::new(&redis.url(), timeout, 1).unwrap();
    assert!(backend.check(&items, None).await.unwrap()[0].allowed);
    redis.stop();
    for i in 0..5 {
        let started = Instant::now();
        let result = tokio::time::timeout(bound, backend.check(&items, None)).await;
        println!(
            "redis stopped, call {i}: failed after {:?}",
            started.elapsed()
        );
        assert!(
            matches!(result, Ok(Err(_))),
            "must fail, not hang: {result:?}"
        );
    }

    let _restarted = RedisServer::start_on(port);
    let mut recovered = false;
    for _ in 0..200 {
        if let Ok(out) = backend.check(&items, None).await {
            // A fresh Redis: the count starts over, exactly.
            assert!(out[0].allowed);
            assert_eq!(out[0].remaining, 2);
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(recovered, "no answer within 200 attempts after the restart");
}

/// With Redis's own clock, state keys expire a second after they would be
/// fresh again, and a fresh state is not stored at all.
#[tokio::test]
async fn redis_keys_expire_when_fresh() {
    let redis = RedisServer::start();
    let backend = RedisBackend::new(&redis.url(), Duration::from_secs(2), 1).unwrap();
    let limits = limits(&[
        (AlgorithmKind::FixedWindow, 3, "1h", None),
        (AlgorithmKind::Gcra, 1, "5s", None),
        (AlgorithmKind::TokenBucket, 2, "1s", None),
    ]);
    let conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let pttl = |key: String| {
        let mut conn = conn.clone();
        async move {
            redis::cmd("PTTL")
                .arg(key)
                .query_async::<i64>(&mut conn)
                .await
                .unwrap()
        }
    };
    let window = limits.limit(0).unwrap();
    backend.check(&[item(window, "a", 1)], None).await.unwrap();
    let ttl = pttl(item(window, "a", 1).key).await;
    assert!((1_001..=3_601_002).contains(&ttl), "fixed window ttl {ttl}");

    let gcra = limits.limit(1).unwrap();
    backend.check(&[item(gcra, "a", 1)], None).await.unwrap();
    let ttl = pttl(item(gcra, "a", 1).key).await;
    assert!((5_000..=6_002).contains(&ttl), "gcra ttl {ttl}");

    let bucket = limits.limit(2).unwrap();
    backend.check(&[item(bucket, "a", 0)], None).await.unwrap();
    assert_eq!(
        pttl(item(bucket, "a", 0).key).await,
        -2,
        "a fresh state is not stored"
    );
}

/// Redis's clock, in microseconds since the epoch.
async fn redis_time_us(conn: &mut redis::aio::MultiplexedConnection) -> u64 {
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(conn).await.unwrap();
    secs * 1_000_000 + micros
}

/// Redis's time once at least `margin` is left before its next multiple of
/// `period_us`: a test that must stay within one window waits out a
/// boundary too close (at most `margin`) instead of running across it.
async fn redis_time_clear_of_boundary(
    conn: &mut redis::aio::MultiplexedConnection,
    period_us: u64,
    margin: Duration,
) -> u64 {
    loop {
        let now = redis_time_us(conn).await;
        let left = period_us - now % period_us;
        if u128::from(left) >= margin.as_micros() {
            return now;
        }
        // Just past the boundary; Redis's clock then says whether it passed.
        tokio::time::sleep(Duration::from_micros(left + 1)).await;
    }
}

/// Calls of `command` Redis ran since the last `CONFIG RESETSTAT`,
/// inside scripts included.
async fn command_calls(conn: &mut redis::aio::MultiplexedConnection, command: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .unwrap();
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .map_or(0, |rest| rest.split(',').next().unwrap().parse().unwrap())
}

/// A state as the previous release wrote it (the same hash, its expiry the
/// later of the window's end and a second from the write) is counted on;
/// writes within its window leave its expiry alone (no `PEXPIRE`: the key
/// already outlives the window), and a new key gets one.
#[tokio::test]
async fn state_written_by_the_previous_release_is_honoured() {
    let redis = RedisServer::start();
    let backend = RedisBackend::new(&redis.url(), Duration::from_secs(2), 1).unwrap();
    let limits = limits(&[(AlgorithmKind::FixedWindow, 5, "1h", None)]);
    let window = limits.limit(0).unwrap();
    let tick_us = window.tick_us.unwrap();
    let per_us = 3_600_000_000;
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    // Far more than the test's few calls take (each within its 2 s timeout).
    let margin = Duration::from_secs(30);
    let before = redis_time_clear_of_boundary(&mut conn, per_us, margin).await;
    let start_us = before - before % per_us;
    let end_ms = (start_us + per_us) / 1000;
    let old = item(window, "old", 1).key;
    let written_ttl = (end_ms - before / 1000).max(1000);
    let _: () = redis::pipe()
        .cmd("HSET")
        .arg(&old)
        .arg("s")
        .arg(start_us / tick_us)
        .arg("u")
        .arg(3)
        .cmd("PEXPIRE")
        .arg(&old)
        .arg(written_ttl)
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut remaining = Vec::new();
    for _ in 0..3 {
        let out = backend
            .check(&[item(window, "old", 1)], None)
            .await
            .unwrap();
        remaining.push((out[0].allowed, out[0].remaining));
    }
    let ttl: u64 = redis::cmd("PTTL")
        .arg(&old)
        .query_async(&mut conn)
        .await
        .unwrap();
    let after = redis_time_us(&mut conn).await;
    assert_eq!(
        after - after % per_us,
        start_us,
        "the test outlasted its {margin:?} margin before the hour"
    );
    assert_eq!(
        remaining,
        [(true, 1), (true, 0), (false, 0)],
        "3 of 5 were used"
    );
    assert_eq!(command_calls(&mut conn, "pexpire").await, 0);
    assert!(
        ttl <= written_ttl && ttl + 1 >= end_ms - after / 1000,
        "ttl {ttl} ms, written {written_ttl} ms, the window ends in {} ms",
        end_ms - after / 1000
    );
    for _ in 0..3 {
        backend
            .check(&[item(window, "new", 1)], None)
            .await
            .unwrap();
    }
    assert_eq!(
        command_calls(&mut conn, "pexpire").await,
        1,
        "a new key's expiry"
    );
}

/// Credentials in the URL are used; a wrong password is an error, not a hang.
#[tokio::test]
async fn redis_password_in_the_url() {
    let redis = RedisServer::start_with_password("s3cret");
    let limits = limits(&[(AlgorithmKind::FixedWindow, 3, "1h", None)]);
    let items = [item(limits.limit(0).unwrap(), "a", 1)];
    let url = |password: &str| format!("redis://:{password}@127.0.0.1:{}", redis.port);
    let good = RedisBackend::new(&url("s3cret"), Duration::from_secs(1), 1).unwrap();
    assert!(good.check(&items, None).await.unwrap()[0].allowed);
    let bad = RedisBackend::new(&url("wrong"), Duration::from_secs(1), 1).unwrap();
    assert!(bad.check(&items, None).await.is_err());
}

/// `rediss://` with the CA file of a self-signed server: connected over
/// TLS and exact; without the CA the handshake fails (an error, not a hang).
#[tokio::test]
async fn rediss_with_a_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    let (_redis, tls_port) = RedisServer::start_tls(dir.path());
    let url = format!("rediss://127.0.0.1:{tls_port}");
    let yaml = |ca: &str| {
        format!(
            "storage: {{backend: redis, redis: {{url: {url:?}, timeout: 2s{ca}}}}}\n\
             domains: [{{name: t, rules: [{{name: r, limit: {{count: 3, per: 1h}}}}]}}]"
        )
    };
    let config = ServerConfig::from_yaml(&yaml(", tls_ca_file: ca.pem")).unwrap();
    Limits::compile(&config, dir.path()).unwrap();
    let mut redis_config = config.storage.redis.clone().unwrap();
    redis_config.tls_ca_file = Some(dir.path().join("ca.pem"));
    let backend = RedisBackend::from_config(&redis_config, Duration::from_secs(2)).unwrap();
    let limits = limits(&[(AlgorithmKind::SlidingWindowLog, 3, "1h", None)]);
    let items = [item(limits.limit(0).unwrap(), "a", 1)];
    let mut allowed = 0;
    for _ in 0..5 {
        allowed += u32::from(backend.check(&items, None).await.unwrap()[0].allowed);
    }
    assert_eq!(allowed, 3);

    redis_config.tls_ca_file = None;
    let untrusted = RedisBackend::from_config(&redis_config, Duration::from_secs(2)).unwrap();
    assert!(untrusted.check(&items, None).await.is_err());
    let plain = ServerConfig::from_yaml(&yaml("")).unwrap();
    Limits::compile(&plain, dir.path()).unwrap();
}

/// The script is loaded once and called by SHA; a Redis that lost its
/// scripts (`SCRIPT FLUSH`, a restart) gets it again on `NOSCRIPT`, for a
/// lone decision as for a batch.
#[tokio::test]
async fn script_reloaded_after_noscript() {
    let redis = RedisServer::start();
    let backend = RedisBackend::new(&redis.url(), Duration::from_secs(1), 1).unwrap();
    let limits = limits(&[(AlgorithmKind::SlidingWindowLog, 3, "1h", None)]);
    let items = [item(limits.limit(0).unwrap(), "a", 1)];
    assert_eq!(
        backend.check(&items, Some(START)).await.unwrap()[0].remaining,
        2
    );
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let exists: Vec<bool> = redis::cmd("SCRIPT")
        .arg("EXISTS")
        .arg(backend.script_sha())
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(exists, [true]);
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        backend.check(&items, Some(START)).await.unwrap()[0].remaining,
        1
    );
    // A batch meeting NOSCRIPT: reloaded, every decision of it decided once.
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    let (backend, limits) = (Arc::new(backend), Arc::new(limits));
    let calls = backend.script_calls();
    let decisions = (0..8).map(|i| vec![(0, format!("b{i}"), 1)]).collect();
    for result in together(&backend, &limits, decisions).await {
        assert_eq!(result.unwrap()[0].remaining, 2);
    }
    assert_eq!(backend.script_calls(), calls + 1, "one batch");
}

/// Decides `decisions` (each a request's items) from as many tasks, all
/// spawned before any runs: on the test's single-threaded runtime they all
/// queue before the lane's task takes them, so they go to Redis together.
async fn together(
    backend: &Arc<RedisBackend>,
    limits: &Arc<Limits>,
    decisions: Vec<Vec<(usize, String, u64)>>,
) -> Vec<Result<Vec<Outcome>, StorageError>> {
    let tasks: Vec<_> = decisions
        .into_iter()
        .map(|wanted| {
            let (backend, limits) = (backend.clone(), limits.clone());
            tokio::spawn(async move {
                let items: Vec<Item<'_>> = wanted
                    .iter()
                    .map(|(id, key, cost)| item(limits.limit(*id).unwrap(), key, *cost))
                    .collect();
                backend.check(&items, Some(START)).await
            })
        })
        .collect();
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.unwrap());
    }
    results
}

/// Many waiting decisions go to Redis as one script call, and each is
/// decided as if alone: exact on one hot key (no overshoot, remaining
/// counting down in queue order), exact on keys of their own, and
/// all-or-nothing per decision (a refused request takes nothing from its
/// other key).
#[tokio::test]
async fn concurrent_decisions_are_batched_and_exact() {
    let redis = RedisServer::start();
    let backend = Arc::new(RedisBackend::new(&redis.url(), Duration::from_secs(2), 1).unwrap());
    let limits = Arc::new(limits(&[
        (AlgorithmKind::Gcra, 25, "1h", Some(25)),
        (AlgorithmKind::FixedWindow, 3, "1h", None),
    ]));
    // 40 on the hot key alone: 25 admitted, in order.
    let hot: Vec<_> = (0..40).map(|_| vec![(0, "hot".to_string(), 1)]).collect();
    let results = together(&backend, &limits, hot).await;
    assert_eq!(backend.script_calls(), 1, "40 waiting decisions, one call");
    let outcomes: Vec<Outcome> = results.into_iter().map(|r| r.unwrap()[0]).collect();
    let admitted = outcomes.iter().filter(|o| o.allowed).count();
    assert_eq!(admitted, 25, "limit 25, 40 tries");
    for (i, o) in outcomes.iter().enumerate() {
        assert_eq!(o.allowed, i < 25, "decision {i} in queue order");
        assert_eq!(o.remaining, 24u64.saturating_sub(i as u64), "decision {i}");
    }
    // Each decision takes one of its own key (limit 3) and one of a shared
    // key (fixed window 3 shared by a pair): per pair, both pass until the
    // shared key runs out; a refused decision takes nothing from its own.
    let pairs: Vec<_> = (0..40)
        .map(|i| {
            vec![
                (1, format!("own-{i}"), 1),
                (1, format!("shared-{}", i / 2), 2),
            ]
        })
        .collect();
    let results = together(&backend, &limits, pairs).await;
    assert_eq!(backend.script_calls(), 2, "one more call");
    for (i, result) in results.into_iter().enumerate() {
        let out = result.unwrap();
        let first_of_pair = i % 2 == 0;
        assert_eq!(out[1].allowed, first_of_pair, "decision {i}: shared key");
        assert!(out[0].allowed, "decision {i}: its own key is free");
        let own_left = if first_of_pair { 2 } else { 3 };
        assert_eq!(out[0].remaining, own_left, "decision {i}: all or nothing");
    }
}

/// More waiting decisions than one call carries are split into calls of
/// at most `MAX_BATCH`, and none is lost or decided twice.
#[tokio::test]
async fn batches_are_bounded() {
    let redis = RedisServer::start();
    let backend = Arc::new(RedisBackend::new(&redis.url(), Duration::from_secs(2), 1).unwrap());
    let limits = Arc::new(limits(&[(
        AlgorithmKind::SlidingWindowLog,
        100,
        "1h",
        None,
    )]));
    let n = 2 * MAX_BATCH + 1;
    let results = together(
        &backend,
        &limits,
        (0..n).map(|_| vec![(0, "k".to_string(), 1)]).collect(),
    )
    .await;
    let calls = backend.script_calls();
    assert!(
        (3..n as u64).contains(&calls),
        "{n} decisions in {calls} calls"
    );
    let admitted = results
        .iter()
        .filter(|r| r.as_ref().unwrap()[0].allowed)
        .count();
    assert_eq!(admitted, 100, "limit 100, {n} tries");
}

/// A decision Redis refuses (its key holds another type) fails alone with
/// Redis's reason; the others of its call are decided.
#[tokio::test]
async fn a_refused_decision_fails_alone() {
    let redis = RedisServer::start();
    let backend = Arc::new(RedisBackend::new(&redis.url(), Duration::from_secs(2), 1).unwrap());
    let limits = Arc::new(limits(&[(AlgorithmKind::TokenBucket, 5, "1h", None)]));
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let broken = item(limits.limit(0).unwrap(), "broken", 1).key;
    let _: () = redis::cmd("SET")
        .arg(&broken)
        .arg("not a hash")
        .query_async(&mut conn)
        .await
        .unwrap();
    let decisions = (0..10)
        .map(|i| {
            let key = if i == 4 {
                "broken".into()
            } else {
                format!("k{i}")
            };
            vec![(0, key, 1)]
        })
        .collect();
    let results = together(&backend, &limits, decisions).await;
    assert_eq!(backend.script_calls(), 1);
    for (i, result) in results.into_iter().enumerate() {
        match result {
            Err(StorageError::Refused(why)) if i == 4 => {
                assert!(why.contains("WRONGTYPE"), "{why}");
            }
            Ok(out) if i != 4 => assert_eq!(out[0].remaining, 4, "decision {i}"),
            other => panic!("decision {i}: {other:?}"),
        }
    }
}

/// A batch whose connection is gone fails, every decision with an error
/// and none hanging; once Redis is back, a batch is decided again.
#[tokio::test]
async fn a_batch_on_a_lost_connection_fails_and_recovers() {
    let mut redis = RedisServer::start();
    let port = redis.port;
    let backend = Arc::new(RedisBackend::new(&redis.url(), Duration::from_millis(200), 1).unwrap());
    let limits = Arc::new(limits(&[(AlgorithmKind::FixedWindow, 5, "1h", None)]));
    let batch = |run: usize| {
        (0..10)
            .map(|i| vec![(0, format!("run{run}-k{i}"), 1)])
            .collect()
    };
    for result in together(&backend, &limits, batch(0)).await {
        assert_eq!(result.unwrap()[0].remaining, 4);
    }
    redis.stop();
    let results = tokio::time::timeout(
        Duration::from_secs(2),
        together(&backend, &limits, batch(1)),
    )
    .await
    .expect("must fail, not hang");
    for result in results {
        let error = result.expect_err("Redis is down");
        println!("while down: {error}");
    }
    let _restarted = RedisServer::start_on(port);
    let mut recovered = false;
    // While the breaker lets one probe through, a batch is decided in part:
    // each attempt takes keys of its own.
    for attempt in 2..200 {
        let results = together(&backend, &limits, batch(attempt)).await;
        if results.iter().all(Result::is_ok) {
            for result in results {
                // Fresh keys: exactly one permit taken each.
                assert_eq!(result.unwrap()[0].remaining, 4);
            }
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        recovered,
        "no whole batch within 200 attempts after the restart"
    );
}
