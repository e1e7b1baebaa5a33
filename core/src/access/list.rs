//! Allow and deny lists of networks, and temporary bans of a network or a key.

use core::net::IpAddr;

use alloc::string::String;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

use super::bounded::{Bounded, Expiring, Full};
use super::cidr::Cidr;
use crate::time::Nanos;

/// What the lists say about a client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Allow-listed: bypasses limits (nothing is counted).
    Allowed,
    /// Deny-listed or banned: refused.
    Denied,
    /// Not listed: limits apply.
    Neutral,
}

/// Which list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ListKind {
    /// Bypass limits.
    Allow,
    /// Refuse.
    Deny,
}

/// A network on a list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListEntry {
    /// The network.
    pub cidr: Cidr,
    /// When it leaves the list; `None` never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<Nanos>,
    /// Why it is there.
    #[serde(default)]
    pub reason: String,
}

impl Expiring for ListEntry {
    type Target = Cidr;

    fn target(&self) -> &Cidr {
        &self.cidr
    }

    fn until(&self) -> Option<Nanos> {
        self.until
    }
}

/// What a ban refuses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BanTarget {
    /// Clients in a network.
    Cidr(Cidr),
    /// Requests carrying a key (the host decides what keys a request has).
    Key(String),
}

/// A temporary ban.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ban {
    /// Who is banned.
    pub target: BanTarget,
    /// When the ban ends.
    pub until: Nanos,
    /// Why.
    #[serde(default)]
    pub reason: String,
}

impl Expiring for Ban {
    type Target = BanTarget;

    fn target(&self) -> &BanTarget {
        &self.target
    }

    fn until(&self) -> Option<Nanos> {
        Some(self.until)
    }
}

/// Allow list, deny list and bans, each holding at most `max` entries.
///
/// A deny entry or a ban wins over any allow entry, even a narrower one:
/// refusing is never undone by accident.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessList {
    allow: Bounded<ListEntry>,
    deny: Bounded<ListEntry>,
    bans: Bounded<Ban>,
}

impl AccessList {
    /// Empty lists of at most `max` entries each.
    pub fn new(max: usize) -> AccessList {
        AccessList {
            allow: Bounded::new(max),
            deny: Bounded::new(max),
            bans: Bounded::new(max),
        }
    }

    /// Lists of networks that never expire (a configuration's own), with
    /// no room for more entries and no bans.
    pub fn fixed(allow: Vec<Cidr>, deny: Vec<Cidr>) -> AccessList {
        let entries = |cidrs: Vec<Cidr>| {
            cidrs
                .into_iter()
                .map(|cidr| ListEntry {
                    cidr,
                    until: None,
                    reason: String::new(),
                })
                .collect()
        };
        AccessList {
            allow: Bounded::fixed(entries(allow)),
            deny: Bounded::fixed(entries(deny)),
            bans: Bounded::fixed(Vec::new()),
        }
    }

    fn list(&mut self, kind: ListKind) -> &mut Bounded<ListEntry> {
        match kind {
            ListKind::Allow => &mut self.allow,
            ListKind::Deny => &mut self.deny,
        }
    }

    /// Adds `entry` to a list, replacing one for the same network; returns the replaced one.
    pub fn add(
        &mut self,
        kind: ListKind,
        entry: ListEntry,
        now: Nanos,
    ) -> Result<Option<ListEntry>, Full> {
        self.list(kind).put(entry, now)
    }

    /// Removes a network from a list; returns its entry if it was there.
    pub fn remove(&mut self, kind: ListKind, cidr: &Cidr) -> Option<ListEntry> {
        self.list(kind).remove(cidr)
    }

    /// Bans, replacing a ban of the same target; returns the replaced one.
    pub fn ban(&mut self, ban: Ban, now: Nanos) -> Result<Option<Ban>, Full> {
        self.bans.put(ban, now)
    }

    /// Lifts a ban; returns it if there was one.
    pub fn unban(&mut self, target: &BanTarget) -> Option<Ban> {
        self.bans.remove(target)
    }

    /// Whether every list is empty (expired entries not yet purged count).
    pub fn is_empty(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty() && self.bans.is_empty()
    }

    /// The live entries of a list.
    pub fn entries(&self, kind: ListKind, now: Nanos) -> Vec<ListEntry> {
        let list = match kind {
            ListKind::Allow => &self.allow,
            ListKind::Deny => &self.deny,
        };
        list.live(now).cloned().collect()
    }

    /// The live bans.
    pub fn bans(&self, now: Nanos) -> Vec<Ban> {
        self.bans.live(now).cloned().collect()
    }

    /// Drops every expired entry (lookups ignore them anyway; this frees room).
    pub fn purge(&mut self, now: Nanos) {
        self.allow.purge(now);
        self.deny.purge(now);
        self.bans.purge(now);
    }

    /// What the lists say about a client at `ip` presenting `keys`.
    pub fn check<'k>(
        &self,
        ip: Option<IpAddr>,
        keys: impl IntoIterator<Item = &'k str>,
        now: Nanos,
    ) -> Access {
        let in_list =
            |list: &Bounded<ListEntry>, ip: IpAddr| list.live(now).any(|e| e.cidr.contains(ip));
        if let Some(ip) = ip {
            let banned = self
                .bans
                .live(now)
                .any(|b| matches!(&b.target, BanTarget::Cidr(c) if c.contains(ip)));
            if banned || in_list(&self.deny, ip) {
                return Access::Denied;
            }
        }
        for key in keys {
            let banned = self
                .bans
                .live(now)
                .any(|b| matches!(&b.target, BanTarget::Key(k) if k == key));
            if banned {
                return Access::Denied;
            }
        }
        match ip {
            Some(ip) if in_list(&self.allow, ip) => Access::Allowed,
            _ => Access::Neutral,
        }
    }
}

impl Default for AccessList {
    /// No entries, and no room for any.
    fn default() -> AccessList {
        AccessList::fixed(Vec::new(), Vec::new())
    }
}

/// What several lists say together about a client at `ip` presenting
/// `keys`: refused when any list denies or bans it (a deny anywhere wins
/// over an allow anywhere), else allowed when any list allows it.
pub fn judge<'a, 'k, K>(
    lists: impl IntoIterator<Item = &'a AccessList>,
    ip: Option<IpAddr>,
    keys: K,
    now: Nanos,
) -> Access
where
    K: IntoIterator<Item = &'k str> + Clone,
{
    let mut verdict = Access::Neutral;
    for list in lists {
        match list.check(ip, keys.clone(), now) {
            Access::Denied => return Access::Denied,
            Access::Allowed => verdict = Access::Allowed,
            Access::Neutral => {}
        }
    }
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    fn entry(cidr: &str, until: Option<u64>) -> ListEntry {
        ListEntry {
            cidr: Cidr::parse(cidr).unwrap(),
            until: until.map(Nanos),
            reason: "test".to_string(),
        }
    }

    #[test]
    fn deny_wins_over_a_narrower_allow() {
        let mut l = AccessList::new(10);
        l.add(ListKind::Deny, entry("10.0.0.0/8", None), Nanos(0))
            .unwrap();
        l.add(ListKind::Allow, entry("10.1.0.0/16", None), Nanos(0))
            .unwrap();
        l.add(ListKind::Allow, entry("192.168.0.0/16", None), Nanos(0))
            .unwrap();
        assert_eq!(l.check(ip("10.1.2.3"), [], Nanos(1)), Access::Denied);
        assert_eq!(l.check(ip("192.168.1.1"), [], Nanos(1)), Access::Allowed);
        assert_eq!(l.check(ip("8.8.8.8"), [], Nanos(1)), Access::Neutral);
        assert_eq!(l.check(None, [], Nanos(1)), Access::Neutral);
    }

    #[test]
    fn a_deny_in_one_list_wins_over_an_allow_in_another() {
        let fixed = AccessList::fixed(
            [Cidr::parse("10.0.0.0/8").unwrap()].into(),
            [Cidr::parse("203.0.113.0/24").unwrap()].into(),
        );
        let mut synced = AccessList::new(10);
        synced
            .add(ListKind::Deny, entry("10.9.0.0/16", None), Nanos(0))
            .unwrap();
        synced
            .add(ListKind::Allow, entry("203.0.113.7", None), Nanos(0))
            .unwrap();
        synced
            .ban(
                Ban {
                    target: BanTarget::Key("5:alice".to_string()),
                    until: Nanos(10),
                    reason: String::new(),
                },
                Nanos(0),
            )
            .unwrap();
        let both = |ip: &str, keys: &[&str]| {
            judge(
                [&fixed, &synced],
                Some(ip.parse().unwrap()),
                keys.iter().copied(),
                Nanos(1),
            )
        };
        assert_eq!(both("10.1.2.3", &[]), Access::Allowed);
        assert_eq!(
            both("10.9.2.3", &[]),
            Access::Denied,
            "denied by the other list"
        );
        assert_eq!(
            both("203.0.113.7", &[]),
            Access::Denied,
            "allowed by the other list"
        );
        assert_eq!(both("10.1.2.3", &["5:alice"]), Access::Denied, "a key ban");
        assert_eq!(both("192.0.2.1", &[]), Access::Neutral);
        assert_eq!(judge([], None, [], Nanos(1)), Access::Neutral);
        // A fixed list takes no more entries.
        let mut fixed = fixed;
        assert!(fixed
            .add(ListKind::Allow, entry("192.0.2.1", None), Nanos(0))
            .is_err());
    }

    #[test]
    fn entries_expire() {
        let mut l = AccessList::new(10);
        l.add(ListKind::Allow, entry("1.2.3.4", Some(100)), Nanos(0))
            .unwrap();
        assert_eq!(l.check(ip("1.2.3.4"), [], Nanos(99)), Access::Allowed);
        assert_eq!(l.check(ip("1.2.3.4"), [], Nanos(100)), Access::Neutral);
        assert!(l.entries(ListKind::Allow, Nanos(100)).is_empty());
    }

    #[test]
    fn bans_by_network_and_by_key() {
        let mut l = AccessList::new(10);
        let until = Nanos(50);
        l.ban(
            Ban {
                target: BanTarget::Key("user=mallory".to_string()),
                until,
                reason: String::new(),
            },
            Nanos(0),
        )
        .unwrap();
        l.ban(
            Ban {
                target: BanTarget::Cidr(Cidr::parse("2001:db8::/32").unwrap()),
                until,
                reason: String::new(),
            },
            Nanos(0),
        )
        .unwrap();
        assert_eq!(l.check(None, ["user=mallory"], Nanos(1)), Access::Denied);
        assert_eq!(l.check(None, ["user=alice"], Nanos(1)), Access::Neutral);
        assert_eq!(l.check(ip("2001:db8::9"), [], Nanos(1)), Access::Denied);
        assert_eq!(l.check(ip("2001:db8::9"), [], Nanos(50)), Access::Neutral);
        assert!(l
            .unban(&BanTarget::Key("user=mallory".to_string()))
            .is_some());
        assert_eq!(l.bans(Nanos(1)).len(), 1);
    }

    #[test]
    fn bounded_with_expired_entries_making_room() {
        let mut l = AccessList::new(2);
        l.add(ListKind::Deny, entry("1.0.0.1", Some(10)), Nanos(0))
            .unwrap();
        l.add(ListKind::Deny, entry("1.0.0.2", None), Nanos(0))
            .unwrap();
        // Replacing is not growing.
        assert!(l
            .add(ListKind::Deny, entry("1.0.0.2", Some(5)), Nanos(0))
            .unwrap()
            .is_some());
        let full = l
            .add(ListKind::Deny, entry("1.0.0.3", None), Nanos(1))
            .unwrap_err();
        assert_eq!(full, Full { max: 2 });
        assert!(full.to_string().contains("at most 2 entries"));
        l.add(ListKind::Deny, entry("1.0.0.3", None), Nanos(10))
            .unwrap();
        assert_eq!(l.entries(ListKind::Deny, Nanos(10)).len(), 1);
    }
}
