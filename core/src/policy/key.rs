//! Limit keys: which counter a request is charged to.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;

use super::request::Attributes;
use crate::client_ip::ClientIpSource;

/// One request attribute that goes into a key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum KeyPart {
    /// The resolved client address.
    ClientIp,
    /// A request header (or gRPC metadata) by lower-case name.
    Header(String),
    /// The path without the query string.
    Path,
    /// The `n`-th non-empty path segment, from 0 (`/room/lobby` → 1 is `lobby`).
    PathSegment(usize),
    /// The HTTP method.
    Method,
}

impl KeyPart {
    /// Reads `client_ip`, `header:<name>`, `path`, `path_segment:<n>` or `method`.
    pub fn parse(text: &str) -> Option<KeyPart> {
        match text {
            "client_ip" => Some(KeyPart::ClientIp),
            "path" => Some(KeyPart::Path),
            "method" => Some(KeyPart::Method),
            _ => {
                if let Some(name) = text.strip_prefix("header:") {
                    let valid = !name.is_empty()
                        && name
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
                    valid.then(|| KeyPart::Header(name.to_ascii_lowercase()))
                } else {
                    let n = text.strip_prefix("path_segment:")?;
                    n.parse().ok().map(KeyPart::PathSegment)
                }
            }
        }
    }
}

/// The parts of a key, in order. Empty for a rule of global scope.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeySpec {
    parts: Vec<KeyPart>,
    /// Whether `path` and `path_segment` parts are lower-cased (ASCII), for
    /// a rule that matches paths ignoring case: changing the case of a path
    /// then gets a client no fresh counter.
    lower_path: bool,
}

/// What a client address that the host could not tell is keyed as.
const UNKNOWN_CLIENT: &str = "unknown";

impl KeySpec {
    /// A key made of `parts`.
    pub fn new(parts: Vec<KeyPart>) -> KeySpec {
        KeySpec {
            parts,
            lower_path: false,
        }
    }

    /// This key with its path parts lower-cased (ASCII) when `on`.
    pub fn lowering_path(self, on: bool) -> KeySpec {
        KeySpec {
            lower_path: on,
            ..self
        }
    }

    /// The parts.
    pub fn parts(&self) -> &[KeyPart] {
        &self.parts
    }

    /// Writes the request's key into `out` (cleared first). Each part is
    /// length-prefixed, so no two different requests share a key by
    /// accident of punctuation. The client address is keyed by its network
    /// under `clients`' prefix lengths. Returns false if a header or path
    /// segment the key needs is missing: the rule does not apply then.
    pub fn build(
        &self,
        request: &impl Attributes,
        clients: &ClientIpSource,
        out: &mut String,
    ) -> bool {
        out.clear();
        for part in &self.parts {
            let value: &str;
            let mut ip_text = IpText::default();
            match part {
                KeyPart::ClientIp => match request.client_ip() {
                    Some(ip) => {
                        let _ = write!(ip_text, "{}", clients.key_address(ip));
                        value = ip_text.as_str();
                    }
                    None => value = UNKNOWN_CLIENT,
                },
                KeyPart::Header(name) => match request.header(name) {
                    Some(v) => value = v,
                    None => return false,
                },
                KeyPart::Path => value = request.path(),
                KeyPart::PathSegment(n) => {
                    match request.path().split('/').filter(|s| !s.is_empty()).nth(*n) {
                        Some(segment) => value = segment,
                        None => return false,
                    }
                }
                KeyPart::Method => value = request.method(),
            }
            let _ = write!(out, "{}:", value.len());
            let from_path = matches!(part, KeyPart::Path | KeyPart::PathSegment(_));
            if self.lower_path && from_path {
                out.extend(value.chars().map(|c| c.to_ascii_lowercase()));
            } else {
                out.push_str(value);
            }
        }
        true
    }
}

/// A stack buffer for an IP address's text (at most 45 bytes for IPv6).
struct IpText {
    bytes: [u8; 48],
    len: usize,
}

impl Default for IpText {
    fn default() -> IpText {
        IpText {
            bytes: [0; 48],
            len: 0,
        }
    }
}

impl IpText {
    fn as_str(&self) -> &str {
        core::str::from_utf8(&self.bytes[..self.len]).unwrap_or(UNKNOWN_CLIENT)
    }
}

impl Write for IpText {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let end = self.len + s.len();
        let slot = self.bytes.get_mut(self.len..end).ok_or(core::fmt::Error)?;
        slot.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::request::HttpRequest;
    use alloc::vec;
    use core::net::{IpAddr, Ipv6Addr};

    #[test]
    fn builds_length_prefixed_keys() {
        let spec = KeySpec::new(
            ["client_ip", "header:X-Api-Key", "method", "path_segment:1"]
                .iter()
                .map(|p| KeyPart::parse(p).unwrap())
                .collect(),
        );
        let req = HttpRequest::new("GET", "/room/lobby?x=1")
            .with_header("x-api-key", "k|1")
            .with_client_ip(IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1)));
        let host = ClientIpSource {
            ipv6_prefix: 128,
            ..ClientIpSource::default()
        };
        let mut key = String::new();
        assert!(spec.build(&req, &host, &mut key));
        assert_eq!(key, "7:fe80::13:k|13:GET5:lobby");
        assert!(!spec.build(&HttpRequest::new("GET", "/room"), &host, &mut key));
        // By default an IPv6 client is keyed by its /64.
        assert!(spec.build(&req, &ClientIpSource::default(), &mut key));
        assert_eq!(key, "6:fe80::3:k|13:GET5:lobby");
    }

    #[test]
    fn path_parts_are_lowered_only_when_asked() {
        let parts = || vec![KeyPart::Path, KeyPart::PathSegment(1), KeyPart::Method];
        let req = HttpRequest::new("get", "/Room/LOBBY-É");
        let clients = ClientIpSource::default();
        let mut key = String::new();
        assert!(KeySpec::new(parts()).build(&req, &clients, &mut key));
        assert_eq!(key, "14:/Room/LOBBY-É8:LOBBY-É3:get");
        let lowered = KeySpec::new(parts()).lowering_path(true);
        assert!(lowered.build(&req, &clients, &mut key));
        assert_eq!(key, "14:/room/lobby-É8:lobby-É3:get");
    }

    #[test]
    fn separators_in_values_cannot_collide() {
        let spec = KeySpec::new(vec![
            KeyPart::Header("a".into()),
            KeyPart::Header("b".into()),
        ]);
        let (mut k1, mut k2) = (String::new(), String::new());
        let r1 = HttpRequest::new("GET", "/")
            .with_header("a", "x:1")
            .with_header("b", "y");
        let r2 = HttpRequest::new("GET", "/")
            .with_header("a", "x")
            .with_header("b", "1:y");
        let clients = ClientIpSource::default();
        assert!(spec.build(&r1, &clients, &mut k1) && spec.build(&r2, &clients, &mut k2));
        assert_ne!(k1, k2);
    }

    #[test]
    fn parses_parts() {
        assert_eq!(KeyPart::parse("header:"), None);
        assert_eq!(KeyPart::parse("header:bad name"), None);
        assert_eq!(KeyPart::parse("path_segment:x"), None);
        assert_eq!(KeyPart::parse("ip"), None);
        assert_eq!(
            KeyPart::parse("path_segment:2"),
            Some(KeyPart::PathSegment(2))
        );
    }
}
