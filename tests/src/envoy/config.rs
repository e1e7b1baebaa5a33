//! The parameters rendered into Envoy's configuration template.

use anyhow::Result;
use serde_json::Value;

use crate::template::{self, Vars};

/// What to put into the template.
#[derive(Debug, Clone)]
pub struct ConfigParams {
    /// 0 = any free port.
    pub admin_port: u16,
    /// 0 = any free port.
    pub listen_port: u16,
    pub upstream_port: u16,
    /// The filter module as written into the config (absolute or relative to
    /// Envoy's working directory).
    pub wasm_path: String,
    /// The plugin JSON; `None` leaves the Sluice filter out.
    pub plugin_config: Option<String>,
    /// Adds Envoy's native local_ratelimit filter (huge bucket).
    pub native_local_ratelimit: bool,
    /// One access log line per request on stdout.
    pub access_log: bool,
    /// The quota server's gRPC port: adds the `sluice_quota` cluster.
    pub quota_port: Option<u16>,
    /// Where the listeners bind and the clusters point.
    pub hosts: Hosts,
    /// Adds the lease sync service (leased rules).
    pub sync_service: bool,
    /// The JWT issuer's keys (JWKS JSON): adds JWT verification that puts
    /// a verified token's `sub` into `x-jwt-sub`.
    pub jwks: Option<String>,
}

/// The addresses of the template's listeners and clusters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hosts {
    /// What the admin and HTTP listeners bind.
    pub bind: String,
    /// The upstreams' host (HTTP, gRPC and WebSocket).
    pub upstream: String,
    /// The quota server's host.
    pub quota: String,
    /// `STATIC` for IP addresses, `STRICT_DNS` for host names.
    pub cluster_type: &'static str,
}

impl Hosts {
    /// Everything on 127.0.0.1 (tests, the local stack).
    pub fn loopback() -> Self {
        Self {
            bind: "127.0.0.1".to_owned(),
            upstream: "127.0.0.1".to_owned(),
            quota: "127.0.0.1".to_owned(),
            cluster_type: "STATIC",
        }
    }
}

impl Default for Hosts {
    fn default() -> Self {
        Self::loopback()
    }
}

impl ConfigParams {
    /// Renders the template, with `header` (comment lines) on top.
    pub fn render(&self, header: &str) -> Result<String> {
        self.render_with(&template::load_template()?, Vars::new(), header)
    }

    /// Renders another template with these parameters plus `extra`'s
    /// variables and sections.
    pub fn render_with(&self, template: &str, extra: Vars, header: &str) -> Result<String> {
        let vars = extra
            .set("ADMIN_PORT", self.admin_port.to_string())
            .set("LISTEN_PORT", self.listen_port.to_string())
            .set("UPSTREAM_PORT", self.upstream_port.to_string())
            .set("BIND_ADDRESS", self.hosts.bind.clone())
            .set("UPSTREAM_HOST", self.hosts.upstream.clone())
            .set("QUOTA_HOST", self.hosts.quota.clone())
            .set("CLUSTER_TYPE", self.hosts.cluster_type)
            .set("WASM_PATH", template::yaml_quote(&self.wasm_path))
            .set(
                "PLUGIN_CONFIG",
                self.plugin_config.clone().unwrap_or_default(),
            )
            .section_if("sluice", self.plugin_config.is_some())
            .section_if("native_local_ratelimit", self.native_local_ratelimit)
            .section_if("access_log", self.access_log)
            .section_if("quota", self.quota_port.is_some())
            .section_if(
                "sync_service",
                self.sync_service && self.plugin_config.is_some(),
            );
        let vars = match self.quota_port {
            Some(port) => vars.set("QUOTA_PORT", port.to_string()),
            None => vars,
        };
        let vars = match &self.jwks {
            Some(jwks) => vars.set("JWKS", template::yaml_quote(jwks)).section("jwt"),
            None => vars,
        };
        template::render(template, &vars, header)
    }
}

/// Pretty JSON for the plugin configuration (readable in rendered configs).
pub fn plugin_json(config: &Value) -> String {
    serde_json::to_string_pretty(config).unwrap_or_else(|_| config.to_string())
}
