//! The request attributes rules look at, whatever host they come from.

use alloc::string::String;
use alloc::vec::Vec;
use core::net::IpAddr;

/// What kind of traffic a request starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// A plain HTTP request.
    #[default]
    Http,
    /// A gRPC call (`content-type: application/grpc*`).
    Grpc,
    /// A WebSocket upgrade (`upgrade: websocket`).
    WebSocket,
}

impl Protocol {
    /// The protocol told by a request's `content-type` and `upgrade` headers.
    pub fn detect(content_type: Option<&str>, upgrade: Option<&str>) -> Protocol {
        if upgrade.is_some_and(|u| u.eq_ignore_ascii_case("websocket")) {
            Protocol::WebSocket
        } else if content_type.is_some_and(|c| {
            c.get(..16)
                .is_some_and(|p| p.eq_ignore_ascii_case("application/grpc"))
        }) {
            Protocol::Grpc
        } else {
            Protocol::Http
        }
    }
}

/// The service and method of a gRPC path `/package.Service/Method`.
pub fn grpc_method(path: &str) -> Option<(&str, &str)> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    (!service.is_empty() && !method.is_empty() && !method.contains('/'))
        .then_some((service, method))
}

/// Read access to one request's attributes.
///
/// The filter implements it over the headers it fetched from Envoy; tests
/// and the quota server use [`HttpRequest`].
pub trait Attributes {
    /// The HTTP method, upper-case (`GET`).
    fn method(&self) -> &str;
    /// The path without the query string.
    fn path(&self) -> &str;
    /// The raw query string, without `?` (empty when there is none, or
    /// when the host did not fetch it: no rule reads it).
    fn query(&self) -> &str;
    /// A header's value by lower-case name.
    fn header(&self, name: &str) -> Option<&str>;
    /// The client address, already resolved from the peer and trusted hops.
    fn client_ip(&self) -> Option<IpAddr>;
    /// What kind of traffic this is.
    fn protocol(&self) -> Protocol;
}

/// A plain owned request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HttpRequest {
    /// See [`Attributes::method`].
    pub method: String,
    /// See [`Attributes::path`].
    pub path: String,
    /// See [`Attributes::query`].
    pub query: String,
    /// Lower-case names with their values.
    pub headers: Vec<(String, String)>,
    /// See [`Attributes::client_ip`].
    pub client_ip: Option<IpAddr>,
    /// See [`Attributes::protocol`].
    pub protocol: Protocol,
}

impl HttpRequest {
    /// A request with a method and a request target: a path, possibly
    /// with a query string (kept) and a fragment (dropped).
    pub fn new(method: &str, target: &str) -> HttpRequest {
        let (path, query) = split_target(target);
        HttpRequest {
            method: method.into(),
            path: path.into(),
            query: query.into(),
            ..HttpRequest::default()
        }
    }

    /// Adds a header (name lower-cased).
    pub fn with_header(mut self, name: &str, value: &str) -> HttpRequest {
        self.headers.push((name.to_ascii_lowercase(), value.into()));
        self
    }

    /// Sets the protocol.
    pub fn with_protocol(mut self, protocol: Protocol) -> HttpRequest {
        self.protocol = protocol;
        self
    }

    /// Sets the client address.
    pub fn with_client_ip(mut self, ip: IpAddr) -> HttpRequest {
        self.client_ip = Some(ip);
        self
    }
}

impl Attributes for HttpRequest {
    fn method(&self) -> &str {
        &self.method
    }
    fn path(&self) -> &str {
        &self.path
    }
    fn query(&self) -> &str {
        &self.query
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
    fn client_ip(&self) -> Option<IpAddr> {
        self.client_ip
    }
    fn protocol(&self) -> Protocol {
        self.protocol
    }
}

/// The path and the query string of a request target: the path is
/// everything before `?` or `#`, the query what lies between `?` and `#`.
pub fn split_target(target: &str) -> (&str, &str) {
    let (before_fragment, _) = target.split_once('#').unwrap_or((target, ""));
    before_fragment
        .split_once('?')
        .unwrap_or((before_fragment, ""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_protocols() {
        assert_eq!(
            Protocol::detect(Some("application/grpc+proto"), None),
            Protocol::Grpc
        );
        assert_eq!(
            Protocol::detect(Some("Application/GRPC"), None),
            Protocol::Grpc
        );
        assert_eq!(
            Protocol::detect(Some("application/json"), None),
            Protocol::Http
        );
        assert_eq!(
            Protocol::detect(None, Some("WebSocket")),
            Protocol::WebSocket
        );
        assert_eq!(
            Protocol::detect(Some("application/grp"), Some("h2c")),
            Protocol::Http
        );
    }

    #[test]
    fn splits_targets() {
        assert_eq!(split_target("/a/b"), ("/a/b", ""));
        assert_eq!(split_target("/a?x=1&y"), ("/a", "x=1&y"));
        assert_eq!(split_target("/a?x=?#f?g"), ("/a", "x=?"));
        assert_eq!(split_target("/a#f?x=1"), ("/a", ""));
        assert_eq!(split_target("/a?"), ("/a", ""));
    }

    #[test]
    fn splits_grpc_paths() {
        assert_eq!(
            grpc_method("/chat.ChatService/Send"),
            Some(("chat.ChatService", "Send"))
        );
        assert_eq!(grpc_method("/chat.ChatService/"), None);
        assert_eq!(grpc_method("/a/b/c"), None);
        assert_eq!(grpc_method("nope"), None);
    }
}
