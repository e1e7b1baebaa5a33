//! Fleets for synced rules: several real Envoys whose synced rules share
//! limits through quota servers (`sluice serve`), for the fleet and fault
//! tests. The sync mode is a parameter ([`SyncMode`]), so each mode's tests
//! build on the same helpers.
//!
//! - `rules`: [`SyncMode`], filter rules, the quota server's configuration;
//! - `traffic`: bounded bursts and background traffic;
//! - here: [`Fleet`] (the Envoys, their summed stats, the health of their
//!   filter VMs) and [`start_quota_server`].

mod rules;
mod traffic;

use std::cell::Cell;
use std::ops::Sub;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use serde_json::Value;
use sluice_quota_server::launcher::{Launcher, QuotaServer};

pub use rules::{
    local_rule, quota_server_config, synced_rule, Domain, OnFailure, Storage, StorageFailure,
    SyncMode, LEASE_INTERVAL,
};
pub use traffic::{burst, count, Sent, Traffic};

use crate::client::Client;
use crate::envoy::Envoy;
use crate::{sluice_binary, wait};

/// Requests per worker [`Fleet::check_local_rule_on_every_worker`] may send
/// before concluding that some worker gets none.
const PROBES_PER_WORKER: usize = 20;

/// `sluice serve` (the debug build, or `SLUICE_BIN`) on configuration
/// `text` (see [`quota_server_config`]); killed when dropped.
pub fn start_quota_server(text: &str) -> Result<QuotaServer> {
    Ok(Launcher::new(sluice_binary()?).start_text(text)?)
}

/// Envoys sharing one filter configuration; stopped when dropped.
pub struct Fleet {
    envoys: Vec<Envoy>,
    workers: u32,
}

impl Fleet {
    /// Starts `size` Envoys of `workers` workers each for test `test`, with
    /// the Sluice filter configured by `config`, routing to the upstream on
    /// `upstream`; Envoy `i` calls the quota server on
    /// `quota_ports[i % quota_ports.len()]` (replicas split the fleet), and
    /// runs the sync service if `mode` needs it.
    pub async fn start(
        test: &str,
        upstream: u16,
        quota_ports: &[u16],
        size: usize,
        workers: u32,
        mode: SyncMode,
        config: &Value,
    ) -> Result<Fleet> {
        if quota_ports.is_empty() {
            bail!("a fleet needs at least one quota server port");
        }
        let starts = (0..size).map(|i| {
            Envoy::builder(test)
                .instance(&format!("envoy{i}"))
                .upstream(upstream)
                .concurrency(workers)
                .quota_server(quota_ports[i % quota_ports.len()])
                .sluice(config)
                .sync_service(mode.needs_sync_service())
                .start()
        });
        let envoys = futures_util::future::try_join_all(starts).await?;
        Ok(Fleet { envoys, workers })
    }

    /// The Envoys, in start order.
    pub fn envoys(&self) -> &[Envoy] {
        &self.envoys
    }

    /// A client per Envoy, in start order.
    pub fn clients(&self) -> Vec<Client> {
        self.envoys.iter().map(Envoy::client).collect()
    }

    /// A counter or gauge summed over the fleet (0 where absent).
    pub async fn stat_sum(&self, name: &str) -> Result<u64> {
        let mut total = 0;
        for envoy in &self.envoys {
            total += envoy.stat(name).await?.unwrap_or(0);
        }
        Ok(total)
    }

    /// The fleet's quota server calls for synced rule `rule` once earlier
    /// traffic's have all reached Envoy: the first reading that stays the
    /// same for [`QUIET`] (three of the filter's 100 ms ticks, each of which
    /// flushes the counts waiting in a VM), within 5 s.
    pub async fn sync_outcomes_settled(&self, rule: &str) -> Result<SyncOutcomes> {
        let last = Cell::new((self.sync_outcomes(rule).await?, Instant::now()));
        let settled = wait::until(
            &format!("{rule}: calls counted"),
            Duration::from_secs(5),
            || async {
                let now = self
                    .sync_outcomes(rule)
                    .await
                    .map_err(|e| format!("{e:#}"))?;
                if now != last.get().0 {
                    last.set((now, Instant::now()));
                }
                if last.get().1.elapsed() >= QUIET {
                    Ok(now)
                } else {
                    Err(format!("{now:?}"))
                }
            },
        )
        .await;
        match settled {
            Ok(calls) => Ok(calls),
            Err(_) => self.sync_outcomes(rule).await,
        }
    }

    /// The fleet's quota server calls for synced rule `rule` since `before`,
    /// once they number `expected`, else as they stand after 5 s: outcome
    /// counters reach Envoy in batches, within a tick of the calls.
    pub async fn sync_outcomes_since(
        &self,
        rule: &str,
        before: SyncOutcomes,
        expected: u64,
    ) -> Result<SyncOutcomes> {
        let settled = wait::until(
            &format!("{rule}: {expected} calls"),
            Duration::from_secs(5),
            || async {
                match self.sync_outcomes(rule).await {
                    Ok(now) if (now - before).total() == expected => Ok(now - before),
                    Ok(now) => Err(format!("{:?}", now - before)),
                    Err(e) => Err(format!("{e:#}")),
                }
            },
        )
        .await;
        match settled {
            Ok(calls) => Ok(calls),
            Err(_) => Ok(self.sync_outcomes(rule).await? - before),
        }
    }

    /// Requests the fleet admitted under rule `rule` (its `allowed` outcome).
    pub async fn allowed(&self, rule: &str) -> Result<u64> {
        self.stat_sum(&format!(
            "wasmcustom.sluice_http.rule.{rule}.outcome.allowed"
        ))
        .await
    }

    /// The fleet's quota server calls for synced rule `rule`, by outcome.
    pub async fn sync_outcomes(&self, rule: &str) -> Result<SyncOutcomes> {
        let outcome = |name: &str| format!("wasmcustom.sluice_sync.rule.{rule}.outcome.{name}");
        Ok(SyncOutcomes {
            ok: self.stat_sum(&outcome("ok")).await?,
            failed_open: self.stat_sum(&outcome("failed_open")).await?,
            failed_closed: self.stat_sum(&outcome("failed_closed")).await?,
            timeout: self.stat_sum(&outcome("timeout")).await?,
        })
    }

    /// Errors unless every Envoy still runs all its filter VMs: none failed
    /// and was reloaded (`wasm.sluice.vm_reload`; a failed VM answers 503
    /// until then), and one per worker plus the main thread's two are
    /// active (the sync service shares the main thread's filter VM).
    pub async fn check_vms(&self) -> Result<()> {
        for (i, envoy) in self.envoys.iter().enumerate() {
            let reloads = envoy.stat("wasm.sluice.vm_reload").await?.unwrap_or(0);
            let active = envoy
                .stat("wasm.envoy.wasm.runtime.v8.active")
                .await?
                .ok_or_else(|| anyhow!("Envoy {i}: no wasm.envoy.wasm.runtime.v8.active"))?;
            let expected = u64::from(self.workers) + 2;
            if reloads != 0 || active != expected {
                bail!(
                    "Envoy {i}: {reloads} filter VM reload(s), {active} VMs active \
                     (expected none and {expected})"
                );
            }
        }
        Ok(())
    }

    /// Errors unless local rule `path` still works on every worker of every
    /// Envoy: sends GETs of `path`, one fresh connection each, until each
    /// worker accepted one, all of them answered 200 with the rule's
    /// `ratelimit-policy` (the filter decided them; a worker whose VM
    /// failed answers 503).
    pub async fn check_local_rule_on_every_worker(&self, path: &str) -> Result<()> {
        for (i, envoy) in self.envoys.iter().enumerate() {
            let before = envoy.worker_connections().await?;
            let client = envoy.client();
            let mut sent = 0;
            loop {
                let reply = client.get(path).await?;
                if reply.status != 200 || reply.header("ratelimit-policy").is_none() {
                    bail!(
                        "Envoy {i}, local rule {path}: status {}\n{}{}",
                        reply.status,
                        reply.headers_text(),
                        reply.text()
                    );
                }
                sent += 1;
                let now = envoy.worker_connections().await?;
                if now.iter().zip(&before).all(|(now, before)| now > before) {
                    break;
                }
                if sent >= PROBES_PER_WORKER * self.workers as usize {
                    bail!("Envoy {i}: {sent} connections never reached every worker: {now:?} after {before:?}");
                }
            }
        }
        Ok(())
    }
}

/// How long sync outcome counters must stay unchanged to count as settled.
const QUIET: Duration = Duration::from_millis(300);

/// Quota server calls of one synced rule, by the filter's sync outcome.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncOutcomes {
    /// The quota server answered.
    pub ok: u64,
    /// The call failed; the rule let the request through (or applied its
    /// fallback).
    pub failed_open: u64,
    /// The call failed; the rule refused the request.
    pub failed_closed: u64,
    /// No answer within the rule's timeout; its failure mode applied.
    pub timeout: u64,
}

impl SyncOutcomes {
    /// Every call, whatever its outcome: one per request the rule matched.
    pub fn total(&self) -> u64 {
        self.ok + self.failed_open + self.failed_closed + self.timeout
    }
}

impl Sub for SyncOutcomes {
    type Output = SyncOutcomes;

    /// The calls made between two readings (`later - earlier`).
    fn sub(self, earlier: SyncOutcomes) -> SyncOutcomes {
        SyncOutcomes {
            ok: self.ok.saturating_sub(earlier.ok),
            failed_open: self.failed_open.saturating_sub(earlier.failed_open),
            failed_closed: self.failed_closed.saturating_sub(earlier.failed_closed),
            timeout: self.timeout.saturating_sub(earlier.timeout),
        }
    }
}
