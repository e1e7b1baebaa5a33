//! One VM's filter: its policy, its view of the shared counters, and the
//! state of the requests it is handling.
//!
//! Methods decide and return what to do ([`Step`], [`Wake`]) instead of
//! doing it: sending a local reply or resuming a request makes Envoy call
//! back into the filter at once, so the glue performs those effects only
//! after the filter has finished with its own state.
//!
//! - `access`: the quota server's access controls, before the rules.
//! - `lifecycle`: a request from its headers to its end, and the
//!   in-flight permits it keeps until then.
//! - `delay`: requests a `delay` rule makes wait, released on ticks.
//! - `cuts`: gRPC calls cut after their response started, reset on ticks
//!   unless the upstream ends them first.
//! - `exact`: requests waiting for the quota server's decision on their
//!   synced rules (sync mode `exact`, and leased keys without a lease).
//! - `leased`: requests of leased rules decided from this Envoy's leases
//!   (sync mode `leased`).
//! - `stream_judge`: gRPC and WebSocket messages decided against the
//!   stream rules.

mod access;
#[cfg(test)]
mod access_tests;
mod by_id;
#[cfg(test)]
mod charging_tests;
#[cfg(test)]
mod cost_harness;
mod cuts;
mod delay;
mod exact;
#[cfg(test)]
mod exact_tests;
#[cfg(test)]
mod host_calls_tests;
mod leased;
#[cfg(test)]
mod leased_tests;
mod lifecycle;
mod stream_judge;
#[cfg(test)]
mod tests;

use std::cell::Cell;

use sluice_core::config::{Config, ConfigError};
use sluice_core::policy::Policy;
use sluice_core::store::{SharedBytes, SlotStats, SlotStore, StoreError};

use crate::controls::Enforced;
use crate::host::Host;
use crate::http::{LocalReply, Needs};
use crate::metrics::Metrics;
use by_id::ById;

pub use delay::DELAY_TICK_MILLIS;

/// What to do with a request now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Let it through.
    Continue,
    /// Delay it; a later [`Wake`] releases it.
    Pause,
    /// Answer it with this reply (and stop it).
    Reply(LocalReply),
    /// Reset it, towards the client and the upstream.
    Reset,
}

/// What a tick does to one delayed request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Wake {
    /// Let it through now.
    Resume,
    /// Refuse it.
    Reply(LocalReply),
    /// Reset a cut gRPC call the upstream did not end in time.
    Reset,
}

/// How far deciding a request's rules got.
#[derive(Debug)]
pub(crate) enum Decided {
    /// Decided: do this now.
    Now(Wake),
    /// Held by a delay rule; a tick decides it again.
    Delayed,
    /// Waiting for the quota server; its answer decides it.
    Asking,
}

/// See the module doc.
#[derive(Debug)]
pub struct Plugin<B> {
    policy: Policy,
    store: SlotStore<B>,
    metrics: Metrics,
    needs: Needs,
    requests: ById<lifecycle::RequestState>,
    delayed: delay::DelayQueue,
    /// Requests waiting for the quota server, by call token.
    asking: ById<exact::Asking>,
    /// The last quota server call failed: further failures are not logged
    /// (one warning per outage, not one per request).
    quota_failing: bool,
    /// The store's stats already counted in metrics.
    keys_reported: SlotStats,
    cuts: cuts::CutCalls,
    /// The quota server's access controls, as this VM last took them.
    controls: Enforced,
    /// Keys of leased rules lately sent to the sync service.
    woken: leased::Woken,
    /// Scratch for lease cell names.
    lease_name: String,
    /// Scratch for rate-limit header values: responses allocate none.
    header_value: String,
    /// The tick period last asked of the host.
    tick_asked: Cell<u32>,
}

/// The policy of a plugin configuration (the filter's JSON), validated.
pub fn read_policy(config: &[u8]) -> Result<Policy, ConfigureError> {
    let text = String::from_utf8_lossy(config);
    Config::from_json(&text)
        .and_then(|c| c.validate())
        .map_err(ConfigureError::Config)
}

/// Why a configuration was refused.
#[derive(Debug)]
pub enum ConfigureError {
    /// The JSON is invalid.
    Config(ConfigError),
    /// The shared counters could not be set up.
    Store(StoreError),
}

impl std::fmt::Display for ConfigureError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigureError::Config(e) => write!(f, "invalid sluice configuration: {e}"),
            ConfigureError::Store(e) => write!(f, "cannot set up shared counters: {e}"),
        }
    }
}

impl<B: SharedBytes> Plugin<B> {
    /// Validates `config` (the plugin configuration JSON) and prepares the
    /// shared counters in `backend`.
    pub fn configure(
        host: &impl Host,
        backend: B,
        config: &[u8],
    ) -> Result<Plugin<B>, ConfigureError> {
        let policy = read_policy(config)?;
        // The key hash's seed is a random secret shared by every VM, so
        // that no client can aim keys at another's slots.
        let store = SlotStore::open(backend, &policy, || host.random_u64())
            .map_err(ConfigureError::Store)?;
        let metrics = Metrics::define(host, &policy);
        let mut plugin = Plugin {
            needs: Needs::of(&policy),
            policy,
            store,
            metrics,
            requests: ById::default(),
            delayed: delay::DelayQueue::default(),
            asking: ById::default(),
            quota_failing: false,
            keys_reported: SlotStats::default(),
            cuts: cuts::CutCalls::default(),
            controls: Enforced::default(),
            woken: leased::Woken::default(),
            lease_name: String::new(),
            header_value: String::new(),
            tick_asked: Cell::new(0),
        };
        // Controls another VM already has apply at once, and ticks keep
        // polling for new ones.
        plugin.poll_controls(host);
        let millis = plugin.tick_millis();
        host.set_tick_millis(millis);
        plugin.tick_asked.set(millis);
        Ok(plugin)
    }

    /// Asks the host for the tick period the plugin needs now, if it is
    /// not the one last asked for (a host call only when it changes).
    pub(crate) fn ask_ticks(&self, host: &impl Host) {
        let millis = self.tick_millis();
        if self.tick_asked.replace(millis) != millis {
            host.set_tick_millis(millis);
        }
    }

    /// Sends the stats increments waiting in this VM to the host (before
    /// the plugin is replaced or the VM stops).
    pub fn flush_metrics(&self, host: &impl Host) {
        self.metrics.flush(host);
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }
}
