//! The site file parser and checks on arbitrary text: a result or an error naming the file
//! on one line, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    if let Err(err) = tether_common::hostile::parse_site_file(text) {
        let message = err.to_string();
        assert!(
            message.contains("site.toml") && !message.contains('\n'),
            "{message}"
        );
    }
});
