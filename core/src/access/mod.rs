//! Who may bypass or is refused limits: CIDR allow and deny lists,
//! temporary bans and per-key overrides, each bounded in size and each
//! entry optionally expiring. Pure data: callers pass the time in.
//!
//! [`wire`] carries them from the quota server to every Envoy's filter.
//!
//! Precedence, simplest to reason about: a deny entry or a ban always
//! wins, even over a narrower allow entry inside the denied range, and
//! across lists ([`judge`]: a configuration's own and the quota server's).

mod bounded;
mod cidr;
mod list;
mod overrides;
#[cfg(feature = "wire")]
pub mod wire;

pub use bounded::{Expiring, Full};
pub use cidr::{Cidr, CidrError};
pub use list::{judge, Access, AccessList, Ban, BanTarget, ListEntry, ListKind};
pub use overrides::{AuditAction, AuditEvent, Grant, Override, Overrides};
