//! The property-test twins of the fuzz targets in `fuzz/`: the same entry points
//! (`tether_common::hostile`) under random and mutated input in every `cargo test`.
//! Each property says what must hold, not only "no panic": the decoder never yields a
//! frame from bytes that do not hold one, a handshake never accepts a peer that does not
//! know the secret and the fresh nonce, and a broken site file is an error that names it.

use bytes::BytesMut;
use proptest::prelude::*;
use tether_common::hostile::{
    EDGE_ID, decode_frames, edge_handshake_against, master_handshake_against, parse_site_file,
};
use tether_common::link::AuthError;
use tether_common::protocol::{
    Envelope, FrameCodec, HANDSHAKE_MAX_FRAME, Handshake, PROTOCOL_VERSION,
};
use tokio_util::codec::Encoder;

/// Cases per property (proptest's default is 256).
const CASES: u32 = 10_000;

fn frame<T: serde::Serialize>(max: usize, value: &T) -> Vec<u8> {
    let mut out = BytesMut::new();
    FrameCodec::<T>::new(max).encode(value, &mut out).unwrap();
    out.to_vec()
}

fn ping(sent_us: u64) -> Envelope {
    Envelope::Ping {
        sent_us,
        seq: sent_us,
    }
}

/// The example site file, a valid one to mutate.
fn example_site() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/examples/site.toml");
    std::fs::read_to_string(path).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn random_bytes_decode_to_nothing_or_an_error(input in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let (frames, _) = decode_frames(&input, 16 * 1024 * 1024);
        // A frame needs at least its 4-byte length and one byte of envelope.
        prop_assert!(frames.len() <= input.len() / 5);
    }

    #[test]
    fn good_frames_before_garbage_are_decoded_first(
        stamps in proptest::collection::vec(any::<u64>(), 1..8),
        garbage in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let mut input = Vec::new();
        for stamp in &stamps {
            input.extend(frame(1 << 20, &ping(*stamp)));
        }
        input.extend(&garbage);
        let (frames, _) = decode_frames(&input, 1 << 20);
        prop_assert!(frames.len() >= stamps.len());
        for (frame, stamp) in frames.iter().zip(&stamps) {
            prop_assert_eq!(frame, &ping(*stamp));
        }
    }

    #[test]
    fn a_flipped_bit_never_panics_the_decoder(stamp in any::<u64>(), bit in 0usize..128) {
        let mut input = frame(1 << 20, &ping(stamp));
        let bit = bit % (input.len() * 8);
        input[bit / 8] ^= 1 << (bit % 8);
        let _ = decode_frames(&input, 1 << 20);
    }

    #[test]
    fn the_master_never_accepts_random_bytes(input in proptest::collection::vec(any::<u8>(), 0..1024)) {
        prop_assert!(master_handshake_against(&input).is_err());
    }

    #[test]
    fn the_master_refuses_a_well_formed_answer_with_a_guessed_mac(
        nonce in any::<[u8; 32]>(),
        mac in any::<[u8; 32]>(),
        known in any::<bool>(),
    ) {
        let edge_id = if known { EDGE_ID.to_string() } else { "site-9".to_string() };
        let answer = Handshake::Answer { protocol: PROTOCOL_VERSION, edge_id: edge_id.clone(), nonce, mac };
        match master_handshake_against(&frame(HANDSHAKE_MAX_FRAME, &answer)) {
            Err(AuthError::BadEdgeProof(id)) => prop_assert!(known && id == edge_id),
            Err(AuthError::UnknownEdge(id)) => prop_assert!(!known && id == edge_id),
            other => prop_assert!(false, "{other:?}"),
        }
    }

    #[test]
    fn the_edge_never_accepts_random_bytes(input in proptest::collection::vec(any::<u8>(), 0..1024)) {
        prop_assert!(edge_handshake_against(&input).is_err());
    }

    #[test]
    fn the_edge_refuses_a_master_that_guesses_its_proof(nonce in any::<[u8; 32]>(), mac in any::<[u8; 32]>()) {
        let mut input = frame(HANDSHAKE_MAX_FRAME, &Handshake::Challenge { protocol: PROTOCOL_VERSION, nonce });
        input.extend(frame(HANDSHAKE_MAX_FRAME, &Handshake::Accepted { mac }));
        prop_assert!(matches!(edge_handshake_against(&input), Err(AuthError::BadMasterProof)));
    }

    #[test]
    fn random_text_is_no_site_file(text in ".{0,400}") {
        if let Err(err) = parse_site_file(&text) {
            prop_assert!(err.to_string().contains("site.toml"), "{err}");
        }
    }

    #[test]
    fn a_mutated_site_file_loads_or_says_why(at in any::<prop::sample::Index>(), with in any::<u8>(), cut in any::<bool>()) {
        let mut bytes = example_site().into_bytes();
        let at = at.index(bytes.len());
        if cut {
            bytes.truncate(at);
        } else {
            bytes[at] = with;
        }
        let text = String::from_utf8_lossy(&bytes);
        if let Err(err) = parse_site_file(&text) {
            let message = err.to_string();
            prop_assert!(message.contains("site.toml") && !message.contains('\n'), "{message}");
        }
    }
}

#[test]
fn the_example_site_file_is_accepted() {
    let site = parse_site_file(&example_site()).unwrap();
    assert!(!site.edges.is_empty());
}
