//! Collector arrays (DESIGN.md, "Site pairs and collector arrays"; VOLTTRON's driver
//! failover array, with its open items done): a driver that declares
//! `shared_polling = true` has its `schedule_every` polls split over the live nodes of its
//! location. With n live nodes, the node of rank r (its place among the live nodes, in the
//! location's order) polls every n × interval, at offset r × interval in that period (that
//! is r × period / n): the device is read once an interval in all, by each node in turn,
//! evenly spaced. (DESIGN.md writes the offset as r × interval / n with the interval
//! meaning a node's own period; spaced by the schedule's interval instead, two nodes
//! would read at 0 and interval / 2 and then wait 1.5 intervals.)
//!
//! The phase is the wall clock's (milliseconds since the Unix epoch), which the nodes of a
//! site share through NTP: each node computes its own times with nothing to agree on but
//! who is live. A node lost or added changes n and the ranks; every node's next poll is
//! then within one interval. With two nodes no gap between two reads exceeds two
//! intervals, however late a loss is noticed: the survivor keeps its own turns meanwhile.

use super::NodeId;

/// A node's turn in its location's array.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// Its rank among the live nodes (0 first).
    pub rank: u64,
    /// How many are live.
    pub of: u64,
}

/// `me`'s turn among `live` (in the location's order); `None` when `me` is not live.
pub fn slot(live: &[NodeId], me: &NodeId) -> Option<Slot> {
    let rank = live.iter().position(|node| node == me)?;
    Some(Slot {
        rank: rank as u64,
        of: live.len() as u64,
    })
}

/// The first time at or after `now_ms` at which the node of `slot` polls, every
/// `interval_ms` in all: its period is n × interval and its offset in it r × interval
/// (r × period / n), so that the n nodes read in turn, evenly, once an interval.
pub fn next_poll(slot: Slot, interval_ms: u64, now_ms: u64) -> u64 {
    let of = slot.of.max(1);
    let interval = interval_ms.max(1);
    let period = interval.saturating_mul(of);
    let offset = (slot.rank % of) * interval;
    let periods = now_ms.saturating_sub(offset).div_ceil(period);
    offset + periods * period
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(ids: &[&str]) -> Vec<NodeId> {
        ids.iter().map(|id| NodeId::new(*id)).collect()
    }

    /// Every read of the device between `from` and `to`, with who made it.
    fn reads(live: &[NodeId], interval: u64, from: u64, to: u64) -> Vec<(u64, NodeId)> {
        let mut all = Vec::new();
        for node in live {
            let slot = slot(live, node).unwrap();
            let mut at = next_poll(slot, interval, from);
            while at < to {
                all.push((at, node.clone()));
                at = next_poll(slot, interval, at + 1);
            }
        }
        all.sort();
        all
    }

    #[test]
    fn two_nodes_take_turns_once_an_interval_in_all() {
        let live = nodes(&["site-1a", "site-1b"]);
        let read = reads(&live, 1_000, 10_000, 20_000);
        assert_eq!(read.len(), 10, "{read:?}");
        for pair in read.windows(2) {
            assert_eq!(pair[1].0 - pair[0].0, 1_000, "{read:?}");
            assert_ne!(pair[1].1, pair[0].1, "they alternate: {read:?}");
        }
    }

    #[test]
    fn three_nodes_poll_every_third_interval_each() {
        let live = nodes(&["a", "b", "c"]);
        let read = reads(&live, 900, 0, 9_000);
        assert_eq!(read.len(), 10);
        assert!(read.windows(2).all(|p| p[1].0 - p[0].0 == 900), "{read:?}");
        let by_b: Vec<u64> = read
            .iter()
            .filter(|(_, n)| n == "b")
            .map(|(t, _)| *t)
            .collect();
        assert!(by_b.windows(2).all(|p| p[1] - p[0] == 2_700), "{by_b:?}");
    }

    /// One of two lost: the survivor reads every interval from its next poll on, which
    /// is within one interval of the loss; no gap exceeds two intervals, however late
    /// the loss is noticed. Added back: they take turns again.
    #[test]
    fn a_node_lost_or_added_reschedules_within_an_interval() {
        let interval = 1_000;
        let both = nodes(&["site-1a", "site-1b"]);
        let alone = nodes(&["site-1a"]);
        // b dies at 5_100 (its last read before), the loss is noticed at 8_300.
        let died = 5_100;
        let noticed = 8_300;
        let mut read: Vec<u64> = reads(&both, interval, 0, died)
            .into_iter()
            .map(|(t, _)| t)
            .collect();
        // Until noticed, a keeps its own turns of two.
        read.extend(
            reads(&both, interval, died, noticed)
                .into_iter()
                .filter(|(_, n)| n == "site-1a")
                .map(|(t, _)| t),
        );
        let first_alone = next_poll(slot(&alone, &alone[0]).unwrap(), interval, noticed);
        assert!(first_alone - noticed <= interval, "{first_alone}");
        read.extend(
            reads(&alone, interval, noticed, 12_000)
                .into_iter()
                .map(|(t, _)| t),
        );
        read.sort();
        let gaps: Vec<u64> = read.windows(2).map(|p| p[1] - p[0]).collect();
        assert!(gaps.iter().all(|g| *g <= 2 * interval), "{read:?}");
        // Back: turns again, from the next poll of each.
        let again = reads(&both, interval, 12_000, 16_000);
        assert!(again.windows(2).all(|p| p[1].1 != p[0].1), "{again:?}");
    }

    #[test]
    fn a_node_not_live_has_no_turn() {
        assert_eq!(slot(&nodes(&["a"]), &NodeId::new("b")), None);
    }
}
