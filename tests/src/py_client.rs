//! Independent clients: small Python scripts in `tests/clients/` (grpcio,
//! websockets) run with the project's `.venv` (`make setup` installs them),
//! each printing one JSON object that the tests assert on.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use serde_json::Value;
use tokio::process::Command;

use crate::repo_root;

/// The longest a client script may run: each bounds its own calls well
/// below this.
pub const SCRIPT_TIMEOUT: Duration = Duration::from_secs(30);

/// The `.venv` Python, with a hint to run `make setup` when it is missing.
fn python() -> Result<PathBuf> {
    let path = repo_root().join(".venv/bin/python");
    if !path.is_file() {
        bail!(
            "{} is missing: run `make setup` (installs grpcio and websockets into .venv)",
            path.display()
        );
    }
    Ok(path)
}

/// Runs `tests/clients/<script>` with `args` (JSON) and returns its report.
pub async fn run(script: &str, args: &Value) -> Result<Value> {
    let path = repo_root().join("tests/clients").join(script);
    let mut command = Command::new(python()?);
    command.arg(&path).arg(args.to_string()).kill_on_drop(true);
    let output = tokio::time::timeout(SCRIPT_TIMEOUT, command.output())
        .await
        .with_context(|| format!("{script} still running after {SCRIPT_TIMEOUT:?}"))?
        .with_context(|| format!("running {}", path.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "{script} {args} failed ({}):\n{}\n{}",
            output.status,
            stdout,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    serde_json::from_str(stdout.trim())
        .with_context(|| format!("{script} {args}: not one JSON object: {stdout}"))
}

/// A Python server script (`tests/clients/<script>`) running in the
/// background: it prints one JSON object per line, the first with its
/// `port`. Stops when dropped.
pub struct PyServer {
    port: u16,
    events: std::sync::Arc<std::sync::Mutex<Vec<Value>>>,
    _child: tokio::process::Child,
}

impl PyServer {
    /// Starts `script` and waits (bounded) for the port it listens on.
    pub async fn start(script: &str) -> Result<Self> {
        use tokio::io::AsyncBufReadExt as _;

        let path = repo_root().join("tests/clients").join(script);
        let mut child = Command::new(python()?)
            .arg(&path)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", path.display()))?;
        let stdout = child.stdout.take().context("the server's stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let first = tokio::time::timeout(SCRIPT_TIMEOUT, lines.next_line())
            .await
            .with_context(|| format!("{script}: no port within {SCRIPT_TIMEOUT:?}"))??
            .with_context(|| format!("{script} ended before listening"))?;
        let port = serde_json::from_str::<Value>(&first)?["port"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .with_context(|| format!("{script}: expected {{\"port\": N}}, got {first}"))?;
        let events: std::sync::Arc<std::sync::Mutex<Vec<Value>>> = std::sync::Arc::default();
        let sink = std::sync::Arc::clone(&events);
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(event) = serde_json::from_str::<Value>(&line) {
                    sink.lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push(event);
                }
            }
        });
        Ok(Self {
            port,
            events,
            _child: child,
        })
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The events it printed so far (the port aside), in order.
    pub fn events(&self) -> Vec<Value> {
        self.events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}
