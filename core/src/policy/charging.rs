//! What a request costs when it is not a rule's fixed `cost`: read from a
//! request header (`cost_from`), or reported by the upstream after the
//! response (`charge`); and the gRPC statuses a response can be excluded by.

use alloc::string::String;

use super::request::Attributes;

/// A rule's request cost read from a request header, at most `max`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CostFrom {
    /// Lower-case header name.
    pub header: String,
    /// The most one request is charged; larger values are charged `max`.
    pub max: u64,
}

/// Where the upstream reports what a request really cost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReportedIn {
    /// A response header.
    Header,
    /// A response trailer (gRPC reports there).
    Trailer,
}

/// A rule whose requests are charged, after the response, what the
/// upstream reports they used (e.g. an LLM's tokens).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChargeFrom {
    /// Header or trailer.
    pub reported_in: ReportedIn,
    /// Lower-case header or trailer name.
    pub name: String,
    /// The most one response is charged; larger values are charged `max`.
    pub max: u64,
}

/// Reads an amount written by a client or upstream: ASCII digits only
/// (surrounding whitespace allowed), `None` otherwise. A value above `max`
/// (however many digits, even past 2^64) reads as `max`, so that nobody
/// pays less by sending a larger number. Work is linear in the value's
/// length, which the host bounds.
pub fn read_amount(value: &str, max: u64) -> Option<u64> {
    let digits = value.trim_matches(|c: char| c == ' ' || c == '\t');
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut amount: u64 = 0;
    for b in digits.bytes() {
        amount = amount
            .saturating_mul(10)
            .saturating_add(u64::from(b - b'0'));
    }
    Some(amount.min(max))
}

impl CostFrom {
    /// The cost of `request`: its header's amount, or `default` (the
    /// rule's `cost`) when the header is missing, unreadable or zero.
    pub fn cost(&self, request: &impl Attributes, default: u64) -> u64 {
        match request
            .header(&self.header)
            .and_then(|v| read_amount(v, self.max))
        {
            Some(0) | None => default,
            Some(n) => n,
        }
    }
}

/// The gRPC status codes by name, in code order (0 to 16).
pub const GRPC_STATUS_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// A gRPC status code from its name (`UNAVAILABLE`, any case) or number
/// (`14`); `None` for anything else.
pub fn grpc_status_code(text: &str) -> Option<u8> {
    if let Ok(n) = text.parse::<u8>() {
        return (usize::from(n) < GRPC_STATUS_NAMES.len() && !text.starts_with('+')).then_some(n);
    }
    GRPC_STATUS_NAMES
        .iter()
        .position(|name| name.eq_ignore_ascii_case(text))
        .and_then(|i| u8::try_from(i).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::HttpRequest;

    #[test]
    fn amounts_are_digits_clamped_at_max() {
        assert_eq!(read_amount("42", 100), Some(42));
        assert_eq!(read_amount(" 7 ", 100), Some(7));
        assert_eq!(read_amount("0", 100), Some(0));
        assert_eq!(read_amount("101", 100), Some(100));
        assert_eq!(read_amount("99999999999999999999999999999", 100), Some(100));
        for bad in ["", " ", "-1", "+1", "1.5", "1e3", "0x10", "ten", "1 2"] {
            assert_eq!(read_amount(bad, 100), None, "{bad:?}");
        }
    }

    #[test]
    fn a_request_cost_falls_back_to_the_rule_cost() {
        let from = CostFrom {
            header: "x-cost".into(),
            max: 50,
        };
        let req = |v: &str| HttpRequest::new("GET", "/").with_header("x-cost", v);
        assert_eq!(from.cost(&req("12"), 3), 12);
        assert_eq!(from.cost(&req("5000"), 3), 50);
        assert_eq!(from.cost(&req("0"), 3), 3);
        assert_eq!(from.cost(&req("lots"), 3), 3);
        assert_eq!(from.cost(&HttpRequest::new("GET", "/"), 3), 3);
    }

    #[test]
    fn grpc_statuses_by_name_or_number() {
        assert_eq!(grpc_status_code("UNAVAILABLE"), Some(14));
        assert_eq!(grpc_status_code("unavailable"), Some(14));
        assert_eq!(grpc_status_code("14"), Some(14));
        assert_eq!(grpc_status_code("0"), Some(0));
        assert_eq!(grpc_status_code("16"), Some(16));
        for bad in ["17", "-1", "+3", "", "UNAVAILABLE ", "NOPE", "256"] {
            assert_eq!(grpc_status_code(bad), None, "{bad:?}");
        }
    }
}
