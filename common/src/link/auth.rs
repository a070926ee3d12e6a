//! The MACs of the edge link's challenge-response, as pure functions.
//!
//! Each MAC covers both nonces, the edge id and the TLS exporter value of this connection
//! (RFC 5705 / RFC 9266 style channel binding), so an answer captured from one connection
//! is worthless on another: a replay meets a fresh master nonce, and a relay (a
//! man-in-the-middle with his own TLS session) meets a different exporter value. The two
//! directions use different labels, so the master's proof cannot be reflected back.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use super::Secret;
use crate::protocol::Nonce;

/// The exporter label (RFC 8446 section 7.5) under which both sides derive the binding.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-tether-edge-link-auth";
/// Length of the exporter value.
pub const EXPORTER_LEN: usize = 32;
/// An exporter value.
pub type Exporter = [u8; EXPORTER_LEN];

const EDGE_LABEL: &[u8] = b"tether edge proof v1";
const MASTER_LABEL: &[u8] = b"tether master proof v1";

/// Inputs shared by both proofs of one handshake.
#[derive(Debug, Clone, Copy)]
pub struct Transcript<'a> {
    /// The master's nonce.
    pub master_nonce: &'a Nonce,
    /// The edge's nonce.
    pub edge_nonce: &'a Nonce,
    /// The edge id.
    pub edge_id: &'a str,
    /// This connection's TLS exporter value.
    pub exporter: &'a Exporter,
}

fn mac_for(secret: &Secret, label: &[u8], transcript: &Transcript<'_>) -> Hmac<Sha256> {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.bytes()).expect("HMAC takes keys of any length");
    mac.update(label);
    mac.update(transcript.master_nonce);
    mac.update(transcript.edge_nonce);
    // Length-prefix the variable-length field so no two transcripts encode alike.
    mac.update(&(transcript.edge_id.len() as u64).to_be_bytes());
    mac.update(transcript.edge_id.as_bytes());
    mac.update(transcript.exporter);
    mac
}

/// The edge's proof that it holds the secret.
pub fn edge_proof(secret: &Secret, transcript: &Transcript<'_>) -> [u8; 32] {
    mac_for(secret, EDGE_LABEL, transcript)
        .finalize()
        .into_bytes()
        .into()
}

/// The master's proof that it holds the secret.
pub fn master_proof(secret: &Secret, transcript: &Transcript<'_>) -> [u8; 32] {
    mac_for(secret, MASTER_LABEL, transcript)
        .finalize()
        .into_bytes()
        .into()
}

/// Checks the edge's proof in constant time.
pub fn verify_edge_proof(secret: &Secret, transcript: &Transcript<'_>, proof: &[u8; 32]) -> bool {
    mac_for(secret, EDGE_LABEL, transcript)
        .verify_slice(proof)
        .is_ok()
}

/// Checks the master's proof in constant time.
pub fn verify_master_proof(secret: &Secret, transcript: &Transcript<'_>, proof: &[u8; 32]) -> bool {
    mac_for(secret, MASTER_LABEL, transcript)
        .verify_slice(proof)
        .is_ok()
}

/// A fresh random nonce.
pub fn new_nonce() -> Nonce {
    let mut nonce = [0u8; crate::protocol::NONCE_LEN];
    rand::Rng::fill(&mut rand::rng(), &mut nonce[..]);
    nonce
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transcript<'a>(m: &'a Nonce, e: &'a Nonce, id: &'a str, x: &'a Exporter) -> Transcript<'a> {
        Transcript {
            master_nonce: m,
            edge_nonce: e,
            edge_id: id,
            exporter: x,
        }
    }

    #[test]
    fn proofs_verify_only_with_the_same_inputs() {
        let secret = Secret::generate();
        let (m, e, x) = (new_nonce(), new_nonce(), [7u8; 32]);
        let t = transcript(&m, &e, "site-1", &x);
        let proof = edge_proof(&secret, &t);
        assert!(verify_edge_proof(&secret, &t, &proof));

        let other_exporter = [8u8; 32];
        assert!(!verify_edge_proof(
            &secret,
            &transcript(&m, &e, "site-1", &other_exporter),
            &proof
        ));
        assert!(!verify_edge_proof(
            &secret,
            &transcript(&new_nonce(), &e, "site-1", &x),
            &proof
        ));
        assert!(!verify_edge_proof(
            &secret,
            &transcript(&m, &e, "site-2", &x),
            &proof
        ));
        assert!(!verify_edge_proof(&Secret::generate(), &t, &proof));
    }

    #[test]
    fn the_edge_proof_is_not_a_master_proof() {
        let secret = Secret::generate();
        let (m, e, x) = (new_nonce(), new_nonce(), [1u8; 32]);
        let t = transcript(&m, &e, "site-1", &x);
        assert!(!verify_master_proof(&secret, &t, &edge_proof(&secret, &t)));
        assert!(verify_master_proof(&secret, &t, &master_proof(&secret, &t)));
    }
}

const GRANT_LABEL: &[u8] = b"tether pair grant v1";

/// The MAC of a site pair's grant for one node, under that node's own secret (which the
/// witness and that node alone hold): a grant a peer passes on cannot be forged or
/// altered by it (an epoch raised to the top would otherwise make the node ignore every
/// real grant).
pub fn grant_proof(
    secret: &Secret,
    location: &str,
    grant: &crate::control::pair::PairGrant,
) -> [u8; 32] {
    grant_mac(secret, location, grant)
        .finalize()
        .into_bytes()
        .into()
}

/// Whether `mac` is `grant`'s proof for the holder of `secret` (in constant time).
pub fn verify_grant_proof(
    secret: &Secret,
    location: &str,
    grant: &crate::control::pair::PairGrant,
    mac: &[u8; 32],
) -> bool {
    grant_mac(secret, location, grant).verify_slice(mac).is_ok()
}

fn grant_mac(
    secret: &Secret,
    location: &str,
    grant: &crate::control::pair::PairGrant,
) -> Hmac<Sha256> {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.bytes()).expect("HMAC takes keys of any length");
    mac.update(GRANT_LABEL);
    mac.update(&(location.len() as u64).to_be_bytes());
    mac.update(location.as_bytes());
    // A grant always encodes: an enum, a string and an integer.
    mac.update(&postcard::to_stdvec(grant).unwrap_or_default());
    mac
}

#[cfg(test)]
mod grant_tests {
    use super::*;
    use crate::control::pair::{PairGrant, PairHolder};
    use crate::identity::{Epoch, NodeId};

    #[test]
    fn a_grant_proof_verifies_for_its_node_location_and_grant_only() {
        let (a, b) = (Secret::generate(), Secret::generate());
        let grant = PairGrant {
            holder: PairHolder::Node(NodeId::new("site-1b")),
            epoch: Epoch(7),
        };
        let mac = grant_proof(&a, "site-1", &grant);
        assert!(verify_grant_proof(&a, "site-1", &grant, &mac));
        assert!(
            !verify_grant_proof(&b, "site-1", &grant, &mac),
            "another node's secret"
        );
        assert!(
            !verify_grant_proof(&a, "site-2", &grant, &mac),
            "another location"
        );
        let raised = PairGrant {
            epoch: Epoch(u64::MAX),
            ..grant.clone()
        };
        assert!(
            !verify_grant_proof(&a, "site-1", &raised, &mac),
            "an altered epoch"
        );
    }
}
