//! Starting a built `sluice` binary as a quota server, for tests and
//! benchmarks: a configuration file or text in, the addresses it printed
//! out; killed on drop, its log kept (and printed) when the caller failed.
//!
//! ```no_run
//! # use sluice_quota_server::launcher::Launcher;
//! let server = Launcher::new("target/debug/sluice")
//!     .start_text("listen: {grpc: \"127.0.0.1:0\"}\n")
//!     .unwrap();
//! println!("gRPC on {}", server.grpc);
//! ```

use std::ffi::OsString;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// The line `sluice serve` prints once the gRPC listener serves.
const LISTENING: &str = "sluice: listening on ";
/// The line it prints first when the admin API is up.
const ADMIN: &str = "sluice: admin on ";

/// How to start a quota server.
#[derive(Clone, Debug)]
pub struct Launcher {
    binary: PathBuf,
    log_filter: String,
    env: Vec<(OsString, OsString)>,
    startup: Duration,
}

/// A running `sluice serve`, killed when dropped.
#[derive(Debug)]
pub struct QuotaServer {
    child: Child,
    /// The gRPC address (rate limit service, `Quota`, health).
    pub grpc: SocketAddr,
    /// The admin API's address, when it started (it needs a token).
    pub admin: Option<SocketAddr>,
    /// Holds the log (and the configuration, when given as text).
    dir: Option<TempDir>,
    log: PathBuf,
}

/// Why a server did not start or stop as asked.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The binary is not there.
    #[error("{0} is missing: build it with `cargo build -p sluice-quota-server`")]
    Missing(PathBuf),
    /// Spawning, writing the configuration or the log failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The server exited, or printed something unexpected, before listening.
    #[error("sluice serve did not start: {reason}\n--- its log ---\n{log}")]
    NotStarted {
        /// What happened.
        reason: String,
        /// Its standard error.
        log: String,
    },
    /// It did not stop within the time given after SIGTERM.
    #[error("sluice serve did not stop within {0:?} of SIGTERM")]
    NotStopped(Duration),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LaunchError {
    let what = what.into();
    move |source| LaunchError::Io { what, source }
}

impl Launcher {
    /// Starts `binary` (a built `sluice`) with `RUST_LOG=warn`, without
    /// `SLUICE_ADMIN_TOKEN` or `SLUICE_GRPC_TOKEN` (the configuration
    /// decides), waiting up to 30 s.
    pub fn new(binary: impl Into<PathBuf>) -> Launcher {
        Launcher {
            binary: binary.into(),
            log_filter: "warn".into(),
            env: Vec::new(),
            startup: Duration::from_secs(30),
        }
    }

    /// The `RUST_LOG` filter for the server's log.
    pub fn log_filter(mut self, filter: &str) -> Launcher {
        self.log_filter = filter.into();
        self
    }

    /// Sets an environment variable of the server.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Launcher {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Starts on the configuration file at `config` (relative paths in it
    /// are read from its directory).
    pub fn start_file(&self, config: &Path) -> Result<QuotaServer, LaunchError> {
        let dir = tempfile::Builder::new()
            .prefix("sluice-serve-")
            .tempdir()
            .map_err(io("creating the log directory"))?;
        self.spawn(config, dir)
    }

    /// Starts on configuration `text`, written to a fresh directory (so it
    /// can name no other file by a relative path).
    pub fn start_text(&self, text: &str) -> Result<QuotaServer, LaunchError> {
        let dir = tempfile::Builder::new()
            .prefix("sluice-serve-")
            .tempdir()
            .map_err(io("creating the configuration directory"))?;
        let config = dir.path().join("sluice.yaml");
        std::fs::write(&config, text).map_err(io("writing the configuration"))?;
        self.spawn(&config, dir)
    }

    fn spawn(&self, config: &Path, dir: TempDir) -> Result<QuotaServer, LaunchError> {
        if !self.binary.is_file() {
            return Err(LaunchError::Missing(self.binary.clone()));
        }
        let log = dir.path().join("sluice.log");
        let stderr = File::create(&log).map_err(io("creating the log file"))?;
        let mut child = Command::new(&self.binary)
            .args(["serve", "--config"])
            .arg(config)
            .env("RUST_LOG", &self.log_filter)
            .env_remove("SLUICE_ADMIN_TOKEN")
            .env_remove("SLUICE_GRPC_TOKEN")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .map_err(io(format!("starting {}", self.binary.display())))?;
        let stdout = child.stdout.take();
        // Owned by the guard from here on, so a failed start still kills it.
        let mut server = QuotaServer {
            child,
            grpc: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin: None,
            dir: Some(dir),
            log,
        };
        let Some(stdout) = stdout else {
            return Err(server.not_started("no standard output"));
        };
        // A reader thread, so that waiting is bounded in time; it drains
        // the pipe until the server exits, so the server never blocks on it.
        let (lines, received) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if lines.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + self.startup;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match received.recv_timeout(left) {
                Ok(line) => line,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(
                        server.not_started(&format!("not listening within {:?}", self.startup))
                    )
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(server.not_started("it exited before listening"))
                }
            };
            let line = line.trim();
            if let Some(addr) = line.strip_prefix(ADMIN) {
                server.admin = Some(server.address(addr)?);
            } else if let Some(addr) = line.strip_prefix(LISTENING) {
                server.grpc = server.address(addr)?;
                return Ok(server);
            } else {
                return Err(server.not_started(&format!("unexpected line {line:?}")));
            }
        }
    }
}

impl QuotaServer {
    /// The gRPC address as a URL (`http://127.0.0.1:PORT`).
    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// The server's process id (to read its memory use in `/proc`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server's log so far (its standard error).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills the server (as a crash would) and waits for it to exit.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits up to `within` for the exit status.
    pub fn terminate(&mut self, within: Duration) -> Result<ExitStatus, LaunchError> {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .map_err(io("running kill -TERM"))?;
        if !sent.success() {
            return Err(io("kill -TERM")(std::io::Error::other(format!("{sent}"))));
        }
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().map_err(io("waiting for sluice"))? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                return Err(LaunchError::NotStopped(within));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn address(&mut self, text: &str) -> Result<SocketAddr, LaunchError> {
        text.parse()
            .map_err(|_| self.not_started(&format!("{text:?} is not an address")))
    }

    /// Stops a server that failed to start, with its log.
    fn not_started(&mut self, reason: &str) -> LaunchError {
        self.kill();
        LaunchError::NotStarted {
            reason: reason.into(),
            log: self.log(),
        }
    }
}

impl Drop for QuotaServer {
    fn drop(&mut self) {
        self.kill();
        // The caller failed: keep the log for a look afterwards, and show it.
        if std::thread::panicking() {
            if let Some(dir) = self.dir.take() {
                let kept = dir.keep();
                eprintln!(
                    "--- sluice serve log (kept in {}) ---\n{}",
                    kept.display(),
                    self.log()
                );
            }
        }
    }
}
