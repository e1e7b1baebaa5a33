//! A request's life in the filter: decided at its headers, answered with
//! rate-limit headers (or refunded) at its response, its stream watched in
//! its body chunks, and its in-flight permits given back when it ends.

use std::borrow::Cow;

use sluice_core::engine::{self, Charge, Verdict, VerdictKind};
use sluice_core::policy::{read_amount, Action, Counts, Direction, Policy, Protocol, ReportedIn};
use sluice_core::store::{SharedBytes, SlotStore};
use sluice_core::time::{Nanos, Span};

use super::delay::DelayedRequest;
use super::stream_judge::StreamJudge;
use super::{Decided, Plugin, Step, Wake};
use crate::host::Host;
use crate::http::{fetch_request, grpc_refusal, refusal};
use crate::metrics::{Metrics, Outcome};
use crate::stream::{Edit, GrpcStream, Watched, WebSocketStream};

/// `items` split into those `first` holds for and the others, in order;
/// without a copy when they all go one way, else moving only the others.
fn split<T>(mut items: Vec<T>, first: impl Fn(&T) -> bool) -> (Vec<T>, Vec<T>) {
    if items.iter().all(&first) {
        (items, Vec::new())
    } else if !items.iter().any(&first) {
        (Vec::new(), items)
    } else {
        let others = items.extract_if(.., |item| !first(item)).collect();
        (items, others)
    }
}

/// The stream a request opened, once there is one to watch.
#[derive(Debug)]
enum Stream {
    Grpc(GrpcStream),
    WebSocket(Box<WebSocketStream>),
}

impl Stream {
    /// Whether a chunk of `size` bytes travelling `direction` passes on
    /// unread: no rule counts that direction, or it holds nothing but
    /// payload of a message already judged.
    fn passes_unread(&mut self, direction: Direction, size: usize) -> bool {
        match self {
            Stream::Grpc(g) => !g.reads(direction) || g.passes_unread(direction, size),
            Stream::WebSocket(w) => !w.reads(direction) || w.passes_unread(direction, size),
        }
    }
}

impl Step {
    /// A client that half-closes a call whose request was cut is reset at
    /// once: passing its end of stream would tell the upstream the request
    /// was complete, and the upstream can only be waiting for messages that
    /// will never come.
    fn cut_request_ends(self, ends: bool) -> Step {
        if ends {
            Step::Reset
        } else {
            self
        }
    }
}

/// What the filter keeps about an admitted (or locally answered) request.
#[derive(Debug, Default)]
pub(super) struct RequestState {
    protocol: Protocol,
    /// Kept until the response, for headers and refunds.
    verdict: Option<Verdict>,
    /// The filter answered this request itself.
    answered_locally: bool,
    /// In-flight permits, given back when the request ends.
    in_flight_permits: Vec<Charge>,
    /// Rules whose open-streams gauge counts this request.
    gauges: Vec<usize>,
    /// Stream rules (messages, bytes, sizes) and their keys.
    stream_keys: Vec<(usize, String)>,
    stream: Option<Stream>,
    response_started: bool,
}

impl<B: SharedBytes> Plugin<B> {
    /// Decides a new request.
    pub fn on_request_headers(&mut self, host: &impl Host, context_id: u32) -> Step {
        let step = self.decide_request(host, context_id);
        // Its outcome may wait for a flush, which a tick then makes.
        self.ask_ticks(host);
        step
    }

    /// [`Self::on_request_headers`], up to the tick it needs.
    fn decide_request(&mut self, host: &impl Host, context_id: u32) -> Step {
        // Only the filter says which rules degraded a request: a copy the
        // client sent could fake or hide that, so it never reaches the
        // upstream, whatever the rules decide.
        if let Some(name) = &self.policy.degrade_header {
            host.remove_request_header(name);
        }
        let with_ip = self.controls.reads_client_ip();
        let request = fetch_request(host, &self.policy, &self.needs, with_ip);
        let at_request = |i: usize| {
            self.policy
                .rules
                .get(i)
                .is_some_and(|r| r.counts.at_request())
        };
        let (keys, stream_keys) = split(
            engine::applicable_rules(&self.policy, &request),
            |(i, _)| at_request(*i),
        );
        // One clock read per callback: the access lists and the rules decide
        // at the same time. Envoy runs a VM's callbacks one at a time, so
        // nothing this VM does falls between a read early in a callback and
        // a later one; the time stands for when the event was handled, and
        // a read made earlier in the same callback is no older than the
        // event. A time from an earlier callback would be: never kept.
        let mut read_at = None;
        if let Some(step) = self.gate(host, context_id, &request, &keys, &mut read_at) {
            return step;
        }
        if keys.is_empty() && stream_keys.is_empty() {
            return Step::Continue;
        }
        self.refuse_compression(host, request.protocol, &stream_keys);
        let now = read_at.unwrap_or_else(|| host.now());
        let request = DelayedRequest {
            context_id,
            wake_at: now,
            since: now,
            protocol: request.protocol,
            costs: engine::Costs::of(&self.policy, &request, &keys),
            keys,
            stream_keys,
        };
        let step = match self.decide(host, request, now) {
            Decided::Now(Wake::Resume) => Step::Continue,
            Decided::Now(Wake::Reply(reply)) => Step::Reply(reply),
            Decided::Now(Wake::Reset) => Step::Reset,
            Decided::Delayed | Decided::Asking => Step::Pause,
        };
        self.metrics.flush_if_due(host, now);
        step
    }

    /// Decides the request-time rules of `request` (first seen at
    /// `request.since`): the local ones here, then (if they allow it) the
    /// synced ones by asking the quota server.
    pub(super) fn decide(
        &mut self,
        host: &impl Host,
        request: DelayedRequest,
        now: Nanos,
    ) -> Decided {
        let waited = now.since(request.since);
        let synced = |i: usize| self.policy.sync_of(i).is_some();
        // Most requests have local rules only: their keys are used as they are.
        let (local, mut remote) = if request.keys.iter().any(|(i, _)| synced(*i)) {
            let (remote, local) = split(request.keys.clone(), |(i, _)| synced(*i));
            (Cow::Owned(local), remote)
        } else {
            (Cow::Borrowed(request.keys.as_slice()), Vec::new())
        };
        // An unlimited override lifts a synced rule for its key: nothing
        // to ask, nothing counted (as the quota server would answer).
        remote.retain(|(_, key)| !self.controls.is_unlimited(key, now));
        let decided = engine::decide_keys(
            &self.policy,
            &mut self.store,
            &local,
            &request.costs,
            now,
            waited,
        );
        let verdict = match decided {
            Ok(v) => v,
            Err(e) => {
                // Fail open: a broken counter must not take the service down.
                self.metrics.error(host);
                host.warn(&format!("sluice: letting request through: {e}"));
                return Decided::Now(Wake::Resume);
            }
        };
        let verdict = if waited == Span::ZERO {
            self.behind_queue(verdict, &local, now)
        } else {
            verdict
        };
        self.report_keys(host);
        match verdict.kind {
            VerdictKind::Allowed if remote.is_empty() => {
                Decided::Now(self.admit(host, request, verdict, waited > Span::ZERO))
            }
            VerdictKind::Allowed => {
                let mut verdict = verdict;
                match self.use_leases(host, &request, &mut verdict, remote, now) {
                    Err(refused) => Decided::Now(refused),
                    Ok((remote, _)) if remote.is_empty() => {
                        verdict.decisions.sort_by_key(|d| d.rule_index);
                        Decided::Now(self.admit(host, request, verdict, waited > Span::ZERO))
                    }
                    Ok((remote, leased)) => {
                        self.ask(host, request, verdict, remote, leased, waited > Span::ZERO)
                    }
                }
            }
            VerdictKind::Limited { rule_index } => Decided::Now(self.refuse(
                host,
                request.context_id,
                request.protocol,
                &verdict,
                rule_index,
            )),
            VerdictKind::Wait { wait } => {
                let mut request = request;
                request.wake_at = now.plus(wait);
                self.delayed.push(request);
                Decided::Delayed
            }
        }
    }

    /// Keeps compression off where size and byte rules apply, since they
    /// measure what the receiver gets: a WebSocket upgrade loses its
    /// extension offers (permessage-deflate), and a gRPC call accepts only
    /// uncompressed responses. Compressed messages still sent are refused
    /// by the stream judge.
    fn refuse_compression(&self, host: &impl Host, protocol: Protocol, keys: &[(usize, String)]) {
        let mut sized = keys
            .iter()
            .filter_map(|(i, _)| self.policy.rules.get(*i))
            .filter(|r| r.action != Action::Shadow)
            .filter_map(|r| r.counts.sized_flow());
        match protocol {
            Protocol::WebSocket => {
                if sized.next().is_some() {
                    host.remove_request_header("sec-websocket-extensions");
                }
            }
            Protocol::Grpc => {
                if sized.any(|f| f.includes(Direction::Server)) {
                    host.set_request_header("grpc-accept-encoding", "identity");
                }
            }
            Protocol::Http => {}
        }
    }

    /// Lets `request` through under its allowing `verdict` (after a delay
    /// if `delayed`), keeping what its response and end need.
    pub(super) fn admit(
        &mut self,
        host: &impl Host,
        mut request: DelayedRequest,
        verdict: Verdict,
        delayed: bool,
    ) -> Wake {
        let protocol = request.protocol;
        for d in &verdict.decisions {
            let outcome = match (d.shadow_limited, d.degraded, delayed) {
                (true, _, _) => Outcome::ShadowLimited,
                (false, true, _) => Outcome::Degraded,
                (false, false, true) => Outcome::Delayed,
                (false, false, false) => Outcome::Allowed,
            };
            self.metrics.count(host, protocol, d.rule_index, outcome);
        }
        self.mark_degraded(host, &verdict);
        let in_flight_permits: Vec<Charge> = verdict
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
            .filter(|&i| self.metrics.open(i, 1))
            .collect();
        let stream = match (protocol, request.stream_keys.is_empty()) {
            (Protocol::Grpc, false) => Some(Stream::Grpc(GrpcStream::new(watched(
                &self.policy,
                &request.stream_keys,
            )))),
            _ => None,
        };
        let kept = !in_flight_permits.is_empty()
            || !gauges.is_empty()
            || !request.stream_keys.is_empty()
            || self.response_reads(&verdict);
        if !kept {
            // Nothing to do at its response or end: no state to keep.
            return Wake::Resume;
        }
        self.requests.insert(
            request.context_id,
            RequestState {
                protocol,
                verdict: Some(verdict),
                in_flight_permits,
                gauges,
                stream_keys: std::mem::take(&mut request.stream_keys),
                stream,
                ..RequestState::default()
            },
        );
        Wake::Resume
    }

    /// Whether the response of a request admitted under `verdict` has work
    /// to do with it: rate-limit headers to add, or charges to give back
    /// (statuses excluded from counting) or to settle (usage reported).
    fn response_reads(&self, verdict: &Verdict) -> bool {
        let policy = &self.policy;
        let tells =
            (policy.headers_on_allowed || verdict.is_degraded()) && !policy.header_sets.is_empty();
        let excludes = !policy.exclude_statuses.is_empty() || policy.exclude_statuses.has_grpc();
        let settles = || {
            verdict.charges.iter().any(|c| {
                policy
                    .rules
                    .get(c.rule_index)
                    .is_some_and(|r| r.charge.is_some())
            })
        };
        tells || (!verdict.charges.is_empty() && (excludes || settles()))
    }

    /// Tells the upstream which rules degraded a request going through
    /// under `verdict` (gRPC metadata, or a WebSocket upgrade's header,
    /// alike), so it can serve a cheaper answer.
    fn mark_degraded(&self, host: &impl Host, verdict: &Verdict) {
        let Some(name) = &self.policy.degrade_header else {
            return;
        };
        let rules: Vec<&str> = verdict.degraded_by(&self.policy).collect();
        if !rules.is_empty() {
            host.set_request_header(name, &rules.join(","));
        }
    }

    /// Refuses a request because of the rule at `rule_index`, as `verdict`
    /// (which took no permits) tells.
    pub(super) fn refuse(
        &mut self,
        host: &impl Host,
        context_id: u32,
        protocol: Protocol,
        verdict: &Verdict,
        rule_index: usize,
    ) -> Wake {
        for d in verdict.decisions.iter().filter(|d| !d.decision.allowed) {
            let outcome = if d.shadow_limited {
                Outcome::ShadowLimited
            } else {
                Outcome::Limited
            };
            self.metrics.count(host, protocol, d.rule_index, outcome);
        }
        let protocol = self.answering_protocol(host, protocol);
        let reply = refusal(&self.policy, verdict, rule_index, protocol);
        self.answered_locally(context_id, protocol);
        Wake::Reply(reply)
    }

    /// The protocol to answer in: a gRPC call limited by a rule that does
    /// not look at protocols still needs a gRPC answer. Only gRPC is
    /// answered differently, so `upgrade` is read only for a request whose
    /// `content-type` says gRPC (an upgrade to WebSocket wins over it).
    pub(super) fn answering_protocol(&self, host: &impl Host, protocol: Protocol) -> Protocol {
        match protocol {
            Protocol::Http if !self.needs.protocol => {
                let content_type = host.request_header("content-type");
                match Protocol::detect(content_type.as_deref(), None) {
                    Protocol::Grpc => Protocol::detect(
                        content_type.as_deref(),
                        host.request_header("upgrade").as_deref(),
                    ),
                    _ => Protocol::Http,
                }
            }
            p => p,
        }
    }

    /// Remembers that the filter answers `context_id` itself.
    pub(super) fn answered_locally(&mut self, context_id: u32, protocol: Protocol) {
        self.requests.insert(
            context_id,
            RequestState {
                protocol,
                answered_locally: true,
                ..RequestState::default()
            },
        );
    }

    /// Adds rate-limit headers to an allowed response, refunds the permits
    /// if its status is excluded from counting or else charges what the
    /// upstream reported in its headers, and starts watching a WebSocket
    /// connection once it is upgraded.
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
            let watched = watched(&self.policy, &state.stream_keys);
            state.stream = Some(Stream::WebSocket(Box::new(WebSocketStream::new(
                deflate, watched,
            ))));
        }
        let Some(verdict) = state.verdict.as_mut() else {
            return;
        };
        let excluded = status.is_some_and(|s| self.policy.exclude_statuses.contains(s))
            // A trailers-only gRPC response has its status here.
            || excluded_grpc(&self.policy, || host.response_header("grpc-status"));
        Response {
            policy: &self.policy,
            store: &mut self.store,
            metrics: &self.metrics,
            host,
        }
        .account(&mut verdict.charges, excluded, Reported::Headers);
        // A degraded response tells the client about its limits even when
        // allowed responses do not: it is not the full answer.
        let tells = self.policy.headers_on_allowed || verdict.is_degraded();
        if tells && !self.policy.header_sets.is_empty() {
            verdict.headers_in(&self.policy, &mut self.header_value, |name, value| {
                host.set_response_header(name, value)
            });
        }
    }

    /// Counts the messages in a body chunk travelling `direction` against
    /// the stream rules, rewriting the chunk when a message is refused or
    /// dropped. A gRPC message refused before the response started ends
    /// the call with a reply; after it, the call is cut: the upstream has
    /// `grpc_cut_grace` to end it (its trailers are then rewritten), else a
    /// tick resets it.
    pub fn on_body(
        &mut self,
        host: &impl Host,
        context_id: u32,
        direction: Direction,
        size: usize,
        end_of_stream: bool,
    ) -> Step {
        let step = self.judge_body(host, context_id, direction, size, end_of_stream);
        // Message outcomes may wait for a flush, which a tick then makes.
        self.ask_ticks(host);
        step
    }

    /// [`Self::on_body`], up to the tick it needs.
    fn judge_body(
        &mut self,
        host: &impl Host,
        context_id: u32,
        direction: Direction,
        size: usize,
        end_of_stream: bool,
    ) -> Step {
        let Some(state) = self.requests.get_mut(&context_id) else {
            return Step::Continue;
        };
        // Most requests have no stream to watch, and a stream reads only
        // the chunks that can hold messages its rules count.
        let Some(stream) = state.stream.as_mut() else {
            return Step::Continue;
        };
        if stream.passes_unread(direction, size) {
            return Step::Continue;
        }
        // An empty chunk (an end of stream alone) has nothing to read.
        let bytes = if size == 0 {
            Vec::new()
        } else {
            host.body(direction, size).unwrap_or_default()
        };
        let mut judge = StreamJudge {
            policy: &self.policy,
            store: &mut self.store,
            metrics: &self.metrics,
            host,
            keys: &state.stream_keys,
            protocol: state.protocol,
            now: None,
        };
        let edit = match stream {
            Stream::Grpc(g) => g.chunk(&mut judge, direction, &bytes, state.response_started),
            Stream::WebSocket(w) => w.chunk(&mut judge, direction, &bytes),
        };
        let judged_at = judge.now;
        let request_cut = matches!(stream, Stream::Grpc(g) if g.blocked(Direction::Client));
        match edit {
            Edit::Keep => Step::Continue,
            Edit::Replace(new) => {
                host.set_body(direction, bytes.len(), &new);
                Step::Continue
            }
            Edit::Cut(new) => {
                host.set_body(direction, bytes.len(), &new);
                let now = judged_at.unwrap_or_else(|| host.now());
                let deadline = now.plus(self.policy.grpc_cut_grace);
                // A reset asked for below stays among the cuts until the
                // stream is done: should the host not reset it from inside
                // a body callback, the tick still does once the grace has
                // passed.
                self.cuts.push(context_id, deadline);
                Step::Continue
            }
            Edit::RefuseCall {
                status,
                message,
                metadata,
            } => {
                state.answered_locally = true;
                Step::Reply(grpc_refusal(status, metadata, &message))
            }
        }
        .cut_request_ends(request_cut && direction == Direction::Client && end_of_stream)
    }

    /// Refunds a gRPC call whose status is excluded from counting, or
    /// charges what the upstream reported in trailers; rewrites the
    /// trailers of a gRPC call cut after the response started, so the
    /// client sees the cut's status (RESOURCE_EXHAUSTED).
    pub fn on_response_trailers(&mut self, host: &impl Host, context_id: u32) {
        // The upstream's own status and usage, read before a cut rewrites them.
        let excluded = excluded_grpc(&self.policy, || host.response_trailer("grpc-status"));
        let verdict = self
            .requests
            .get_mut(&context_id)
            .filter(|s| !s.answered_locally)
            .and_then(|s| s.verdict.as_mut());
        if let Some(verdict) = verdict {
            Response {
                policy: &self.policy,
                store: &mut self.store,
                metrics: &self.metrics,
                host,
            }
            .account(&mut verdict.charges, excluded, Reported::Trailers);
        }
        let cut = self
            .requests
            .get(&context_id)
            .and_then(|s| match &s.stream {
                Some(Stream::Grpc(g)) => g.cut().cloned(),
                _ => None,
            });
        if let Some(cut) = cut {
            // The upstream ended the call in time: no reset needed.
            self.cuts.forget(context_id);
            host.set_response_trailer("grpc-status", &cut.status.to_string());
            host.set_response_trailer("grpc-message", &cut.message);
        }
    }

    /// Forgets a finished request (also one the client abandoned while
    /// delayed), giving back its in-flight permits.
    pub fn on_done(&mut self, host: &impl Host, context_id: u32) {
        let Some(state) = self.requests.remove(&context_id) else {
            // Never admitted nor answered: it may still be delayed or
            // waiting for the quota server (an admitted request is neither).
            self.delayed.forget(context_id);
            self.forget_asking(host, context_id);
            return;
        };
        self.cuts.forget(context_id);
        if !state.in_flight_permits.is_empty() {
            let permits = &state.in_flight_permits;
            if let Err(e) = engine::refund(&self.policy, &mut self.store, permits, host.now()) {
                self.metrics.error(host);
                host.warn(&format!("sluice: releasing in-flight permits failed: {e}"));
            }
        }
        if !state.gauges.is_empty() {
            for rule_index in state.gauges {
                self.metrics.open(rule_index, -1);
            }
            // Their moves wait for a flush, which a tick then makes.
            self.ask_ticks(host);
        }
    }

    /// What the rule at `rule_index` counts.
    fn counts(&self, rule_index: usize) -> Option<Counts> {
        self.policy.rules.get(rule_index).map(|r| r.counts)
    }

    /// Counts the store's evictions and full-table outcomes since the last report.
    pub(super) fn report_keys(&mut self, host: &impl Host) {
        let now = self.store.stats();
        self.metrics.keys(host, self.keys_reported, now);
        self.keys_reported = now;
    }
}

/// The directions the stream rules of `stream_keys` count.
fn watched(policy: &Policy, stream_keys: &[(usize, String)]) -> Watched {
    Watched::of(
        stream_keys
            .iter()
            .filter_map(|(i, _)| policy.rules.get(*i)?.counts.flow()),
    )
}

/// Whether a response's `grpc-status` (read only when gRPC statuses are
/// excluded) is excluded from counting.
fn excluded_grpc(policy: &Policy, status: impl FnOnce() -> Option<String>) -> bool {
    policy.exclude_statuses.has_grpc()
        && status().is_some_and(|s| policy.exclude_statuses.contains_grpc(&s))
}

/// Where the upstream's report is read.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reported {
    /// The response headers (and, for a trailers-only response, which has
    /// no trailers, the usage a `response_trailer` rule reads too).
    Headers,
    /// The response trailers.
    Trailers,
}

/// What a response settles: the permits an admitted request took.
struct Response<'a, B, H> {
    policy: &'a Policy,
    store: &'a mut SlotStore<B>,
    metrics: &'a Metrics,
    host: &'a H,
}

impl<B: SharedBytes, H: Host> Response<'_, B, H> {
    /// Refunds `charges` if the response's status is `excluded` from
    /// counting, else charges what the upstream reported in `place`.
    fn account(&mut self, charges: &mut Vec<Charge>, excluded: bool, place: Reported) {
        if excluded {
            self.refund(charges);
        } else {
            self.settle(charges, place);
        }
    }

    /// Gives back the permits of `charges` that count requests (in-flight
    /// permits are released when the request ends), and forgets them, so
    /// nothing is given back or charged twice.
    fn refund(&mut self, charges: &mut Vec<Charge>) {
        let policy = self.policy;
        let (requests, others): (Vec<Charge>, Vec<Charge>) =
            std::mem::take(charges).into_iter().partition(|c| {
                policy
                    .rules
                    .get(c.rule_index)
                    .is_some_and(|r| r.counts == Counts::Requests)
            });
        *charges = others;
        if let Err(e) = engine::refund(policy, self.store, &requests, self.host.now()) {
            self.metrics.error(self.host);
            self.host.warn(&format!("sluice: refund failed: {e}"));
        }
    }

    /// Charges each rule with `charge` what the upstream reported in
    /// `place`, in place of what the request took at admission; a missing
    /// or unreadable report leaves that.
    fn settle(&mut self, charges: &mut [Charge], place: Reported) {
        let policy = self.policy;
        let host = self.host;
        // Asked at most once, and only when a trailer rule needs it.
        let mut trailers_only = None;
        // Read at the first report charged, then kept for the callback
        // (see `decide_request`).
        let mut now = None;
        for charge in charges.iter_mut() {
            let Some(from) = policy
                .rules
                .get(charge.rule_index)
                .and_then(|r| r.charge.as_ref())
            else {
                continue;
            };
            let report = match (place, from.reported_in) {
                (Reported::Headers, ReportedIn::Header) => host.response_header(&from.name),
                (Reported::Headers, ReportedIn::Trailer) => {
                    let only = *trailers_only
                        .get_or_insert_with(|| host.response_header("grpc-status").is_some());
                    if !only {
                        continue;
                    }
                    host.response_header(&from.name)
                }
                (Reported::Trailers, ReportedIn::Trailer) => host.response_trailer(&from.name),
                (Reported::Trailers, ReportedIn::Header) => continue,
            };
            let Some(used) = report.and_then(|v| read_amount(&v, from.max)) else {
                continue;
            };
            let now = *now.get_or_insert_with(|| host.now());
            if let Err(e) = engine::settle(policy, self.store, charge, used, now) {
                self.metrics.error(host);
                host.warn(&format!("sluice: charging reported usage failed: {e}"));
            }
        }
    }
}
