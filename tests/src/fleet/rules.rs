//! What a fleet shares: filter rules synced in a [`SyncMode`], and the
//! quota server configuration holding their limits.

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{json, Value};

/// How a synced rule keeps in step with the quota server. Fleet tests and
/// `benchglobal` take it as a parameter, so another mode is one more
/// variant here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncMode {
    /// Every request asks the quota server once and waits for its answer.
    Exact,
    /// Requests are decided from permits leased by the Envoy's sync
    /// service (which the Envoy must run), every 100 ms (the default
    /// `interval`).
    Leased {
        /// `sync.max_lease`: the most permits one lease holds.
        max_lease: u64,
        /// `sync.replicas`: how many Envoys share the budget.
        replicas: u64,
    },
}

/// What a synced rule does when the quota server does not answer in time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnFailure {
    /// Lets requests through.
    Open,
    /// Refuses them (429 `rate_limit_unavailable`).
    Closed,
    /// Applies a local limit of `count` per hour per key, per Envoy.
    Fallback {
        /// Requests per hour per key.
        count: u64,
    },
}

impl SyncMode {
    /// The mode's name in a rule's `sync.mode`.
    pub fn name(self) -> &'static str {
        match self {
            SyncMode::Exact => "exact",
            SyncMode::Leased { .. } => "leased",
        }
    }

    /// Whether Envoys need the sync service for this mode.
    pub fn needs_sync_service(self) -> bool {
        matches!(self, SyncMode::Leased { .. })
    }

    /// The `sync` object of a rule held in quota server domain `domain`,
    /// waiting at most `timeout` for it.
    pub fn sync(self, domain: &str, timeout: Duration, on_failure: OnFailure) -> Value {
        let (failure_mode, fallback) = match on_failure {
            OnFailure::Open => ("open", None),
            OnFailure::Closed => ("closed", None),
            OnFailure::Fallback { count } => ("open", Some(json!({"count": count, "per": "1h"}))),
        };
        let mut sync = json!({
            "mode": self.name(),
            "domain": domain,
            "timeout": format!("{}ms", timeout.as_millis()),
            "failure_mode": failure_mode,
        });
        if let Some(fallback) = fallback {
            sync["fallback"] = fallback;
        }
        if let SyncMode::Leased {
            max_lease,
            replicas,
        } = self
        {
            sync["max_lease"] = json!(max_lease);
            sync["replicas"] = json!(replicas);
        }
        sync
    }
}

/// A filter rule `name` for paths starting with `prefix`, keyed on `key`
/// (the filter's key parts, e.g. `header:x-client`; none: the default, the
/// client's address), whose limit is the quota server's (`sync`, from
/// [`SyncMode::sync`]).
pub fn synced_rule(name: &str, prefix: &str, key: &[&str], sync: Value) -> Value {
    let mut rule = json!({"name": name, "match": {"path": {"prefix": prefix}}, "sync": sync});
    if !key.is_empty() {
        rule["key"] = json!(key);
    }
    rule
}

/// A filter rule `name` for paths starting with `prefix`, decided by each
/// Envoy alone: `count` per hour per client address.
pub fn local_rule(name: &str, prefix: &str, count: u64) -> Value {
    json!({"name": name, "match": {"path": {"prefix": prefix}},
           "limit": {"count": count, "per": "1h"}})
}

/// Where the quota server keeps its counts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Storage {
    /// In its own memory (one server alone).
    Memory,
    /// In Redis at `url`, shared by every replica.
    Redis {
        /// `redis://127.0.0.1:<port>`.
        url: String,
    },
}

/// What a quota server domain does when its storage fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageFailure {
    /// Allows everything.
    Open,
    /// Refuses everything.
    Closed,
    /// Allows up to `count` per hour per key, counted by each replica alone.
    Fallback {
        /// Requests per hour per key.
        count: u64,
    },
}

/// One domain of the quota server: its rules (name, requests per hour per
/// key) and its storage failure mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Domain {
    /// The name synced rules give in `sync.domain`.
    pub name: String,
    /// What happens when storage fails.
    pub on_failure: StorageFailure,
    /// Each rule's name and limit per hour.
    pub rules: Vec<(String, u64)>,
}

impl Domain {
    /// A domain `name` holding `rules` (name, count per hour).
    pub fn new(name: &str, on_failure: StorageFailure, rules: &[(&str, u64)]) -> Domain {
        Domain {
            name: name.to_owned(),
            on_failure,
            rules: rules
                .iter()
                .map(|(rule, count)| ((*rule).to_owned(), *count))
                .collect(),
        }
    }
}

/// `sluice serve`'s configuration: gRPC on 127.0.0.1:`port` (0: any), its
/// `storage` and `domains`. Limits are per hour, so nothing refills during
/// a test.
pub fn quota_server_config(port: u16, storage: &Storage, domains: &[Domain]) -> String {
    let mut text = format!("listen: {{grpc: \"127.0.0.1:{port}\"}}\n");
    if let Storage::Redis { url } = storage {
        text.push_str("storage:\n  backend: redis\n");
        // The Redis timeout stays well under the filter's: a down Redis is
        // the server's failure to handle, not a slow answer.
        let _ = writeln!(text, "  redis: {{url: \"{url}\", timeout: 50ms}}");
    }
    text.push_str("domains:\n");
    for domain in domains {
        let _ = writeln!(text, "  - name: {}", domain.name);
        match domain.on_failure {
            StorageFailure::Open => text.push_str("    failure_mode: open\n"),
            StorageFailure::Closed => text.push_str("    failure_mode: closed\n"),
            StorageFailure::Fallback { count } => {
                text.push_str("    failure_mode: open\n");
                let _ = writeln!(text, "    fallback: {{count: {count}, per: 1h}}");
            }
        }
        text.push_str("    rules:\n");
        for (rule, count) in &domain.rules {
            let _ = writeln!(
                text,
                "      - {{name: {rule}, limit: {{count: {count}, per: 1h}}}}"
            );
        }
    }
    text
}
