//! The runtime controls every request passes through before its limits:
//! allow list, deny list, bans and overrides (see `sluice_core::access`).
//!
//! A request's client IP is the value of its descriptors' client-IP entry
//! (`remote_address` by default, as Envoy sends it). Its keys are its
//! entries written `key=value`: a ban of `user=mallory` refuses any request
//! with that entry, and an override for `user=alice` applies to every
//! descriptor carrying that entry.
//!
//! Callers that enforce the controls themselves (every Envoy's filter) get
//! them on `Sync` and `Check` answers whenever the version they hold is not
//! [`Controls::version`]: a digest of the lists, computed again only after
//! something took them for writing.

pub mod audit;

use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use sluice_core::access::{wire, Access, AccessList, Grant, Overrides};
use sluice_core::algorithm::{Limiter, Quota};
use sluice_core::client_ip::parse_ip;
use sluice_core::time::Nanos;

pub use audit::{Audit, AuditError};

use crate::config::AdminConfig;
use crate::limits::ticks::tick_micros;
use crate::limits::{Limit, Resolved};
use crate::proto;

/// Access lists, overrides and the audit log.
#[derive(Debug)]
pub struct Controls {
    access: RwLock<AccessList>,
    overrides: RwLock<Overrides>,
    client_ip_key: String,
    /// Where grants and revokes are recorded.
    pub audit: Audit,
    /// The lists were taken for writing since `version` was computed.
    changed: AtomicBool,
    /// The version of the lists, as last computed.
    version: AtomicU64,
}

/// What the controls decide for a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Gate {
    /// Allow-listed: answer OK, count nothing.
    Allowed,
    /// Deny-listed or banned: answer OVER_LIMIT, count nothing.
    Denied,
    /// Limits apply, with the override (if any) of each descriptor.
    Limits(Vec<Option<Grant>>),
}

impl Default for Controls {
    fn default() -> Self {
        Controls::with_audit(&AdminConfig::default(), Audit::default())
    }
}

impl Controls {
    /// Empty controls as configured, opening the audit log (a relative
    /// path is resolved against `base`, the configuration's directory).
    pub fn new(config: &AdminConfig, base: &Path) -> Result<Controls, AuditError> {
        let path = config.audit_log.as_ref().map(|p| base.join(p));
        let audit = Audit::open(path.as_deref())?;
        Ok(Controls::with_audit(config, audit))
    }

    fn with_audit(config: &AdminConfig, audit: Audit) -> Controls {
        Controls {
            access: RwLock::new(AccessList::new(config.max_entries)),
            overrides: RwLock::new(Overrides::new(config.max_entries)),
            client_ip_key: config.client_ip_key.clone(),
            audit,
            changed: AtomicBool::new(true),
            version: AtomicU64::new(0),
        }
    }

    // The locks guard plain data replaced in single steps; a poisoned one
    // still holds a consistent list.

    /// The access lists, for reading.
    pub fn access(&self) -> RwLockReadGuard<'_, AccessList> {
        self.access.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The access lists, for changing.
    pub fn access_mut(&self) -> RwLockWriteGuard<'_, AccessList> {
        let guard = self.access.write().unwrap_or_else(|p| p.into_inner());
        // Marked while the lock is held: a reader of the version waits for
        // the change to end before computing it again.
        self.changed.store(true, Ordering::Release);
        guard
    }

    /// The overrides, for reading.
    pub fn overrides(&self) -> RwLockReadGuard<'_, Overrides> {
        self.overrides.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The overrides, for changing.
    pub fn overrides_mut(&self) -> RwLockWriteGuard<'_, Overrides> {
        let guard = self.overrides.write().unwrap_or_else(|p| p.into_inner());
        self.changed.store(true, Ordering::Release);
        guard
    }

    /// The version of the controls in force (`wire::version`): computed
    /// again only when the lists were taken for writing since.
    pub fn version(&self, now: Nanos) -> u64 {
        if self.changed.swap(false, Ordering::AcqRel) {
            let version = wire::version(&self.access(), &self.overrides(), now);
            self.version.store(version, Ordering::Release);
            return version;
        }
        self.version.load(Ordering::Acquire)
    }

    /// The controls to send a caller that enforces version `have` (`None`:
    /// it does not enforce them): nothing when it has the ones in force.
    pub fn for_caller(&self, have: Option<u64>, now: Nanos) -> Option<proto::Controls> {
        let have = have?;
        let version = self.version(now);
        (have != version).then(|| wire::to_wire(&self.access(), &self.overrides(), version, now))
    }

    /// Drops expired entries, so that the lists' fast path (nothing
    /// listed) comes back once everything has expired.
    pub fn purge(&self, now: Nanos) {
        if !self.access().is_empty() {
            self.access_mut().purge(now);
        }
        if !self.overrides().is_empty() {
            self.overrides_mut().purge(now);
        }
    }

    /// What applies to a request with these descriptors' entries.
    pub fn gate(&self, descriptors: &[Vec<(String, String)>], now: Nanos) -> Gate {
        // The usual case, with nothing listed, builds no key strings.
        if self.access().is_empty() && self.overrides().is_empty() {
            return Gate::Limits(vec![None; descriptors.len()]);
        }
        let ip = descriptors
            .iter()
            .flatten()
            .find(|(k, _)| *k == self.client_ip_key)
            .and_then(|(_, v)| parse_ip(v));
        let keys: Vec<Vec<String>> = descriptors
            .iter()
            .map(|d| d.iter().map(|(k, v)| format!("{k}={v}")).collect())
            .collect();
        self.gate_units(ip, &keys, now)
    }

    /// What applies to units named by caller keys (`Check` and `Sync`
    /// items): each key is matched as is, and the first key that is an IP
    /// address is the client IP for the network lists and bans.
    pub fn gate_keys<'k>(&self, keys: impl IntoIterator<Item = &'k str>, now: Nanos) -> Gate {
        let keys: Vec<&str> = keys.into_iter().collect();
        if self.access().is_empty() && self.overrides().is_empty() {
            return Gate::Limits(vec![None; keys.len()]);
        }
        let ip = keys.iter().find_map(|k| parse_ip(k));
        let units: Vec<Vec<String>> = keys.iter().map(|k| vec![(*k).to_owned()]).collect();
        self.gate_units(ip, &units, now)
    }

    /// The lists for a request from `ip` whose units carry `keys`, then
    /// each unit's override (its first key that has one).
    fn gate_units(&self, ip: Option<IpAddr>, keys: &[Vec<String>], now: Nanos) -> Gate {
        let all = keys.iter().flatten().map(String::as_str);
        match self.access().check(ip, all, now) {
            Access::Allowed => return Gate::Allowed,
            Access::Denied => return Gate::Denied,
            Access::Neutral => {}
        }
        let overrides = self.overrides();
        Gate::Limits(
            keys.iter()
                .map(|d| {
                    d.iter()
                        .find_map(|k| overrides.get(k, now).map(|o| o.grant))
                })
                .collect(),
        )
    }
}

/// The limit `limit` becomes under a raised-limit override: same window,
/// same counter (so what was consumed still counts), `count` permits.
/// `None` when there is no raised limit, or the raised quota is invalid or
/// beyond the Redis script's exact arithmetic (the configured limit stays).
pub fn raise(resolved: Resolved<'_>, grant: Option<Grant>) -> Option<Limit> {
    let (Resolved::Limited(limit), Some(Grant::Limit(count))) = (resolved, grant) else {
        return None;
    };
    let quota = limit.quota();
    // A burst set apart from the count stays (at least the new count).
    let burst = (quota.burst() != quota.count()).then(|| quota.burst().max(count));
    let raised = Quota::new(count, quota.per(), burst).ok()?;
    let tick_us = Some(tick_micros(limit.algorithm(), &raised).ok()?);
    let mut out = limit.clone();
    out.rule.quota = raised;
    out.rule.limiter = Limiter::new(limit.algorithm(), raised);
    out.tick_us = tick_us;
    Some(out)
}

/// The limit a descriptor is charged against: none when unlimited (by
/// config or override), else the raised one if any, else the configured one.
pub fn applicable<'a>(
    resolved: Resolved<'a>,
    grant: Option<Grant>,
    raised: &'a Option<Limit>,
) -> Option<&'a Limit> {
    match (resolved, grant) {
        (_, Some(Grant::Unlimited)) => None,
        (Resolved::Limited(limit), _) => Some(raised.as_ref().unwrap_or(limit)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_core::access::{Ban, BanTarget, Cidr, ListEntry, ListKind, Override};

    fn entries(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn gate_reads_the_client_ip_and_entry_keys() {
        let c = Controls::default();
        let now = Nanos(10);
        let request = [
            entries(&[("remote_address", "10.0.0.7")]),
            entries(&[("user", "alice"), ("plan", "free")]),
        ];
        assert_eq!(c.gate(&request, now), Gate::Limits(vec![None, None]));
        c.overrides_mut()
            .grant(
                Override {
                    key: "plan=free".into(),
                    grant: Grant::Limit(7),
                    until: Nanos(100),
                    reason: "r".into(),
                    by: "t".into(),
                    granted_at: now,
                },
                now,
            )
            .unwrap();
        assert_eq!(
            c.gate(&request, now),
            Gate::Limits(vec![None, Some(Grant::Limit(7))])
        );
        let allow = ListEntry {
            cidr: Cidr::parse("10.0.0.0/24").unwrap(),
            until: None,
            reason: String::new(),
        };
        c.access_mut().add(ListKind::Allow, allow, now).unwrap();
        assert_eq!(c.gate(&request, now), Gate::Allowed);
        let ban = Ban {
            target: BanTarget::Key("user=alice".into()),
            until: Nanos(20),
            reason: String::new(),
        };
        c.access_mut().ban(ban, now).unwrap();
        assert_eq!(c.gate(&request, now), Gate::Denied);
        assert_eq!(c.gate(&request, Nanos(20)), Gate::Allowed);
    }
}
