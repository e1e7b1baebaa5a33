//! The server's file, `sluice.yaml`: listen addresses, storage and domains,
//! and envoyproxy/ratelimit descriptor files read as they are.

mod descriptors;
mod errors;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sluice_core::algorithm::AlgorithmKind;
use sluice_core::config::{FieldError, RuleConfig, SpanText, MAX_KEYS_LIMIT};
use sluice_core::time::Span;

pub use descriptors::{
    DescriptorConfig, DescriptorFile, LimitSpec, RateLimitConfig, ReplacesConfig, UnitConfig,
};
pub use errors::Problems;

use crate::limits::Limits;

/// The whole server configuration as written.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Where to listen.
    #[serde(default)]
    pub listen: ListenConfig,
    /// Where counters live.
    #[serde(default)]
    pub storage: StorageConfig,
    /// Domains written inline.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub domains: Vec<DomainConfig>,
    /// envoyproxy/ratelimit files (one domain each), relative to this file.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub descriptor_files: Vec<DescriptorFileRef>,
    /// The admin API: token, audit log, access-list bounds.
    #[serde(default)]
    pub admin: AdminConfig,
}

/// Admin API settings (see `crate::admin`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Bearer token for every admin route; `SLUICE_ADMIN_TOKEN` overrides
    /// it. Without one the admin listener does not start. Never printed.
    #[serde(default, skip_serializing)]
    pub token: Option<String>,
    /// JSON-lines file every grant and revoke is appended to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_log: Option<PathBuf>,
    /// Most entries in each of the allow list, deny list, bans and overrides.
    #[serde(default = "default_max_entries")]
    pub max_entries: usize,
    /// The descriptor key whose value is the client's IP address.
    #[serde(default = "default_client_ip_key")]
    pub client_ip_key: String,
}

fn default_max_entries() -> usize {
    10_000
}

fn default_client_ip_key() -> String {
    "remote_address".into()
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            token: None,
            audit_log: None,
            max_entries: default_max_entries(),
            client_ip_key: default_client_ip_key(),
        }
    }
}

/// An envoyproxy/ratelimit file and the Sluice options for its domain.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DescriptorFileRef {
    /// Path of the file.
    pub path: PathBuf,
    /// What to do when storage fails.
    #[serde(default)]
    pub failure_mode: FailureMode,
    /// A local limit enforced while storage is down (fail-open only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<FallbackConfig>,
}

/// Listen addresses and the per-request deadline.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    /// gRPC (rate limit service and health); port 0 picks a free port.
    #[serde(default = "default_grpc")]
    pub grpc: String,
    /// Admin HTTP API and `/metrics` (started only with an admin token).
    #[serde(default = "default_admin")]
    pub admin: String,
    /// Longest any request may take before it is answered with an error.
    #[serde(default = "default_request_timeout")]
    pub request_timeout: SpanText,
}

fn default_grpc() -> String {
    "127.0.0.1:8081".into()
}

fn default_admin() -> String {
    "127.0.0.1:8082".into()
}

fn default_request_timeout() -> SpanText {
    SpanText::Text("1s".into())
}

impl Default for ListenConfig {
    fn default() -> Self {
        ListenConfig {
            grpc: default_grpc(),
            admin: default_admin(),
            request_timeout: default_request_timeout(),
        }
    }
}

/// `memory` or `redis`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// Counters in this process (no Redis needed).
    #[default]
    Memory,
    /// Counters in Redis, shared by every server instance.
    Redis,
}

/// Storage settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// Which backend.
    #[serde(default)]
    pub backend: BackendKind,
    /// Redis settings (required when `backend: redis`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisConfig>,
    /// Most keys kept per limit in memory (the memory backend and fallbacks).
    #[serde(default = "default_max_keys")]
    pub max_keys: u64,
}

fn default_max_keys() -> u64 {
    1_000_000
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            backend: BackendKind::Memory,
            redis: None,
            max_keys: default_max_keys(),
        }
    }
}

/// Redis connection settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]`, or `rediss://` for TLS.
    /// Empty when `cluster` is given.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub url: String,
    /// Redis Cluster seed nodes (`redis://host:port` each), instead of `url`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cluster: Vec<String>,
    /// Longest a Redis call may take before the domain's failure mode applies.
    #[serde(default = "default_redis_timeout")]
    pub timeout: SpanText,
    /// Multiplexed connections; concurrent requests pipeline onto them.
    #[serde(default = "default_connections")]
    pub connections: u32,
    /// PEM file of the CA(s) that signed the server's certificate, for
    /// `rediss://` servers the system roots do not cover (self-signed);
    /// relative to the configuration's directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<PathBuf>,
}

fn default_redis_timeout() -> SpanText {
    SpanText::Text("20ms".into())
}

fn default_connections() -> u32 {
    1
}

/// `open` (allow) or `closed` (deny) when storage fails.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    /// Allow, enforcing the fallback limit if one is set.
    #[default]
    Open,
    /// Deny.
    Closed,
}

/// A local limit applied per key while storage is down.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FallbackConfig {
    /// Permits per window.
    pub count: u64,
    /// The window.
    pub per: SpanText,
    /// Bucket capacity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u64>,
    /// The algorithm (default token bucket).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<AlgorithmKind>,
}

/// One domain written inline in `sluice.yaml`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainConfig {
    /// The domain Envoy names in its requests.
    pub name: String,
    /// What to do when storage fails.
    #[serde(default)]
    pub failure_mode: FailureMode,
    /// A local limit enforced while storage is down (fail-open only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<FallbackConfig>,
    /// The descriptor tree, in envoyproxy/ratelimit's format.
    #[serde(default)]
    pub descriptors: Vec<DescriptorConfig>,
    /// Sluice rules (core's rule format), named by Sluice's own API.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<RuleConfig>,
}

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file is not YAML of the expected shape.
    #[error("{path}: invalid YAML: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// Some values are wrong; each error names its field.
    #[error("{}", list(.0))]
    Invalid(Vec<FieldError>),
}

fn list(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// A duration as written, read with core's rules.
pub(crate) fn parse_span(text: &SpanText) -> Result<Span, String> {
    match text {
        SpanText::Seconds(s) => s
            .checked_mul(1_000_000_000)
            .map(Span)
            .ok_or_else(|| "duration too large".to_string()),
        SpanText::Text(t) => Span::parse(t).map_err(|e| e.to_string()),
    }
}

fn read(path: &Path) -> Result<String, LoadError> {
    std::fs::read_to_string(path).map_err(|source| LoadError::Read {
        path: path.into(),
        source,
    })
}

fn parse_yaml<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> Result<T, LoadError> {
    serde_norway::from_str(text).map_err(|e| LoadError::Syntax {
        path: path.into(),
        message: e.to_string(),
    })
}

/// A loaded file: either a whole `sluice.yaml` or one envoyproxy/ratelimit
/// file (recognised by its top-level `domain:`), which runs with defaults.
pub fn load(path: &Path) -> Result<(ServerConfig, Limits), LoadError> {
    let text = read(path)?;
    let config = if is_descriptor_file(&text) {
        ServerConfig {
            descriptor_files: vec![DescriptorFileRef {
                path: path.into(),
                ..DescriptorFileRef::default()
            }],
            ..ServerConfig::default()
        }
    } else {
        parse_yaml(path, &text)?
    };
    let base = path.parent().unwrap_or(Path::new("."));
    let limits = config.compile(base)?;
    Ok((config.resolved(base), limits))
}

/// `config` with each descriptor file (resolved against `base`) turned
/// into an inline domain.
pub fn inline_descriptor_files(
    mut config: ServerConfig,
    base: &Path,
) -> Result<ServerConfig, LoadError> {
    for f in std::mem::take(&mut config.descriptor_files) {
        let file = read_descriptor_file(&base.join(&f.path))?;
        config.domains.push(DomainConfig {
            name: file.domain,
            failure_mode: f.failure_mode,
            fallback: f.fallback,
            descriptors: file.descriptors,
            rules: Vec::new(),
        });
    }
    Ok(config)
}

/// Reads one envoyproxy/ratelimit file.
pub fn read_descriptor_file(path: &Path) -> Result<DescriptorFile, LoadError> {
    parse_yaml(path, &read(path)?)
}

fn is_descriptor_file(text: &str) -> bool {
    text.lines().any(|l| l.starts_with("domain:"))
}

fn check_redis_url(field: &str, url: &str, problems: &mut Problems) {
    if !url.starts_with("redis://") && !url.starts_with("rediss://") {
        problems.add(
            field,
            "must start with redis:// or rediss:// (TLS): redis://[user:password@]host:port[/db]",
        );
    }
}

impl ServerConfig {
    /// Reads `sluice.yaml` text (descriptor files are read by `compile`).
    pub fn from_yaml(text: &str) -> Result<ServerConfig, LoadError> {
        parse_yaml(Path::new("<config>"), text)
    }

    /// Validates everything and builds the limits registry; descriptor
    /// files are resolved against `base`.
    pub fn compile(&self, base: &Path) -> Result<Limits, LoadError> {
        let mut problems = Problems::default();
        self.validate_server(&mut problems);
        self.check_tls_ca_file(base, &mut problems);
        let mut domains = Vec::with_capacity(self.domains.len() + self.descriptor_files.len());
        for (i, d) in self.domains.iter().enumerate() {
            domains.push((format!("domains[{i}]"), d.clone()));
        }
        for (i, f) in self.descriptor_files.iter().enumerate() {
            let at = format!("descriptor_files[{i}]");
            let file = read_descriptor_file(&base.join(&f.path))?;
            domains.push((
                format!("{at}({})", f.path.display()),
                DomainConfig {
                    name: file.domain,
                    failure_mode: f.failure_mode,
                    fallback: f.fallback.clone(),
                    descriptors: file.descriptors,
                    rules: Vec::new(),
                },
            ));
        }
        let limits = Limits::build(&domains, self.storage.backend, &mut problems);
        if problems.is_empty() {
            Ok(limits)
        } else {
            Err(LoadError::Invalid(problems.into_vec()))
        }
    }

    fn validate_server(&self, problems: &mut Problems) {
        for (field, addr) in [("grpc", &self.listen.grpc), ("admin", &self.listen.admin)] {
            if addr.parse::<std::net::SocketAddr>().is_err() {
                problems.add(
                    format!("listen.{field}"),
                    format!("{addr:?} is not an address such as \"127.0.0.1:8081\""),
                );
            }
        }
        match parse_span(&self.listen.request_timeout) {
            Ok(s) if s >= Span::MILLISECOND => {}
            Ok(_) => problems.add("listen.request_timeout", "must be at least 1ms"),
            Err(e) => problems.add("listen.request_timeout", e),
        }
        if !(1..=1_000_000).contains(&self.admin.max_entries) {
            problems.add("admin.max_entries", "must be between 1 and 1000000");
        }
        if self.admin.client_ip_key.is_empty() {
            problems.add("admin.client_ip_key", "must not be empty");
        }
        if !(1..=MAX_KEYS_LIMIT).contains(&self.storage.max_keys) {
            problems.add(
                "storage.max_keys",
                format!("must be between 1 and {MAX_KEYS_LIMIT}"),
            );
        }
        match (&self.storage.backend, &self.storage.redis) {
            (BackendKind::Redis, None) => {
                problems.add("storage.redis", "required when backend is redis");
            }
            (_, Some(redis)) => {
                match (redis.url.is_empty(), redis.cluster.is_empty()) {
                    (false, false) => problems.add(
                        "storage.redis",
                        "give either url (one Redis) or cluster (Redis Cluster nodes), not both",
                    ),
                    (true, true) => problems.add(
                        "storage.redis.url",
                        "required (or cluster: [redis://host:port, ...] for Redis Cluster)",
                    ),
                    (false, true) => check_redis_url("storage.redis.url", &redis.url, problems),
                    (true, false) => {
                        for (i, url) in redis.cluster.iter().enumerate() {
                            check_redis_url(&format!("storage.redis.cluster[{i}]"), url, problems);
                        }
                    }
                }
                match parse_span(&redis.timeout) {
                    Ok(s) if s >= Span::MILLISECOND && s <= Span::from_secs(5) => {}
                    Ok(_) => problems.add(
                        "storage.redis.timeout",
                        "must be between 1ms and 5s (tens of milliseconds is usual)",
                    ),
                    Err(e) => problems.add("storage.redis.timeout", e),
                }
                if !(1..=64).contains(&redis.connections) {
                    problems.add("storage.redis.connections", "must be between 1 and 64");
                }
            }
            (BackendKind::Memory, None) => {}
        }
    }

    /// The per-request deadline (validated by `compile`).
    pub fn request_timeout(&self) -> Span {
        parse_span(&self.listen.request_timeout).unwrap_or(Span::SECOND)
    }

    /// A CA file must be readable, and only makes sense with TLS.
    fn check_tls_ca_file(&self, base: &Path, problems: &mut Problems) {
        let Some(redis) = &self.storage.redis else {
            return;
        };
        let Some(ca) = &redis.tls_ca_file else {
            return;
        };
        let field = "storage.redis.tls_ca_file";
        let urls = std::iter::once(&redis.url).chain(&redis.cluster);
        if !urls
            .filter(|u| !u.is_empty())
            .any(|u| u.starts_with("rediss://"))
        {
            problems.add(
                field,
                "only applies to rediss:// (TLS) URLs; use rediss:// or remove it",
            );
        }
        if let Err(e) = std::fs::metadata(base.join(ca)) {
            problems.add(
                field,
                format!("cannot read {}: {e}", base.join(ca).display()),
            );
        }
    }

    /// This configuration with its file paths resolved against `base` (the
    /// configuration's directory), so that they do not depend on the
    /// working directory.
    fn resolved(mut self, base: &Path) -> ServerConfig {
        if let Some(ca) = self
            .storage
            .redis
            .as_mut()
            .and_then(|r| r.tls_ca_file.as_mut())
        {
            *ca = base.join(&*ca);
        }
        self
    }

    /// The Redis call timeout (validated by `compile`).
    pub fn redis_timeout(&self) -> Span {
        self.storage
            .redis
            .as_ref()
            .and_then(|r| parse_span(&r.timeout).ok())
            .unwrap_or(Span::from_millis(20))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(yaml: &str) -> Vec<String> {
        let config = ServerConfig::from_yaml(yaml).unwrap();
        match config.compile(Path::new(".")) {
            Ok(_) => Vec::new(),
            Err(LoadError::Invalid(errors)) => errors.iter().map(ToString::to_string).collect(),
            Err(e) => panic!("unexpected {e}"),
        }
    }

    #[test]
    fn defaults_are_valid() {
        assert!(errors("{}").is_empty());
    }

    #[test]
    fn errors_name_their_fields() {
        let found = errors(
            r#"
listen: {grpc: "nowhere"}
storage: {backend: redis}
domains:
  - name: api
    descriptors:
      - key: remote_address
        rate_limit: {requests_per_unit: 0, unit: second}
      - key: path
        rate_limit: {unit: minute}
"#,
        );
        assert_eq!(
            found,
            vec![
                "listen.grpc: \"nowhere\" is not an address such as \"127.0.0.1:8081\"",
                "storage.redis: required when backend is redis",
                "domains[0].descriptors[0].rate_limit.requests_per_unit: must be at least 1",
                "domains[0].descriptors[1].rate_limit.requests_per_unit: required unless unlimited: true",
            ]
        );
    }

    #[test]
    fn sluice_rules_are_checked_by_core_under_their_domain() {
        let found = errors(
            r#"
domains:
  - name: api
    rules:
      - {name: ok, limit: {count: 5, per: 1s}}
      - {name: bad, limit: {count: 5, per: "1 fortnight"}}
"#,
        );
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with("domains[0].rules[1].limit.per: "),
            "{found:?}"
        );
        let config = ServerConfig::from_yaml(
            "domains: [{name: api, rules: [{name: r, limit: {count: 5, per: 1s}, algorithm: gcra}]}]",
        )
        .unwrap();
        let limits = config.compile(Path::new(".")).unwrap();
        let domain = limits.domain("api").unwrap();
        let rule = limits.rule(domain, "r").unwrap();
        assert_eq!(rule.quota().count(), 5);
        assert_eq!(rule.algorithm(), AlgorithmKind::Gcra);
    }

    #[test]
    fn redis_timeout_is_bounded() {
        let found = errors("storage: {redis: {url: \"redis://x\", timeout: 30s}}");
        assert_eq!(
            found,
            vec![
                "storage.redis.timeout: must be between 1ms and 5s (tens of milliseconds is usual)"
            ]
        );
    }

    #[test]
    fn redis_urls_and_the_tls_ca_file() {
        assert!(errors("storage: {redis: {url: \"rediss://x:6380\"}}").is_empty());
        assert_eq!(
            errors("storage: {redis: {url: \"http://x\"}}"),
            vec![
                "storage.redis.url: must start with redis:// or rediss:// (TLS): \
                 redis://[user:password@]host:port[/db]"
            ]
        );
        let found = errors("storage: {redis: {url: \"redis://x\", tls_ca_file: no-such.pem}}");
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found[0].contains("only applies to rediss://"), "{found:?}");
        assert!(found[1].contains("cannot read ./no-such.pem"), "{found:?}");
        let config =
            ServerConfig::from_yaml("storage: {redis: {url: \"rediss://x\", tls_ca_file: ca.pem}}")
                .unwrap()
                .resolved(Path::new("/etc/sluice"));
        let ca = config.storage.redis.and_then(|r| r.tls_ca_file);
        assert_eq!(ca, Some(PathBuf::from("/etc/sluice/ca.pem")));
    }
}
