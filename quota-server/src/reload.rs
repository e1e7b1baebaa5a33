//! Hot reload and runtime rules: the limits in force are the configuration
//! file's, with the rules added through the admin API layered over them.
//!
//! - The file's directory is watched (not the file), so a replace by
//!   rename (`mv tmp sluice.yaml`, as editors save) and a Kubernetes
//!   ConfigMap swap (the `..data` symlink renamed over) are seen, as well as
//!   in-place writes. Events are debounced, then the file is re-read.
//! - A file that does not load keeps the old limits; every error is logged
//!   with its location. Reloads are counted (ok/failed) in the metrics.
//! - Only domains, descriptors and descriptor files are reloaded; listen
//!   addresses, storage and admin settings need a restart.
//! - Runtime rules survive reloads (they are layered over each new file)
//!   but not restarts. A runtime rule replaces the file's top-level
//!   descriptor with the same key and value in its domain.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use notify::{RecursiveMode, Watcher};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::config::{self, DescriptorConfig, DomainConfig, LoadError, ServerConfig};
use crate::limits::Limits;
use crate::service::Shared;

/// Most runtime rules: each is a metric label and a node in every lookup.
pub const MAX_RUNTIME_RULES: usize = 1_000;

/// Quiet time after the last file event before reloading: editors and
/// ConfigMap swaps write in several steps.
const QUIET: Duration = Duration::from_millis(100);

/// Longest a burst of events may postpone a reload.
const MAX_DELAY: Duration = Duration::from_secs(1);

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

    fn base(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }

    /// Re-reads the file and, if it changed and is valid, puts its limits
    /// (with the runtime rules) in force.
    pub fn reload(&self, shared: &Shared) -> Result<Reloaded, ReloadError> {
        // A read error is left to `load`, which reports it with the path.
        if std::fs::read_to_string(&self.path).is_ok_and(|t| t.trim().is_empty()) {
            return Err(ReloadError::Empty(self.path.clone()));
        }
        let (file, _) = config::load(&self.path)?;
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
        return file.compile(base);
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
    config.compile(base)
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

/// Reloads now, logging the result and counting it.
pub fn apply(source: &ConfigSource, shared: &Shared) {
    match source.reload(shared) {
        Ok(Reloaded::Applied) => {
            shared.metrics.reload(true);
            tracing::info!(path = %source.path.display(), "configuration reloaded");
        }
        Ok(Reloaded::Unchanged) => {}
        Err(error) => {
            shared.metrics.reload(false);
            let path = source.path.display();
            match &error {
                ReloadError::Load(LoadError::Invalid(errors)) => {
                    for e in errors {
                        tracing::error!(%path, "reload rejected, old configuration kept: {e}");
                    }
                }
                other => tracing::error!(%path, "reload rejected, old configuration kept: {other}"),
            }
        }
    }
}

/// A running watch; dropping it stops watching.
#[derive(Debug)]
pub struct Watch {
    _watcher: notify::RecommendedWatcher,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Whether a changed file name can affect the configuration: the file
/// itself, a ConfigMap's `..data` link, or a YAML file (descriptor files).
fn relevant(name: &str, config_name: &str) -> bool {
    name == config_name
        || name.starts_with("..data")
        || name.ends_with(".yaml")
        || name.ends_with(".yml")
}

/// Watches the configuration's directory and reloads on change. Must be
/// called inside a tokio runtime.
pub fn watch(source: Arc<ConfigSource>, shared: Arc<Shared>) -> Result<Watch, notify::Error> {
    let dir = match source.base() {
        p if p.as_os_str().is_empty() => PathBuf::from("."),
        p => p.to_path_buf(),
    };
    let config_name = source
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let wanted = match event {
            Ok(e) => e.paths.iter().any(|p| {
                p.file_name()
                    .is_some_and(|n| relevant(&n.to_string_lossy(), &config_name))
            }),
            // Lost events (queue overflow): re-read to be safe.
            Err(_) => true,
        };
        if wanted {
            // The receiver is gone only when the server is stopping.
            let _ = tx.send(());
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    let task = tokio::spawn(async move {
        while rx.recv().await.is_some() {
            let first = Instant::now();
            // Debounce: wait for a quiet spell, but not forever.
            while first.elapsed() < MAX_DELAY {
                match tokio::time::timeout(QUIET, rx.recv()).await {
                    Ok(Some(())) => {}
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            let (source, shared) = (source.clone(), shared.clone());
            // Reading files blocks; keep it off the request workers.
            let _ = tokio::task::spawn_blocking(move || apply(&source, &shared)).await;
        }
    });
    Ok(Watch {
        _watcher: watcher,
        task,
    })
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
