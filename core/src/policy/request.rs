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
    /// Lower-case names with their values.
    pub headers: Vec<(String, String)>,
    /// See [`Attributes::client_ip`].
    pub client_ip: Option<IpAddr>,
    /// See [`Attributes::protocol`].
    pub protocol: Protocol,
}

impl HttpRequest {
    /// A request with a method and a path (any query string is dropped).
    pub fn new(method: &str, path: &str) -> HttpRequest {
        HttpRequest {
            method: method.into(),
            path: strip_query(path).into(),
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

/// The path part of a request target: everything before `?` or `#`.
pub fn strip_query(target: &str) -> &str {
    match target.find(['?', '#']) {
        Some(end) => &target[..end],
        None => target,
    }
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
