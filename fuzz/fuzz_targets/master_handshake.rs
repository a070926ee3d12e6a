//! The master's side of the handshake against a peer sending arbitrary bytes: it must
//! never accept (the peer cannot know the fresh nonce's MAC).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    assert!(tether_common::hostile::master_handshake_against(input).is_err());
});
