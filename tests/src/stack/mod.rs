//! The stack: two Envoys (`envoy-a`, `envoy-b`) sharing global limits
//! through one quota server, in front of HTTP, gRPC and WebSocket
//! upstreams, with an optional Redis behind the quota server. Two
//! topologies run it from the same files (`envoy/stack/`):
//! - `envoy/compose.yaml`: containers, with the Envoy configuration
//!   rendered for them into `envoy/stack/envoy.yaml`;
//! - [`local::LocalStack`]: local processes on loopback (`make stack-up`,
//!   `make stack-down`, `make demo`), the same template rendered with the
//!   ports the OS gave.
//!
//! - `files`: the shared configuration files;
//! - `topology`: addresses and the rendering of the Envoy configuration;
//! - `local`: the local processes; `state`: what `stack down` stops;
//! - `children`: starting the processes other than Envoy;
//! - `upstreams`: what the `upstreams` binary prints;
//! - `demo`: the demo's traffic and summary; `ban`: its ban through the
//!   quota server's admin API.

pub mod ban;
mod children;
pub mod demo;
pub mod files;
pub mod local;
pub mod state;
pub mod topology;
pub mod upstreams;
