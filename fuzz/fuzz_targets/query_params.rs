//! Reads fuzzer-chosen query strings as rules do: finding a parameter and
//! decoding it must never panic, and the text a parameter is keyed by
//! (`canonical`) must be the text it matches (`canonical_eq`). The first
//! byte splits the rest into a query and a parameter name.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_core::policy::query::{canonical, canonical_eq, find};

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let at = usize::from(split).min(text.len());
    let Some((query, name)) = text.get(..at).zip(text.get(at..)) else {
        return;
    };
    for pair in query.split('&') {
        let raw_name = pair.split_once('=').map_or(pair, |(n, _)| n);
        let decoded = canonical(raw_name);
        assert!(
            canonical_eq(raw_name, &decoded),
            "{raw_name:?} vs {decoded:?}"
        );
        // Some parameter of that name exists, so finding it succeeds.
        assert!(find(query, &decoded).is_some(), "{query:?} has {decoded:?}");
    }
    if let Some(raw) = find(query, name) {
        assert!(canonical_eq(raw, &canonical(raw)), "{raw:?}");
    }
});
