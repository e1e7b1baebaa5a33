//! Finding the client's address: the peer, or `X-Forwarded-For` only as far
//! as the configured number of trusted proxies vouches for it; and the
//! network a client is keyed by.

use core::net::{IpAddr, SocketAddr, SocketAddrV4};

use crate::access::Cidr;

/// How the client address is chosen, and how much of it keys a client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientIpSource {
    /// Proxies in front of Envoy that append to `X-Forwarded-For` and are
    /// trusted to. 0 means `X-Forwarded-For` is ignored.
    pub trusted_hops: u32,
    /// Leading bits of an IPv4 address that key a client (32: the host).
    pub ipv4_prefix: u8,
    /// Leading bits of an IPv6 address that key a client: one host is
    /// usually given a whole /64, and can pick any address in it.
    pub ipv6_prefix: u8,
}

impl Default for ClientIpSource {
    fn default() -> ClientIpSource {
        ClientIpSource {
            trusted_hops: 0,
            ipv4_prefix: ClientIpSource::DEFAULT_IPV4_PREFIX,
            ipv6_prefix: ClientIpSource::DEFAULT_IPV6_PREFIX,
        }
    }
}

impl ClientIpSource {
    /// IPv4 clients are keyed per host by default.
    pub const DEFAULT_IPV4_PREFIX: u8 = 32;
    /// IPv6 clients are keyed per /64 by default, the usual end-site subnet.
    pub const DEFAULT_IPV6_PREFIX: u8 = 64;

    /// The address `ip` is keyed by: its network at the configured prefix
    /// length. An IPv4-mapped IPv6 address is taken as the IPv4 address
    /// (Envoy may report IPv4 clients either way).
    pub fn key_address(&self, ip: IpAddr) -> IpAddr {
        let ip = ip.to_canonical();
        let prefix = match ip {
            IpAddr::V4(_) => self.ipv4_prefix,
            IpAddr::V6(_) => self.ipv6_prefix,
        };
        // Prefixes are checked when the configuration is read; a bad one
        // here keys per host.
        Cidr::new(ip, prefix).map_or(ip, |network| network.network())
    }

    /// The client address for a request from `peer` carrying `forwarded_for`.
    ///
    /// With `n` trusted hops, the peer is the last trusted proxy, and the
    /// client is the `n`-th address from the right of `X-Forwarded-For`;
    /// entries further left were written by the client and prove nothing.
    /// If the header is absent, too short or unreadable, the peer is used.
    pub fn resolve(&self, peer: Option<IpAddr>, forwarded_for: Option<&str>) -> Option<IpAddr> {
        self.resolve_with(|| peer, forwarded_for)
    }

    /// [`ClientIpSource::resolve`] asking for the peer only when it is
    /// needed: hosts where reading it is costly (Envoy's attributes) skip
    /// it whenever `X-Forwarded-For` answers.
    pub fn resolve_with(
        &self,
        peer: impl FnOnce() -> Option<IpAddr>,
        forwarded_for: Option<&str>,
    ) -> Option<IpAddr> {
        if self.trusted_hops == 0 {
            return peer();
        }
        let hops = usize::try_from(self.trusted_hops).unwrap_or(usize::MAX);
        forwarded_for
            .and_then(|header| header.rsplit(',').nth(hops - 1))
            .and_then(|entry| parse_ip(entry.trim()))
            .or_else(peer)
    }
}

/// Reads an address as hosts write it: `1.2.3.4`, `1.2.3.4:5678`,
/// `::1`, `[::1]:5678`.
pub fn parse_ip(text: &str) -> Option<IpAddr> {
    // Envoy's peer address, `1.2.3.4:5678`, first: one pass of the parser
    // instead of three. No other form parses as a socket address of IPv4.
    text.parse::<SocketAddrV4>()
        .map(|s| IpAddr::V4(*s.ip()))
        .or_else(|_| text.parse::<IpAddr>())
        .ok()
        .or_else(|| text.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            text.strip_prefix('[')
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse().ok())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn keys_by_network() {
        let default = ClientIpSource::default();
        assert_eq!(
            default.key_address(ip("2001:db8:1:2:aaaa::1")),
            ip("2001:db8:1:2::")
        );
        assert_eq!(
            default.key_address(ip("2001:db8:1:2:ffff:ffff:ffff:ffff")),
            ip("2001:db8:1:2::")
        );
        assert_eq!(
            default.key_address(ip("2001:db8:1:3::1")),
            ip("2001:db8:1:3::")
        );
        assert_eq!(default.key_address(ip("192.0.2.7")), ip("192.0.2.7"));
        // Mapped IPv4 clients are IPv4 clients, not one shared /64.
        assert_eq!(default.key_address(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        let custom = ClientIpSource {
            ipv4_prefix: 24,
            ipv6_prefix: 128,
            ..ClientIpSource::default()
        };
        assert_eq!(custom.key_address(ip("192.0.2.7")), ip("192.0.2.0"));
        assert_eq!(
            custom.key_address(ip("2001:db8:1:2:aaaa::1")),
            ip("2001:db8:1:2:aaaa::1")
        );
    }

    #[test]
    fn untrusted_by_default() {
        let source = ClientIpSource::default();
        assert_eq!(
            source.resolve(Some(ip("10.0.0.1")), Some("6.6.6.6")),
            Some(ip("10.0.0.1"))
        );
    }

    #[test]
    fn trusted_hops_count_from_the_right() {
        let one = ClientIpSource {
            trusted_hops: 1,
            ..ClientIpSource::default()
        };
        let two = ClientIpSource {
            trusted_hops: 2,
            ..ClientIpSource::default()
        };
        let xff = Some("6.6.6.6, 1.2.3.4, 10.0.0.2");
        let peer = Some(ip("10.0.0.1"));
        assert_eq!(one.resolve(peer, xff), Some(ip("10.0.0.2")));
        assert_eq!(two.resolve(peer, xff), Some(ip("1.2.3.4")));
        let five = ClientIpSource {
            trusted_hops: 5,
            ..ClientIpSource::default()
        };
        assert_eq!(five.resolve(peer, xff), peer);
        assert_eq!(one.resolve(peer, Some("garbage")), peer);
        assert_eq!(one.resolve(peer, None), peer);
    }

    #[test]
    fn peer_is_read_only_when_needed() {
        let one = ClientIpSource {
            trusted_hops: 1,
            ..ClientIpSource::default()
        };
        let unread = || -> Option<IpAddr> { panic!("the peer was read") };
        assert_eq!(
            one.resolve_with(unread, Some("1.2.3.4")),
            Some(ip("1.2.3.4"))
        );
        assert_eq!(
            one.resolve_with(|| Some(ip("9.9.9.9")), Some("junk")),
            Some(ip("9.9.9.9"))
        );
        let none = ClientIpSource::default();
        assert_eq!(
            none.resolve_with(|| Some(ip("9.9.9.9")), Some("1.2.3.4")),
            Some(ip("9.9.9.9"))
        );
    }

    #[test]
    fn parses_host_address_forms() {
        assert_eq!(parse_ip("127.0.0.1:8080"), Some(ip("127.0.0.1")));
        assert_eq!(parse_ip("[::1]:8080"), Some(ip("::1")));
        assert_eq!(parse_ip("[::1]"), Some(ip("::1")));
        assert_eq!(parse_ip("::1"), Some(ip("::1")));
        assert_eq!(parse_ip("nope"), None);
    }
}
