//! A running Envoy: waited for until ready, stopped when dropped; an Envoy
//! that refused its configuration; and `envoy --mode validate`.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};

use super::admin::{admin_ready, read_admin_address};
use super::logs::LogFiles;
use super::os::{die_with_parent, process_cpu_time, terminate};
use crate::client::Client;
use crate::{envoy_binary, repo_root};

/// How long Envoy may take to become ready (or to exit, when a failure is
/// expected) by default. Compiling the filter with V8 takes a while when
/// tests run in parallel on a small machine.
pub const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running Envoy; terminated (SIGTERM, then SIGKILL) when dropped.
pub struct Envoy {
    pub(super) process: Option<Child>,
    pub(super) admin: SocketAddr,
    pub(super) listener: SocketAddr,
    pub(super) files: LogFiles,
    pub(super) concurrency: u32,
}

impl Envoy {
    pub(super) async fn finish_start(mut self, deadline: Instant) -> Result<Self> {
        match self.wait_ready(deadline).await {
            Ok(()) => Ok(self),
            Err(e) => {
                // Keep the files of an Envoy that failed to start.
                self.files.keep = true;
                Err(e)
            }
        }
    }

    async fn wait_ready(&mut self, deadline: Instant) -> Result<()> {
        loop {
            if let Some(process) = self.process.as_mut() {
                if let Some(status) = process.try_wait()? {
                    bail!(
                        "Envoy exited ({status}) before becoming ready\n{}",
                        self.files.describe()
                    );
                }
            }
            if matches!(admin_ready(self.admin).await, Ok(true)) {
                break;
            }
            if Instant::now() >= deadline {
                bail!(
                    "Envoy was not ready (admin /ready) in time\n{}",
                    self.files.describe()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.listener = self
            .listener_address("ingress")
            .await
            .with_context(|| self.files.describe())?;
        Ok(())
    }

    /// The HTTP listener.
    pub fn addr(&self) -> SocketAddr {
        self.listener
    }

    pub fn port(&self) -> u16 {
        self.listener.port()
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    pub fn concurrency(&self) -> u32 {
        self.concurrency
    }

    /// A client for the HTTP listener.
    pub fn client(&self) -> Client {
        Client::new(self.listener)
    }

    /// `http://127.0.0.1:<port><path>` on the listener.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.listener, path)
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Child::id)
    }

    /// Where this Envoy's files are.
    pub fn log_dir(&self) -> &Path {
        &self.files.dir
    }

    /// Envoy's log, stderr and stdout so far.
    pub fn logs(&self) -> String {
        self.files.read_all()
    }

    /// Keeps the log files even if the test passes.
    pub fn keep_logs(&mut self) {
        self.files.keep = true;
    }

    /// Envoy's CPU time so far (user + system), from /proc.
    pub fn cpu_time(&self) -> Result<Duration> {
        let pid = self.pid().ok_or_else(|| anyhow!("Envoy is not running"))?;
        process_cpu_time(pid)
    }

    /// Stops Envoy now (also done on drop).
    pub fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            terminate(&mut process);
        }
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An Envoy that exited on its own (see
/// [`EnvoyBuilder::start_expect_failure`]).
pub struct EnvoyFailure {
    pub status: ExitStatus,
    /// Envoy's log file, stderr and stdout.
    pub log: String,
    pub(super) files: LogFiles,
}

impl EnvoyFailure {
    pub fn log_dir(&self) -> &Path {
        &self.files.dir
    }
}

/// Runs `envoy --mode validate -c <config>` from the repository root (so
/// relative paths in the config resolve as for users; the wasm module is
/// loaded and configured) and returns whether Envoy accepted it and its
/// output. Bounded by [`DEFAULT_START_TIMEOUT`].
pub async fn validate(config: &Path) -> Result<(bool, String)> {
    let binary = envoy_binary()?;
    let out = tempfile::NamedTempFile::new()?;
    let mut command = Command::new(&binary);
    die_with_parent(&mut command);
    let mut child = command
        .arg("--mode")
        .arg("validate")
        .arg("-c")
        .arg(config)
        .arg("--use-dynamic-base-id")
        .arg("-l")
        .arg("warn")
        .current_dir(repo_root())
        .stdin(Stdio::null())
        .stdout(out.reopen()?)
        .stderr(out.reopen()?)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let deadline = Instant::now() + DEFAULT_START_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            terminate(&mut child);
            bail!("envoy --mode validate did not finish in time");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let output = std::fs::read_to_string(out.path()).unwrap_or_default();
    Ok((status.success(), output))
}

/// Waits until Envoy writes its admin address (or exits, or `deadline` passes).
pub(super) async fn wait_for_admin_address(
    process: &mut Child,
    files: &LogFiles,
    deadline: Instant,
) -> Result<SocketAddr> {
    loop {
        if let Some(status) = process.try_wait()? {
            terminate(process);
            bail!("Envoy exited ({status}) before opening its admin endpoint");
        }
        if let Ok(addr) = read_admin_address(&files.admin_address) {
            return Ok(addr);
        }
        if Instant::now() >= deadline {
            terminate(process);
            bail!("Envoy did not open its admin endpoint in time");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
