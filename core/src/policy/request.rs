//! The request attributes rules look at, whatever host they come from.

use alloc::string::String;
use alloc::vec::Vec;
use core::net::IpAddr;

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
}

/// The path part of a request target: everything before `?` or `#`.
pub fn strip_query(target: &str) -> &str {
    match target.find(['?', '#']) {
        Some(end) => &target[..end],
        None => target,
    }
}
