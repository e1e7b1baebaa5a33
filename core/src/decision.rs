//! What one rule decided for one request, and the response headers that
//! tell a client about it.

use alloc::string::String;

use serde::{Deserialize, Serialize};

use crate::algorithm::{Outcome, Quota};
use crate::text::push_decimal;
use crate::time::Span;

/// One rule's verdict on one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Whether the rule lets the request through.
    pub allowed: bool,
    /// Permits per window (the quota's count).
    pub limit: u64,
    /// Most permits usable at once: the burst of bucket algorithms, else
    /// `limit`. `remaining` never exceeds it.
    pub capacity: u64,
    /// The quota's window.
    pub window: Span,
    /// Permits left.
    pub remaining: u64,
    /// Time until the allowance is fully restored.
    pub reset_after: Span,
    /// Zero when allowed; otherwise when to try again.
    pub retry_after: Span,
}

impl Decision {
    /// The decision an algorithm's outcome gives under `quota`.
    pub fn new(quota: &Quota, outcome: &Outcome) -> Decision {
        Decision {
            allowed: outcome.allowed,
            limit: quota.count(),
            capacity: quota.burst(),
            window: quota.per(),
            remaining: outcome.remaining,
            reset_after: outcome.reset_after,
            retry_after: outcome.retry_after,
        }
    }

    /// `Retry-After` in whole seconds, rounded up (at least 1 when limited),
    /// capped at a day so a client is never told "never".
    pub fn retry_after_secs(&self) -> u64 {
        const CAP: u64 = 86_400;
        self.retry_after.as_secs_ceil().clamp(1, CAP)
    }

    /// Seconds until the allowance is whole again (`X-RateLimit-Reset`, the
    /// IETF `t`), rounded up. A property of the key's state alone, so the
    /// allowed answer and the refusal that follows it agree; when to retry
    /// is `Retry-After`'s to say.
    pub fn reset_secs(&self) -> u64 {
        self.reset_after.as_secs_ceil()
    }

    /// Which of two decisions a client should be told about: a denial over
    /// an allowance, then the longer wait, then fewer permits left.
    pub fn more_restrictive(self, other: Decision) -> Decision {
        let key = |d: &Decision| {
            (
                !d.allowed,
                d.retry_after,
                core::cmp::Reverse(d.remaining),
                d.reset_after,
            )
        };
        if key(&other) > key(&self) {
            other
        } else {
            self
        }
    }
}

/// Which families of rate-limit headers to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeaderSet {
    /// `RateLimit-Policy` and `RateLimit` (draft-ietf-httpapi-ratelimit-headers-10).
    Ietf,
    /// `X-RateLimit-Limit`, `X-RateLimit-Remaining`, `X-RateLimit-Reset`.
    #[serde(rename = "x_ratelimit")]
    XRateLimit,
}

/// Header sets enabled, as flags (cheap to copy and test per request).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeaderSets {
    /// Send the IETF draft fields.
    pub ietf: bool,
    /// Send the `X-RateLimit-*` fields.
    pub x_ratelimit: bool,
}

impl HeaderSets {
    /// Both families.
    pub const ALL: HeaderSets = HeaderSets {
        ietf: true,
        x_ratelimit: true,
    };

    /// The flags for a list of sets.
    pub fn from_sets(sets: &[HeaderSet]) -> HeaderSets {
        HeaderSets {
            ietf: sets.contains(&HeaderSet::Ietf),
            x_ratelimit: sets.contains(&HeaderSet::XRateLimit),
        }
    }

    /// Whether no family is enabled.
    pub fn is_empty(&self) -> bool {
        !self.ietf && !self.x_ratelimit
    }
}

/// Response header names, lower-case as HTTP/2 requires.
pub mod names {
    /// Seconds until the client may retry.
    pub const RETRY_AFTER: &str = "retry-after";
    /// Permits per window.
    pub const X_RATELIMIT_LIMIT: &str = "x-ratelimit-limit";
    /// Permits left.
    pub const X_RATELIMIT_REMAINING: &str = "x-ratelimit-remaining";
    /// Seconds until the window resets.
    pub const X_RATELIMIT_RESET: &str = "x-ratelimit-reset";
    /// The IETF draft's policy field.
    pub const RATELIMIT_POLICY: &str = "ratelimit-policy";
    /// The IETF draft's state field.
    pub const RATELIMIT: &str = "ratelimit";
}

/// Builds the rate-limit headers for one request from the decisions of the
/// rules that applied, in the order they should be listed.
///
/// `shown` is the decision summarised by `X-RateLimit-*` and `Retry-After`
/// (the denying rule, or the most restrictive one); the IETF fields list
/// every rule. `emit` receives (name, value) pairs.
pub fn render_headers<'a>(
    rules: impl Iterator<Item = (&'a str, Decision)> + Clone,
    shown: Decision,
    sets: HeaderSets,
    emit: impl FnMut(&'static str, &str),
) {
    render_headers_in(rules, shown, sets, &mut String::new(), emit);
}

/// [`render_headers`], building each value in `value` (its text is
/// replaced): a caller that renders often keeps one buffer and allocates
/// nothing once it is large enough.
pub fn render_headers_in<'a>(
    rules: impl Iterator<Item = (&'a str, Decision)> + Clone,
    shown: Decision,
    sets: HeaderSets,
    value: &mut String,
    mut emit: impl FnMut(&'static str, &str),
) {
    // Room for every value, reserved once: the longest is an IETF field
    // listing every rule (name, quotes and separators, two numbers).
    const NUMBERS: usize = 2 * 20 + 12;
    let longest = rules
        .clone()
        .map(|(name, _)| name.len().saturating_add(NUMBERS))
        .fold(NUMBERS, usize::saturating_add);
    value.clear();
    value.reserve(longest);
    let mut emit_number = |name: &'static str, n: u64| {
        value.clear();
        push_decimal(value, n);
        emit(name, value);
    };
    if !shown.allowed {
        emit_number(names::RETRY_AFTER, shown.retry_after_secs());
    }
    if sets.x_ratelimit {
        emit_number(names::X_RATELIMIT_LIMIT, shown.capacity);
        emit_number(names::X_RATELIMIT_REMAINING, shown.remaining);
        emit_number(names::X_RATELIMIT_RESET, shown.reset_secs());
    }
    if sets.ietf {
        // `"name";q=limit;w=window, ...` then `"name";r=remaining;t=reset, ...`
        let field =
            |value: &mut String, [first, second]: [&str; 2], numbers: fn(&Decision) -> [u64; 2]| {
                value.clear();
                for (i, (name, d)) in rules.clone().enumerate() {
                    if i > 0 {
                        value.push_str(", ");
                    }
                    let [a, b] = numbers(&d);
                    value.push('"');
                    value.push_str(name);
                    value.push_str(first);
                    push_decimal(value, a);
                    value.push_str(second);
                    push_decimal(value, b);
                }
            };
        field(value, ["\";q=", ";w="], |d| {
            [d.limit, d.window.as_secs_ceil()]
        });
        if !value.is_empty() {
            emit(names::RATELIMIT_POLICY, value);
        }
        field(value, ["\";r=", ";t="], |d| [d.remaining, d.reset_secs()]);
        if !value.is_empty() {
            emit(names::RATELIMIT, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec::Vec;

    fn decision(allowed: bool, remaining: u64, reset_ms: u64, retry_ms: u64) -> Decision {
        Decision {
            allowed,
            limit: 100,
            capacity: 100,
            window: Span::from_secs(60),
            remaining,
            reset_after: Span::from_millis(reset_ms),
            retry_after: Span::from_millis(retry_ms),
        }
    }

    fn render(
        rules: &[(&str, Decision)],
        shown: Decision,
        sets: HeaderSets,
    ) -> Vec<(String, String)> {
        let mut out = Vec::new();
        render_headers(rules.iter().copied(), shown, sets, |n, v| {
            out.push((n.to_string(), v.to_string()))
        });
        out
    }

    #[test]
    fn limited_response_has_every_field() {
        let d = decision(false, 0, 16_200, 1_001);
        let headers = render(&[("api", d)], d, HeaderSets::ALL);
        let expect = [
            ("retry-after", "2"),
            ("x-ratelimit-limit", "100"),
            ("x-ratelimit-remaining", "0"),
            ("x-ratelimit-reset", "17"),
            ("ratelimit-policy", "\"api\";q=100;w=60"),
            ("ratelimit", "\"api\";r=0;t=17"),
        ];
        let got: Vec<(&str, &str)> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        assert_eq!(got, expect);
    }

    #[test]
    fn allowed_response_lists_every_rule_and_no_retry_after() {
        let a = decision(true, 42, 17_000, 0);
        let b = Decision {
            limit: 5,
            capacity: 5,
            window: Span::from_secs(1),
            ..decision(true, 4, 200, 0)
        };
        let headers = render(
            &[("a", a), ("b", b)],
            a.more_restrictive(b),
            HeaderSets::ALL,
        );
        assert!(headers.iter().all(|(n, _)| n != "retry-after"));
        assert!(headers.contains(&("x-ratelimit-remaining".into(), "4".into())));
        assert!(headers.contains(&(
            "ratelimit-policy".into(),
            "\"a\";q=100;w=60, \"b\";q=5;w=1".into()
        )));
        assert!(headers.contains(&("ratelimit".into(), "\"a\";r=42;t=17, \"b\";r=4;t=1".into())));
    }

    #[test]
    fn limit_header_shows_capacity_so_remaining_never_exceeds_it() {
        let d = Decision {
            capacity: 20,
            ..decision(true, 19, 6_000, 0)
        };
        let headers = render(&[("burst", d)], d, HeaderSets::ALL);
        assert!(headers.contains(&("x-ratelimit-limit".into(), "20".into())));
        assert!(headers.contains(&("ratelimit-policy".into(), "\"burst\";q=100;w=60".into())));
    }

    #[test]
    fn reset_is_the_same_whether_allowed_or_refused() {
        let last_allowed = decision(true, 0, 60_000, 0);
        let refused = decision(false, 0, 60_000, 12_000);
        let field = |d: Decision, name: &str| {
            render(&[("api", d)], d, HeaderSets::ALL)
                .into_iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v)
        };
        for name in ["x-ratelimit-reset", "ratelimit"] {
            assert_eq!(field(last_allowed, name), field(refused, name), "{name}");
        }
        assert_eq!(field(refused, "retry-after").as_deref(), Some("12"));
    }

    #[test]
    fn sets_select_families() {
        let d = decision(true, 1, 1000, 0);
        let only_ietf = HeaderSets::from_sets(&[HeaderSet::Ietf]);
        let headers = render(&[("x", d)], d, only_ietf);
        assert_eq!(headers.len(), 2);
        let none = HeaderSets::from_sets(&[]);
        assert!(render(&[("x", d)], d, none).is_empty());
        let limited = decision(false, 0, 1000, 500);
        assert_eq!(
            render(&[("x", limited)], limited, none),
            [("retry-after".to_string(), "1".to_string())]
        );
    }

    #[test]
    fn restrictiveness_prefers_denials_then_waits_then_scarcity() {
        let allowed = decision(true, 10, 1000, 0);
        let scarce = decision(true, 1, 1000, 0);
        let denied = decision(false, 0, 1000, 300);
        let denied_longer = decision(false, 0, 1000, 900);
        assert_eq!(allowed.more_restrictive(scarce), scarce);
        assert_eq!(scarce.more_restrictive(denied), denied);
        assert_eq!(denied_longer.more_restrictive(denied), denied_longer);
    }
}
