//! The configuration in force: the file's, with the rules added through
//! the admin API layered over it.
//!
//! - A file that does not load keeps the old limits.
//! - Only domains, descriptors and descriptor files are reloaded; listen
//!   addresses, storage and admin settings need a restart.
//! - Runtime rules survive reloads (they are layered over each new file)
//!   but not restarts (the admin API replays them from the audit log). A
//!   runtime rule replaces the file's top-level descriptor with the same
//!   key and value in its domain.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::config::{self, DescriptorConfig, DomainConfig, LoadError, ServerConfig};
use crate::limits::{self, Limits};
use crate::shared::Shared;

/// Most runtime rules: each is a metric label and a node in every lookup.
pub const MAX_RUNTIME_RULES: usize = 1_000;

/// A top-level descriptor added at runtime to a domain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeRule {
    /// The domain (created if the file has none of that name).
    pub domain: String,
    /// The descriptor, in the file's format.
    pub descriptor: DescriptorConfig,
}

impl RuntimeRule {
    fn same_node(&self, domain: &str, key: &str, value: Option<&str>) -> bool {
        self.domain == domain
            && self.descriptor.key == key
            && self.descriptor.value.as_deref() == value
    }
}

/// Why runtime rules could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    /// The rules with this change do not validate.
    #[error("{0}")]
    Invalid(#[from] LoadError),
    /// The bound on runtime rules is reached.
    #[error("at most {MAX_RUNTIME_RULES} runtime rules; remove some first")]
    Full,
}

/// Why a reload was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file does not load.
    #[error("{0}")]
    Load(#[from] LoadError),
    /// The file is empty: most likely caught mid-write. An empty file is a
    /// valid configuration with no limits, so it is refused on reload
    /// rather than silently lifting every limit.
    #[error(
        "{0}: the file is empty (a write in progress?); to remove every limit, write `domains: []`"
    )]
    Empty(PathBuf),
}

/// What a reload did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reloaded {
    /// New limits are in force.
    Applied,
    /// The files are as last loaded: nothing to do.
    Unchanged,
}

/// The configuration file and the runtime rules over it.
#[derive(Debug)]
pub struct ConfigSource {
    path: PathBuf,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    file: ServerConfig,
    /// The files' text as last loaded, to skip events that change nothing.
    fingerprint: String,
    runtime: Vec<RuntimeRule>,
}

impl ConfigSource {
    /// The source for `path`, whose content `file` is in force.
    pub fn new(path: PathBuf, file: ServerConfig) -> ConfigSource {
        let fingerprint = fingerprint(&path, &file);
        ConfigSource {
            path,
            state: Mutex::new(State {
                file,
                fingerprint,
                runtime: Vec::new(),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Every update replaces whole fields after validation; a panic
        // cannot leave half a state behind.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The configuration file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The configuration's directory, which relative paths start from.
    pub fn base(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }

    /// Re-reads the file and, if it changed and is valid, puts its limits
    /// (with the runtime rules) in force.
    pub fn reload(&self, shared: &Shared) -> Result<Reloaded, ReloadError> {
        // A read error is left to `load`, which reports it with the path.
        if std::fs::read_to_string(&self.path).is_ok_and(|t| t.trim().is_empty()) {
            return Err(ReloadError::Empty(self.path.clone()));
        }
        let (file, _) = limits::load(&self.path)?;
        let print = fingerprint(&self.path, &file);
        let mut state = self.state();
        if print == state.fingerprint {
            return Ok(Reloaded::Unchanged);
        }
        let limits = layered(&file, &state.runtime, self.base())?;
        shared.replace(limits);
        let old = &state.file;
        if file.listen != old.listen || file.storage != old.storage || file.admin != old.admin {
            tracing::warn!(
                path = %self.path.display(),
                "listen, storage and admin settings changed: they apply after a restart"
            );
        }
        state.file = file;
        state.fingerprint = print;
        Ok(Reloaded::Applied)
    }

    /// The runtime rules.
    pub fn rules(&self) -> Vec<RuntimeRule> {
        self.state().runtime.clone()
    }

    /// Adds `rule`, replacing a runtime rule for the same node; returns
    /// the replaced one.
    pub fn add_rule(
        &self,
        shared: &Shared,
        rule: RuntimeRule,
    ) -> Result<Option<RuntimeRule>, RuleError> {
        let mut state = self.state();
        let mut runtime = state.runtime.clone();
        let d = &rule.descriptor;
        let replaced = runtime
            .iter()
            .position(|r| r.same_node(&rule.domain, &d.key, d.value.as_deref()))
            .map(|i| runtime.remove(i));
        if runtime.len() >= MAX_RUNTIME_RULES {
            return Err(RuleError::Full);
        }
        runtime.push(rule);
        shared.replace(layered(&state.file, &runtime, self.base())?);
        state.runtime = runtime;
        Ok(replaced)
    }

    /// Removes the runtime rule for a node; returns it if there was one.
    pub fn remove_rule(
        &self,
        shared: &Shared,
        domain: &str,
        key: &str,
        value: Option<&str>,
    ) -> Result<Option<RuntimeRule>, RuleError> {
        let mut state = self.state();
        let Some(i) = state
            .runtime
            .iter()
            .position(|r| r.same_node(domain, key, value))
        else {
            return Ok(None);
        };
        let mut runtime = state.runtime.clone();
        let removed = runtime.remove(i);
        shared.replace(layered(&state.file, &runtime, self.base())?);
        state.runtime = runtime;
        Ok(Some(removed))
    }
}

/// The file's limits with `runtime` layered over them.
fn layered(file: &ServerConfig, runtime: &[RuntimeRule], base: &Path) -> Result<Limits, LoadError> {
    if runtime.is_empty() {
        return Limits::compile(file, base);
    }
    let mut config = config::inline_descriptor_files(file.clone(), base)?;
    for rule in runtime {
        let domain = match config.domains.iter().position(|d| d.name == rule.domain) {
            Some(i) => &mut config.domains[i],
            None => {
                config.domains.push(DomainConfig {
                    name: rule.domain.clone(),
                    ..DomainConfig::default()
                });
                let last = config.domains.len() - 1;
                &mut config.domains[last]
            }
        };
        let d = &rule.descriptor;
        domain
            .descriptors
            .retain(|f| !(f.key == d.key && f.value == d.value));
        domain.descriptors.push(d.clone());
    }
    Limits::compile(&config, base)
}

/// The text of the file and of its descriptor files.
fn fingerprint(path: &Path, file: &ServerConfig) -> String {
    let base = path.parent().unwrap_or(Path::new("."));
    let mut print = std::fs::read_to_string(path).unwrap_or_default();
    for f in &file.descriptor_files {
        print.push('\0');
        print.push_str(&std::fs::read_to_string(base.join(&f.path)).unwrap_or_default());
    }
    print
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::Resolved;

    #[test]
    fn runtime_rules_replace_the_files_node_and_add_domains() {
        let file = ServerConfig::from_yaml(
            "domains: [{name: api, descriptors: [{key: user, rate_limit: {unit: minute, requests_per_unit: 1}}]}]",
        )
        .unwrap();
        let rule = |domain: &str, n: u64| RuntimeRule {
            domain: domain.into(),
            descriptor: serde_norway::from_str(&format!(
                "{{key: user, rate_limit: {{unit: minute, requests_per_unit: {n}}}}}"
            ))
            .unwrap(),
        };
        let limits = layered(&file, &[rule("api", 5), rule("other", 9)], Path::new(".")).unwrap();
        let count = |domain: &str| {
            let d = limits.domain(domain).unwrap();
            match limits.resolve(d, &[("user".into(), "a".into())]) {
                Resolved::Limited(l) => l.quota().count(),
                other => panic!("{other:?}"),
            }
        };
        assert_eq!((count("api"), count("other")), (5, 9));
    }
}
