//! End-to-end harness for Sluice.
//!
//! - [`upstream::Upstream`]: an in-process HTTP/1.1 + h2c server that counts
//!   the requests it receives and echoes the request headers as JSON (and
//!   reports usage in a response header or trailer when asked).
//! - [`envoy::Envoy`]: the real Envoy binary with the configuration rendered
//!   from `envoy/sluice-http.template.yaml` ([`template`]), waited for through
//!   its admin `/ready` endpoint, with helpers to read its stats.
//! - [`client`]: a small HTTP/1.1 and h2c client (one connection per request).
//! - [`grpc_upstream::GrpcUpstream`] and [`ws_upstream::WsUpstream`]: tonic
//!   and WebSocket upstreams that record what reached them; [`grpc`] and
//!   [`ws_client`]: clients for them through Envoy; [`routes`]: the
//!   template's gRPC and WebSocket routes; [`stream_stats`]: their stats;
//!   [`wait`]: bounded polling; [`py_client`]: independent Python clients
//!   (grpcio, websockets).
//! - [`demo`]: the example rule set rendered into `envoy/envoy.yaml`.
//! - [`stack`]: two Envoys sharing global limits through the quota server,
//!   as local processes (`make stack-up`, `make demo`) or in compose
//!   (`envoy/compose.yaml`), and the demo's traffic and summary.
//! - [`fleet`]: several Envoys sharing synced rules through quota servers;
//!   [`redis`]: a real `redis-server`; [`delay_proxy`]: a TCP proxy that
//!   delays answers (a slow quota server).
//! - [`browser`]: headless Chromium over WebDriver (the playground's page).
//! - [`bench`]: load generation and figures shared by the benchmarks;
//!   [`windows`]: timed load and admissions per fixed window (`benchglobal`).
//!
//! Tests should fail by panicking (`expect`, `assert!`): Envoy's logs under
//! `.e2e-logs/<test>/` are kept only when the test is panicking while the
//! [`envoy::Envoy`] is dropped (or when `SLUICE_KEEP_LOGS=1`).

pub mod bench;
pub mod browser;
pub mod client;
pub mod delay_proxy;
pub mod demo;
pub mod envoy;
pub mod fleet;
pub mod grpc;
pub mod grpc_upstream;
pub mod py_client;
pub mod redis;
pub mod routes;
pub mod stack;
pub mod stream_stats;
pub mod template;
pub mod upstream;
pub mod wait;
pub mod windows;
pub mod ws_client;
pub mod ws_frame;
pub mod ws_upstream;

use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};

/// The repository root (the workspace directory).
pub fn repo_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// A TCP port on 127.0.0.1 that was free when asked (the OS picks it).
///
/// Another process may take it before it is used: where possible let the
/// server bind port 0 itself (the harness does so for Envoy and the upstream).
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))
        .context("binding 127.0.0.1:0 to find a free port")?;
    Ok(listener.local_addr()?.port())
}

/// Cargo's target directory: `CARGO_TARGET_DIR` (relative to the repo) or
/// `<repo>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => repo_root().join(dir),
        _ => repo_root().join("target"),
    }
}

/// The Sluice filter module: `SLUICE_WASM`, else
/// `<target>/wasm32-wasip1/release/sluice_filter.wasm`. Errors with a hint to
/// run `make wasm` when it is missing.
pub fn wasm_path() -> Result<PathBuf> {
    let path = match std::env::var_os("SLUICE_WASM") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => target_dir().join("wasm32-wasip1/release/sluice_filter.wasm"),
    };
    if !path.is_file() {
        bail!(
            "the Sluice filter is not built: {} is missing; run `make wasm` \
             (cargo build -p sluice-filter --target wasm32-wasip1 --release)",
            path.display()
        );
    }
    Ok(path)
}

/// The quota server's `sluice` binary: `SLUICE_BIN`, else
/// `<target>/debug/sluice`. Errors with a hint to build it when missing.
pub fn sluice_binary() -> Result<PathBuf> {
    sluice_binary_of(
        "debug",
        "cargo build -p sluice-quota-server` (`make test` does)",
    )
}

/// The release build of the quota server's `sluice` binary (benchmarks):
/// `SLUICE_BIN`, else `<target>/release/sluice`.
pub fn sluice_release_binary() -> Result<PathBuf> {
    sluice_binary_of("release", "cargo build --release -p sluice-quota-server`")
}

/// `SLUICE_BIN`, else `<target>/<profile>/sluice`; `build` says how to
/// build it when it is missing.
fn sluice_binary_of(profile: &str, build: &str) -> Result<PathBuf> {
    let path = std::env::var_os("SLUICE_BIN")
        .filter(|p| !p.is_empty())
        .map_or_else(|| target_dir().join(profile).join("sluice"), PathBuf::from);
    if !path.is_file() {
        bail!(
            "the quota server is not built: {} is missing; run `{build} or set SLUICE_BIN",
            path.display()
        );
    }
    Ok(path)
}

/// The Envoy binary: `SLUICE_ENVOY`, else `<repo>/.venv/bin/envoy`, else
/// `envoy` on `PATH`.
pub fn envoy_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("SLUICE_ENVOY").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(p);
        if !path.is_file() {
            bail!("SLUICE_ENVOY={} is not a file", path.display());
        }
        return Ok(path);
    }
    let venv = repo_root().join(".venv/bin/envoy");
    if venv.is_file() {
        return Ok(venv);
    }
    if let Some(path) = find_on_path("envoy") {
        return Ok(path);
    }
    bail!(
        "Envoy not found: run `make setup` (installs it into {}), put `envoy` on PATH, \
         or set SLUICE_ENVOY to the binary",
        venv.display()
    )
}

/// The first executable file called `name` in `PATH`.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}
