//! Who does what among several masters, by rendezvous (highest random weight) hashing:
//! every master and edge that knows the same live masters computes the same answer
//! without asking anyone, and when a master is lost only what it had moves.
//!
//! - An edge tries the masters in [`rendezvous_order`] of its id, so edges spread over
//!   the masters and each moves to its next one when its first fails.
//! - An edge whose link no master holds is failed over by [`rendezvous_pick`] of its id
//!   among the live masters: exactly one decides.
//! - A system of no edge is placed by [`place_sticky`]: on its current master while that
//!   one is alive (a master that comes back takes nothing back by itself), else by hash.

use sha2::{Digest, Sha256};

/// The weight of `candidate` for `key`: the first eight bytes of SHA-256 over both, with
/// a separator so that ("ab", "c") and ("a", "bc") differ.
fn weight(key: &str, candidate: &str) -> u64 {
    let mut hash = Sha256::new();
    hash.update(key.as_bytes());
    hash.update([0]);
    hash.update(candidate.as_bytes());
    let digest = hash.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// `candidates` ordered by their weight for `key`, heaviest first (ties, which SHA-256
/// makes vanishingly rare, by name).
pub fn rendezvous_order<'a, S: AsRef<str>>(key: &str, candidates: &'a [S]) -> Vec<&'a S> {
    let mut weighed: Vec<(u64, &S)> = candidates
        .iter()
        .map(|c| (weight(key, c.as_ref()), c))
        .collect();
    weighed.sort_by(|(wa, a), (wb, b)| wb.cmp(wa).then_with(|| a.as_ref().cmp(b.as_ref())));
    weighed.into_iter().map(|(_, c)| c).collect()
}

/// The one candidate `key` goes to, if there is any: the first of [`rendezvous_order`],
/// with one hash per candidate (thousands of units ask at every change of the cluster).
pub fn rendezvous_pick<'a, S: AsRef<str>>(key: &str, candidates: &'a [S]) -> Option<&'a S> {
    candidates
        .iter()
        .map(|c| (weight(key, c.as_ref()), c))
        .max_by(|(wa, a), (wb, b)| wa.cmp(wb).then_with(|| b.as_ref().cmp(a.as_ref())))
        .map(|(_, c)| c)
}

/// Where a unit of no edge runs: on `current` while it is among the `live`, else on the
/// live master the hash picks.
pub fn place_sticky<'a, S: AsRef<str>>(
    key: &str,
    current: Option<&str>,
    live: &'a [S],
) -> Option<&'a S> {
    current
        .and_then(|holder| live.iter().find(|m| m.as_ref() == holder))
        .or_else(|| rendezvous_pick(key, live))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn masters(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("m{i}")).collect()
    }

    #[test]
    fn every_side_computes_the_same_order_whatever_order_it_lists_the_masters_in() {
        let listed = masters(5);
        let mut reversed = listed.clone();
        reversed.reverse();
        for edge in ["site-1", "site-2", "plant", ""] {
            assert_eq!(
                rendezvous_order(edge, &listed),
                rendezvous_order(edge, &reversed)
                    .into_iter()
                    .collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn the_pick_is_the_first_of_the_order() {
        let listed = masters(4);
        for i in 0..500 {
            let key = format!("edge-{i}");
            assert_eq!(
                rendezvous_pick(&key, &listed),
                rendezvous_order(&key, &listed).first().copied()
            );
        }
    }

    #[test]
    fn edges_spread_evenly_over_the_masters() {
        let three = masters(3);
        let mut count: HashMap<&String, usize> = HashMap::new();
        for i in 0..3000 {
            *count
                .entry(rendezvous_pick(&format!("site-{i}"), &three).unwrap())
                .or_default() += 1;
        }
        for (master, n) in count {
            assert!((850..=1150).contains(&n), "{master} got {n} of 3000");
        }
    }

    #[test]
    fn losing_a_master_moves_only_what_it_had() {
        let three = masters(3);
        let two: Vec<String> = three.iter().filter(|m| *m != "m2").cloned().collect();
        let mut moved = 0;
        for i in 0..1000 {
            let key = format!("site-{i}");
            let before = rendezvous_pick(&key, &three).unwrap();
            let after = rendezvous_pick(&key, &two).unwrap();
            if before != "m2" {
                assert_eq!(before, after, "{key} moved though its master lives");
            } else {
                moved += 1;
                // It goes to its second choice: the one edges would try next.
                assert_eq!(after, rendezvous_order(&key, &three)[1]);
            }
        }
        assert!(moved > 250, "m2 had a third of the keys: {moved}");
    }

    #[test]
    fn a_placed_unit_stays_with_a_live_holder_and_moves_only_when_it_is_lost() {
        let three = masters(3);
        let hashed = rendezvous_pick("room", &three).unwrap().clone();
        let other = three.iter().find(|m| **m != hashed).unwrap();
        // Sticky: a master that comes back (the hash's choice) takes nothing back.
        assert_eq!(place_sticky("room", Some(other), &three), Some(other));
        let without: Vec<String> = three.iter().filter(|m| *m != other).cloned().collect();
        assert_eq!(
            place_sticky("room", Some(other), &without),
            rendezvous_pick("room", &without)
        );
        assert_eq!(place_sticky("room", None, &[] as &[String]), None);
    }
}
