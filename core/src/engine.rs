//! Evaluating a policy against one request: every applicable rule must
//! allow it, and it takes permits from all of them or from none.

use alloc::string::String;
use alloc::vec::Vec;

use crate::algorithm::{Limiter, Mode, Outcome, State};
use crate::decision::{render_headers_in, Decision};
use crate::policy::{Action, Attributes, Counts, Policy, Rule};
use crate::store::{limited_for, Loaded, Room, Saved, Slot, StateStore, StoreError};
use crate::time::{Nanos, Span};

/// How often a decision is retried when another writer got in first.
/// Conflicts need two workers on one key within microseconds; running out
/// of attempts means something is badly wrong, and is reported as an error.
pub const MAX_ATTEMPTS: usize = 32;

/// What running out of [`MAX_ATTEMPTS`] reports.
const CONTENDED: StoreError = StoreError::Unavailable("too many concurrent writers on one key");

/// Permits a request took from one rule's key: what a refund gives back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Charge {
    /// Position of the rule in the policy.
    pub rule_index: usize,
    /// The key charged.
    pub key: String,
    /// Permits taken.
    pub cost: u64,
    /// Where they were taken: the key's own state or the rule's overflow
    /// state. A refund goes back there only.
    pub room: Room,
}

/// A request for `cost` permits from one rule's key.
#[derive(Clone, Copy, Debug)]
pub struct Claim<'a> {
    /// Which rule and key.
    pub slot: Slot<'a>,
    /// Permits asked for.
    pub cost: u64,
}

/// One applicable rule's part in a verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleDecision {
    /// Position of the rule in the policy.
    pub rule_index: usize,
    /// What the rule decided.
    pub decision: Decision,
    /// A shadow rule that would have limited the request.
    pub shadow_limited: bool,
    /// A degrade rule that limited the request: it goes through marked,
    /// having taken nothing from the rule.
    pub degraded: bool,
}

/// What to do with the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VerdictKind {
    /// Let it through.
    Allowed,
    /// Refuse it because of the rule at this position.
    Limited {
        /// Position of the rule in the policy.
        rule_index: usize,
    },
    /// Every limiting rule delays, and a permit frees up within their
    /// remaining delay: ask again after `wait`.
    Wait {
        /// How long to hold the request before asking again.
        wait: Span,
    },
}

/// The outcome of evaluating a policy for one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// Allow, refuse or wait.
    pub kind: VerdictKind,
    /// Each applicable rule's decision, in policy order.
    pub decisions: Vec<RuleDecision>,
    /// Permits taken (only when allowed).
    pub charges: Vec<Charge>,
}

impl Verdict {
    /// The verdict for a request no rule applies to.
    pub fn unlimited() -> Verdict {
        Verdict {
            kind: VerdictKind::Allowed,
            decisions: Vec::new(),
            charges: Vec::new(),
        }
    }

    /// Whether the request goes through now.
    pub fn is_allowed(&self) -> bool {
        self.kind == VerdictKind::Allowed
    }

    /// Names of the rules that degraded the request, in policy order
    /// (none unless it goes through).
    pub fn degraded_by<'a>(&'a self, policy: &'a Policy) -> impl Iterator<Item = &'a str> + 'a {
        self.decisions
            .iter()
            .filter(|d| d.degraded && self.is_allowed())
            .filter_map(|d| policy.rules.get(d.rule_index))
            .map(|r| r.name.as_str())
    }

    /// Whether some rule degraded the request.
    pub fn is_degraded(&self) -> bool {
        self.is_allowed() && self.decisions.iter().any(|d| d.degraded)
    }

    /// The decision shown in `X-RateLimit-*` and `Retry-After`: the
    /// limiting rule's, or the most restrictive rate rule's. Shadow rules
    /// are dry runs and never shown; in-flight bounds have no window to
    /// report unless they are what refused the request.
    pub fn shown(&self, policy: &Policy) -> Option<Decision> {
        match self.kind {
            VerdictKind::Limited { rule_index } => self
                .decisions
                .iter()
                .find(|d| d.rule_index == rule_index)
                .map(|d| d.decision),
            _ => self
                .listed(policy)
                .map(|(_, d)| d)
                .reduce(Decision::more_restrictive),
        }
    }

    /// The rate rules clients are told about, by name: not shadow rules
    /// (dry runs), not bounds without a window (in-flight, message size).
    fn listed<'a>(
        &'a self,
        policy: &'a Policy,
    ) -> impl Iterator<Item = (&'a str, Decision)> + Clone + 'a {
        self.decisions.iter().filter_map(move |d| {
            policy
                .rules
                .get(d.rule_index)
                .filter(|r| {
                    r.action != Action::Shadow
                        && !matches!(r.counts, Counts::InFlight | Counts::MessageSize(_))
                })
                .map(|r| (r.name.as_str(), d.decision))
        })
    }

    /// Emits the rate-limit headers for this verdict under `policy`'s
    /// header options. A request that goes through gets no `Retry-After`,
    /// even when a degrade rule limited it: it needs no retry.
    pub fn headers(&self, policy: &Policy, emit: impl FnMut(&'static str, &str)) {
        self.headers_in(policy, &mut String::new(), emit);
    }

    /// [`Verdict::headers`], building each value in `value` (see
    /// [`render_headers_in`]).
    pub fn headers_in(
        &self,
        policy: &Policy,
        value: &mut String,
        emit: impl FnMut(&'static str, &str),
    ) {
        if let Some(shown) = self.shown(policy) {
            let shown = if self.is_allowed() {
                Decision {
                    allowed: true,
                    ..shown
                }
            } else {
                shown
            };
            render_headers_in(self.listed(policy), shown, policy.header_sets, value, emit);
        }
    }
}

/// The rules that apply to `request`, each with its key, in evaluation
/// order. A rule applies when its match holds and its key can be built.
///
/// Precedence: of the rules sharing a `group`, only the first in
/// evaluation order that applies counts; the group's later rules are
/// skipped. A `shadow` rule of a group is a dry run of adding it there:
/// it applies when reached, but does not take the group's place, so the
/// rule that would apply without it still does. Rules without a group
/// always apply. Every caller (request rules, stream rules, synced rules,
/// the simulator) chooses its rules here.
pub fn applicable_rules(policy: &Policy, request: &impl Attributes) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    // Groups whose enforcing rule is chosen: few, so a list will do.
    let mut taken: Vec<&str> = Vec::new();
    for (index, rule) in policy.rules.iter().enumerate() {
        let group = rule.group.as_deref();
        if group.is_some_and(|g| taken.contains(&g)) || !rule.matcher.matches(request) {
            continue;
        }
        let mut key = String::with_capacity(KEY_CAPACITY);
        if !rule.key.build(request, &policy.client_ip, &mut key) {
            continue;
        }
        out.push((index, key));
        if let Some(g) = group.filter(|_| rule.action != Action::Shadow) {
            taken.push(g);
        }
    }
    out
}

/// Room reserved for a key as it is built: most keys (an address, a user
/// id, each with its length prefix) fit, so building one allocates once.
const KEY_CAPACITY: usize = 48;

/// What a request costs under the rules whose cost it sets (`cost_from`),
/// by rule position; every other rule takes its own `cost`. Kept with a
/// request that waits (delay, quota server), whose headers are gone then.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Costs(Vec<(usize, u64)>);

impl Costs {
    /// The costs `request` sets under the rules of `keys`.
    pub fn of(policy: &Policy, request: &impl Attributes, keys: &[(usize, String)]) -> Costs {
        Costs(
            keys.iter()
                .filter_map(|(i, _)| {
                    let rule = policy.rules.get(*i)?;
                    rule.cost_from.as_ref()?;
                    Some((*i, rule.request_cost(request)))
                })
                .collect(),
        )
    }

    /// The request's cost under the rule at `rule_index`, if it set one.
    pub fn get(&self, rule_index: usize) -> Option<u64> {
        self.0
            .iter()
            .find(|(i, _)| *i == rule_index)
            .map(|(_, c)| *c)
    }

    /// The request's cost under `rule` at `rule_index`.
    pub fn of_rule(&self, rule_index: usize, rule: &Rule) -> u64 {
        self.get(rule_index).unwrap_or(rule.cost)
    }
}

/// Decides for `request` at `now`, taking permits if it is allowed.
///
/// `waited` is how long the request has already been held by a delay
/// action (zero on first evaluation): it counts against `max_delay`.
pub fn decide<S: StateStore>(
    policy: &Policy,
    store: &mut S,
    request: &impl Attributes,
    now: Nanos,
    waited: Span,
) -> Result<Verdict, StoreError> {
    let keys = applicable_rules(policy, request);
    let costs = Costs::of(policy, request, &keys);
    decide_keys(policy, store, &keys, &costs, now, waited)
}

/// [`decide`] for rules and keys already chosen, each taking its rule's
/// cost unless `costs` says otherwise.
pub fn decide_keys<S: StateStore>(
    policy: &Policy,
    store: &mut S,
    keys: &[(usize, String)],
    costs: &Costs,
    now: Nanos,
    waited: Span,
) -> Result<Verdict, StoreError> {
    if let [(rule_index, key)] = keys {
        // One rule, the common case: no list of claims to build.
        let claim = claim(policy, *rule_index, key, costs.get(*rule_index));
        return decide_claims(store, claim.as_slice(), now, waited);
    }
    let claims = claims(
        policy,
        keys.iter().map(|(i, k)| (*i, k.as_str(), costs.get(*i))),
    );
    decide_claims(store, &claims, now, waited)
}

/// The claim of the rule at `rule_index` on `key`, at `cost` (`None`: the
/// rule's own); `None` for an unknown rule.
fn claim<'a>(
    policy: &'a Policy,
    rule_index: usize,
    key: &'a str,
    cost: Option<u64>,
) -> Option<Claim<'a>> {
    policy.rules.get(rule_index).map(|rule| Claim {
        slot: Slot {
            rule_index,
            rule,
            key,
        },
        cost: cost.unwrap_or(rule.cost),
    })
}

/// The claims for `(rule index, key, cost)` triples; `None` takes the
/// rule's own cost. Unknown rule indices are skipped.
fn claims<'a>(
    policy: &'a Policy,
    items: impl Iterator<Item = (usize, &'a str, Option<u64>)>,
) -> Vec<Claim<'a>> {
    items
        .filter_map(|(rule_index, key, cost)| claim(policy, rule_index, key, cost))
        .collect()
}

/// Decides a set of claims all-or-nothing: the core of [`decide`], for
/// hosts that choose rules, keys and costs themselves.
pub fn decide_claims<S: StateStore>(
    store: &mut S,
    claims: &[Claim<'_>],
    now: Nanos,
    waited: Span,
) -> Result<Verdict, StoreError> {
    decide_claims_listing(store, claims, now, waited, Charges::Listed)
}

/// [`decide_claims`] for a host that gives no permits back from the
/// verdict (stream messages never; the quota server from its own claims):
/// the verdict's `charges` stay empty, which spares a copy of each key.
pub fn decide_claims_unlisted<S: StateStore>(
    store: &mut S,
    claims: &[Claim<'_>],
    now: Nanos,
    waited: Span,
) -> Result<Verdict, StoreError> {
    decide_claims_listing(store, claims, now, waited, Charges::Unlisted)
}

/// Whether a verdict lists the permits it took.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Charges {
    Listed,
    Unlisted,
}

/// [`decide_claims`], listing the charges or not.
fn decide_claims_listing<S: StateStore>(
    store: &mut S,
    claims: &[Claim<'_>],
    now: Nanos,
    waited: Span,
    charges: Charges,
) -> Result<Verdict, StoreError> {
    for _ in 0..MAX_ATTEMPTS {
        let verdict = match claims {
            [] => return Ok(Verdict::unlimited()),
            // A block starts on a final refusal only, which `check` cannot
            // know: such rules take the general path.
            [claim] if claim.slot.rule.block_duration.is_none() => {
                attempt_one(store, claim, now, waited, charges)?
            }
            _ => attempt(store, claims, now, waited, charges)?,
        };
        if let Some(verdict) = verdict {
            return Ok(verdict);
        }
    }
    Err(CONTENDED)
}

/// [`attempt`] for a single rule: one store step, nothing to roll back.
fn attempt_one<S: StateStore>(
    store: &mut S,
    claim: &Claim<'_>,
    now: Nanos,
    waited: Span,
    listed: Charges,
) -> Result<Option<Verdict>, StoreError> {
    let Some((outcome, room)) = store.check(claim.slot, claim.cost, now)? else {
        return Ok(None);
    };
    let claims = core::slice::from_ref(claim);
    let outcomes = [outcome];
    let blocking = |_: usize| !outcome.allowed && claim.slot.rule.action.stops();
    let (kind, charges) = if blocking(0) {
        (
            blocked_kind(claims, &outcomes, waited, &blocking),
            Vec::new(),
        )
    } else if outcome.allowed && listed == Charges::Listed {
        let charge = Charge {
            rule_index: claim.slot.rule_index,
            key: claim.slot.key.into(),
            cost: claim.cost,
            room,
        };
        (VerdictKind::Allowed, alloc::vec![charge])
    } else {
        (VerdictKind::Allowed, Vec::new())
    };
    Ok(Some(Verdict {
        kind,
        decisions: rule_decisions(claims, &outcomes),
        charges,
    }))
}

/// One optimistic pass: `None` when another writer interfered.
fn attempt<S: StateStore>(
    store: &mut S,
    claims: &[Claim<'_>],
    now: Nanos,
    waited: Span,
    listed: Charges,
) -> Result<Option<Verdict>, StoreError> {
    let mut loaded: Vec<Loaded<S::Version>> = Vec::with_capacity(claims.len());
    for claim in claims {
        match store.load(claim.slot, now) {
            Ok(l) => loaded.push(l),
            Err(e) => {
                release_all(store, claims, loaded, now);
                return Err(e);
            }
        }
    }
    let mut outcomes: Vec<Outcome> = claims
        .iter()
        .zip(loaded.iter_mut())
        .map(|(c, l)| l.acquire(c.slot.rule, now, c.cost, Mode::Peek))
        .collect();
    let blocking = |i: usize| !outcomes[i].allowed && claims[i].slot.rule.action.stops();

    // Every limit found (refusing or not) rests on a state still stored.
    for ((claim, l), outcome) in claims.iter().zip(&loaded).zip(&outcomes) {
        if outcome.allowed {
            continue;
        }
        match store.confirm(claim.slot, &l.version, now) {
            Ok(true) => {}
            confirmed => {
                release_all(store, claims, loaded, now);
                return confirmed.map(|_| None);
            }
        }
    }

    if (0..claims.len()).any(blocking) {
        let kind = blocked_kind(claims, &outcomes, waited, &blocking);
        let refused = matches!(kind, VerdictKind::Limited { .. });
        let blocks: Vec<Nanos> = claims
            .iter()
            .zip(&loaded)
            .zip(&outcomes)
            .map(|((claim, l), outcome)| block_from(claim, l, outcome, refused, now))
            .collect();
        let standing = standing_outcomes(claims, &mut loaded, &outcomes, &blocks, now);
        // The refusal is told by the rule that keeps the client out
        // longest, a block included (blocks only lengthen waits, so the
        // request stays refused).
        let kind = if refused {
            blocked_kind(claims, &standing, waited, &blocking)
        } else {
            kind
        };
        give_back(store, claims, loaded, &standing, &blocks, now);
        let decisions = rule_decisions(claims, &standing);
        return Ok(Some(Verdict {
            kind,
            decisions,
            charges: Vec::new(),
        }));
    }

    let mut taken: Vec<(Claim<'_>, Room)> = Vec::with_capacity(claims.len());
    // Each peeked outcome gives way to the final one in place: nothing
    // reads another claim's.
    let mut pending = claims.iter().zip(loaded).zip(outcomes.iter_mut());
    while let Some(((claim, mut l), outcome)) = pending.next() {
        if !outcome.allowed {
            // A shadow or degrade rule that limits: it takes nothing (and
            // starts its block, if it has one).
            let block = block_from(claim, &l, outcome, false, now);
            *outcome = with_block(*outcome, block, now);
            store.refuse(claim.slot, l.state, l.version, outcome, block, now);
            continue;
        }
        *outcome = l.acquire(claim.slot.rule, now, claim.cost, Mode::Consume);
        let room = l.room;
        let saved = store.save(claim.slot, l.state, l.version, now);
        match saved {
            Ok(Saved::Stored) => taken.push((*claim, room)),
            Ok(Saved::Conflict) | Err(_) => {
                for ((claim, rest), _) in pending {
                    store.release(claim.slot, rest.state, rest.version, now);
                }
                for (claim, room) in &taken {
                    refund_at(store, claim, *room, now)?;
                }
                return saved.map(|_| None);
            }
        }
    }
    let charges = match listed {
        Charges::Listed => taken
            .iter()
            .map(|(c, room)| Charge {
                rule_index: c.slot.rule_index,
                key: c.slot.key.into(),
                cost: c.cost,
                room: *room,
            })
            .collect(),
        Charges::Unlisted => Vec::new(),
    };
    Ok(Some(Verdict {
        kind: VerdictKind::Allowed,
        decisions: rule_decisions(claims, &outcomes),
        charges,
    }))
}

/// Gives back `loaded` (the states of the first of `claims`) unchanged.
fn release_all<S: StateStore>(
    store: &mut S,
    claims: &[Claim<'_>],
    loaded: Vec<Loaded<S::Version>>,
    now: Nanos,
) {
    for (claim, l) in claims.iter().zip(loaded) {
        store.release(claim.slot, l.state, l.version, now);
    }
}

/// When the block a limit of `claim` (with `outcome`) starts ends: now
/// plus the rule's `block_duration` if it has one, the key has a state
/// of its own and is not blocked already (attempts while blocked do not
/// extend a block), and the limit is final: the request is `refused`, or
/// the rule only reports or marks it (shadow, degrade). A delay rule's
/// wait starts nothing. Zero when no block starts.
fn block_from<V>(
    claim: &Claim<'_>,
    loaded: &Loaded<V>,
    outcome: &Outcome,
    refused: bool,
    now: Nanos,
) -> Nanos {
    let rule = claim.slot.rule;
    match rule.block_duration {
        Some(duration)
            if !outcome.allowed
                && loaded.room == Room::Own
                && now >= loaded.blocked_until
                && (refused || !rule.action.stops()) =>
        {
            now.plus(duration)
        }
        _ => Nanos::ZERO,
    }
}

/// `outcome` told as the block ending at `block` (zero: none started).
fn with_block(outcome: Outcome, block: Nanos, now: Nanos) -> Outcome {
    if block > now {
        outcome.blocked_until(block, now)
    } else {
        outcome
    }
}

/// The outcomes to report on a refusal: all or nothing, so a rule that
/// would have allowed gave nothing and reports its permits as they stand
/// (its peek reported them after taking the cost); a rule whose limit
/// starts a block (ending at `blocks`) reports the block.
fn standing_outcomes<V>(
    claims: &[Claim<'_>],
    loaded: &mut [Loaded<V>],
    outcomes: &[Outcome],
    blocks: &[Nanos],
    now: Nanos,
) -> Vec<Outcome> {
    claims
        .iter()
        .zip(loaded.iter_mut())
        .zip(outcomes.iter().zip(blocks))
        .map(|((claim, l), (outcome, block))| {
            if !outcome.allowed || claim.cost == 0 {
                return with_block(*outcome, *block, now);
            }
            let standing = l.acquire(claim.slot.rule, now, 0, Mode::Peek);
            Outcome {
                remaining: standing.remaining,
                reset_after: standing.reset_after,
                ..*outcome
            }
        })
        .collect()
}

/// Gives back states after a refusal: the keys refused are marked
/// limited (so no new key evicts them) and blocked until `blocks` says,
/// the others released unchanged.
fn give_back<S: StateStore>(
    store: &mut S,
    claims: &[Claim<'_>],
    loaded: Vec<Loaded<S::Version>>,
    outcomes: &[Outcome],
    blocks: &[Nanos],
    now: Nanos,
) {
    for ((claim, l), (outcome, block)) in claims.iter().zip(loaded).zip(outcomes.iter().zip(blocks))
    {
        if outcome.allowed {
            store.release(claim.slot, l.state, l.version, now);
        } else {
            store.refuse(claim.slot, l.state, l.version, outcome, *block, now);
        }
    }
}

fn rule_decisions(claims: &[Claim<'_>], outcomes: &[Outcome]) -> Vec<RuleDecision> {
    claims
        .iter()
        .zip(outcomes)
        .map(|(claim, outcome)| RuleDecision {
            rule_index: claim.slot.rule_index,
            decision: Decision::new(&claim.slot.rule.quota, outcome),
            shadow_limited: !outcome.allowed && claim.slot.rule.action == Action::Shadow,
            degraded: !outcome.allowed && claim.slot.rule.action == Action::Degrade,
        })
        .collect()
}

/// Refuse, or wait when every blocking rule delays and the longest wait
/// fits in what is left of the shortest `max_delay` among them.
fn blocked_kind(
    claims: &[Claim<'_>],
    outcomes: &[Outcome],
    waited: Span,
    blocking: &impl Fn(usize) -> bool,
) -> VerdictKind {
    let blockers = (0..claims.len()).filter(|&i| blocking(i));
    let longest = blockers
        .clone()
        .max_by_key(|&i| outcomes[i].retry_after)
        .unwrap_or(0);
    let wait = outcomes.get(longest).map_or(Span::NEVER, |o| o.retry_after);
    let budget = blockers
        .map(|i| match claims[i].slot.rule.action {
            Action::Delay { max } => Span(max.as_nanos().saturating_sub(waited.as_nanos())),
            Action::Reject | Action::Shadow | Action::Drop | Action::Degrade => Span::ZERO,
        })
        .min()
        .unwrap_or(Span::ZERO);
    if wait != Span::NEVER && wait <= budget && wait > Span::ZERO {
        VerdictKind::Wait { wait }
    } else {
        VerdictKind::Limited {
            rule_index: claims.get(longest).map_or(0, |c| c.slot.rule_index),
        }
    }
}

/// A new request's wait behind the requests already held on its delay
/// rules' keys (`queued_on(rule index, key)` counts them): a request that
/// cannot get its permits within a rule's `max_delay` once those ahead
/// have taken theirs is refused at once (by that rule) instead of being
/// held in vain; one that can waits until its turn should come. Verdicts
/// other than [`VerdictKind::Wait`] are returned as they are.
pub fn behind_queue<S: StateStore>(
    policy: &Policy,
    store: &mut S,
    verdict: Verdict,
    keys: &[(usize, String)],
    now: Nanos,
    queued_on: impl Fn(usize, &str) -> usize,
) -> Verdict {
    let VerdictKind::Wait { mut wait } = verdict.kind else {
        return verdict;
    };
    for (rule_index, key) in keys {
        let Some(rule) = policy.rules.get(*rule_index) else {
            continue;
        };
        let Action::Delay { max } = rule.action else {
            continue;
        };
        let queued = queued_on(*rule_index, key);
        if queued == 0 {
            continue;
        }
        let claim = Claim {
            slot: Slot {
                rule_index: *rule_index,
                rule,
                key,
            },
            cost: rule.cost,
        };
        match queued_wait(store, &claim, queued, now, max) {
            Ok(Some(turn)) => wait = wait.max(turn),
            Ok(None) => {
                return Verdict {
                    kind: VerdictKind::Limited {
                        rule_index: *rule_index,
                    },
                    ..verdict
                };
            }
            // The engine's own wait stands: the request is decided again
            // when it wakes.
            Err(_) => {}
        }
    }
    Verdict {
        kind: VerdictKind::Wait { wait },
        ..verdict
    }
}

/// When a request could take `claim`'s permits if `queued` requests of the
/// same cost were already waiting on its key, each taking its permits as
/// soon as they free up and nothing else arriving: the wait from `now`, or
/// `None` when that is later than `within` or never (refuse at once).
///
/// Runs the algorithm forward on a copy of the state, one step per queued
/// request; stops as soon as the wait passes `within`, so the work is
/// bounded by the requests that fit in it. A `None` rests on a state
/// still stored ([`StateStore::confirm`]): one that is not is read again,
/// up to [`MAX_ATTEMPTS`] times.
pub fn queued_wait<S: StateStore>(
    store: &mut S,
    claim: &Claim<'_>,
    queued: usize,
    now: Nanos,
    within: Span,
) -> Result<Option<Span>, StoreError> {
    for _ in 0..MAX_ATTEMPTS {
        let loaded = store.load(claim.slot, now)?;
        let mut copy = Loaded {
            state: loaded.state.clone(),
            version: (),
            room: loaded.room,
            blocked_until: loaded.blocked_until,
        };
        let turn = turn_behind(&mut copy, claim, queued, now, within);
        // A refusal rests on a state still stored, as in a decision; the
        // state is given back either way before an error is reported.
        let stands = match turn {
            Some(_) => Ok(true),
            None => store.confirm(claim.slot, &loaded.version, now),
        };
        store.release(claim.slot, loaded.state, loaded.version, now);
        if stands? {
            return Ok(turn);
        }
    }
    Err(CONTENDED)
}

/// [`queued_wait`]'s answer from `copy`, a copy of the key's state that it
/// runs forward.
fn turn_behind(
    copy: &mut Loaded<()>,
    claim: &Claim<'_>,
    queued: usize,
    now: Nanos,
    within: Span,
) -> Option<Span> {
    if copy.room == Room::Full {
        return None;
    }
    let deadline = now.plus(within);
    let mut at = now;
    for _ in 0..=queued {
        // Waiting exactly `retry_after` is enough (every algorithm is exact
        // about it), so the second try passes; a third would be a bug, and
        // is taken as "never" rather than looped on.
        let mut taken = false;
        for _ in 0..2 {
            let outcome = copy.acquire(claim.slot.rule, at, claim.cost, Mode::Consume);
            if outcome.allowed {
                taken = true;
                break;
            }
            if outcome.retry_after == Span::NEVER {
                return None;
            }
            at = at.plus(outcome.retry_after);
            if at > deadline {
                return None;
            }
        }
        if !taken {
            return None;
        }
    }
    Some(at.since(now))
}

/// Gives back the permits of `charges` (a response excluded from
/// counting, or the end of a stream holding in-flight permits), each to
/// the state that took it; a charge whose state is gone is dropped.
pub fn refund<S: StateStore>(
    policy: &Policy,
    store: &mut S,
    charges: &[Charge],
    now: Nanos,
) -> Result<(), StoreError> {
    for charge in charges {
        let Some(rule) = policy.rules.get(charge.rule_index) else {
            continue;
        };
        let claim = Claim {
            slot: Slot {
                rule_index: charge.rule_index,
                rule,
                key: &charge.key,
            },
            cost: charge.cost,
        };
        refund_at(store, &claim, charge.room, now)?;
    }
    Ok(())
}

/// Gives back the permits of `claims` to their keys' own states, for
/// hosts that do not know where they were charged: a key without its own
/// state (evicted, or charged in the overflow) loses the refund, which
/// errs on the strict side.
pub fn refund_claims<S: StateStore>(
    store: &mut S,
    claims: &[Claim<'_>],
    now: Nanos,
) -> Result<(), StoreError> {
    for claim in claims {
        refund_at(store, claim, Room::Own, now)?;
    }
    Ok(())
}

/// Settles a charge whose real cost was learnt after the response (usage
/// the upstream reported): when `used` is more than was taken, takes the
/// difference unconditionally (beyond the limit the key goes into debt,
/// and is marked limited so that no new key evicts it meanwhile); when it
/// is less, gives the difference back. Either way at the state that took
/// the charge, if it is still there. The charge then stands at `used`, so
/// a later refund gives back exactly what was taken.
pub fn settle<S: StateStore>(
    policy: &Policy,
    store: &mut S,
    charge: &mut Charge,
    used: u64,
    now: Nanos,
) -> Result<(), StoreError> {
    let Some(rule) = policy.rules.get(charge.rule_index) else {
        return Ok(());
    };
    let slot = Slot {
        rule_index: charge.rule_index,
        rule,
        key: &charge.key,
    };
    let taken = charge.cost;
    if used > taken {
        update_at(store, slot, charge.room, now, |limiter, state| {
            let after = limiter.charge(state, now, used - taken);
            if after.allowed {
                Span::ZERO
            } else {
                limited_for(&after)
            }
        })?;
    } else if used < taken {
        update_at(store, slot, charge.room, now, |limiter, state| {
            limiter.refund(state, now, taken - used);
            Span::ZERO
        })?;
    }
    charge.cost = used;
    Ok(())
}

/// Gives back `claim`'s permits to the state at `room` that took them, if
/// it is still there, retrying on conflicts. Never makes room: a refund
/// must not evict a key to write to a state that never took the charge.
fn refund_at<S: StateStore>(
    store: &mut S,
    claim: &Claim<'_>,
    room: Room,
    now: Nanos,
) -> Result<(), StoreError> {
    update_at(store, claim.slot, room, now, |limiter, state| {
        limiter.refund(state, now, claim.cost);
        Span::ZERO
    })
}

/// Applies `change` to the state at `room` that took a charge, if it is
/// still there (never making room for it), retrying on conflicts; `change`
/// returns how long to mark the key limited (see
/// [`StateStore::save_marked`]).
fn update_at<S: StateStore>(
    store: &mut S,
    slot: Slot<'_>,
    room: Room,
    now: Nanos,
    mut change: impl FnMut(&Limiter, &mut State) -> Span,
) -> Result<(), StoreError> {
    for _ in 0..MAX_ATTEMPTS {
        let Some(mut l) = store.load_charged(slot, room, now)? else {
            return Ok(());
        };
        let limited = change(&slot.rule.limiter, &mut l.state);
        if store.save_marked(slot, l.state, l.version, limited, now)? == Saved::Stored {
            return Ok(());
        }
    }
    Err(CONTENDED)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::HttpRequest;
    use crate::store::MemoryStore;
    use alloc::string::ToString;
    use alloc::vec;
    use core::net::IpAddr;

    fn policy(json: &str) -> Policy {
        Policy::from_json(json).unwrap()
    }

    fn req(ip: &str) -> HttpRequest {
        HttpRequest::new("GET", "/api/x").with_client_ip(ip.parse::<IpAddr>().unwrap())
    }

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn nth_allowed_then_limited_with_headers() {
        let p = policy(
            r#"{"rules":[{"name":"api","limit":{"count":3,"per":"1m"},"algorithm":"fixed_window"}]}"#,
        );
        let mut store = MemoryStore::new(10);
        let now = Nanos(120 * SEC + SEC / 2);
        for remaining in [2, 1, 0] {
            let v = decide(&p, &mut store, &req("1.1.1.1"), now, Span::ZERO).unwrap();
            assert!(v.is_allowed());
            assert_eq!(v.shown(&p).unwrap().remaining, remaining);
        }
        let v = decide(&p, &mut store, &req("1.1.1.1"), now, Span::ZERO).unwrap();
        assert_eq!(v.kind, VerdictKind::Limited { rule_index: 0 });
        let mut headers = vec![];
        v.headers(&p, |n, val| headers.push((n, val.to_string())));
        assert!(headers.contains(&("retry-after", "60".into())));
        assert!(headers.contains(&("ratelimit", "\"api\";r=0;t=60".into())));
        // Another client has its own budget.
        assert!(decide(&p, &mut store, &req("2.2.2.2"), now, Span::ZERO)
            .unwrap()
            .is_allowed());
    }

    #[test]
    fn unlisted_decisions_take_the_same_permits_and_list_no_charges() {
        // One rule (the single-claim path), then two (the general path).
        for rules in [
            r#"[{"name":"a","limit":{"count":2,"per":"1m"}}]"#,
            r#"[{"name":"a","limit":{"count":2,"per":"1m"}},
                {"name":"b","key":["client_ip"],"limit":{"count":5,"per":"1m"}}]"#,
        ] {
            let p = policy(&alloc::format!(r#"{{"rules":{rules}}}"#));
            let keys = applicable_rules(&p, &req("1.1.1.1"));
            let claims = claims(&p, keys.iter().map(|(i, k)| (*i, k.as_str(), None)));
            let (mut listed, mut unlisted) = (MemoryStore::new(10), MemoryStore::new(10));
            let now = Nanos(SEC);
            for _ in 0..3 {
                let l = decide_claims(&mut listed, &claims, now, Span::ZERO).unwrap();
                let u = decide_claims_unlisted(&mut unlisted, &claims, now, Span::ZERO).unwrap();
                assert_eq!((&u.kind, &u.decisions), (&l.kind, &l.decisions));
                assert!(u.charges.is_empty(), "{u:?}");
                assert_eq!(
                    l.charges.len(),
                    if l.is_allowed() { claims.len() } else { 0 }
                );
            }
        }
    }

    #[test]
    fn rejected_request_takes_nothing_from_other_rules() {
        let p = policy(
            r#"{"rules":[
                {"name":"wide","limit":{"count":10,"per":"1m"}},
                {"name":"narrow","match":{"path":{"prefix":"/api/"}},"limit":{"count":1,"per":"1m"}}
            ]}"#,
        );
        let mut store = MemoryStore::new(10);
        let now = Nanos(SEC);
        assert!(decide(&p, &mut store, &req("1.1.1.1"), now, Span::ZERO)
            .unwrap()
            .is_allowed());
        for _ in 0..5 {
            let v = decide(&p, &mut store, &req("1.1.1.1"), now, Span::ZERO).unwrap();
            assert_eq!(v.kind, VerdictKind::Limited { rule_index: 1 });
        }
        // "wide" was charged once only: 9 left before this request.
        let other = HttpRequest::new("GET", "/other").with_client_ip("1.1.1.1".parse().unwrap());
        let v = decide(&p, &mut store, &other, now, Span::ZERO).unwrap();
        assert_eq!(v.decisions[0].decision.remaining, 8);
    }

    #[test]
    fn refusal_reports_the_other_rules_as_they_stand() {
        let p = policy(
            r#"{"rules":[
                {"name":"wide","limit":{"count":10,"per":"1m"}},
                {"name":"narrow","limit":{"count":1,"per":"1m"}}
            ]}"#,
        );
        let mut store = MemoryStore::new(10);
        let now = Nanos(SEC);
        let allowed = decide(&p, &mut store, &req("1.1.1.1"), now, Span::ZERO).unwrap();
        let refused = decide(&p, &mut store, &req("1.1.1.1"), now, Span::ZERO).unwrap();
        assert_eq!(refused.kind, VerdictKind::Limited { rule_index: 1 });
        // Nothing was taken from "wide": 9 left, as the allowed answer said.
        assert_eq!(refused.decisions[0].decision, allowed.decisions[0].decision);
        let mut headers = vec![];
        refused.headers(&p, |n, val| headers.push((n, val.to_string())));
        assert!(headers.contains(&("ratelimit", "\"wide\";r=9;t=6, \"narrow\";r=0;t=60".into())));
    }

    #[test]
    fn shadow_rules_never_block_and_are_not_shown() {
        let p = policy(
            r#"{"rules":[{"name":"dry","limit":{"count":1,"per":"1m"},"action":"shadow"}]}"#,
        );
        let mut store = MemoryStore::new(10);
        let first = decide(&p, &mut store, &req("1.1.1.1"), Nanos(0), Span::ZERO).unwrap();
        assert!(first.is_allowed() && !first.decisions[0].shadow_limited);
        let second = decide(&p, &mut store, &req("1.1.1.1"), Nanos(0), Span::ZERO).unwrap();
        assert!(second.is_allowed());
        assert!(second.decisions[0].shadow_limited);
        assert!(second.charges.is_empty());
        let mut headers = 0;
        second.headers(&p, |_, _| headers += 1);
        assert_eq!(headers, 0);
    }

    #[test]
    fn delay_waits_within_budget_then_refuses() {
        let p = policy(
            r#"{"rules":[{"name":"slow","limit":{"count":1,"per":"1s"},"action":"delay","max_delay":"1500ms"}]}"#,
        );
        let mut store = MemoryStore::new(10);
        let t0 = Nanos(0);
        assert!(decide(&p, &mut store, &req("1.1.1.1"), t0, Span::ZERO)
            .unwrap()
            .is_allowed());
        let v = decide(&p, &mut store, &req("1.1.1.1"), t0, Span::ZERO).unwrap();
        assert_eq!(v.kind, VerdictKind::Wait { wait: Span::SECOND });
        // After the wait the permit is there.
        let later = Nanos(SEC);
        let v = decide(&p, &mut store, &req("1.1.1.1"), later, Span::SECOND).unwrap();
        assert!(v.is_allowed());
        // A wait longer than what is left of max_delay is refused.
        let v = decide(
            &p,
            &mut store,
            &req("1.1.1.1"),
            later,
            Span::from_millis(1000),
        )
        .unwrap();
        assert_eq!(v.kind, VerdictKind::Limited { rule_index: 0 });
    }

    #[test]
    fn queued_wait_counts_the_requests_ahead() {
        let p = policy(
            r#"{"rules":[{"name":"slow","limit":{"count":1,"per":"1s"},"action":"delay","max_delay":"2s"}]}"#,
        );
        let mut store = MemoryStore::new(10);
        let t0 = Nanos(5 * SEC);
        assert!(decide(&p, &mut store, &req("1.1.1.1"), t0, Span::ZERO)
            .unwrap()
            .is_allowed());
        let keys = applicable_rules(&p, &req("1.1.1.1"));
        let claim = claims(&p, keys.iter().map(|(i, k)| (*i, k.as_str(), None)))[0];
        let two = Span::from_secs(2);
        let wait = |store: &mut MemoryStore, queued| queued_wait(store, &claim, queued, t0, two);
        assert_eq!(wait(&mut store, 0), Ok(Some(Span::SECOND)));
        assert_eq!(wait(&mut store, 1), Ok(Some(two)));
        assert_eq!(wait(&mut store, 2), Ok(None));
        // Nothing was taken: the permit frees up after 1 s as before.
        let v = decide(&p, &mut store, &req("1.1.1.1"), t0, Span::ZERO).unwrap();
        assert_eq!(v.kind, VerdictKind::Wait { wait: Span::SECOND });
    }

    #[test]
    fn a_queue_refusal_never_rests_on_a_stale_remembered_write() {
        let p = policy(
            r#"{"rules":[{"name":"slow","key":["header:k"],"limit":{"count":2,"per":"1s"},"action":"delay","max_delay":"1s"}]}"#,
        );
        let shared = crate::store::InProcessShared::default();
        let mut one = crate::store::SlotStore::open(&shared, &p, || Some(1)).unwrap();
        let mut two = crate::store::SlotStore::open(&shared, &p, || None).unwrap();
        let now = Nanos(SEC);
        let keys = vec![(0, String::from("a"))];
        let claim = claims(&p, keys.iter().map(|(i, k)| (*i, k.as_str(), None)))[0];
        // `one` takes both permits: it remembers its write of the empty bucket.
        for _ in 0..2 {
            let v = decide_claims(&mut one, &[claim], now, Span::ZERO).unwrap();
            assert!(v.is_allowed());
        }
        // Another worker gives both back (two streams ended, say).
        refund_claims(&mut two, &[claim, claim], now).unwrap();
        // Two requests queued ahead: from the empty bucket the new one's
        // turn would come after 1.5 s (refuse at once); from the two
        // permits given back, after 0.5 s.
        let waiting = Verdict {
            kind: VerdictKind::Wait {
                wait: Span::from_millis(100),
            },
            decisions: Vec::new(),
            charges: Vec::new(),
        };
        let v = behind_queue(&p, &mut one, waiting, &keys, now, |_, _| 2);
        assert_eq!(
            v.kind,
            VerdictKind::Wait {
                wait: Span::from_millis(500)
            }
        );
    }

    #[test]
    fn refunds_restore_permits() {
        let p = policy(r#"{"rules":[{"name":"r","limit":{"count":1,"per":"1h"}}]}"#);
        let mut store = MemoryStore::new(10);
        let v = decide(&p, &mut store, &req("1.1.1.1"), Nanos(0), Span::ZERO).unwrap();
        refund(&p, &mut store, &v.charges, Nanos(1)).unwrap();
        assert!(
            decide(&p, &mut store, &req("1.1.1.1"), Nanos(2), Span::ZERO)
                .unwrap()
                .is_allowed()
        );
        assert!(
            !decide(&p, &mut store, &req("1.1.1.1"), Nanos(3), Span::ZERO)
                .unwrap()
                .is_allowed()
        );
    }

    /// Settling takes what was used beyond the admission's cost (into
    /// debt), or gives back what was not, and keeps an indebted key from
    /// being evicted by a new one.
    fn settlements_take_and_give_back<S: StateStore>(mut store: S) {
        let p = policy(r#"{"rules":[{"name":"r","limit":{"count":10,"per":"10s"}}],"max_keys":1}"#);
        let t = |ms: u64| Nanos(ms * 1_000_000);
        let mut a = allowed_as(&p, &mut store, "10.0.0.1", t(0));
        // 4 used of the 1 taken: 6 left.
        settle(&p, &mut store, &mut a.charges[0], 4, t(1)).unwrap();
        assert_eq!(a.charges[0].cost, 4);
        let b = allowed_as(&p, &mut store, "10.0.0.1", t(2));
        assert_eq!(b.decisions[0].decision.remaining, 5);
        // 30 used: 34 spent of 10, a debt repaid at 1 per second.
        let mut b = b;
        settle(&p, &mut store, &mut b.charges[0], 30, t(3)).unwrap();
        let refused = allowed_as(&p, &mut store, "10.0.0.1", t(4));
        assert_eq!(refused.kind, VerdictKind::Limited { rule_index: 0 });
        assert_eq!(
            refused.decisions[0].decision.retry_after,
            Span(24_996_000_000)
        );
        // A new key cannot evict the indebted one: it overflows.
        let c = allowed_as(&p, &mut store, "10.0.0.2", t(5));
        assert_eq!(c.charges[0].room, Room::Overflow);
        assert!(!allowed_as(&p, &mut store, "10.0.0.1", t(6)).is_allowed());
        // A refund of the settled charge gives back all 30.
        refund(&p, &mut store, &b.charges, t(7)).unwrap();
        assert!(allowed_as(&p, &mut store, "10.0.0.1", t(8)).is_allowed());
        // Less used than taken gives the rest back.
        let mut d = allowed_as(&p, &mut store, "10.0.0.1", t(9));
        let before = d.decisions[0].decision.remaining;
        d.charges[0].cost = 3;
        settle(&p, &mut store, &mut d.charges[0], 0, t(9)).unwrap();
        let e = allowed_as(&p, &mut store, "10.0.0.1", t(9));
        assert_eq!(e.decisions[0].decision.remaining, before + 2);
    }

    #[test]
    fn settlements_work_in_both_stores() {
        settlements_take_and_give_back(MemoryStore::new(1));
        let shared = crate::store::InProcessShared::default();
        let p = policy(r#"{"rules":[{"name":"r","limit":{"count":10,"per":"10s"}}],"max_keys":1}"#);
        let store = crate::store::SlotStore::open(&shared, &p, || Some(1)).unwrap();
        settlements_take_and_give_back(store);
    }

    #[test]
    fn a_request_header_sets_the_cost_within_max() {
        let p = policy(
            r#"{"rules":[{"name":"r","limit":{"count":100,"per":"1h"},"cost":2,"cost_from":{"header":"X-Cost","max":40}}]}"#,
        );
        let mut store = MemoryStore::new(10);
        let with = |v: &str| req("1.1.1.1").with_header("x-cost", v);
        let remaining = |store: &mut MemoryStore, r: &HttpRequest| {
            let v = decide(&p, store, r, Nanos(0), Span::ZERO).unwrap();
            (v.decisions[0].decision.remaining, v.charges[0].cost)
        };
        assert_eq!(remaining(&mut store, &with("10")), (90, 10));
        // Above max: charged max, never less.
        assert_eq!(
            remaining(&mut store, &with("1000000000000000000000")),
            (50, 40)
        );
        // Missing, unreadable or zero: the rule's cost.
        assert_eq!(remaining(&mut store, &req("1.1.1.1")), (48, 2));
        assert_eq!(remaining(&mut store, &with("-5")), (46, 2));
        assert_eq!(remaining(&mut store, &with("0")), (44, 2));
        // More than is left is refused and takes nothing.
        let v = decide(&p, &mut store, &with("40"), Nanos(0), Span::ZERO).unwrap();
        assert!(v.is_allowed());
        let v = decide(&p, &mut store, &with("5"), Nanos(0), Span::ZERO).unwrap();
        assert!(!v.is_allowed());
        assert_eq!(remaining(&mut store, &with("4")), (0, 4));
    }

    /// Whether `key` (a client address) is allowed at `now`.
    fn allowed_as<S: StateStore>(p: &Policy, store: &mut S, ip: &str, now: Nanos) -> Verdict {
        decide(p, store, &req(ip), now, Span::ZERO).unwrap()
    }

    /// A refund whose key was evicted meanwhile is dropped: it neither
    /// evicts the key now in its place nor lands in the overflow state.
    fn refund_of_an_evicted_key_is_dropped<S: StateStore>(mut store: S) {
        let p = policy(r#"{"rules":[{"name":"r","limit":{"count":2,"per":"1h"}}],"max_keys":1}"#);
        let t = |s: u64| Nanos(s * SEC);
        let a = allowed_as(&p, &mut store, "10.0.0.1", t(1));
        assert_eq!(a.charges[0].room, Room::Own);
        // b evicts a, then takes one of its two.
        assert!(allowed_as(&p, &mut store, "10.0.0.2", t(2)).is_allowed());
        refund(&p, &mut store, &a.charges, t(3)).unwrap();
        let b = allowed_as(&p, &mut store, "10.0.0.2", t(4));
        assert_eq!(
            b.decisions[0].decision.remaining, 0,
            "b kept its state: the refund did not evict it"
        );
        // b is refused (and so protected); c overflows, using all of it.
        assert!(!allowed_as(&p, &mut store, "10.0.0.2", t(5)).is_allowed());
        let c = allowed_as(&p, &mut store, "10.0.0.3", t(6));
        assert_eq!(c.charges[0].room, Room::Overflow);
        assert!(allowed_as(&p, &mut store, "10.0.0.4", t(6)).is_allowed());
        // a's refund finds no own state: the overflow never took it.
        refund(&p, &mut store, &a.charges, t(7)).unwrap();
        assert!(
            !allowed_as(&p, &mut store, "10.0.0.5", t(8)).is_allowed(),
            "the overflow got a refund it never took"
        );
        // c's own refund goes back to the overflow, which took it.
        refund(&p, &mut store, &c.charges, t(9)).unwrap();
        assert!(allowed_as(&p, &mut store, "10.0.0.5", t(10)).is_allowed());
    }

    #[test]
    fn refunds_go_only_where_they_were_charged() {
        refund_of_an_evicted_key_is_dropped(MemoryStore::new(1));
        let shared = crate::store::InProcessShared::default();
        let p = policy(r#"{"rules":[{"name":"r","limit":{"count":2,"per":"1h"}}],"max_keys":1}"#);
        let store = crate::store::SlotStore::open(&shared, &p, || Some(1)).unwrap();
        refund_of_an_evicted_key_is_dropped(store);
    }

    #[test]
    fn an_overflowed_in_flight_permit_goes_back_to_the_overflow() {
        let p = policy(
            r#"{"rules":[{"name":"open","counts":"in_flight","match":{"websocket":true},"limit":{"count":2}}],"max_keys":1}"#,
        );
        let mut store = MemoryStore::new(1);
        let ws = |ip: &str| req(ip).with_protocol(crate::policy::Protocol::WebSocket);
        let open = |store: &mut MemoryStore, ip: &str| {
            decide(&p, store, &ws(ip), Nanos(SEC), Span::ZERO).unwrap()
        };
        let a = open(&mut store, "10.0.0.1");
        // a holds the only place: b's stream is counted in the overflow.
        let b = open(&mut store, "10.0.0.2");
        assert_eq!(b.charges[0].room, Room::Overflow);
        // a's stream ends, b's next stream gets a's place.
        refund(&p, &mut store, &a.charges, Nanos(SEC)).unwrap();
        assert_eq!(open(&mut store, "10.0.0.2").charges[0].room, Room::Own);
        // b's first stream ends: the overflow gives its permit back.
        refund(&p, &mut store, &b.charges, Nanos(SEC)).unwrap();
        assert!(open(&mut store, "10.0.0.2").is_allowed());
        assert!(
            !open(&mut store, "10.0.0.2").is_allowed(),
            "b holds two: its own state was refunded what the overflow took"
        );
    }

    #[test]
    fn rules_that_do_not_match_or_lack_key_parts_are_skipped() {
        let p = policy(
            r#"{"rules":[{"name":"k","key":["header:x-api-key"],"limit":{"count":1,"per":"1h"}}]}"#,
        );
        let mut store = MemoryStore::new(10);
        for _ in 0..3 {
            let v = decide(&p, &mut store, &req("1.1.1.1"), Nanos(0), Span::ZERO).unwrap();
            assert!(v.is_allowed() && v.decisions.is_empty());
        }
        let keyed = req("1.1.1.1").with_header("x-api-key", "a");
        assert!(decide(&p, &mut store, &keyed, Nanos(0), Span::ZERO)
            .unwrap()
            .is_allowed());
        assert!(!decide(&p, &mut store, &keyed, Nanos(0), Span::ZERO)
            .unwrap()
            .is_allowed());
    }

    /// The names of the rules that apply to `request`.
    fn chosen<'p>(p: &'p Policy, request: &HttpRequest) -> Vec<&'p str> {
        applicable_rules(p, request)
            .into_iter()
            .map(|(i, _)| p.rules[i].name.as_str())
            .collect()
    }

    #[test]
    fn tiers_take_the_first_rule_of_their_group_that_applies() {
        let p = policy(
            r#"{"rules":[
                {"name":"anonymous","group":"tier","limit":{"count":2,"per":"1h"}},
                {"name":"authenticated","group":"tier","key":["header:x-api-key"],"limit":{"count":4,"per":"1h"},"priority":1},
                {"name":"internal","group":"tier","match":{"headers":[{"name":"x-tier","value":"internal"}]},"scope":"global","limit":{"count":100,"per":"1h"},"priority":2},
                {"name":"everyone","scope":"global","limit":{"count":1000,"per":"1h"}}
            ]}"#,
        );
        let anonymous = req("1.1.1.1");
        let keyed = req("1.1.1.1").with_header("x-api-key", "k");
        let internal = keyed.clone().with_header("x-tier", "internal");
        assert_eq!(chosen(&p, &anonymous), ["anonymous", "everyone"]);
        assert_eq!(chosen(&p, &keyed), ["authenticated", "everyone"]);
        assert_eq!(chosen(&p, &internal), ["internal", "everyone"]);
        // The keyed client is not held to the anonymous per-IP limit.
        let mut store = MemoryStore::new(10);
        let allowed = |store: &mut MemoryStore, r: &HttpRequest| {
            decide(&p, store, r, Nanos(SEC), Span::ZERO)
                .unwrap()
                .is_allowed()
        };
        assert!(allowed(&mut store, &anonymous) && allowed(&mut store, &anonymous));
        assert!(!allowed(&mut store, &anonymous));
        for _ in 0..4 {
            assert!(allowed(&mut store, &keyed));
        }
        let v = decide(&p, &mut store, &keyed, Nanos(SEC), Span::ZERO).unwrap();
        let authenticated = p.rules.iter().position(|r| r.name == "authenticated");
        assert_eq!(
            v.kind,
            VerdictKind::Limited {
                rule_index: authenticated.unwrap()
            }
        );
        assert!(allowed(&mut store, &internal));
    }

    #[test]
    fn a_method_override_replaces_the_default_and_an_exception_its_rule() {
        let p = policy(
            r#"{"rules":[
                {"name":"default","group":"calls","match":{"grpc":{}},"limit":{"count":100,"per":"1m"}},
                {"name":"get-product","group":"calls","match":{"grpc":{"service":"shop.Catalog","method":"GetProduct"}},"limit":{"count":500,"per":"1m"},"priority":1},
                {"name":"customers","group":"customer","key":["header:x-customer"],"limit":{"count":100,"per":"1m"}},
                {"name":"acme","group":"customer","match":{"headers":[{"name":"x-customer","value":"acme"}]},"key":["header:x-customer"],"limit":{"count":5000,"per":"1m"},"priority":1}
            ]}"#,
        );
        let call = |method: &str| {
            HttpRequest::new("POST", &alloc::format!("/shop.Catalog/{method}"))
                .with_client_ip("1.1.1.1".parse().unwrap())
                .with_protocol(crate::policy::Protocol::Grpc)
        };
        assert_eq!(chosen(&p, &call("GetProduct")), ["get-product"]);
        assert_eq!(chosen(&p, &call("ListProducts")), ["default"]);
        let from = |customer: &str| call("ListProducts").with_header("x-customer", customer);
        assert_eq!(chosen(&p, &from("acme")), ["acme", "default"]);
        assert_eq!(chosen(&p, &from("globex")), ["default", "customers"]);
    }

    #[test]
    fn a_shadow_rule_in_a_group_is_a_dry_run_that_takes_no_place() {
        let p = policy(
            r#"{"rules":[
                {"name":"default","group":"g","limit":{"count":1,"per":"1h"}},
                {"name":"trial","group":"g","match":{"path":{"prefix":"/api/"}},"limit":{"count":5,"per":"1h"},"action":"shadow","priority":2},
                {"name":"above","group":"g","match":{"path":{"prefix":"/api/"}},"limit":{"count":3,"per":"1h"},"priority":1},
                {"name":"below","group":"g","limit":{"count":1,"per":"1h"},"action":"shadow","priority":-1}
            ]}"#,
        );
        // The dry run applies, and so does the rule it would replace; the
        // shadow rule after the chosen one is never reached.
        assert_eq!(chosen(&p, &req("1.1.1.1")), ["trial", "above"]);
        let other = HttpRequest::new("GET", "/x").with_client_ip("1.1.1.1".parse().unwrap());
        assert_eq!(chosen(&p, &other), ["default"]);
    }

    #[test]
    fn ipv6_clients_share_a_limit_per_network() {
        let allowed = |p: &Policy, store: &mut MemoryStore, ip: &str| {
            decide(p, store, &req(ip), Nanos(SEC), Span::ZERO)
                .unwrap()
                .is_allowed()
        };
        let rule = r#"{"name":"r","limit":{"count":1,"per":"1h"}}"#;
        let per_64 = policy(&alloc::format!(r#"{{"rules":[{rule}]}}"#));
        let mut store = MemoryStore::new(10);
        assert!(allowed(&per_64, &mut store, "2001:db8:0:1::1"));
        assert!(!allowed(&per_64, &mut store, "2001:db8:0:1::2"));
        assert!(!allowed(&per_64, &mut store, "2001:db8:0:1:ffff::9"));
        assert!(allowed(&per_64, &mut store, "2001:db8:0:2::1"));
        let per_host = policy(&alloc::format!(
            r#"{{"rules":[{rule}],"client_ip":{{"ipv6_prefix":128}}}}"#
        ));
        let mut store = MemoryStore::new(10);
        assert!(allowed(&per_host, &mut store, "2001:db8:0:1::1"));
        assert!(allowed(&per_host, &mut store, "2001:db8:0:1::2"));
        assert!(!allowed(&per_host, &mut store, "2001:db8:0:1::2"));
    }

    #[test]
    fn paths_ignoring_case_share_one_counter() {
        let config = |ignore_case: bool| {
            policy(&alloc::format!(
                r#"{{"rules":[{{"name":"r","match":{{"path":{{"prefix":"/api/","ignore_case":{ignore_case}}}}},"key":["path"],"limit":{{"count":1,"per":"1h"}}}}]}}"#
            ))
        };
        let allowed = |p: &Policy, store: &mut MemoryStore, path: &str| {
            let request = HttpRequest::new("GET", path);
            decide(p, store, &request, Nanos(SEC), Span::ZERO)
                .unwrap()
                .is_allowed()
        };
        let folded = config(true);
        let mut store = MemoryStore::new(10);
        assert!(allowed(&folded, &mut store, "/api/x"));
        assert!(!allowed(&folded, &mut store, "/API/x"));
        assert!(!allowed(&folded, &mut store, "/Api/X"));
        assert!(allowed(&folded, &mut store, "/api/y"));
        let exact = config(false);
        let mut store = MemoryStore::new(10);
        assert!(allowed(&exact, &mut store, "/api/x"));
        assert!(!allowed(&exact, &mut store, "/api/x"));
        // Not matched at all, so not limited.
        assert!(allowed(&exact, &mut store, "/API/x"));
        assert!(allowed(&exact, &mut store, "/API/x"));
    }

    /// The headers a verdict sends, as (name, value) pairs.
    fn headers_of(v: &Verdict, p: &Policy) -> Vec<(&'static str, String)> {
        let mut headers = vec![];
        v.headers(p, |n, val| headers.push((n, val.to_string())));
        headers
    }

    /// Two per second, blocked for three seconds once over.
    const BLOCKING: &str = r#"{"rules":[{"name":"b","limit":{"count":2,"per":"1s"},"algorithm":"fixed_window","block_duration":"3s"}]}"#;

    /// A blocked key is refused until the block ends, with the truth about
    /// when; attempts while blocked neither take anything nor extend it.
    fn block_holds_until_it_ends<S: StateStore>(p: &Policy, store: &mut S) {
        let at = |ms: u64| Nanos(10 * SEC + ms * 1_000_000);
        let ask =
            |store: &mut S, ms| decide(p, store, &req("1.1.1.1"), at(ms), Span::ZERO).unwrap();
        assert!(ask(store, 0).is_allowed());
        assert!(ask(store, 0).is_allowed());
        let refused = ask(store, 0);
        assert_eq!(refused.kind, VerdictKind::Limited { rule_index: 0 });
        let headers = headers_of(&refused, p);
        assert!(
            headers.contains(&("retry-after", "3".into())),
            "{headers:?}"
        );
        assert!(
            headers.contains(&("ratelimit", "\"b\";r=0;t=3".into())),
            "{headers:?}"
        );
        // The window rolled over at 1s: the budget allows, the block does not.
        for ms in [1_000, 1_500, 2_999] {
            let v = ask(store, ms);
            assert_eq!(v.kind, VerdictKind::Limited { rule_index: 0 }, "at {ms} ms");
            assert_eq!(v.decisions[0].decision.retry_after, at(3_000).since(at(ms)));
            assert_eq!(v.decisions[0].decision.remaining, 0);
        }
        // Not extended by those attempts, and they took nothing: the whole
        // budget is there when the block ends.
        let v = ask(store, 3_000);
        assert!(v.is_allowed());
        assert_eq!(v.decisions[0].decision.remaining, 1);
    }

    #[test]
    fn a_refused_key_stays_blocked_until_the_block_ends() {
        let p = policy(BLOCKING);
        block_holds_until_it_ends(&p, &mut MemoryStore::new(10));
        let shared = crate::store::InProcessShared::default();
        let mut store = crate::store::SlotStore::open(&shared, &p, || Some(1)).unwrap();
        block_holds_until_it_ends(&p, &mut store);
    }

    #[test]
    fn every_worker_sees_a_block() {
        let p = policy(BLOCKING);
        let shared = crate::store::InProcessShared::default();
        let mut one = crate::store::SlotStore::open(&shared, &p, || Some(1)).unwrap();
        let mut two = crate::store::SlotStore::open(&shared, &p, || None).unwrap();
        let t = |ms: u64| Nanos(10 * SEC + ms * 1_000_000);
        for _ in 0..2 {
            assert!(allowed_as(&p, &mut one, "1.1.1.1", t(0)).is_allowed());
        }
        assert!(!allowed_as(&p, &mut one, "1.1.1.1", t(0)).is_allowed());
        // Another worker, after the window rolled over.
        let v = allowed_as(&p, &mut two, "1.1.1.1", t(2_000));
        assert_eq!(v.decisions[0].decision.retry_after, Span::SECOND);
        assert!(allowed_as(&p, &mut two, "1.1.1.1", t(3_000)).is_allowed());
    }

    #[test]
    fn a_blocked_request_takes_nothing_from_other_rules() {
        let p = policy(
            r#"{"rules":[
                {"name":"wide","limit":{"count":100,"per":"1h"},"algorithm":"fixed_window"},
                {"name":"b","limit":{"count":1,"per":"1s"},"algorithm":"fixed_window","block_duration":"1m"}
            ]}"#,
        );
        let mut store = MemoryStore::new(10);
        let now = Nanos(3_600 * SEC);
        assert!(allowed_as(&p, &mut store, "1.1.1.1", now).is_allowed());
        for s in 0..5 {
            let v = allowed_as(&p, &mut store, "1.1.1.1", now.plus(Span::from_secs(s)));
            assert_eq!(v.kind, VerdictKind::Limited { rule_index: 1 });
            assert_eq!(v.decisions[0].decision.remaining, 99, "wide was charged");
        }
    }

    #[test]
    fn the_longest_wait_tells_a_refusal_block_included() {
        let p = policy(
            r#"{"rules":[
                {"name":"slow","limit":{"count":1,"per":"10s"},"algorithm":"fixed_window"},
                {"name":"b","limit":{"count":1,"per":"1s"},"algorithm":"fixed_window","block_duration":"1m"}
            ]}"#,
        );
        let mut store = MemoryStore::new(10);
        let now = Nanos(100 * SEC);
        assert!(allowed_as(&p, &mut store, "1.1.1.1", now).is_allowed());
        let v = allowed_as(&p, &mut store, "1.1.1.1", now);
        assert_eq!(v.kind, VerdictKind::Limited { rule_index: 1 });
        assert!(headers_of(&v, &p).contains(&("retry-after", "60".into())));
    }

    #[test]
    fn a_shadow_block_only_reports() {
        let p = policy(
            r#"{"rules":[{"name":"dry","limit":{"count":1,"per":"1s"},"algorithm":"fixed_window","action":"shadow","block_duration":"5s"}]}"#,
        );
        let mut store = MemoryStore::new(10);
        let t = |s: u64| Nanos((10 + s) * SEC);
        let first = allowed_as(&p, &mut store, "1.1.1.1", t(0));
        assert!(first.is_allowed() && !first.decisions[0].shadow_limited);
        for s in [0, 2, 4] {
            let v = allowed_as(&p, &mut store, "1.1.1.1", t(s));
            assert!(v.is_allowed());
            assert!(
                v.decisions[0].shadow_limited,
                "at {s} s: a block would refuse"
            );
        }
        let v = allowed_as(&p, &mut store, "1.1.1.1", t(5));
        assert!(v.is_allowed() && !v.decisions[0].shadow_limited);
    }

    #[test]
    fn a_delay_blocks_only_once_the_request_is_refused() {
        let p = policy(
            r#"{"rules":[{"name":"slow","limit":{"count":1,"per":"1s"},"algorithm":"fixed_window","action":"delay","max_delay":"1500ms","block_duration":"1m"}]}"#,
        );
        let mut store = MemoryStore::new(10);
        let t0 = Nanos(10 * SEC);
        assert!(allowed_as(&p, &mut store, "1.1.1.1", t0).is_allowed());
        // Held, not refused: no block.
        let v = allowed_as(&p, &mut store, "1.1.1.1", t0);
        assert_eq!(v.kind, VerdictKind::Wait { wait: Span::SECOND });
        let woken = Nanos(11 * SEC);
        assert!(decide(&p, &mut store, &req("1.1.1.1"), woken, Span::SECOND)
            .unwrap()
            .is_allowed());
        // Out of max_delay: refused, and now blocked.
        let v = decide(&p, &mut store, &req("1.1.1.1"), woken, Span::SECOND).unwrap();
        assert_eq!(v.kind, VerdictKind::Limited { rule_index: 0 });
        assert_eq!(v.decisions[0].decision.retry_after, Span::from_secs(60));
        let later = allowed_as(&p, &mut store, "1.1.1.1", Nanos(20 * SEC));
        assert_eq!(later.kind, VerdictKind::Limited { rule_index: 0 });
    }

    #[test]
    fn a_blocked_key_is_not_evicted_even_when_its_state_is_fresh() {
        let p = policy(
            r#"{"rules":[{"name":"b","limit":{"count":1,"per":"1s"},"algorithm":"fixed_window","block_duration":"1h"}],"max_keys":1,"when_keys_full":"refuse"}"#,
        );
        let check = |store: &mut dyn FnMut(&str, Nanos) -> Verdict| {
            assert!(store("10.0.0.1", Nanos(SEC)).is_allowed());
            assert!(!store("10.0.0.1", Nanos(SEC)).is_allowed());
            // Long after its window: its state is fresh, its block is not.
            let later = Nanos(600 * SEC);
            assert!(!store("10.0.0.2", later).is_allowed(), "no room");
            assert!(!store("10.0.0.1", later).is_allowed(), "block lifted");
        };
        let mut memory = MemoryStore::with_when_full(1, crate::store::WhenFull::Refuse);
        check(&mut |ip, now| allowed_as(&p, &mut memory, ip, now));
        let shared = crate::store::InProcessShared::default();
        let mut slots = crate::store::SlotStore::open(&shared, &p, || Some(1)).unwrap();
        check(&mut |ip, now| allowed_as(&p, &mut slots, ip, now));
    }

    /// Degrades over two per hour (client address), rejects over five.
    const DEGRADING: &str = r#"{"rules":[
        {"name":"cheap","limit":{"count":2,"per":"1h"},"algorithm":"fixed_window","action":"degrade"},
        {"name":"hard","limit":{"count":5,"per":"1h"},"algorithm":"fixed_window"}
    ],"headers":{"on_allowed":false}}"#;

    #[test]
    fn degrade_lets_the_request_through_marked_and_takes_nothing() {
        let p = policy(DEGRADING);
        assert_eq!(p.degrade_header.as_deref(), Some("x-sluice-limited"));
        let mut store = MemoryStore::new(10);
        let now = Nanos(3_600 * SEC);
        for _ in 0..2 {
            let v = allowed_as(&p, &mut store, "1.1.1.1", now);
            assert!(v.is_allowed() && !v.is_degraded());
        }
        for hard_left in [2, 1, 0] {
            let v = allowed_as(&p, &mut store, "1.1.1.1", now);
            assert!(v.is_allowed() && v.is_degraded());
            assert_eq!(v.degraded_by(&p).collect::<Vec<_>>(), ["cheap"]);
            assert_eq!(v.decisions[1].decision.remaining, hard_left);
            let charged: Vec<usize> = v.charges.iter().map(|c| c.rule_index).collect();
            assert_eq!(charged, [1], "the degrading rule takes nothing");
            let headers = headers_of(&v, &p);
            assert!(
                !headers.iter().any(|(n, _)| *n == "retry-after"),
                "{headers:?}"
            );
            assert!(
                headers
                    .iter()
                    .any(|(n, v)| *n == "ratelimit" && v.starts_with("\"cheap\";r=0;")),
                "{headers:?}"
            );
        }
        // The reject rule wins: refused, not degraded.
        let v = allowed_as(&p, &mut store, "1.1.1.1", now);
        assert_eq!(v.kind, VerdictKind::Limited { rule_index: 1 });
        assert!(!v.is_degraded() && v.degraded_by(&p).next().is_none());
    }

    #[test]
    fn a_single_degrade_rule_takes_nothing_once_over() {
        let p = policy(
            r#"{"rules":[{"name":"cheap","limit":{"count":1,"per":"1h"},"action":"degrade"}]}"#,
        );
        let mut store = MemoryStore::new(10);
        assert!(!allowed_as(&p, &mut store, "1.1.1.1", Nanos(SEC)).is_degraded());
        let v = allowed_as(&p, &mut store, "1.1.1.1", Nanos(SEC));
        assert!(v.is_allowed() && v.is_degraded() && v.charges.is_empty());
    }

    #[test]
    fn a_degrade_block_degrades_until_it_ends() {
        let p = policy(
            r#"{"rules":[{"name":"cheap","limit":{"count":1,"per":"1s"},"algorithm":"fixed_window","action":"degrade","block_duration":"10s"}]}"#,
        );
        let mut store = MemoryStore::new(10);
        let t = |s: u64| Nanos((10 + s) * SEC);
        assert!(!allowed_as(&p, &mut store, "1.1.1.1", t(0)).is_degraded());
        for s in [0, 5, 9] {
            let v = allowed_as(&p, &mut store, "1.1.1.1", t(s));
            assert!(v.is_allowed() && v.is_degraded(), "at {s} s");
        }
        assert!(!allowed_as(&p, &mut store, "1.1.1.1", t(10)).is_degraded());
    }

    #[test]
    fn memory_store_stays_within_max_keys() {
        let p = policy(r#"{"rules":[{"name":"r","limit":{"count":5,"per":"1h"}}],"max_keys":64}"#);
        let mut store = MemoryStore::new(p.max_keys);
        for i in 0..1000u32 {
            let ip = IpAddr::from(i.to_be_bytes());
            let r = HttpRequest::new("GET", "/").with_client_ip(ip);
            decide(&p, &mut store, &r, Nanos(u64::from(i)), Span::ZERO).unwrap();
            assert!(store.len(0) <= 64);
        }
        assert!(store.evictions().live > 0);
    }
}
