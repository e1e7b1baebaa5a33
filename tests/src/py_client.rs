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
