//! What a running Envoy's admin endpoint tells: readiness, listeners and
//! stats.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::Value;

use super::process::Envoy;
use super::stats::find_stat;
use crate::client::Client;
use crate::wait;

impl Envoy {
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

    /// The counter `name` (0 if absent) once it reads `expected`, else what
    /// it reads after 5 s: the filter's outcome counters reach Envoy in
    /// batches, within about a second of the requests they count.
    pub async fn stat_settled(&self, name: &str, expected: u64) -> Result<u64> {
        self.stat_when(name, &format!("== {expected}"), |v| v == expected)
            .await
    }

    /// The counter `name` (0 if absent) once `holds` (described by `what`)
    /// is true of it, else what it reads after 5 s (see
    /// [`Envoy::stat_settled`]).
    pub async fn stat_when(
        &self,
        name: &str,
        what: &str,
        holds: impl Fn(u64) -> bool,
    ) -> Result<u64> {
        let read = || async { Ok::<_, anyhow::Error>(self.stat(name).await?.unwrap_or(0)) };
        let settled = wait::until(
            &format!("{name} {what}"),
            Duration::from_secs(5),
            || async {
                match read().await {
                    Ok(v) if holds(v) => Ok(v),
                    Ok(v) => Err(v.to_string()),
                    Err(e) => Err(format!("{e:#}")),
                }
            },
        )
        .await;
        match settled {
            Ok(v) => Ok(v),
            Err(_) => read().await,
        }
    }

    /// The Sluice counter `sluice_http.rule.<rule>.outcome.<outcome>` (0 if
    /// the filter never defined it) once it reads `expected` (see
    /// [`Envoy::stat_settled`]).
    pub async fn sluice_counter_settled(
        &self,
        rule: &str,
        outcome: &str,
        expected: u64,
    ) -> Result<u64> {
        let name = format!("wasmcustom.sluice_http.rule.{rule}.outcome.{outcome}");
        self.stat_settled(&name, expected).await
    }

    /// The filter's internal failures (`sluice_http.errors`, 0 if none
    /// was ever counted): a test that expects none checks this is 0.
    pub async fn filter_errors(&self) -> Result<u64> {
        Ok(self
            .stat("wasmcustom.sluice_http.errors")
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
}

/// The admin address Envoy wrote to `path` (`--admin-address-path`).
pub(super) fn read_admin_address(path: &Path) -> Result<SocketAddr> {
    let text = std::fs::read_to_string(path)?;
    let text = text.trim();
    if text.is_empty() {
        bail!("empty admin address file");
    }
    text.parse()
        .with_context(|| format!("bad admin address {text:?}"))
}

/// Whether the admin endpoint answers `/ready` with LIVE.
pub(super) async fn admin_ready(admin: SocketAddr) -> Result<bool> {
    let reply = Client::new(admin).get("/ready").await?;
    Ok(reply.status == 200 && reply.text().trim() == "LIVE")
}
