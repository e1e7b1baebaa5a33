//! Sluice's quota server: Envoy's rate limit service over exact
//! distributed counters (in memory or in Redis).

pub mod admin;
pub mod cli;
pub mod config;
pub mod limits;
pub mod metrics;
/// Sluice's own gRPC API, generated from `proto/sluice/quota/v1/quota.proto`.
#[allow(missing_docs, clippy::all)]
pub mod proto {
    tonic::include_proto!("sluice.quota.v1");
}
pub mod reload;
pub mod service;
pub mod storage;
