//! Who may bypass or is refused limits: CIDR allow and deny lists,
//! temporary bans and per-key overrides, each bounded in size and each
//! entry optionally expiring. Pure data: callers pass the time in.
//!
//! Precedence, simplest to reason about: a deny entry or a ban always
//! wins, even over a narrower allow entry inside the denied range.

mod bounded;
mod cidr;
mod list;
mod overrides;

pub use bounded::{Expiring, Full};
pub use cidr::{Cidr, CidrError};
pub use list::{Access, AccessList, Ban, BanTarget, ListEntry, ListKind};
pub use overrides::{AuditAction, AuditEvent, Grant, Override, Overrides};
