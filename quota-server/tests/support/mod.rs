//! A running `sluice serve` with its admin API, for the admin and reload tests.

// Test helpers fail loudly: a panic is the report.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use hyper::Method;
use serde_json::Value;
use sluice_quota_server::cli::{Admin, CallError};
use sluice_quota_server::launcher::{Launcher, QuotaServer};
use tempfile::TempDir;

/// The token every test server uses.
pub const TOKEN: &str = "test-token-0123456789";

/// How long an effect may take to become observable (a reload, an expiry).
pub const EVENTUALLY: Duration = Duration::from_secs(10);

/// The launcher of the `sluice` binary built for these tests.
pub fn launcher() -> Launcher {
    Launcher::new(env!("CARGO_BIN_EXE_sluice"))
}

/// Writes `text` to the file `name` in `dir`; returns its path.
pub fn write(dir: &TempDir, name: &str, text: &str) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// A running server with its admin API, killed on drop.
pub struct Sluice {
    pub server: QuotaServer,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
}

impl Sluice {
    /// Starts `sluice serve` on `config` (which must give listen.admin and
    /// admin.token = TOKEN); waits for both addresses.
    pub fn start(config: &Path) -> Sluice {
        let server = launcher().start_file(config).unwrap();
        let admin = server.admin.expect("the admin API must start");
        Sluice {
            grpc: server.grpc,
            admin,
            server,
        }
    }

    /// The admin API with the right token.
    pub fn api(&self) -> Admin {
        self.api_with(Some(TOKEN))
    }

    /// The admin API with `token`.
    pub fn api_with(&self, token: Option<&str>) -> Admin {
        Admin {
            base: format!("http://{}", self.admin),
            token: token.map(str::to_string),
        }
    }

    /// A JSON call that must succeed.
    pub async fn json(&self, method: Method, path: &str, body: Option<Value>) -> Value {
        let text = self
            .api()
            .call(method, path, body.as_ref())
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        serde_json::from_str(&text).unwrap()
    }

    /// A call's error, which there must be.
    pub async fn refused(&self, method: Method, path: &str, body: Option<Value>) -> CallError {
        self.api()
            .call(method, path, body.as_ref())
            .await
            .expect_err("the call must be refused")
    }

    /// The overall code of one ShouldRateLimit call with one descriptor.
    pub async fn ask(&self, domain: &str, entries: &[(&str, &str)]) -> Code {
        let mut client = RateLimitServiceClient::connect(format!("http://{}", self.grpc))
            .await
            .unwrap();
        let descriptor = RateLimitDescriptor {
            entries: entries
                .iter()
                .map(|(k, v)| Entry {
                    key: (*k).into(),
                    value: (*v).into(),
                })
                .collect(),
            ..RateLimitDescriptor::default()
        };
        let mut request = tonic::Request::new(RateLimitRequest {
            domain: domain.into(),
            descriptors: vec![descriptor],
            hits_addend: 0,
        });
        request.set_timeout(Duration::from_secs(2));
        let response = client
            .should_rate_limit(request)
            .await
            .unwrap()
            .into_inner();
        Code::try_from(response.overall_code).unwrap()
    }

    /// The value of a metric line (the whole name with labels), or 0.
    pub async fn metric(&self, series: &str) -> u64 {
        let text = self
            .api_with(None)
            .call(Method::GET, "/metrics", None)
            .await
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0)
    }

    /// Runs `sluice ARGS --admin URL --token TOKEN`.
    pub fn cli(&self, args: &[&str]) -> Output {
        let admin = format!("http://{}", self.admin);
        Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(args)
            .args(["--admin", &admin, "--token", TOKEN])
            .env_remove("SLUICE_ADMIN_TOKEN")
            .output()
            .unwrap()
    }
}

/// Polls `check` until it holds, failing after `EVENTUALLY`.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + EVENTUALLY;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "not within {EVENTUALLY:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A config with the admin API on a free port and the test token.
pub fn config(domains: &str) -> String {
    config_with_admin(domains, "")
}

/// Like [`config`], with more `admin` fields (`audit_log: ...`).
pub fn config_with_admin(domains: &str, admin: &str) -> String {
    let more = if admin.is_empty() {
        String::new()
    } else {
        format!(", {admin}")
    };
    format!(
        "listen: {{grpc: \"127.0.0.1:0\", admin: \"127.0.0.1:0\"}}\n\
         admin: {{token: \"{TOKEN}\"{more}}}\n{domains}"
    )
}

/// An RLS client connected to `server`'s gRPC port.
pub async fn client(server: &QuotaServer) -> RateLimitServiceClient<tonic::transport::Channel> {
    RateLimitServiceClient::connect(server.grpc_url())
        .await
        .unwrap()
}

/// A descriptor of `(key, value)` entries.
pub fn descriptor(entries: &[(&str, &str)]) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries
            .iter()
            .map(|(k, v)| Entry {
                key: (*k).into(),
                value: (*v).into(),
            })
            .collect(),
        ..RateLimitDescriptor::default()
    }
}
