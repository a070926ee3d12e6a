//! A master's presence lease as the master itself can know it, for self-fencing.
//!
//! etcd counts a lease's time to live from when it handled the last keep-alive. The master
//! cannot see that moment, but it came after the master *sent* the keep-alive; so the lease
//! cannot expire in etcd before `sent + ttl`. The master runs its units only until
//! `sent + ttl - margin` on its own monotonic clock (the margin covers the two clocks
//! running at slightly different rates), so a master cut off from etcd has stopped every
//! unit before the lease can have expired, and before any other master may start them.

use super::clock::Mono;

/// The part of the time to live kept as a margin against clock rates, at least
/// [`MIN_MARGIN_MS`].
pub const MARGIN_DIVISOR: u64 = 10;
/// The smallest margin.
pub const MIN_MARGIN_MS: u64 = 200;
/// Keep-alives per time to live: one missed keep-alive still leaves two chances.
pub const KEEP_ALIVES_PER_TTL: u64 = 3;

/// Until when this master may act on its lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseClock {
    ttl_ms: u64,
    /// The end of the time this master may act, from its last answered keep-alive.
    held_until: Option<Mono>,
}

impl LeaseClock {
    /// A lease of `ttl_ms`, not yet granted.
    pub fn new(ttl_ms: u64) -> Self {
        LeaseClock {
            ttl_ms,
            held_until: None,
        }
    }

    /// The margin kept before the earliest moment etcd may expire the lease.
    pub fn margin_ms(&self) -> u64 {
        (self.ttl_ms / MARGIN_DIVISOR).max(MIN_MARGIN_MS)
    }

    /// How often to send a keep-alive.
    pub fn keep_alive_every_ms(&self) -> u64 {
        (self.ttl_ms / KEEP_ALIVES_PER_TTL).max(1)
    }

    /// etcd granted or renewed the lease, for `ttl_ms` (what it answered), in answer to a
    /// request sent at `sent`. An answer that arrives late, after a later one, changes
    /// nothing: the time held never moves back.
    pub fn renewed(&mut self, sent: Mono, ttl_ms: u64) {
        let until = sent.plus(ttl_ms.saturating_sub(self.margin_ms()));
        if self.held_until.is_none_or(|held| until > held) {
            self.held_until = Some(until);
        }
    }

    /// etcd said the lease is gone (expired or revoked): nothing is held from now on.
    pub fn lost(&mut self) {
        self.held_until = None;
    }

    /// Whether the master may act on the lease at `now`.
    pub fn held(&self, now: Mono) -> bool {
        self.held_until.is_some_and(|until| now < until)
    }

    /// The moment the master must have stopped its units by, if it holds the lease.
    pub fn held_until(&self) -> Option<Mono> {
        self.held_until
    }

    /// The moment the master must begin stopping its units, when stopping them takes up
    /// to `stop_ms` (a module's stop deadline): they are stopped by [`held_until`].
    ///
    /// [`held_until`]: Self::held_until
    pub fn stop_from(&self, stop_ms: u64) -> Option<Mono> {
        self.held_until.map(|until| begin_stopping(until, stop_ms))
    }
}

/// The two clocks read together: the monotonic clock, which stops while the machine is
/// suspended (a paused VM, a laptop asleep), and the boot clock, which does not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockPair {
    /// Monotonic milliseconds.
    pub mono_ms: u64,
    /// Milliseconds since boot, suspended time included.
    pub boot_ms: u64,
}

/// How long the machine was away between two reads beyond what the monotonic clock
/// counted. A lease is counted on the monotonic clock, so after a suspend longer than its
/// margin the master would believe a lease held that etcd has expired meanwhile (and a
/// survivor may have started its units): such a lease must be taken as lost at once.
pub fn unseen_ms(before: ClockPair, after: ClockPair) -> u64 {
    let boot = after.boot_ms.saturating_sub(before.boot_ms);
    let mono = after.mono_ms.saturating_sub(before.mono_ms);
    boot.saturating_sub(mono)
}

/// When to begin stopping, for units that must be stopped by `until` and take up to
/// `stop_ms` to stop.
pub fn begin_stopping(until: Mono, stop_ms: u64) -> Mono {
    Mono(until.0.saturating_sub(stop_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lease_is_held_until_before_etcd_can_expire_it() {
        let mut clock = LeaseClock::new(5000);
        assert!(!clock.held(Mono(0)), "nothing is held before a grant");
        // Sent at 1000, answered (etcd handled it somewhere in between).
        clock.renewed(Mono(1000), 5000);
        assert_eq!(clock.margin_ms(), 500);
        assert!(clock.held(Mono(5499)));
        assert!(
            !clock.held(Mono(5500)),
            "stopped before 6000, the earliest expiry"
        );
        // A late answer to an older keep-alive does not move the end back.
        clock.renewed(Mono(2000), 5000);
        clock.renewed(Mono(1500), 5000);
        assert_eq!(clock.held_until(), Some(Mono(6500)));
        assert_eq!(clock.stop_from(3000), Some(Mono(3500)));
        clock.lost();
        assert!(!clock.held(Mono(2001)));
        assert_eq!(clock.stop_from(3000), None);
    }

    #[test]
    fn a_short_lease_keeps_the_smallest_margin() {
        let clock = LeaseClock::new(1000);
        assert_eq!(clock.margin_ms(), MIN_MARGIN_MS);
        assert_eq!(clock.keep_alive_every_ms(), 333);
    }

    #[test]
    fn a_suspend_is_the_boot_clock_running_ahead_of_the_monotonic_one() {
        let before = ClockPair {
            mono_ms: 1_000,
            boot_ms: 5_000,
        };
        let running = ClockPair {
            mono_ms: 1_100,
            boot_ms: 5_100,
        };
        assert_eq!(unseen_ms(before, running), 0);
        let after_a_pause = ClockPair {
            mono_ms: 1_100,
            boot_ms: 65_100,
        };
        assert_eq!(unseen_ms(before, after_a_pause), 60_000);
    }
}
