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
use crate::http::{fetch_request, too_many_requests, LocalReply, Needs};
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
    needs: Needs,
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
    pub fn configure(
        host: &impl Host,
        backend: B,
        config: &[u8],
    ) -> Result<Plugin<B>, ConfigureError> {
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
            needs: Needs::of(&policy),
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
        let request = fetch_request(host, &self.policy, &self.needs);
        let keys = engine::applicable_rules(&self.policy, &request);
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
        host.set_tick_millis(if self.held.is_empty() {
            0
        } else {
            DELAY_TICK_MILLIS
        });
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
                if let Err(e) =
                    engine::refund(&self.policy, &mut self.store, &verdict.charges, host.now())
                {
                    self.metrics.error(host);
                    host.warn(&format!("sluice: refund failed: {e}"));
                }
            }
        }
        if self.policy.headers_on_allowed && !self.policy.header_sets.is_empty() {
            verdict.headers(&self.policy, |name, value| {
                host.set_response_header(name, value)
            });
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
        self.metrics
            .evictions(host, total - self.evictions_reported);
        self.evictions_reported = total;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::fake::FakeHost;
    use sluice_core::store::InProcessShared;

    const SEC: u64 = 1_000_000_000;

    fn plugin<'a>(
        host: &FakeHost,
        shared: &'a InProcessShared,
        json: &str,
    ) -> Plugin<&'a InProcessShared> {
        host.now.set(1_800_000_000 * SEC);
        *host.peer.borrow_mut() = Some("10.0.0.7:41234".into());
        Plugin::configure(host, shared, json.as_bytes()).unwrap()
    }

    fn reply(step: Step) -> LocalReply {
        match step {
            Step::Reply(r) => r,
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    fn header<'a>(reply: &'a LocalReply, name: &str) -> Option<&'a str> {
        reply
            .headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn limits_at_the_boundary_and_answers_429_with_headers() {
        let (host, shared) = (FakeHost::default(), InProcessShared::default());
        let mut p = plugin(
            &host,
            &shared,
            r#"{"rules":[{"name":"api","limit":{"count":2,"per":"1m"},"algorithm":"fixed_window"}]}"#,
        );
        for (id, remaining) in [(1, "1"), (2, "0")] {
            host.request("GET", "/x", &[]);
            assert_eq!(p.on_request_headers(&host, id), Step::Continue);
            host.respond(200);
            p.on_response_headers(&host, id);
            assert_eq!(
                host.response_header("x-ratelimit-remaining").as_deref(),
                Some(remaining)
            );
            assert_eq!(
                host.response_header("ratelimit-policy").as_deref(),
                Some("\"api\";q=2;w=60")
            );
        }
        host.request("GET", "/x", &[]);
        let r = reply(p.on_request_headers(&host, 3));
        assert_eq!(r.status, 429);
        assert_eq!(header(&r, "retry-after"), Some("60"));
        assert_eq!(header(&r, "content-type"), Some("application/json"));
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["rule"], "api");
        assert_eq!(body["retry_after"], 60);
        // Our own reply comes back through the response callback untouched.
        host.respond(429);
        p.on_response_headers(&host, 3);
        assert_eq!(host.response_header("x-ratelimit-remaining"), None);
        assert_eq!(host.counter("sluice_http.rule.api.outcome.allowed"), 2);
        assert_eq!(host.counter("sluice_http.rule.api.outcome.limited"), 1);
    }

    #[test]
    fn two_vms_share_one_budget() {
        let (host, shared) = (FakeHost::default(), InProcessShared::default());
        let json = r#"{"rules":[{"name":"api","limit":{"count":3,"per":"1h"}}]}"#;
        let mut a = plugin(&host, &shared, json);
        let mut b = plugin(&host, &shared, json);
        let mut allowed = 0;
        for id in 0..10 {
            host.request("GET", "/", &[]);
            let vm = if id % 2 == 0 { &mut a } else { &mut b };
            if vm.on_request_headers(&host, id) == Step::Continue {
                allowed += 1;
            }
        }
        assert_eq!(allowed, 3);
    }

    #[test]
    fn delay_holds_then_releases_on_tick() {
        let (host, shared) = (FakeHost::default(), InProcessShared::default());
        let mut p = plugin(
            &host,
            &shared,
            r#"{"rules":[{"name":"slow","limit":{"count":1,"per":"1s"},"action":"delay","max_delay":"2s"}]}"#,
        );
        host.request("GET", "/", &[]);
        assert_eq!(p.on_request_headers(&host, 1), Step::Continue);
        assert_eq!(p.on_request_headers(&host, 2), Step::Pause);
        assert_eq!(host.tick_millis.get(), DELAY_TICK_MILLIS);
        host.now.set(host.now.get() + SEC / 2);
        assert!(p.on_tick(&host).is_empty());
        assert_eq!(p.held(), 1);
        host.now.set(host.now.get() + SEC / 2);
        assert_eq!(p.on_tick(&host), vec![(2, Wake::Resume)]);
        assert_eq!(host.tick_millis.get(), 0);
        assert_eq!(host.counter("sluice_http.rule.slow.outcome.delayed"), 1);
    }

    #[test]
    fn delay_beyond_max_is_refused_and_abandoned_requests_are_forgotten() {
        let (host, shared) = (FakeHost::default(), InProcessShared::default());
        let mut p = plugin(
            &host,
            &shared,
            r#"{"rules":[{"name":"slow","limit":{"count":1,"per":"10s"},"action":"delay","max_delay":"1s"}]}"#,
        );
        host.request("GET", "/", &[]);
        assert_eq!(p.on_request_headers(&host, 1), Step::Continue);
        assert_eq!(reply(p.on_request_headers(&host, 2)).status, 429);
        let mut q = plugin(
            &host,
            &shared,
            r#"{"rules":[{"name":"q","limit":{"count":1,"per":"1s"},"action":"delay","max_delay":"5s"}]}"#,
        );
        assert_eq!(q.on_request_headers(&host, 1), Step::Continue);
        assert_eq!(q.on_request_headers(&host, 2), Step::Pause);
        q.on_done(2);
        assert_eq!(q.held(), 0);
    }

    #[test]
    fn excluded_statuses_are_refunded() {
        let (host, shared) = (FakeHost::default(), InProcessShared::default());
        let mut p = plugin(
            &host,
            &shared,
            r#"{"rules":[{"name":"r","limit":{"count":1,"per":"1h"}}],"exclude_statuses":["5xx"]}"#,
        );
        for id in 0..5 {
            host.request("GET", "/", &[]);
            assert_eq!(
                p.on_request_headers(&host, id),
                Step::Continue,
                "request {id}"
            );
            host.respond(503);
            p.on_response_headers(&host, id);
            p.on_done(id);
        }
        host.request("GET", "/", &[]);
        assert_eq!(p.on_request_headers(&host, 9), Step::Continue);
        host.respond(200);
        p.on_response_headers(&host, 9);
        host.request("GET", "/", &[]);
        assert_eq!(reply(p.on_request_headers(&host, 10)).status, 429);
    }

    #[test]
    fn forwarded_for_is_trusted_only_as_configured() {
        let (host, shared) = (FakeHost::default(), InProcessShared::default());
        let untrusting = r#"{"rules":[{"name":"r","limit":{"count":1,"per":"1h"}}]}"#;
        let mut p = plugin(&host, &shared, untrusting);
        host.request("GET", "/", &[("x-forwarded-for", "1.1.1.1")]);
        assert_eq!(p.on_request_headers(&host, 1), Step::Continue);
        host.request("GET", "/", &[("x-forwarded-for", "2.2.2.2")]);
        assert_eq!(reply(p.on_request_headers(&host, 2)).status, 429);

        let shared = InProcessShared::default();
        let trusting = r#"{"rules":[{"name":"r","limit":{"count":1,"per":"1h"}}],"client_ip":{"trusted_hops":1}}"#;
        let mut p = plugin(&host, &shared, trusting);
        host.request("GET", "/", &[("x-forwarded-for", "1.1.1.1")]);
        assert_eq!(p.on_request_headers(&host, 1), Step::Continue);
        host.request("GET", "/", &[("x-forwarded-for", "2.2.2.2")]);
        assert_eq!(p.on_request_headers(&host, 2), Step::Continue);
    }

    #[test]
    fn headers_off_for_allowed_responses_when_configured() {
        let (host, shared) = (FakeHost::default(), InProcessShared::default());
        let mut p = plugin(
            &host,
            &shared,
            r#"{"rules":[{"name":"r","limit":{"count":5,"per":"1h"}}],"headers":{"on_allowed":false}}"#,
        );
        host.request("GET", "/", &[]);
        assert_eq!(p.on_request_headers(&host, 1), Step::Continue);
        host.respond(200);
        p.on_response_headers(&host, 1);
        assert_eq!(host.response.borrow().len(), 1, "only :status");
    }

    #[test]
    fn invalid_config_names_the_field() {
        let (host, shared) = (FakeHost::default(), InProcessShared::default());
        let err = Plugin::configure(
            &host,
            &shared,
            br#"{"rules":[{"name":"r","limit":{"count":1,"per":"0s"}}]}"#,
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "invalid sluice configuration: rules[0].limit.per: must be at least 1ms"
        );
        assert!(Plugin::configure(&host, &shared, b"\xff\xfe").is_err());
    }
}
