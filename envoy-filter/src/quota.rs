//! The quota server's `sluice.quota.v1.Quota/Check` call for a request's
//! synced rules: the message sent, and the decisions read from the answer.

use sluice_core::access::wire::span;
use sluice_core::decision::Decision;
use sluice_core::engine::Costs;
use sluice_core::policy::Policy;
use sluice_core::time::Span;
use sluice_proto::prost::Message;
use sluice_proto::quota::v1::{
    CheckGroup, CheckItem, CheckRequest, CheckResponse, Code, Controls, ItemResult,
};

use crate::controls::MAX_CONTROLS_BYTES;

/// The gRPC service of the quota server's own API.
pub const SERVICE: &str = "sluice.quota.v1.Quota";
/// Its batched check.
pub const METHOD: &str = "Check";
/// gRPC's DEADLINE_EXCEEDED: the call's timeout passed.
pub const GRPC_DEADLINE_EXCEEDED: u32 = 4;

/// One call: where to send it, the encoded request, and where each synced
/// item landed in it.
#[derive(Debug)]
pub struct Call {
    /// The quota server's Envoy cluster.
    pub cluster: String,
    /// The shortest timeout of the synced rules: no rule waits longer
    /// than it asked.
    pub timeout: Span,
    /// The encoded `CheckRequest`.
    pub message: Vec<u8>,
    /// Per synced item (in the order given): its group and position there.
    placement: Vec<(usize, usize)>,
}

/// What the quota server said about one synced item.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ItemAnswer {
    /// Decided: `refused` when the item is over its limit and its group
    /// was refused; a shadow rule's item over its limit only reports.
    Decided {
        /// The rule's state, for headers.
        decision: Decision,
        /// The item is what refused its group.
        refused: bool,
        /// Over its limit without refusing (the server's rule is a shadow).
        shadow_limited: bool,
    },
    /// The quota server has no such rule in the domain: nothing counted.
    Unknown,
}

/// What the quota server answered.
#[derive(Debug)]
pub struct Answer {
    /// One per synced item, in call order.
    pub items: Vec<ItemAnswer>,
    /// Newer access controls than the caller's, if any.
    pub controls: Option<Controls>,
}

/// Largest answer read (`Check` or `Sync`): the controls' bound and room
/// for the items.
pub const MAX_ANSWER_BYTES: usize = MAX_CONTROLS_BYTES + (1 << 20);

/// Why an answer could not be read.
#[derive(Debug, PartialEq, Eq)]
pub enum AnswerError {
    /// Not a `CheckResponse`.
    Decode,
    /// Fewer groups or items than were sent.
    Shape,
}

impl std::fmt::Display for AnswerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AnswerError::Decode => {
                f.write_str("the quota server's answer is not a CheckResponse (or over 9 MiB)")
            }
            AnswerError::Shape => {
                f.write_str("the quota server's answer has fewer groups or items than asked")
            }
        }
    }
}

impl Call {
    /// The call for `items` (synced rules of `policy` and their keys): one
    /// group per domain, in order of first appearance, each item costing
    /// what the request costs under its rule (`costs`), from a caller
    /// enforcing access controls of `controls_version` (the answer carries
    /// newer ones). `None` when no item names a synced rule.
    pub fn new(
        policy: &Policy,
        items: &[(usize, String)],
        costs: &Costs,
        controls_version: u64,
    ) -> Option<Call> {
        let mut groups: Vec<CheckGroup> = Vec::new();
        let mut placement = Vec::with_capacity(items.len());
        let mut target: Option<(&str, Span)> = None;
        for (rule_index, key) in items {
            let (Some(rule), Some(sync)) =
                (policy.rules.get(*rule_index), policy.sync_of(*rule_index))
            else {
                continue;
            };
            target = Some(match target {
                Some((cluster, timeout)) => (cluster, timeout.min(sync.timeout)),
                None => (sync.cluster.as_str(), sync.timeout),
            });
            let group = match groups.iter().position(|g| g.domain == sync.domain) {
                Some(g) => g,
                None => {
                    groups.push(CheckGroup {
                        domain: sync.domain.clone(),
                        items: Vec::new(),
                    });
                    groups.len().saturating_sub(1)
                }
            };
            let Some(g) = groups.get_mut(group) else {
                continue;
            };
            placement.push((group, g.items.len()));
            g.items.push(CheckItem {
                rule: rule.name.clone(),
                key: key.clone(),
                cost: costs.of_rule(*rule_index, rule),
            });
        }
        let (cluster, timeout) = target?;
        Some(Call {
            cluster: cluster.to_owned(),
            timeout,
            message: CheckRequest {
                groups,
                controls_version: Some(controls_version),
                // The filter renders headers from the items' numbers.
                omit_headers: true,
            }
            .encode_to_vec(),
            placement,
        })
    }

    /// Reads the quota server's answer: one [`ItemAnswer`] per synced item,
    /// in the order they were given to [`Call::new`], and the access
    /// controls if the caller's were stale.
    pub fn read(&self, answer: &[u8]) -> Result<Answer, AnswerError> {
        if answer.len() > MAX_ANSWER_BYTES {
            return Err(AnswerError::Decode);
        }
        let response = CheckResponse::decode(answer).map_err(|_| AnswerError::Decode)?;
        let items = self
            .placement
            .iter()
            .map(|&(g, i)| {
                let group = response.groups.get(g).ok_or(AnswerError::Shape)?;
                let item = group.items.get(i).ok_or(AnswerError::Shape)?;
                Ok(item_answer(item, group.allowed))
            })
            .collect::<Result<_, _>>()?;
        Ok(Answer {
            items,
            controls: response.controls,
        })
    }
}

/// One item's result as a decision, knowing whether its group passed.
fn item_answer(item: &ItemResult, group_allowed: bool) -> ItemAnswer {
    let over = match Code::try_from(item.code) {
        Ok(Code::Ok) => false,
        Ok(Code::OverLimit) => true,
        Ok(Code::UnknownLimit | Code::Unspecified) | Err(_) => return ItemAnswer::Unknown,
    };
    let refused = over && !group_allowed;
    let retry_after = match (&item.retry_after, refused) {
        (_, false) => Span::ZERO,
        (Some(d), true) => span(d),
        (None, true) => Span::NEVER,
    };
    ItemAnswer::Decided {
        decision: Decision {
            allowed: !refused,
            limit: item.limit,
            capacity: item.limit,
            window: item.window.as_ref().map_or(Span::ZERO, span),
            remaining: item.remaining,
            reset_after: item.reset_after.as_ref().map_or(Span::ZERO, span),
            retry_after,
        },
        refused,
        shadow_limited: over && group_allowed,
    }
}
