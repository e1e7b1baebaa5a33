//! Feeds arbitrary bytes to the lease cell and demand message decoders
//! (values other VMs wrote in shared data), then drives a decoded cell
//! through workers' and the service's operations, checking that no half
//! ever admits more than it was granted once it served from a fresh lease,
//! and that every cell written reads back the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_core::lease::cell::{Cell, Grant, Take, VALUE_BYTES};
use sluice_core::lease::demand;
use sluice_core::time::{Nanos, Span};

/// A little-endian number from up to 8 bytes of `data`, advancing it.
fn number(data: &mut &[u8], bytes: usize) -> u64 {
    let (head, rest) = data.split_at(bytes.min(data.len()));
    *data = rest;
    head.iter().rev().fold(0, |n, &b| (n << 8) | u64::from(b))
}

fuzz_target!(|input: &[u8]| {
    if let Some((rule, key)) = demand::decode(input) {
        assert_eq!(demand::encode(rule, key).as_deref(), Some(input));
    }
    let (value, mut ops) = input.split_at(VALUE_BYTES.min(input.len()));
    let mut cell = Cell::decode(value).unwrap_or_default();
    // Halves installed here start honest: only their counts are checked.
    let mut fresh = [false; 2];
    let mut out = Vec::new();
    while !ops.is_empty() {
        let op = number(&mut ops, 1);
        let half = usize::from(op & 0x10 != 0);
        let now = Nanos(number(&mut ops, 2) * 1_000_000);
        match op % 5 {
            0 => {
                let cost = number(&mut ops, 1);
                if let Take::Taken(taken) = cell.take(cost, now) {
                    let h = cell.halves[taken.half];
                    assert!(h.open && now < h.expires_at || cost == 0);
                    if fresh[taken.half] {
                        assert!(h.used <= h.granted, "{h:?}");
                    }
                    if op & 0x20 != 0 {
                        cell.give_back(&taken);
                    }
                }
            }
            1 => {
                let retired = cell.retire(half);
                assert!(retired.used <= retired.held);
                assert_eq!(
                    cell.halves[half].room(now),
                    0,
                    "a retired half serves no more"
                );
            }
            2 => {
                cell.retire(half);
                let grant = Grant {
                    permits: number(&mut ops, 2),
                    expires_at: Nanos(number(&mut ops, 2) * 1_000_000),
                    remaining: number(&mut ops, 2),
                    limit: number(&mut ops, 2),
                    window: Span::from_secs(60),
                    reset_at: Nanos(number(&mut ops, 2) * 1_000_000),
                };
                cell.install(half, &grant);
                fresh[half] = true;
            }
            3 => {
                cell.clear(half);
                fresh[half] = true;
            }
            _ => {
                let owner = number(&mut ops, 8);
                cell = Cell::fresh(owner, Some(&cell));
                fresh = [true; 2];
            }
        }
        cell.encode(&mut out);
        assert_eq!(out.len(), VALUE_BYTES);
        assert_eq!(Cell::decode(&out), Some(cell));
    }
});
