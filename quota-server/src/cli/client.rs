//! A small HTTP client for the admin API.

use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// Longest one admin call may take (the API answers from memory, or after
/// one storage call bounded by the storage timeout).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Why an admin call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The request could not be built (a malformed `--admin` URL?).
    #[error("bad request to {url}: {message}")]
    Request {
        /// The URL.
        url: String,
        /// What was wrong.
        message: String,
    },
    /// The server could not be reached.
    #[error("cannot reach the admin API at {url}: {message} (is `sluice serve` running with an admin token, and is --admin right?)")]
    Unreachable {
        /// The URL.
        url: String,
        /// The transport error.
        message: String,
    },
    /// No answer in time.
    #[error("the admin API at {0} did not answer within {CALL_TIMEOUT:?}")]
    Timeout(String),
    /// The server refused; its message says why.
    #[error("{status}: {message}")]
    Refused {
        /// The HTTP status.
        status: StatusCode,
        /// The server's `error` field, or its body.
        message: String,
    },
}

/// Where the admin API is and the token to present.
#[derive(Clone, Debug)]
pub struct Admin {
    /// Base URL, e.g. `http://127.0.0.1:8082`.
    pub base: String,
    /// The bearer token, if any.
    pub token: Option<String>,
}

impl Admin {
    /// Calls `method path` with an optional JSON body; returns the body text.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<String, CallError> {
        let url = format!("{}{path}", self.base.trim_end_matches('/'));
        let mut builder = Request::builder().method(method).uri(&url);
        if let Some(token) = &self.token {
            builder = builder.header("authorization", format!("Bearer {token}"));
        }
        let payload = match body {
            Some(v) => {
                builder = builder.header("content-type", "application/json");
                Bytes::from(v.to_string())
            }
            None => Bytes::new(),
        };
        let request = builder
            .body(Full::new(payload))
            .map_err(|e| CallError::Request {
                url: url.clone(),
                message: e.to_string(),
            })?;
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let call = async {
            let response = client
                .request(request)
                .await
                .map_err(|e| CallError::Unreachable {
                    url: url.clone(),
                    message: e.to_string(),
                })?;
            let status = response.status();
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|e| CallError::Unreachable {
                    url: url.clone(),
                    message: e.to_string(),
                })?
                .to_bytes();
            let text = String::from_utf8_lossy(&bytes).into_owned();
            if status.is_success() {
                Ok(text)
            } else {
                let message = serde_json::from_str::<Value>(&text)
                    .ok()
                    .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_string))
                    .unwrap_or(text);
                Err(CallError::Refused { status, message })
            }
        };
        tokio::time::timeout(CALL_TIMEOUT, call)
            .await
            .map_err(|_| CallError::Timeout(url.clone()))?
    }
}
