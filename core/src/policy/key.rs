//! Limit keys: which counter a request is charged to.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;
use core::net::IpAddr;

use alloc::borrow::Cow;

use super::query;
use super::request::Attributes;
use crate::client_ip::ClientIpSource;
use crate::text::{push_decimal, push_ipv4, PushStr};

/// One request attribute that goes into a key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum KeyPart {
    /// The resolved client address.
    ClientIp,
    /// A request header (or gRPC metadata) by lower-case name.
    Header(String),
    /// A query parameter by name, decoded (see [`query`]).
    Query(String),
    /// The path without the query string.
    Path,
    /// The `n`-th non-empty path segment, from 0 (`/room/lobby` → 1 is `lobby`).
    PathSegment(usize),
    /// The HTTP method.
    Method,
}

impl KeyPart {
    /// Reads `client_ip`, `header:<name>`, `query:<name>`, `path`,
    /// `path_segment:<n>` or `method`.
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
                } else if let Some(name) = text.strip_prefix("query:") {
                    let valid = !name.is_empty() && !name.chars().any(char::is_control);
                    valid.then(|| KeyPart::Query(name.into()))
                } else {
                    let n = text.strip_prefix("path_segment:")?;
                    n.parse().ok().map(KeyPart::PathSegment)
                }
            }
        }
    }

    /// Whether every request has this part (a missing client address is
    /// keyed as unknown), so nothing after it in a fallback chain is used.
    pub fn always_present(&self) -> bool {
        matches!(self, KeyPart::ClientIp | KeyPart::Path | KeyPart::Method)
    }

    /// Whether `request` has this part.
    fn is_in(&self, request: &impl Attributes) -> bool {
        match self {
            KeyPart::Header(name) => request.header(name).is_some(),
            KeyPart::Query(name) => query::find(request.query(), name).is_some(),
            KeyPart::PathSegment(n) => path_segment(request.path(), *n).is_some(),
            KeyPart::ClientIp | KeyPart::Path | KeyPart::Method => true,
        }
    }
}

/// One element of a key: a part, or a fallback chain of parts.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum KeyElement {
    /// This part; a request lacking it is not keyed.
    Part(KeyPart),
    /// The first of these parts the request has; a request lacking them
    /// all is not keyed.
    FirstOf(Vec<KeyPart>),
}

impl KeyElement {
    /// The parts it may read.
    pub fn parts(&self) -> &[KeyPart] {
        match self {
            KeyElement::Part(part) => core::slice::from_ref(part),
            KeyElement::FirstOf(parts) => parts,
        }
    }
}

/// The elements of a key, in order. Empty for a rule of global scope.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeySpec {
    elements: Vec<KeyElement>,
    /// Whether `path` and `path_segment` parts are lower-cased (ASCII), for
    /// a rule that matches paths ignoring case: changing the case of a path
    /// then gets a client no fresh counter.
    lower_path: bool,
}

/// What a client address that the host could not tell is keyed as.
const UNKNOWN_CLIENT: &str = "unknown";

impl KeySpec {
    /// A key made of `parts`, each required.
    pub fn new(parts: Vec<KeyPart>) -> KeySpec {
        KeySpec::of(parts.into_iter().map(KeyElement::Part).collect())
    }

    /// A key made of `elements`.
    pub fn of(elements: Vec<KeyElement>) -> KeySpec {
        KeySpec {
            elements,
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

    /// The elements.
    pub fn elements(&self) -> &[KeyElement] {
        &self.elements
    }

    /// Every part any element may read.
    pub fn parts(&self) -> impl Iterator<Item = &KeyPart> {
        self.elements.iter().flat_map(KeyElement::parts)
    }

    /// Writes the request's key into `out` (cleared first). Each part is
    /// length-prefixed (`5:alice`), and a fallback chain's part also by
    /// its place in the chain (`1>5:alice`), so no two different requests
    /// share a key by accident of punctuation, nor values of different
    /// parts of a chain. The client address is keyed by its network under
    /// `clients`' prefix lengths. Returns false if a part the key needs (a
    /// header, query parameter or path segment; every part of a chain) is
    /// missing: the rule does not apply then.
    pub fn build(
        &self,
        request: &impl Attributes,
        clients: &ClientIpSource,
        out: &mut String,
    ) -> bool {
        out.clear();
        let mut ip_text = IpText::default();
        for element in &self.elements {
            let (place, part) = match element {
                KeyElement::Part(part) => (None, part),
                KeyElement::FirstOf(parts) => {
                    match parts.iter().enumerate().find(|(_, p)| p.is_in(request)) {
                        Some((i, part)) => (Some(i), part),
                        None => return false,
                    }
                }
            };
            let Some(value) = part_value(part, request, clients, &mut ip_text) else {
                return false;
            };
            if let Some(place) = place {
                push_decimal(out, place as u64);
                out.push('>');
            }
            push_decimal(out, value.len() as u64);
            out.push(':');
            let from_path = matches!(part, KeyPart::Path | KeyPart::PathSegment(_));
            if self.lower_path && from_path {
                out.extend(value.chars().map(|c| c.to_ascii_lowercase()));
            } else {
                out.push_str(&value);
            }
        }
        true
    }
}

/// The text of `part` in `request`, or `None` if the request lacks it.
/// `ip_text` holds the client address's text.
fn part_value<'r>(
    part: &KeyPart,
    request: &'r impl Attributes,
    clients: &ClientIpSource,
    ip_text: &'r mut IpText,
) -> Option<Cow<'r, str>> {
    let value = match part {
        KeyPart::ClientIp => match request.client_ip() {
            Some(ip) => {
                *ip_text = IpText::default();
                match clients.key_address(ip) {
                    // Most clients: written without `core::fmt`.
                    IpAddr::V4(v4) => push_ipv4(ip_text, v4),
                    v6 => {
                        let _ = write!(ip_text, "{v6}");
                    }
                }
                ip_text.as_str()
            }
            None => UNKNOWN_CLIENT,
        },
        KeyPart::Header(name) => request.header(name)?,
        KeyPart::Query(name) => return query::find(request.query(), name).map(query::canonical),
        KeyPart::Path => request.path(),
        KeyPart::PathSegment(n) => path_segment(request.path(), *n)?,
        KeyPart::Method => request.method(),
    };
    Some(Cow::Borrowed(value))
}

/// The `n`-th non-empty segment of `path`, from 0.
fn path_segment(path: &str, n: usize) -> Option<&str> {
    path.split('/').filter(|s| !s.is_empty()).nth(n)
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

impl PushStr for IpText {
    fn push(&mut self, c: char) {
        self.push_str(c.encode_utf8(&mut [0; 4]));
    }
    fn push_str(&mut self, s: &str) {
        // 48 bytes hold any address: nothing is ever cut.
        let _ = self.write_str(s);
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
    fn query_parts_key_the_decoded_first_value() {
        let spec = KeySpec::new(vec![KeyPart::parse("query:api key").unwrap()]);
        let clients = ClientIpSource::default();
        let (mut k1, mut k2) = (String::new(), String::new());
        let plain = HttpRequest::new("GET", "/?api+key=abc&api%20key=zzz");
        let escaped = HttpRequest::new("GET", "/?api%20key=%61bc");
        assert!(spec.build(&plain, &clients, &mut k1) && spec.build(&escaped, &clients, &mut k2));
        assert_eq!((k1.as_str(), k2.as_str()), ("3:abc", "3:abc"));
        assert!(!spec.build(&HttpRequest::new("GET", "/?apikey=abc"), &clients, &mut k1));
        // Bytes that are not UTF-8 text key alike however they are spelled.
        let lower = HttpRequest::new("GET", "/?api+key=x%ff");
        let upper = HttpRequest::new("GET", "/?api%20key=%78%FF");
        assert!(spec.build(&lower, &clients, &mut k1) && spec.build(&upper, &clients, &mut k2));
        assert_eq!((k1.as_str(), k2.as_str()), ("4:x%FF", "4:x%FF"));
    }

    #[test]
    fn chains_key_the_first_present_part_and_which_it_was() {
        let chain = ["header:x-api-key", "query:user", "client_ip"]
            .iter()
            .map(|p| KeyPart::parse(p).unwrap())
            .collect();
        let spec = KeySpec::of(vec![
            KeyElement::FirstOf(chain),
            KeyElement::Part(KeyPart::Method),
        ]);
        let clients = ClientIpSource::default();
        let base = || HttpRequest::new("GET", "/").with_client_ip("192.0.2.7".parse().unwrap());
        let mut key = String::new();
        let cases = [
            (
                base().with_header("x-api-key", "192.0.2.7"),
                "0>9:192.0.2.73:GET",
            ),
            (base(), "2>9:192.0.2.73:GET"),
            (
                HttpRequest::new("GET", "/?user=192.0.2.7")
                    .with_client_ip("192.0.2.7".parse().unwrap()),
                "1>9:192.0.2.73:GET",
            ),
            (HttpRequest::new("GET", "/"), "2>7:unknown3:GET"),
        ];
        for (request, expected) in cases {
            assert!(spec.build(&request, &clients, &mut key));
            assert_eq!(key, expected);
        }
        // A chain without an always-present part: a request lacking all
        // its parts is not keyed.
        let optional = KeySpec::of(vec![KeyElement::FirstOf(vec![
            KeyPart::Header("a".into()),
            KeyPart::Header("b".into()),
        ])]);
        assert!(!optional.build(&base(), &clients, &mut key));
        assert!(optional.build(&base().with_header("b", "x"), &clients, &mut key));
        assert_eq!(key, "1>1:x");
    }

    #[test]
    fn parses_parts() {
        assert_eq!(KeyPart::parse("header:"), None);
        assert_eq!(KeyPart::parse("header:bad name"), None);
        assert_eq!(KeyPart::parse("path_segment:x"), None);
        assert_eq!(KeyPart::parse("ip"), None);
        assert_eq!(KeyPart::parse("query:"), None);
        assert_eq!(KeyPart::parse("query:a\nb"), None);
        assert_eq!(
            KeyPart::parse("query:Page"),
            Some(KeyPart::Query("Page".into()))
        );
        assert_eq!(
            KeyPart::parse("path_segment:2"),
            Some(KeyPart::PathSegment(2))
        );
    }
}
