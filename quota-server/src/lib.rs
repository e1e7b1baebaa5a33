//! Sluice's quota server: Envoy's rate limit service over exact
//! distributed counters (in memory or in Redis).
//!
//! Data flows one way, each layer importing only those above it in this
//! list:
//! 1. `config` (the file as written), `metrics` and `auth` (bearer
//!    tokens) import nothing here;
//! 2. `limits` (the validated limits);
//! 3. `storage` (the counter store) and `controls` (access lists, bans,
//!    overrides, audit log);
//! 4. `shared` (the state every API reads), then `source` (the file and
//!    the runtime rules in force);
//! 5. `service` (gRPC), `admin` (HTTP) and `reload` (file watching), which
//!    never import each other; `cli` and `launcher` stand apart.

#![forbid(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod cli;
pub mod config;
pub mod controls;
pub mod launcher;
pub mod limits;
pub mod metrics;
/// Sluice's own gRPC API: the messages of `sluice-proto` and the tonic
/// service generated over them.
#[allow(missing_docs, clippy::all)]
pub mod proto {
    pub use sluice_proto::quota::v1::*;
    tonic::include_proto!("sluice.quota.v1");
}
pub mod reload;
pub mod service;
pub mod shared;
pub mod source;
pub mod storage;
