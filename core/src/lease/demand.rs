//! The message a worker puts on [`super::DEMAND_QUEUE`] for a key whose
//! leases have no room: the rule's name and the key, so that the service
//! (which keeps its own table) can sync that key at once.

use alloc::vec::Vec;

/// Message layout version (first byte).
const FORMAT: u8 = 1;
/// Longest key sent: longer keys are never leased (their requests ask the
/// quota server each time), which bounds the queue's messages and the
/// service's table (which holds each key's text: at most 256 bytes times
/// the leased rules' `max_keys`).
pub const MAX_LEASED_KEY: usize = 256;

/// The message for `key` of `rule`; `None` when the key is too long to
/// lease or the rule name too long to frame.
pub fn encode(rule: &str, key: &str) -> Option<Vec<u8>> {
    let rule_len = u8::try_from(rule.len()).ok()?;
    if key.len() > MAX_LEASED_KEY {
        return None;
    }
    let mut out = Vec::with_capacity(2usize.saturating_add(rule.len()).saturating_add(key.len()));
    out.push(FORMAT);
    out.push(rule_len);
    out.extend_from_slice(rule.as_bytes());
    out.extend_from_slice(key.as_bytes());
    Some(out)
}

/// The rule and key of a message; `None` if it is not one.
pub fn decode(message: &[u8]) -> Option<(&str, &str)> {
    let (&format, rest) = message.split_first()?;
    let (&rule_len, rest) = rest.split_first()?;
    if format != FORMAT {
        return None;
    }
    let (rule, key) = rest.split_at_checked(usize::from(rule_len))?;
    if key.len() > MAX_LEASED_KEY {
        return None;
    }
    Some((
        core::str::from_utf8(rule).ok()?,
        core::str::from_utf8(key).ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::String;

    #[test]
    fn round_trips_and_refuses_what_it_cannot_frame() {
        let message = encode("api", "alice").unwrap();
        assert_eq!(decode(&message), Some(("api", "alice")));
        assert_eq!(decode(&encode("api", "").unwrap()), Some(("api", "")));
        let long = String::from("k").repeat(MAX_LEASED_KEY + 1);
        assert_eq!(encode("api", &long), None);
        assert_eq!(decode(&[]), None);
        assert_eq!(decode(&[2, 0]), None, "another format");
        assert_eq!(decode(&[1, 9, b'a']), None, "truncated");
    }
}
