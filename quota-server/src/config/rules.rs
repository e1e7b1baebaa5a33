//! A domain's Sluice rules: core's rule format, whose `limit` may also
//! take the quota server's calendar window (`calendar`, `time_zone`), as a
//! descriptor's `rate_limit` does. Core knows no time zones, so these two
//! fields are taken out before core reads the rest.

use serde::de::Error as _;
use serde::ser::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_norway::{Mapping, Value};
use sluice_core::algorithm::AlgorithmKind;
use sluice_core::config::{RuleConfig, SpanText};

use super::descriptors::validate_calendar;
use super::errors::Problems;
use crate::limits::calendar::{Calendar, CalendarUnit};

/// One rule of `domains[].rules`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DomainRule {
    /// The rule as core reads it.
    pub rule: RuleConfig,
    /// `limit.calendar`: a calendar window instead of `limit.per`.
    pub calendar: Option<CalendarUnit>,
    /// `limit.time_zone`: the calendar's IANA time zone (default UTC).
    pub time_zone: Option<String>,
}

const CALENDAR: &str = "calendar";
const TIME_ZONE: &str = "time_zone";

impl<'de> Deserialize<'de> for DomainRule {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut value = Value::deserialize(deserializer)?;
        let limit = value.get_mut("limit").and_then(Value::as_mapping_mut);
        let (calendar, time_zone) = match limit {
            None => (None, None),
            Some(limit) => (limit.remove(CALENDAR), limit.remove(TIME_ZONE)),
        };
        let field =
            |name: &str, e: serde_norway::Error| D::Error::custom(format!("limit.{name}: {e}"));
        Ok(DomainRule {
            rule: RuleConfig::deserialize(value).map_err(D::Error::custom)?,
            calendar: calendar
                .map(serde_norway::from_value)
                .transpose()
                .map_err(|e| field(CALENDAR, e))?,
            time_zone: time_zone
                .map(serde_norway::from_value)
                .transpose()
                .map_err(|e| field(TIME_ZONE, e))?,
        })
    }
}

impl Serialize for DomainRule {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut value = serde_norway::to_value(&self.rule).map_err(S::Error::custom)?;
        if let Some(limit) = value.get_mut("limit").and_then(Value::as_mapping_mut) {
            add(limit, CALENDAR, self.calendar.map(|c| c.name().to_owned()));
            add(limit, TIME_ZONE, self.time_zone.clone());
        }
        value.serialize(serializer)
    }
}

fn add(limit: &mut Mapping, key: &str, text: Option<String>) {
    if let Some(text) = text {
        limit.insert(Value::String(key.into()), Value::String(text));
    }
}

impl DomainRule {
    /// The rule for core to validate, and its calendar: a calendar rule is
    /// a fixed window whose period is the unit's usual length (the windows
    /// themselves come from the calendar). Problems are recorded under `at`
    /// (`domains[i].rules[j]`).
    pub fn for_core(&self, at: &str, problems: &mut Problems) -> (RuleConfig, Option<Calendar>) {
        let mut rule = self.rule.clone();
        let per_given = rule.limit.as_ref().is_some_and(|l| l.per.is_some());
        let calendar = validate_calendar(
            self.calendar,
            self.time_zone.as_deref(),
            per_given,
            rule.algorithm,
            &format!("{at}.limit"),
            problems,
        );
        if let (Some(unit), Some(limit)) = (self.calendar, rule.limit.as_mut()) {
            // Filled even when the calendar is wrong, so that core does not
            // add "per: required" to the problem already reported.
            limit.per = Some(SpanText::Seconds(unit.nominal().as_secs_ceil()));
            rule.algorithm = Some(AlgorithmKind::FixedWindow);
        }
        (rule, calendar)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar_fields_sit_in_the_limit_and_round_trip() {
        let yaml = "name: monthly\nkey: [\"header:x-api-key\"]\n\
                    limit: {count: 10000, calendar: month, time_zone: Europe/Paris}\n";
        let rule: DomainRule = serde_norway::from_str(yaml).unwrap();
        assert_eq!(rule.calendar, Some(CalendarUnit::Month));
        assert_eq!(rule.time_zone.as_deref(), Some("Europe/Paris"));
        assert_eq!(rule.rule.limit.as_ref().unwrap().count, 10000);
        let again: DomainRule =
            serde_norway::from_str(&serde_norway::to_string(&rule).unwrap()).unwrap();
        assert_eq!(again, rule);
        let mut problems = Problems::default();
        let (core, calendar) = rule.for_core("r", &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(core.algorithm, Some(AlgorithmKind::FixedWindow));
        assert_eq!(calendar.unwrap().zone_name(), "Europe/Paris");
    }

    #[test]
    fn unknown_fields_stay_errors() {
        let bad = "name: r\nlimit: {count: 1, calendar: month, per_month: 3}\n";
        assert!(serde_norway::from_str::<DomainRule>(bad).is_err());
        let bad = "name: r\nlimit: {count: 1, calendar: fortnight}\n";
        let e = serde_norway::from_str::<DomainRule>(bad).unwrap_err();
        assert!(e.to_string().contains("limit.calendar"), "{e}");
    }
}
