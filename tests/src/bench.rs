//! What the benchmarks (`benchfilter`, `benchglobal`) share: options,
//! the order of interleaved rounds, wrk runs on loopback and what they
//! printed, medians, and the load average.

use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};

use crate::envoy::pin_to_cpus;
use crate::find_on_path;

/// The options every benchmark takes: `--rounds N`, `--duration SECONDS`,
/// `--warmup SECONDS`, `--connections N`, `--threads N`, `--no-pin`,
/// `--only NAME[,NAME]`.
#[derive(Debug, Clone)]
pub struct Options {
    /// Interleaved rounds (each variant once per round).
    pub rounds: usize,
    /// Seconds of each measured run.
    pub duration_s: u64,
    /// Seconds of load before each measured run.
    pub warmup_s: u64,
    /// Load generator connections.
    pub connections: u32,
    /// Load generator threads.
    pub threads: u32,
    /// Pins Envoy and the load generator to separate CPUs.
    pub pin: bool,
    /// Runs only these variants.
    pub only: Option<Vec<String>>,
}

impl Default for Options {
    /// 3 rounds of 5 s after 1 s of warm-up, 32 connections, 1 thread,
    /// pinned, every variant.
    fn default() -> Options {
        Options {
            rounds: 3,
            duration_s: 5,
            warmup_s: 1,
            connections: 32,
            threads: 1,
            pin: true,
            only: None,
        }
    }
}

impl Options {
    /// Reads `args` (without the program name) over `defaults`; `None`
    /// after printing the usage of `program` for `-h`/`--help`. Runs stay
    /// bounded: at most 20 rounds of 120 s.
    pub fn parse(program: &str, defaults: Options, args: Vec<String>) -> Result<Option<Options>> {
        let mut options = defaults;
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            let mut value = || args.next().ok_or_else(|| anyhow!("{arg} needs a value"));
            match arg.as_str() {
                "--rounds" => options.rounds = value()?.parse()?,
                "--duration" => options.duration_s = value()?.parse()?,
                "--warmup" => options.warmup_s = value()?.parse()?,
                "--connections" => options.connections = value()?.parse()?,
                "--threads" => options.threads = value()?.parse()?,
                "--no-pin" => options.pin = false,
                "--only" => {
                    options.only = Some(value()?.split(',').map(str::to_owned).collect());
                }
                "-h" | "--help" => {
                    println!(
                        "{program} [--rounds N] [--duration S] [--warmup S] [--connections N] \
                         [--threads N] [--no-pin] [--only NAME,...]"
                    );
                    return Ok(None);
                }
                other => bail!("unknown argument {other:?}"),
            }
        }
        if options.rounds == 0 || options.duration_s == 0 || options.connections == 0 {
            bail!("--rounds, --duration and --connections must be at least 1");
        }
        if options.duration_s > 120 || options.rounds > 20 {
            bail!("keep runs bounded: --duration at most 120, --rounds at most 20");
        }
        Ok(Some(options))
    }

    /// Whether variant `name` runs (`--only`).
    pub fn selects(&self, name: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|only| only.iter().any(|o| o == name))
    }

    /// Whether to pin: asked, and there are two CPUs to pin to.
    pub fn pins(&self) -> bool {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        self.pin && cpus >= 2
    }
}

/// The order of `count` variants in round `round` (from 0): rotated by one
/// each round, so no variant always runs first or after the same one.
pub fn round_order(round: usize, count: usize) -> impl Iterator<Item = usize> {
    (0..count).map(move |k| (k + round) % count)
}

/// How to run wrk (HTTP/1.1, keep-alive connections).
#[derive(Debug, Clone, Copy)]
pub struct WrkLoad {
    /// wrk threads.
    pub threads: u32,
    /// Open connections, each with one request in flight.
    pub connections: u32,
    /// How long.
    pub seconds: u64,
    /// Runs wrk on this CPU only.
    pub cpu: Option<usize>,
}

/// What one wrk run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct WrkRun {
    /// Requests per second, every answer included.
    pub rps: f64,
    /// Answers received.
    pub requests: u64,
    /// Answers neither 2xx nor 3xx.
    pub non_2xx: u64,
    /// Connect, read, write errors and timeouts.
    pub socket_errors: u64,
    /// Mean latency as wrk printed it (e.g. `1.23ms`).
    pub latency_avg: String,
    /// Median latency.
    pub p50: Duration,
    /// 99th percentile latency.
    pub p99: Duration,
}

/// Runs wrk (`SLUICE_WRK`, else `wrk` on `PATH`) against `url`, which must
/// be on 127.0.0.1, with its latency distribution.
pub fn run_wrk(url: &str, load: WrkLoad) -> Result<WrkRun> {
    let wrk = match std::env::var_os("SLUICE_WRK").filter(|v| !v.is_empty()) {
        Some(p) => p.into(),
        None => find_on_path("wrk").ok_or_else(|| anyhow!("wrk not found: run `make setup`"))?,
    };
    if !url.starts_with("http://127.0.0.1:") {
        bail!("refusing to load anything but loopback: {url}");
    }
    let mut command = Command::new(wrk);
    if let Some(cpu) = load.cpu {
        pin_to_cpus(&mut command, &[cpu]);
    }
    let output = command
        .arg(format!("-t{}", load.threads))
        .arg(format!("-c{}", load.connections))
        .arg(format!("-d{}s", load.seconds))
        .arg("--timeout")
        .arg("5s")
        .arg("--latency")
        .arg(url)
        .stdin(Stdio::null())
        .output()
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        bail!(
            "wrk failed ({}): {}{}",
            output.status,
            text,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    parse_wrk(&text)
}

/// Reads `Requests/sec:`, `N requests in`, `Non-2xx or 3xx responses:`,
/// `Socket errors:`, the mean latency and the 50% and 99% lines of the
/// latency distribution from wrk's `--latency` output.
pub fn parse_wrk(text: &str) -> Result<WrkRun> {
    let mut rps = None;
    let mut requests = None;
    let mut non_2xx = 0;
    let mut socket_errors = 0;
    let mut latency_avg = String::from("?");
    let (mut p50, mut p99) = (None, None);
    for line in text.lines() {
        let line = line.trim();
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            rps = v.trim().parse::<f64>().ok();
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            non_2xx = v.trim().parse().context("wrk's non-2xx count")?;
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            // `connect 0, read 1, write 0, timeout 2`
            for part in v.split(',') {
                let n = part.split_whitespace().nth(1).unwrap_or("0");
                socket_errors += n.parse::<u64>().context("wrk's socket errors")?;
            }
        } else if line.starts_with("Latency Distribution") {
            // The percentiles follow.
        } else if let Some(v) = line.strip_prefix("Latency ") {
            latency_avg = v.split_whitespace().next().unwrap_or("?").to_owned();
        } else if let Some(v) = line.strip_prefix("50%") {
            p50 = Some(parse_duration(v.trim())?);
        } else if let Some(v) = line.strip_prefix("99%") {
            p99 = Some(parse_duration(v.trim())?);
        } else if line.contains(" requests in ") {
            requests = line.split_whitespace().next().and_then(|n| n.parse().ok());
        }
    }
    Ok(WrkRun {
        rps: rps.ok_or_else(|| anyhow!("no Requests/sec in wrk's output:\n{text}"))?,
        requests: requests.ok_or_else(|| anyhow!("no request count in wrk's output:\n{text}"))?,
        non_2xx,
        socket_errors,
        latency_avg,
        p50: p50.ok_or_else(|| anyhow!("no 50% latency in wrk's output:\n{text}"))?,
        p99: p99.ok_or_else(|| anyhow!("no 99% latency in wrk's output:\n{text}"))?,
    })
}

/// A wrk duration: `812.00us`, `1.23ms`, `2.01s`, `1.5m`.
fn parse_duration(text: &str) -> Result<Duration> {
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| anyhow!("no unit in wrk's duration {text:?}"))?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .with_context(|| format!("wrk's duration {text:?}"))?;
    let seconds = match unit {
        "us" => value / 1e6,
        "ms" => value / 1e3,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => bail!("unknown unit in wrk's duration {text:?}"),
    };
    // Rounded to the nanosecond: `2.05ms` is 2,050,000 ns, not one less.
    Ok(Duration::from_nanos((seconds * 1e9).round() as u64))
}

/// The median (the mean of the middle two for an even count; 0 for none).
pub fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// The 1-minute load average.
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// What a benchmark binary's `main` does: parses its options (`program`
/// names it in messages), pins this thread to CPU 1 first when
/// `pin_loader` and the options pin (the threads it starts later, load
/// generators and servers, inherit CPU 1 and leave CPU 0 to Envoy), then
/// runs `run(options, pinned)` on a one-worker runtime.
pub fn main<F, Fut>(program: &str, defaults: Options, pin_loader: bool, run: F) -> ExitCode
where
    F: FnOnce(Options, bool) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let outcome = (|| -> Result<Option<()>> {
        let Some(options) = Options::parse(program, defaults, std::env::args().skip(1).collect())?
        else {
            return Ok(None);
        };
        let pin = pin_loader && options.pins();
        if pin {
            crate::envoy::pin_this_thread(&[1])?;
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .context("cannot start the tokio runtime")?;
        runtime.block_on(run(options, pin)).map(Some)
    })();
    match outcome {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{program} failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// wrk 4.2's output for a run with errors (layout as printed).
    const WRK: &str = "Running 2s test @ http://127.0.0.1:1/\n  1 threads and 2 connections\n  \
        Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency   846.21us  301.00us   \
        9.12ms   91.00%\n    Req/Sec     2.31k   120.00     2.50k    70.00%\n  \
        Latency Distribution\n     50%  790.00us\n     75%    0.92ms\n     90%    1.10ms\n     \
        99%    2.05ms\n  4620 requests in 2.00s, 1.00MB read\n  \
        Socket errors: connect 0, read 2, write 0, timeout 1\n  \
        Non-2xx or 3xx responses: 7\nRequests/sec:   2309.50\nTransfer/sec:    512.00KB\n";

    #[test]
    fn reads_wrk_figures_and_errors() {
        let run = parse_wrk(WRK).unwrap();
        assert_eq!(run.requests, 4620);
        assert_eq!(run.non_2xx, 7);
        assert_eq!(run.socket_errors, 3);
        assert_eq!(run.latency_avg, "846.21us");
        assert_eq!(run.p50, Duration::from_micros(790));
        assert_eq!(run.p99, Duration::from_micros(2050));
        assert!((run.rps - 2309.5).abs() < 1e-9);
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(Vec::new()), 0.0);
    }
}
