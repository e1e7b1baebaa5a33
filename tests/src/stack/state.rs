//! The processes a stack started, recorded so that `stack down` stops
//! exactly those: each by its pid and its start time (a pid the kernel gave
//! to another process since is never signalled).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _, Result};
use serde::{Deserialize, Serialize};

/// One started process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recorded {
    /// What it is (`envoy-a`, `quota-server`, ...).
    pub name: String,
    /// Its process id.
    pub pid: u32,
    /// Its start time in clock ticks after boot (`/proc/<pid>/stat`).
    pub started: u64,
}

impl Recorded {
    /// Records the running process `pid`.
    pub fn of(name: &str, pid: u32) -> Result<Self> {
        let started =
            start_time(pid).ok_or_else(|| anyhow!("{name} (pid {pid}) is not running"))?;
        Ok(Self {
            name: name.to_owned(),
            pid,
            started,
        })
    }

    /// Whether this very process still runs (not a zombie, not a reused pid).
    pub fn is_running(&self) -> bool {
        start_time(self.pid) == Some(self.started)
    }

    fn signal(&self, signal: libc::c_int) {
        let Ok(pid) = libc::pid_t::try_from(self.pid) else {
            return;
        };
        if self.is_running() {
            // SAFETY: kill(2) on a pid checked just above to be the
            // recorded process (same start time).
            unsafe {
                libc::kill(pid, signal);
            }
        }
    }
}

/// What a stack left in its directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StackState {
    /// In start order; stopped in reverse.
    pub processes: Vec<Recorded>,
    /// The Envoys' HTTP listeners (`envoy-a`, `envoy-b`).
    pub envoys: Vec<SocketAddr>,
    /// What `stack up` printed about it.
    pub description: String,
}

/// The state file in a stack's directory.
pub fn state_path(dir: &Path) -> PathBuf {
    dir.join("stack.json")
}

impl StackState {
    /// Writes the state file into `dir`, whole or not at all (`stack up`
    /// reads it as soon as it appears).
    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = state_path(dir);
        let partial = path.with_extension("json.partial");
        std::fs::write(&partial, serde_json::to_string_pretty(self)?)
            .with_context(|| format!("writing {}", partial.display()))?;
        std::fs::rename(&partial, &path).with_context(|| format!("writing {}", path.display()))
    }

    /// The state file in `dir`, if there is one.
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let path = state_path(dir);
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(Some(
                serde_json::from_str(&text)
                    .with_context(|| format!("parsing {}", path.display()))?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// The recorded processes still running.
    pub fn running(&self) -> Vec<&Recorded> {
        self.processes.iter().filter(|p| p.is_running()).collect()
    }
}

/// Stops `processes`: SIGTERM in reverse order, up to `within` for them to
/// exit, then SIGKILL for any left. Errors if one still runs after that.
pub fn stop(processes: &[Recorded], within: Duration) -> Result<()> {
    for process in processes.iter().rev() {
        process.signal(libc::SIGTERM);
    }
    let deadline = Instant::now() + within;
    while processes.iter().any(Recorded::is_running) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    for process in processes.iter().filter(|p| p.is_running()) {
        process.signal(libc::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while processes.iter().any(Recorded::is_running) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    match processes.iter().find(|p| p.is_running()) {
        Some(p) => Err(anyhow!("{} (pid {}) did not stop", p.name, p.pid)),
        None => Ok(()),
    }
}

/// The start time of `pid` from `/proc/<pid>/stat` (field 22), `None` when
/// there is no such process or it is a zombie (it ended).
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which is in parentheses and may hold
    // spaces); `fields[0]` is field 3, the state.
    let (_, after) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(22 - 3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_recorded_and_running() {
        let me = Recorded::of("me", std::process::id()).unwrap();
        assert!(me.is_running());
        let reused = Recorded {
            started: me.started + 1,
            ..me.clone()
        };
        assert!(
            !reused.is_running(),
            "another start time is another process"
        );
    }
}
