//! `make bench-quota`: the quota server's throughput and latency.
//!
//! Runs `sluice serve` (the `sluice` binary next to this one, through the
//! library's launcher) on loopback, calls `ShouldRateLimit` at a fixed
//! concurrency for a bounded time, with the memory backend and then with
//! Redis (a `redis-server` started here), and prints decisions/s, p50 and
//! p99. In the same run it measures the raw
//! Redis ceiling for the same work, the decision script called by EVALSHA
//! with the same kind of keys at the same concurrency, two ways:
//! - `redis-benchmark` (C client, one connection per caller): what Redis
//!   itself sustains for the script;
//! - the server's own Redis client (`RedisBackend::check`) in a Rust loop:
//!   the same multiplexed connection, without gRPC.
//!
//! The ratio divides the server's decisions/s with Redis by the higher of
//! the two ceilings, so it is never flattered by a slow baseline.

#![forbid(unsafe_code)]
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use sluice_quota_server::config::ServerConfig;
use sluice_quota_server::launcher::Launcher;
use sluice_quota_server::limits::{Limit, Limits, Resolved};
use sluice_quota_server::storage::redis::script_call;
use sluice_quota_server::storage::{Item, RedisBackend};
use tonic::transport::Channel;

/// Callers in flight at any time.
const CONCURRENCY: usize = 32;
/// How long each measurement runs.
const DURATION: Duration = Duration::from_secs(5);
/// Distinct client addresses (keys) the load spreads over.
const KEYS: usize = 1000;
/// gRPC connections the callers share (Envoy opens one per worker).
const CHANNELS: usize = 4;

/// The envoyproxy/ratelimit file every run uses: high enough that nearly
/// every call is allowed (and so consumes, the expensive path).
const DESCRIPTORS: &str = "domain: bench
descriptors:
  - key: remote_address
    rate_limit: {unit: second, requests_per_unit: 100000}
";

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
}

/// Throughput and latency of one run.
struct Measured {
    per_sec: f64,
    p50: Duration,
    /// Unknown for `redis-benchmark -q`, which reports the median only.
    p99: Option<Duration>,
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
        }
    }

    fn print(&self, name: &str) {
        let p99 = self.p99.map_or_else(
            || "n/a".to_owned(),
            |d| format!("{:.3} ms", d.as_secs_f64() * 1e3),
        );
        println!(
            "{name}: {:.0} decisions/s, p50 {:.3} ms, p99 {p99}",
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

fn main() -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("benchquota: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("benchquota: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), BenchError> {
    let dir = std::env::temp_dir().join(format!("sluice-benchquota-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("bench.yaml"), DESCRIPTORS)?;
    println!(
        "quota server bench: {CONCURRENCY} callers, {} s per run, {KEYS} keys, loopback",
        DURATION.as_secs()
    );
    let result = measure_all(&dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn measure_all(dir: &Path) -> Result<(), BenchError> {
    let memory = serve_and_load(dir, "memory", "backend: memory").await?;
    memory.print("quota_memory");

    let redis_port = free_port()?;
    let _redis = start_redis(redis_port)?;
    let url = format!("redis://127.0.0.1:{redis_port}");
    let storage = format!("backend: redis\n  redis: {{url: \"{url}\", timeout: 100ms}}");
    let with_redis = serve_and_load(dir, "redis", &storage).await?;
    with_redis.print("quota_redis");

    let config = config(dir, &storage)?;
    let limits = Limits::compile(&config, dir).map_err(|e| BenchError::Setup(e.to_string()))?;
    let raw_rust = raw_redis_rust(&limits, &url).await?;
    raw_rust.print("raw_redis_rust_evalsha");
    let raw_c = raw_redis_benchmark(&limits, redis_port)?;
    match &raw_c {
        Some(m) => m.print("raw_redis_benchmark_evalsha"),
        None => println!("raw_redis_benchmark_evalsha: skipped (redis-benchmark not on PATH)"),
    }
    let ceiling = raw_c
        .as_ref()
        .map_or(raw_rust.per_sec, |m| m.per_sec.max(raw_rust.per_sec));
    println!(
        "quota_redis_vs_raw_redis_ratio: {:.2}",
        with_redis.per_sec / ceiling
    );
    Ok(())
}

fn config(dir: &Path, storage: &str) -> Result<ServerConfig, BenchError> {
    let yaml = format!(
        "listen: {{grpc: \"127.0.0.1:0\", request_timeout: 1s}}\nstorage:\n  {storage}\ndescriptor_files: [{{path: bench.yaml}}]\n"
    );
    std::fs::write(dir.join("sluice.yaml"), &yaml)?;
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
    let addr = server.grpc;
    let mut channels = Vec::with_capacity(CHANNELS);
    for _ in 0..CHANNELS {
        channels.push(
            Channel::from_shared(format!("http://{addr}"))
                .map_err(|e| BenchError::Setup(e.to_string()))?
                .connect()
                .await?,
        );
    }
    let measured = load(CONCURRENCY, move |caller, i| {
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
            client.should_rate_limit(request).await?;
            Ok(())
        }
    })
    .await;
    drop(server);
    measured
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

/// The bench domain's only limit.
fn bench_limit(limits: &Limits) -> Result<&Limit, BenchError> {
    let domain = limits
        .domain("bench")
        .ok_or_else(|| BenchError::Setup("no bench domain".into()))?;
    match limits.resolve(domain, &[("remote_address".into(), "x".into())]) {
        Resolved::Limited(limit) => Ok(limit),
        _ => Err(BenchError::Setup(
            "the bench descriptor has no limit".into(),
        )),
    }
}

fn item<'a>(limit: &'a Limit, caller: usize, i: usize) -> Item<'a> {
    Item {
        limit,
        key: limit.storage_key(&[("remote_address".into(), address(caller, i))]),
        cost: 1,
        enforce: true,
    }
}

/// The server's Redis client without the server: the script by EVALSHA
/// on one multiplexed connection (the server's default), same keys.
async fn raw_redis_rust(limits: &Limits, url: &str) -> Result<Measured, BenchError> {
    let limit = bench_limit(limits)?.clone();
    let backend = Arc::new(RedisBackend::new(url, Duration::from_millis(100), 1)?);
    let limit = Arc::new(limit);
    load(CONCURRENCY, move |caller, i| {
        let backend = backend.clone();
        let limit = limit.clone();
        async move {
            backend.check(&[item(&limit, caller, i)], None).await?;
            Ok(())
        }
    })
    .await
}

/// `redis-benchmark` calling the script by EVALSHA at the same
/// concurrency, one connection per caller, keys spread like the load's.
fn raw_redis_benchmark(limits: &Limits, port: u16) -> Result<Option<Measured>, BenchError> {
    let Some(bench) = which("redis-benchmark") else {
        return Ok(None);
    };
    let limit = bench_limit(limits)?;
    let backend = RedisBackend::new(
        &format!("redis://127.0.0.1:{port}"),
        Duration::from_secs(1),
        1,
    )?;
    // `__rand_int__` is replaced per call by a number below `-r`.
    let template = Item {
        limit,
        key: format!("{}:bench:__rand_int__", limit.key_prefix),
        cost: 1,
        enforce: true,
    };
    let call = script_call("check", &[template], None)?;
    let sha = backend.script_sha().to_owned();
    // Load the script (EVALSHA alone would fail with NOSCRIPT).
    let loaded = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "SCRIPT", "LOAD"])
        .arg(include_str!("../../lua/decide.lua"))
        .output()?;
    if !String::from_utf8_lossy(&loaded.stdout).contains(&sha) {
        return Err(BenchError::Setup(format!(
            "SCRIPT LOAD answered {:?}, not {sha}",
            String::from_utf8_lossy(&loaded.stdout)
        )));
    }
    // As many calls as the Rust loop made in the same time, bounded.
    let requests = 150_000;
    let output = Command::new(bench)
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-c", &CONCURRENCY.to_string(), "-n", &requests.to_string()])
        .args(["-r", &KEYS.to_string(), "-q", "--precision", "3"])
        .args(["EVALSHA", &sha, &call.keys.len().to_string()])
        .args(&call.keys)
        .args(&call.args)
        .output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    // "EVALSHA ...: 51234.56 requests per second, p50=0.303 msec"
    let last = text.rsplit('\r').next().unwrap_or(&text);
    let number_before = |marker: &str| {
        last.split(marker)
            .next()
            .and_then(|s| s.rsplit([' ', ':', '=']).find(|w| !w.is_empty()))
            .and_then(|w| w.parse::<f64>().ok())
    };
    let per_sec = number_before(" requests per second").ok_or_else(|| {
        BenchError::Setup(format!("cannot read redis-benchmark's output: {text:?}"))
    })?;
    let p50 = last
        .split("p50=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|w| w.parse::<f64>().ok())
        .unwrap_or(0.0);
    Ok(Some(Measured {
        per_sec,
        p50: Duration::from_secs_f64(p50 / 1e3),
        p99: None,
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
