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
//!
//! - `config`: the template's parameters ([`ConfigParams`]).
//! - `builder`: [`EnvoyBuilder`], which renders the config and starts Envoy.
//! - `process`: the running [`Envoy`] (ready, stopped), one that refused its
//!   configuration ([`EnvoyFailure`]), and `envoy --mode validate`.
//! - `admin`: what a running Envoy's admin endpoint tells (listeners, stats).
//! - `stats`: reading stats out of admin replies.
//! - `logs`: each Envoy's files under `.e2e-logs/`.
//! - `os`: process-level helpers (parent death signal, CPU pinning and time,
//!   termination).

mod admin;
mod builder;
mod config;
mod logs;
mod os;
mod process;
mod stats;

pub use builder::EnvoyBuilder;
pub use config::{plugin_json, ConfigParams, Hosts};
pub use os::{die_with_parent, terminate};
pub use os::{pin_this_thread, pin_to_cpus, process_cpu_time};
pub use process::{validate, Envoy, EnvoyFailure, DEFAULT_START_TIMEOUT};
pub use stats::{find_stat, prometheus_value};
