//! One VM's filter: its policy, its view of the shared counters, and the
//! state of the requests it is handling.
//!
//! Methods decide and return what to do ([`Step`], [`Wake`]) instead of
//! doing it: sending a local reply or resuming a request makes Envoy call
//! back into the filter at once, so the glue performs those effects only
//! after the filter has finished with its own state.

use std::collections::HashMap;

use sluice_core::config::{Config, ConfigError};
use sluice_core::engine::{self, Charge, Claim, Verdict, VerdictKind};
use sluice_core::policy::{Action, Counts, Direction, Policy, Protocol};
use sluice_core::store::{SharedBytes, Slot, SlotStats, SlotStore, StoreError};
use sluice_core::time::{Nanos, Span};

use crate::host::Host;
use crate::http::{detect_protocol, fetch_request, grpc_refusal, refusal, LocalReply, Needs};
use crate::metrics::{Metrics, Outcome};
use crate::stream::{Answer, Ask, Edit, GrpcStream, Judge, Violation, WebSocketStream};

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

/// The stream a request opened, once there is one to watch.
#[derive(Debug)]
enum Stream {
    Grpc(GrpcStream),
    WebSocket(Box<WebSocketStream>),
}

#[derive(Debug, Default)]
struct RequestState {
    protocol: Protocol,
    /// Kept until the response, for headers and refunds.
    verdict: Option<Verdict>,
    /// The filter answered this request itself.
    answered_locally: bool,
    /// In-flight permits, given back when the request ends.
    held: Vec<Charge>,
    /// Rules whose open-streams gauge counts this request.
    gauges: Vec<usize>,
    /// Stream rules (messages, bytes, sizes) and their keys.
    stream_keys: Vec<(usize, String)>,
    stream: Option<Stream>,
    response_started: bool,
}

#[derive(Debug)]
struct Held {
    context_id: u32,
    wake_at: Nanos,
    since: Nanos,
    protocol: Protocol,
    keys: Vec<(usize, String)>,
    stream_keys: Vec<(usize, String)>,
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
    /// The store's stats already counted in metrics.
    keys_reported: SlotStats,
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
        // The key hash's seed is a random secret shared by every VM, so
        // that no client can aim keys at another's slots.
        let store = SlotStore::open(backend, &policy, || host.random_u64())
            .map_err(ConfigureError::Store)?;
        let metrics = Metrics::define(host, &policy);
        Ok(Plugin {
            needs: Needs::of(&policy),
            policy,
            store,
            metrics,
            requests: HashMap::new(),
            held: Vec::new(),
            keys_reported: SlotStats::default(),
        })
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Decides a new request.
    pub fn on_request_headers(&mut self, host: &impl Host, context_id: u32) -> Step {
        let request = fetch_request(host, &self.policy, &self.needs);
        let (keys, stream_keys): (Vec<_>, Vec<_>) =
            engine::applicable_rules(&self.policy, &request)
                .into_iter()
                .partition(|(i, _)| {
                    self.policy
                        .rules
                        .get(*i)
                        .is_some_and(|r| r.counts.at_request())
                });
        if keys.is_empty() && stream_keys.is_empty() {
            return Step::Continue;
        }
        let now = host.now();
        let held = Held {
            context_id,
            wake_at: now,
            since: now,
            protocol: request.protocol,
            keys,
            stream_keys,
        };
        match self.decide(host, held, now) {
            Some(Wake::Resume) => Step::Continue,
            Some(Wake::Reply(reply)) => Step::Reply(reply),
            None => {
                host.set_tick_millis(DELAY_TICK_MILLIS);
                Step::Pause
            }
        }
    }

    /// Decides the request-time rules of `request` (first seen at
    /// `request.since`); `None` means it is held until its wait is over.
    fn decide(&mut self, host: &impl Host, mut request: Held, now: Nanos) -> Option<Wake> {
        let waited = now.since(request.since);
        let verdict =
            match engine::decide_keys(&self.policy, &mut self.store, &request.keys, now, waited) {
                Ok(v) => v,
                Err(e) => {
                    // Fail open: a broken counter must not take the service down.
                    self.metrics.error(host);
                    host.warn(&format!("sluice: letting request through: {e}"));
                    return Some(Wake::Resume);
                }
            };
        self.report_keys(host);
        let protocol = request.protocol;
        match verdict.kind {
            VerdictKind::Allowed => {
                let delayed = waited > Span::ZERO;
                for d in &verdict.decisions {
                    let outcome = match (d.shadow_limited, delayed) {
                        (true, _) => Outcome::ShadowLimited,
                        (false, true) => Outcome::Delayed,
                        (false, false) => Outcome::Allowed,
                    };
                    self.metrics.count(host, protocol, d.rule_index, outcome);
                }
                let held = verdict
                    .charges
                    .iter()
                    .filter(|c| self.counts(c.rule_index) == Some(Counts::InFlight))
                    .cloned()
                    .collect();
                let gauges: Vec<usize> = request
                    .keys
                    .iter()
                    .chain(&request.stream_keys)
                    .map(|(i, _)| *i)
                    .filter(|&i| self.metrics.open(host, i, 1))
                    .collect();
                let stream = match (protocol, request.stream_keys.is_empty()) {
                    (Protocol::Grpc, false) => Some(Stream::Grpc(GrpcStream::default())),
                    _ => None,
                };
                self.requests.insert(
                    request.context_id,
                    RequestState {
                        protocol,
                        verdict: Some(verdict),
                        held,
                        gauges,
                        stream_keys: std::mem::take(&mut request.stream_keys),
                        stream,
                        ..RequestState::default()
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
                    self.metrics.count(host, protocol, d.rule_index, outcome);
                }
                // A gRPC call limited by a rule that does not look at
                // protocols still needs a gRPC answer.
                let protocol = match protocol {
                    Protocol::Http if !self.needs.protocol => detect_protocol(host),
                    p => p,
                };
                let reply = refusal(&self.policy, &verdict, rule_index, protocol);
                self.requests.insert(
                    request.context_id,
                    RequestState {
                        protocol,
                        answered_locally: true,
                        ..RequestState::default()
                    },
                );
                Some(Wake::Reply(reply))
            }
            VerdictKind::Wait { wait } => {
                request.wake_at = now.plus(wait);
                self.held.push(request);
                None
            }
        }
    }

    fn counts(&self, rule_index: usize) -> Option<Counts> {
        self.policy.rules.get(rule_index).map(|r| r.counts)
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
            let context_id = h.context_id;
            if let Some(wake) = self.decide(host, h, now) {
                wakes.push((context_id, wake));
            }
        }
        host.set_tick_millis(if self.held.is_empty() {
            0
        } else {
            DELAY_TICK_MILLIS
        });
        wakes
    }

    /// Adds rate-limit headers to an allowed response, refunds the permits
    /// if its status is excluded from counting, and starts watching a
    /// WebSocket connection once it is upgraded.
    pub fn on_response_headers(&mut self, host: &impl Host, context_id: u32) {
        let Some(state) = self.requests.get_mut(&context_id) else {
            return;
        };
        if state.answered_locally {
            // Our own reply comes back through here: it has its headers.
            return;
        }
        state.response_started = true;
        let watches_upgrade =
            state.protocol == Protocol::WebSocket && !state.stream_keys.is_empty();
        // One host call for the status, and only when something reads it.
        let status = (watches_upgrade || !self.policy.exclude_statuses.is_empty())
            .then(|| host.response_header(":status"))
            .flatten()
            .and_then(|s| s.parse::<u16>().ok());
        if watches_upgrade && status == Some(101) {
            let deflate = host
                .response_header("sec-websocket-extensions")
                .is_some_and(|e| e.contains("permessage-deflate"));
            state.stream = Some(Stream::WebSocket(Box::new(WebSocketStream::new(deflate))));
        }
        let Some(verdict) = state.verdict.as_ref() else {
            return;
        };
        if status.is_some_and(|s| self.policy.exclude_statuses.contains(s)) {
            // In-flight permits are released when the request ends.
            let refunds: Vec<Charge> = verdict
                .charges
                .iter()
                .filter(|c| {
                    self.policy
                        .rules
                        .get(c.rule_index)
                        .is_some_and(|r| r.counts == Counts::Requests)
                })
                .cloned()
                .collect();
            if let Err(e) = engine::refund(&self.policy, &mut self.store, &refunds, host.now()) {
                self.metrics.error(host);
                host.warn(&format!("sluice: refund failed: {e}"));
            }
        }
        if self.policy.headers_on_allowed && !self.policy.header_sets.is_empty() {
            verdict.headers(&self.policy, |name, value| {
                host.set_response_header(name, value)
            });
        }
    }

    /// Counts the messages in a body chunk travelling `direction` against
    /// the stream rules, rewriting the chunk when a message is refused or
    /// dropped. A gRPC message refused before the response started ends
    /// the call with a reply.
    pub fn on_body(
        &mut self,
        host: &impl Host,
        context_id: u32,
        direction: Direction,
        size: usize,
    ) -> Step {
        let Some(mut state) = self.requests.remove(&context_id) else {
            return Step::Continue;
        };
        let step = match state.stream.as_mut() {
            None => Step::Continue,
            Some(stream) => {
                let bytes = host.body(direction, size).unwrap_or_default();
                let mut judge = StreamJudge {
                    policy: &self.policy,
                    store: &mut self.store,
                    metrics: &self.metrics,
                    host,
                    keys: &state.stream_keys,
                    protocol: state.protocol,
                    now: host.now(),
                };
                let edit = match stream {
                    Stream::Grpc(g) => {
                        g.chunk(&mut judge, direction, &bytes, state.response_started)
                    }
                    Stream::WebSocket(w) => w.chunk(&mut judge, direction, &bytes),
                };
                match edit {
                    Edit::Keep => Step::Continue,
                    Edit::Replace(new) => {
                        host.set_body(direction, bytes.len(), &new);
                        Step::Continue
                    }
                    Edit::RefuseCall { message, metadata } => {
                        state.answered_locally = true;
                        Step::Reply(grpc_refusal(metadata, &message))
                    }
                }
            }
        };
        self.requests.insert(context_id, state);
        step
    }

    /// Rewrites the trailers of a gRPC call whose messages were refused
    /// after the response started, so the client sees RESOURCE_EXHAUSTED.
    pub fn on_response_trailers(&mut self, host: &impl Host, context_id: u32) {
        let refused = self
            .requests
            .get(&context_id)
            .and_then(|s| match &s.stream {
                Some(Stream::Grpc(g)) => g.refused().map(str::to_owned),
                _ => None,
            });
        if let Some(message) = refused {
            host.set_response_trailer("grpc-status", "8");
            host.set_response_trailer("grpc-message", &message);
        }
    }

    /// Forgets a finished request (also one the client abandoned while
    /// held), giving back its in-flight permits.
    pub fn on_done(&mut self, host: &impl Host, context_id: u32) {
        self.held.retain(|h| h.context_id != context_id);
        let Some(state) = self.requests.remove(&context_id) else {
            return;
        };
        if !state.held.is_empty() {
            if let Err(e) = engine::refund(&self.policy, &mut self.store, &state.held, host.now()) {
                self.metrics.error(host);
                host.warn(&format!("sluice: releasing in-flight permits failed: {e}"));
            }
        }
        for rule_index in state.gauges {
            self.metrics.open(host, rule_index, -1);
        }
    }

    /// Requests currently held by a delay.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    fn report_keys(&mut self, host: &impl Host) {
        let now = self.store.stats();
        self.metrics.keys(host, self.keys_reported, now);
        self.keys_reported = now;
    }
}

/// Decides stream messages against one request's stream rules.
struct StreamJudge<'a, B, H> {
    policy: &'a Policy,
    store: &'a mut SlotStore<B>,
    metrics: &'a Metrics,
    host: &'a H,
    keys: &'a [(usize, String)],
    protocol: Protocol,
    now: Nanos,
}

impl<B: SharedBytes, H: Host> Judge for StreamJudge<'_, B, H> {
    fn judge(&mut self, direction: Direction, ask: Ask) -> Answer {
        let rules = self
            .keys
            .iter()
            .filter_map(|(i, key)| self.policy.rules.get(*i).map(|r| (*i, key.as_str(), r)));
        // Size bounds need no state.
        for (i, _, rule) in rules.clone() {
            let Counts::MessageSize(flow) = rule.counts else {
                continue;
            };
            if !flow.includes(direction) || ask.size <= rule.quota.count() {
                continue;
            }
            if rule.action == Action::Shadow {
                self.metrics
                    .count(self.host, self.protocol, i, Outcome::ShadowLimited);
                continue;
            }
            return self.refuse(i, Violation::TooBig, 1, Vec::new());
        }
        let claims: Vec<Claim<'_>> = rules
            .filter_map(|(rule_index, key, rule)| {
                let cost = match rule.counts {
                    Counts::Messages(flow) if flow.includes(direction) => {
                        ask.messages.saturating_mul(rule.cost)
                    }
                    Counts::Bytes(flow) if flow.includes(direction) => ask.bytes,
                    _ => 0,
                };
                (cost > 0).then_some(Claim {
                    slot: Slot {
                        rule_index,
                        rule,
                        key,
                    },
                    cost,
                })
            })
            .collect();
        if claims.is_empty() {
            return Answer::Pass;
        }
        let verdict = match engine::decide_claims(self.store, &claims, self.now, Span::ZERO) {
            Ok(v) => v,
            Err(e) => {
                self.metrics.error(self.host);
                self.host
                    .warn(&format!("sluice: letting message through: {e}"));
                return Answer::Pass;
            }
        };
        match verdict.kind {
            VerdictKind::Allowed | VerdictKind::Wait { .. } => {
                for d in &verdict.decisions {
                    let outcome = if d.shadow_limited {
                        Outcome::ShadowLimited
                    } else {
                        Outcome::Allowed
                    };
                    self.metrics
                        .count(self.host, self.protocol, d.rule_index, outcome);
                }
                Answer::Pass
            }
            VerdictKind::Limited { rule_index } => {
                let mut metadata = Vec::new();
                verdict.headers(self.policy, |name, value| {
                    metadata.push((name, value.to_owned()))
                });
                let retry_after = verdict
                    .shown(self.policy)
                    .map_or(1, |d| d.retry_after_secs());
                self.refuse(rule_index, Violation::Rate, retry_after, metadata)
            }
        }
    }
}

impl<B, H: Host> StreamJudge<'_, B, H> {
    fn refuse(
        &self,
        rule_index: usize,
        violation: Violation,
        retry_after: u64,
        metadata: Vec<(&'static str, String)>,
    ) -> Answer {
        let Some(rule) = self.policy.rules.get(rule_index) else {
            return Answer::Pass;
        };
        let rule_name = rule.name.clone();
        if rule.action == Action::Drop {
            self.metrics
                .count(self.host, self.protocol, rule_index, Outcome::Dropped);
            Answer::Drop {
                violation,
                rule: rule_name,
            }
        } else {
            self.metrics
                .count(self.host, self.protocol, rule_index, Outcome::Limited);
            Answer::Refuse {
                rule: rule_name,
                violation,
                retry_after,
                metadata,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::fake::FakeHost;
    use sluice_core::policy::Direction;
    use sluice_core::store::{hash, InProcessShared, PROBES, SEED_NAME};

    const SEC: u64 = 1_000_000_000;

    fn plugin<'a>(
        host: &FakeHost,
        shared: &'a InProcessShared,
        json: &str,
    ) -> Result<Plugin<&'a InProcessShared>, String> {
        host.now.set(1_800_000_000 * SEC);
        host.random.set(Some(0x0123_4567_89ab_cdef));
        *host.peer.borrow_mut() = Some("10.0.0.7:41234".into());
        Plugin::configure(host, shared, json.as_bytes()).map_err(|e| e.to_string())
    }

    fn reply(step: Step) -> Result<LocalReply, String> {
        match step {
            Step::Reply(r) => Ok(r),
            other => Err(format!("expected a reply, got {other:?}")),
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
    fn limits_at_the_boundary_and_answers_429_with_headers() -> Result<(), String> {
        let (host, shared) = (FakeHost::default(), InProcessShared::default());
        let mut p = plugin(
            &host,
            &shared,
            r#"{"rules":[{"name":"api","limit":{"count":2,"per":"1m"},"algorithm":"fixed_window"}]}"#,
        )?;
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
        let r = reply(p.on_request_headers(&host, 3))?;
        assert_eq!(r.status, 429);
        assert_eq!(header(&r, "retry-after"), Some("60"));
        assert_eq!(header(&r, "content-type"), Some("application/json"));
        let body: serde_json::Value = serde_json::from_slice(&r.body).map_err(|e| e.to_string())?;
        assert_eq!(body["rule"], "api");
        assert_eq!(body["retry_after"], 60);
        // Our own reply comes back through the response callback untouched.
        host.respond(429);
        p.on_response_headers(&host, 3);
        assert_eq!(host.response_header("x-ratelimit-remaining"), None);
        assert_eq!(host.counter("sluice_http.rule.api.outcome.allowed"), 2);
        assert_eq!(host.counter("sluice_http.rule.api.outcome.limited"), 1);
        Ok(())
    }

    #[test]
    fn two_vms_share_one_budget() -> Result<(), String> {
        let (host, shared) = (FakeHost::default(), InProcessShared::default());
        let json = r#"{"rules":[{"name":"api","limit":{"count":3,"per":"1h"}}]}"#;
        let mut a = plugin(&host, &shared, json)?;
        let mut b = plugin(&host, &shared, json)?;
        let mut allowed = 0;
        for id in 0..10 {
            host.request("GET", "/", &[]);
            let vm = if id % 2 == 0 { &mut a } else { &mut b };
            if vm.on_request_headers(&host, id) == Step::Continue {
                allowed += 1;
            }
        }
        assert_eq!(allowed, 3);
        Ok(())
    }

    #[test]
    fn delay_holds_then_releases_on_tick() -> Result<(), String> {
        let (host, shared) = (FakeHost::default(), InProcessShared::default());
        let mut p = plugin(
            &host,
            &shared,
            r#"{"rules":[{"name":"slow","limit":{"count":1,"per":"1s"},"action":"delay","max_delay":"2s"}]}"#,
        )?;
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
        Ok(())
    }

    #[test]
    fn delay_beyond_max_is_refused_and_abandoned_requests_are_forgotten() -> Result<(), String> {
        let (host, shared) = (FakeHost::default(), InProcessShared::default());
        let mut p = plugin(
            &host,
            &shared,
            r#"{"rules":[{"name":"slow","limit":{"count":1,"per":"10s"},"action":"delay","max_delay":"1s"}]}"#,
        )?;
        host.request("GET", "/", &[]);
        assert_eq!(p.on_request_headers(&host, 1), Step::Continue);
        assert_eq!(reply(p.on_request_headers(&host, 2))?.status, 429);
        let mut q = plugin(
            &host,
            &shared,
            r#"{"rules":[{"name":"q","limit":{"count":1,"per":"1s"},"action":"delay","max_delay":"5s"}]}"#,
        )?;
        assert_eq!(q.on_request_headers(&host, 1), Step::Continue);
        assert_eq!(q.on_request_headers(&host, 2), Step::Pause);
        q.on_done(&host, 2);
        assert_eq!(q.held(), 0);
        Ok(())
    }

    #[test]
    fn excluded_statuses_are_refunded() -> Result<(), String> {
        let (host, shared) = (FakeHost::default(), InProcessShared::default());
        let mut p = plugin(
            &host,
            &shared,
            r#"{"rules":[{"name":"r","limit":{"count":1,"per":"1h"}}],"exclude_statuses":["5xx"]}"#,
        )?;
        for id in 0..5 {
            host.request("GET", "/", &[]);
            assert_eq!(
                p.on_request_headers(&host, id),
                Step::Continue,
                "request {id}"
            );
            host.respond(503);
            p.on_response_headers(&host, id);
            p.on_done(&host, id);
        }
        host.request("GET", "/", &[]);
        assert_eq!(p.on_request_headers(&host, 9), Step::Continue);
        host.respond(200);
        p.on_response_headers(&host, 9);
        host.request("GET", "/", &[]);
        assert_eq!(reply(p.on_request_headers(&host, 10))?.status, 429);
        Ok(())
    }

    #[test]
    fn forwarded_for_is_trusted_only_as_configured() -> Result<(), String> {
        let (host, shared) = (FakeHost::default(), InProcessShared::default());
        let untrusting = r#"{"rules":[{"name":"r","limit":{"count":1,"per":"1h"}}]}"#;
        let mut p = plugin(&host, &shared, untrusting)?;
        host.request("GET", "/", &[("x-forwarded-for", "1.1.1.1")]);
        assert_eq!(p.on_request_headers(&host, 1), Step::Continue);
        host.request("GET", "/", &[("x-forwarded-for", "2.2.2.2")]);
        assert_eq!(reply(p.on_request_headers(&host, 2))?.status, 429);

        let shared = InProcessShared::default();
        let trusting = r#"{"rules":[{"name":"r","limit":{"count":1,"per":"1h"}}],"client_ip":{"trusted_hops":1}}"#;
        let mut p = plugin(&host, &shared, trusting)?;
        host.request("GET", "/", &[("x-forwarded-for", "1.1.1.1")]);
        assert_eq!(p.on_request_headers(&host, 1), Step::Continue);
        host.request("GET", "/", &[("x-forwarded-for", "2.2.2.2")]);
        assert_eq!(p.on_request_headers(&host, 2), Step::Continue);
        Ok(())
    }

    #[test]
    fn headers_off_for_allowed_responses_when_configured() -> Result<(), String> {
        let (host, shared) = (FakeHost::default(), InProcessShared::default());
        let mut p = plugin(
            &host,
            &shared,
            r#"{"rules":[{"name":"r","limit":{"count":5,"per":"1h"}}],"headers":{"on_allowed":false}}"#,
        )?;
        host.request("GET", "/", &[]);
        assert_eq!(p.on_request_headers(&host, 1), Step::Continue);
        host.respond(200);
        p.on_response_headers(&host, 1);
        assert_eq!(host.response.borrow().len(), 1, "only :status");
        Ok(())
    }

    #[test]
    fn grpc_calls_are_refused_with_resource_exhausted_not_429() -> Result<(), String> {
        let (host, shared) = (FakeHost::default(), InProcessShared::default());
        let mut p = plugin(
            &host,
            &shared,
            r#"{"rules":[{"name":"calls","match":{"grpc":{"service":"chat.*"}},"limit":{"count":1,"per":"1h"}}]}"#,
        )?;
        let grpc = [("content-type", "application/grpc")];
        host.request("POST", "/chat.ChatService/Send", &grpc);
        assert_eq!(p.on_request_headers(&host, 1), Step::Continue);
        host.request("POST", "/user.UserService/Get", &grpc);
        assert_eq!(
            p.on_request_headers(&host, 2),
            Step::Continue,
            "other service"
        );
        host.request("POST", "/chat.ChatService/Send", &grpc);
        let r = reply(p.on_request_headers(&host, 3))?;
        assert_eq!((r.status, r.grpc_status), (200, Some(8)));
        assert_eq!(r.body, b"rate limited by rule calls; retry after 3600s");
        assert_eq!(header(&r, "retry-after"), Some("3600"));
        assert_eq!(host.counter("sluice_grpc.rule.calls.outcome.limited"), 1);
        Ok(())
    }

    #[test]
    fn plain_rules_answer_grpc_calls_in_grpc_too() -> Result<(), String> {
        let (host, shared) = (FakeHost::default(), InProcessShared::default());
        let mut p = plugin(
            &host,
            &shared,
            r#"{"rules":[{"name":"all","limit":{"count":1,"per":"1h"}}]}"#,
        )?;
        host.request("POST", "/a.B/C", &[("content-type", "application/grpc")]);
        assert_eq!(p.on_request_headers(&host, 1), Step::Continue);
        assert_eq!(reply(p.on_request_headers(&host, 2))?.grpc_status, Some(8));
        Ok(())
    }

    #[test]
    fn in_flight_permits_are_held_until_the_stream_ends() -> Result<(), String> {
        let (host, shared) = (FakeHost::default(), InProcessShared::default());
        let mut p = plugin(
            &host,
            &shared,
            r#"{"rules":[{"name":"open","match":{"websocket":true},"counts":"in_flight","limit":{"count":2}}]}"#,
        )?;
        host.request("GET", "/ws", &[("upgrade", "websocket")]);
        assert_eq!(p.on_request_headers(&host, 1), Step::Continue);
        assert_eq!(p.on_request_headers(&host, 2), Step::Continue);
        let refused = reply(p.on_request_headers(&host, 3))?;
        assert_eq!(refused.status, 429);
        assert_eq!(host.counter("sluice_websocket.rule.open.connections"), 2);
        p.on_done(&host, 3);
        p.on_done(&host, 1);
        assert_eq!(host.counter("sluice_websocket.rule.open.connections"), 1);
        assert_eq!(p.on_request_headers(&host, 4), Step::Continue);
        // Plain HTTP requests are not WebSocket connections.
        host.request("GET", "/ws", &[]);
        assert_eq!(p.on_request_headers(&host, 5), Step::Continue);
        assert_eq!(p.on_request_headers(&host, 6), Step::Continue);
        Ok(())
    }

    #[test]
    fn grpc_messages_over_the_limit_end_the_call_or_rewrite_the_trailers() -> Result<(), String> {
        let (host, shared) = (FakeHost::default(), InProcessShared::default());
        let mut p = plugin(
            &host,
            &shared,
            r#"{"rules":[{"name":"msgs","match":{"grpc":{}},"counts":"messages","limit":{"count":2,"per":"1h"}}],"headers":{"on_allowed":false}}"#,
        )?;
        let message = [0u8, 0, 0, 0, 1, 42];
        host.request(
            "POST",
            "/chat.ChatService/Chat",
            &[("content-type", "application/grpc")],
        );
        assert_eq!(p.on_request_headers(&host, 1), Step::Continue);
        host.chunk(Direction::Client, &message);
        assert_eq!(p.on_body(&host, 1, Direction::Client, 6), Step::Continue);
        host.respond(200);
        p.on_response_headers(&host, 1);
        // Server messages count in the same budget: the 2nd passes, the 3rd is cut.
        host.chunk(Direction::Server, &[message, message].concat());
        assert_eq!(p.on_body(&host, 1, Direction::Server, 12), Step::Continue);
        assert_eq!(host.passed(Direction::Server), message);
        p.on_response_trailers(&host, 1);
        assert_eq!(
            host.trailers
                .borrow()
                .get("grpc-status")
                .map(String::as_str),
            Some("8")
        );

        // Before the response started, the call is refused cleanly.
        let (host, shared) = (FakeHost::default(), InProcessShared::default());
        let mut p = plugin(
            &host,
            &shared,
            r#"{"rules":[{"name":"msgs","match":{"grpc":{}},"counts":"messages","direction":"client","limit":{"count":1,"per":"1h"}}]}"#,
        )?;
        host.request(
            "POST",
            "/chat.ChatService/Upload",
            &[("content-type", "application/grpc")],
        );
        assert_eq!(p.on_request_headers(&host, 1), Step::Continue);
        host.chunk(Direction::Client, &[message, message].concat());
        let r = reply(p.on_body(&host, 1, Direction::Client, 12))?;
        assert_eq!(r.grpc_status, Some(8));
        assert_eq!(header(&r, "x-ratelimit-remaining"), Some("0"));
        assert_eq!(header(&r, "ratelimit-policy"), Some("\"msgs\";q=1;w=3600"));
        assert_eq!(header(&r, "retry-after"), Some("3600"));
        assert_eq!(host.counter("sluice_grpc.rule.msgs.outcome.allowed"), 1);
        assert_eq!(host.counter("sluice_grpc.rule.msgs.outcome.limited"), 1);
        Ok(())
    }

    #[test]
    fn websocket_messages_are_counted_after_the_upgrade() -> Result<(), String> {
        let (host, shared) = (FakeHost::default(), InProcessShared::default());
        let mut p = plugin(
            &host,
            &shared,
            r#"{"rules":[{"name":"room","match":{"websocket":true,"path":{"glob":"/room/*"}},"key":["path_segment:1"],"counts":"messages","direction":"client","limit":{"count":1,"per":"1h"}}]}"#,
        )?;
        let frame = [0x81u8, 0x81, 1, 2, 3, 4, b'a' ^ 1];
        host.request("GET", "/room/a", &[("upgrade", "websocket")]);
        assert_eq!(p.on_request_headers(&host, 1), Step::Continue);
        host.respond(101);
        p.on_response_headers(&host, 1);
        host.chunk(Direction::Client, &[frame, frame].concat());
        assert_eq!(p.on_body(&host, 1, Direction::Client, 14), Step::Continue);
        let passed = host.passed(Direction::Client);
        assert_eq!(&passed[..7], &frame);
        assert_eq!(passed[7], 0x88, "a close frame follows the allowed message");
        // Another room has its own budget.
        host.request("GET", "/room/b", &[("upgrade", "websocket")]);
        assert_eq!(p.on_request_headers(&host, 2), Step::Continue);
        host.respond(101);
        p.on_response_headers(&host, 2);
        host.chunk(Direction::Client, &frame);
        assert_eq!(p.on_body(&host, 2, Direction::Client, 7), Step::Continue);
        assert_eq!(host.passed(Direction::Client), frame);
        Ok(())
    }

    /// Asks as client `ip` (behind one trusted proxy): whether allowed.
    fn ask_as(p: &mut Plugin<&InProcessShared>, host: &FakeHost, ip: &str) -> bool {
        host.request("GET", "/", &[("x-forwarded-for", ip)]);
        p.on_request_headers(host, 1) == Step::Continue
    }

    const FLOODED: &str = r#"{"rules":[{"name":"r","limit":{"count":5,"per":"1h"},"algorithm":"fixed_window"}],"client_ip":{"trusted_hops":1},"max_keys":64}"#;

    #[test]
    fn a_flood_of_new_clients_does_not_reset_a_limited_client() -> Result<(), String> {
        let (host, shared) = (FakeHost::default(), InProcessShared::default());
        let mut p = plugin(&host, &shared, FLOODED)?;
        let allowed = (0..10)
            .filter(|_| ask_as(&mut p, &host, "192.0.2.1"))
            .count();
        assert_eq!(allowed, 5);
        for i in 0..2_000u32 {
            let [_, _, a, b] = i.to_be_bytes();
            host.now.set(host.now.get() + 1_000_000);
            let ip = format!("10.1.{a}.{b}");
            ask_as(&mut p, &host, &ip);
            ask_as(&mut p, &host, &ip);
        }
        let allowed = (0..10)
            .filter(|_| ask_as(&mut p, &host, "192.0.2.1"))
            .count();
        assert_eq!(allowed, 0, "the limited client got a fresh allowance");
        assert!(host.counter("sluice_http.live_evictions") > 0);
        Ok(())
    }

    #[test]
    fn keys_aimed_with_the_configuration_cannot_evict_a_limited_client() -> Result<(), String> {
        let (host, shared) = (FakeHost::default(), InProcessShared::default());
        let mut p = plugin(&host, &shared, FLOODED)?;
        // What an attacker could compute from a published configuration
        // when the seed was a hash of it (keys are length-prefixed parts).
        let known_seed = hash(0, FLOODED.as_bytes());
        let home = |ip: &str| hash(known_seed, format!("{}:{ip}", ip.len()).as_bytes()) % 64;
        let victim = "192.0.2.1";
        // Keys with the victim's very home slot: they evict within its group.
        let aimed: Vec<String> = (0..=255u8)
            .flat_map(|a| (0..=255u8).map(move |b| format!("10.2.{a}.{b}")))
            .filter(|ip| home(ip) == home(victim))
            .take(20)
            .collect();
        assert_eq!(aimed.len(), 20);
        let allowed = (0..10).filter(|_| ask_as(&mut p, &host, victim)).count();
        assert_eq!(allowed, 5);
        for ip in &aimed {
            host.now.set(host.now.get() + 1_000_000);
            ask_as(&mut p, &host, ip);
            ask_as(&mut p, &host, ip);
        }
        let allowed = (0..10).filter(|_| ask_as(&mut p, &host, victim)).count();
        assert_eq!(allowed, 0);
        assert_eq!(PROBES, 4, "the group the aimed keys crowd");
        Ok(())
    }

    #[test]
    fn the_seed_is_random_stored_once_and_shared_by_every_vm() -> Result<(), String> {
        let (host, shared) = (FakeHost::default(), InProcessShared::default());
        plugin(&host, &shared, FLOODED)?;
        let stored = (&shared).get(SEED_NAME).map_err(|e| e.to_string())?.0;
        assert_eq!(
            stored,
            Some(0x0123_4567_89ab_cdef_u64.to_le_bytes().to_vec())
        );
        // Later VMs read it: they need no randomness and do not replace it.
        host.random.set(None);
        Plugin::configure(&host, &shared, FLOODED.as_bytes()).map_err(|e| e.to_string())?;
        let again = (&shared).get(SEED_NAME).map_err(|e| e.to_string())?.0;
        assert_eq!(again, stored);
        // Without a stored seed or a random source, the filter refuses to start.
        let err = Plugin::configure(&host, &InProcessShared::default(), FLOODED.as_bytes())
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("cannot set up shared counters: state store unavailable: no random source for the key hash seed")
        );
        Ok(())
    }

    #[test]
    fn new_keys_without_room_share_the_overflow_or_are_refused_and_counted() -> Result<(), String> {
        for (when_full, allowed_new, stat) in [
            ("overflow", true, "sluice_http.new_keys_overflowed"),
            ("refuse", false, "sluice_http.new_keys_refused"),
        ] {
            let (host, shared) = (FakeHost::default(), InProcessShared::default());
            let json = format!(
                r#"{{"rules":[{{"name":"r","limit":{{"count":1,"per":"1h"}}}}],"client_ip":{{"trusted_hops":1}},"max_keys":1,"when_keys_full":"{when_full}"}}"#
            );
            let mut p = plugin(&host, &shared, &json)?;
            assert!(ask_as(&mut p, &host, "192.0.2.1"));
            assert!(
                !ask_as(&mut p, &host, "192.0.2.1"),
                "limited: keeps its slot"
            );
            assert_eq!(
                ask_as(&mut p, &host, "192.0.2.2"),
                allowed_new,
                "{when_full}"
            );
            assert!(!ask_as(&mut p, &host, "192.0.2.3"), "{when_full}");
            assert_eq!(host.counter(stat), 2, "{when_full}");
        }
        Ok(())
    }

    #[test]
    fn configuring_many_rules_with_a_large_max_keys_creates_no_slots() -> Result<(), String> {
        let (host, shared) = (FakeHost::default(), InProcessShared::default());
        let rules: Vec<String> = (0..1_000)
            .map(|i| format!(r#"{{"name":"r{i}","limit":{{"count":1,"per":"1s"}}}}"#))
            .collect();
        let json = format!(r#"{{"rules":[{}],"max_keys":6000}}"#, rules.join(","));
        plugin(&host, &shared, &json)?;
        assert_eq!(
            shared.len(),
            1 + 2 * 1_000,
            "the seed, then a lock and an overflow slot per rule"
        );
        Ok(())
    }

    #[test]
    fn invalid_config_names_the_field() -> Result<(), String> {
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
        Ok(())
    }
}
