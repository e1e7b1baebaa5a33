//! `make bench-quota`: the quota server's throughput and latency.
//!
//! Runs `sluice serve` (the `sluice` binary next to this one, through the
//! library's launcher) on loopback, calls `ShouldRateLimit` at a fixed
//! concurrency for a bounded time, with the memory backend and then with
//! Redis (a `redis-server` started here), and prints decisions/s, p50 and
//! p99. Against Redis it interleaves, round by round, the server with the
//! raw per-call ceiling of the same work: the decision script called by
//! one `EVALSHA` per decision (a batch of one) with the same kind of keys
//! at the same concurrency, two ways:
//! - `redis-benchmark` (C client, one connection per caller): what Redis
//!   itself sustains for the script; it does not show replies, so the same
//!   call must be allowed once before, and Redis's count of failed
//!   `EVALSHA` calls must not move during the run;
//! - the `redis` crate's multiplexed connection (the server's client) in a
//!   Rust loop, without gRPC, every reply checked to be one allowed
//!   decision.
//!
//! `quota_redis_vs_raw_redis_ratio` divides the server's decisions/s (its
//! median round) by the higher of the two ceilings' medians, so it is never
//! flattered by a slow baseline: above 1, the server's group commit (many
//! decisions per script call) beats sending each decision on its own.
//!
//! In the same rounds, at the concurrency Envoy calls a rate limit service
//! with: `h2load` ([`H2_CLIENTS`] × [`H2_STREAMS`] streams) against the
//! server on Redis, and `redis-benchmark` with as many connections calling
//! the script by one `EVALSHA` per decision, on the same single key (`h2load`
//! sends one body): `quota_redis_h2load_vs_raw_redis_256_ratio`. This is
//! the comparison `make bench`'s summary sets the target on: both sides
//! are independent C clients with the same requests in flight, whereas
//! the bench's own tonic callers spend several times the raw client's CPU
//! per decision (`quota_redis_cpu_us_per_decision`), which on a 2-core
//! machine caps the 32-caller run whatever the server does.
//!
//! With the memory backend it also drives the server with `h2load` (an
//! independent HTTP/2 client, [`H2_CLIENTS`] connections of [`H2_STREAMS`]
//! streams each, the way Envoy calls a rate limit service), interleaved
//! round by round with the same `h2load` against the server's gRPC health
//! check: the health check is the same transport and framing with no
//! decision behind it, so `quota_memory_vs_health_ratio` is the share of a
//! call's cost the decision leaves, on this machine in this run. `h2load`
//! counts HTTP statuses only, and a gRPC error is an HTTP 200 with a
//! `grpc-status` trailer, and a storage failure failed open is an `OK`
//! without a decision: so every run (`h2load`'s and the bench's own
//! callers') is checked against the server's own count (its `/metrics`) of
//! decisions made from storage and allowed, and a run with fewer decisions
//! than answers fails the bench. Both are measured twice in the same
//! interleaved rounds: with the default (one serving thread per CPU) and
//! with `listen.worker_threads: 1` (suffix `_1thread`), which leaves the
//! other CPUs of a small machine to the client. Each `h2load` run also
//! reads the server's CPU time (user and system, from `/proc`) over the
//! calls it answered: `..._cpu_us` is the server's CPU per decision (per
//! call for the health check), steadier than calls per second on a
//! loaded machine.
//!
//! Each Redis run also reports CPU per decision (from `/proc` and Redis's
//! `INFO cpu`; Linux only, else omitted): the server's, Redis's, and the
//! client's (this process for its own callers, the child process for
//! `redis-benchmark` and `h2load`). On a small machine a client eating a
//! core shows there: the comparison then measures the clients too.
//!
//! Options: `--only memory` or `--only redis` runs only that backend's
//! part (the default runs both); `--against PATH` adds another `sluice`
//! binary (another build, e.g. with another allocator or another decision
//! script) to the memory `h2load` rounds and to the Redis rounds (its
//! server on the same Redis, its callers' and `h2load` runs after this
//! build's in each round), interleaved with this build's, its figures
//! suffixed `_against`.

#![forbid(unsafe_code)]
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use prost::Message as _;
use sluice_quota_server::config::ServerConfig;
use sluice_quota_server::launcher::{Launcher, QuotaServer};
use sluice_quota_server::limits::{Limit, Limits, Resolved};
use sluice_quota_server::storage::redis::{script_call, ScriptCall};
use sluice_quota_server::storage::Item;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;

/// Callers in flight at any time.
const CONCURRENCY: usize = 32;
/// How long each measurement runs.
const DURATION: Duration = Duration::from_secs(5);
/// Distinct client addresses (keys) the load spreads over.
const KEYS: usize = 1000;
/// gRPC connections the callers share (Envoy opens one per worker).
const CHANNELS: usize = 4;

/// Interleaved rounds of the Redis runs (the server, then each ceiling).
const REDIS_ROUNDS: usize = 3;
/// Calls of each `redis-benchmark` round (a few seconds' worth).
const REDIS_BENCHMARK_CALLS: u64 = 40_000;
/// The decision script, as the server loads it.
const SCRIPT: &str = include_str!("../../lua/decide.lua");

/// `h2load` connections (`-c`) and concurrent streams on each (`-m`).
const H2_CLIENTS: usize = 16;
/// See [`H2_CLIENTS`].
const H2_STREAMS: usize = 16;
/// Interleaved rounds of the `h2load` runs.
const H2_ROUNDS: usize = 3;
/// How long each `h2load` run lasts.
const H2_DURATION: Duration = Duration::from_secs(4);
/// The server runtimes the `h2load` runs compare: the name suffix of
/// their figures and their `listen` settings.
const H2_RUNTIMES: [(&str, &str); 2] = [("", ""), ("_1thread", ", worker_threads: 1")];

/// The envoyproxy/ratelimit file every run uses: high enough that nearly
/// every call is allowed (and so consumes, the expensive path). `h2load`
/// sends one body, so one key: it has its own, higher limit.
const DESCRIPTORS: &str = "domain: bench
descriptors:
  - key: remote_address
    rate_limit: {unit: second, requests_per_unit: 100000}
  - key: h2load
    rate_limit: {unit: second, requests_per_unit: 100000000}
";

/// The rate limit method's path.
const RLS_PATH: &str = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit";
/// The gRPC health check's path.
const HEALTH_PATH: &str = "/grpc.health.v1.Health/Check";
/// The admin token of the benched server (loopback only, for `/metrics`).
const ADMIN_TOKEN: &str = "bench";

/// Why a run could not complete.
#[derive(Debug, thiserror::Error)]
enum BenchError {
    #[error("{0}")]
    Setup(String),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("gRPC: {0}")]
    Grpc(#[from] tonic::Status),
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("storage: {0}")]
    Storage(#[from] sluice_quota_server::storage::StorageError),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// Throughput and latency of one run.
struct Measured {
    per_sec: f64,
    p50: Duration,
    /// Unknown when `redis-benchmark`'s summary leaves it out.
    p99: Option<Duration>,
    /// Calls answered.
    answered: u64,
}

impl Measured {
    fn from_latencies(mut latencies: Vec<Duration>, elapsed: Duration) -> Measured {
        latencies.sort_unstable();
        let at = |q: f64| {
            let i = ((latencies.len() as f64 - 1.0) * q).round() as usize;
            latencies.get(i).copied().unwrap_or_default()
        };
        Measured {
            per_sec: latencies.len() as f64 / elapsed.as_secs_f64(),
            p50: at(0.50),
            p99: Some(at(0.99)),
            answered: latencies.len() as u64,
        }
    }

    fn print(&self, name: &str) {
        self.print_per(name, "decisions");
    }

    /// Prints throughput as `what`/s (a health check is no decision).
    fn print_per(&self, name: &str, what: &str) {
        let p99 = self.p99.map_or_else(
            || "n/a".to_owned(),
            |d| format!("{:.3} ms", d.as_secs_f64() * 1e3),
        );
        println!(
            "{name}: {:.0} {what}/s, p50 {:.3} ms, p99 {p99}",
            self.per_sec,
            self.p50.as_secs_f64() * 1e3,
        );
    }
}

/// A child process killed when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The command line; without options, every measurement.
#[derive(clap::Parser)]
#[command(about = "The quota server under load: memory and Redis backends, h2load")]
struct Options {
    /// Run only this backend's measurements.
    #[arg(long, value_enum)]
    only: Option<Only>,
    /// Another `sluice` binary measured with this build's in the memory
    /// `h2load` rounds and the Redis rounds, interleaved (figures suffixed
    /// `_against`).
    #[arg(long)]
    against: Option<PathBuf>,
}

/// One backend's measurements.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Only {
    /// The memory backend: `h2load` and the bench's own callers.
    Memory,
    /// The Redis backend: the bench's own callers and `h2load` against the
    /// raw script.
    Redis,
}

fn main() -> ExitCode {
    let options = <Options as clap::Parser>::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("benchquota: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(&options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("benchquota: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(options: &Options) -> Result<(), BenchError> {
    let dir = std::env::temp_dir().join(format!("sluice-benchquota-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("bench.yaml"), DESCRIPTORS)?;
    println!(
        "quota server bench: {CONCURRENCY} callers, {} s per run, {KEYS} keys, loopback",
        DURATION.as_secs()
    );
    let result = measure_all(&dir, options).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn measure_all(dir: &Path, options: &Options) -> Result<(), BenchError> {
    if options.only != Some(Only::Redis) {
        if which("h2load").is_some() {
            h2load_memory(dir, options.against.as_deref()).await?;
        } else {
            println!("quota_memory_h2load: skipped (h2load not on PATH; run `make setup`)");
        }
        let memory = serve_and_load(dir, "memory", "backend: memory").await?;
        memory.print("quota_memory");
    }
    if options.only == Some(Only::Memory) {
        return Ok(());
    }

    let redis_port = free_port()?;
    let _redis = start_redis(redis_port)?;
    redis_rounds(dir, redis_port, options.against.as_deref()).await
}

/// One build's server on Redis and what its runs measured: its callers'
/// and (with `h2load`) Envoy-like runs, with Redis's time and the CPU per
/// decision of each.
struct Served {
    /// Empty for this build, `_against` for `--against`'s.
    suffix: &'static str,
    server: QuotaServer,
    admin: std::net::SocketAddr,
    runs: Vec<Measured>,
    cost: RedisCost,
    wide: Vec<Measured>,
    wide_cost: RedisCost,
}

impl Served {
    fn start(suffix: &'static str, binary: PathBuf, config: &Path) -> Result<Served, BenchError> {
        let server = Launcher::new(binary)
            .log_filter("error")
            .start_file(config)
            .map_err(|e| BenchError::Setup(format!("sluice (redis{suffix}): {e}")))?;
        let admin = server
            .admin
            .ok_or_else(|| BenchError::Setup("the admin API did not start".into()))?;
        Ok(Served {
            suffix,
            server,
            admin,
            runs: Vec::new(),
            cost: RedisCost::default(),
            wide: Vec::new(),
            wide_cost: RedisCost::default(),
        })
    }

    /// One run of the bench's own callers.
    async fn run(&mut self, raw: &RawRedis) -> Result<(), BenchError> {
        let pid = self.server.pid();
        let before = raw.usage(pid).await?;
        let decided = decisions(self.admin).await?;
        let m = load_server(self.server.grpc).await?;
        decided_all(self.admin, decided, m.answered, "the callers").await?;
        self.cost
            .add(&before, &raw.usage(pid).await?, m.answered, Client::Bench);
        self.runs.push(m);
        Ok(())
    }

    /// One `h2load` run at Envoy's concurrency.
    async fn run_wide(
        &mut self,
        dir: &Path,
        raw: &RawRedis,
        body: &Path,
    ) -> Result<(), BenchError> {
        let pid = self.server.pid();
        let before = raw.usage(pid).await?;
        let m = h2load_decisions(dir, &self.server, RLS_PATH, body).await?;
        self.wide_cost
            .add(&before, &raw.usage(pid).await?, m.answered, Client::Child);
        self.wide.push(m);
        Ok(())
    }
}

/// The server on Redis against the raw ceiling, interleaved round by round
/// (the machine's load drifts): prints each one's median round and the
/// ratio of the server to the higher ceiling. With `against`, that build's
/// server runs in the same rounds on the same Redis (figures suffixed
/// `_against`).
async fn redis_rounds(
    dir: &Path,
    redis_port: u16,
    against: Option<&Path>,
) -> Result<(), BenchError> {
    let url = format!("redis://127.0.0.1:{redis_port}");
    let storage = format!("backend: redis\n  redis: {{url: \"{url}\", timeout: 100ms}}");
    let config = config(dir, &storage)?;
    let limits = Limits::compile(&config, dir).map_err(|e| BenchError::Setup(e.to_string()))?;
    let limit = bench_limit(&limits)?.clone();
    let config = dir.join("sluice.yaml");
    let mut builds = vec![Served::start("", sluice_binary()?, &config)?];
    if let Some(path) = against {
        builds.push(Served::start("_against", path.to_owned(), &config)?);
    }
    let raw = Arc::new(RawRedis::connect(&url).await?);
    let (mut rust, mut c) = (Vec::new(), Vec::new());
    // Redis's own time in the script: the raw calls. And each run's CPU
    // per decision: the server's, Redis's, the client's.
    let (mut rust_cost, mut raw_cost) = (RedisCost::default(), RedisCost::default());
    let wide = match which("h2load") {
        Some(_) => Some(EnvoyLike::new(dir, &limits)?),
        None => None,
    };
    let mut wide_raw = Vec::new();
    let mut wide_raw_cost = RedisCost::default();
    // The raw calls are no server's: any build's pid serves `usage`.
    let pid = builds[0].server.pid();
    for round in 0..REDIS_ROUNDS {
        // The builds take turns going first: neither always meets a Redis
        // just warmed (or just cooled) by the other.
        let mut order: Vec<usize> = (0..builds.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for &i in &order {
            builds[i].run(&raw).await?;
        }
        let before = raw.usage(pid).await?;
        let m = raw.load(&limit).await?;
        rust_cost.add(&before, &raw.usage(pid).await?, m.answered, Client::Bench);
        rust.push(m);
        let before = raw.usage(pid).await?;
        let spread = format!("{}:bench:__rand_int__", limit.key_prefix);
        if let Some(m) = raw_redis_benchmark(&limit, &spread, CONCURRENCY, redis_port, &raw).await?
        {
            raw_cost.add(&before, &raw.usage(pid).await?, m.answered, Client::Child);
            c.push(m);
        }
        if let Some(wide) = &wide {
            for &i in &order {
                builds[i].run_wide(dir, &raw, &wide.body).await?;
            }
            let before = raw.usage(pid).await?;
            let streams = H2_CLIENTS * H2_STREAMS;
            if let Some(m) =
                raw_redis_benchmark(&wide.limit, &wide.key, streams, redis_port, &raw).await?
            {
                wide_raw_cost.add(&before, &raw.usage(pid).await?, m.answered, Client::Child);
                wide_raw.push(m);
            }
        }
    }
    println!("Redis: {REDIS_ROUNDS} interleaved rounds, medians:");
    let served = median(&mut builds[0].runs);
    served.print("quota_redis");
    let rust = median(&mut rust);
    rust.print("raw_redis_rust_evalsha");
    println!(
        "quota_redis_vs_raw_redis_rust_ratio: {:.2}",
        served.per_sec / rust.per_sec
    );
    let ceiling = if c.is_empty() {
        println!("raw_redis_benchmark_evalsha: skipped (redis-benchmark not on PATH)");
        rust.per_sec
    } else {
        let c = median(&mut c);
        c.print("raw_redis_benchmark_evalsha");
        println!(
            "quota_redis_vs_raw_redis_benchmark_ratio: {:.2}",
            served.per_sec / c.per_sec
        );
        c.per_sec.max(rust.per_sec)
    };
    // Both raw clients make one call per decision: one script figure.
    let mut raw_script = RedisCost::default();
    raw_script.merge(&rust_cost);
    raw_script.merge(&raw_cost);
    println!(
        "redis_script_us_per_decision: server {:.1} ({:.1} decisions per call), raw {:.1}",
        builds[0].cost.per_decision(),
        builds[0].cost.per_call(),
        raw_script.per_decision()
    );
    builds[0].cost.print_cpu("quota_redis");
    rust_cost.print_cpu("raw_redis_rust_evalsha");
    raw_cost.print_cpu("raw_redis_benchmark_evalsha");
    println!(
        "quota_redis_vs_raw_redis_ratio: {:.2}",
        served.per_sec / ceiling
    );
    print_against(&mut builds, "", |b| (&mut b.runs, &b.cost));
    if wide.is_none() {
        println!("quota_redis_h2load: skipped (h2load not on PATH; run `make setup`)");
    } else if !wide_raw.is_empty() {
        let streams = H2_CLIENTS * H2_STREAMS;
        println!("Redis at Envoy's concurrency ({streams} in flight, one key), medians:");
        let (served, raw) = (median(&mut builds[0].wide), median(&mut wide_raw));
        served.print("quota_redis_h2load");
        raw.print(&format!("raw_redis_benchmark_evalsha_{streams}"));
        println!(
            "redis_script_us_per_decision_h2load: server {:.1} ({:.1} decisions per call), raw {:.1}",
            builds[0].wide_cost.per_decision(),
            builds[0].wide_cost.per_call(),
            wide_raw_cost.per_decision()
        );
        builds[0].wide_cost.print_cpu("quota_redis_h2load");
        wide_raw_cost.print_cpu(&format!("raw_redis_benchmark_evalsha_{streams}"));
        println!(
            "quota_redis_h2load_vs_raw_redis_{streams}_ratio: {:.2}",
            served.per_sec / raw.per_sec
        );
        print_against(&mut builds, "_h2load", |b| (&mut b.wide, &b.wide_cost));
    }
    Ok(())
}

/// The `--against` build's figures of one kind of run (`kind`: the name's
/// middle, selected by `runs`), and this build's Redis time per decision
/// over that one's: below 1, this build's script is cheaper.
fn print_against(
    builds: &mut [Served],
    kind: &str,
    runs: impl Fn(&mut Served) -> (&mut Vec<Measured>, &RedisCost),
) {
    let [this, against] = builds else {
        return;
    };
    let ours = runs(this).1.per_decision();
    let suffix = against.suffix;
    let (measured, cost) = runs(against);
    median(measured).print(&format!("quota_redis{kind}{suffix}"));
    println!(
        "redis_script_us_per_decision{kind}{suffix}: server {:.1} ({:.1} decisions per call)",
        cost.per_decision(),
        cost.per_call()
    );
    cost.print_cpu(&format!("quota_redis{kind}{suffix}"));
    println!(
        "redis_script_us_per_decision{kind}_vs{suffix}_ratio: {:.2}",
        ours / cost.per_decision()
    );
}

/// The `h2load` side of the Redis rounds: the request body and the limit
/// and storage key it decides on, for the raw calls on the same key.
struct EnvoyLike {
    body: PathBuf,
    limit: Limit,
    key: String,
}

impl EnvoyLike {
    fn new(dir: &Path, limits: &Limits) -> Result<EnvoyLike, BenchError> {
        let entries = [("h2load".to_owned(), "client".to_owned())];
        let limit = resolve(limits, &entries)?.clone();
        Ok(EnvoyLike {
            body: rls_body(dir)?,
            key: limit.storage_key(&entries),
            limit,
        })
    }
}

/// The run of median throughput.
fn median(runs: &mut Vec<Measured>) -> Measured {
    runs.sort_by(|a, b| a.per_sec.total_cmp(&b.per_sec));
    runs.swap_remove(runs.len() / 2)
}

fn config(dir: &Path, storage: &str) -> Result<ServerConfig, BenchError> {
    config_file(dir, "sluice.yaml", storage, "")
}

/// Writes the bench's server configuration to `dir/name`, with `listen`
/// settings `listen_extra` (`, key: value`...) added.
fn config_file(
    dir: &Path,
    name: &str,
    storage: &str,
    listen_extra: &str,
) -> Result<ServerConfig, BenchError> {
    let yaml = format!(
        "listen: {{grpc: \"127.0.0.1:0\", admin: \"127.0.0.1:0\", request_timeout: 1s{listen_extra}}}\n\
         storage:\n  {storage}\ndescriptor_files: [{{path: bench.yaml}}]\n\
         admin: {{token: {ADMIN_TOKEN}}}\n"
    );
    std::fs::write(dir.join(name), &yaml)?;
    ServerConfig::from_yaml(&yaml).map_err(|e| BenchError::Setup(e.to_string()))
}

/// The `sluice` binary built with this one.
fn sluice_binary() -> Result<PathBuf, BenchError> {
    Ok(std::env::current_exe()?.with_file_name("sluice"))
}

async fn serve_and_load(dir: &Path, name: &str, storage: &str) -> Result<Measured, BenchError> {
    config(dir, storage)?;
    let server = Launcher::new(sluice_binary()?)
        .log_filter("error")
        .start_file(&dir.join("sluice.yaml"))
        .map_err(|e| BenchError::Setup(format!("sluice ({name}): {e}")))?;
    let measured = load_server(server.grpc).await;
    drop(server);
    measured
}

/// `ShouldRateLimit` from [`CONCURRENCY`] callers on [`CHANNELS`]
/// connections; every reply must be `OK`.
async fn load_server(addr: std::net::SocketAddr) -> Result<Measured, BenchError> {
    let mut channels = Vec::with_capacity(CHANNELS);
    for _ in 0..CHANNELS {
        channels.push(
            Channel::from_shared(format!("http://{addr}"))
                .map_err(|e| BenchError::Setup(e.to_string()))?
                .connect()
                .await?,
        );
    }
    load(CONCURRENCY, move |caller, i| {
        let mut client = RateLimitServiceClient::new(channels[caller % CHANNELS].clone());
        async move {
            let request = RateLimitRequest {
                domain: "bench".into(),
                descriptors: vec![RateLimitDescriptor {
                    entries: vec![Entry {
                        key: "remote_address".into(),
                        value: address(caller, i),
                    }],
                    ..RateLimitDescriptor::default()
                }],
                hits_addend: 1,
            };
            let reply = client.should_rate_limit(request).await?.into_inner();
            if reply.overall_code == Code::Ok as i32 {
                Ok(())
            } else {
                Err(BenchError::Setup(format!("a call was answered {reply:?}")))
            }
        }
    })
    .await
}

/// `h2load` against the memory backend's rate limit method and its
/// health check, interleaved, on a server of each of [`H2_RUNTIMES`] (of
/// this build, and of `against` if given); prints each one's median round,
/// the ratio and the server's CPU per call.
async fn h2load_memory(dir: &Path, against: Option<&Path>) -> Result<(), BenchError> {
    let mut binaries = vec![(String::new(), sluice_binary()?)];
    if let Some(path) = against {
        binaries.push(("_against".to_owned(), path.to_owned()));
    }
    let mut servers = Vec::new();
    for (build, binary) in &binaries {
        for (runtime, listen) in H2_RUNTIMES {
            let suffix = format!("{runtime}{build}");
            let name = format!("sluice{runtime}.yaml");
            config_file(dir, &name, "backend: memory", listen)?;
            let server = Launcher::new(binary.clone())
                .log_filter("error")
                .start_file(&dir.join(name))
                .map_err(|e| BenchError::Setup(format!("sluice (memory{suffix}, h2load): {e}")))?;
            servers.push((suffix, server));
        }
    }
    let rls_body = rls_body(dir)?;
    let health_body = dir.join("health.grpc");
    // An empty `HealthCheckRequest` (all services).
    std::fs::write(&health_body, grpc_frame(&[]))?;
    println!(
        "h2load: -c{H2_CLIENTS} -m{H2_STREAMS}, {} s per run, {H2_ROUNDS} interleaved rounds, one port",
        H2_DURATION.as_secs()
    );
    let mut runs: Vec<[CpuRuns; 2]> = servers.iter().map(|_| Default::default()).collect();
    for _ in 0..H2_ROUNDS {
        for ((_, server), [rls, health]) in servers.iter().zip(&mut runs) {
            let cpu = ServerCpu::start(server)?;
            let m = h2load_decisions(dir, server, RLS_PATH, &rls_body).await?;
            rls.push(cpu.per_call(m.answered)?, m);
            let cpu = ServerCpu::start(server)?;
            let m = h2load(dir, server.grpc, HEALTH_PATH, &health_body)?.measured;
            health.push(cpu.per_call(m.answered)?, m);
        }
    }
    for ((suffix, _), [mut rls, mut health]) in servers.into_iter().zip(runs) {
        let (rls_cpu, health_cpu) = (rls.median_cpu(), health.median_cpu());
        let (rls, health) = (median(&mut rls.runs), median(&mut health.runs));
        rls.print(&format!("quota_memory_h2load{suffix}"));
        health.print_per(&format!("grpc_health_h2load{suffix}"), "calls");
        println!(
            "quota_memory_vs_health_ratio{suffix}: {:.2}",
            rls.per_sec / health.per_sec
        );
        println!(
            "quota_memory_h2load_cpu_us{suffix}: {rls_cpu:.2} us of server CPU per decision \
             ({health_cpu:.2} per health check)"
        );
    }
    Ok(())
}

/// The runs of one kind of call on one server, and the server's CPU time
/// per call in each.
#[derive(Default)]
struct CpuRuns {
    runs: Vec<Measured>,
    cpu_us: Vec<f64>,
}

impl CpuRuns {
    fn push(&mut self, cpu_us: f64, measured: Measured) {
        self.cpu_us.push(cpu_us);
        self.runs.push(measured);
    }

    /// The median run's CPU per call (rounds drift with the machine's load).
    fn median_cpu(&self) -> f64 {
        let mut cpu = self.cpu_us.clone();
        cpu.sort_by(f64::total_cmp);
        cpu.get(cpu.len() / 2).copied().unwrap_or(f64::NAN)
    }
}

/// A server's CPU time (user and system, every thread) when a run started.
struct ServerCpu {
    pid: u32,
    seconds: f64,
}

impl ServerCpu {
    fn start(server: &QuotaServer) -> Result<ServerCpu, BenchError> {
        let pid = server.pid();
        Ok(ServerCpu {
            pid,
            seconds: ServerCpu::seconds(pid)?,
        })
    }

    /// Microseconds of CPU the server spent per call since the start.
    fn per_call(&self, calls: u64) -> Result<f64, BenchError> {
        let spent = ServerCpu::seconds(self.pid)? - self.seconds;
        Ok(spent * 1e6 / calls.max(1) as f64)
    }

    /// CPU seconds process `pid` used so far.
    fn seconds(pid: u32) -> Result<f64, BenchError> {
        process_cpu(&pid.to_string())
            .map(|(own, _)| own)
            .ok_or_else(|| BenchError::Setup(format!("cannot read /proc/{pid}/stat's CPU times")))
    }
}

/// The kernel's clock ticks per second (`getconf CLK_TCK`; Linux's 100
/// if that cannot be run).
fn clock_ticks_per_sec() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|t| t.trim().parse::<f64>().ok())
            .unwrap_or(100.0)
    })
}

/// Writes the body `h2load` posts to `ShouldRateLimit`: one decision on
/// the `h2load` descriptor (one key), and returns its path.
fn rls_body(dir: &Path) -> Result<PathBuf, BenchError> {
    let request = RateLimitRequest {
        domain: "bench".into(),
        descriptors: vec![RateLimitDescriptor {
            entries: vec![Entry {
                key: "h2load".into(),
                value: "client".into(),
            }],
            ..RateLimitDescriptor::default()
        }],
        hits_addend: 1,
    };
    let path = dir.join("rls.grpc");
    std::fs::write(&path, grpc_frame(&request.encode_to_vec()))?;
    Ok(path)
}

/// `h2load` posting `body` to the server's `ShouldRateLimit`, checked
/// against the server's own count: every answered request must be a
/// decision it made (a gRPC error would be an HTTP 200 without one).
async fn h2load_decisions(
    dir: &Path,
    server: &QuotaServer,
    path: &str,
    body: &Path,
) -> Result<Measured, BenchError> {
    let admin = server
        .admin
        .ok_or_else(|| BenchError::Setup("the admin API did not start".into()))?;
    let before = decisions(admin).await?;
    let run = h2load(dir, server.grpc, path, body)?;
    decided_all(admin, before, run.answered, "h2load").await?;
    Ok(run.measured)
}

/// Checks that the server decided (from storage, allowed) at least the
/// `answered` calls a client counted since its count was `before`.
async fn decided_all(
    admin: std::net::SocketAddr,
    before: u64,
    answered: u64,
    client: &str,
) -> Result<(), BenchError> {
    let decided = decisions(admin).await? - before;
    if decided < answered {
        return Err(BenchError::Setup(format!(
            "{client} got {answered} answers but the server decided {decided} from storage"
        )));
    }
    Ok(())
}

/// A gRPC message frame: uncompressed flag, big-endian length, message.
fn grpc_frame(message: &[u8]) -> Vec<u8> {
    let length = u32::try_from(message.len()).unwrap_or(u32::MAX);
    let mut frame = vec![0];
    frame.extend_from_slice(&length.to_be_bytes());
    frame.extend_from_slice(message);
    frame
}

/// What one `h2load` run answered.
struct H2Answered {
    measured: Measured,
    /// Requests answered with HTTP 200.
    answered: u64,
}

/// Runs `h2load` for [`H2_DURATION`] posting `body` to `path`; latencies
/// from its per-request log.
fn h2load(
    dir: &Path,
    server: std::net::SocketAddr,
    path: &str,
    body: &Path,
) -> Result<H2Answered, BenchError> {
    let log = dir.join("h2load.log");
    // h2load appends to its log: each run reads only its own requests.
    if log.exists() {
        std::fs::remove_file(&log)?;
    }
    let output = Command::new("h2load")
        .args(["-c", &H2_CLIENTS.to_string(), "-m", &H2_STREAMS.to_string()])
        .args(["-t", "1", "-D", &H2_DURATION.as_secs().to_string()])
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
        .arg("-d")
        .arg(body)
        .arg(format!("--log-file={}", log.display()))
        .arg(format!("http://{server}{path}"))
        .output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(BenchError::Setup(format!("h2load failed: {text}")));
    }
    // "status codes: 149390 2xx, 0 3xx, 0 4xx, 0 5xx"
    let answered = text
        .lines()
        .find_map(|l| l.strip_prefix("status codes: "))
        .and_then(|l| l.split(' ').next())
        .and_then(|n| n.parse::<u64>().ok())
        .ok_or_else(|| BenchError::Setup(format!("cannot read h2load's output: {text}")))?;
    // Tab-separated: start (µs since the epoch), status, duration (µs).
    let mut latencies = Vec::new();
    let (mut first, mut last) = (u64::MAX, 0);
    for line in std::fs::read_to_string(&log)?.lines() {
        let mut columns = line.split('\t').map(|c| c.parse::<u64>().ok());
        let (Some(Some(start)), Some(Some(status)), Some(Some(micros))) =
            (columns.next(), columns.next(), columns.next())
        else {
            continue;
        };
        if status == 200 {
            latencies.push(Duration::from_micros(micros));
            first = first.min(start);
            last = last.max(start + micros);
        }
    }
    let elapsed = Duration::from_micros(last.saturating_sub(first));
    Ok(H2Answered {
        measured: Measured::from_latencies(latencies, elapsed),
        answered,
    })
}

/// Decisions the server made so far from its storage and allowed
/// (`sluice_decisions_total` of the bench domain, outcome `ok`), read from
/// its `/metrics`. Not the others: a storage failure failed open is an
/// `OK` answer too, but no decision.
async fn decisions(admin: std::net::SocketAddr) -> Result<u64, BenchError> {
    let mut stream = tokio::net::TcpStream::connect(admin).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n")
        .await?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("sluice_decisions_total{domain=\"bench\""))
        .filter(|l| l.contains("outcome=\"ok\"}"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum())
}

/// The key caller `caller` uses on its `i`-th call: spread over [`KEYS`].
fn address(caller: usize, i: usize) -> String {
    let n = (caller * 7919 + i) % KEYS;
    format!("10.0.{}.{}", n / 256, n % 256)
}

/// Runs `call` from `callers` tasks for [`DURATION`], each calling again
/// as soon as its previous call returns, timing every call.
async fn load<F, Fut>(callers: usize, call: F) -> Result<Measured, BenchError>
where
    F: Fn(usize, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), BenchError>> + Send + 'static,
{
    let call = Arc::new(call);
    let start = Instant::now();
    let deadline = start + DURATION;
    let tasks: Vec<_> = (0..callers)
        .map(|caller| {
            let call = call.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut i = 0;
                while Instant::now() < deadline {
                    let t = Instant::now();
                    call(caller, i).await?;
                    latencies.push(t.elapsed());
                    i += 1;
                }
                Ok::<_, BenchError>(latencies)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for task in tasks {
        let done = task
            .await
            .map_err(|e| BenchError::Setup(format!("caller task: {e}")))??;
        latencies.extend(done);
    }
    Ok(Measured::from_latencies(latencies, start.elapsed()))
}

/// The limit of the callers' descriptor (`remote_address`).
fn bench_limit(limits: &Limits) -> Result<&Limit, BenchError> {
    resolve(limits, &[("remote_address".into(), "x".into())])
}

/// The bench domain's limit of a descriptor.
fn resolve<'a>(limits: &'a Limits, entries: &[(String, String)]) -> Result<&'a Limit, BenchError> {
    let domain = limits
        .domain("bench")
        .ok_or_else(|| BenchError::Setup("no bench domain".into()))?;
    match limits.resolve(domain, entries) {
        Resolved::Limited(limit) => Ok(limit),
        _ => Err(BenchError::Setup(format!(
            "the bench descriptor {entries:?} has no limit"
        ))),
    }
}

fn item<'a>(limit: &'a Limit, caller: usize, i: usize) -> Item<'a> {
    Item {
        limit,
        key: limit.storage_key(&[("remote_address", address(caller, i))]),
        cost: 1,
        enforce: true,
    }
}

/// Redis driven directly, one `EVALSHA` per decision (the script with a
/// batch of one): the ceiling of a server that sends every decision on its
/// own, at the same concurrency.
struct RawRedis {
    connection: redis::aio::MultiplexedConnection,
    script: redis::Script,
}

impl RawRedis {
    /// Connects and loads the script (so that `redis-benchmark`'s
    /// `EVALSHA` finds it).
    async fn connect(url: &str) -> Result<RawRedis, BenchError> {
        let mut connection = redis::Client::open(url)?
            .get_multiplexed_async_connection()
            .await?;
        let script = redis::Script::new(SCRIPT);
        script.prepare_invoke().load_async(&mut connection).await?;
        Ok(RawRedis { connection, script })
    }

    /// One decision by `EVALSHA`; its reply must say allowed.
    async fn decide(&self, call: &ScriptCall) -> Result<(), BenchError> {
        let mut invocation = self.script.prepare_invoke();
        for key in &call.keys {
            invocation.key(key);
        }
        for arg in call.argv_alone() {
            invocation.arg(arg);
        }
        let reply: redis::Value = invocation
            .invoke_async(&mut self.connection.clone())
            .await?;
        allowed(&reply)
    }

    /// The server's Redis client without the server, on one multiplexed
    /// connection (the server's default): one `EVALSHA` per decision, the
    /// same keys, every reply checked.
    async fn load(self: &Arc<Self>, limit: &Limit) -> Result<Measured, BenchError> {
        let (raw, limit) = (self.clone(), Arc::new(limit.clone()));
        load(CONCURRENCY, move |caller, i| {
            let (raw, limit) = (raw.clone(), limit.clone());
            async move {
                let call = script_call("check", &[item(&limit, caller, i)], None)?;
                raw.decide(&call).await
            }
        })
        .await
    }

    /// Redis's counts of `EVALSHA` so far.
    async fn evalsha_counts(&self) -> Result<Evalsha, BenchError> {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut self.connection.clone())
            .await?;
        // "cmdstat_evalsha:calls=3,usec=..,rejected_calls=0,failed_calls=0"
        let line = info
            .lines()
            .find_map(|l| l.strip_prefix("cmdstat_evalsha:"))
            .unwrap_or("");
        let field = |name: &str| {
            line.split(',')
                .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        Ok(Evalsha {
            calls: field("calls"),
            errors: field("rejected_calls") + field("failed_calls"),
            usec: field("usec"),
        })
    }
}

impl RawRedis {
    /// The script's calls and the CPU used so far, with the server `server`.
    async fn usage(&self, server: u32) -> Result<Usage, BenchError> {
        let evalsha = self.evalsha_counts().await?;
        let info: String = redis::cmd("INFO")
            .arg("cpu")
            .query_async(&mut self.connection.clone())
            .await?;
        // "used_cpu_sys:1.234567", "used_cpu_user:..."
        let redis = ["used_cpu_sys:", "used_cpu_user:"]
            .iter()
            .map(|name| {
                info.lines()
                    .find_map(|l| l.strip_prefix(name))
                    .and_then(|v| v.trim().parse::<f64>().ok())
            })
            .sum::<Option<f64>>();
        let cpu = match (redis, process_cpu(&server.to_string()), process_cpu("self")) {
            (Some(redis), Some((server, _)), Some((bench, children))) => Some(Cpu {
                server,
                redis,
                bench,
                children,
            }),
            _ => None,
        };
        Ok(Usage { evalsha, cpu })
    }
}

/// Redis's `INFO commandstats` for `EVALSHA`.
struct Evalsha {
    calls: u64,
    /// Failed or rejected calls (error replies).
    errors: u64,
    /// Time spent in the calls, µs.
    usec: u64,
}

/// CPU seconds the processes of a Redis run used so far (Linux `/proc`
/// and Redis's `INFO cpu`).
#[derive(Clone, Copy)]
struct Cpu {
    server: f64,
    redis: f64,
    /// This process (its own callers).
    bench: f64,
    /// This process's finished children (`redis-benchmark`, `h2load`).
    children: f64,
}

/// What a Redis run's processes used so far: the script's calls and CPU.
struct Usage {
    evalsha: Evalsha,
    /// `None` where `/proc` cannot be read.
    cpu: Option<Cpu>,
}

/// Which process was a run's client.
#[derive(Clone, Copy)]
enum Client {
    /// This one (the bench's own callers).
    Bench,
    /// A child it waited for (`redis-benchmark`, `h2load`).
    Child,
}

/// The user and system CPU seconds of process `pid` (`self` for this one)
/// and of its children it waited for, from `/proc/<pid>/stat`.
fn process_cpu(pid: &str) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name, in parentheses, may hold spaces: fields are
    // counted after its closing one (state is field 3; utime, stime,
    // cutime and cstime are 14 to 17).
    let fields: Vec<f64> = stat
        .rsplit_once(')')?
        .1
        .split_whitespace()
        .skip(11)
        .take(4)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let ticks = clock_ticks_per_sec();
    match fields.as_slice() {
        [utime, stime, cutime, cstime] => {
            Some(((utime + stime) / ticks, (cutime + cstime) / ticks))
        }
        _ => None,
    }
}

/// Redis's time in the script and the processes' CPU over some runs, and
/// the decisions made.
#[derive(Default)]
struct RedisCost {
    usec: u64,
    calls: u64,
    decisions: u64,
    /// CPU seconds of the server, Redis and the client; `None` once a
    /// run could not be measured.
    cpu: Option<[f64; 3]>,
    /// Runs added.
    runs: u32,
}

impl RedisCost {
    fn add(&mut self, before: &Usage, after: &Usage, decisions: u64, client: Client) {
        self.usec += after.evalsha.usec - before.evalsha.usec;
        self.calls += after.evalsha.calls - before.evalsha.calls;
        self.decisions += decisions;
        let used = match (before.cpu, after.cpu) {
            (Some(b), Some(a)) => Some([
                a.server - b.server,
                a.redis - b.redis,
                match client {
                    Client::Bench => a.bench - b.bench,
                    Client::Child => a.children - b.children,
                },
            ]),
            _ => None,
        };
        self.cpu = match (self.runs, self.cpu, used) {
            (0, _, used) => used,
            (_, Some(sum), Some(used)) => Some([0, 1, 2].map(|i| sum[i] + used[i])),
            _ => None,
        };
        self.runs += 1;
    }

    /// Adds `other`'s script calls (not its CPU) to these.
    fn merge(&mut self, other: &RedisCost) {
        self.usec += other.usec;
        self.calls += other.calls;
        self.decisions += other.decisions;
    }

    fn per_decision(&self) -> f64 {
        self.usec as f64 / self.decisions.max(1) as f64
    }

    /// Decisions per script call.
    fn per_call(&self) -> f64 {
        self.decisions as f64 / self.calls.max(1) as f64
    }

    /// Prints `<name>_cpu_us_per_decision`: the server's, Redis's and the
    /// client's CPU µs per decision.
    fn print_cpu(&self, name: &str) {
        if let Some([server, redis, client]) = self.cpu {
            let us = |s: f64| s * 1e6 / self.decisions.max(1) as f64;
            println!(
                "{name}_cpu_us_per_decision: server {:.1}, redis {:.1}, client {:.1}",
                us(server),
                us(redis),
                us(client)
            );
        }
    }
}

/// Checks a one-decision reply: `[[1, remaining, reset, retry]]` (a
/// refused decision is a string in place of the numbers).
fn allowed(reply: &redis::Value) -> Result<(), BenchError> {
    let decided: Option<Vec<Vec<i64>>> = redis::from_redis_value(reply).ok();
    match decided.as_deref() {
        Some([numbers]) if numbers.len() == 4 && numbers[0] == 1 => Ok(()),
        _ => Err(BenchError::Setup(format!(
            "the script answered {reply:?}, not one allowed decision"
        ))),
    }
}

/// `redis-benchmark` calling the script by `EVALSHA` (one decision each)
/// from `clients` connections (one per caller) on `key`: with
/// `__rand_int__` in it, spread over [`KEYS`] keys like the callers' load.
/// Its replies are not shown, so the same call on one key must be allowed
/// first, and Redis's own count of `EVALSHA` errors must not move.
async fn raw_redis_benchmark(
    limit: &Limit,
    key: &str,
    clients: usize,
    port: u16,
    raw: &RawRedis,
) -> Result<Option<Measured>, BenchError> {
    let Some(bench) = which("redis-benchmark") else {
        return Ok(None);
    };
    // `__rand_int__` is replaced per call by a number below `-r`.
    let template = Item {
        limit,
        key: key.to_owned(),
        cost: 1,
        enforce: true,
    };
    let call = script_call("check", &[template], None)?;
    let probe = ScriptCall {
        keys: call
            .keys
            .iter()
            .map(|k| k.replace("__rand_int__", "probe"))
            .collect(),
        args: call.args.clone(),
    };
    raw.decide(&probe).await?;
    let before = raw.evalsha_counts().await?;
    let output = Command::new(bench)
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-c", &clients.to_string()])
        .args(["-n", &REDIS_BENCHMARK_CALLS.to_string()])
        .args(["-r", &KEYS.to_string()])
        .args([
            "EVALSHA",
            raw.script.get_hash(),
            &call.keys.len().to_string(),
        ])
        .args(&call.keys)
        .args(call.argv_alone())
        .output()?;
    let after = raw.evalsha_counts().await?;
    if after.errors != before.errors || after.calls - before.calls < REDIS_BENCHMARK_CALLS {
        return Err(BenchError::Setup(format!(
            "redis-benchmark: {} EVALSHA calls, {} errors, for {REDIS_BENCHMARK_CALLS} requests",
            after.calls - before.calls,
            after.errors - before.errors
        )));
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let unreadable = || BenchError::Setup(format!("cannot read redis-benchmark's output: {text}"));
    // "  throughput summary: 51234.56 requests per second"
    let per_sec = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("throughput summary: "))
        .and_then(|l| l.split(' ').next())
        .and_then(|n| n.parse::<f64>().ok())
        .ok_or_else(unreadable)?;
    // "  latency summary (msec):" then a header "avg min p50 p95 p99 max"
    // and the values.
    let mut lines = text.lines().skip_while(|l| !l.contains("latency summary"));
    let header: Vec<&str> = lines
        .nth(1)
        .ok_or_else(unreadable)?
        .split_whitespace()
        .collect();
    let values: Vec<f64> = lines
        .next()
        .ok_or_else(unreadable)?
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    let at = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .and_then(|i| values.get(i))
            .map(|ms| Duration::from_secs_f64(ms / 1e3))
    };
    Ok(Some(Measured {
        per_sec,
        p50: at("p50").ok_or_else(unreadable)?,
        p99: at("p99"),
        answered: REDIS_BENCHMARK_CALLS,
    }))
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

fn free_port() -> Result<u16, BenchError> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn start_redis(port: u16) -> Result<Process, BenchError> {
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| {
            BenchError::Setup(format!("cannot start redis-server ({e}); run `make setup`"))
        })?;
    let process = Process(child);
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            return Err(BenchError::Setup("redis-server did not start".into()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(process)
}
