//! The example rule set, rendered into the example `envoy/envoy.yaml`
//! (`make envoy-yaml`). The demo (`make demo`) runs the stack's rules
//! instead: [`crate::stack::demo`].

use std::path::PathBuf;

use anyhow::Result;
use serde_json::Value;

use crate::envoy::{ConfigParams, Hosts};
use crate::repo_root;

/// Where the rendered example lives.
pub fn example_path() -> PathBuf {
    repo_root().join("envoy/envoy.yaml")
}

/// The example rules (see README.md, "Filter configuration"), as written into
/// `envoy/envoy.yaml`:
/// - `login`: `POST /login`, 3 per minute per client IP, sliding window log;
/// - `api-per-ip`: `/api/`, a token bucket of 20 refilled at 10/s per IP;
/// - `global-shadow`: everything, 15/s for all clients together, shadow
///   only (counted in `shadow_limited`, never blocks).
pub const PLUGIN_CONFIG: &str = r#"{
  "rules": [
    {
      "name": "login",
      "match": {"methods": ["POST"], "path": {"exact": "/login"}},
      "key": ["client_ip"],
      "limit": {"count": 3, "per": "1m"},
      "algorithm": "sliding_window_log",
      "priority": 10
    },
    {
      "name": "api-per-ip",
      "match": {"path": {"prefix": "/api/"}},
      "key": ["client_ip"],
      "limit": {"count": 10, "per": "1s", "burst": 20},
      "algorithm": "token_bucket"
    },
    {
      "name": "global-shadow",
      "scope": "global",
      "limit": {"count": 15, "per": "1s"},
      "algorithm": "sliding_window_counter",
      "action": "shadow"
    }
  ],
  "headers": {"sets": ["ietf", "x_ratelimit"], "on_allowed": true},
  "client_ip": {"trusted_hops": 0}
}"#;

/// [`PLUGIN_CONFIG`] parsed.
pub fn plugin_config() -> Result<Value> {
    Ok(serde_json::from_str(PLUGIN_CONFIG)?)
}

/// The example configuration's parameters: listener 10000, admin 9901,
/// upstream 127.0.0.1:8080, the filter as built by `make wasm` (relative to
/// the repository root, where Envoy should be started).
pub fn example_params() -> ConfigParams {
    ConfigParams {
        admin_port: 9901,
        listen_port: 10000,
        upstream_port: 8080,
        wasm_path: "target/wasm32-wasip1/release/sluice_filter.wasm".to_owned(),
        plugin_config: Some(PLUGIN_CONFIG.to_owned()),
        native_local_ratelimit: false,
        access_log: true,
        quota_port: None,
        hosts: Hosts::loopback(),
        sync_service: false,
        jwks: None,
    }
}

/// The text of `envoy/envoy.yaml`.
pub fn render_example() -> Result<String> {
    example_params().render(
        "# Sluice example: Envoy with the Sluice rate-limit filter and a demo rule set.\n\
         #\n\
         # GENERATED from envoy/sluice-http.template.yaml and the demo rules in\n\
         # tests/src/demo.rs by `make envoy-yaml`: edit those, not this file\n\
         # (the test `example_config_is_rendered_from_template` checks they agree).\n\
         #\n\
         # Run from the repository root after `make setup wasm`, with an HTTP\n\
         # server on 127.0.0.1:8080:\n\
         #   .venv/bin/envoy -c envoy/envoy.yaml\n\
         #   curl -i localhost:10000/api/items\n\
         #   curl -s localhost:9901/stats/prometheus | grep sluice_http\n",
    )
}
