//! The quota server's access controls in the filter: received on a sync
//! channel (the sync service's `Sync` answers, or an exact-mode `Check`
//! answer), published in Envoy shared data for every VM, and polled by
//! each VM on its tick.
//!
//! Two shared-data names, so that a poll copies 8 bytes, not the lists:
//! [`CONTROLS_KEY`] holds the time the controls were received followed by
//! the encoded `Controls` message; [`CONTROLS_VERSION_KEY`] holds their
//! version and is written after it. A VM reads the lists only when the
//! version it sees changes, and expires each entry its time remaining
//! after the time of receipt (Envoy's wall clock, which every VM shares).

use sluice_core::access::wire::{Synced, WireError};
use sluice_core::access::AccessList;
use sluice_core::store::{SharedBytes, StoreError};
use sluice_core::time::Nanos;
use sluice_proto::prost::Message;
use sluice_proto::quota::v1::{ban_entry, Controls};

/// Shared-data name of the latest controls: the time they were received
/// (nanoseconds since the Unix epoch, 8 bytes little-endian), then the
/// encoded `sluice.quota.v1.Controls`.
pub const CONTROLS_KEY: &str = "sluice/controls";

/// Shared-data name of the latest controls' version (8 bytes
/// little-endian), written after [`CONTROLS_KEY`]: what every VM polls.
pub const CONTROLS_VERSION_KEY: &str = "sluice/controls/version";

/// How often a VM whose policy has synced rules polls for new controls:
/// at most this long after they were published, every VM enforces them.
pub const CONTROLS_TICK_MILLIS: u32 = 100;

/// Largest encoded `Controls` taken (the server's bound is about 6 MiB).
pub const MAX_CONTROLS_BYTES: usize = 8 << 20;

/// Why controls were not taken: the VM keeps enforcing what it had.
#[derive(Debug)]
pub enum ControlsError {
    /// Shared data could not be read or written.
    Shared(StoreError),
    /// The shared value or message is not a `Controls` (or over the bound).
    Decode,
    /// The message holds something the filter cannot enforce.
    Wire(WireError),
}

impl std::fmt::Display for ControlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ControlsError::Shared(e) => write!(f, "access controls not shared: {e}"),
            ControlsError::Decode => f.write_str(
                "access controls unreadable (not a sluice.quota.v1.Controls, or over 8 MiB); \
                 the previous ones stay in force",
            ),
            ControlsError::Wire(e) => write!(f, "{e}; the previous controls stay in force"),
        }
    }
}

/// Makes `controls`, received at `received_at`, the latest for every VM.
pub fn publish(
    shared: &mut impl SharedBytes,
    controls: &Controls,
    received_at: Nanos,
) -> Result<(), ControlsError> {
    let mut value = received_at.get().to_le_bytes().to_vec();
    value.extend(controls.encode_to_vec());
    shared
        .set(CONTROLS_KEY, &value, 0)
        .and_then(|_| shared.set(CONTROLS_VERSION_KEY, &controls.version.to_le_bytes(), 0))
        .map(|_| ())
        .map_err(ControlsError::Shared)
}

/// The controls one VM enforces.
#[derive(Debug, Default)]
pub struct Enforced {
    synced: Synced,
    /// The published version last acted on, so that one is read once.
    seen: Option<u64>,
    /// Whether any list holds a network (then requests need their client IP).
    networks: bool,
}

impl Enforced {
    /// The version in force (0: none received yet).
    pub fn version(&self) -> u64 {
        self.synced.version
    }

    /// Takes `controls`, received at `now`.
    pub fn adopt(&mut self, controls: &Controls, now: Nanos) -> Result<(), ControlsError> {
        self.synced = Synced::from_wire(controls, now).map_err(ControlsError::Wire)?;
        self.networks = !controls.allow.is_empty()
            || !controls.deny.is_empty()
            || controls
                .bans
                .iter()
                .any(|b| matches!(b.target, Some(ban_entry::Target::Cidr(_))));
        Ok(())
    }

    /// Takes the controls published in `shared` if their version changed
    /// since the last poll; true if it took new ones.
    pub fn poll(&mut self, shared: &mut impl SharedBytes) -> Result<bool, ControlsError> {
        let (stamp, stamp_cas) = shared
            .get(CONTROLS_VERSION_KEY)
            .map_err(ControlsError::Shared)?;
        let Some(version) = stamp.as_deref().and_then(le_u64) else {
            return Ok(false);
        };
        if self.seen == Some(version) {
            return Ok(false);
        }
        // Acted on even if unreadable: one warning per version, not per tick.
        self.seen = Some(version);
        if version == self.synced.version {
            // This VM adopted them from its own answer before publishing.
            return Ok(false);
        }
        let (value, _) = shared.get(CONTROLS_KEY).map_err(ControlsError::Shared)?;
        let value = value.unwrap_or_default();
        let (received_at, message) = value
            .split_first_chunk::<8>()
            .ok_or(ControlsError::Decode)?;
        if message.len() > MAX_CONTROLS_BYTES {
            return Err(ControlsError::Decode);
        }
        let controls = Controls::decode(message).map_err(|_| ControlsError::Decode)?;
        if controls.version != version {
            // Two VMs published at once and the version written last is not
            // that of the lists written last. Left so, the sync service would
            // tell the quota server it holds that version and never get its
            // lists: stamp the lists' own (unless someone published since).
            shared
                .set(
                    CONTROLS_VERSION_KEY,
                    &controls.version.to_le_bytes(),
                    stamp_cas,
                )
                .map_err(ControlsError::Shared)?;
            self.seen = Some(controls.version);
        }
        self.adopt(&controls, Nanos(u64::from_le_bytes(*received_at)))?;
        Ok(true)
    }

    /// Whether the lists need a request's client IP.
    pub fn reads_client_ip(&self) -> bool {
        self.networks
    }

    /// Whether no network or key is allowed or refused (the per-request
    /// fast path; expired entries count until [`Enforced::expire`]).
    pub fn is_empty(&self) -> bool {
        self.synced.access.is_empty()
    }

    /// Drops the entries expired at `now`, so that the fast path comes
    /// back once everything has.
    pub fn expire(&mut self, now: Nanos) {
        self.synced.access.purge(now);
        self.synced.unlimited.purge(now);
    }

    /// The allow and deny lists and bans in force.
    pub fn lists(&self) -> &AccessList {
        &self.synced.access
    }

    /// Whether a synced rule's `key` has an unlimited override.
    pub fn is_unlimited(&self, key: &str, now: Nanos) -> bool {
        self.synced.is_unlimited(key, now)
    }
}

/// The version of the controls published in `shared` (0: none, or
/// unreadable: the quota server then sends them again).
pub fn published_version(shared: &impl SharedBytes) -> u64 {
    shared
        .get(CONTROLS_VERSION_KEY)
        .ok()
        .and_then(|(stamp, _)| stamp.as_deref().and_then(le_u64))
        .unwrap_or(0)
}

fn le_u64(bytes: &[u8]) -> Option<u64> {
    bytes.try_into().ok().map(u64::from_le_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_core::store::InProcessShared;
    use sluice_proto::quota::v1::BanEntry;
    use sluice_proto::Duration;

    fn controls(version: u64, banned: &str) -> Controls {
        Controls {
            version,
            bans: vec![BanEntry {
                target: Some(ban_entry::Target::Key(banned.into())),
                remaining: Some(Duration {
                    seconds: 60,
                    nanos: 0,
                }),
            }],
            ..Controls::default()
        }
    }

    #[test]
    fn lists_and_version_published_at_once_by_two_vms_end_up_stamped_alike() {
        let shared = InProcessShared::default();
        let mut backend = &shared;
        let now = Nanos(1_000);
        let (older, newer) = (controls(7, "a"), controls(9, "b"));
        // One VM writes the older lists after another wrote the newer
        // ones, and the newer version last.
        publish(&mut backend, &newer, now).unwrap();
        let mut value = now.get().to_le_bytes().to_vec();
        value.extend(older.encode_to_vec());
        backend.set(CONTROLS_KEY, &value, 0).unwrap();
        assert_eq!(published_version(&backend), 9);
        let mut vm = Enforced::default();
        assert!(vm.poll(&mut backend).unwrap());
        assert_eq!(vm.version(), 7, "the lists in shared data");
        assert_eq!(
            published_version(&backend),
            7,
            "stamped as what they are, so the quota server sends the newer ones again"
        );
        assert!(!vm.poll(&mut backend).unwrap(), "read once");
        let mut other = Enforced::default();
        assert!(other.poll(&mut backend).unwrap());
        assert_eq!(other.version(), 7);
    }
}
