//! Finding the client's address: the peer, or `X-Forwarded-For` only as far
//! as the configured number of trusted proxies vouches for it.

use core::net::{IpAddr, SocketAddr};

/// How the client address is chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientIpSource {
    /// Proxies in front of Envoy that append to `X-Forwarded-For` and are
    /// trusted to. 0 means `X-Forwarded-For` is ignored.
    pub trusted_hops: u32,
}

impl ClientIpSource {
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
    text.parse::<IpAddr>()
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
    fn untrusted_by_default() {
        let source = ClientIpSource::default();
        assert_eq!(
            source.resolve(Some(ip("10.0.0.1")), Some("6.6.6.6")),
            Some(ip("10.0.0.1"))
        );
    }

    #[test]
    fn trusted_hops_count_from_the_right() {
        let one = ClientIpSource { trusted_hops: 1 };
        let two = ClientIpSource { trusted_hops: 2 };
        let xff = Some("6.6.6.6, 1.2.3.4, 10.0.0.2");
        let peer = Some(ip("10.0.0.1"));
        assert_eq!(one.resolve(peer, xff), Some(ip("10.0.0.2")));
        assert_eq!(two.resolve(peer, xff), Some(ip("1.2.3.4")));
        let five = ClientIpSource { trusted_hops: 5 };
        assert_eq!(five.resolve(peer, xff), peer);
        assert_eq!(one.resolve(peer, Some("garbage")), peer);
        assert_eq!(one.resolve(peer, None), peer);
    }

    #[test]
    fn peer_is_read_only_when_needed() {
        let one = ClientIpSource { trusted_hops: 1 };
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
