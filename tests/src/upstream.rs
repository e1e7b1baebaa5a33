//! An in-process upstream: HTTP/1.1 and h2c on 127.0.0.1.
//!
//! - `/status/<code>` answers with that status;
//! - anything else answers 200;
//! - a request header `x-echo-usage: <value>` comes back as the response
//!   header `x-tokens-used: <value>` (verbatim, so tests can send bad values
//!   too): an upstream reporting what a request used (README.md, "Charging
//!   by usage"); `x-echo-usage-trailer: <value>` reports it as the trailer
//!   `x-tokens-used` instead, which reaches Envoy over h2c (an HTTP/1.1
//!   response here has a length, hence no trailers);
//! - every body is JSON: `{"method", "path", "query", "headers": {name: value}}`
//!   (repeated headers joined with ", "), so tests can see what Envoy forwarded;
//! - [`Upstream::requests`] counts the requests received.

use std::convert::Infallible;
use std::future::{ready, Ready};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{Context as _, Result};
use bytes::Bytes;
use http_body_util::combinators::WithTrailers;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::header::HeaderMap;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The request header whose value the upstream reports as usage.
pub const ECHO_USAGE: &str = "x-echo-usage";

/// The request header whose value the upstream reports as a usage trailer.
pub const ECHO_USAGE_TRAILER: &str = "x-echo-usage-trailer";

/// The response header (or trailer) in which the test upstreams report usage.
pub const USAGE: &str = "x-tokens-used";

/// A running upstream; stops when dropped.
pub struct Upstream {
    addr: SocketAddr,
    requests: Arc<AtomicU64>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Upstream {
    /// Binds 127.0.0.1:0 and serves in the background (needs a tokio runtime).
    pub async fn start() -> Result<Self> {
        Self::start_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await
    }

    /// Binds `addr` and serves in the background (needs a tokio runtime).
    pub async fn start_on(addr: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the upstream on {addr}"))?;
        let addr = listener.local_addr()?;
        let requests = Arc::new(AtomicU64::new(0));
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(accept_loop(listener, Arc::clone(&requests), stopped));
        Ok(Self {
            addr,
            requests,
            stop,
            task,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Requests received so far (counted when their headers arrive).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        self.task.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    requests: Arc<AtomicU64>,
    stopped: watch::Receiver<bool>,
) {
    loop {
        let mut stop = stopped.clone();
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|s| *s) => return,
        };
        let Ok((stream, _peer)) = accepted else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let requests = Arc::clone(&requests);
        let mut stop = stopped.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let requests = Arc::clone(&requests);
                async move { Ok::<_, Infallible>(handle(req, &requests).await) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = stop.wait_for(|s| *s) => {}
            }
        });
    }
}

/// A response body, with the trailers a request asked for.
type Body = WithTrailers<Full<Bytes>, Ready<Option<Result<HeaderMap, Infallible>>>>;

async fn handle(req: Request<Incoming>, requests: &AtomicU64) -> Response<Body> {
    requests.fetch_add(1, Ordering::SeqCst);
    let (parts, body) = req.into_parts();
    // Drain the request body so keep-alive works.
    let _ = body.collect().await;

    let mut headers = Map::new();
    for (name, value) in &parts.headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        match headers.get_mut(name.as_str()) {
            Some(Value::String(existing)) => {
                existing.push_str(", ");
                existing.push_str(&value);
            }
            _ => {
                headers.insert(name.as_str().to_owned(), Value::String(value));
            }
        }
    }
    let path = parts.uri.path().to_owned();
    let status = path
        .strip_prefix("/status/")
        .and_then(|code| code.trim_end_matches('/').parse::<u16>().ok())
        .and_then(|code| StatusCode::from_u16(code).ok())
        .unwrap_or(StatusCode::OK);
    let body = json!({
        "method": parts.method.as_str(),
        "path": path,
        "query": parts.uri.query(),
        "headers": headers,
    });
    let trailers = parts.headers.get(ECHO_USAGE_TRAILER).map(|usage| {
        let mut trailers = HeaderMap::new();
        trailers.insert(USAGE, usage.clone());
        Ok(trailers)
    });
    let body = Full::new(Bytes::from(body.to_string())).with_trailers(ready(trailers));
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    if let Some(usage) = parts.headers.get(ECHO_USAGE) {
        response.headers_mut().insert(USAGE, usage.clone());
    }
    response
}
