//! The audit log: every grant and revoke, appended as a JSON line to the
//! configured file and kept (the most recent ones) for `GET /audit`.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use sluice_core::access::AuditEvent;

/// Events kept in memory for `GET /audit`; the file keeps all of them.
const RECENT: usize = 1_000;

/// Where audit events go.
#[derive(Debug, Default)]
pub struct Audit {
    file: Option<Mutex<File>>,
    recent: Mutex<VecDeque<AuditEvent>>,
}

/// The audit file could not be opened or written.
#[derive(Debug, thiserror::Error)]
#[error("audit log {path}: {source}; check admin.audit_log and the directory's permissions")]
pub struct AuditError {
    path: String,
    source: std::io::Error,
}

impl Audit {
    /// Appends to `path` (created if missing) when given.
    pub fn open(path: Option<&Path>) -> Result<Audit, AuditError> {
        let file = match path {
            None => None,
            Some(p) => Some(Mutex::new(
                File::options()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|source| AuditError {
                        path: p.display().to_string(),
                        source,
                    })?,
            )),
        };
        Ok(Audit {
            file,
            recent: Mutex::default(),
        })
    }

    /// Records `event`: in the file first, so that nothing is granted
    /// unrecorded (callers undo the change when this fails).
    pub fn record(&self, event: &AuditEvent) -> Result<(), std::io::Error> {
        if let Some(file) = &self.file {
            let mut line = serde_json::to_vec(event)?;
            line.push(b'\n');
            let mut file = file.lock().unwrap_or_else(|p| p.into_inner());
            file.write_all(&line)?;
            file.flush()?;
        }
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() == RECENT {
            recent.pop_front();
        }
        recent.push_back(event.clone());
        tracing::info!(
            action = ?event.action,
            subject = %event.subject,
            target = %event.target,
            by = %event.by,
            reason = %event.reason,
            "audit"
        );
        Ok(())
    }

    /// The most recent events, oldest first.
    pub fn recent(&self) -> Vec<AuditEvent> {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent.iter().cloned().collect()
    }
}
