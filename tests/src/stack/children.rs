//! The stack's processes other than Envoy (Redis, the quota server, the
//! upstreams): started with their output in `<dir>/<name>.log`, waited for
//! through what they print, stopped when dropped (or when the thread that
//! started them ends).

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use crate::envoy::{die_with_parent, terminate};

/// A started process; terminated when dropped.
pub(super) struct Child {
    pub(super) name: String,
    process: Option<std::process::Child>,
    pub(super) log: PathBuf,
}

impl Child {
    /// Starts `command` as `name`, its stdout and stderr appended to
    /// `<dir>/<name>.log` (emptied first); it gets SIGTERM when this thread
    /// ends.
    pub(super) fn spawn(name: &str, mut command: Command, dir: &Path) -> Result<Self> {
        let log = dir.join(format!("{name}.log"));
        std::fs::write(&log, "").with_context(|| format!("creating {}", log.display()))?;
        let output = || OpenOptions::new().append(true).open(&log);
        die_with_parent(&mut command);
        let process = command
            .stdin(Stdio::null())
            .stdout(output()?)
            .stderr(output()?)
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", command.get_program()))?;
        Ok(Self {
            name: name.to_owned(),
            process: Some(process),
            log,
        })
    }

    pub(super) fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(std::process::Child::id)
    }

    /// What it printed so far.
    pub(super) fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls its output every 20 ms until `ready` finds what it waits for
    /// in it; errors when the process exits first or `within` passes.
    pub(super) async fn wait_for<T>(
        &mut self,
        within: Duration,
        ready: impl Fn(&str) -> Option<T>,
    ) -> Result<T> {
        let deadline = Instant::now() + within;
        loop {
            let output = self.output();
            if let Some(found) = ready(&output) {
                return Ok(found);
            }
            if let Some(process) = self.process.as_mut() {
                if let Some(status) = process.try_wait()? {
                    bail!(
                        "{} exited ({status}) before it was ready; its output ({}):\n{output}",
                        self.name,
                        self.log.display()
                    );
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} was not ready within {within:?}; its output ({}):\n{output}",
                    self.name,
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if let Some(mut process) = self.process.take() {
            terminate(&mut process);
        }
    }
}

/// The text after the first line of `output` that starts with `prefix`.
pub(super) fn line_after(output: &str, prefix: &str) -> Option<String> {
    output
        .lines()
        .find_map(|line| line.trim().strip_prefix(prefix).map(str::to_owned))
}
