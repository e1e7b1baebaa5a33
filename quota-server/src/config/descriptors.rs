//! The envoyproxy/ratelimit descriptor format, read as that server reads it,
//! plus Sluice's optional extensions on `rate_limit` (`algorithm`, `burst`,
//! `per`, `calendar` and `time_zone`).

use serde::{Deserialize, Serialize};
use sluice_core::algorithm::{AlgorithmKind, Quota};
use sluice_core::config::SpanText;
use sluice_core::time::Span;

use super::errors::Problems;
use crate::limits::calendar::{Calendar, CalendarUnit};

/// One file of envoyproxy/ratelimit: a domain and its descriptor tree.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DescriptorFile {
    /// The domain Envoy names in its requests.
    pub domain: String,
    /// The top-level descriptors.
    #[serde(default)]
    pub descriptors: Vec<DescriptorConfig>,
}

/// One node of the tree: an entry key, optionally a value, maybe a limit.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DescriptorConfig {
    /// The entry key this node matches.
    pub key: String,
    /// The entry value; absent means any value, each with its own counter.
    /// A trailing `*` matches values by prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// The limit for requests whose descriptor ends at this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitConfig>,
    /// Count and report, never limit.
    #[serde(default, skip_serializing_if = "is_false")]
    pub shadow_mode: bool,
    /// envoyproxy/ratelimit's per-value statistics: accepted so that its
    /// files load unchanged, and ignored (Sluice's metrics are per limit
    /// and never carry request values).
    #[serde(default, skip_serializing_if = "is_false")]
    pub detailed_metric: bool,
    /// Deeper entries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub descriptors: Vec<DescriptorConfig>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// `second`, `minute`, `hour`, `day` (and `week`, `month`, `year`, as newer
/// envoyproxy/ratelimit versions accept; a month is 30 days, a year 365).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnitConfig {
    /// One second.
    Second,
    /// Sixty seconds.
    Minute,
    /// An hour.
    Hour,
    /// A day.
    Day,
    /// Seven days.
    Week,
    /// Thirty days.
    Month,
    /// 365 days.
    Year,
}

impl UnitConfig {
    /// The unit's length.
    pub const fn span(self) -> Span {
        Span::from_secs(match self {
            UnitConfig::Second => 1,
            UnitConfig::Minute => 60,
            UnitConfig::Hour => 3_600,
            UnitConfig::Day => 86_400,
            UnitConfig::Week => 7 * 86_400,
            UnitConfig::Month => 30 * 86_400,
            UnitConfig::Year => 365 * 86_400,
        })
    }
}

/// A limit as envoyproxy/ratelimit writes it, with Sluice's extensions.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Name other limits can `replaces`; also shown in headers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Limits (by name) this one replaces when both apply to a request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replaces: Vec<ReplacesConfig>,
    /// The window; required unless `per` or `unlimited` is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<UnitConfig>,
    /// Permits per unit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_unit: Option<u64>,
    /// No limit at all (and no counter).
    #[serde(default, skip_serializing_if = "is_false")]
    pub unlimited: bool,
    /// Sluice: any window (`"10s"`), instead of `unit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per: Option<SpanText>,
    /// Sluice: the algorithm; envoyproxy/ratelimit's behaviour is `fixed_window`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<AlgorithmKind>,
    /// Sluice: bucket capacity for the bucket algorithms and GCRA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u64>,
    /// Sluice: a calendar window (`day`, `week`, `month`) in `time_zone`,
    /// instead of `unit` or `per`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calendar: Option<CalendarUnit>,
    /// Sluice: the IANA time zone of `calendar` (default UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
}

/// One entry of `replaces`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplacesConfig {
    /// The replaced limit's name.
    pub name: String,
}

/// A validated `rate_limit`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LimitSpec {
    /// Explicitly unlimited.
    Unlimited,
    /// A real limit.
    Limited {
        /// The algorithm.
        algorithm: AlgorithmKind,
        /// Count, window and burst.
        quota: Quota,
        /// The calendar its windows follow, if any (then the quota's
        /// period is the unit's usual length).
        calendar: Option<Calendar>,
    },
}

/// Checks a calendar window written at `at` (`calendar` and `time_zone`
/// fields beside a `per` given or not, under `algorithm`): the calendar,
/// or `None` after recording why not. Shared by descriptors and rules.
pub fn validate_calendar(
    calendar: Option<CalendarUnit>,
    time_zone: Option<&str>,
    per_given: bool,
    algorithm: Option<AlgorithmKind>,
    at: &str,
    problems: &mut Problems,
) -> Option<Calendar> {
    let Some(unit) = calendar else {
        if time_zone.is_some() {
            problems.add(
                format!("{at}.time_zone"),
                "only used with calendar: day, week or month",
            );
        }
        return None;
    };
    let mut ok = true;
    if per_given {
        problems.add(
            format!("{at}.calendar"),
            "give one window: calendar, or a fixed length (unit or per), not both",
        );
        ok = false;
    }
    if let Some(other) = algorithm.filter(|a| *a != AlgorithmKind::FixedWindow) {
        problems.add(
            format!("{at}.calendar"),
            format!(
                "calendar windows are fixed windows: use algorithm fixed_window (or leave it out), not {}",
                other.name()
            ),
        );
        ok = false;
    }
    let calendar = match Calendar::new(unit, time_zone.unwrap_or("UTC")) {
        Ok(calendar) => Some(calendar),
        Err(e) => {
            problems.add(format!("{at}.time_zone"), e.to_string());
            None
        }
    };
    calendar.filter(|_| ok)
}

impl RateLimitConfig {
    /// Checks the limit, recording problems under `at`.
    pub fn validate(&self, at: &str, problems: &mut Problems) -> Option<LimitSpec> {
        if self.unlimited {
            return Some(LimitSpec::Unlimited);
        }
        let calendar = validate_calendar(
            self.calendar,
            self.time_zone.as_deref(),
            self.unit.is_some() || self.per.is_some(),
            self.algorithm,
            at,
            problems,
        );
        if self.calendar.is_some() && calendar.is_none() {
            return None;
        }
        let per = match (&self.unit, &self.per) {
            _ if calendar.is_some() => calendar.as_ref().map(|c| c.unit().nominal()),
            (Some(unit), None) => Some(unit.span()),
            (None, Some(text)) => match text.parse() {
                Ok(span) => Some(span),
                Err(e) => {
                    problems.add(format!("{at}.per"), e);
                    None
                }
            },
            (Some(_), Some(_)) => {
                problems.add(format!("{at}.per"), "give either unit or per, not both");
                None
            }
            (None, None) => {
                problems.add(
                    format!("{at}.unit"),
                    "required: second, minute, hour or day (or Sluice's per: \"10s\" or calendar: month), unless unlimited: true",
                );
                None
            }
        };
        let Some(count) = self.requests_per_unit else {
            problems.add(
                format!("{at}.requests_per_unit"),
                "required unless unlimited: true",
            );
            return None;
        };
        let per = per?;
        match Quota::new(count, per, self.burst) {
            Ok(quota) => Some(LimitSpec::Limited {
                algorithm: self.algorithm.unwrap_or(AlgorithmKind::FixedWindow),
                quota,
                calendar,
            }),
            Err(e) => {
                let field = match e {
                    sluice_core::algorithm::QuotaError::ZeroCount => "requests_per_unit",
                    sluice_core::algorithm::QuotaError::PeriodTooShort => "per",
                    sluice_core::algorithm::QuotaError::ZeroBurst => "burst",
                };
                problems.add(format!("{at}.{field}"), e.to_string());
                None
            }
        }
    }
}
