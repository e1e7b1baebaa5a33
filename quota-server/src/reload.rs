//! Hot reload: the configuration's directory is watched (not the file),
//! so a replace by rename (`mv tmp sluice.yaml`, as editors save) and a
//! Kubernetes ConfigMap swap (the `..data` symlink renamed over) are seen,
//! as well as in-place writes. Only events that change content count
//! (writes, creates, renames, deletes; not the reload's own reads). Events
//! are debounced, then the file is re-read (see [`ConfigSource::reload`]);
//! every error is logged with its location, and reloads are counted
//! (ok/failed) in the metrics.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::config::LoadError;
use crate::shared::Shared;
use crate::source::{ConfigSource, ReloadError, Reloaded};

/// Quiet time after the last file event before reloading: editors and
/// ConfigMap swaps write in several steps.
const QUIET: Duration = Duration::from_millis(100);

/// Longest a burst of events may postpone a reload.
const MAX_DELAY: Duration = Duration::from_secs(1);

/// Reloads now, logging the result and counting it.
pub fn apply(source: &ConfigSource, shared: &Shared) {
    match source.reload(shared) {
        Ok(Reloaded::Applied) => {
            shared.metrics.reload(true);
            tracing::info!(path = %source.path().display(), "configuration reloaded");
        }
        Ok(Reloaded::Unchanged) => {}
        Err(error) => {
            shared.metrics.reload(false);
            let path = source.path().display();
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

/// Whether an event can change what the files say: a write, create,
/// rename or delete. Opens, reads and closes without writing are not (the
/// reload's own read would otherwise trigger the next reload, forever).
fn changes_content(kind: &EventKind) -> bool {
    matches!(
        kind,
        EventKind::Create(_)
            | EventKind::Modify(_)
            | EventKind::Remove(_)
            | EventKind::Access(AccessKind::Close(AccessMode::Write))
    )
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
        .path()
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let wanted = match event {
            // A rescan means events were lost: re-read to be safe.
            Ok(e) if e.need_rescan() => true,
            Ok(e) => {
                changes_content(&e.kind)
                    && e.paths.iter().any(|p| {
                        p.file_name()
                            .is_some_and(|n| relevant(&n.to_string_lossy(), &config_name))
                    })
            }
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
