//! Where the stack's parts find each other, and the Envoy configuration
//! both topologies render from the one template
//! (`envoy/sluice-http.template.yaml`) with the same filter configuration
//! (`envoy/stack/filter.json`): only addresses differ.

use anyhow::{anyhow, Result};

use super::files;
use crate::envoy::{ConfigParams, Hosts};
use crate::routes::upstream_vars;
use crate::template::{self, Vars};

/// Compose's Envoys: the HTTP listener inside their containers.
pub const COMPOSE_LISTEN_PORT: u16 = 10000;
/// Compose's Envoys: the admin listener inside their containers.
pub const COMPOSE_ADMIN_PORT: u16 = 9901;
/// Compose's upstreams container, and its ports.
pub const COMPOSE_UPSTREAMS: (&str, UpstreamPorts) = (
    "upstreams",
    UpstreamPorts {
        http: 8080,
        grpc: 50051,
        ws: 8765,
    },
);
/// Compose's quota server container (its port is `listen.grpc`'s in
/// `envoy/stack/sluice.yaml`).
pub const COMPOSE_QUOTA_HOST: &str = "quota";
/// Where compose's Envoys find the filter module (mounted).
pub const COMPOSE_WASM_PATH: &str = "/etc/sluice/sluice_filter.wasm";
/// Where compose's Envoys find their configuration (mounted).
pub const COMPOSE_ENVOY_CONFIG: &str = "/etc/sluice/envoy.yaml";
/// Where compose's quota server finds its configuration (mounted).
pub const COMPOSE_QUOTA_CONFIG: &str = "/etc/sluice/sluice.yaml";

/// The upstreams' ports (`upstreams --http --grpc --ws`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamPorts {
    /// HTTP/1.1 and h2c echo.
    pub http: u16,
    /// gRPC services.
    pub grpc: u16,
    /// WebSocket echo and rooms.
    pub ws: u16,
}

/// The template's variables beyond [`ConfigParams`] for the stack: the
/// gRPC and WebSocket routes.
pub fn stack_vars(upstreams: UpstreamPorts) -> Vars {
    upstream_vars(Some(upstreams.grpc), Some(upstreams.ws))
}

/// Whether the Envoys run the sync service: with any synced rule in
/// `filter`, since it keeps the leases of leased rules and brings the quota
/// server's access controls to every Envoy. Switching the rules' mode in
/// `filter.json` is all it takes to switch the stack.
pub fn needs_sync_service(filter: &str) -> Result<bool> {
    Ok(!files::sync_modes(filter)?.is_empty())
}

/// The text of `envoy/stack/envoy.yaml`: the template rendered for
/// compose's containers with the stack's filter configuration.
pub fn render_compose_envoy() -> Result<String> {
    let filter = files::filter_config()?;
    let listen = files::quota_listen()?;
    let quota_port = listen
        .rsplit_once(':')
        .and_then(|(_, port)| port.parse::<u16>().ok())
        .ok_or_else(|| anyhow!("listen.grpc {listen:?} of the stack's sluice.yaml has no port"))?;
    let (upstream_host, upstreams) = COMPOSE_UPSTREAMS;
    let params = ConfigParams {
        admin_port: COMPOSE_ADMIN_PORT,
        listen_port: COMPOSE_LISTEN_PORT,
        upstream_port: upstreams.http,
        wasm_path: COMPOSE_WASM_PATH.to_owned(),
        plugin_config: Some(filter.clone()),
        native_local_ratelimit: false,
        access_log: true,
        quota_port: Some(quota_port),
        hosts: Hosts {
            bind: "0.0.0.0".to_owned(),
            upstream: upstream_host.to_owned(),
            quota: COMPOSE_QUOTA_HOST.to_owned(),
            cluster_type: "STRICT_DNS",
        },
        sync_service: needs_sync_service(&filter)?,
        jwks: None,
    };
    params.render_with(
        &template::load_template()?,
        stack_vars(upstreams),
        "# The Envoys of envoy/compose.yaml (envoy-a and envoy-b run this same file).\n\
         #\n\
         # GENERATED from envoy/sluice-http.template.yaml and envoy/stack/filter.json\n\
         # by `make envoy-yaml`: edit those, not this file (the test\n\
         # `compose_envoy_config_is_rendered_from_template` checks they agree).\n\
         # `make stack-up` renders the same template with the same filter\n\
         # configuration for loopback.\n",
    )
}
