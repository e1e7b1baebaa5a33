//! Feeds arbitrary text to the JSON config loader: it must return an error,
//! never panic, however malformed or hostile the document.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = sluice_core::config::Config::from_json(text);
    }
});
