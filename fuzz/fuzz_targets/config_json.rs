//! Feeds arbitrary text to the JSON config loader and validates what it
//! reads (match conditions nested in `not`, key chains, ...): it must
//! return an error or a policy, never panic, however malformed or hostile
//! the document.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(config) = sluice_core::config::Config::from_json(text) {
            let _ = config.validate();
        }
    }
});
