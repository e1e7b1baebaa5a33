//! Sluice's Envoy filter: rate limiting inside Envoy as a proxy-wasm module.
//!
//! The logic ([`plugin`], [`http`]) talks to Envoy only through the
//! [`host::Host`] trait, so it is unit-tested natively against a double;
//! [`sync_service`] is the singleton that syncs leased rules' leases; the
//! `wasm` module is the thin proxy-wasm glue that Envoy loads.

// "Never panics" rests on these: an index out of bounds or an overflow
// would abort the worker's VM.
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]
// Only the raw host calls in `wasm::abi` may be unsafe.
#![deny(unsafe_code)]

/// Counts heap allocations in the unit tests that pin them.
#[cfg(test)]
#[global_allocator]
static ALLOCATOR: sluice_alloc_count::Counting = sluice_alloc_count::Counting;

pub mod controls;
pub mod host;
pub mod http;
pub mod metrics;
pub mod plugin;
pub mod quota;
pub mod stream;
pub mod sync_service;

#[cfg(target_arch = "wasm32")]
mod wasm;
