//! The edge's side of the handshake against a "master" sending arbitrary bytes: it must
//! never accept a master that cannot prove it holds the secret.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    assert!(tether_common::hostile::edge_handshake_against(input).is_err());
});
