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
    /// Each Envoy decides locally from permits leased from the quota
    /// server (`sluice.quota.v1.Quota/Sync`), synced in the background:
    /// never over the limit, under it by what leases hold unused (see
    /// [`crate::lease`]).
    Leased(Leasing),
}

/// How a leased rule syncs (see [`crate::lease`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leasing {
    /// How often each key in use is synced (its unused permits returned,
    /// a new lease taken).
    pub interval: Span,
    /// The most permits one lease holds.
    pub max_lease: u64,
    /// How many Envoys share the budget: a lease is at most the remaining
    /// budget divided by them.
    pub replicas: u32,
    /// The most keys of the rule leased at once per Envoy (each has one
    /// shared-data cell); further keys ask the quota server per request.
    pub max_keys: u32,
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
