//! The template's optional gRPC and WebSocket routes (sections `grpc` and
//! `websocket` of `envoy/sluice-http.template.yaml`).

use crate::envoy::EnvoyBuilder;
use crate::template::{template_path, Vars};

/// Routes gRPC calls to `grpc` and WebSocket upgrades of `/ws` and
/// `/room/` to `websocket` (upstream ports on 127.0.0.1), when given.
pub fn with_upstreams(
    builder: EnvoyBuilder,
    grpc: Option<u16>,
    websocket: Option<u16>,
) -> EnvoyBuilder {
    builder.template(
        &template_path().display().to_string(),
        upstream_vars(grpc, websocket),
    )
}

/// The template's variables and sections for a gRPC upstream on port
/// `grpc` and a WebSocket upstream on port `websocket`, when given.
pub fn upstream_vars(grpc: Option<u16>, websocket: Option<u16>) -> Vars {
    let mut vars = Vars::new();
    if let Some(port) = grpc {
        vars = vars
            .set("GRPC_UPSTREAM_PORT", port.to_string())
            .section("grpc");
    }
    if let Some(port) = websocket {
        vars = vars
            .set("WS_UPSTREAM_PORT", port.to_string())
            .section("websocket");
    }
    vars
}
