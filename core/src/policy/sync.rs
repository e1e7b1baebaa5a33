//! Rules a quota server decides for the whole fleet instead of this Envoy
//! alone.

use alloc::string::String;

use crate::time::Span;

/// How a synced rule is shared with the quota server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncMode {
    /// Every request asks the quota server (`sluice.quota.v1.Quota/Check`)
    /// and waits for its decision: exact fleet-wide, one call per request.
    Exact,
}

/// What a synced rule does when the quota server cannot answer in time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnFailure {
    /// Let the request through (fail open, no limit).
    Allow,
    /// Fail open under the rule's local fallback limit (`Rule::quota`).
    Fallback,
    /// Refuse the request (fail closed).
    Refuse,
}

/// A synced rule's link to the quota server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleSync {
    /// How it is shared.
    pub mode: SyncMode,
    /// The Envoy cluster of the quota server (HTTP/2).
    pub cluster: String,
    /// The quota server's domain holding a rule of the same name.
    pub domain: String,
    /// How long a request waits for the quota server's answer.
    pub timeout: Span,
    /// What happens when that answer does not come.
    pub on_failure: OnFailure,
}

/// A rule of the policy that the quota server decides.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncedRule {
    /// Position of the rule in the policy.
    pub rule_index: usize,
    /// How it is synced.
    pub sync: RuleSync,
}
