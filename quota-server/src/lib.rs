//! Sluice's quota server: Envoy's rate limit service over exact
//! distributed counters (in memory or in Redis).

pub mod config;
pub mod limits;
pub mod service;
pub mod storage;
