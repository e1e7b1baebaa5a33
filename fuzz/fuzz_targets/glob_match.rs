//! Matches fuzzer-chosen globs against fuzzer-chosen paths and checks the
//! answer against the reference matcher. The first byte splits the rest into
//! pattern and path; every byte then stands for one character of a small
//! alphabet (wildcards, `/`, a two-byte character), so collisions are common.
//! Sizes stay small enough for the reference's O(n·m) table.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_core::policy::matcher::reference::glob_matches;
use sluice_core::policy::Glob;

const ALPHABET: [char; 5] = ['/', '*', 'a', 'b', 'é'];
const MAX_PATTERN: usize = 64;
const MAX_PATH: usize = 512;

fn decode(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|&b| ALPHABET[usize::from(b) % ALPHABET.len()])
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let (pattern, path) = rest.split_at(usize::from(split).min(rest.len()));
    if pattern.len() > MAX_PATTERN || path.len() > MAX_PATH {
        return;
    }
    let (pattern, path) = (decode(pattern), decode(path));
    assert_eq!(
        Glob::new(&pattern).matches(&path),
        glob_matches(&pattern, &path),
        "pattern {pattern:?}, path {path:?}"
    );
});
