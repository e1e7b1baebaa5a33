//! Stream messages (gRPC and WebSocket) decided against one request's
//! stream rules: size bounds first, then the message and byte rates.

use sluice_core::engine::{self, Claim, VerdictKind};
use sluice_core::policy::{Action, Counts, Direction, Policy, Protocol};
use sluice_core::store::{SharedBytes, Slot, SlotStore};
use sluice_core::time::{Nanos, Span};

use crate::host::Host;
use crate::metrics::{Metrics, Outcome};
use crate::stream::{Answer, Ask, Enforced, Judge, Violation};

/// Decides stream messages against one request's stream rules.
pub(super) struct StreamJudge<'a, B, H> {
    pub(super) policy: &'a Policy,
    pub(super) store: &'a mut SlotStore<B>,
    pub(super) metrics: &'a Metrics,
    pub(super) host: &'a H,
    pub(super) keys: &'a [(usize, String)],
    pub(super) protocol: Protocol,
    /// The time messages are decided at: read from the host at the first
    /// message that claims permits, then kept for the chunk (a chunk that
    /// starts no message costs no clock read). Never kept from one chunk
    /// to the next: each chunk is its own callback, and an earlier one's
    /// time is older than the messages a later chunk brings.
    pub(super) now: Option<Nanos>,
}

impl<B: SharedBytes, H: Host> Judge for StreamJudge<'_, B, H> {
    fn judge(&mut self, direction: Direction, ask: Ask) -> Answer {
        let answer = self.decide(direction, ask);
        if answer == Answer::Pass && ask.ends {
            self.count_sizes(direction, ask.size);
        }
        answer
    }

    fn enforced(&mut self, _: Direction, rule: &str, outcome: Enforced) {
        let Some(rule_index) = self.policy.rules.iter().position(|r| r.name == rule) else {
            return;
        };
        let outcome = match outcome {
            Enforced::Dropped => Outcome::Dropped,
            Enforced::Limited => Outcome::Limited,
        };
        self.metrics
            .count(self.host, self.protocol, rule_index, outcome);
    }
}

impl<B: SharedBytes, H: Host> StreamJudge<'_, B, H> {
    /// The stream rules' verdict on `ask`; refusals are counted by the
    /// stream once it knows what it did ([`Judge::enforced`]).
    fn decide(&mut self, direction: Direction, ask: Ask) -> Answer {
        let rules = self
            .keys
            .iter()
            .filter_map(|(i, key)| self.policy.rules.get(*i).map(|r| (*i, key.as_str(), r)));
        // Size and byte rules measure what the receiver gets, which a
        // compressed message hides: refuse it rather than guess.
        if ask.compressed {
            let sized = rules.clone().find(|(_, _, rule)| {
                rule.action != Action::Shadow
                    && rule
                        .counts
                        .sized_flow()
                        .is_some_and(|f| f.includes(direction))
            });
            if let Some((i, _, _)) = sized {
                return self.refuse(i, Violation::Compressed, 1, Vec::new());
            }
        }
        // Size bounds need no state.
        for (i, _, rule) in rules.clone() {
            let Counts::MessageSize(flow) = rule.counts else {
                continue;
            };
            if !flow.includes(direction)
                || ask.size <= rule.quota.count()
                || rule.action == Action::Shadow
            {
                continue;
            }
            return self.refuse(i, Violation::TooBig, 1, Vec::new());
        }
        let claims = rules.filter_map(|(rule_index, key, rule)| {
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
        });
        let (store, host, now) = (&mut *self.store, self.host, &mut self.now);
        let decided = with_slice(claims, |claims| {
            let first = claims.first()?.slot.rule_index;
            let now = *now.get_or_insert_with(|| host.now());
            // Message permits are never given back: no list of charges.
            let decided = engine::decide_claims_unlisted(store, claims, now, Span::ZERO);
            Some((decided, first))
        });
        let Some((decided, first_rule)) = decided else {
            return Answer::Pass;
        };
        let verdict = match decided {
            Ok(v) => v,
            Err(e) => {
                self.metrics.error(self.host);
                self.host
                    .warn(&format!("sluice: letting message through: {e}"));
                return Answer::Pass;
            }
        };
        let refused_by = match verdict.kind {
            VerdictKind::Limited { rule_index } => rule_index,
            // A stream cannot hold a message back: a rule that would delay
            // it refuses it (validation keeps `delay` off stream rules).
            VerdictKind::Wait { .. } => verdict
                .decisions
                .iter()
                .find(|d| !d.decision.allowed && !d.shadow_limited)
                .map(|d| d.rule_index)
                .unwrap_or(first_rule),
            VerdictKind::Allowed => {
                for d in &verdict.decisions {
                    let outcome = if d.shadow_limited {
                        Outcome::ShadowLimited
                    } else {
                        Outcome::Allowed
                    };
                    self.metrics
                        .count(self.host, self.protocol, d.rule_index, outcome);
                }
                return Answer::Pass;
            }
        };
        let mut metadata = Vec::new();
        verdict.headers(self.policy, |name, value| {
            metadata.push((name, value.to_owned()))
        });
        let retry_after = verdict
            .shown(self.policy)
            .map_or(1, |d| d.retry_after_secs());
        self.refuse(refused_by, Violation::Rate, retry_after, metadata)
    }
}

/// Calls `f` with `items` as a slice: on the stack when there are at most
/// two (what a message claims under most policies), else collected.
fn with_slice<T, R>(mut items: impl Iterator<Item = T>, f: impl FnOnce(&[T]) -> R) -> R {
    match (items.next(), items.next()) {
        (None, _) => f(&[]),
        (Some(a), None) => f(&[a]),
        (Some(a), Some(b)) => match items.next() {
            None => f(&[a, b]),
            Some(c) => {
                let all: Vec<T> = [a, b, c].into_iter().chain(items).collect();
                f(&all)
            }
        },
    }
}

impl<B, H: Host> StreamJudge<'_, B, H> {
    /// Counts the size rules' outcomes for a message that passed whole
    /// (once per message, at its end, when its size is known).
    fn count_sizes(&self, direction: Direction, size: u64) {
        for (i, _) in self.keys {
            let Some(rule) = self.policy.rules.get(*i) else {
                continue;
            };
            let Counts::MessageSize(flow) = rule.counts else {
                continue;
            };
            if !flow.includes(direction) {
                continue;
            }
            // Only a shadow rule lets a message over its bound pass.
            let outcome = if size > rule.quota.count() {
                Outcome::ShadowLimited
            } else {
                Outcome::Allowed
            };
            self.metrics.count(self.host, self.protocol, *i, outcome);
        }
    }

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
            Answer::Drop {
                violation,
                rule: rule_name,
            }
        } else {
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
    use sluice_core::config::Config;

    #[test]
    fn with_slice_passes_every_item_in_order() {
        for n in 0..5u32 {
            let got = super::with_slice(0..n, <[u32]>::to_vec);
            assert_eq!(got, (0..n).collect::<Vec<_>>());
        }
    }
    use sluice_core::store::InProcessShared;

    use super::*;
    use crate::host::fake::FakeHost;

    #[test]
    fn a_message_a_rule_would_delay_is_refused_not_passed() -> Result<(), String> {
        let json = r#"{"rules":[{"name":"msgs","match":{"websocket":true},"counts":"messages","limit":{"count":1,"per":"1h"}}]}"#;
        let mut policy = Config::from_json(json)
            .and_then(|c| c.validate())
            .map_err(|e| e.to_string())?;
        // Validation refuses `delay` on stream rules: set it behind its back.
        policy.rules[0].action = Action::Delay {
            max: Span(7200 * 1_000_000_000),
        };
        let host = FakeHost::default();
        let shared = InProcessShared::default();
        let mut store = SlotStore::open(&shared, &policy, || Some(7)).map_err(|e| e.to_string())?;
        let metrics = Metrics::define(&host, &policy);
        let keys = [(0, String::from("k"))];
        let mut judge = StreamJudge {
            policy: &policy,
            store: &mut store,
            metrics: &metrics,
            host: &host,
            keys: &keys,
            protocol: Protocol::WebSocket,
            now: Some(Nanos(1_800_000_000 * 1_000_000_000)),
        };
        let ask = Ask {
            messages: 1,
            bytes: 2,
            size: 2,
            compressed: false,
            ends: true,
        };
        assert_eq!(judge.judge(Direction::Client, ask), Answer::Pass);
        assert!(matches!(
            judge.judge(Direction::Client, ask),
            Answer::Refuse { rule, violation: Violation::Rate, .. } if rule == "msgs"
        ));
        Ok(())
    }
}
