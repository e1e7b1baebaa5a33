//! `make bench-filter`: what the Sluice filter costs inside Envoy.
//!
//! One Envoy worker, the `/direct` route (a `direct_response`, no upstream
//! work), a load generator on loopback. Variants (see [`variants`]):
//! - `nofilter`: no HTTP filter but the router;
//! - `native`: Envoy's `local_ratelimit` with a bucket that never empties;
//! - `noop-wasm`: an empty proxy-wasm filter (`tests/noop-filter`: every
//!   callback continues), what any proxy-wasm filter costs;
//! - `sluice`: the Sluice filter with one per-IP token bucket that never
//!   limits;
//! - `grpc-nofilter`, `grpc-noop-wasm`, `grpc-sluice`: unary
//!   `user.UserService/GetUser` calls (h2load, h2c) to the in-process tonic
//!   upstream, without a filter, with the empty proxy-wasm filter (what any
//!   proxy-wasm filter costs a call, its body callbacks included) and with
//!   Sluice limiting gRPC calls and messages (never reached);
//! - `ws-nofilter`, `ws-noop-wasm`, `ws-sluice`: WebSocket messages echoed
//!   by the in-process upstream (`/ws`; each connection sends its next
//!   message when the echo of the previous arrives), without a filter, with
//!   the empty filter, and with Sluice limiting WebSocket messages and
//!   bytes (never reached). The WebSocket load generator runs inside this
//!   process (not pinned); its "requests" are messages.
//!
//! Run only when `--only` names them:
//! - `probe-<kind>` (as `make bench-host-calls` does): the empty filter
//!   plus [`PROBE_CALLS`] host calls of one kind per request
//!   (`tests/probe-filter`); printed as `host_call_us.<kind>: X`, the CPU
//!   per call over `noop-wasm`;
//! - `sluice-x-ratelimit-headers`, `sluice-no-headers`: `sluice` with the
//!   legacy `X-RateLimit-*` headers too (five on allowed responses), and
//!   with none: what the headers cost (printed as
//!   `<variant>_over_noop_wasm_cpu_us: X`);
//! - `sluice-baseline`, `grpc-sluice-baseline`, `ws-sluice-baseline`: the
//!   same as `sluice`, `grpc-sluice` and `ws-sluice` with another build of
//!   the filter (`SLUICE_BASELINE_WASM`, e.g. a copy of the wasm before a
//!   change), so that two builds are compared in one run (printed as
//!   `<variant>_vs_baseline_rps_ratio: X` and
//!   `<variant>_minus_baseline_cpu_us: X`).
//!
//! Runs are interleaved: `--rounds` rounds (default 3), the variant order
//! rotated each round, a fresh Envoy per run, a short warm-up before each.
//! Envoy is pinned to CPU 0 and the load generator to CPU 1 (`--no-pin` to
//! disable). Prints every run, the medians (Envoy's CPU time per request
//! first: on shared cores requests per second measure the bottleneck as
//! much as the filter), the ratios of requests per second
//! (`filter_vs_noop_wasm_rps_ratio: X`, `filter_vs_nofilter_rps_ratio: X`,
//! `filter_vs_native_rps_ratio: X`, `grpc_vs_nofilter_rps_ratio: X`,
//! `ws_vs_nofilter_msgs_ratio: X`, and against the empty filter
//! `grpc_vs_noop_wasm_rps_ratio: X`, `ws_vs_noop_wasm_msgs_ratio: X`) and
//! the CPU Sluice adds over the empty filter per request, call and message
//! (`filter_over_noop_wasm_cpu_us: X`, `grpc_over_noop_wasm_cpu_us: X`,
//! `ws_over_noop_wasm_cpu_us: X`).
//!
//! To add a variant, add a [`Load`] kind with its runner in [`run_load`], a
//! [`Variant`] in [`variants`], and the [`Ratio`]s to print in [`ratios`].
//!
//! Options: `--rounds N`, `--duration SECONDS`, `--connections N`,
//! `--threads N`, `--warmup SECONDS`, `--no-pin`, `--only NAME[,NAME]`.

use std::io::Write as _;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use futures_util::SinkExt as _;
use serde_json::{json, Value};
use sluice_e2e::bench::{self, load_average, median, round_order, Options, WrkLoad};
use sluice_e2e::envoy::{pin_to_cpus, Envoy, EnvoyBuilder};
use sluice_e2e::grpc_upstream::GrpcUpstream;
use sluice_e2e::routes::with_upstreams;
use sluice_e2e::upstream::Upstream;
use sluice_e2e::ws_client::{self, next_message, Upgrade};
use sluice_e2e::ws_upstream::WsUpstream;
use sluice_e2e::{find_on_path, target_dir, wasm_path};
use tokio_tungstenite::tungstenite::Message;

/// How a variant's Envoy is set up.
#[derive(Debug, Clone, Copy)]
enum Filters {
    None,
    NativeLocalRatelimit,
    /// The empty proxy-wasm filter.
    NoopWasm,
    /// Sluice with one per-IP token bucket of 10^9 per second.
    SluiceNeverLimits,
    /// Sluice limiting gRPC calls and messages at 10^9 per second.
    SluiceGrpcNeverLimits,
    /// Sluice limiting WebSocket messages and bytes at 10^9 per second.
    SluiceWsNeverLimits,
    /// The empty filter plus [`PROBE_CALLS`] host calls of this kind.
    Probe(&'static str),
    /// [`Filters::SluiceNeverLimits`] with this `headers` setting.
    SluiceHeaders(&'static str),
    /// These filters with the build of the filter in `SLUICE_BASELINE_WASM`.
    Baseline(&'static Filters),
}

/// Host calls per request of a `probe-<kind>` variant: enough to stand
/// out of the noise of one request's cost.
const PROBE_CALLS: u32 = 10;

/// The variants run only when `--only` names them: the `probe-<kind>`
/// ones and Sluice with fewer headers.
fn opt_in_variants() -> Vec<Variant> {
    const KINDS: [(&str, &str); 10] = [
        ("probe-proxy-clock", "proxy-clock"),
        ("probe-wasi-clock", "wasi-clock"),
        ("probe-metric", "metric"),
        ("probe-peer-address", "peer-address"),
        ("probe-request-header", "request-header"),
        ("probe-shared-get", "shared-get"),
        ("probe-shared-cas", "shared-cas"),
        ("probe-response-header-replace", "response-header-replace"),
        ("probe-response-header-add", "response-header-add"),
        ("probe-response-headers-map", "response-headers-map"),
    ];
    let http = Load::Wrk { path: "/direct" };
    let headers = [
        (
            "sluice-x-ratelimit-headers",
            r#"{"sets": ["ietf", "x_ratelimit"], "on_allowed": true}"#,
        ),
        ("sluice-no-headers", r#"{"on_allowed": false}"#),
    ];
    KINDS
        .into_iter()
        .map(|(name, kind)| Variant {
            name,
            filters: Filters::Probe(kind),
            load: http,
        })
        .chain(headers.into_iter().map(|(name, headers)| Variant {
            name,
            filters: Filters::SluiceHeaders(headers),
            load: http,
        }))
        .chain([
            Variant {
                name: "sluice-baseline",
                filters: Filters::Baseline(&Filters::SluiceNeverLimits),
                load: http,
            },
            Variant {
                name: "grpc-sluice-baseline",
                filters: Filters::Baseline(&Filters::SluiceGrpcNeverLimits),
                load: Load::GrpcUnary,
            },
            Variant {
                name: "ws-sluice-baseline",
                filters: Filters::Baseline(&Filters::SluiceWsNeverLimits),
                load: Load::WsMessages,
            },
        ])
        .collect()
}

/// The load put on Envoy.
#[derive(Debug, Clone, Copy)]
enum Load {
    /// wrk (HTTP/1.1, keep-alive) on `path`.
    Wrk { path: &'static str },
    /// h2load (h2c): unary `GetUser` calls, one in flight per connection.
    GrpcUnary,
    /// WebSocket echo round trips on `/ws`, one in flight per connection.
    WsMessages,
}

#[derive(Debug, Clone, Copy)]
struct Variant {
    name: &'static str,
    filters: Filters,
    load: Load,
}

/// A ratio of two variants' median requests/s, printed as `label: X`.
struct Ratio {
    label: &'static str,
    numerator: &'static str,
    denominator: &'static str,
}

fn variants() -> Vec<Variant> {
    let http = Load::Wrk { path: "/direct" };
    vec![
        Variant {
            name: "nofilter",
            filters: Filters::None,
            load: http,
        },
        Variant {
            name: "native",
            filters: Filters::NativeLocalRatelimit,
            load: http,
        },
        Variant {
            name: "noop-wasm",
            filters: Filters::NoopWasm,
            load: http,
        },
        Variant {
            name: "sluice",
            filters: Filters::SluiceNeverLimits,
            load: http,
        },
        Variant {
            name: "grpc-nofilter",
            filters: Filters::None,
            load: Load::GrpcUnary,
        },
        Variant {
            name: "grpc-noop-wasm",
            filters: Filters::NoopWasm,
            load: Load::GrpcUnary,
        },
        Variant {
            name: "grpc-sluice",
            filters: Filters::SluiceGrpcNeverLimits,
            load: Load::GrpcUnary,
        },
        Variant {
            name: "ws-nofilter",
            filters: Filters::None,
            load: Load::WsMessages,
        },
        Variant {
            name: "ws-noop-wasm",
            filters: Filters::NoopWasm,
            load: Load::WsMessages,
        },
        Variant {
            name: "ws-sluice",
            filters: Filters::SluiceWsNeverLimits,
            load: Load::WsMessages,
        },
    ]
}

fn ratios() -> Vec<Ratio> {
    vec![
        Ratio {
            label: "filter_vs_noop_wasm_rps_ratio",
            numerator: "sluice",
            denominator: "noop-wasm",
        },
        Ratio {
            label: "filter_vs_nofilter_rps_ratio",
            numerator: "sluice",
            denominator: "nofilter",
        },
        Ratio {
            label: "filter_vs_native_rps_ratio",
            numerator: "sluice",
            denominator: "native",
        },
        Ratio {
            label: "grpc_vs_nofilter_rps_ratio",
            numerator: "grpc-sluice",
            denominator: "grpc-nofilter",
        },
        Ratio {
            label: "ws_vs_nofilter_msgs_ratio",
            numerator: "ws-sluice",
            denominator: "ws-nofilter",
        },
        Ratio {
            label: "grpc_vs_noop_wasm_rps_ratio",
            numerator: "grpc-sluice",
            denominator: "grpc-noop-wasm",
        },
        Ratio {
            label: "ws_vs_noop_wasm_msgs_ratio",
            numerator: "ws-sluice",
            denominator: "ws-noop-wasm",
        },
        Ratio {
            label: "grpc_noop_wasm_vs_nofilter_rps_ratio",
            numerator: "grpc-noop-wasm",
            denominator: "grpc-nofilter",
        },
        Ratio {
            label: "ws_noop_wasm_vs_nofilter_msgs_ratio",
            numerator: "ws-noop-wasm",
            denominator: "ws-nofilter",
        },
    ]
}

/// One measured run.
#[derive(Debug, Clone)]
struct Run {
    rps: f64,
    requests: u64,
    non_2xx: u64,
    latency: String,
    /// Envoy's CPU time per request.
    cpu_per_request: Duration,
}

fn main() -> ExitCode {
    bench::main(
        "benchfilter",
        Options::default(),
        false,
        |options, _| async move { run(&options).await },
    )
}

async fn run(options: &Options) -> Result<()> {
    let named = |name: &str| {
        options
            .only
            .as_ref()
            .is_some_and(|only| only.iter().any(|o| o == name))
    };
    let variants: Vec<Variant> = variants()
        .into_iter()
        .filter(|v| options.selects(v.name))
        .chain(opt_in_variants().into_iter().filter(|v| named(v.name)))
        .collect();
    if variants.is_empty() {
        bail!("no variant selected");
    }
    if variants.iter().any(|v| {
        !matches!(
            v.filters,
            Filters::None | Filters::NativeLocalRatelimit | Filters::NoopWasm | Filters::Probe(_)
        )
    }) {
        wasm_path()?;
    }
    if variants
        .iter()
        .any(|v| matches!(v.filters, Filters::NoopWasm))
    {
        noop_wasm_path()?;
    }
    if variants
        .iter()
        .any(|v| matches!(v.filters, Filters::Baseline(_)))
    {
        baseline_wasm_path()?;
    }
    if variants
        .iter()
        .any(|v| matches!(v.filters, Filters::Probe(_)))
    {
        probe_wasm_path()?;
    }
    let pin = options.pins();
    println!(
        "benchfilter: {} round(s) x {} variant(s), {} s each (+{} s warm-up), {} connection(s), \
         1 Envoy worker{}",
        options.rounds,
        variants.len(),
        options.duration_s,
        options.warmup_s,
        options.connections,
        if pin {
            ", Envoy on CPU 0, load generator on CPU 1"
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
    let upstreams = Upstreams {
        http: Upstream::start().await?,
        grpc: GrpcUpstream::start().await?,
        ws: WsUpstream::start().await?,
    };
    let mut results: Vec<Vec<Run>> = vec![Vec::new(); variants.len()];
    for round in 0..options.rounds {
        for index in round_order(round, variants.len()) {
            let variant = variants[index];
            let run = run_variant(&variant, options, pin, &upstreams, round).await?;
            println!(
                "round {} {:<14} envoy cpu {:>6.2} us/req  {:>10.0} req/s  {:>9} requests  latency avg {:<9}{}",
                round + 1,
                variant.name,
                run.cpu_per_request.as_secs_f64() * 1e6,
                run.rps,
                run.requests,
                run.latency,
                if run.non_2xx > 0 {
                    format!("  NON-2XX: {}", run.non_2xx)
                } else {
                    String::new()
                }
            );
            if run.non_2xx > 0 {
                bail!(
                    "variant {}: {} responses were not 2xx (a variant must never limit)",
                    variant.name,
                    run.non_2xx
                );
            }
            results[index].push(run);
        }
    }

    println!();
    println!("medians:");
    let mut medians = Vec::new();
    for (variant, runs) in variants.iter().zip(&results) {
        let rps = median(runs.iter().map(|r| r.rps).collect());
        let cpu = median(
            runs.iter()
                .map(|r| r.cpu_per_request.as_secs_f64() * 1e6)
                .collect(),
        );
        println!(
            "  {:<14} envoy cpu {:>6.2} us/req  {:>10.0} req/s",
            variant.name, cpu, rps
        );
        medians.push((variant.name, rps, cpu));
    }
    println!();
    let find = |name: &str| medians.iter().find(|(n, _, _)| *n == name);
    for ratio in ratios() {
        if let (Some((_, num, _)), Some((_, den, _))) =
            (find(ratio.numerator), find(ratio.denominator))
        {
            if *den > 0.0 {
                println!("{}: {:.3}", ratio.label, num / den);
            }
        }
    }
    // The CPU Sluice adds over the empty filter, per request, call and message.
    for (label, sluice, noop) in [
        ("filter_over_noop_wasm_cpu_us", "sluice", "noop-wasm"),
        (
            "grpc_over_noop_wasm_cpu_us",
            "grpc-sluice",
            "grpc-noop-wasm",
        ),
        ("ws_over_noop_wasm_cpu_us", "ws-sluice", "ws-noop-wasm"),
    ] {
        if let (Some((_, _, sluice)), Some((_, _, noop))) = (find(sluice), find(noop)) {
            println!("{label}: {:.2}", sluice - noop);
        }
    }
    if let Some((_, _, noop)) = find("noop-wasm") {
        for variant in &variants {
            let Some((_, _, cpu)) = find(variant.name) else {
                continue;
            };
            match variant.filters {
                Filters::Probe(kind) => {
                    let per_call = (cpu - noop) / f64::from(PROBE_CALLS);
                    println!("host_call_us.{kind}: {per_call:.3}");
                }
                Filters::SluiceHeaders(_) => {
                    let name = variant.name.replace('-', "_");
                    println!("{name}_over_noop_wasm_cpu_us: {:.2}", cpu - noop);
                }
                _ => {}
            }
        }
    }
    // This build against the baseline build, variant by variant.
    for variant in &variants {
        let Some(name) = variant.name.strip_suffix("-baseline") else {
            continue;
        };
        if let (Some((_, rps, cpu)), Some((_, base_rps, base_cpu))) =
            (find(name), find(variant.name))
        {
            let label = name.replace('-', "_");
            if *base_rps > 0.0 {
                println!("{label}_vs_baseline_rps_ratio: {:.3}", rps / base_rps);
            }
            println!("{label}_minus_baseline_cpu_us: {:.2}", cpu - base_cpu);
        }
    }
    Ok(())
}

/// The upstreams every variant's Envoy routes to.
struct Upstreams {
    http: Upstream,
    grpc: GrpcUpstream,
    ws: WsUpstream,
}

async fn run_variant(
    variant: &Variant,
    options: &Options,
    pin: bool,
    upstreams: &Upstreams,
    round: usize,
) -> Result<Run> {
    let builder = Envoy::builder("benchfilter")
        .instance(&format!("{}-r{}", variant.name, round + 1))
        .upstream(upstreams.http.port())
        .concurrency(1)
        .access_log(false)
        .log_level("warn");
    let mut builder = with_upstreams(
        builder,
        Some(upstreams.grpc.port()),
        Some(upstreams.ws.port()),
    );
    if pin {
        builder = builder.cpu_affinity(&[0]);
    }
    builder = configure(builder, variant.filters)?;
    let envoy = builder
        .start()
        .await
        .with_context(|| format!("starting Envoy for {}", variant.name))?;
    if options.warmup_s > 0 {
        run_load(
            &envoy,
            variant.load,
            options,
            options.warmup_s,
            pin,
            upstreams,
        )
        .await?;
    }
    let cpu_before = envoy.cpu_time()?;
    let mut run = run_load(
        &envoy,
        variant.load,
        options,
        options.duration_s,
        pin,
        upstreams,
    )
    .await?;
    let cpu = envoy.cpu_time()?.saturating_sub(cpu_before);
    run.cpu_per_request = if run.requests > 0 {
        cpu / u32::try_from(run.requests).unwrap_or(u32::MAX)
    } else {
        Duration::ZERO
    };
    Ok(run)
}

/// The empty proxy-wasm filter, built by `make bench-filter`.
fn noop_wasm_path() -> Result<std::path::PathBuf> {
    let path = target_dir().join("wasm32-wasip1/release/sluice_noop_filter.wasm");
    if !path.is_file() {
        bail!(
            "the empty proxy-wasm filter is not built: {} is missing; run `make bench-filter` \
             (cargo build -p sluice-noop-filter --target wasm32-wasip1 --release)",
            path.display()
        );
    }
    Ok(path)
}

/// The build of the filter the `-baseline` variants run.
fn baseline_wasm_path() -> Result<std::path::PathBuf> {
    let path = std::env::var_os("SLUICE_BASELINE_WASM")
        .filter(|p| !p.is_empty())
        .map(std::path::PathBuf::from)
        .ok_or_else(|| {
            anyhow!("the -baseline variants need SLUICE_BASELINE_WASM: a build of the filter")
        })?;
    if !path.is_file() {
        bail!("SLUICE_BASELINE_WASM: {} is not a file", path.display());
    }
    Ok(path)
}

/// The probe filter, built by `make bench-host-calls`.
fn probe_wasm_path() -> Result<std::path::PathBuf> {
    let path = target_dir().join("wasm32-wasip1/release/sluice_probe_filter.wasm");
    if !path.is_file() {
        bail!(
            "the probe filter is not built: {} is missing; run `make bench-host-calls` \
             (cargo build -p sluice-probe-filter --target wasm32-wasip1 --release)",
            path.display()
        );
    }
    Ok(path)
}

/// The `sluice` variant's rule: a per-IP token bucket of 10^9 per second.
fn per_ip_never_limits() -> Value {
    json!({
        "name": "bench-per-ip",
        "key": ["client_ip"],
        "limit": {"count": 1_000_000_000u64, "per": "1s"},
        "algorithm": "token_bucket"
    })
}

/// A rule that never limits: `count` per second, 10^9 of them.
fn never_limits(name: &str, matches: Value, counts: &str) -> Value {
    json!({
        "name": name,
        "match": matches,
        "counts": counts,
        "limit": {"count": 1_000_000_000u64, "per": "1s"},
        "algorithm": "token_bucket"
    })
}

fn configure(builder: EnvoyBuilder, filters: Filters) -> Result<EnvoyBuilder> {
    Ok(match filters {
        Filters::Baseline(filters) => configure(builder.wasm(&baseline_wasm_path()?), *filters)?,
        Filters::None => builder,
        Filters::NativeLocalRatelimit => builder.native_local_ratelimit(true),
        // Any configuration: the empty filter reads none.
        Filters::NoopWasm => builder
            .wasm(&noop_wasm_path()?)
            .sluice(&json!({"rules": []})),
        Filters::Probe(kind) => builder
            .wasm(&probe_wasm_path()?)
            .sluice_raw(&format!("{kind}={PROBE_CALLS}")),
        Filters::SluiceNeverLimits => builder.sluice(&json!({"rules": [per_ip_never_limits()]})),
        Filters::SluiceHeaders(headers) => builder.sluice(&json!({
            "rules": [per_ip_never_limits()],
            "headers": serde_json::from_str::<Value>(headers)?
        })),
        Filters::SluiceGrpcNeverLimits => builder.sluice(&json!({"rules": [
            never_limits("bench-grpc-calls", json!({"grpc": {}}), "requests"),
            never_limits("bench-grpc-msgs", json!({"grpc": {}}), "messages"),
        ]})),
        Filters::SluiceWsNeverLimits => builder.sluice(&json!({"rules": [
            never_limits("bench-ws-msgs", json!({"websocket": true}), "messages"),
            never_limits("bench-ws-bytes", json!({"websocket": true}), "bytes"),
        ]})),
    })
}

async fn run_load(
    envoy: &Envoy,
    load: Load,
    options: &Options,
    seconds: u64,
    pin: bool,
    upstreams: &Upstreams,
) -> Result<Run> {
    match load {
        Load::Wrk { path } => run_wrk(envoy, path, options, seconds, pin),
        Load::GrpcUnary => {
            let before = upstreams.grpc.calls("GetUser");
            let mut run = run_h2load(envoy, options, seconds, pin)?;
            // gRPC errors are HTTP 200s: count the calls the upstream
            // answered instead (a call Sluice refused never reaches it).
            let answered = upstreams.grpc.calls("GetUser") - before;
            run.non_2xx = run.requests.saturating_sub(answered);
            Ok(run)
        }
        Load::WsMessages => run_ws(envoy, options, seconds).await,
    }
}

/// `GetUserRequest { user_id: 1 }` as one gRPC message: flag 0, length 2,
/// then field 1 (varint) = 1.
const GET_USER_MESSAGE: [u8; 7] = [0, 0, 0, 0, 2, 0x08, 0x01];

fn run_h2load(envoy: &Envoy, options: &Options, seconds: u64, pin: bool) -> Result<Run> {
    let h2load = match std::env::var_os("SLUICE_H2LOAD").filter(|v| !v.is_empty()) {
        Some(p) => p.into(),
        None => {
            find_on_path("h2load").ok_or_else(|| anyhow!("h2load not found: run `make setup`"))?
        }
    };
    let url = envoy.url("/user.UserService/GetUser");
    if !url.starts_with("http://127.0.0.1:") {
        bail!("refusing to load anything but loopback: {url}");
    }
    let mut body = tempfile::NamedTempFile::new()?;
    body.write_all(&GET_USER_MESSAGE)?;
    let mut command = Command::new(h2load);
    if pin {
        pin_to_cpus(&mut command, &[1]);
    }
    let output = command
        .arg(format!("-t{}", options.threads))
        .arg(format!("-c{}", options.connections))
        .arg("-m1")
        .arg(format!("-D{seconds}"))
        .arg("-d")
        .arg(body.path())
        .arg("-H")
        .arg("content-type: application/grpc")
        .arg("-H")
        .arg("te: trailers")
        .arg(&url)
        .stdin(Stdio::null())
        .output()
        .context("running h2load")?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        bail!(
            "h2load failed ({}): {}{}",
            output.status,
            text,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    parse_h2load(&text)
}

/// Reads `finished in <t>, <x> req/s`, `requests: ... <n> succeeded` and the
/// mean request time from h2load's output.
fn parse_h2load(text: &str) -> Result<Run> {
    let mut rps = None;
    let mut requests = None;
    let mut latency = String::from("?");
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("finished in ") {
            rps = rest
                .split(", ")
                .find_map(|part| part.strip_suffix(" req/s"))
                .and_then(|v| v.trim().parse::<f64>().ok());
        } else if let Some(rest) = line.strip_prefix("requests: ") {
            requests = rest
                .split(", ")
                .find_map(|part| part.strip_suffix(" succeeded"))
                .and_then(|v| v.trim().parse::<u64>().ok());
        } else if let Some(rest) = line.strip_prefix("time for request:") {
            // min, max, mean, sd, +/- sd
            latency = rest.split_whitespace().nth(2).unwrap_or("?").to_owned();
        }
    }
    Ok(Run {
        rps: rps.ok_or_else(|| anyhow!("no req/s in h2load's output:\n{text}"))?,
        requests: requests
            .ok_or_else(|| anyhow!("no succeeded count in h2load's output:\n{text}"))?,
        non_2xx: 0,
        latency,
        cpu_per_request: Duration::ZERO,
    })
}

/// `--connections` WebSocket connections to `/ws`, each sending a 64-byte
/// message and waiting for its echo, for `seconds`; a refused upgrade, a
/// lost echo or a Close fails the run.
async fn run_ws(envoy: &Envoy, options: &Options, seconds: u64) -> Result<Run> {
    let addr = envoy.addr();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for _ in 0..options.connections {
        tasks.push(tokio::spawn(async move {
            let mut ws = match ws_client::connect(addr, "/ws", &[]).await? {
                Upgrade::Open(ws) => ws,
                Upgrade::Refused(response) => bail!("upgrade refused: {}", response.status()),
            };
            let payload = "m".repeat(64);
            let mut round_trips = 0u64;
            while Instant::now() < deadline {
                ws.send(Message::text(payload.as_str())).await?;
                match next_message(&mut ws).await? {
                    Message::Text(echo) if echo.len() == payload.len() => round_trips += 1,
                    other => bail!("expected the echo, got {other:?}"),
                }
            }
            let _ = (*ws).close(None).await;
            Ok(round_trips)
        }));
    }
    let start = Instant::now();
    let mut messages = 0;
    for task in tasks {
        messages += task.await.context("WebSocket load task")??;
    }
    let elapsed = start.elapsed().as_secs_f64();
    Ok(Run {
        rps: messages as f64 / elapsed,
        requests: messages,
        non_2xx: 0,
        latency: format!(
            "{:.0}us",
            elapsed * 1e6 * f64::from(options.connections) / messages.max(1) as f64
        ),
        cpu_per_request: Duration::ZERO,
    })
}

fn run_wrk(envoy: &Envoy, path: &str, options: &Options, seconds: u64, pin: bool) -> Result<Run> {
    let run = bench::run_wrk(
        &envoy.url(path),
        WrkLoad {
            threads: options.threads,
            connections: options.connections,
            seconds,
            cpu: pin.then_some(1),
        },
    )?;
    Ok(Run {
        rps: run.rps,
        requests: run.requests,
        non_2xx: run.non_2xx,
        latency: run.latency_avg,
        cpu_per_request: Duration::ZERO,
    })
}
