//! The edge link's frame decoder on arbitrary bytes (twin: `common/tests/hostile.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let (frames, _) = tether_common::hostile::decode_frames(input, 16 * 1024 * 1024);
    assert!(frames.len() <= input.len() / 5);
});
