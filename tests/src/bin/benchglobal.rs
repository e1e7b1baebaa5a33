//! `make bench-global`: what a fleet-wide limit costs through Envoy, against
//! a local one and against Envoy's own global rate limiting.
//!
//! One Envoy worker on CPU 0; wrk, the in-process upstream and the quota
//! server (`sluice serve`, release build, memory backend) share CPU 1
//! (`--no-pin`: nothing pinned). Every variant routes `/bench` to the
//! upstream, and each limit is per client address and never reached
//! (see [`variants`]):
//! - `nofilter`: the router alone (the baseline);
//! - `local`: Sluice with a local rule (this Envoy alone decides);
//! - `exact`: Sluice with a rule synced in exact mode: one `Quota/Check`
//!   call to the quota server per request, the request waiting for it;
//! - `leased`: Sluice with a rule synced in leased mode and the sync
//!   service: requests decided from leased permits (`checks/req` counts
//!   those that found no lease and asked the quota server);
//! - `native-global`: Envoy's `envoy.filters.http.ratelimit` calling the
//!   same quota server as its rate limit service (RLS v3,
//!   `envoy/ratelimit-service.template.yaml`).
//!
//! Each run starts a fresh Envoy, warms it up, then measures throughput
//! (wrk, `--connections`: req/s, Envoy's and the quota server's CPU per
//! request) and latency (wrk with one connection, one request at a time, so
//! no queueing: p50, p99). Runs are interleaved over `--rounds` rounds, the
//! order rotated each round; figures are medians. A reply that is not 2xx,
//! or a socket error, is an error, not throughput: the run's figures are
//! printed and the benchmark fails.
//!
//! Prints every run, the medians, then for each synced variant `<name>`:
//! `<name>_vs_local_rps_ratio`, `<name>_envoy_cpu_us_per_req` (with
//! `local`'s), `<name>_added_p50_ms` and `<name>_added_p99_ms` (its latency
//! minus `local`'s) and `<name>_vs_native_global_rps_ratio`.
//!
//! Then, with `leased` selected, the accuracy phase ([`accuracy`]): three
//! Envoys share a leased rule whose fixed-window limit the load exceeds;
//! admissions per window, `leased_overshoot_pct` and
//! `leased_undershoot_pct`. A reply other than 200 or 429 there, or a
//! failed quota server call, fails the benchmark.
//!
//! Options: see `sluice_e2e::bench::Options` (default 3 rounds of 3 s).

use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};
use sluice_e2e::bench::{self, load_average, median, round_order, Options, WrkLoad};
use sluice_e2e::envoy::{process_cpu_time, Envoy};
use sluice_e2e::fleet::{synced_rule, OnFailure, SyncMode};
use sluice_e2e::upstream::Upstream;
use sluice_e2e::windows::{admitted_per_window, timed_load};
use sluice_e2e::{sluice_release_binary, wasm_path};
use sluice_quota_server::launcher::{Launcher, QuotaServer};

/// The path every variant loads.
const PATH: &str = "/bench";
/// Seconds of the one-connection latency run.
const LATENCY_SECONDS: u64 = 2;
/// What no variant reaches: permits per second per client address.
const NEVER: u64 = 1_000_000_000;
/// The quota server's domain for synced rules, and for the RLS path.
const SYNC_DOMAIN: &str = "bench";
const RLS_DOMAIN: &str = "rls";
/// A synced rule's timeout: far above any answer here, so a failure shows
/// (the rule fails closed: a 429, counted as an error).
const SYNC_TIMEOUT: Duration = Duration::from_secs(1);
/// The throughput variant `leased`'s lease bound: above what one lease
/// needs at this load (about 1.5 intervals of demand), so requests are
/// decided from leases. At the default (100) a lease runs dry within
/// milliseconds here and a good share of requests are decided by `Check`
/// calls (`checks/req` shows it).
const THROUGHPUT_LEASE: u64 = 1_000;
/// Envoys (one worker each) sharing the accuracy phase's leased rule.
const ACCURACY_ENVOYS: u64 = 3;
/// The accuracy phase's rule `bench-window`: a fixed window of this many
/// seconds...
const WINDOW_SECONDS: u64 = 5;
/// ...admitting this many requests, fleet-wide (the load exceeds it).
const WINDOW_LIMIT: u64 = 5_000;
/// Whole windows the accuracy phase measures.
const WINDOWS: u32 = 3;
/// The default lease bound and interval, which the accuracy phase keeps.
const DEFAULT_LEASE: u64 = 100;

/// How a variant's Envoy limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Setup {
    NoFilter,
    /// Sluice, a local rule.
    Local,
    /// Sluice, a rule synced with the quota server in this mode.
    Synced(SyncMode),
    /// Envoy's global rate limit filter calling the quota server.
    NativeGlobal,
}

#[derive(Debug, Clone, Copy)]
struct Variant {
    name: &'static str,
    setup: Setup,
}

fn variants() -> Vec<Variant> {
    vec![
        Variant {
            name: "nofilter",
            setup: Setup::NoFilter,
        },
        Variant {
            name: "local",
            setup: Setup::Local,
        },
        Variant {
            name: "exact",
            setup: Setup::Synced(SyncMode::Exact),
        },
        Variant {
            name: "leased",
            setup: Setup::Synced(SyncMode::Leased {
                max_lease: THROUGHPUT_LEASE,
                replicas: 1,
            }),
        },
        Variant {
            name: "native-global",
            setup: Setup::NativeGlobal,
        },
    ]
}

/// One measured run.
#[derive(Debug, Clone)]
struct Run {
    /// Successful replies per second.
    rps: f64,
    /// Replies that were not 2xx, and socket errors, in all its phases.
    errors: u64,
    p50: Duration,
    p99: Duration,
    /// Envoy's CPU time per request, in µs.
    envoy_cpu_us: f64,
    /// The quota server's CPU time per request, in µs.
    quota_cpu_us: f64,
    /// `Quota/Check` calls per request (synced variants; leased: the
    /// requests that found no lease with room).
    checks_per_request: f64,
}

fn main() -> ExitCode {
    let defaults = Options {
        duration_s: 3,
        ..Options::default()
    };
    bench::main("benchglobal", defaults, true, |options, pin| async move {
        run(&options, pin).await
    })
}

/// The quota server's configuration: a synced rule per mode in domain
/// `bench`, and the RLS descriptor per client address in domain `rls`.
fn quota_server_config() -> String {
    format!(
        r#"listen: {{grpc: "127.0.0.1:0"}}
domains:
  - name: {SYNC_DOMAIN}
    rules:
      - {{name: bench-synced, limit: {{count: {NEVER}, per: 1s}}}}
      - {{name: bench-window, algorithm: fixed_window, limit: {{count: {WINDOW_LIMIT}, per: {WINDOW_SECONDS}s}}}}
  - name: {RLS_DOMAIN}
    descriptors:
      - key: remote_address
        rate_limit: {{unit: second, requests_per_unit: {NEVER}}}
"#
    )
}

/// The Sluice rule of `setup`, per client address, never reached.
fn sluice_rule(setup: Setup) -> Option<Value> {
    match setup {
        Setup::NoFilter | Setup::NativeGlobal => None,
        Setup::Local => Some(json!({
            "name": "bench-local",
            "key": ["client_ip"],
            "limit": {"count": NEVER, "per": "1s"}
        })),
        Setup::Synced(mode) => Some(synced_rule(
            "bench-synced",
            "/",
            &["client_ip"],
            mode.sync(SYNC_DOMAIN, SYNC_TIMEOUT, OnFailure::Closed),
        )),
    }
}

async fn run(options: &Options, pin: bool) -> Result<()> {
    let variants: Vec<Variant> = variants()
        .into_iter()
        .filter(|v| options.selects(v.name))
        .collect();
    if variants.is_empty() {
        bail!("no variant selected");
    }
    if variants.iter().any(|v| sluice_rule(v.setup).is_some()) {
        wasm_path()?;
    }
    println!(
        "benchglobal: {} round(s) x {} variant(s), {} s throughput with {} connection(s) \
         + {} s latency with one (+{} s warm-up), 1 Envoy worker{}",
        options.rounds,
        variants.len(),
        options.duration_s,
        options.connections,
        LATENCY_SECONDS,
        options.warmup_s,
        if pin {
            ", Envoy on CPU 0, wrk, upstream and quota server on CPU 1"
        } else {
            ", not pinned"
        }
    );
    if let Some(load) = load_average() {
        if load > 0.5 {
            println!(
                "warning: load average {load:.2} before the runs: other processes compete \
                 for the CPUs, the numbers will be noisy"
            );
        }
    }
    let upstream = Upstream::start().await?;
    let quota = Launcher::new(sluice_release_binary()?).start_text(&quota_server_config())?;
    let mut results: Vec<Vec<Run>> = vec![Vec::new(); variants.len()];
    for round in 0..options.rounds {
        for index in round_order(round, variants.len()) {
            let variant = variants[index];
            let run = run_variant(variant, options, pin, &upstream, &quota, round).await?;
            println!(
                "round {} {:<14} {:>9.0} req/s  p50 {:>7.3} ms  p99 {:>7.3} ms  \
                 envoy cpu {:>6.2} us/req  quota server cpu {:>6.2} us/req  checks/req {:.3}{}",
                round + 1,
                variant.name,
                run.rps,
                ms(run.p50),
                ms(run.p99),
                run.envoy_cpu_us,
                run.quota_cpu_us,
                run.checks_per_request,
                if run.errors > 0 {
                    format!("  ERRORS: {}", run.errors)
                } else {
                    String::new()
                }
            );
            results[index].push(run);
        }
    }
    report(&variants, &results);
    let errors: u64 = results.iter().flatten().map(|r| r.errors).sum();
    if errors > 0 {
        bail!("{errors} replies were errors (not 2xx, or socket errors): no variant may limit");
    }
    if options.selects("leased") {
        accuracy(options, pin, &upstream, &quota).await?;
    }
    Ok(())
}

/// The accuracy phase: [`ACCURACY_ENVOYS`] Envoys with the sync service
/// share rule `bench-window` (leased, the default `interval` and
/// `max_lease`, fixed windows of [`WINDOW_LIMIT`] per [`WINDOW_SECONDS`]);
/// keep-alive connections spread over them load it beyond its limit for
/// [`WINDOWS`] whole windows; admissions are counted per window from the
/// replies. Prints `leased_overshoot_pct` (the worst window's admissions
/// surely above the limit) and `leased_undershoot_pct` (the worst window's
/// shortfall even counting every reply that may have been decided in it).
async fn accuracy(
    options: &Options,
    pin: bool,
    upstream: &Upstream,
    quota: &QuotaServer,
) -> Result<()> {
    let mode = SyncMode::Leased {
        max_lease: DEFAULT_LEASE,
        replicas: ACCURACY_ENVOYS,
    };
    let rule = synced_rule(
        "bench-window",
        "/",
        &["client_ip"],
        mode.sync(SYNC_DOMAIN, SYNC_TIMEOUT, OnFailure::Closed),
    );
    let config = json!({"rules": [rule]});
    let mut envoys = Vec::new();
    for i in 0..ACCURACY_ENVOYS {
        let mut builder = Envoy::builder("benchglobal")
            .instance(&format!("accuracy-{i}"))
            .upstream(upstream.port())
            .concurrency(1)
            .access_log(false)
            .log_level("warn")
            .quota_server(quota.grpc.port())
            .sync_service(true)
            .sluice(&config);
        if pin {
            builder = builder.cpu_affinity(&[0]);
        }
        envoys.push(
            builder
                .start()
                .await
                .context("starting Envoy for accuracy")?,
        );
    }
    let per = Duration::from_secs(WINDOW_SECONDS);
    let from = SystemTime::now();
    // The load starts in a partial window, which warms the leases up, and
    // ends a little after the last whole window.
    let until = next_boundary(from, per) + per * WINDOWS + Duration::from_millis(300);
    println!(
        "\naccuracy: {ACCURACY_ENVOYS} Envoys (1 worker each, sync service), rule bench-window \
         leased (interval 100ms, max_lease {DEFAULT_LEASE}, replicas {ACCURACY_ENVOYS}), \
         fixed window {WINDOW_LIMIT} per {WINDOW_SECONDS} s; {} keep-alive connections for {:.1} s",
        options.connections,
        until.duration_since(from).unwrap_or_default().as_secs_f64()
    );
    let addrs: Vec<_> = envoys.iter().map(Envoy::addr).collect();
    let load = timed_load(&addrs, PATH, options.connections as usize, until).await?;
    let to = SystemTime::now();
    let mut failures = 0;
    for envoy in &envoys {
        for outcome in ["failed_open", "failed_closed", "timeout"] {
            let name = format!("wasmcustom.sluice_sync.rule.bench-window.outcome.{outcome}");
            failures += envoy.stat(&name).await?.unwrap_or(0);
        }
    }
    let windows = admitted_per_window(&load.replies, per, from, to);
    let refused = load.replies.iter().filter(|r| r.status == 429).count();
    println!(
        "accuracy: {} replies ({} admitted, {refused} refused), {} errors, {failures} failed \
         quota server calls",
        load.replies.len(),
        load.replies.len() - refused,
        load.errors
    );
    let floor = WINDOW_LIMIT.saturating_sub(2 * ACCURACY_ENVOYS * DEFAULT_LEASE);
    let (mut over, mut under) = (0, 0);
    for window in &windows {
        let most = window.certain + window.straddling;
        println!(
            "  window at {:>12} s: admitted {} surely, {most} at most (limit {WINDOW_LIMIT}, \
             documented floor {floor})",
            window.start.as_secs(),
            window.certain
        );
        over = over.max(window.certain.saturating_sub(WINDOW_LIMIT));
        under = under.max(WINDOW_LIMIT.saturating_sub(most));
    }
    if let Some(e) = &load.first_error {
        bail!("{} replies were errors (first: {e})", load.errors);
    }
    if failures > 0 {
        bail!("{failures} quota server calls failed or timed out: the counts are not the rule's");
    }
    if windows.len() < WINDOWS as usize {
        bail!("only {} whole windows measured", windows.len());
    }
    if windows
        .iter()
        .any(|w| w.certain + w.straddling < WINDOW_LIMIT / 2)
    {
        println!(
            "warning: some window admitted under half its limit: was the demand below it \
             (see the refusals)?"
        );
    }
    let pct = |n: u64| n as f64 * 100.0 / WINDOW_LIMIT as f64;
    println!("leased_overshoot_pct: {:.2}", pct(over));
    println!("leased_undershoot_pct: {:.2}", pct(under));
    Ok(())
}

/// The first multiple of `per` since the Unix epoch after `t`.
fn next_boundary(t: SystemTime, per: Duration) -> SystemTime {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos();
    let per_ns = per.as_nanos().max(1);
    let next = (since / per_ns + 1) * per_ns;
    UNIX_EPOCH + Duration::from_nanos(u64::try_from(next).unwrap_or(u64::MAX))
}

/// Medians per variant, then the figures comparing them.
fn report(variants: &[Variant], results: &[Vec<Run>]) {
    struct Medians {
        rps: f64,
        p50_ms: f64,
        p99_ms: f64,
        envoy_cpu_us: f64,
    }
    println!();
    println!("medians:");
    let mut medians = Vec::new();
    for (variant, runs) in variants.iter().zip(results) {
        let of = |f: &dyn Fn(&Run) -> f64| median(runs.iter().map(f).collect());
        let m = Medians {
            rps: of(&|r| r.rps),
            p50_ms: of(&|r| ms(r.p50)),
            p99_ms: of(&|r| ms(r.p99)),
            envoy_cpu_us: of(&|r| r.envoy_cpu_us),
        };
        println!(
            "  {:<14} {:>9.0} req/s  p50 {:>7.3} ms  p99 {:>7.3} ms  envoy cpu {:>6.2} us/req  \
             quota server cpu {:>6.2} us/req  checks/req {:.3}",
            variant.name,
            m.rps,
            m.p50_ms,
            m.p99_ms,
            m.envoy_cpu_us,
            of(&|r| r.quota_cpu_us),
            of(&|r| r.checks_per_request)
        );
        medians.push((variant, m));
    }
    println!();
    let find = |setup: Setup| {
        medians
            .iter()
            .find(|(v, _)| v.setup == setup)
            .map(|(_, m)| m)
    };
    if let Some(nofilter) = find(Setup::NoFilter) {
        for (variant, m) in &medians {
            if variant.setup != Setup::NoFilter && nofilter.rps > 0.0 {
                println!(
                    "{}_vs_nofilter_rps_ratio: {:.3}",
                    variant.name.replace('-', "_"),
                    m.rps / nofilter.rps
                );
            }
        }
    }
    for (variant, m) in &medians {
        if !matches!(variant.setup, Setup::Synced(_)) {
            continue;
        }
        if let Some(local) = find(Setup::Local) {
            if local.rps > 0.0 {
                println!(
                    "{}_vs_local_rps_ratio: {:.3}",
                    variant.name,
                    m.rps / local.rps
                );
            }
            println!(
                "{}_envoy_cpu_us_per_req: {:.2} (local: {:.2})",
                variant.name, m.envoy_cpu_us, local.envoy_cpu_us
            );
            println!(
                "{}_added_p50_ms: {:.3}",
                variant.name,
                m.p50_ms - local.p50_ms
            );
            println!(
                "{}_added_p99_ms: {:.3}",
                variant.name,
                m.p99_ms - local.p99_ms
            );
        }
        if let Some(native) = find(Setup::NativeGlobal).filter(|n| n.rps > 0.0) {
            println!(
                "{}_vs_native_global_rps_ratio: {:.3}",
                variant.name,
                m.rps / native.rps
            );
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

async fn start_envoy(
    variant: Variant,
    pin: bool,
    upstream: &Upstream,
    quota: &QuotaServer,
    round: usize,
) -> Result<Envoy> {
    let mut builder = Envoy::builder("benchglobal")
        .instance(&format!("{}-r{}", variant.name, round + 1))
        .upstream(upstream.port())
        .concurrency(1)
        .access_log(false)
        .log_level("warn");
    if pin {
        builder = builder.cpu_affinity(&[0]);
    }
    builder = match variant.setup {
        Setup::NativeGlobal => {
            builder.rate_limit_service(quota.grpc.port(), RLS_DOMAIN, true, true)
        }
        Setup::Synced(mode) => builder
            .quota_server(quota.grpc.port())
            .sync_service(mode.needs_sync_service()),
        Setup::NoFilter | Setup::Local => builder,
    };
    if let Some(rule) = sluice_rule(variant.setup) {
        builder = builder.sluice(&json!({"rules": [rule]}));
    }
    builder
        .start()
        .await
        .with_context(|| format!("starting Envoy for {}", variant.name))
}

async fn run_variant(
    variant: Variant,
    options: &Options,
    pin: bool,
    upstream: &Upstream,
    quota: &QuotaServer,
    round: usize,
) -> Result<Run> {
    let envoy = start_envoy(variant, pin, upstream, quota, round).await?;
    let url = envoy.url(PATH);
    let load = |seconds, connections| WrkLoad {
        threads: options.threads.min(connections),
        connections,
        seconds,
        cpu: pin.then_some(1),
    };
    let mut errors = 0;
    if options.warmup_s > 0 {
        let warmup = bench::run_wrk(&url, load(options.warmup_s, options.connections))?;
        errors += warmup.non_2xx + warmup.socket_errors;
    }
    let checks_before = checks(&envoy).await?;
    let envoy_before = envoy.cpu_time()?;
    let quota_before = process_cpu_time(quota.pid())?;
    let throughput = bench::run_wrk(&url, load(options.duration_s, options.connections))?;
    let envoy_cpu = envoy.cpu_time()?.saturating_sub(envoy_before);
    let quota_cpu = process_cpu_time(quota.pid())?.saturating_sub(quota_before);
    let checks = checks(&envoy).await?.saturating_sub(checks_before);
    let latency = bench::run_wrk(&url, load(LATENCY_SECONDS, 1))?;
    errors += throughput.non_2xx + throughput.socket_errors;
    errors += latency.non_2xx + latency.socket_errors;
    let answered = throughput.requests.max(1) as f64;
    let good = throughput.requests.saturating_sub(throughput.non_2xx) as f64;
    Ok(Run {
        rps: throughput.rps * good / answered,
        errors,
        p50: latency.p50,
        p99: latency.p99,
        envoy_cpu_us: envoy_cpu.as_secs_f64() * 1e6 / answered,
        quota_cpu_us: quota_cpu.as_secs_f64() * 1e6 / answered,
        checks_per_request: checks as f64 / answered,
    })
}

/// `Quota/Check` calls `envoy` made for rule `bench-synced`, whatever
/// their outcome (0 without the rule).
async fn checks(envoy: &Envoy) -> Result<u64> {
    let mut total = 0;
    for outcome in ["ok", "failed_open", "failed_closed", "timeout"] {
        let name = format!("wasmcustom.sluice_sync.rule.bench-synced.outcome.{outcome}");
        total += envoy.stat(&name).await?.unwrap_or(0);
    }
    Ok(total)
}
