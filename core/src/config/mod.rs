//! The configuration as users write it (JSON for the filter, YAML for the
//! quota server), and its validation into a [`Policy`](crate::policy::Policy).
//!
//! Validation collects every problem, each with the path of the field at
//! fault (`rules[2].limit.per: must be at least 1ms`), so a user fixes a
//! file in one pass.
//!
//! - `schema`: the shape of the file, as serde reads and writes it.
//! - `parse`: JSON and YAML text into that shape.
//! - `validate`, `rule`, `conditions`, `sync`: the shape into a policy,
//!   checking the whole file, each rule, each rule's match conditions and
//!   its link to the quota server.
//! - `groups`: rule groups, checked across the rules sharing one.
//! - `access`: the configuration's own allow and deny lists.
//! - `object`: structs are read from objects, never from arrays.
//! - `error`: what a refused configuration reports.

mod access;
mod charging;
mod conditions;
mod error;
mod groups;
mod object;
mod parse;
mod rule;
mod schema;
mod sync;
mod validate;

pub use access::MAX_ACCESS_ENTRIES;
pub use conditions::{
    MAX_CLIENT_NETWORKS, MAX_MATCH_TEXT, MAX_MATCH_VALUES, MAX_NOT_DEPTH, MAX_VALUE_CONDITIONS,
};
pub use error::{ConfigError, ErrorList, FieldError};
pub use rule::MAX_KEY_PARTS;
pub use schema::{
    AccessConfig, ActionKind, ClientIpConfig, Config, CountsConfig, DirectionConfig,
    FailureModeConfig, GrpcConfig, HeadersConfig, KeyElementConfig, LimitConfig, MatchConfig,
    PathConfig, PathsConfig, RuleConfig, ScopeConfig, SpanText, StatusSpec, SyncConfig,
    SyncModeConfig, ValueMatchConfig,
};
pub use sync::{DEFAULT_QUOTA_CLUSTER, DEFAULT_SYNC_TIMEOUT, MAX_DOMAIN_NAME, MAX_SYNC_TIMEOUT};
pub use validate::{
    keys_memory, KEYS_MEMORY_BUDGET, MAX_KEYS_LIMIT, MAX_LOG_COUNT, MAX_RULE_NAME, MAX_TRUSTED_HOPS,
};

/// Every field error of a configuration expected to be refused (tests).
#[cfg(test)]
pub(crate) fn errors_of(json: &str) -> alloc::vec::Vec<alloc::string::String> {
    use alloc::string::ToString;
    match crate::policy::Policy::from_json(json) {
        Err(ConfigError::Invalid(list)) => list.iter().map(|e| e.to_string()).collect(),
        other => panic!("expected field errors, got {other:?}"),
    }
}
