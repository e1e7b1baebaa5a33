//! A small HTTP/1.1 client for the tests: one fresh TCP connection per
//! request (so requests spread over Envoy's workers), every request bounded by
//! a timeout.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _, Result};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::header::HeaderMap;
use hyper::Request;
use hyper_util::rt::TokioIo;
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
    /// From just before connecting to the end of the body.
    pub elapsed: Duration,
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
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, format!("{}", self.addr));
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let request = builder
            .body(Full::new(Bytes::new()))
            .with_context(|| format!("building {method} {path}"))?;
        send(self.addr, request).await
    }
}

/// Sends one request over a new connection to `addr`.
pub async fn send(addr: SocketAddr, request: Request<Full<Bytes>>) -> Result<Reply> {
    let what = format!("{} {} via {addr}", request.method(), request.uri());
    tokio::time::timeout(REQUEST_TIMEOUT, send_inner(addr, request))
        .await
        .map_err(|_| anyhow!("{what}: no complete response within {REQUEST_TIMEOUT:?}"))?
        .with_context(|| what.clone())
}

async fn send_inner(addr: SocketAddr, request: Request<Full<Bytes>>) -> Result<Reply> {
    let start = Instant::now();
    let stream = TcpStream::connect(addr).await.context("connecting")?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP/1.1 handshake")?;
    let conn_task = tokio::spawn(conn);
    let response = sender.send_request(request).await.context("sending")?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await.context("reading the body")?.to_bytes();
    let elapsed = start.elapsed();
    drop(sender);
    conn_task.abort();
    Ok(Reply {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
        elapsed,
    })
}
