//! `make bench-quota`, through Envoy: the quota server as the rate limit
//! service of Envoy's native global rate limit filter
//! (`envoy.filters.http.ratelimit`), against the same Envoy without the
//! filter.
//!
//! `sluice serve` (release build, memory backend) decides one descriptor
//! per client address that is never reached; Envoy
//! (`envoy/ratelimit-service.template.yaml`, one worker, the filter failing
//! closed) forwards each admitted request to the in-process upstream.
//! Envoy's filter skips routes without a route entry, so the route goes to
//! the upstream rather than to a `direct_response`. Variants:
//! - `nofilter`: the same configuration without the filter (the baseline);
//! - `native-ratelimit`: the filter, one `ShouldRateLimit` call per request.
//!
//! Each variant has its own Envoy, started once. Rounds are interleaved,
//! the order rotated each round; each run is a warm-up, then wrk with
//! `--connections` keep-alive connections for `--duration` seconds:
//! requests per second, p50 and p99 under that load. A reply other than
//! 2xx, or a socket error, is no throughput and fails the benchmark; so
//! does a run whose 2xx replies outnumber the filter's `OK` answers from
//! the quota server (every admitted request must have been decided).
//!
//! By default Envoy runs on CPU 0; wrk, the upstream and the quota server
//! share CPU 1 (`--no-pin`: nothing pinned). Prints every run, the
//! medians, `native_ratelimit_vs_nofilter_rps_ratio`,
//! `native_ratelimit_added_p50_ms` and `native_ratelimit_added_p99_ms`.
//!
//! Options: see `sluice_e2e::bench::Options` (default 3 rounds of 3 s).

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use sluice_e2e::bench::{self, load_average, median, round_order, Options, WrkLoad};
use sluice_e2e::envoy::Envoy;
use sluice_e2e::sluice_release_binary;
use sluice_e2e::upstream::Upstream;
use sluice_quota_server::launcher::Launcher;

/// The rate limit domain the filter sends.
const DOMAIN: &str = "rls";
/// Permits per second per client address: never reached.
const NEVER: u64 = 1_000_000_000;

/// One Envoy of the comparison.
struct Variant {
    name: &'static str,
    /// Whether the rate limit filter is in the chain.
    filter: bool,
}

const VARIANTS: [Variant; 2] = [
    Variant {
        name: "nofilter",
        filter: false,
    },
    Variant {
        name: "native-ratelimit",
        filter: true,
    },
];

/// One measured run.
#[derive(Debug, Clone)]
struct Run {
    /// 2xx replies per second.
    rps: f64,
    p50: Duration,
    p99: Duration,
    /// Replies that were not 2xx, and socket errors (warm-up included).
    errors: u64,
}

fn main() -> ExitCode {
    let defaults = Options {
        duration_s: 3,
        ..Options::default()
    };
    bench::main("benchrls", defaults, true, |options, pin| async move {
        run(&options, pin).await
    })
}

async fn run(options: &Options, pin: bool) -> Result<()> {
    println!(
        "benchrls: Envoy's native rate limit filter calling sluice serve (memory) vs the same \
         Envoy without it; {} round(s), {} s runs with {} connection(s) (+{} s warm-up), \
         1 Envoy worker{}",
        options.rounds,
        options.duration_s,
        options.connections,
        options.warmup_s,
        if pin {
            ", Envoy on CPU 0, wrk, upstream and quota server on CPU 1"
        } else {
            ", not pinned"
        }
    );
    if let Some(load) = load_average().filter(|&l| l > 0.5) {
        println!(
            "warning: load average {load:.2} before the runs: other processes compete for the \
             CPUs, the numbers will be noisy"
        );
    }
    let upstream = Upstream::start().await?;
    let quota = Launcher::new(sluice_release_binary()?)
        .log_filter("error")
        .start_text(&format!(
            "listen: {{grpc: \"127.0.0.1:0\"}}\ndomains:\n  - name: {DOMAIN}\n    descriptors:\n      \
             - key: remote_address\n        rate_limit: {{unit: second, requests_per_unit: {NEVER}}}\n"
        ))?;
    let mut envoys = Vec::new();
    for variant in &VARIANTS {
        let mut builder = Envoy::builder("benchrls")
            .instance(variant.name)
            .upstream(upstream.port())
            .concurrency(1)
            .access_log(false)
            .log_level("warn")
            .rate_limit_service(quota.grpc.port(), DOMAIN, true, variant.filter);
        if pin {
            builder = builder.cpu_affinity(&[0]);
        }
        envoys.push(
            builder
                .start()
                .await
                .with_context(|| format!("starting Envoy for {}", variant.name))?,
        );
    }
    let mut results: Vec<Vec<Run>> = vec![Vec::new(); VARIANTS.len()];
    for round in 0..options.rounds {
        for index in round_order(round, VARIANTS.len()) {
            let (variant, envoy) = (&VARIANTS[index], &envoys[index]);
            let run = run_variant(envoy, variant, options, pin).await?;
            println!(
                "round {} {:<17} {:>9.0} req/s  p50 {:>7.3} ms  p99 {:>7.3} ms{}",
                round + 1,
                variant.name,
                run.rps,
                ms(run.p50),
                ms(run.p99),
                if run.errors > 0 {
                    format!("  ERRORS: {}", run.errors)
                } else {
                    String::new()
                }
            );
            results[index].push(run);
        }
    }
    report(&results);
    let errors: u64 = results.iter().flatten().map(|r| r.errors).sum();
    if errors > 0 {
        bail!("{errors} replies were errors (not 2xx, or socket errors): nothing may be limited");
    }
    Ok(())
}

/// A warm-up, then the measured wrk run against `envoy`.
async fn run_variant(
    envoy: &Envoy,
    variant: &Variant,
    options: &Options,
    pin: bool,
) -> Result<Run> {
    let url = envoy.url("/bench");
    let load = |seconds| WrkLoad {
        threads: options.threads.min(options.connections),
        connections: options.connections,
        seconds,
        cpu: pin.then_some(1),
    };
    let mut errors = 0;
    if options.warmup_s > 0 {
        let warmup = bench::run_wrk(&url, load(options.warmup_s))?;
        errors += warmup.non_2xx + warmup.socket_errors;
    }
    let decided_before = decided(envoy).await?;
    let wrk = bench::run_wrk(&url, load(options.duration_s))?;
    let decided = decided(envoy).await?.saturating_sub(decided_before);
    errors += wrk.non_2xx + wrk.socket_errors;
    let good = wrk.requests.saturating_sub(wrk.non_2xx);
    if variant.filter && decided < good {
        bail!(
            "{}: {good} requests admitted but the filter got only {decided} OK answers from the \
             quota server",
            variant.name
        );
    }
    Ok(Run {
        rps: wrk.rps * good as f64 / wrk.requests.max(1) as f64,
        p50: wrk.p50,
        p99: wrk.p99,
        errors,
    })
}

/// `OK` answers the filter got from the rate limit service (0 without it):
/// its stat is kept under the route's cluster.
async fn decided(envoy: &Envoy) -> Result<u64> {
    Ok(envoy
        .stat("cluster.upstream.ratelimit.ok")
        .await?
        .unwrap_or(0))
}

/// The medians per variant and how the filter compares.
fn report(results: &[Vec<Run>]) {
    println!("\nmedians:");
    let mut medians = Vec::new();
    for (variant, runs) in VARIANTS.iter().zip(results) {
        let of = |f: &dyn Fn(&Run) -> f64| median(runs.iter().map(f).collect());
        let (rps, p50, p99) = (of(&|r| r.rps), of(&|r| ms(r.p50)), of(&|r| ms(r.p99)));
        println!(
            "  {:<17} {rps:>9.0} req/s  p50 {p50:>7.3} ms  p99 {p99:>7.3} ms",
            variant.name
        );
        medians.push((rps, p50, p99));
    }
    if let [(base_rps, base_p50, base_p99), (rps, p50, p99)] = medians[..] {
        if base_rps > 0.0 {
            println!(
                "native_ratelimit_vs_nofilter_rps_ratio: {:.3}",
                rps / base_rps
            );
        }
        println!("native_ratelimit_added_p50_ms: {:.3}", p50 - base_p50);
        println!("native_ratelimit_added_p99_ms: {:.3}", p99 - base_p99);
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
