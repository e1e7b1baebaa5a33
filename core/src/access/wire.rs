//! The access controls on the wire (`sluice.quota.v1.Controls`): the quota
//! server sends its allow and deny lists, bans and unlimited overrides with
//! the time each entry has left, and a caller rebuilds them against its own
//! clock ([`Synced::from_wire`]), so the two clocks need not agree.

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::hash::Hasher;

use siphasher::sip::SipHasher13;
use sluice_proto::quota::v1::{ban_entry, AccessEntry, BanEntry, Controls, UnlimitedKey};
use sluice_proto::Duration;

use super::bounded::Full;
use super::cidr::{Cidr, CidrError};
use super::list::{AccessList, Ban, BanTarget, ListEntry, ListKind};
use super::overrides::{Grant, Override, Overrides};
use crate::time::{Nanos, Span};

/// Most entries of each list (allow, deny, bans, unlimited keys) a caller
/// accepts: what one message may make it hold and scan per request.
pub const MAX_SYNCED_ENTRIES: usize = 10_000;

/// Longest key a ban or override may name (a longer one is refused when
/// granted), so that a message stays bounded.
pub const MAX_KEY_BYTES: usize = 256;

/// A key a ban or override cannot name.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Empty.
    #[error("the key is empty; give one such as user=mallory")]
    Empty,
    /// Over [`MAX_KEY_BYTES`].
    #[error("the key has {len} bytes; at most {MAX_KEY_BYTES} (every Envoy receives it)")]
    TooLong {
        /// Its length.
        len: usize,
    },
}

/// Whether `key` may be banned or overridden.
pub fn check_key(key: &str) -> Result<(), KeyError> {
    match key.len() {
        0 => Err(KeyError::Empty),
        len if len > MAX_KEY_BYTES => Err(KeyError::TooLong { len }),
        _ => Ok(()),
    }
}

/// Why a `Controls` message was not taken: the caller keeps what it had.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// A list is longer than [`MAX_SYNCED_ENTRIES`].
    #[error("controls: {count} {list} entries; at most {MAX_SYNCED_ENTRIES}")]
    TooMany {
        /// Which list.
        list: &'static str,
        /// How many it had.
        count: usize,
    },
    /// A network does not parse.
    #[error("controls: {list} entry {cidr:?}: {error}")]
    Cidr {
        /// Which list.
        list: &'static str,
        /// As sent.
        cidr: String,
        /// Why.
        error: CidrError,
    },
    /// A ban or unlimited key is empty or too long.
    #[error("controls: {list} key: {error}")]
    Key {
        /// Which list.
        list: &'static str,
        /// Why.
        error: KeyError,
    },
    /// A ban names neither a network nor a key.
    #[error("controls: a ban without a target")]
    NoTarget,
    /// A ban or unlimited key without time remaining (they always expire).
    #[error("controls: a {list} entry without time remaining")]
    NoExpiry {
        /// Which list.
        list: &'static str,
    },
}

/// The controls a caller enforces, as last received.
#[derive(Clone, Debug)]
pub struct Synced {
    /// The version they were sent with (0: none received yet).
    pub version: u64,
    /// Allow and deny lists and bans.
    pub access: AccessList,
    /// Keys with an unlimited override.
    pub unlimited: Overrides,
}

impl Default for Synced {
    fn default() -> Synced {
        Synced {
            version: 0,
            access: AccessList::new(MAX_SYNCED_ENTRIES),
            unlimited: Overrides::new(MAX_SYNCED_ENTRIES),
        }
    }
}

impl Synced {
    /// The controls of `controls`, received at `now`: each entry expires
    /// its time remaining after `now`. Entries already expired are left out.
    pub fn from_wire(controls: &Controls, now: Nanos) -> Result<Synced, WireError> {
        let lists = [
            ("allow", controls.allow.len()),
            ("deny", controls.deny.len()),
            ("ban", controls.bans.len()),
            ("unlimited", controls.unlimited.len()),
        ];
        if let Some(&(list, count)) = lists.iter().find(|(_, n)| *n > MAX_SYNCED_ENTRIES) {
            return Err(WireError::TooMany { list, count });
        }
        let mut synced = Synced {
            version: controls.version,
            ..Synced::default()
        };
        for (kind, list, entries) in [
            (ListKind::Allow, "allow", &controls.allow),
            (ListKind::Deny, "deny", &controls.deny),
        ] {
            for e in entries {
                let cidr = parse_cidr(list, &e.cidr)?;
                let until = match &e.remaining {
                    None => None,
                    Some(d) => match live_until(d, now) {
                        Some(until) => Some(until),
                        None => continue,
                    },
                };
                let entry = ListEntry {
                    cidr,
                    until,
                    reason: String::new(),
                };
                synced.access.add(kind, entry, now).map_err(full(list))?;
            }
        }
        for b in &controls.bans {
            let target = match &b.target {
                Some(ban_entry::Target::Cidr(c)) => BanTarget::Cidr(parse_cidr("ban", c)?),
                Some(ban_entry::Target::Key(k)) => {
                    check_key(k).map_err(|error| WireError::Key { list: "ban", error })?;
                    BanTarget::Key(k.clone())
                }
                None => return Err(WireError::NoTarget),
            };
            let remaining = b
                .remaining
                .as_ref()
                .ok_or(WireError::NoExpiry { list: "ban" })?;
            let Some(until) = live_until(remaining, now) else {
                continue;
            };
            let ban = Ban {
                target,
                until,
                reason: String::new(),
            };
            synced.access.ban(ban, now).map_err(full("ban"))?;
        }
        for u in &controls.unlimited {
            check_key(&u.key).map_err(|error| WireError::Key {
                list: "unlimited",
                error,
            })?;
            let remaining = u
                .remaining
                .as_ref()
                .ok_or(WireError::NoExpiry { list: "unlimited" })?;
            let Some(until) = live_until(remaining, now) else {
                continue;
            };
            let o = Override {
                key: u.key.clone(),
                grant: Grant::Unlimited,
                until,
                reason: String::new(),
                by: String::new(),
                granted_at: now,
            };
            synced.unlimited.grant(o, now).map_err(full("unlimited"))?;
        }
        Ok(synced)
    }

    /// Whether `key` has an unlimited override at `now`.
    pub fn is_unlimited(&self, key: &str, now: Nanos) -> bool {
        self.unlimited
            .get(key, now)
            .is_some_and(|o| o.grant == Grant::Unlimited)
    }
}

/// The controls in force at `now` as a message of `version`, each entry
/// with its time remaining after `now`.
pub fn to_wire(access: &AccessList, overrides: &Overrides, version: u64, now: Nanos) -> Controls {
    let remaining = |until: Nanos| Some(duration(until.since(now)));
    let list = |kind| {
        access
            .entries(kind, now)
            .into_iter()
            .map(|e| AccessEntry {
                cidr: e.cidr.to_string(),
                remaining: e.until.and_then(remaining),
            })
            .collect()
    };
    Controls {
        version,
        allow: list(ListKind::Allow),
        deny: list(ListKind::Deny),
        bans: access
            .bans(now)
            .into_iter()
            .map(|b| BanEntry {
                target: Some(match b.target {
                    BanTarget::Cidr(c) => ban_entry::Target::Cidr(c.to_string()),
                    BanTarget::Key(k) => ban_entry::Target::Key(k),
                }),
                remaining: remaining(b.until),
            })
            .collect(),
        unlimited: overrides
            .list(now)
            .into_iter()
            .filter(|o| o.grant == Grant::Unlimited)
            .map(|o| UnlimitedKey {
                remaining: remaining(o.until),
                key: o.key,
            })
            .collect(),
    }
}

/// The version of the controls in force at `now`: a digest of what
/// [`to_wire`] sends, with absolute expiries, so that it changes whenever
/// they change and not as time passes; the same lists give the same
/// version in any order, on any server. Never 0 (a caller's "none yet").
pub fn version(access: &AccessList, overrides: &Overrides, now: Nanos) -> u64 {
    // (list, target, until or u64::MAX for none), sorted.
    let mut entries: Vec<(u8, String, u64)> = Vec::new();
    let never = u64::MAX;
    for (tag, kind) in [(0, ListKind::Allow), (1, ListKind::Deny)] {
        for e in access.entries(kind, now) {
            entries.push((tag, e.cidr.to_string(), e.until.map_or(never, Nanos::get)));
        }
    }
    for b in access.bans(now) {
        let (tag, target) = match b.target {
            BanTarget::Cidr(c) => (2, c.to_string()),
            BanTarget::Key(k) => (3, k),
        };
        entries.push((tag, target, b.until.get()));
    }
    for o in overrides.list(now) {
        if o.grant == Grant::Unlimited {
            entries.push((4, o.key, o.until.get()));
        }
    }
    entries.sort_unstable();
    let mut hasher = SipHasher13::new_with_keys(0, 0);
    for (tag, target, until) in &entries {
        hasher.write_u8(*tag);
        hasher.write_usize(target.len());
        hasher.write(target.as_bytes());
        hasher.write_u64(*until);
    }
    hasher.finish().max(1)
}

/// A protobuf duration as a span; negative parts count as zero.
pub fn span(d: &Duration) -> Span {
    let secs = u64::try_from(d.seconds).unwrap_or(0);
    let nanos = u64::try_from(d.nanos).unwrap_or(0);
    Span(secs.saturating_mul(1_000_000_000).saturating_add(nanos))
}

/// A span as a protobuf duration.
pub fn duration(span: Span) -> Duration {
    let ns = span.as_nanos();
    Duration {
        seconds: i64::try_from(ns / 1_000_000_000).unwrap_or(i64::MAX),
        nanos: i32::try_from(ns % 1_000_000_000).unwrap_or(0),
    }
}

/// When an entry with `remaining` left at `now` ends; `None` if it already has.
fn live_until(remaining: &Duration, now: Nanos) -> Option<Nanos> {
    let span = span(remaining);
    (span > Span::ZERO).then(|| now.plus(span))
}

/// A list that filled up: only more entries than the bound can do that.
fn full(list: &'static str) -> impl Fn(Full) -> WireError {
    move |_| WireError::TooMany {
        list,
        count: MAX_SYNCED_ENTRIES.saturating_add(1),
    }
}

fn parse_cidr(list: &'static str, text: &str) -> Result<Cidr, WireError> {
    Cidr::parse(text).map_err(|error| WireError::Cidr {
        list,
        cidr: text.to_string(),
        error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;
    use core::net::IpAddr;

    use crate::access::Access;

    const SEC: u64 = 1_000_000_000;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    fn remaining(secs: u64) -> Option<Duration> {
        Some(duration(Span::from_secs(secs)))
    }

    /// A server's lists at `t0`: allow 10.0.0.0/8 for good, deny
    /// 10.9.0.0/16 for 60 s, a ban of 192.0.2.7 for 30 s and of key
    /// `5:alice` for 10 s, and `5:bobby` unlimited for 20 s.
    fn server_lists(t0: Nanos) -> (AccessList, Overrides) {
        let mut access = AccessList::new(100);
        let entry = |cidr, until| ListEntry {
            cidr: Cidr::parse(cidr).unwrap(),
            until,
            reason: "r".into(),
        };
        let later = |secs| t0.plus(Span::from_secs(secs));
        access
            .add(ListKind::Allow, entry("10.0.0.0/8", None), t0)
            .unwrap();
        access
            .add(ListKind::Deny, entry("10.9.0.0/16", Some(later(60))), t0)
            .unwrap();
        for (target, secs) in [
            (BanTarget::Cidr(Cidr::parse("192.0.2.7").unwrap()), 30),
            (BanTarget::Key("5:alice".into()), 10),
        ] {
            let ban = Ban {
                target,
                until: later(secs),
                reason: "r".into(),
            };
            access.ban(ban, t0).unwrap();
        }
        let mut overrides = Overrides::new(100);
        for (key, grant) in [("5:bobby", Grant::Unlimited), ("5:carol", Grant::Limit(9))] {
            let o = Override {
                key: key.into(),
                grant,
                until: later(20),
                reason: "r".into(),
                by: "ops".into(),
                granted_at: t0,
            };
            overrides.grant(o, t0).unwrap();
        }
        (access, overrides)
    }

    #[test]
    fn a_caller_rebuilds_the_lists_and_expires_them_by_its_own_clock() {
        let server_now = Nanos(1_000 * SEC);
        let (access, overrides) = server_lists(server_now);
        let version = version(&access, &overrides, server_now);
        // Sent 5 s after the grants, received by a caller whose clock is
        // far from the server's.
        let sent = to_wire(
            &access,
            &overrides,
            version,
            server_now.plus(Span::from_secs(5)),
        );
        assert_eq!(sent.bans.len(), 2);
        assert_eq!(sent.unlimited.len(), 1, "raised limits are not sent");
        let t = Nanos(7 * SEC);
        let synced = Synced::from_wire(&sent, t).unwrap();
        assert_eq!(synced.version, version);
        let at = |secs| t.plus(Span::from_secs(secs));
        let l = &synced.access;
        assert_eq!(l.check(ip("10.1.2.3"), [], t), Access::Allowed);
        assert_eq!(l.check(ip("10.9.2.3"), [], t), Access::Denied);
        assert_eq!(l.check(ip("10.9.2.3"), [], at(54)), Access::Denied);
        assert_eq!(l.check(ip("10.9.2.3"), [], at(55)), Access::Allowed);
        assert_eq!(l.check(ip("192.0.2.7"), [], at(24)), Access::Denied);
        assert_eq!(l.check(ip("192.0.2.7"), [], at(25)), Access::Neutral);
        assert_eq!(l.check(None, ["5:alice"], at(4)), Access::Denied);
        assert_eq!(l.check(None, ["5:alice"], at(5)), Access::Neutral);
        assert!(synced.is_unlimited("5:bobby", at(14)));
        assert!(!synced.is_unlimited("5:bobby", at(15)));
        assert!(!synced.is_unlimited("5:carol", t));
    }

    #[test]
    fn the_version_changes_with_the_lists_not_with_time_or_order() {
        let t0 = Nanos(1_000 * SEC);
        let (mut access, overrides) = server_lists(t0);
        let v = version(&access, &overrides, t0);
        assert_ne!(v, 0);
        assert_eq!(version(&access, &overrides, t0.plus(Span::SECOND)), v);
        // Raised limits are not sent: they do not change the version.
        let mut raised = overrides.clone();
        raised.revoke("5:carol", "ops", "", t0);
        assert_eq!(version(&access, &raised, t0), v);
        // Lifting a ban and putting it back (now last in the list) is the same set.
        let key = BanTarget::Key("5:alice".into());
        let ban = access.unban(&key).unwrap();
        let lifted = version(&access, &overrides, t0);
        assert_ne!(lifted, v);
        access.ban(ban.clone(), t0).unwrap();
        assert_eq!(version(&access, &overrides, t0), v);
        // A longer ban is another set.
        let longer = Ban {
            until: ban.until.plus(Span::SECOND),
            ..ban
        };
        access.ban(longer, t0).unwrap();
        assert_ne!(version(&access, &overrides, t0), v);
        // Once an entry has expired, the set in force is another one.
        let (access, overrides) = server_lists(t0);
        assert_ne!(
            version(&access, &overrides, t0.plus(Span::from_secs(10))),
            v
        );
        let empty = version(&AccessList::new(1), &Overrides::new(1), t0);
        assert_ne!(empty, 0);
    }

    #[test]
    fn expired_entries_are_left_out_and_bad_messages_refused() {
        let t = Nanos(SEC);
        let mut controls = Controls {
            version: 3,
            allow: vec![AccessEntry {
                cidr: "192.0.2.0/24".into(),
                remaining: Some(Duration {
                    seconds: -1,
                    nanos: 0,
                }),
            }],
            bans: vec![BanEntry {
                target: Some(ban_entry::Target::Key("k".into())),
                remaining: remaining(0),
            }],
            ..Controls::default()
        };
        let synced = Synced::from_wire(&controls, t).unwrap();
        assert!(synced.access.is_empty());
        controls.bans[0].remaining = None;
        assert_eq!(
            Synced::from_wire(&controls, t).unwrap_err(),
            WireError::NoExpiry { list: "ban" }
        );
        controls.bans[0].target = None;
        assert_eq!(
            Synced::from_wire(&controls, t).unwrap_err(),
            WireError::NoTarget
        );
        controls.bans.clear();
        controls.deny.push(AccessEntry {
            cidr: "10.0.0.0/33".into(),
            remaining: None,
        });
        let err = Synced::from_wire(&controls, t).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("controls: deny entry \"10.0.0.0/33\": prefix"),
            "{err}"
        );
        controls.deny.clear();
        let key = "k".repeat(MAX_KEY_BYTES + 1);
        controls.unlimited.push(UnlimitedKey {
            key,
            remaining: remaining(1),
        });
        assert_eq!(
            Synced::from_wire(&controls, t).unwrap_err(),
            WireError::Key {
                list: "unlimited",
                error: KeyError::TooLong {
                    len: MAX_KEY_BYTES + 1
                }
            }
        );
        controls.unlimited.clear();
        controls.deny = vec![
            AccessEntry {
                cidr: "10.0.0.1".into(),
                remaining: None,
            };
            MAX_SYNCED_ENTRIES + 1
        ];
        assert_eq!(
            Synced::from_wire(&controls, t).unwrap_err(),
            WireError::TooMany {
                list: "deny",
                count: MAX_SYNCED_ENTRIES + 1
            }
        );
    }

    #[test]
    fn keys_are_bounded() {
        assert_eq!(check_key(""), Err(KeyError::Empty));
        assert!(check_key(&"k".repeat(MAX_KEY_BYTES)).is_ok());
        assert_eq!(
            check_key(&"k".repeat(MAX_KEY_BYTES + 1)),
            Err(KeyError::TooLong {
                len: MAX_KEY_BYTES + 1
            })
        );
    }
}
