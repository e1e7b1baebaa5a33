//! One VM's filter: its policy, its view of the shared counters, and the
//! state of the requests it is handling.
//!
//! Methods decide and return what to do ([`Step`], [`Wake`]) instead of
//! doing it: sending a local reply or resuming a request makes Envoy call
//! back into the filter at once, so the glue performs those effects only
//! after the filter has finished with its own state.

use std::collections::HashMap;

use sluice_core::config::{Config, ConfigError};
use sluice_core::engine::{self, Verdict, VerdictKind};
use sluice_core::policy::Policy;
use sluice_core::store::{hash, SharedBytes, SlotStore, StoreError};
use sluice_core::time::{Nanos, Span};

use crate::host::Host;
use crate::http::{too_many_requests, LocalReply, RequestView};
use crate::metrics::{Metrics, Outcome};

/// How often a VM with held requests checks them again. A held request is
/// released at most this late after its permit frees up.
pub const DELAY_TICK_MILLIS: u32 = 10;

/// What to do with a request now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Let it through.
    Continue,
    /// Hold it (a delay); a later [`Wake`] releases it.
    Pause,
    /// Answer it with this reply (and stop it).
    Reply(LocalReply),
}

/// What a tick does to one held request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Wake {
    /// Let it through now.
    Resume,
    /// Refuse it.
    Reply(LocalReply),
}

#[derive(Debug, Default)]
struct RequestState {
    /// Kept until the response, for headers and refunds.
    verdict: Option<Verdict>,
    /// The filter answered this request itself.
    answered_locally: bool,
}

#[derive(Debug)]
struct Held {
    context_id: u32,
    wake_at: Nanos,
    since: Nanos,
    keys: Vec<(usize, String)>,
}

/// See the module doc.
#[derive(Debug)]
pub struct Plugin<B> {
    policy: Policy,
    store: SlotStore<B>,
    metrics: Metrics,
    needed_headers: Vec<String>,
    needs_client_ip: bool,
    requests: HashMap<u32, RequestState>,
    held: Vec<Held>,
    evictions_reported: u64,
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
    pub fn configure(host: &impl Host, backend: B, config: &[u8]) -> Result<Plugin<B>, ConfigureError> {
        let text = String::from_utf8_lossy(config);
        let policy = Config::from_json(&text)
            .and_then(|c| c.validate())
            .map_err(ConfigureError::Config)?;
        // The seed keeps clients from aiming keys at each other's slots: it
        // comes from the config, which clients never see.
        let mut store = SlotStore::new(backend, &policy, hash(0, config));
        store.prepare().map_err(ConfigureError::Store)?;
        let metrics = Metrics::define(host, &policy);
        Ok(Plugin {
            needed_headers: policy.headers_needed().into_iter().map(String::from).collect(),
            needs_client_ip: policy.needs_client_ip(),
            policy,
            store,
            metrics,
            requests: HashMap::new(),
            held: Vec::new(),
            evictions_reported: 0,
        })
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Decides a new request.
    pub fn on_request_headers(&mut self, host: &impl Host, context_id: u32) -> Step {
        let view = RequestView::fetch(host, &self.policy, &self.needed_headers, self.needs_client_ip);
        let keys = engine::applicable_rules(&self.policy, &view);
        if keys.is_empty() {
            return Step::Continue;
        }
        let now = host.now();
        match self.decide(host, context_id, keys, now, now) {
            Some(Wake::Resume) => Step::Continue,
            Some(Wake::Reply(reply)) => Step::Reply(reply),
            None => {
                host.set_tick_millis(DELAY_TICK_MILLIS);
                Step::Pause
            }
        }
    }

    /// Decides for `keys` of a request first seen at `since`; `None` means
    /// it is held until its wait is over.
    fn decide(
        &mut self,
        host: &impl Host,
        context_id: u32,
        keys: Vec<(usize, String)>,
        now: Nanos,
        since: Nanos,
    ) -> Option<Wake> {
        let waited = now.since(since);
        let verdict = match engine::decide_keys(&self.policy, &mut self.store, &keys, now, waited) {
            Ok(v) => v,
            Err(e) => {
                // Fail open: a broken counter must not take the service down.
                self.metrics.error(host);
                host.warn(&format!("sluice: letting request through: {e}"));
                return Some(Wake::Resume);
            }
        };
        self.report_evictions(host);
        let delayed = waited > Span::ZERO;
        match verdict.kind {
            VerdictKind::Allowed => {
                for d in &verdict.decisions {
                    let outcome = match (d.shadow_limited, delayed) {
                        (true, _) => Outcome::ShadowLimited,
                        (false, true) => Outcome::Delayed,
                        (false, false) => Outcome::Allowed,
                    };
                    self.metrics.count(host, d.rule_index, outcome);
                }
                self.requests.insert(
                    context_id,
                    RequestState {
                        verdict: Some(verdict),
                        answered_locally: false,
                    },
                );
                Some(Wake::Resume)
            }
            VerdictKind::Limited { rule_index } => {
                for d in verdict.decisions.iter().filter(|d| !d.decision.allowed) {
                    let outcome = if d.shadow_limited {
                        Outcome::ShadowLimited
                    } else {
                        Outcome::Limited
                    };
                    self.metrics.count(host, d.rule_index, outcome);
                }
                let reply = too_many_requests(&self.policy, &verdict, rule_index);
                self.requests.insert(
                    context_id,
                    RequestState {
                        verdict: None,
                        answered_locally: true,
                    },
                );
                Some(Wake::Reply(reply))
            }
            VerdictKind::Wait { wait } => {
                self.held.push(Held {
                    context_id,
                    wake_at: now.plus(wait),
                    since,
                    keys,
                });
                None
            }
        }
    }

    /// Releases or refuses held requests whose wait is over.
    pub fn on_tick(&mut self, host: &impl Host) -> Vec<(u32, Wake)> {
        let now = host.now();
        let due: Vec<Held> = {
            let (due, waiting) = std::mem::take(&mut self.held)
                .into_iter()
                .partition(|h| h.wake_at <= now);
            self.held = waiting;
            due
        };
        let mut wakes = Vec::new();
        for h in due {
            if let Some(wake) = self.decide(host, h.context_id, h.keys, now, h.since) {
                wakes.push((h.context_id, wake));
            }
        }
        host.set_tick_millis(if self.held.is_empty() { 0 } else { DELAY_TICK_MILLIS });
        wakes
    }

    /// Adds rate-limit headers to an allowed response, and refunds the
    /// permits if its status is excluded from counting.
    pub fn on_response_headers(&mut self, host: &impl Host, context_id: u32) {
        let Some(state) = self.requests.get(&context_id) else {
            return;
        };
        if state.answered_locally {
            // Our own 429 passes back through here: it has its headers.
            return;
        }
        let Some(verdict) = state.verdict.as_ref() else {
            return;
        };
        if !self.policy.exclude_statuses.is_empty() {
            let status = host
                .response_header(":status")
                .and_then(|s| s.parse::<u16>().ok());
            if status.is_some_and(|s| self.policy.exclude_statuses.contains(s)) {
                if let Err(e) = engine::refund(&self.policy, &mut self.store, &verdict.charges, host.now()) {
                    self.metrics.error(host);
                    host.warn(&format!("sluice: refund failed: {e}"));
                }
            }
        }
        if self.policy.headers_on_allowed && !self.policy.header_sets.is_empty() {
            verdict.headers(&self.policy, |name, value| host.set_response_header(name, value));
        }
    }

    /// Forgets a finished request (also one the client abandoned while held).
    pub fn on_done(&mut self, context_id: u32) {
        self.requests.remove(&context_id);
        self.held.retain(|h| h.context_id != context_id);
    }

    /// Requests currently held by a delay.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    fn report_evictions(&mut self, host: &impl Host) {
        let total = self.store.live_evictions();
        self.metrics.evictions(host, total - self.evictions_reported);
        self.evictions_reported = total;
    }
}
