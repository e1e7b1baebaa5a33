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
    /// For lists that never change or expire (a configuration's own, up
    /// to 10,000 networks each, looked up on every request): the networks
    /// of `allow` and `deny` as sorted ranges. Dropped by any change.
    index: Option<FixedIndex>,
}

/// The networks of a fixed allow and deny list, for lookups in
/// logarithmic time.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FixedIndex {
    allow: Ranges,
    deny: Ranges,
}

/// Networks as sorted, disjoint ranges of addresses, per family (an
/// IPv4-mapped IPv6 address is looked up as IPv4, as [`Cidr::contains`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Ranges {
    v4: Vec<(u128, u128)>,
    v6: Vec<(u128, u128)>,
}

impl Ranges {
    fn of(cidrs: &[Cidr]) -> Ranges {
        let family = |v4: bool| {
            let mut ranges: Vec<(u128, u128)> = cidrs
                .iter()
                .filter(|c| c.network().is_ipv4() == v4)
                .map(Cidr::range)
                .collect();
            ranges.sort_unstable();
            // Merge overlapping ranges, so that at most one can hold an address.
            let mut merged: Vec<(u128, u128)> = Vec::with_capacity(ranges.len());
            for (first, last) in ranges {
                match merged.last_mut() {
                    Some((_, end)) if first <= *end => *end = (*end).max(last),
                    _ => merged.push((first, last)),
                }
            }
            merged
        };
        Ranges {
            v4: family(true),
            v6: family(false),
        }
    }

    fn contains(&self, ip: IpAddr) -> bool {
        let (ranges, at) = match ip.to_canonical() {
            IpAddr::V4(a) => (&self.v4, u128::from(u32::from(a))),
            IpAddr::V6(a) => (&self.v6, u128::from(a)),
        };
        // The last range starting at or before the address is the only
        // one that can hold it.
        let after = ranges.partition_point(|&(first, _)| first <= at);
        after
            .checked_sub(1)
            .and_then(|i| ranges.get(i))
            .is_some_and(|&(_, last)| at <= last)
    }
}

impl AccessList {
    /// Empty lists of at most `max` entries each.
    pub fn new(max: usize) -> AccessList {
        AccessList {
            allow: Bounded::new(max),
            deny: Bounded::new(max),
            bans: Bounded::new(max),
            index: None,
        }
    }

    /// Lists of networks that never expire (a configuration's own), with
    /// no room for more entries and no bans.
    pub fn fixed(allow: Vec<Cidr>, deny: Vec<Cidr>) -> AccessList {
        let index = FixedIndex {
            allow: Ranges::of(&allow),
            deny: Ranges::of(&deny),
        };
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
            index: Some(index),
        }
    }

    /// A list to change: the index no longer tells it.
    fn list(&mut self, kind: ListKind) -> &mut Bounded<ListEntry> {
        self.index = None;
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
            |list: &Bounded<ListEntry>, indexed: Option<&Ranges>, ip: IpAddr| match indexed {
                Some(ranges) => ranges.contains(ip),
                None => list.live(now).any(|e| e.cidr.contains(ip)),
            };
        let index = self.index.as_ref();
        if let Some(ip) = ip {
            let banned = self
                .bans
                .live(now)
                .any(|b| matches!(&b.target, BanTarget::Cidr(c) if c.contains(ip)));
            if banned || in_list(&self.deny, index.map(|i| &i.deny), ip) {
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
            Some(ip) if in_list(&self.allow, index.map(|i| &i.allow), ip) => Access::Allowed,
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

    /// A network from a few bits of the address space, so that random
    /// lists overlap, nest and touch.
    fn small_cidr() -> impl proptest::strategy::Strategy<Value = Cidr> {
        use proptest::prelude::*;
        prop_oneof![
            (any::<u8>(), 0u8..=32).prop_map(|(b, p)| {
                Cidr::new(IpAddr::V4([10, b & 0xf0, b, 0].into()), p).unwrap()
            }),
            (any::<u8>(), 0u8..=128).prop_map(|(b, p)| {
                let a = core::net::Ipv6Addr::new(0x2001, 0xdb8, u16::from(b), 0, 0, 0, 0, 1);
                Cidr::new(IpAddr::V6(a), p).unwrap()
            }),
        ]
    }

    fn some_ip() -> impl proptest::strategy::Strategy<Value = IpAddr> {
        use proptest::prelude::*;
        prop_oneof![
            (any::<u8>(), any::<u8>()).prop_map(|(b, c)| IpAddr::V4([10, b & 0xf0, b, c].into())),
            any::<u32>().prop_map(|a| IpAddr::V4(a.into())),
            (any::<u8>(), any::<u16>()).prop_map(|(b, c)| {
                IpAddr::V6(core::net::Ipv6Addr::new(
                    0x2001,
                    0xdb8,
                    u16::from(b),
                    0,
                    0,
                    0,
                    0,
                    c,
                ))
            }),
            // IPv4-mapped: looked up as IPv4.
            (any::<u8>(), any::<u8>()).prop_map(|(b, c)| {
                IpAddr::V6(core::net::Ipv4Addr::from([10, b & 0xf0, b, c]).to_ipv6_mapped())
            }),
            Just(IpAddr::V6(core::net::Ipv6Addr::UNSPECIFIED)),
        ]
    }

    proptest::proptest! {
        /// The sorted ranges of a configuration's lists say what a scan of
        /// every entry says.
        #[test]
        fn fixed_lists_look_up_as_a_scan_would(
            allow in proptest::collection::vec(small_cidr(), 0..20),
            deny in proptest::collection::vec(small_cidr(), 0..20),
            ips in proptest::collection::vec(some_ip(), 1..20),
        ) {
            let fixed = AccessList::fixed(allow.clone(), deny.clone());
            let mut scanned = AccessList::new(100);
            for (kind, list) in [(ListKind::Allow, &allow), (ListKind::Deny, &deny)] {
                for cidr in list {
                    scanned.add(kind, ListEntry { cidr: *cidr, until: None, reason: String::new() }, Nanos(0)).unwrap();
                }
            }
            proptest::prop_assert!(fixed.index.is_some() && scanned.index.is_none());
            // Every network's edges and their neighbours, besides the random addresses.
            let edges = allow.iter().chain(&deny).flat_map(|c| {
                let (first, last) = c.range();
                [first.wrapping_sub(1), first, last, last.wrapping_add(1)].map(|at| {
                    match c.network() {
                        IpAddr::V4(_) => IpAddr::V4(core::net::Ipv4Addr::from(at as u32)),
                        IpAddr::V6(_) => IpAddr::V6(core::net::Ipv6Addr::from(at)),
                    }
                })
            });
            for ip in ips.into_iter().chain(edges) {
                proptest::prop_assert_eq!(
                    fixed.check(Some(ip), [], Nanos(1)),
                    scanned.check(Some(ip), [], Nanos(1)),
                    "{}", ip
                );
            }
        }
    }

    #[test]
    fn changing_a_fixed_list_drops_its_index() {
        let mut l = AccessList::fixed(Vec::new(), [Cidr::parse("10.0.0.0/8").unwrap()].into());
        assert_eq!(l.check(ip("10.1.1.1"), [], Nanos(1)), Access::Denied);
        l.remove(ListKind::Deny, &Cidr::parse("10.0.0.0/8").unwrap());
        assert!(l.index.is_none());
        assert_eq!(l.check(ip("10.1.1.1"), [], Nanos(1)), Access::Neutral);
    }
}
