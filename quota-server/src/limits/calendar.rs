//! Calendar windows: a day, an ISO week (from Monday) or a month of a time
//! zone, as the instants `[local midnight, next local midnight)`. All of
//! the calendar arithmetic is here; storage and core's fixed window only
//! see a window's start and end instants.
//!
//! A local day lasts 23 or 25 hours across a daylight-saving change, a
//! month 28 to 31 days (plus or minus that hour): a window is as long as
//! the calendar says. A midnight that does not exist (a change at 00:00)
//! starts the day at the first instant that does. The time zone database
//! is compiled in (jiff's bundled copy), so every host agrees on it.

use jiff::civil::Date;
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};
use serde::{Deserialize, Serialize};
use sluice_core::time::{Nanos, Span};

/// Which calendar window: `day`, `week` (Monday to Sunday) or `month`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CalendarUnit {
    /// Midnight to midnight.
    Day,
    /// Monday midnight to the next Monday midnight (ISO 8601 weeks).
    Week,
    /// The 1st at midnight to the next 1st at midnight.
    Month,
}

impl CalendarUnit {
    /// The name written in config.
    pub const fn name(self) -> &'static str {
        match self {
            CalendarUnit::Day => "day",
            CalendarUnit::Week => "week",
            CalendarUnit::Month => "month",
        }
    }

    /// The usual length (a month as 30 days, as envoyproxy/ratelimit's
    /// `unit: month`): the quota's period where one is needed, e.g. in
    /// `GET /rules`. Windows themselves are as long as the calendar says.
    pub const fn nominal(self) -> Span {
        Span::from_secs(match self {
            CalendarUnit::Day => 86_400,
            CalendarUnit::Week => 7 * 86_400,
            CalendarUnit::Month => 30 * 86_400,
        })
    }
}

/// A time zone name the database does not know.
#[derive(Debug, thiserror::Error)]
#[error("unknown time zone {0:?}: use an IANA name such as \"Europe/Paris\", \"America/New_York\" or \"UTC\"")]
pub struct UnknownZone(pub String);

/// One window: `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// Its first instant.
    pub start: Nanos,
    /// The first instant of the next window.
    pub end: Nanos,
}

impl Window {
    /// How long it lasts.
    pub fn length(&self) -> Span {
        Span(self.end.0.saturating_sub(self.start.0))
    }
}

/// Calendar windows of one unit in one time zone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Calendar {
    unit: CalendarUnit,
    zone: TimeZone,
    zone_name: String,
}

impl Calendar {
    /// Windows of `unit` in the zone named `zone` (an IANA name).
    pub fn new(unit: CalendarUnit, zone: &str) -> Result<Calendar, UnknownZone> {
        let tz = jiff::tz::db()
            .get(zone)
            .map_err(|_| UnknownZone(zone.to_owned()))?;
        Ok(Calendar {
            unit,
            zone: tz,
            zone_name: zone.to_owned(),
        })
    }

    /// The unit.
    pub fn unit(&self) -> CalendarUnit {
        self.unit
    }

    /// The time zone's name, as configured.
    pub fn zone_name(&self) -> &str {
        &self.zone_name
    }

    /// The window containing `now`.
    pub fn window_at(&self, now: Nanos) -> Window {
        self.window_of_date(self.local_date(now))
            // Unreachable for the times a u64 of nanoseconds holds (until
            // 2554): jiff covers the years -9999 to 9999.
            .unwrap_or_else(|| {
                let per = self.unit.nominal().0;
                let start = now.0 - now.0 % per;
                Window {
                    start: Nanos(start),
                    end: Nanos(start.saturating_add(per)),
                }
            })
    }

    /// The window containing `now` and its two neighbours, as their
    /// boundaries: previous start, start, end, next end. Redis decides
    /// with its own clock and picks among them, so a server whose clock
    /// is a little off at a boundary still counts in the right window.
    pub fn around(&self, now: Nanos) -> [Nanos; 4] {
        let here = self.window_at(now);
        let before = self.window_at(Nanos(here.start.0.saturating_sub(1)));
        let after = self.window_at(here.end);
        [before.start, here.start, here.end, after.end]
    }

    fn local_date(&self, now: Nanos) -> Option<Date> {
        let instant = Timestamp::from_nanosecond(i128::from(now.0)).ok()?;
        Some(instant.to_zoned(self.zone.clone()).date())
    }

    /// The window of the day, week or month holding `date`.
    fn window_of_date(&self, date: Option<Date>) -> Option<Window> {
        let date = date?;
        let (first, next) = match self.unit {
            CalendarUnit::Day => (date, date.tomorrow().ok()?),
            CalendarUnit::Week => {
                let monday = date
                    .checked_sub(i64::from(date.weekday().to_monday_zero_offset()).days())
                    .ok()?;
                (monday, monday.checked_add(1.week()).ok()?)
            }
            CalendarUnit::Month => {
                let first = date.first_of_month();
                (first, first.checked_add(1.month()).ok()?)
            }
        };
        Some(Window {
            start: self.midnight(first)?,
            end: self.midnight(next)?,
        })
    }

    /// The first instant of `date` in the zone (its midnight, or the first
    /// instant after a gap that swallowed it), before 1970 read as 1970.
    fn midnight(&self, date: Date) -> Option<Nanos> {
        let zoned = date.to_zoned(self.zone.clone()).ok()?;
        let ns = zoned.timestamp().as_nanosecond();
        Some(Nanos(u64::try_from(ns.max(0)).ok()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The instant of a local time written `2024-02-29T23:59:59` in `zone`.
    fn at(zone: &str, local: &str) -> Nanos {
        let tz = jiff::tz::db().get(zone).unwrap();
        let dt: jiff::civil::DateTime = local.parse().unwrap();
        let ns = dt.to_zoned(tz).unwrap().timestamp().as_nanosecond();
        Nanos(u64::try_from(ns).unwrap())
    }

    /// The instant of a UTC time written `2024-03-31T01:00:00Z`.
    fn utc(text: &str) -> Nanos {
        let ts: Timestamp = text.parse().unwrap();
        Nanos(u64::try_from(ts.as_nanosecond()).unwrap())
    }

    fn window(unit: CalendarUnit, zone: &str, now: Nanos) -> (Nanos, Nanos) {
        let w = Calendar::new(unit, zone).unwrap().window_at(now);
        (w.start, w.end)
    }

    const HOUR: u64 = 3_600_000_000_000;

    #[test]
    fn a_month_runs_from_the_first_at_local_midnight() {
        use CalendarUnit::Month;
        let paris = "Europe/Paris";
        // February of a leap year: 29 days, in winter time (UTC+1).
        let feb = window(Month, paris, at(paris, "2024-02-29T23:59:59.999"));
        assert_eq!(feb.0, utc("2024-01-31T23:00:00Z"));
        assert_eq!(feb.1, utc("2024-02-29T23:00:00Z"));
        assert_eq!(feb.1 .0 - feb.0 .0, 29 * 24 * HOUR);
        // The first instant of March is March's.
        let march = window(Month, paris, at(paris, "2024-03-01T00:00"));
        assert_eq!(march.0, feb.1);
        // March loses an hour to summer time (last Sunday, 02:00 → 03:00).
        assert_eq!(march.1, utc("2024-03-31T22:00:00Z"));
        assert_eq!(march.1 .0 - march.0 .0, (31 * 24 - 1) * HOUR);
        // A common year's February: 28 days.
        let feb23 = window(Month, paris, at(paris, "2023-02-14T12:00"));
        assert_eq!(feb23.1 .0 - feb23.0 .0, 28 * 24 * HOUR);
        // Year end: December runs to the next year's January 1st.
        let dec = window(Month, "America/New_York", utc("2025-01-01T04:59:59Z"));
        assert_eq!(dec.0, utc("2024-12-01T05:00:00Z"));
        assert_eq!(dec.1, utc("2025-01-01T05:00:00Z"));
        // The same instant in UTC is already January.
        let jan = window(Month, "UTC", utc("2025-01-01T04:59:59Z"));
        assert_eq!(jan.0, utc("2025-01-01T00:00:00Z"));
        assert_eq!(jan.1, utc("2025-02-01T00:00:00Z"));
    }

    #[test]
    fn days_last_23_or_25_hours_across_daylight_saving_changes() {
        use CalendarUnit::Day;
        let paris = "Europe/Paris";
        let spring = window(Day, paris, at(paris, "2024-03-31T12:00"));
        assert_eq!(spring.0, utc("2024-03-30T23:00:00Z"));
        assert_eq!(spring.1 .0 - spring.0 .0, 23 * HOUR);
        let autumn = window(Day, paris, at(paris, "2024-10-27T23:30"));
        assert_eq!(autumn.0, utc("2024-10-26T22:00:00Z"));
        assert_eq!(autumn.1 .0 - autumn.0 .0, 25 * HOUR);
        let ny = "America/New_York";
        let spring = window(Day, ny, utc("2024-03-10T07:00:00Z"));
        assert_eq!(spring.0, utc("2024-03-10T05:00:00Z"));
        assert_eq!(spring.1, utc("2024-03-11T04:00:00Z"));
        let autumn = window(Day, ny, utc("2024-11-03T05:59:59Z"));
        assert_eq!(autumn.0, utc("2024-11-03T04:00:00Z"));
        assert_eq!(autumn.1, utc("2024-11-04T05:00:00Z"));
        // The hour repeated in autumn belongs to the one day.
        let again = window(Day, ny, utc("2024-11-03T06:30:00Z"));
        assert_eq!(again, autumn);
    }

    #[test]
    fn a_midnight_lost_to_a_change_starts_the_day_at_its_first_instant() {
        // São Paulo moved clocks from 00:00 to 01:00 on 2018-11-04.
        let w = window(
            CalendarUnit::Day,
            "America/Sao_Paulo",
            utc("2018-11-04T12:00:00Z"),
        );
        assert_eq!(w.0, utc("2018-11-04T03:00:00Z"));
        assert_eq!(w.1 .0 - w.0 .0, 23 * HOUR);
    }

    #[test]
    fn weeks_run_monday_to_monday() {
        use CalendarUnit::Week;
        let paris = "Europe/Paris";
        // Sunday 2024-12-29 23:59 is in the week of Monday 2024-12-23.
        let w = window(Week, paris, at(paris, "2024-12-29T23:59:59"));
        assert_eq!(w.0, at(paris, "2024-12-23T00:00"));
        assert_eq!(w.1, at(paris, "2024-12-30T00:00"));
        // That Monday's week spans the year end (ISO week 1 of 2025).
        let next = window(Week, paris, w.1);
        assert_eq!(next.0, w.1);
        assert_eq!(next.1, at(paris, "2025-01-06T00:00"));
        // A week holding the autumn change is an hour longer.
        let autumn = window(Week, paris, at(paris, "2024-10-30T10:00"));
        assert_eq!(autumn.0, at(paris, "2024-10-28T00:00"));
        let long = window(Week, paris, at(paris, "2024-10-25T10:00"));
        assert_eq!(long.1 .0 - long.0 .0, (7 * 24 + 1) * HOUR);
    }

    #[test]
    fn around_gives_the_neighbouring_windows() {
        let cal = Calendar::new(CalendarUnit::Month, "Europe/Paris").unwrap();
        let [before, start, end, after] = cal.around(at("Europe/Paris", "2024-03-15T00:00"));
        assert_eq!(before, at("Europe/Paris", "2024-02-01T00:00"));
        assert_eq!(start, at("Europe/Paris", "2024-03-01T00:00"));
        assert_eq!(end, at("Europe/Paris", "2024-04-01T00:00"));
        assert_eq!(after, at("Europe/Paris", "2024-05-01T00:00"));
    }

    #[test]
    fn unknown_zones_are_named() {
        let e = Calendar::new(CalendarUnit::Day, "Europe/Atlantis").unwrap_err();
        assert!(e.to_string().contains("\"Europe/Atlantis\""), "{e}");
        assert!(Calendar::new(CalendarUnit::Day, "UTC").is_ok());
    }
}
