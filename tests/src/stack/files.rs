//! The stack's configuration files, shared by both topologies:
//! `envoy/stack/filter.json` (the filter's rules), `envoy/stack/sluice.yaml`
//! (the quota server's), `envoy/compose.yaml` and the Envoy configuration
//! rendered for it, `envoy/stack/envoy.yaml`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context as _, Result};
use serde_json::Value;
use serde_norway::{Mapping, Value as Yaml};

use crate::repo_root;

/// The filter's `sync.max_lease` when a leased rule gives none (sluice-core's
/// `DEFAULT_MAX_LEASE`, which this crate does not depend on).
const DEFAULT_MAX_LEASE: u64 = 100;

/// `envoy/stack/`: the stack's files.
pub fn stack_dir() -> PathBuf {
    repo_root().join("envoy/stack")
}

/// The filter's rules for both topologies.
pub fn filter_path() -> PathBuf {
    stack_dir().join("filter.json")
}

/// The quota server's configuration (compose's as it is; the local stack's
/// with `listen` and `storage` replaced).
pub fn quota_config_path() -> PathBuf {
    stack_dir().join("sluice.yaml")
}

/// The Envoy configuration of compose's Envoys, rendered from the template.
pub fn compose_envoy_path() -> PathBuf {
    stack_dir().join("envoy.yaml")
}

/// The compose file.
pub fn compose_path() -> PathBuf {
    repo_root().join("envoy/compose.yaml")
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// The filter's configuration as written in [`filter_path`], checked to be
/// JSON (the filter itself validates the rest when Envoy loads it).
pub fn filter_config() -> Result<String> {
    let path = filter_path();
    let text = read(&path)?;
    serde_json::from_str::<Value>(&text)
        .with_context(|| format!("{} is not JSON", path.display()))?;
    Ok(text)
}

/// The sync modes of the filter configuration's synced rules, by rule name.
pub fn sync_modes(filter: &str) -> Result<BTreeMap<String, String>> {
    let config: Value = serde_json::from_str(filter).context("the filter configuration")?;
    let rules = config
        .get("rules")
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow!("the filter configuration has no `rules` list"))?;
    Ok(rules
        .iter()
        .filter_map(|rule| {
            let name = rule.get("name")?.as_str()?;
            let mode = rule.get("sync")?.get("mode")?.as_str()?;
            Some((name.to_owned(), mode.to_owned()))
        })
        .collect())
}

/// The `sync.max_lease` of leased rule `name` in the filter configuration
/// (the filter's default when not given); `None` for a rule not leased.
pub fn max_lease(filter: &str, name: &str) -> Option<u64> {
    let config: Value = serde_json::from_str(filter).ok()?;
    let sync = config
        .get("rules")?
        .as_array()?
        .iter()
        .find(|rule| rule.get("name").and_then(Value::as_str) == Some(name))?
        .get("sync")?;
    if sync.get("mode")?.as_str()? != "leased" {
        return None;
    }
    Some(
        sync.get("max_lease")
            .and_then(Value::as_u64)
            .unwrap_or(DEFAULT_MAX_LEASE),
    )
}

/// The local `limit.count` of rule `name` in the filter configuration.
pub fn local_limit(filter: &str, name: &str) -> Option<u64> {
    let config: Value = serde_json::from_str(filter).ok()?;
    config
        .get("rules")?
        .as_array()?
        .iter()
        .find(|rule| rule.get("name").and_then(Value::as_str) == Some(name))?
        .get("limit")?
        .get("count")?
        .as_u64()
}

/// The quota server's configuration ([`quota_config_path`]), parsed.
fn quota_config() -> Result<Yaml> {
    let path = quota_config_path();
    serde_norway::from_str(&read(&path)?).with_context(|| format!("parsing {}", path.display()))
}

/// The `listen.grpc` address of [`quota_config_path`] (compose's).
pub fn quota_listen() -> Result<String> {
    quota_config()?
        .get("listen")
        .and_then(|l| l.get("grpc"))
        .and_then(Yaml::as_str)
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("{} has no listen.grpc", quota_config_path().display()))
}

/// The `count` of each rule of [`quota_config_path`]'s domains, by name.
pub fn quota_limits() -> Result<BTreeMap<String, u64>> {
    let config = quota_config()?;
    let mut limits = BTreeMap::new();
    let domains = config.get("domains").and_then(Yaml::as_sequence);
    for domain in domains.into_iter().flatten() {
        let rules = domain.get("rules").and_then(Yaml::as_sequence);
        for rule in rules.into_iter().flatten() {
            let name = rule.get("name").and_then(Yaml::as_str);
            let count = rule
                .get("limit")
                .and_then(|l| l.get("count"))
                .and_then(Yaml::as_u64);
            if let (Some(name), Some(count)) = (name, count) {
                limits.insert(name.to_owned(), count);
            }
        }
    }
    Ok(limits)
}

/// [`quota_config_path`] for loopback: gRPC on `grpc` and the admin API
/// on `admin` (e.g. `127.0.0.1:0`; it starts only with a token); counters
/// in memory, or with `redis_url` in that Redis (the file's other Redis
/// settings kept).
pub fn local_quota_config(grpc: &str, admin: &str, redis_url: Option<&str>) -> Result<String> {
    let path = quota_config_path();
    let mut config = quota_config()?;
    let root = config
        .as_mapping_mut()
        .ok_or_else(|| anyhow!("{} is not a mapping", path.display()))?;
    let mut listen = Mapping::new();
    listen.insert("grpc".into(), grpc.into());
    listen.insert("admin".into(), admin.into());
    root.insert("listen".into(), Yaml::Mapping(listen));
    match redis_url {
        Some(url) => {
            let redis = root
                .get_mut("storage")
                .and_then(|s| s.get_mut("redis"))
                .and_then(Yaml::as_mapping_mut)
                .ok_or_else(|| anyhow!("{} has no storage.redis", path.display()))?;
            redis.insert("url".into(), url.into());
        }
        None => {
            let mut memory = Mapping::new();
            memory.insert("backend".into(), "memory".into());
            root.insert("storage".into(), Yaml::Mapping(memory));
        }
    }
    Ok(serde_norway::to_string(&config)?)
}
