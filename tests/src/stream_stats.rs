//! The filter's gRPC and WebSocket stats (README.md, "Metrics"):
//! `sluice_<protocol>.rule.<rule>.outcome.<outcome>` counters and the
//! per-rule gauges of open calls and connections.

use std::time::Duration;

use anyhow::Result;

use crate::envoy::{prometheus_value, Envoy};
use crate::wait;

/// Which family of stats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    WebSocket,
}

impl Protocol {
    /// The stats' prefix, as in Prometheus (`sluice_grpc`, `sluice_websocket`).
    pub fn prefix(self) -> &'static str {
        match self {
            Self::Grpc => "sluice_grpc",
            Self::WebSocket => "sluice_websocket",
        }
    }

    /// The gauge of open calls or connections (`in_flight`, `connections`).
    pub fn gauge(self) -> &'static str {
        match self {
            Self::Grpc => "in_flight",
            Self::WebSocket => "connections",
        }
    }
}

/// The counter of `outcome` for `rule` (0 if the filter never defined
/// it) once it reads `expected` (see [`Envoy::stat_settled`]).
pub async fn outcome_settled(
    envoy: &Envoy,
    protocol: Protocol,
    rule: &str,
    outcome: &str,
    expected: u64,
) -> Result<u64> {
    let name = format!(
        "wasmcustom.{}.rule.{rule}.outcome.{outcome}",
        protocol.prefix()
    );
    envoy.stat_settled(&name, expected).await
}

/// The open calls or connections gauge of `rule` (`None` if undefined).
pub async fn gauge(envoy: &Envoy, protocol: Protocol, rule: &str) -> Result<Option<u64>> {
    let name = format!(
        "wasmcustom.{}.rule.{rule}.{}",
        protocol.prefix(),
        protocol.gauge()
    );
    envoy.stat(&name).await
}

/// Waits (up to 10 s) until `rule`'s gauge reads `expected`: releases happen
/// when Envoy finishes a stream, shortly after the client sees its end, and
/// the filter's gauge moves reach Envoy in batches, within about a second.
pub async fn wait_gauge(
    envoy: &Envoy,
    protocol: Protocol,
    rule: &str,
    expected: u64,
) -> Result<()> {
    let what = format!(
        "{}.rule.{rule}.{} == {expected}",
        protocol.prefix(),
        protocol.gauge()
    );
    wait::until(&what, Duration::from_secs(10), || async {
        match gauge(envoy, protocol, rule).await {
            Ok(Some(v)) if v == expected => Ok(()),
            Ok(other) => Err(format!("{other:?}")),
            Err(e) => Err(format!("{e:#}")),
        }
    })
    .await
}

/// Waits (up to 10 s) until `rule`'s gauge reads `expected` in
/// `/stats/prometheus`, by its Prometheus name and `rule` label
/// (`sluice_grpc_in_flight{rule="..."}`), as [`wait_gauge`] waits in `/stats`.
pub async fn wait_prometheus_gauge(
    envoy: &Envoy,
    protocol: Protocol,
    rule: &str,
    expected: u64,
) -> Result<()> {
    let name = format!("{}_{}", protocol.prefix(), protocol.gauge());
    let what = format!("{name}{{rule=\"{rule}\"}} == {expected} in /stats/prometheus");
    wait::until(&what, Duration::from_secs(10), || async {
        match envoy.prometheus().await {
            Ok(text) => match prometheus_value(&text, &name, &[("rule", rule)]) {
                Some(v) if v == expected as f64 => Ok(()),
                other => Err(format!("{other:?}")),
            },
            Err(e) => Err(format!("{e:#}")),
        }
    })
    .await
}
