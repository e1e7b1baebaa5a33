//! [`EnvoyBuilder`]: chooses the configuration, renders it, starts Envoy
//! and waits for it (or for it to refuse its configuration).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use serde_json::Value;

use super::admin::{admin_ready, read_admin_address};
use super::config::{plugin_json, ConfigParams, Hosts};
use super::logs::{sanitize, LogFiles};
use super::os::{die_with_parent, pin_to_cpus, terminate};
use super::process::{wait_for_admin_address, Envoy, EnvoyFailure, DEFAULT_START_TIMEOUT};
use crate::template::Vars;
use crate::{envoy_binary, repo_root, wasm_path};

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
    /// Where Envoy's files go instead of `.e2e-logs/<test>/` (kept).
    log_dir: Option<PathBuf>,
}

impl EnvoyBuilder {
    /// Renders `path` (relative to the repository) instead of the Sluice
    /// template, with the usual parameters plus `extra`.
    pub fn template(mut self, path: &str, extra: Vars) -> Self {
        self.custom = Some((PathBuf::from(path), extra));
        self
    }

    /// Renders `envoy/ratelimit-service.template.yaml`: Envoy's native
    /// global rate limit filter calling the quota server on `quota_port`
    /// for `domain` (denying when it cannot answer if `failure_mode_deny`);
    /// with `filter` false, the same configuration without the filter.
    pub fn rate_limit_service(
        self,
        quota_port: u16,
        domain: &str,
        failure_mode_deny: bool,
        filter: bool,
    ) -> Self {
        self.template(
            "envoy/ratelimit-service.template.yaml",
            Vars::new()
                .set("QUOTA_PORT", quota_port.to_string())
                .set("DOMAIN", domain)
                .set("FAILURE_MODE_DENY", failure_mode_deny.to_string())
                .section_if("rate_limit_filter", filter),
        )
    }

    /// Writes Envoy's files (config, log, stdout, stderr) into `dir`, named
    /// after the instance, and keeps them.
    pub fn log_dir(mut self, dir: &Path) -> Self {
        self.log_dir = Some(dir.to_path_buf());
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

    /// Adds the `sluice_quota` cluster: the quota server's gRPC port on
    /// 127.0.0.1, for synced rules.
    pub fn quota_server(mut self, port: u16) -> Self {
        self.params.quota_port = Some(port);
        self
    }

    /// Adds the lease sync service (a singleton `WasmService` with the
    /// filter's plugin configuration), which rules in sync mode `leased`
    /// need.
    pub fn sync_service(mut self, on: bool) -> Self {
        self.params.sync_service = on;
        self
    }

    /// Adds JWT verification before the Sluice filter, with the issuer's
    /// keys `jwks` (JWKS JSON): see the template's section `jwt`.
    pub fn jwt(mut self, jwks: &str) -> Self {
        self.params.jwks = Some(jwks.to_owned());
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
        let files = match &self.log_dir {
            Some(dir) => LogFiles::create_in(dir, &self.instance)?,
            None => LogFiles::create(&self.test_name, &self.instance)?,
        };
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
                quota_port: None,
                hosts: Hosts::loopback(),
                sync_service: false,
                jwks: None,
            },
            wasm_override: None,
            concurrency: 1,
            log_level: "info".to_owned(),
            start_timeout: DEFAULT_START_TIMEOUT,
            cpus: None,
            custom: None,
            log_dir: None,
        }
    }
}
