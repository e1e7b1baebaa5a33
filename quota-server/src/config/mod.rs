//! The server's file, `sluice.yaml`: listen addresses, storage and domains,
//! and envoyproxy/ratelimit descriptor files read as they are.

mod descriptors;
mod errors;
mod rules;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sluice_core::access::wire::MAX_SYNCED_ENTRIES;
use sluice_core::algorithm::AlgorithmKind;
use sluice_core::config::{ErrorList, FieldError, SpanText, MAX_KEYS_LIMIT};
use sluice_core::time::Span;

pub use descriptors::{
    DescriptorConfig, DescriptorFile, LimitSpec, RateLimitConfig, ReplacesConfig, UnitConfig,
};
pub use errors::Problems;
pub use rules::DomainRule;

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

/// Admin API settings: token, audit log, access-list bounds.
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
    /// Whether `is_negative_hits` descriptors may give hits back.
    #[serde(default, skip_serializing_if = "is_false")]
    pub negative_hits: bool,
}

fn is_false(b: &bool) -> bool {
    !b
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
    /// Bearer token every rate limit and `Quota` call must present
    /// (`authorization` metadata); `SLUICE_GRPC_TOKEN` overrides it.
    /// Without one the gRPC port is open to whoever reaches it. Never printed.
    #[serde(default, skip_serializing)]
    pub grpc_token: Option<String>,
    /// Threads serving calls, each with whole connections dealt out to it
    /// (a call never changes thread): 0 (the default) one per CPU.
    #[serde(default)]
    pub worker_threads: u32,
}

/// Most `listen.worker_threads`: far above any machine's CPUs, so a typo
/// cannot start thousands of threads.
pub const MAX_WORKER_THREADS: u32 = 1024;

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
            grpc_token: None,
            worker_threads: 0,
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
    /// Connections to Redis; each sends the requests waiting on it as one
    /// script call at a time (group commit).
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
    /// Whether `is_negative_hits` descriptors may give hits back (refused
    /// by default: any caller reaching the port could refill a key).
    #[serde(default, skip_serializing_if = "is_false")]
    pub negative_hits: bool,
    /// The descriptor tree, in envoyproxy/ratelimit's format.
    #[serde(default)]
    pub descriptors: Vec<DescriptorConfig>,
    /// Sluice rules (core's rule format, plus calendar windows), named by
    /// Sluice's own API.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<DomainRule>,
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
    #[error("{}", ErrorList(.0))]
    Invalid(Vec<FieldError>),
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

/// Reads a configuration file: either a whole `sluice.yaml` or one
/// envoyproxy/ratelimit file (recognised by its top-level `domain:`), which
/// runs with defaults. Its values are checked when its limits are built.
pub fn read_file(path: &Path) -> Result<ServerConfig, LoadError> {
    let text = read(path)?;
    if is_descriptor_file(&text) {
        return Ok(ServerConfig {
            descriptor_files: vec![DescriptorFileRef {
                path: path.into(),
                ..DescriptorFileRef::default()
            }],
            ..ServerConfig::default()
        });
    }
    parse_yaml(path, &text)
}

/// `config` with each descriptor file (resolved against `base`) turned
/// into an inline domain.
pub fn inline_descriptor_files(
    mut config: ServerConfig,
    base: &Path,
) -> Result<ServerConfig, LoadError> {
    for f in std::mem::take(&mut config.descriptor_files) {
        config.domains.push(f.read_domain(base)?);
    }
    Ok(config)
}

/// Reads one envoyproxy/ratelimit file.
pub fn read_descriptor_file(path: &Path) -> Result<DescriptorFile, LoadError> {
    parse_yaml(path, &read(path)?)
}

impl DescriptorFileRef {
    /// The file (resolved against `base`) as a domain with these options.
    pub fn read_domain(&self, base: &Path) -> Result<DomainConfig, LoadError> {
        let file = read_descriptor_file(&base.join(&self.path))?;
        Ok(DomainConfig {
            name: file.domain,
            failure_mode: self.failure_mode,
            fallback: self.fallback.clone(),
            negative_hits: self.negative_hits,
            descriptors: file.descriptors,
            rules: Vec::new(),
        })
    }
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
    /// Reads `sluice.yaml` text (descriptor files are read by `domains`).
    pub fn from_yaml(text: &str) -> Result<ServerConfig, LoadError> {
        parse_yaml(Path::new("<config>"), text)
    }

    /// Checks the server's own settings (listen, storage, admin), recording
    /// problems by field; domains are checked when their limits are built.
    pub fn validate(&self, base: &Path, problems: &mut Problems) {
        self.validate_server(problems);
        self.check_tls_ca_file(base, problems);
    }

    /// Every domain, inline or from a descriptor file (resolved against
    /// `base`), each with the path its problems are reported under.
    pub fn domains(&self, base: &Path) -> Result<Vec<(String, DomainConfig)>, LoadError> {
        let mut domains = Vec::with_capacity(self.domains.len() + self.descriptor_files.len());
        for (i, d) in self.domains.iter().enumerate() {
            domains.push((format!("domains[{i}]"), d.clone()));
        }
        for (i, f) in self.descriptor_files.iter().enumerate() {
            let at = format!("descriptor_files[{i}]({})", f.path.display());
            domains.push((at, f.read_domain(base)?));
        }
        Ok(domains)
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
        if self.listen.worker_threads > MAX_WORKER_THREADS {
            problems.add(
                "listen.worker_threads",
                format!("must be at most {MAX_WORKER_THREADS} (0: one per CPU)"),
            );
        }
        match self.listen.request_timeout.parse() {
            Ok(s) if s >= Span::MILLISECOND => {}
            Ok(_) => problems.add("listen.request_timeout", "must be at least 1ms"),
            Err(e) => problems.add("listen.request_timeout", e),
        }
        if !(1..=MAX_SYNCED_ENTRIES).contains(&self.admin.max_entries) {
            problems.add(
                "admin.max_entries",
                format!(
                    "must be between 1 and {MAX_SYNCED_ENTRIES} (every Envoy's filter receives \
                     and checks the whole lists)"
                ),
            );
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
                match redis.timeout.parse() {
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

    /// The per-request deadline (validated by `validate`).
    pub fn request_timeout(&self) -> Span {
        self.listen.request_timeout.parse().unwrap_or(Span::SECOND)
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
    pub fn resolved(mut self, base: &Path) -> ServerConfig {
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

    /// The Redis call timeout (validated by `validate`).
    pub fn redis_timeout(&self) -> Span {
        self.storage
            .redis
            .as_ref()
            .and_then(|r| r.timeout.parse().ok())
            .unwrap_or(Span::from_millis(20))
    }
}
