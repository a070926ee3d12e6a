//! Restore windows: a 5-field cron expression for the start and a length. Evaluated in
//! UTC on the time it is given, never the system clock.

use chrono::{DateTime, TimeZone, Utc};
use croner::Cron;

use crate::model::RestoreWindow;

/// A parsed restore window.
#[derive(Debug, Clone)]
pub struct Window {
    cron: Cron,
    length_ms: u64,
}

fn utc(unix_ms: u64) -> Option<DateTime<Utc>> {
    Utc.timestamp_millis_opt(i64::try_from(unix_ms).ok()?)
        .single()
}

impl Window {
    /// Parses a window; the error says what is wrong with the cron expression.
    pub fn new(window: &RestoreWindow) -> Result<Self, String> {
        Ok(Window {
            cron: window.schedule()?,
            length_ms: window.length_s.saturating_mul(1000),
        })
    }

    /// Whether a window is open at `unix_ms`: some start `s` has `s <= t < s + length`.
    pub fn is_open(&self, unix_ms: u64) -> bool {
        let Some(now) = utc(unix_ms) else {
            return false;
        };
        match self.cron.find_previous_occurrence(&now, true) {
            Ok(start) => {
                let start_ms = start.timestamp_millis().max(0) as u64;
                unix_ms < start_ms.saturating_add(self.length_ms)
            }
            Err(_) => false,
        }
    }

    /// The next time at or after `unix_ms` when a window is open (`unix_ms` itself when
    /// one is open now).
    pub fn next_open(&self, unix_ms: u64) -> Option<u64> {
        if self.is_open(unix_ms) {
            return Some(unix_ms);
        }
        let next = self.cron.find_next_occurrence(&utc(unix_ms)?, true).ok()?;
        u64::try_from(next.timestamp_millis()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(start: &str, length_s: u64) -> Window {
        Window::new(&RestoreWindow {
            start: start.into(),
            length_s,
        })
        .unwrap()
    }

    fn at(text: &str) -> u64 {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .timestamp_millis() as u64
    }

    #[test]
    fn open_from_the_start_for_its_length() {
        let w = window("0 2 * * *", 3600);
        assert!(!w.is_open(at("2026-11-22T01:59:59Z")));
        assert!(w.is_open(at("2026-11-22T02:00:00Z")));
        assert!(w.is_open(at("2026-11-22T02:59:59.999Z")));
        assert!(!w.is_open(at("2026-11-22T03:00:00Z")));
        assert!(!w.is_open(at("2026-11-22T14:00:00Z")));
    }

    #[test]
    fn a_window_open_across_midnight() {
        let w = window("30 23 * * *", 3600);
        assert!(w.is_open(at("2026-11-23T00:15:00Z")));
        assert!(!w.is_open(at("2026-11-23T00:30:00Z")));
    }

    #[test]
    fn weekday_windows() {
        // Saturdays only; 2026-11-21 is a Saturday.
        let w = window("0 6 * * 6", 600);
        assert!(w.is_open(at("2026-11-21T06:05:00Z")));
        assert!(!w.is_open(at("2026-11-22T06:05:00Z")));
    }

    #[test]
    fn next_open_is_now_or_the_next_start() {
        let w = window("0 2 * * *", 3600);
        assert_eq!(
            w.next_open(at("2026-11-22T02:10:00Z")),
            Some(at("2026-11-22T02:10:00Z"))
        );
        assert_eq!(
            w.next_open(at("2026-11-22T05:00:00Z")),
            Some(at("2026-11-23T02:00:00Z"))
        );
    }

    #[test]
    fn bad_expressions_are_refused_with_the_reason() {
        for bad in ["0 2 * *", "0 25 * * *", "x 2 * * *", "0 0 2 * * *"] {
            let err = Window::new(&RestoreWindow {
                start: bad.into(),
                length_s: 60,
            })
            .unwrap_err();
            assert!(err.contains("5-field cron"), "{bad}: {err}");
        }
    }
}
