//! Restoring runtime admin state on startup from the audit log: the grants
//! still in force (allow and deny entries, bans, overrides not expired and
//! not revoked since, runtime rules not removed since) are applied again,
//! without being recorded a second time.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use sluice_core::access::wire::check_key;
use sluice_core::access::{
    AuditAction, AuditEvent, Ban, BanTarget, Cidr, Grant, ListEntry, ListKind, Override,
};
use sluice_core::time::Nanos;

use crate::config::DescriptorConfig;
use crate::shared::Shared;
use crate::source::{ConfigSource, RuntimeRule};

/// How many grants came back, and how many could not.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Replayed {
    /// Grants in force again.
    pub restored: usize,
    /// Lines or grants that could not be used (each is logged).
    pub skipped: usize,
}

/// The audit log could not be read.
#[derive(Debug, thiserror::Error)]
#[error(
    "audit log {path}: {source}; runtime grants were not restored (check admin.audit_log \
     and the file's permissions)"
)]
pub struct ReplayError {
    path: PathBuf,
    source: std::io::Error,
}

/// Applies the grants of the audit log at `path` still in force at `now`
/// to `shared`'s controls and `source`'s runtime rules. A missing file, or
/// one that is not a regular file, restores nothing.
pub fn replay(
    path: &Path,
    shared: &Shared,
    source: &ConfigSource,
    now: Nanos,
) -> Result<Replayed, ReplayError> {
    let error = |source| ReplayError {
        path: path.to_path_buf(),
        source,
    };
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Replayed::default()),
        Err(e) => return Err(error(e)),
    };
    // A device or pipe (such as /dev/full) may never end: only a regular
    // file has grants to read, and it is finite.
    if !file.metadata().map_err(error)?.is_file() {
        return Ok(Replayed::default());
    }
    let mut replayed = Replayed::default();
    // The last grant of each (subject, target) not revoked after it, with
    // its position so that grants are applied in their original order.
    let mut live: HashMap<(String, String), (usize, AuditEvent)> = HashMap::new();
    for (number, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(error)?;
        if line.trim().is_empty() {
            continue;
        }
        let event: AuditEvent = match serde_json::from_str(&line) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(path = %path.display(), line = number + 1, %e, "audit line not replayed");
                replayed.skipped += 1;
                continue;
            }
        };
        let key = (event.subject.clone(), event.target.clone());
        match event.action {
            AuditAction::Grant => live.insert(key, (number, event)),
            AuditAction::Revoke => live.remove(&key),
        };
    }
    let mut grants: Vec<(usize, AuditEvent)> = live.into_values().collect();
    grants.sort_by_key(|(number, _)| *number);
    for (_, event) in grants {
        if event.until.is_some_and(|until| until <= now) {
            continue;
        }
        match apply(&event, shared, source, now) {
            Ok(()) => replayed.restored += 1,
            Err(why) => {
                tracing::warn!(subject = %event.subject, target = %event.target, why, "grant not restored");
                replayed.skipped += 1;
            }
        }
    }
    Ok(replayed)
}

/// Applies one grant; why not, when it cannot be.
fn apply(
    event: &AuditEvent,
    shared: &Shared,
    source: &ConfigSource,
    now: Nanos,
) -> Result<(), String> {
    let controls = &shared.controls;
    let reason = event.reason.clone();
    match event.subject.as_str() {
        "allow" | "deny" => {
            let kind = if event.subject == "allow" {
                ListKind::Allow
            } else {
                ListKind::Deny
            };
            let cidr = Cidr::parse(&event.target).map_err(|e| e.to_string())?;
            let entry = ListEntry {
                cidr,
                until: event.until,
                reason,
            };
            controls
                .access_mut()
                .add(kind, entry, now)
                .map_err(|e| e.to_string())?;
        }
        "ban" => {
            // Bans are written as their network or their key; a key that
            // reads as an address bans that address, which matches the same.
            let target = match Cidr::parse(&event.target) {
                Ok(cidr) => BanTarget::Cidr(cidr),
                Err(_) => {
                    check_key(&event.target).map_err(|e| e.to_string())?;
                    BanTarget::Key(event.target.clone())
                }
            };
            let until = event.until.ok_or("a ban without an expiry")?;
            let ban = Ban {
                target,
                until,
                reason,
            };
            controls
                .access_mut()
                .ban(ban, now)
                .map_err(|e| e.to_string())?;
        }
        "override" => {
            let grant = match event.detail.as_str() {
                "unlimited" => Grant::Unlimited,
                detail => detail
                    .strip_prefix("limit ")
                    .and_then(|n| n.parse().ok())
                    .map(Grant::Limit)
                    .ok_or_else(|| format!("unknown override detail {detail:?}"))?,
            };
            check_key(&event.target).map_err(|e| e.to_string())?;
            let o = Override {
                key: event.target.clone(),
                grant,
                until: event.until.ok_or("an override without an expiry")?,
                reason,
                by: event.by.clone(),
                granted_at: event.at,
            };
            controls
                .overrides_mut()
                .grant(o, now)
                .map_err(|e| e.to_string())?;
        }
        "rule" => {
            let descriptor: DescriptorConfig =
                serde_json::from_str(&event.detail).map_err(|e| e.to_string())?;
            // The target is `domain/key` or `domain/key=value`.
            let node = match &descriptor.value {
                Some(v) => format!("/{}={v}", descriptor.key),
                None => format!("/{}", descriptor.key),
            };
            let domain = event
                .target
                .strip_suffix(&node)
                .ok_or("the target does not name the descriptor")?;
            let rule = RuntimeRule {
                domain: domain.to_owned(),
                descriptor,
            };
            source.add_rule(shared, rule).map_err(|e| e.to_string())?;
        }
        other => return Err(format!("unknown subject {other:?}")),
    }
    Ok(())
}
