//! A small HTTP/1.1 and h2c client for the tests: one fresh TCP connection
//! per request (so requests spread over Envoy's workers), every request
//! bounded by a timeout.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _, Result};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::header::HeaderMap;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::net::TcpStream;

/// How long one request may take, connection included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// A response, read in full.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The trailers, if the response had any (HTTP/2 carries them).
    pub trailers: Option<HeaderMap>,
    /// From just before connecting to the end of the body.
    pub elapsed: Duration,
}

/// The permits left (`r`) of the one rule an IETF `RateLimit` field
/// (`"rule";r=<left>;t=<seconds>`) lists.
pub fn remaining_in(field: Option<&str>) -> Option<u64> {
    field?
        .split(';')
        .find_map(|p| p.trim().strip_prefix("r="))?
        .parse()
        .ok()
}

impl Reply {
    /// The header's value as text (the first one if repeated).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The header parsed as an unsigned integer.
    pub fn header_u64(&self, name: &str) -> Option<u64> {
        self.header(name).and_then(|v| v.trim().parse().ok())
    }

    /// The permits left of the one rule the IETF `RateLimit` header lists.
    pub fn remaining(&self) -> Option<u64> {
        remaining_in(self.header("ratelimit"))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Result<Value> {
        serde_json::from_slice(&self.body)
            .with_context(|| format!("response body is not JSON: {:?}", self.text()))
    }

    /// All headers as `name: value` lines (for failure messages).
    pub fn headers_text(&self) -> String {
        let mut out = String::new();
        for (name, value) in &self.headers {
            out.push_str(name.as_str());
            out.push_str(": ");
            out.push_str(&String::from_utf8_lossy(value.as_bytes()));
            out.push('\n');
        }
        out
    }
}

/// The protocol a request is sent in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    /// HTTP/2 over cleartext, with prior knowledge (no upgrade).
    H2c,
}

/// Sends requests to one address (Envoy's listener).
#[derive(Debug, Clone, Copy)]
pub struct Client {
    addr: SocketAddr,
}

impl Client {
    pub fn new(addr: SocketAddr) -> Self {
        Self { addr }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub async fn get(&self, path: &str) -> Result<Reply> {
        self.request("GET", path, &[]).await
    }

    pub async fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> Result<Reply> {
        self.request("GET", path, headers).await
    }

    pub async fn post(&self, path: &str, headers: &[(&str, &str)]) -> Result<Reply> {
        self.request("POST", path, headers).await
    }

    /// Sends `method path` with `headers` and an empty body.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Reply> {
        self.request_in(Protocol::Http1, method, path, headers)
            .await
    }

    /// Sends `method path` with `headers` and an empty body in `protocol`.
    pub async fn request_in(
        &self,
        protocol: Protocol,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Reply> {
        let mut builder = Request::builder().method(method);
        builder = match protocol {
            Protocol::Http1 => builder
                .uri(path)
                .header(hyper::header::HOST, format!("{}", self.addr)),
            // HTTP/2 takes the scheme and authority from the URI.
            Protocol::H2c => builder.uri(format!("http://{}{path}", self.addr)),
        };
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let request = builder
            .body(Full::new(Bytes::new()))
            .with_context(|| format!("building {method} {path}"))?;
        send_in(protocol, self.addr, request).await
    }
}

/// Sends one HTTP/1.1 request over a new connection to `addr`.
pub async fn send(addr: SocketAddr, request: Request<Full<Bytes>>) -> Result<Reply> {
    send_in(Protocol::Http1, addr, request).await
}

/// Sends one request in `protocol` over a new connection to `addr`.
pub async fn send_in(
    protocol: Protocol,
    addr: SocketAddr,
    request: Request<Full<Bytes>>,
) -> Result<Reply> {
    let what = format!("{} {} via {addr}", request.method(), request.uri());
    tokio::time::timeout(REQUEST_TIMEOUT, send_inner(protocol, addr, request))
        .await
        .map_err(|_| anyhow!("{what}: no complete response within {REQUEST_TIMEOUT:?}"))?
        .with_context(|| what.clone())
}

async fn send_inner(
    protocol: Protocol,
    addr: SocketAddr,
    request: Request<Full<Bytes>>,
) -> Result<Reply> {
    let start = Instant::now();
    let stream = TcpStream::connect(addr).await.context("connecting")?;
    let _ = stream.set_nodelay(true);
    let io = TokioIo::new(stream);
    // Each sender is kept until the body is read, then the connection dropped.
    match protocol {
        Protocol::Http1 => {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .context("HTTP/1.1 handshake")?;
            let conn_task = tokio::spawn(conn);
            let response = sender.send_request(request).await.context("sending")?;
            let reply = read_reply(start, response).await;
            conn_task.abort();
            reply
        }
        Protocol::H2c => {
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .context("HTTP/2 handshake")?;
            let conn_task = tokio::spawn(conn);
            let response = sender.send_request(request).await.context("sending")?;
            let reply = read_reply(start, response).await;
            conn_task.abort();
            reply
        }
    }
}

/// Reads `response` in full (sent at `start`).
async fn read_reply(start: Instant, response: hyper::Response<Incoming>) -> Result<Reply> {
    let (parts, body) = response.into_parts();
    let collected = body.collect().await.context("reading the body")?;
    let trailers = collected.trailers().cloned();
    Ok(Reply {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: collected.to_bytes(),
        trailers,
        elapsed: start.elapsed(),
    })
}
