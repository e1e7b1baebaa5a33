//! The configuration as users write it (JSON for the filter, YAML for the
//! quota server), and its validation into a [`Policy`].
//!
//! Validation collects every problem, each with the path of the field at
//! fault (`rules[2].limit.per: must be at least 1ms`), so a user fixes a
//! file in one pass.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

use serde::{Deserialize, Serialize};

use crate::algorithm::{AlgorithmKind, Limiter, Quota, QuotaError};
use crate::client_ip::ClientIpSource;
use crate::decision::{HeaderSet, HeaderSets};
use crate::policy::{
    Action, Counts, Flow, Glob, GrpcMatch, HeaderMatch, KeyPart, KeySpec, Matcher, PathMatch,
    Policy, Rule, Scope, StatusSet,
};
use crate::time::Span;

/// The whole filter configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
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
}

/// One rule as written.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Unique name.
    pub name: String,
    /// Conditions; absent matches every request.
    #[serde(default, rename = "match")]
    pub matcher: MatchConfig,
    /// Key parts; defaults to `["client_ip"]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<Vec<String>>,
    /// `per_key` (default) or `global`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<ScopeConfig>,
    /// `requests` (default), `in_flight`, `messages`, `bytes`, `message_size`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counts: Option<CountsConfig>,
    /// `client`, `server` or `both` (default) for stream counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<DirectionConfig>,
    /// The limit.
    pub limit: LimitConfig,
    /// Permits per request; default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<u64>,
    /// Algorithm; default token bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<AlgorithmKind>,
    /// `reject` (default), `shadow` or `delay`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<ActionKind>,
    /// The longest wait with `delay`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_delay: Option<SpanText>,
    /// Higher first; default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    /// Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
}

/// Match conditions as written.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchConfig {
    /// HTTP methods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// One of `exact`, `prefix`, `glob`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathConfig>,
    /// Header conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderConfig>,
    /// Only gRPC calls (to these methods).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<GrpcConfig>,
    /// Only WebSocket upgrades.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub websocket: Option<bool>,
}

/// A gRPC method condition as written: globs, each optional.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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

/// A path condition as written: exactly one field set.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
}

/// A header condition as written.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderConfig {
    /// Header name.
    pub name: String,
    /// Exact value; absent means presence is enough.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
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

/// `reject`, `shadow`, `delay` or `drop`.
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
}

/// A limit as written.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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

/// A duration kept as written until validation, so a bad one is reported
/// with its field path rather than as a parse failure of the whole file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SpanText {
    /// A number of seconds.
    Seconds(u64),
    /// `"500ms"`, `"1m"`, ...
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
#[serde(deny_unknown_fields)]
pub struct HeadersConfig {
    /// Which families to send.
    #[serde(default = "all_header_sets")]
    pub sets: Vec<HeaderSet>,
    /// Also on allowed responses.
    #[serde(default = "yes")]
    pub on_allowed: bool,
}

impl Default for HeadersConfig {
    fn default() -> HeadersConfig {
        HeadersConfig {
            sets: all_header_sets(),
            on_allowed: true,
        }
    }
}

fn all_header_sets() -> Vec<HeaderSet> {
    [HeaderSet::Ietf, HeaderSet::XRateLimit].into()
}

fn yes() -> bool {
    true
}

/// A status code (`503`) or class (`"5xx"`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StatusSpec {
    /// One code.
    Code(u64),
    /// A class such as `"5xx"`.
    Class(String),
}

/// Client address options as written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientIpConfig {
    /// Trusted proxies in front of Envoy.
    #[serde(default)]
    pub trusted_hops: u32,
}

/// One problem in a configuration, with where it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the field, e.g. `rules[2].limit.per`.
    pub path: String,
    /// What is wrong and what is expected.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Why a configuration was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The text is not valid JSON/YAML of the expected shape.
    #[error("invalid {format}: {message}")]
    Syntax {
        /// `JSON` or `YAML`.
        format: &'static str,
        /// The parser's message, with line and column.
        message: String,
    },
    /// The shape is right but some values are not.
    #[error("{}", ErrorList(.0))]
    Invalid(Vec<FieldError>),
}

/// Displays field errors separated by `; `, as one message.
pub struct ErrorList<'a>(pub &'a [FieldError]);

impl fmt::Display for ErrorList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Longest rule name: it appears in stats names and headers.
pub const MAX_RULE_NAME: usize = 64;
/// Largest `count` for the sliding window log, which keeps an entry per
/// admitted request.
pub const MAX_LOG_COUNT: u64 = 10_000;
/// Largest `max_keys`.
pub const MAX_KEYS_LIMIT: u64 = 10_000_000;
/// Most trusted hops accepted.
pub const MAX_TRUSTED_HOPS: u32 = 32;

impl Config {
    /// Reads JSON (the filter's plugin configuration).
    pub fn from_json(text: &str) -> Result<Config, ConfigError> {
        let mut de = serde_json::Deserializer::from_str(text);
        let config = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if inner.is_data() {
                shape_error(path, inner.to_string())
            } else {
                ConfigError::Syntax {
                    format: "JSON",
                    message: inner.to_string(),
                }
            }
        })?;
        de.end().map_err(|e| ConfigError::Syntax {
            format: "JSON",
            message: e.to_string(),
        })?;
        Ok(config)
    }

    /// Reads YAML (the quota server's file).
    #[cfg(feature = "std")]
    pub fn from_yaml(text: &str) -> Result<Config, ConfigError> {
        let de = serde_norway::Deserializer::from_str(text);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            shape_error(path, e.into_inner().to_string())
        })
    }

    /// Checks every field and builds the policy, or lists every problem.
    pub fn validate(&self) -> Result<Policy, ConfigError> {
        let mut errors = Errors::default();
        let mut rules = Vec::with_capacity(self.rules.len());
        for (i, raw) in self.rules.iter().enumerate() {
            let at = format!("rules[{i}]");
            if self.rules[..i].iter().any(|r| r.name == raw.name) {
                errors.add(&at, ".name", format!("duplicate rule name {:?}", raw.name));
            }
            if let Some(rule) = validate_rule(raw, &at, &mut errors) {
                if raw.enabled.unwrap_or(true) {
                    rules.push(rule);
                }
            }
        }
        // Stable: equal priorities keep config order.
        rules.sort_by_key(|r: &Rule| core::cmp::Reverse(r.priority));

        let mut exclude_statuses = StatusSet::default();
        for (i, spec) in self.exclude_statuses.iter().enumerate() {
            let at = format!("exclude_statuses[{i}]");
            match spec {
                StatusSpec::Code(code @ 100..=599) => exclude_statuses.add_code(*code as u16),
                StatusSpec::Class(class) => match class.as_bytes() {
                    [d @ b'1'..=b'5', b'x' | b'X', b'x' | b'X'] => {
                        exclude_statuses.add_class(u16::from(d - b'0'))
                    }
                    _ => errors.add(&at, "", "expected a class such as \"5xx\"".into()),
                },
                StatusSpec::Code(_) => errors.add(&at, "", "must be between 100 and 599".into()),
            }
        }
        let max_keys = self.max_keys.unwrap_or(Policy::DEFAULT_MAX_KEYS as u64);
        if !(1..=MAX_KEYS_LIMIT).contains(&max_keys) {
            errors.add(
                "max_keys",
                "",
                format!("must be between 1 and {MAX_KEYS_LIMIT}"),
            );
        }
        if self.client_ip.trusted_hops > MAX_TRUSTED_HOPS {
            errors.add(
                "client_ip.trusted_hops",
                "",
                format!("must be at most {MAX_TRUSTED_HOPS}"),
            );
        }
        errors.finish()?;
        Ok(Policy {
            rules,
            header_sets: HeaderSets::from_sets(&self.headers.sets),
            headers_on_allowed: self.headers.on_allowed,
            exclude_statuses,
            client_ip: ClientIpSource {
                trusted_hops: self.client_ip.trusted_hops,
            },
            max_keys: usize::try_from(max_keys).unwrap_or(usize::MAX),
        })
    }
}

impl Policy {
    /// Parses and validates a JSON configuration.
    pub fn from_json(text: &str) -> Result<Policy, ConfigError> {
        Config::from_json(text)?.validate()
    }
}

/// A value of the wrong shape, at `path` (`.` when the whole document).
fn shape_error(path: String, message: String) -> ConfigError {
    let path = if path == "." {
        String::from("(document)")
    } else {
        path
    };
    ConfigError::Invalid([FieldError { path, message }].into())
}

#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn add(&mut self, at: &str, field: &str, message: String) {
        self.0.push(FieldError {
            path: format!("{at}{field}"),
            message,
        });
    }

    fn finish(self) -> Result<(), ConfigError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(self.0))
        }
    }
}

fn is_token(text: &str) -> bool {
    !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn validate_rule(raw: &RuleConfig, at: &str, errors: &mut Errors) -> Option<Rule> {
    let before = errors.0.len();
    let name_ok = !raw.name.is_empty()
        && raw.name.len() <= MAX_RULE_NAME
        && raw
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !name_ok {
        errors.add(
            at,
            ".name",
            format!("must be 1 to {MAX_RULE_NAME} characters of A-Z, a-z, 0-9, '-' or '_'"),
        );
    }

    let matcher = validate_match(&raw.matcher, at, errors);

    let scope = match raw.scope {
        Some(ScopeConfig::Global) => Scope::Global,
        Some(ScopeConfig::PerKey) | None => Scope::PerKey,
    };
    let key = match (&raw.key, scope) {
        (Some(_), Scope::Global) => {
            errors.add(
                at,
                ".key",
                "a rule of scope global has one counter and no key; remove key or use scope per_key"
                    .into(),
            );
            KeySpec::default()
        }
        (None, Scope::Global) => KeySpec::default(),
        (None, Scope::PerKey) => KeySpec::new([KeyPart::ClientIp].into()),
        (Some(parts), Scope::PerKey) => {
            if parts.is_empty() {
                errors.add(at, ".key", "needs at least one part".into());
            }
            let mut spec = Vec::new();
            for (j, part) in parts.iter().enumerate() {
                match KeyPart::parse(part) {
                    Some(p) => spec.push(p),
                    None => errors.add(
                        at,
                        &format!(".key[{j}]"),
                        format!(
                            "unknown key part {part:?}: use client_ip, header:<name>, path, path_segment:<n> or method"
                        ),
                    ),
                }
            }
            KeySpec::new(spec)
        }
    };

    let counts = validate_counts(raw, &matcher, at, errors);
    // in_flight and message_size are bounds, not rates: no period, no
    // algorithm choice.
    let is_bound = matches!(counts, Counts::InFlight | Counts::MessageSize(_));
    let algorithm = if is_bound {
        if raw.algorithm.is_some() {
            errors.add(
                at,
                ".algorithm",
                "not used with this counts; remove it".into(),
            );
        }
        AlgorithmKind::Concurrency
    } else {
        match raw.algorithm {
            Some(AlgorithmKind::Concurrency) => {
                errors.add(
                    at,
                    ".algorithm",
                    "concurrency is implied by counts in_flight; choose a rate algorithm".into(),
                );
                AlgorithmKind::TokenBucket
            }
            other => other.unwrap_or_default(),
        }
    };
    let per = match (&raw.limit.per, is_bound) {
        (Some(_), true) => {
            errors.add(at, ".limit.per", "a bound has no period; remove per".into());
            Ok(Quota::MIN_PERIOD)
        }
        (None, true) => Ok(Quota::MIN_PERIOD),
        (Some(per), false) => per.parse(),
        (None, false) => Err("required".to_string()),
    };
    if let Err(message) = &per {
        errors.add(at, ".limit.per", message.clone());
    }
    let per_unreadable = per.is_err();
    let per = per.unwrap_or(Span::ZERO);
    let quota = match Quota::new(raw.limit.count, per, raw.limit.burst) {
        Ok(q) => Some(q),
        Err(e) => {
            let field = match e {
                QuotaError::ZeroCount => ".limit.count",
                QuotaError::PeriodTooShort => ".limit.per",
                QuotaError::ZeroBurst => ".limit.burst",
            };
            // An unreadable `per` was reported already.
            if !(field == ".limit.per" && per_unreadable) {
                errors.add(at, field, e.to_string());
            }
            None
        }
    };
    if algorithm == AlgorithmKind::SlidingWindowLog && raw.limit.count > MAX_LOG_COUNT {
        errors.add(
            at,
            ".limit.count",
            format!(
                "sliding_window_log keeps one entry per request: at most {MAX_LOG_COUNT}; use sliding_window_counter for larger limits"
            ),
        );
    }
    let uses_burst = matches!(
        algorithm,
        AlgorithmKind::TokenBucket | AlgorithmKind::LeakyBucket | AlgorithmKind::Gcra
    );
    if raw.limit.burst.is_some() && !uses_burst {
        errors.add(
            at,
            ".limit.burst",
            format!("{} has no burst; remove it", algorithm.name()),
        );
    }

    let cost = raw.cost.unwrap_or(1);
    if cost == 0 {
        errors.add(at, ".cost", "must be at least 1".into());
    }
    if raw.cost.is_some() && matches!(counts, Counts::Bytes(_) | Counts::MessageSize(_)) {
        errors.add(
            at,
            ".cost",
            "each byte costs one permit here; remove cost".into(),
        );
    }
    if let (Some(q), false) = (&quota, matches!(counts, Counts::MessageSize(_))) {
        let capacity = if uses_burst { q.burst() } else { q.count() };
        if cost > capacity {
            errors.add(
                at,
                ".cost",
                format!("{cost} exceeds what the limit can ever grant at once ({capacity}); no request could pass"),
            );
        }
    }

    let action = validate_action(raw, counts, &matcher, at, errors);

    if errors.0.len() > before {
        return None;
    }
    let (Some(quota), Some(action)) = (quota, action) else {
        return None;
    };
    Some(Rule {
        name: raw.name.clone(),
        matcher,
        key,
        scope,
        counts,
        limiter: Limiter::new(algorithm, quota),
        quota,
        cost,
        action,
        priority: raw.priority.unwrap_or(0),
    })
}

/// What the rule counts, checked against what it matches.
fn validate_counts(raw: &RuleConfig, matcher: &Matcher, at: &str, errors: &mut Errors) -> Counts {
    let flow = match raw.direction {
        None | Some(DirectionConfig::Both) => Flow::Both,
        Some(DirectionConfig::Client) => Flow::Client,
        Some(DirectionConfig::Server) => Flow::Server,
    };
    let counts = match raw.counts.unwrap_or(CountsConfig::Requests) {
        CountsConfig::Requests => Counts::Requests,
        CountsConfig::InFlight => Counts::InFlight,
        CountsConfig::Messages => Counts::Messages(flow),
        CountsConfig::Bytes => Counts::Bytes(flow),
        CountsConfig::MessageSize => Counts::MessageSize(flow),
    };
    let streams = matcher.grpc.is_some() || matcher.websocket;
    if counts.flow().is_some() && !streams {
        errors.add(
            at,
            ".counts",
            "messages, bytes and message_size count stream traffic: add match.grpc or match.websocket"
                .into(),
        );
    }
    if raw.direction.is_some() && counts.flow().is_none() {
        errors.add(
            at,
            ".direction",
            "only used with counts messages, bytes or message_size".into(),
        );
    }
    counts
}

fn validate_action(
    raw: &RuleConfig,
    counts: Counts,
    matcher: &Matcher,
    at: &str,
    errors: &mut Errors,
) -> Option<Action> {
    let max_delay = raw.max_delay.as_ref().map(SpanText::parse);
    let kind = raw.action.unwrap_or(ActionKind::Reject);
    if kind == ActionKind::Delay && counts != Counts::Requests {
        errors.add(
            at,
            ".action",
            "delay only holds requests (counts requests)".into(),
        );
        return None;
    }
    if kind == ActionKind::Drop && !(matcher.websocket && counts.flow().is_some()) {
        errors.add(
            at,
            ".action",
            "drop discards WebSocket messages: it needs match.websocket and counts messages, bytes or message_size"
                .into(),
        );
        return None;
    }
    match (kind, max_delay) {
        (ActionKind::Delay, Some(Ok(max))) if max > Span::ZERO => Some(Action::Delay { max }),
        (ActionKind::Delay, Some(Ok(_))) => {
            errors.add(at, ".max_delay", "must be more than 0".into());
            None
        }
        (ActionKind::Delay, Some(Err(message))) => {
            errors.add(at, ".max_delay", message);
            None
        }
        (ActionKind::Delay, None) => {
            errors.add(at, ".max_delay", "required with action delay".into());
            None
        }
        (_, Some(_)) => {
            errors.add(at, ".max_delay", "only used with action delay".into());
            None
        }
        (ActionKind::Reject, None) => Some(Action::Reject),
        (ActionKind::Shadow, None) => Some(Action::Shadow),
        (ActionKind::Drop, None) => Some(Action::Drop),
    }
}

fn validate_match(raw: &MatchConfig, at: &str, errors: &mut Errors) -> Matcher {
    let mut methods = Vec::new();
    for (j, method) in raw.methods.iter().enumerate() {
        if is_token(method) {
            methods.push(method.to_ascii_uppercase());
        } else {
            errors.add(
                at,
                &format!(".match.methods[{j}]"),
                format!("{method:?} is not an HTTP method"),
            );
        }
    }
    let path = raw.path.as_ref().and_then(|p| {
        let set = [&p.exact, &p.prefix, &p.glob]
            .iter()
            .filter(|v| v.is_some())
            .count();
        if set != 1 {
            errors.add(
                at,
                ".match.path",
                "set exactly one of exact, prefix or glob".into(),
            );
            return None;
        }
        let (field, text) = match (&p.exact, &p.prefix, &p.glob) {
            (Some(t), _, _) => ("exact", t),
            (_, Some(t), _) => ("prefix", t),
            (_, _, Some(t)) => ("glob", t),
            _ => return None,
        };
        let anchored = text.starts_with('/') || (field == "glob" && text.starts_with('*'));
        if !anchored {
            errors.add(
                at,
                &format!(".match.path.{field}"),
                "must start with '/'".into(),
            );
            return None;
        }
        Some(match field {
            "exact" => PathMatch::Exact(text.clone()),
            "prefix" => PathMatch::Prefix(text.clone()),
            _ => PathMatch::Glob(Glob::new(text)),
        })
    });
    let mut headers = Vec::new();
    for (j, h) in raw.headers.iter().enumerate() {
        if is_token(&h.name) {
            headers.push(HeaderMatch {
                name: h.name.to_ascii_lowercase(),
                value: h.value.clone(),
            });
        } else {
            errors.add(
                at,
                &format!(".match.headers[{j}].name"),
                format!("{:?} is not a header name", h.name),
            );
        }
    }
    let grpc = raw.grpc.as_ref().map(|g| GrpcMatch {
        service: g.service.as_deref().map(Glob::new),
        method: g.method.as_deref().map(Glob::new),
    });
    let websocket = raw.websocket.unwrap_or(false);
    if grpc.is_some() && websocket {
        errors.add(
            at,
            ".match",
            "a request is either a gRPC call or a WebSocket upgrade: use grpc or websocket".into(),
        );
    }
    Matcher {
        methods,
        path,
        headers,
        grpc,
        websocket,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors_of(json: &str) -> Vec<String> {
        match Policy::from_json(json) {
            Err(ConfigError::Invalid(list)) => list.iter().map(|e| e.to_string()).collect(),
            other => panic!("expected field errors, got {other:?}"),
        }
    }

    #[test]
    fn minimal_rule_gets_defaults() {
        let policy =
            Policy::from_json(r#"{"rules":[{"name":"r","limit":{"count":5,"per":"1m"}}]}"#)
                .unwrap();
        let rule = &policy.rules[0];
        assert_eq!(rule.key.parts(), [KeyPart::ClientIp]);
        assert_eq!(rule.limiter.kind(), AlgorithmKind::TokenBucket);
        assert_eq!(rule.action, Action::Reject);
        assert_eq!(rule.quota.per(), Span::from_secs(60));
        assert_eq!(policy.header_sets, HeaderSets::ALL);
        assert!(policy.headers_on_allowed);
        assert_eq!(policy.max_keys, Policy::DEFAULT_MAX_KEYS);
    }

    #[test]
    fn every_error_is_reported_with_its_path() {
        let errors = errors_of(
            r#"{"rules":[
                {"name":"ok","limit":{"count":1,"per":"1s"}},
                {"name":"ok","limit":{"count":0,"per":"1s"}},
                {"name":"bad name","limit":{"count":1,"per":"0ms"},"key":["ip"]},
                {"name":"d","limit":{"count":1,"per":"1s"},"action":"delay"},
                {"name":"c","limit":{"count":2,"per":"1s"},"cost":3,"algorithm":"fixed_window","match":{"path":{"exact":"x","prefix":"/"}}}
            ],"exclude_statuses":["6xx", 99]}"#,
        );
        assert_eq!(
            errors,
            [
                "rules[1].name: duplicate rule name \"ok\"",
                "rules[1].limit.count: must be at least 1",
                "rules[2].name: must be 1 to 64 characters of A-Z, a-z, 0-9, '-' or '_'",
                "rules[2].key[0]: unknown key part \"ip\": use client_ip, header:<name>, path, path_segment:<n> or method",
                "rules[2].limit.per: must be at least 1ms",
                "rules[3].max_delay: required with action delay",
                "rules[4].match.path: set exactly one of exact, prefix or glob",
                "rules[4].cost: 3 exceeds what the limit can ever grant at once (2); no request could pass",
                "exclude_statuses[0]: expected a class such as \"5xx\"",
                "exclude_statuses[1]: must be between 100 and 599",
            ]
        );
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = Policy::from_json(r#"{"rules":[{"name":"r","limits":{}}]}"#).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("rules[0].limits: unknown field `limits`"),
            "{err}"
        );
        let err =
            Policy::from_json(r#"{"rules":[],"headers":{"sets":["ietf","x_rate"]}}"#).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("headers.sets[1]: unknown variant `x_rate`"),
            "{err}"
        );
        let err = Policy::from_json(r#"{"rules":[]"#).unwrap_err();
        assert!(matches!(err, ConfigError::Syntax { .. }), "{err}");
        let err = Policy::from_json(r#"{"rules":[]} trailing"#).unwrap_err();
        assert!(matches!(err, ConfigError::Syntax { .. }), "{err}");
        let sets = Policy::from_json(r#"{"headers":{"sets":["x_ratelimit"]}}"#).unwrap();
        assert!(sets.header_sets.x_ratelimit && !sets.header_sets.ietf);
        let err = Policy::from_json(
            r#"{"rules":[{"name":"r","limit":{"count":1,"per":"1 fortnight"}}]}"#,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "rules[0].limit.per: unknown unit: use ns, us, ms, s, m, h or d"
        );
    }

    #[test]
    fn rules_sorted_by_priority_and_disabled_dropped() {
        let policy = Policy::from_json(
            r#"{"rules":[
                {"name":"a","limit":{"count":1,"per":1}},
                {"name":"b","limit":{"count":1,"per":1},"priority":5},
                {"name":"c","limit":{"count":1,"per":1},"enabled":false},
                {"name":"d","limit":{"count":1,"per":1}}
            ]}"#,
        )
        .unwrap();
        let names: Vec<&str> = policy.rules.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["b", "a", "d"]);
    }

    #[test]
    fn round_trips_through_json() {
        let text = r#"{"rules":[{"name":"r","match":{"methods":["post"],"path":{"glob":"/a/*"}},"key":["header:x-api-key"],"limit":{"count":3,"per":"1m","burst":5},"action":"delay","max_delay":"250ms"}],"exclude_statuses":[503,"5xx"],"client_ip":{"trusted_hops":1}}"#;
        let config = Config::from_json(text).unwrap();
        let again = Config::from_json(&serde_json::to_string(&config).unwrap()).unwrap();
        assert_eq!(config, again);
        let policy = config.validate().unwrap();
        assert_eq!(policy.rules[0].matcher.methods, ["POST"]);
        assert_eq!(
            policy.rules[0].action,
            Action::Delay {
                max: Span::from_millis(250)
            }
        );
        assert!(policy.exclude_statuses.contains(502));
        assert_eq!(policy.client_ip.trusted_hops, 1);
    }

    #[test]
    fn stream_rules_are_checked_against_what_they_match() {
        let ok = Policy::from_json(
            r#"{"rules":[
                {"name":"calls","match":{"grpc":{"service":"chat.*","method":"Send*"}},"limit":{"count":5,"per":"1m"}},
                {"name":"open","match":{"websocket":true},"counts":"in_flight","limit":{"count":3}},
                {"name":"msgs","match":{"grpc":{}},"counts":"messages","direction":"server","limit":{"count":9,"per":"1s"}},
                {"name":"size","match":{"websocket":true},"counts":"message_size","limit":{"count":65536},"action":"drop"}
            ]}"#,
        )
        .unwrap();
        assert_eq!(ok.rules[1].counts, Counts::InFlight);
        assert_eq!(ok.rules[1].limiter.kind(), AlgorithmKind::Concurrency);
        assert_eq!(ok.rules[2].counts, Counts::Messages(Flow::Server));
        assert_eq!(ok.rules[3].action, Action::Drop);
        assert!(ok.needs_protocol());
        let errors = errors_of(
            r#"{"rules":[
                {"name":"a","counts":"messages","limit":{"count":1,"per":"1s"}},
                {"name":"b","match":{"websocket":true},"counts":"in_flight","limit":{"count":1,"per":"1s"}},
                {"name":"c","match":{"grpc":{}},"counts":"messages","limit":{"count":1,"per":"1s"},"action":"drop"},
                {"name":"d","direction":"client","limit":{"count":1,"per":"1s"}},
                {"name":"e","match":{"grpc":{},"websocket":true},"limit":{"count":1}},
                {"name":"f","match":{"websocket":true},"counts":"in_flight","limit":{"count":2},"action":"delay","max_delay":"1s"}
            ]}"#,
        );
        assert_eq!(
            errors,
            [
                "rules[0].counts: messages, bytes and message_size count stream traffic: add match.grpc or match.websocket",
                "rules[1].limit.per: a bound has no period; remove per",
                "rules[2].action: drop discards WebSocket messages: it needs match.websocket and counts messages, bytes or message_size",
                "rules[3].direction: only used with counts messages, bytes or message_size",
                "rules[4].match: a request is either a gRPC call or a WebSocket upgrade: use grpc or websocket",
                "rules[4].limit.per: required",
                "rules[5].action: delay only holds requests (counts requests)",
            ]
        );
    }

    #[cfg(feature = "std")]
    #[test]
    fn reads_yaml() {
        let config = Config::from_yaml(
            "rules:\n  - name: r\n    limit: {count: 10, per: 10s}\n    algorithm: gcra\n",
        )
        .unwrap();
        assert_eq!(
            config.validate().unwrap().rules[0].limiter.kind(),
            AlgorithmKind::Gcra
        );
    }
}
