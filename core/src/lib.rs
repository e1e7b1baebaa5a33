//! Sluice's engine: rate-limiting algorithms, the rule and policy model,
//! keyed state with bounded memory, and decisions with their headers.
//!
//! `no_std` + `alloc`: it runs inside Envoy's wasm VMs as well as in the
//! quota server. It never reads a clock; every call takes the time.
#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

extern crate alloc;
#[cfg(any(feature = "std", test))]
extern crate std;

pub mod access;
pub mod algorithm;
pub mod client_ip;
pub mod config;
pub mod decision;
pub mod engine;
pub mod lease;
pub mod policy;
pub mod protocol;
pub mod simulation;
pub mod store;
pub mod text;
pub mod time;
