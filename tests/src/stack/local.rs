//! The stack as local processes on loopback: an optional `redis-server`
//! (appendonly), the quota server (`sluice serve`), the `upstreams` binary
//! and two Envoys, each on a port the OS picked. They are this process's
//! children and stop when the [`LocalStack`] is dropped or this thread
//! ends (Envoy itself asks for a signal when its parent dies, so a stack
//! that outlives a command needs a process that stays: `stack up` starts
//! `stack run` for that).

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, Context as _, Result};

use super::children::{line_after, Child};
use super::files;
use super::state::{Recorded, StackState};
use super::topology::{needs_sync_service, stack_vars, UpstreamPorts};
use super::upstreams::{parse_output, UpstreamAddrs};
use crate::envoy::Envoy;
use crate::template::template_path;
use crate::{free_port, sluice_binary};

/// The Envoys' names, as in `envoy/compose.yaml`.
pub const ENVOY_NAMES: [&str; 2] = ["envoy-a", "envoy-b"];
/// The line `sluice serve` prints once its gRPC listener serves.
const QUOTA_LISTENING: &str = "sluice: listening on ";
/// The line it prints, before that one, once its admin API serves.
const QUOTA_ADMIN: &str = "sluice: admin on ";
/// How long each helper process may take to be ready.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// Where the quota server keeps its counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    /// In its memory (the default: nothing else to run).
    Memory,
    /// In a `redis-server` the stack starts, with `appendonly yes`.
    Redis,
}

/// How to start a local stack.
#[derive(Debug, Clone)]
pub struct Options {
    /// Logs, rendered configurations and the state file.
    pub dir: PathBuf,
    /// Where the quota server keeps its counters.
    pub store: Store,
    /// The `upstreams` binary.
    pub upstreams_binary: PathBuf,
    /// The quota server's `sluice` binary.
    pub sluice_binary: PathBuf,
    /// Worker threads of each Envoy.
    pub envoy_workers: u32,
}

impl Options {
    /// Memory store, two workers per Envoy, the `sluice`
    /// binary of [`sluice_binary`] and the `upstreams` binary next to this
    /// program's.
    pub fn new(dir: &Path) -> Result<Self> {
        let exe = std::env::current_exe().context("locating this program")?;
        Ok(Self {
            dir: dir.to_path_buf(),
            store: Store::Memory,
            upstreams_binary: exe.with_file_name("upstreams"),
            sluice_binary: sluice_binary()?,
            envoy_workers: 2,
        })
    }
}

/// A running local stack; every process stops when it is dropped.
pub struct LocalStack {
    // Dropped in this order: Envoys first, Redis last.
    /// `envoy-a` and `envoy-b`.
    pub envoys: [Envoy; 2],
    upstreams: Child,
    quota: Child,
    redis: Option<(Child, u16)>,
    /// The quota server's gRPC address.
    pub quota_addr: SocketAddr,
    /// The quota server's admin API (bans, lists, overrides).
    pub admin_addr: SocketAddr,
    /// Its bearer token, drawn for this stack (also in `<dir>/admin-token`).
    pub admin_token: String,
    /// The upstreams' addresses.
    pub upstream_addrs: UpstreamAddrs,
    /// The filter configuration the Envoys run (`envoy/stack/filter.json`).
    pub filter: String,
    dir: PathBuf,
}

impl LocalStack {
    /// Starts every process and waits until each serves.
    pub async fn start(options: &Options) -> Result<Self> {
        let dir = &options.dir;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let filter = files::filter_config()?;

        let redis = match options.store {
            Store::Memory => None,
            Store::Redis => Some(start_redis(dir).await?),
        };
        let redis_url = redis
            .as_ref()
            .map(|(_, port)| format!("redis://127.0.0.1:{port}"));
        let quota_config = dir.join("sluice.yaml");
        std::fs::write(
            &quota_config,
            files::local_quota_config("127.0.0.1:0", "127.0.0.1:0", redis_url.as_deref())?,
        )
        .with_context(|| format!("writing {}", quota_config.display()))?;
        let admin_token = admin_token()?;
        let token_path = dir.join("admin-token");
        std::fs::write(&token_path, &admin_token)
            .with_context(|| format!("writing {}", token_path.display()))?;
        let mut command = Command::new(&options.sluice_binary);
        command
            .args(["serve", "--config"])
            .arg(&quota_config)
            .env("RUST_LOG", "info")
            .env("SLUICE_ADMIN_TOKEN", &admin_token)
            .env_remove("SLUICE_GRPC_TOKEN");
        let mut quota = Child::spawn("quota-server", command, dir)?;
        let (quota_addr, admin_addr): (SocketAddr, SocketAddr) = quota
            .wait_for(READY_WITHIN, |out| {
                let grpc = line_after(out, QUOTA_LISTENING)?.parse().ok()?;
                let admin = line_after(out, QUOTA_ADMIN)?.parse().ok()?;
                Some((grpc, admin))
            })
            .await?;

        let mut upstreams =
            Child::spawn("upstreams", Command::new(&options.upstreams_binary), dir)?;
        let upstream_addrs = upstreams.wait_for(READY_WITHIN, parse_output).await?;

        let ports = UpstreamPorts {
            http: upstream_addrs.http.port(),
            grpc: upstream_addrs.grpc.port(),
            ws: upstream_addrs.ws.port(),
        };
        let vars = stack_vars(ports);
        let sync_service = needs_sync_service(&filter)?;
        let start = |name: &str| {
            Envoy::builder("stack")
                .instance(name)
                .log_dir(dir)
                .concurrency(options.envoy_workers)
                .upstream(ports.http)
                .quota_server(quota_addr.port())
                .sluice_raw(&filter)
                .sync_service(sync_service)
                .template(&template_path().display().to_string(), vars.clone())
                .start()
        };
        let (a, b) = tokio::join!(start(ENVOY_NAMES[0]), start(ENVOY_NAMES[1]));
        Ok(Self {
            envoys: [a?, b?],
            upstreams,
            quota,
            redis,
            quota_addr,
            admin_addr,
            admin_token,
            upstream_addrs,
            filter,
            dir: dir.clone(),
        })
    }

    /// Where its files are.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What runs where, for people.
    pub fn describe(&self) -> String {
        let mut out = format!(
            "Sluice stack: local processes, logs and configurations in {}\n",
            self.dir.display()
        );
        for (name, envoy) in ENVOY_NAMES.iter().zip(&self.envoys) {
            out.push_str(&format!(
                "  {name:<13} http://{}   admin http://{}\n",
                envoy.addr(),
                envoy.admin_addr()
            ));
        }
        let store = match &self.redis {
            None => "counters in memory".to_owned(),
            Some((_, port)) => format!("counters in redis-server 127.0.0.1:{port} (appendonly)"),
        };
        out.push_str(&format!(
            "  {:<13} {} (gRPC), {store}; admin API http://{} (token in {})\n",
            "quota server",
            self.quota_addr,
            self.admin_addr,
            self.dir.join("admin-token").display()
        ));
        let u = &self.upstream_addrs;
        out.push_str(&format!(
            "  {:<13} http {}, grpc {}, ws {}\n",
            "upstreams", u.http, u.grpc, u.ws
        ));
        let modes: BTreeSet<String> = files::sync_modes(&self.filter)
            .unwrap_or_default()
            .into_values()
            .collect();
        out.push_str(&format!(
            "  {:<13} envoy/stack/filter.json (sync mode {}), limits in envoy/stack/sluice.yaml\n",
            "rules",
            modes.into_iter().collect::<Vec<_>>().join(", ")
        ));
        out
    }

    /// Its processes, this one first (it stops the others when it gets
    /// SIGTERM), for the state file.
    pub fn state(&self) -> Result<StackState> {
        let mut processes = vec![Recorded::of("stack", std::process::id())?];
        if let Some((redis, _)) = &self.redis {
            processes.push(record(&redis.name, redis.pid())?);
        }
        processes.push(record(&self.quota.name, self.quota.pid())?);
        processes.push(record(&self.upstreams.name, self.upstreams.pid())?);
        for (name, envoy) in ENVOY_NAMES.iter().zip(&self.envoys) {
            processes.push(record(name, envoy.pid())?);
        }
        Ok(StackState {
            processes,
            envoys: self.envoys.iter().map(Envoy::addr).collect(),
            description: self.describe(),
        })
    }
}

/// A bearer token for the stack's admin API: 128 bits from the OS.
fn admin_token() -> Result<String> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .context("reading /dev/urandom for the admin token")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn record(name: &str, pid: Option<u32>) -> Result<Recorded> {
    Recorded::of(name, pid.ok_or_else(|| anyhow!("{name} is not running"))?)
}

/// A `redis-server` on a free loopback port with `appendonly yes`, its
/// data under `<dir>/redis`.
async fn start_redis(dir: &Path) -> Result<(Child, u16)> {
    let port = free_port()?;
    let data = dir.join("redis");
    std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
    let mut command = Command::new("redis-server");
    command
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--appendonly", "yes", "--save", ""])
        .arg("--dir")
        .arg(&data);
    let mut redis =
        Child::spawn("redis", command, dir).context("starting redis-server (run `make setup`)")?;
    redis
        .wait_for(READY_WITHIN, |_| {
            TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ())
        })
        .await?;
    Ok((redis, port))
}

/// Stops the processes recorded in `dir`'s state file and removes it;
/// returns the state it read (`None`: no stack there).
pub fn down(dir: &Path) -> Result<Option<StackState>> {
    let Some(state) = StackState::read(dir)? else {
        return Ok(None);
    };
    super::state::stop(&state.processes, Duration::from_secs(10))?;
    let path = super::state::state_path(dir);
    std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    Ok(Some(state))
}
