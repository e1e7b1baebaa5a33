//! What one gRPC request may hold, so that every call is bounded in memory
//! and work whatever a client sends. Beyond these the call is refused with
//! `INVALID_ARGUMENT`, naming the bound; a message over
//! [`MAX_REQUEST_BYTES`] is refused by tonic before it is decoded
//! (`OUT_OF_RANGE`, "decoded message length too large").

use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use tonic::Status;

use crate::proto::{CheckRequest, SyncRequest};

/// Largest encoded request: room for a few descriptors carrying values as
/// large as Envoy's default header limit (60 KiB).
pub const MAX_REQUEST_BYTES: usize = 1 << 20;

/// Most descriptors of a `ShouldRateLimit`, items of a `Check` (all groups
/// together) or entries of a `Sync`.
pub const MAX_UNITS: usize = 128;

/// Most groups of a `Check` (each is one storage call).
pub const MAX_GROUPS: usize = 16;

/// Most entries of one descriptor (deeper than any descriptor tree).
pub const MAX_ENTRIES: usize = 16;

/// Refuses a `ShouldRateLimit` beyond the bounds.
pub fn rate_limit_request(request: &RateLimitRequest) -> Result<(), Status> {
    at_most("descriptors", request.descriptors.len(), MAX_UNITS)?;
    for (i, d) in request.descriptors.iter().enumerate() {
        at_most(
            &format!("entries in descriptor {i}"),
            d.entries.len(),
            MAX_ENTRIES,
        )?;
    }
    Ok(())
}

/// Refuses a `Check` beyond the bounds.
pub fn check_request(request: &CheckRequest) -> Result<(), Status> {
    at_most("groups", request.groups.len(), MAX_GROUPS)?;
    let items = request.groups.iter().map(|g| g.items.len()).sum();
    at_most("items (all groups together)", items, MAX_UNITS)
}

/// Refuses a `Sync` beyond the bounds.
pub fn sync_request(request: &SyncRequest) -> Result<(), Status> {
    at_most("entries", request.entries.len(), MAX_UNITS)
}

fn at_most(what: &str, count: usize, bound: usize) -> Result<(), Status> {
    if count > bound {
        return Err(Status::invalid_argument(format!(
            "{count} {what}: at most {bound} per request; split the request"
        )));
    }
    Ok(())
}
