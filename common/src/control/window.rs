//! Restore windows: a 5-field cron expression for the start and a length, read in the
//! edge location's time zone (operators write "2 am" in the building's local time), on
//! the time it is given, never the system clock.
//!
//! Across a change of daylight saving time the start keeps its local time: a window at
//! 02:00 opens at 02:00 on the clock on the wall, winter and summer. On the night the
//! clocks go forward an hour that does not exist is skipped (a 02:30 start opens at
//! 03:00, the gap's end); on the night they go back, a time that happens twice opens the
//! window once, at its first.

use chrono::{DateTime, TimeZone};
use chrono_tz::Tz;
use croner::Cron;

use crate::model::RestoreWindow;

/// A parsed restore window.
#[derive(Debug, Clone)]
pub struct Window {
    cron: Cron,
    length_ms: u64,
    zone: Tz,
}

impl Window {
    /// Parses a window read in `time_zone` (an IANA name; UTC when none); the error says
    /// what is wrong with the cron expression or the zone.
    pub fn new(window: &RestoreWindow, time_zone: Option<&str>) -> Result<Self, String> {
        let zone = match time_zone {
            Some(name) => tether_config::parse_time_zone(name)?,
            None => Tz::UTC,
        };
        Ok(Window {
            cron: window.schedule()?,
            length_ms: window.length_s.saturating_mul(1000),
            zone,
        })
    }

    /// `unix_ms` on the zone's clock.
    fn local(&self, unix_ms: u64) -> Option<DateTime<Tz>> {
        self.zone
            .timestamp_millis_opt(i64::try_from(unix_ms).ok()?)
            .single()
    }

    /// Whether a window is open at `unix_ms`: some start `s` has `s <= t < s + length`.
    pub fn is_open(&self, unix_ms: u64) -> bool {
        let Some(now) = self.local(unix_ms) else {
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
        let next = self
            .cron
            .find_next_occurrence(&self.local(unix_ms)?, true)
            .ok()?;
        u64::try_from(next.timestamp_millis()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(start: &str, length_s: u64) -> Window {
        zoned(start, length_s, None)
    }

    fn zoned(start: &str, length_s: u64, zone: Option<&str>) -> Window {
        Window::new(
            &RestoreWindow {
                start: start.into(),
                length_s,
            },
            zone,
        )
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
            let err = Window::new(
                &RestoreWindow {
                    start: bad.into(),
                    length_s: 60,
                },
                None,
            )
            .unwrap_err();
            assert!(err.contains("5-field cron"), "{bad}: {err}");
        }
    }

    /// A window at 02:00 in Europe/Amsterdam opens at 02:00 on the wall, winter (UTC+1)
    /// and summer (UTC+2), and on the two nights the clocks change.
    #[test]
    fn a_window_in_amsterdam_opens_at_local_two_across_daylight_saving_changes() {
        let w = zoned("0 2 * * *", 3600, Some("Europe/Amsterdam"));
        // Winter: 02:00 CET is 01:00Z.
        assert!(!w.is_open(at("2027-03-27T00:59:59Z")));
        assert!(w.is_open(at("2027-03-27T01:00:00Z")));
        assert!(!w.is_open(at("2027-03-27T02:00:00Z")));
        // The night the clocks go forward (02:00 CET becomes 03:00 CEST): no 02:00, so
        // the window opens at the gap's end, 03:00 CEST, 01:00Z.
        assert_eq!(
            w.next_open(at("2027-03-27T12:00:00Z")),
            Some(at("2027-03-28T01:00:00Z"))
        );
        // Summer: 02:00 CEST is 00:00Z.
        assert_eq!(
            w.next_open(at("2027-03-28T12:00:00Z")),
            Some(at("2027-03-29T00:00:00Z"))
        );
        assert!(w.is_open(at("2027-03-29T00:59:59Z")));
        assert!(!w.is_open(at("2027-03-29T01:00:00Z")));
        // The night the clocks go back (03:00 CEST becomes 02:00 CET): 02:00 happens
        // twice; the window opens once, at the first (00:00Z), for its length.
        assert_eq!(
            w.next_open(at("2027-10-30T12:00:00Z")),
            Some(at("2027-10-31T00:00:00Z"))
        );
        assert!(w.is_open(at("2027-10-31T00:30:00Z")));
        assert!(
            !w.is_open(at("2027-10-31T01:30:00Z")),
            "not again at the second 02:30"
        );
        // Winter again: 01:00Z.
        assert_eq!(
            w.next_open(at("2027-10-31T12:00:00Z")),
            Some(at("2027-11-01T01:00:00Z"))
        );
        // The same expression in UTC ignores all of it.
        assert_eq!(
            window("0 2 * * *", 3600).next_open(at("2027-03-27T12:00:00Z")),
            Some(at("2027-03-28T02:00:00Z"))
        );
    }

    #[test]
    fn a_bad_time_zone_is_refused_with_what_is_expected() {
        let err = Window::new(
            &RestoreWindow {
                start: "0 2 * * *".into(),
                length_s: 60,
            },
            Some("Mars/Olympus"),
        )
        .unwrap_err();
        assert!(
            err.contains("IANA") && err.contains("Mars/Olympus"),
            "{err}"
        );
    }
}
