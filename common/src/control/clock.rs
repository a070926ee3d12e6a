//! Time as the control core sees it: a monotonic clock for everything that measures an
//! interval (failure detection, timeouts, waits, retries), and the wall clock only for
//! what people read or write in calendar terms (audit records, restore windows). A step of
//! the system clock, by an operator or NTP, then neither causes nor delays a takeover.

use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// A point on the monotonic clock, in milliseconds since an arbitrary origin (the first
/// reading in this process). Only differences mean anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Mono(pub u64);

impl Mono {
    /// This point plus `ms`.
    pub fn plus(self, ms: u64) -> Mono {
        Mono(self.0.saturating_add(ms))
    }

    /// Milliseconds from `earlier` to this point (0 when `earlier` is later).
    pub fn since(self, earlier: Mono) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

/// A moment as the control core is handed it: both clocks read together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// The monotonic clock, for intervals.
    pub mono: Mono,
    /// Unix time in milliseconds, for audit records and restore windows only.
    pub wall_ms: u64,
}

impl Now {
    /// Both clocks of this process, now.
    pub fn system() -> Now {
        Now {
            mono: mono_now(),
            wall_ms: wall_now_ms(),
        }
    }

    /// The monotonic point at which the wall clock will read `wall_ms`, if it is not
    /// stepped meanwhile (a wall-clock deadline, such as a restore window, turned into a
    /// poll time; a step only moves when the window is looked at again).
    pub fn mono_at_wall(&self, wall_ms: u64) -> Mono {
        self.mono.plus(wall_ms.saturating_sub(self.wall_ms))
    }
}

/// The monotonic clock of this process.
pub fn mono_now() -> Mono {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    Mono(Instant::now().duration_since(origin).as_millis() as u64)
}

/// Unix time in milliseconds (the wall clock), for records people read.
pub fn wall_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
