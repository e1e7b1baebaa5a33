//! Admin overrides for a key (unlimited, or a raised limit, until an
//! expiry), and the audit events their grants and revocations produce.

use alloc::string::String;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

use super::bounded::{Bounded, Expiring, Full};
use crate::time::Nanos;

/// What an override grants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Grant {
    /// No limit at all (nothing is counted).
    Unlimited,
    /// This many permits per window instead of the configured count.
    Limit(u64),
}

/// An override in force for one key until it expires.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Override {
    /// The key it applies to (the host decides what keys a request has).
    pub key: String,
    /// What it grants.
    pub grant: Grant,
    /// When it ends.
    pub until: Nanos,
    /// Why it was granted.
    pub reason: String,
    /// Who granted it.
    pub by: String,
    /// When it was granted.
    pub granted_at: Nanos,
}

impl Expiring for Override {
    type Target = str;

    fn target(&self) -> &str {
        &self.key
    }

    fn until(&self) -> Option<Nanos> {
        Some(self.until)
    }
}

/// What an audit event records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditAction {
    /// Something was granted or added.
    Grant,
    /// Something was revoked or removed.
    Revoke,
}

/// One grant or revocation, for the audit log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// When it happened.
    pub at: Nanos,
    /// Grant or revoke.
    pub action: AuditAction,
    /// What kind of thing (`override`, `ban`, `allow`, `deny`, `rule`).
    pub subject: String,
    /// Which one (a key, a network, a rule).
    pub target: String,
    /// What was granted, as text (e.g. `unlimited`, `limit 500`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
    /// When the grant ends, if it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<Nanos>,
    /// Why.
    #[serde(default)]
    pub reason: String,
    /// Who.
    #[serde(default)]
    pub by: String,
}

/// Overrides by key, at most `max` of them.
#[derive(Clone, Debug)]
pub struct Overrides {
    entries: Bounded<Override>,
}

impl Overrides {
    /// No overrides; room for `max`.
    pub fn new(max: usize) -> Overrides {
        Overrides {
            entries: Bounded::new(max),
        }
    }

    /// Grants `o`, replacing one for the same key; returns its audit event
    /// and the replaced override (to restore if the grant must be undone).
    pub fn grant(
        &mut self,
        o: Override,
        now: Nanos,
    ) -> Result<(AuditEvent, Option<Override>), Full> {
        let event = AuditEvent {
            at: now,
            action: AuditAction::Grant,
            subject: "override".into(),
            target: o.key.clone(),
            detail: match o.grant {
                Grant::Unlimited => "unlimited".into(),
                Grant::Limit(n) => alloc::format!("limit {n}"),
            },
            until: Some(o.until),
            reason: o.reason.clone(),
            by: o.by.clone(),
        };
        let replaced = self.entries.put(o, now)?;
        Ok((event, replaced))
    }

    /// Revokes the override for `key`; the audit event if there was one.
    pub fn revoke(&mut self, key: &str, by: &str, reason: &str, now: Nanos) -> Option<AuditEvent> {
        self.entries.remove(key).map(|o| AuditEvent {
            at: now,
            action: AuditAction::Revoke,
            subject: "override".into(),
            target: o.key,
            detail: String::new(),
            until: None,
            reason: reason.into(),
            by: by.into(),
        })
    }

    /// The override in force for `key` at `now`.
    pub fn get(&self, key: &str, now: Nanos) -> Option<&Override> {
        self.entries.live(now).find(|o| o.key == key)
    }

    /// Whether there are none (expired ones not yet purged count).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The overrides in force.
    pub fn list(&self, now: Nanos) -> Vec<Override> {
        self.entries.live(now).cloned().collect()
    }

    /// Drops expired overrides.
    pub fn purge(&mut self, now: Nanos) {
        self.entries.purge(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raised(key: &str, n: u64, until: u64) -> Override {
        Override {
            key: key.into(),
            grant: Grant::Limit(n),
            until: Nanos(until),
            reason: "launch".into(),
            by: "ops".into(),
            granted_at: Nanos(0),
        }
    }

    #[test]
    fn grant_get_expire_revoke() {
        let mut o = Overrides::new(4);
        let (event, replaced) = o.grant(raised("user=a", 500, 100), Nanos(0)).unwrap();
        assert!(replaced.is_none());
        assert_eq!(event.action, AuditAction::Grant);
        assert_eq!(event.detail, "limit 500");
        assert_eq!(
            o.get("user=a", Nanos(99)).map(|x| x.grant),
            Some(Grant::Limit(500))
        );
        assert!(o.get("user=a", Nanos(100)).is_none());
        assert!(o.get("user=b", Nanos(0)).is_none());
        let revoked = o.revoke("user=a", "ops", "done", Nanos(5)).unwrap();
        assert_eq!(revoked.action, AuditAction::Revoke);
        assert!(o.revoke("user=a", "ops", "again", Nanos(5)).is_none());
    }

    #[test]
    fn bounded() {
        let mut o = Overrides::new(1);
        o.grant(raised("a", 1, 10), Nanos(0)).unwrap();
        assert_eq!(
            o.grant(raised("b", 1, 10), Nanos(0)).unwrap_err(),
            Full { max: 1 }
        );
        assert!(o.grant(raised("b", 1, 20), Nanos(10)).is_ok());
        assert_eq!(o.list(Nanos(10)).len(), 1);
    }
}
