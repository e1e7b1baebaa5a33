//! The configuration's shape as written: every field optional where a
//! default exists, values kept raw until validation so each problem can be
//! reported with its path.

use alloc::boxed::Box;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use serde::{Deserialize, Serialize};

use crate::algorithm::AlgorithmKind;
use crate::decision::HeaderSet;
use crate::store::WhenFull;
use crate::time::Span;

use super::object::object_only;

object_only!(
    Config,
    RuleConfig,
    MatchConfig,
    GrpcConfig,
    PathConfig,
    ValueMatchConfig,
    LimitConfig,
    CostFromConfig,
    ChargeConfig,
    HeadersConfig,
    ClientIpConfig,
    AccessConfig,
);

/// The whole filter configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, remote = "Self", expecting = "an object")]
pub struct Config {
    /// What the configuration is for: documentation only, never read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The rules.
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
    /// Which rate-limit headers to send.
    #[serde(default)]
    pub headers: HeadersConfig,
    /// Response statuses whose permits are refunded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude_statuses: Vec<StatusSpec>,
    /// How the client address is found.
    #[serde(default)]
    pub client_ip: ClientIpConfig,
    /// The most keys kept per rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_keys: Option<u64>,
    /// What a new key gets when every place for it holds a limited key:
    /// `overflow` (default, a shared counter per rule) or `refuse`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when_keys_full: Option<WhenFull>,
    /// How long a gRPC call cut after its response started may wait for
    /// the upstream to end it before the filter resets it; default 1s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_cut_grace: Option<SpanText>,
    /// Networks that bypass every rule, and networks refused outright.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<AccessConfig>,
    /// The request header telling the upstream which rules degraded a
    /// request; default `x-sluice-limited`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub degrade_header: Option<String>,
}

/// Static access lists as written: networks (`10.0.0.0/8`, `2001:db8::/32`
/// or a bare address).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, remote = "Self", expecting = "an object")]
pub struct AccessConfig {
    /// Clients that bypass every rule.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    /// Clients refused with 403.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
}

/// One rule as written.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, remote = "Self", expecting = "an object")]
pub struct RuleConfig {
    /// Unique name.
    pub name: String,
    /// What the rule is for: documentation only, never read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Conditions; absent matches every request.
    #[serde(default, rename = "match")]
    pub matcher: MatchConfig,
    /// Key parts, each a part or a fallback chain; defaults to
    /// `["client_ip"]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<Vec<KeyElementConfig>>,
    /// `per_key` (default) or `global`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<ScopeConfig>,
    /// `requests` (default), `in_flight`, `messages`, `bytes`, `message_size`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counts: Option<CountsConfig>,
    /// `client`, `server` or `both` (default) for stream counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<DirectionConfig>,
    /// The limit (absent for a synced rule: the quota server holds it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<LimitConfig>,
    /// Permits per request; default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<u64>,
    /// Each request's cost from a request header, bounded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_from: Option<CostFromConfig>,
    /// Charge what the upstream reports a request used, after the response.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub charge: Option<ChargeConfig>,
    /// Algorithm; default token bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<AlgorithmKind>,
    /// `reject` (default), `shadow`, `delay`, `drop` or `degrade`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<ActionKind>,
    /// The longest wait with `delay`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_delay: Option<SpanText>,
    /// How long a key stays limited once the rule limits it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_duration: Option<SpanText>,
    /// Higher first; default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    /// Of the rules sharing a group, only the first that applies to a
    /// request counts for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Decided by the quota server for every Envoy, instead of locally.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync: Option<SyncConfig>,
}

/// A synced rule's link to the quota server, as written.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncConfig {
    /// `exact`: one quota server call per request; `leased`: local
    /// decisions from leased permits.
    pub mode: SyncModeConfig,
    /// The Envoy cluster of the quota server; default `sluice_quota`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// The quota server's domain holding a rule of the same name.
    pub domain: String,
    /// How long a request waits for the answer; default 50ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<SpanText>,
    /// `open` (default) or `closed` when the answer does not come.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_mode: Option<FailureModeConfig>,
    /// With `open`: a local limit applied while the quota server fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<LimitConfig>,
    /// Mode `leased`: how often a key in use is synced; default 100ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<SpanText>,
    /// Mode `leased`: the most permits one lease holds; default 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_lease: Option<u64>,
    /// Mode `leased`: how many Envoys share the budget; default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u32>,
    /// Mode `leased`: the most keys leased at once per Envoy; default 1024.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_keys: Option<u32>,
}

/// How a rule is synced, as written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncModeConfig {
    /// Ask the quota server on every request.
    #[default]
    Exact,
    /// Decide locally from leases synced in the background.
    Leased,
}

/// `open` or `closed`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureModeConfig {
    /// Let requests through (under the fallback limit if one is set).
    Open,
    /// Refuse requests.
    Closed,
}

/// Match conditions as written.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, remote = "Self", expecting = "an object")]
pub struct MatchConfig {
    /// HTTP methods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// One of `exact`, `prefix`, `glob`; or a list of them, any matching.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathsConfig>,
    /// Header conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<ValueMatchConfig>,
    /// Query parameter conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query: Vec<ValueMatchConfig>,
    /// Networks (CIDR) the client address must be in, any of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub client_ip: Vec<String>,
    /// Only gRPC calls (to these methods).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<GrpcConfig>,
    /// Only WebSocket upgrades.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub websocket: Option<bool>,
    /// Conditions that must not all hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not: Option<Box<MatchConfig>>,
}

/// A gRPC method condition as written: globs, each optional.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, remote = "Self", expecting = "an object")]
pub struct GrpcConfig {
    /// Full service name, e.g. `chat.ChatService` or `chat.*`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Method name, e.g. `Send*`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

/// What a rule counts, as written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CountsConfig {
    /// Requests, calls, connections.
    Requests,
    /// Requests, calls, connections open at once.
    InFlight,
    /// Stream messages.
    Messages,
    /// Message payload bytes.
    Bytes,
    /// The largest message.
    MessageSize,
}

/// Stream direction, as written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DirectionConfig {
    /// Client to server.
    Client,
    /// Server to client.
    Server,
    /// Both.
    Both,
}

/// A path condition as written: exactly one of `exact`, `prefix` and
/// `glob`, and optionally `ignore_case`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, remote = "Self", expecting = "an object")]
pub struct PathConfig {
    /// The whole path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    /// A path prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// A glob pattern.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub glob: Option<String>,
    /// Compare ASCII letters in either case; default false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ignore_case: Option<bool>,
}

/// A path condition, or a list of them of which any may match.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    untagged,
    expecting = "expected a path condition such as {\"prefix\": \"/api/\"} (one of exact, prefix or glob, and ignore_case), or a list of them (any one matching)"
)]
pub enum PathsConfig {
    /// One condition.
    One(PathConfig),
    /// Any of these.
    AnyOf(Vec<PathConfig>),
}

/// A header or query parameter condition as written: `name` alone
/// (present), with `value` or `values` (one of them), or with
/// `"present": false` (absent).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, remote = "Self", expecting = "an object")]
pub struct ValueMatchConfig {
    /// Header or parameter name.
    pub name: String,
    /// The exact value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// Exact values, any of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values: Option<Vec<String>>,
    /// `false`: must be absent; default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub present: Option<bool>,
}

/// One element of a key as written: a part (`"header:x-api-key"`), or a
/// list of parts of which the first the request has is used.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    untagged,
    expecting = "expected a key part such as \"client_ip\", or a list of parts (the first one present is used)"
)]
pub enum KeyElementConfig {
    /// One part.
    Part(String),
    /// A fallback chain.
    FirstOf(Vec<String>),
}

/// `per_key` or `global`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScopeConfig {
    /// One counter per key.
    PerKey,
    /// One counter for the whole rule.
    Global,
}

/// `reject`, `shadow`, `delay`, `drop` or `degrade`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionKind {
    /// Refuse.
    Reject,
    /// Count and report only.
    Shadow,
    /// Wait for a permit up to `max_delay`.
    Delay,
    /// Discard the offending WebSocket message.
    Drop,
    /// Let the request through, marked for the upstream.
    Degrade,
}

/// A limit as written.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, remote = "Self", expecting = "an object")]
pub struct LimitConfig {
    /// Permits per period (or the bound, for in_flight and message_size).
    pub count: u64,
    /// The period (absent for in_flight and message_size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per: Option<SpanText>,
    /// Bucket capacity; defaults to `count`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u64>,
}

/// `cost_from` as written.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, remote = "Self", expecting = "an object")]
pub struct CostFromConfig {
    /// The request header holding the cost.
    pub header: String,
    /// The most one request is charged.
    pub max: u64,
}

/// `charge` as written: exactly one of `response_header` and
/// `response_trailer`, and `max`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, remote = "Self", expecting = "an object")]
pub struct ChargeConfig {
    /// The response header the upstream reports usage in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_header: Option<String>,
    /// The response trailer the upstream reports usage in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_trailer: Option<String>,
    /// The most one response is charged.
    pub max: u64,
}

/// A duration kept as written until validation, so a bad one is reported
/// with its field path rather than as a parse failure of the whole file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    untagged,
    expecting = "expected a duration such as \"500ms\" or \"1.5s\", or a whole number of seconds"
)]
pub enum SpanText {
    /// A number of seconds.
    Seconds(u64),
    /// `"500ms"`, `"1.5s"`, `"1m"`, ...
    Text(String),
}

impl Default for SpanText {
    fn default() -> SpanText {
        SpanText::Seconds(0)
    }
}

impl SpanText {
    /// The duration, or a message saying why it is not one.
    pub fn parse(&self) -> Result<Span, String> {
        match self {
            SpanText::Seconds(s) => s
                .checked_mul(1_000_000_000)
                .map(Span)
                .ok_or_else(|| "duration too large".to_string()),
            SpanText::Text(t) => Span::parse(t).map_err(|e| e.to_string()),
        }
    }
}

/// Header options as written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, remote = "Self", expecting = "an object")]
pub struct HeadersConfig {
    /// Which families to send (default: the IETF draft's fields only).
    #[serde(default = "default_header_sets")]
    pub sets: Vec<HeaderSet>,
    /// Also on allowed responses.
    #[serde(default = "yes")]
    pub on_allowed: bool,
}

impl Default for HeadersConfig {
    fn default() -> HeadersConfig {
        HeadersConfig {
            sets: default_header_sets(),
            on_allowed: true,
        }
    }
}

/// The current standard's fields; `x_ratelimit` is opt-in.
fn default_header_sets() -> Vec<HeaderSet> {
    [HeaderSet::Ietf].into()
}

fn yes() -> bool {
    true
}

/// A status code (`503`), class (`"5xx"`) or gRPC status (`"grpc:UNAVAILABLE"`, `"grpc:14"`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StatusSpec {
    /// One code.
    Code(u64),
    /// A class such as `"5xx"`, or `"grpc:"` and a gRPC status name or code.
    Class(String),
}

/// Client address options as written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, remote = "Self", expecting = "an object")]
pub struct ClientIpConfig {
    /// Trusted proxies in front of Envoy.
    #[serde(default)]
    pub trusted_hops: u32,
    /// Leading bits of an IPv4 address that key a client; default 32.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4_prefix: Option<u32>,
    /// Leading bits of an IPv6 address that key a client; default 64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6_prefix: Option<u32>,
}
