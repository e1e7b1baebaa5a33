//! IPv4 and IPv6 networks written `1.2.3.0/24`, `2001:db8::/32`, or a bare
//! address (one host).

use core::fmt;
use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use core::str::FromStr;

use alloc::string::{String, ToString};
use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// A network: an address with its host bits cleared, and a prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

/// Why text is not a CIDR.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    /// The address part does not parse.
    #[error("{0:?} is not an IP address (expected e.g. 10.0.0.0/8, 2001:db8::/32 or 1.2.3.4)")]
    Address(String),
    /// The prefix is not a number or too long for the family.
    #[error("prefix {prefix:?} must be a number from 0 to {max} for this address family")]
    Prefix {
        /// The prefix as written.
        prefix: String,
        /// 32 or 128.
        max: u8,
    },
}

impl Cidr {
    /// The network of `addr` with `prefix` bits; host bits are cleared, so
    /// `10.1.2.3/8` is `10.0.0.0/8`. An IPv4-mapped IPv6 network of at
    /// least 96 bits is the IPv4 network it maps (`::ffff:10.0.0.0/104` is
    /// `10.0.0.0/8`), as Envoy may report IPv4 clients either way.
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Cidr, CidrError> {
        let (addr, prefix) = match addr {
            IpAddr::V6(a) if prefix >= 96 => match a.to_ipv4_mapped() {
                Some(v4) => (IpAddr::V4(v4), prefix - 96),
                None => (addr, prefix),
            },
            _ => (addr, prefix),
        };
        let max = max_prefix(addr);
        if prefix > max {
            return Err(CidrError::Prefix {
                prefix: prefix.to_string(),
                max,
            });
        }
        let network = match addr {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask32(prefix))),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask128(prefix))),
        };
        Ok(Cidr { network, prefix })
    }

    /// One host: `/32` or `/128`.
    pub fn host(addr: IpAddr) -> Cidr {
        let addr = addr.to_canonical();
        Cidr {
            network: addr,
            prefix: max_prefix(addr),
        }
    }

    /// Reads `addr/prefix` or a bare address.
    pub fn parse(text: &str) -> Result<Cidr, CidrError> {
        let text = text.trim();
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| CidrError::Address(addr.to_string()))?;
        match prefix {
            None => Ok(Cidr::host(addr)),
            Some(p) => {
                let bits = p.parse::<u8>().map_err(|_| CidrError::Prefix {
                    prefix: p.to_string(),
                    max: max_prefix(addr),
                })?;
                Cidr::new(addr, bits)
            }
        }
    }

    /// The network address.
    pub fn network(&self) -> IpAddr {
        self.network
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` is in this network (IPv4-mapped IPv6 counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip.to_canonical()) {
            (IpAddr::V4(n), IpAddr::V4(a)) => u32::from(a) & mask32(self.prefix) == u32::from(n),
            (IpAddr::V6(n), IpAddr::V6(a)) => u128::from(a) & mask128(self.prefix) == u128::from(n),
            _ => false,
        }
    }
}

impl Cidr {
    /// The network's first and last address, as integers of its family
    /// (an IPv4 address as its `u32`).
    pub fn range(&self) -> (u128, u128) {
        match self.network {
            IpAddr::V4(n) => {
                let first = u32::from(n);
                (first.into(), (first | !mask32(self.prefix)).into())
            }
            IpAddr::V6(n) => {
                let first = u128::from(n);
                (first, first | !mask128(self.prefix))
            }
        }
    }
}

fn max_prefix(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

fn mask32(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn mask128(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Cidr, CidrError> {
        Cidr::parse(s)
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Cidr, D::Error> {
        let text = String::deserialize(deserializer)?;
        Cidr::parse(&text).map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_and_normalises() {
        assert_eq!(Cidr::parse("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(Cidr::parse("1.2.3.4").unwrap().to_string(), "1.2.3.4/32");
        assert_eq!(Cidr::parse("::1").unwrap().to_string(), "::1/128");
        assert_eq!(
            Cidr::parse("2001:db8::7/32").unwrap().to_string(),
            "2001:db8::/32"
        );
        assert_eq!(Cidr::parse("0.0.0.0/0").unwrap().prefix(), 0);
        assert_eq!(
            Cidr::parse("::ffff:10.0.0.1/104").unwrap().to_string(),
            "10.0.0.0/8"
        );
    }

    #[test]
    fn errors_say_what_is_wrong() {
        assert_eq!(
            Cidr::parse("10.0.0.0/33").unwrap_err().to_string(),
            "prefix \"33\" must be a number from 0 to 32 for this address family"
        );
        assert!(matches!(
            Cidr::parse("nope/8"),
            Err(CidrError::Address(a)) if a == "nope"
        ));
        assert!(matches!(
            Cidr::parse("::/x"),
            Err(CidrError::Prefix { max: 128, .. })
        ));
    }

    #[test]
    fn containment() {
        let net = Cidr::parse("192.168.0.0/16").unwrap();
        assert!(net.contains(ip("192.168.255.1")));
        assert!(net.contains(ip("::ffff:192.168.1.1")));
        assert!(!net.contains(ip("192.169.0.1")));
        assert!(!net.contains(ip("::1")));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
        assert!(Cidr::parse("::/0").unwrap().contains(ip("2001:db8::1")));
    }

    /// Bit by bit, the obvious way.
    fn naive_contains(net: [u8; 16], prefix: u8, ip: [u8; 16]) -> bool {
        (0..usize::from(prefix)).all(|bit| {
            let byte = bit / 8;
            let shift = 7 - (bit % 8);
            (net[byte] >> shift) & 1 == (ip[byte] >> shift) & 1
        })
    }

    proptest! {
        #[test]
        fn v6_containment_matches_naive(net: u128, ip: u128, prefix in 0u8..=128) {
            let cidr = Cidr::new(IpAddr::V6(Ipv6Addr::from(net)), prefix).unwrap();
            let addr = IpAddr::V6(Ipv6Addr::from(ip));
            // Mapped addresses are IPv4 to Cidr; compare the rest only.
            prop_assume!(addr.to_canonical().is_ipv6() && cidr.network().is_ipv6());
            prop_assert_eq!(
                cidr.contains(addr),
                naive_contains(net.to_be_bytes(), prefix, ip.to_be_bytes())
            );
        }

        #[test]
        fn v4_containment_matches_naive(net: u32, ip: u32, prefix in 0u8..=32) {
            let cidr = Cidr::new(IpAddr::V4(Ipv4Addr::from(net)), prefix).unwrap();
            let mut n = [0u8; 16];
            let mut a = [0u8; 16];
            n[..4].copy_from_slice(&net.to_be_bytes());
            a[..4].copy_from_slice(&ip.to_be_bytes());
            prop_assert_eq!(
                cidr.contains(IpAddr::V4(Ipv4Addr::from(ip))),
                naive_contains(n, prefix, a)
            );
        }

        #[test]
        fn display_round_trips(net: u128, prefix in 0u8..=128) {
            let cidr = Cidr::new(IpAddr::V6(Ipv6Addr::from(net)), prefix).unwrap();
            prop_assert_eq!(Cidr::parse(&cidr.to_string()).unwrap(), cidr);
        }
    }
}
