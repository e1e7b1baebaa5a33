//! The real Envoy, configured from `envoy/sluice-http.template.yaml`.
//!
//! ```no_run
//! # async fn f() -> anyhow::Result<()> {
//! use sluice_e2e::{envoy::Envoy, upstream::Upstream};
//! let upstream = Upstream::start().await?;
//! let envoy = Envoy::builder("my_test")
//!     .upstream(upstream.port())
//!     .sluice(&serde_json::json!({"rules": []}))
//!     .start()
//!     .await?;
//! let reply = envoy.client().get("/").await?;
//! # Ok(()) }
//! ```
//!
//! Envoy binds port 0 for its listener and admin (the ports are read back from
//! `--admin-address-path` and the admin `/listeners` endpoint, so parallel
//! tests never race for a port) and uses `--use-dynamic-base-id`. Its files
//! (config, log, stdout, stderr) go to `<repo>/.e2e-logs/<test>/<instance>.*`
//! and are removed when the [`Envoy`] is dropped, unless the thread is
//! panicking (a failing test) or `SLUICE_KEEP_LOGS=1`; then their path and the
//! log's tail are printed.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::Value;

use crate::client::Client;
use crate::template::{self, Vars};
use crate::{envoy_binary, repo_root, wasm_path};

/// How long Envoy may take to become ready (or to exit, when a failure is
/// expected) by default. Compiling the filter with V8 takes a while when
/// tests run in parallel on a small machine.
pub const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(60);

/// What to put into the template.
#[derive(Debug, Clone)]
pub struct ConfigParams {
    /// 0 = any free port.
    pub admin_port: u16,
    /// 0 = any free port.
    pub listen_port: u16,
    pub upstream_port: u16,
    /// The filter module as written into the config (absolute or relative to
    /// Envoy's working directory).
    pub wasm_path: String,
    /// The plugin JSON; `None` leaves the Sluice filter out.
    pub plugin_config: Option<String>,
    /// Adds Envoy's native local_ratelimit filter (huge bucket).
    pub native_local_ratelimit: bool,
    /// One access log line per request on stdout.
    pub access_log: bool,
}

impl ConfigParams {
    /// Renders the template, with `header` (comment lines) on top.
    pub fn render(&self, header: &str) -> Result<String> {
        self.render_with(&template::load_template()?, Vars::new(), header)
    }

    /// Renders another template with these parameters plus `extra`'s
    /// variables and sections.
    pub fn render_with(&self, template: &str, extra: Vars, header: &str) -> Result<String> {
        let vars = extra
            .set("ADMIN_PORT", self.admin_port.to_string())
            .set("LISTEN_PORT", self.listen_port.to_string())
            .set("UPSTREAM_PORT", self.upstream_port.to_string())
            .set("WASM_PATH", template::yaml_quote(&self.wasm_path))
            .set(
                "PLUGIN_CONFIG",
                self.plugin_config.clone().unwrap_or_default(),
            )
            .section_if("sluice", self.plugin_config.is_some())
            .section_if("native_local_ratelimit", self.native_local_ratelimit)
            .section_if("access_log", self.access_log);
        template::render(template, &vars, header)
    }
}

/// Pretty JSON for the plugin configuration (readable in rendered configs).
pub fn plugin_json(config: &Value) -> String {
    serde_json::to_string_pretty(config).unwrap_or_else(|_| config.to_string())
}

/// Configures and starts an [`Envoy`].
#[derive(Debug, Clone)]
pub struct EnvoyBuilder {
    test_name: String,
    instance: String,
    params: ConfigParams,
    wasm_override: Option<PathBuf>,
    concurrency: u32,
    log_level: String,
    start_timeout: Duration,
    cpus: Option<Vec<usize>>,
    /// Another template (path relative to the repository) and its own variables.
    custom: Option<(PathBuf, Vars)>,
}

impl EnvoyBuilder {
    /// Renders `path` (relative to the repository) instead of the Sluice
    /// template, with the usual parameters plus `extra`.
    pub fn template(mut self, path: &str, extra: Vars) -> Self {
        self.custom = Some((PathBuf::from(path), extra));
        self
    }

    /// Pins Envoy (all its threads) to these CPUs (benchmarks).
    pub fn cpu_affinity(mut self, cpus: &[usize]) -> Self {
        self.cpus = Some(cpus.to_vec());
        self
    }

    /// Name of the files under `.e2e-logs/<test>/` (default `envoy`); set it
    /// when one test runs several Envoys.
    pub fn instance(mut self, name: &str) -> Self {
        self.instance = sanitize(name);
        self
    }

    /// The upstream port for the `/` route.
    pub fn upstream(mut self, port: u16) -> Self {
        self.params.upstream_port = port;
        self
    }

    /// Adds the Sluice filter with this plugin configuration.
    pub fn sluice(mut self, config: &Value) -> Self {
        self.params.plugin_config = Some(plugin_json(config));
        self
    }

    /// Adds the Sluice filter with this configuration text, as it is (for
    /// invalid configurations).
    pub fn sluice_raw(mut self, config: &str) -> Self {
        self.params.plugin_config = Some(config.to_owned());
        self
    }

    /// Uses this module instead of [`wasm_path`]'s.
    pub fn wasm(mut self, path: &Path) -> Self {
        self.wasm_override = Some(path.to_path_buf());
        self
    }

    /// Adds Envoy's native local_ratelimit filter (a benchmark baseline).
    pub fn native_local_ratelimit(mut self, on: bool) -> Self {
        self.params.native_local_ratelimit = on;
        self
    }

    /// The stdout access log (on by default; off for benchmarks).
    pub fn access_log(mut self, on: bool) -> Self {
        self.params.access_log = on;
        self
    }

    /// Worker threads (`--concurrency`, default 1).
    pub fn concurrency(mut self, workers: u32) -> Self {
        self.concurrency = workers.max(1);
        self
    }

    /// Fixed listener port (default 0: any free port).
    pub fn listen_port(mut self, port: u16) -> Self {
        self.params.listen_port = port;
        self
    }

    /// Fixed admin port (default 0: any free port).
    pub fn admin_port(mut self, port: u16) -> Self {
        self.params.admin_port = port;
        self
    }

    /// Envoy's log level (default `info`).
    pub fn log_level(mut self, level: &str) -> Self {
        self.log_level = level.to_owned();
        self
    }

    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.start_timeout = timeout;
        self
    }

    /// The rendered configuration (resolving the wasm path).
    pub fn render(&self) -> Result<String> {
        let mut params = self.params.clone();
        if params.plugin_config.is_some() {
            let wasm = match &self.wasm_override {
                Some(path) => path.clone(),
                None => wasm_path()?,
            };
            params.wasm_path = wasm.display().to_string();
        }
        let header = format!(
            "# Rendered by the sluice-e2e harness for test `{}` ({}).",
            self.test_name, self.instance
        );
        match &self.custom {
            Some((path, extra)) => {
                let path = repo_root().join(path);
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?;
                params.render_with(&text, extra.clone(), &header)
            }
            None => params.render(&header),
        }
    }

    /// Starts Envoy and waits until its admin `/ready` says LIVE and its
    /// listener is bound.
    pub async fn start(self) -> Result<Envoy> {
        let deadline = Instant::now() + self.start_timeout;
        let (mut process, files) = self.spawn()?;
        let mut files = files;
        let admin = match wait_for_admin_address(&mut process, &files, deadline).await {
            Ok(admin) => admin,
            Err(e) => {
                files.keep = true;
                return Err(e.context(files.describe()));
            }
        };
        let envoy = Envoy {
            process: Some(process),
            admin,
            listener: admin, // replaced below
            files,
            concurrency: self.concurrency,
        };
        envoy.finish_start(deadline).await
    }

    /// Starts Envoy expecting it to refuse its configuration and exit
    /// non-zero; returns its exit status and logs. Errors if it becomes ready
    /// or is still running at the timeout.
    pub async fn start_expect_failure(self) -> Result<EnvoyFailure> {
        let deadline = Instant::now() + self.start_timeout;
        let (mut process, mut files) = self.spawn()?;
        loop {
            if let Some(status) = process.try_wait()? {
                let log = files.read_all();
                return Ok(EnvoyFailure { status, log, files });
            }
            if let Ok(admin) = read_admin_address(&files.admin_address) {
                if matches!(admin_ready(admin).await, Ok(true)) {
                    terminate(&mut process);
                    files.keep = true;
                    bail!(
                        "Envoy became ready although its configuration should have been refused\n{}",
                        files.describe()
                    );
                }
            }
            if Instant::now() >= deadline {
                terminate(&mut process);
                files.keep = true;
                bail!(
                    "Envoy neither exited nor became ready within {:?}\n{}",
                    self.start_timeout,
                    files.describe()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn spawn(&self) -> Result<(Child, LogFiles)> {
        let binary = envoy_binary()?;
        let config = self.render()?;
        let files = LogFiles::create(&self.test_name, &self.instance)?;
        std::fs::write(&files.config, &config)
            .with_context(|| format!("writing {}", files.config.display()))?;
        let stdout = File::create(&files.stdout)?;
        let stderr = File::create(&files.stderr)?;
        let mut command = Command::new(&binary);
        die_with_parent(&mut command);
        if let Some(cpus) = &self.cpus {
            pin_to_cpus(&mut command, cpus);
        }
        let child = command
            .arg("-c")
            .arg(&files.config)
            .arg("--concurrency")
            .arg(self.concurrency.to_string())
            .arg("--use-dynamic-base-id")
            .arg("--base-id-path")
            .arg(&files.base_id)
            .arg("--admin-address-path")
            .arg(&files.admin_address)
            .arg("--log-path")
            .arg(&files.log)
            .arg("--file-flush-interval-msec")
            .arg("100")
            .arg("-l")
            .arg(&self.log_level)
            .current_dir(repo_root())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        Ok((child, files))
    }
}

/// A running Envoy; terminated (SIGTERM, then SIGKILL) when dropped.
pub struct Envoy {
    process: Option<Child>,
    admin: SocketAddr,
    listener: SocketAddr,
    files: LogFiles,
    concurrency: u32,
}

impl Envoy {
    /// A builder for test `test_name` (names the log directory).
    pub fn builder(test_name: &str) -> EnvoyBuilder {
        EnvoyBuilder {
            test_name: sanitize(test_name),
            instance: "envoy".to_owned(),
            params: ConfigParams {
                admin_port: 0,
                listen_port: 0,
                upstream_port: 9,
                wasm_path: String::new(),
                plugin_config: None,
                native_local_ratelimit: false,
                access_log: true,
            },
            wasm_override: None,
            concurrency: 1,
            log_level: "info".to_owned(),
            start_timeout: DEFAULT_START_TIMEOUT,
            cpus: None,
            custom: None,
        }
    }

    async fn finish_start(mut self, deadline: Instant) -> Result<Self> {
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

    /// GET on the admin endpoint; errors unless it answers 200.
    pub async fn admin_get(&self, path: &str) -> Result<String> {
        let reply = Client::new(self.admin).get(path).await?;
        if reply.status != 200 {
            bail!("admin {path}: status {}: {}", reply.status, reply.text());
        }
        Ok(reply.text())
    }

    /// `/stats?format=json`.
    pub async fn stats_json(&self) -> Result<Value> {
        let text = self.admin_get("/stats?format=json").await?;
        serde_json::from_str(&text).context("admin /stats?format=json is not JSON")
    }

    /// One counter or gauge from `/stats?format=json` by its full name
    /// (custom wasm metrics are named `wasmcustom.<name>`); `None` if absent.
    pub async fn stat(&self, name: &str) -> Result<Option<u64>> {
        let stats = self.stats_json().await?;
        Ok(find_stat(&stats, name))
    }

    /// The Sluice counter `sluice_http.rule.<rule>.outcome.<outcome>` (0 if
    /// the filter never defined it).
    pub async fn sluice_counter(&self, rule: &str, outcome: &str) -> Result<u64> {
        Ok(self
            .stat(&format!(
                "wasmcustom.sluice_http.rule.{rule}.outcome.{outcome}"
            ))
            .await?
            .unwrap_or(0))
    }

    /// Connections accepted by each worker on the HTTP listener (from
    /// `listener.<configured address>.worker_<n>.downstream_cx_total`).
    pub async fn worker_connections(&self) -> Result<Vec<u64>> {
        let stats = self.stats_json().await?;
        let mut per_worker = vec![0; self.concurrency as usize];
        let entries = stats
            .get("stats")
            .and_then(Value::as_array)
            .ok_or_else(|| anyhow!("admin /stats: no stats array"))?;
        for entry in entries {
            let Some(name) = entry.get("name").and_then(Value::as_str) else {
                continue;
            };
            let Some(rest) = name
                .strip_prefix("listener.127.0.0.1_")
                .and_then(|r| r.strip_suffix(".downstream_cx_total"))
            else {
                continue;
            };
            let Some((_, worker)) = rest.split_once(".worker_") else {
                continue;
            };
            if let (Ok(i), Some(v)) = (worker.parse::<usize>(), entry["value"].as_u64()) {
                if let Some(slot) = per_worker.get_mut(i) {
                    *slot += v;
                }
            }
        }
        Ok(per_worker)
    }

    /// `/stats/prometheus`.
    pub async fn prometheus(&self) -> Result<String> {
        self.admin_get("/stats/prometheus").await
    }

    /// The port of listener `name`, from the admin `/listeners?format=json`.
    pub async fn listener_address(&self, name: &str) -> Result<SocketAddr> {
        let text = self.admin_get("/listeners?format=json").await?;
        let json: Value = serde_json::from_str(&text).context("admin /listeners is not JSON")?;
        let statuses = json
            .get("listener_statuses")
            .and_then(Value::as_array)
            .ok_or_else(|| anyhow!("admin /listeners: no listener_statuses in {text}"))?;
        for status in statuses {
            if status.get("name").and_then(Value::as_str) != Some(name) {
                continue;
            }
            let socket = &status["local_address"]["socket_address"];
            let address = socket["address"].as_str().unwrap_or("127.0.0.1");
            let port = socket["port_value"]
                .as_u64()
                .ok_or_else(|| anyhow!("listener {name} has no port in {text}"))?;
            return format!("{address}:{port}")
                .parse()
                .with_context(|| format!("listener {name}: bad address in {text}"));
        }
        bail!("no listener `{name}` in admin /listeners: {text}")
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
    files: LogFiles,
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

/// The value of `name{labels}` in Prometheus text (labels compared as a set);
/// `None` if there is no such sample.
pub fn prometheus_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (metric, got_labels) = match series.split_once('{') {
            Some((metric, rest)) => (metric, parse_labels(rest.strip_suffix('}')?)),
            None => (series, Vec::new()),
        };
        if metric != name || got_labels.len() != labels.len() {
            continue;
        }
        if labels
            .iter()
            .all(|(k, v)| got_labels.iter().any(|(gk, gv)| gk == k && gv == v))
        {
            return value.trim().parse().ok();
        }
    }
    None
}

fn parse_labels(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, escaped)) = chars.next() {
                        value.push(if escaped == 'n' { '\n' } else { escaped });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        out.push((key.trim_start_matches(',').trim().to_owned(), value));
        rest = &after[end..];
    }
    out
}

/// Finds a stat by name in `/stats?format=json`.
pub fn find_stat(stats: &Value, name: &str) -> Option<u64> {
    stats
        .get("stats")?
        .as_array()?
        .iter()
        .find(|s| s.get("name").and_then(Value::as_str) == Some(name))?
        .get("value")?
        .as_u64()
}

/// Asks the kernel to SIGTERM the child when the thread that started it
/// ends, so a test binary killed mid-run (timeout, Ctrl-C) leaves no Envoy
/// behind. The harness starts Envoy from the thread that owns it (the test's
/// thread, or `block_on`'s), which outlives it.
fn die_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Makes the process `command` starts run on `cpus` only (threads inherit
/// it). CPUs that do not exist are ignored; an empty set leaves it as is.
pub fn pin_to_cpus(command: &mut Command, cpus: &[usize]) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let mut any = false;
    for &cpu in cpus {
        if cpu < libc::CPU_SETSIZE as usize {
            // SAFETY: cpu is below CPU_SETSIZE.
            unsafe { libc::CPU_SET(cpu, &mut set) };
            any = true;
        }
    }
    if !any {
        return;
    }
    // SAFETY: the closure only makes the async-signal-safe
    // sched_setaffinity system call on a set built before fork.
    unsafe {
        command.pre_exec(move || {
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A process's CPU time (user + system) from `/proc/<pid>/stat`.
pub fn process_cpu_time(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which is in parentheses).
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| anyhow!("unexpected /proc/{pid}/stat"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5); `after` starts at field 3.
    let ticks = |i: usize| -> Result<u64> {
        fields
            .get(i - 3)
            .ok_or_else(|| anyhow!("short /proc/{pid}/stat"))?
            .parse::<u64>()
            .context("parsing /proc stat")
    };
    let total = ticks(14)? + ticks(15)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as u64 } else { 100 };
    Ok(Duration::from_nanos(
        total.saturating_mul(1_000_000_000) / hz,
    ))
}

async fn wait_for_admin_address(
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

fn read_admin_address(path: &Path) -> Result<SocketAddr> {
    let text = std::fs::read_to_string(path)?;
    let text = text.trim();
    if text.is_empty() {
        bail!("empty admin address file");
    }
    text.parse()
        .with_context(|| format!("bad admin address {text:?}"))
}

async fn admin_ready(admin: SocketAddr) -> Result<bool> {
    let reply = Client::new(admin).get("/ready").await?;
    Ok(reply.status == 200 && reply.text().trim() == "LIVE")
}

/// SIGTERM, up to 5 s for a clean exit (which flushes the log), then SIGKILL.
fn terminate(process: &mut Child) {
    if matches!(process.try_wait(), Ok(Some(_))) {
        return;
    }
    if let Ok(pid) = libc::pid_t::try_from(process.id()) {
        // SAFETY: plain kill(2) on our own child's pid, which has not been
        // reaped yet (try_wait above returned None), so it is not reused.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if matches!(process.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = process.kill();
    let _ = process.wait();
}

/// One Envoy's files under `.e2e-logs/<test>/`.
struct LogFiles {
    dir: PathBuf,
    config: PathBuf,
    log: PathBuf,
    stdout: PathBuf,
    stderr: PathBuf,
    admin_address: PathBuf,
    base_id: PathBuf,
    keep: bool,
}

impl LogFiles {
    fn create(test_name: &str, instance: &str) -> Result<Self> {
        let dir = repo_root().join(".e2e-logs").join(test_name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let files = Self {
            config: dir.join(format!("{instance}.yaml")),
            log: dir.join(format!("{instance}.log")),
            stdout: dir.join(format!("{instance}.stdout")),
            stderr: dir.join(format!("{instance}.stderr")),
            admin_address: dir.join(format!("{instance}.admin-address")),
            base_id: dir.join(format!("{instance}.base-id")),
            dir,
            keep: std::env::var("SLUICE_KEEP_LOGS").is_ok_and(|v| v == "1"),
        };
        // Leftovers of an earlier failed run.
        files.remove();
        Ok(files)
    }

    fn all(&self) -> [&Path; 6] {
        [
            &self.config,
            &self.log,
            &self.stdout,
            &self.stderr,
            &self.admin_address,
            &self.base_id,
        ]
    }

    fn remove(&self) {
        for path in self.all() {
            let _ = std::fs::remove_file(path);
        }
    }

    fn read_all(&self) -> String {
        let mut out = String::new();
        for (label, path) in [
            ("log", &self.log),
            ("stderr", &self.stderr),
            ("stdout", &self.stdout),
        ] {
            if let Ok(text) = std::fs::read_to_string(path) {
                if !text.is_empty() {
                    out.push_str(&format!("==> {label} ({}) <==\n", path.display()));
                    out.push_str(&text);
                    if !text.ends_with('\n') {
                        out.push('\n');
                    }
                }
            }
        }
        out
    }

    /// The log directory and the last lines of the log (for error messages).
    fn describe(&self) -> String {
        let all = self.read_all();
        // Envoy's start-up banner (extension lists, header maps) is noise.
        let lines: Vec<&str> = all
            .lines()
            .filter(|l| !(l.contains("][info][main] [source/server/server.cc:")))
            .collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        format!(
            "Envoy files: {}\n--- last lines of Envoy's output ---\n{tail}",
            self.dir.display()
        )
    }
}

impl Drop for LogFiles {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.describe());
            return;
        }
        if self.keep {
            eprintln!("Envoy files kept in {}", self.dir.display());
            return;
        }
        self.remove();
        // Only succeeds when no other instance left files there.
        let _ = std::fs::remove_dir(&self.dir);
        if let Some(parent) = self.dir.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

fn sanitize(name: &str) -> String {
    let cleaned: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let cleaned = cleaned.trim_matches('.').to_owned();
    if cleaned.is_empty() {
        "unnamed".to_owned()
    } else {
        cleaned
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_parsing() {
        let text = "# TYPE sluice_http counter\n\
                    sluice_http{rule=\"per-ip\",outcome=\"allowed\"} 3\n\
                    sluice_http{rule=\"per-ip\",outcome=\"limited\"} 6\n\
                    sluice_http_errors{} 12\n";
        assert_eq!(
            prometheus_value(
                text,
                "sluice_http",
                &[("outcome", "limited"), ("rule", "per-ip")]
            ),
            Some(6.0)
        );
        assert_eq!(
            prometheus_value(text, "sluice_http_errors", &[]),
            Some(12.0)
        );
        assert_eq!(
            prometheus_value(text, "sluice_http", &[("rule", "per-ip")]),
            None
        );
    }

    #[test]
    fn names_are_sanitized() {
        assert_eq!(sanitize("a/b c"), "a_b_c");
        assert_eq!(sanitize(".."), "unnamed");
    }
}
