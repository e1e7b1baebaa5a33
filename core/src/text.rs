//! Numbers as text without `core::fmt`: its machinery (a `Formatter`, a
//! virtual `write_str` per piece, padding checks) costs several times the
//! digits themselves, and the filter formats numbers on every request
//! (slot names, key addresses, rate-limit header values).

use alloc::string::String;
use core::net::Ipv4Addr;

/// Appends the decimal text of `n` to `out`, as its `Display` would.
pub fn push_decimal(out: &mut impl PushStr, n: u64) {
    // Written from the end, then appended.
    let mut digits = [b'0'; 20];
    let mut start = digits.len();
    let mut rest = n;
    for (i, digit) in digits.iter_mut().enumerate().rev() {
        // A digit below 10 or'ed onto '0' is its ASCII character.
        *digit = b'0' | (rest % 10) as u8;
        rest /= 10;
        start = i;
        if rest == 0 {
            break;
        }
    }
    // Digit by digit: ASCII needs no UTF-8 validation, which would cost
    // more than the digits (this renders every rate-limit header value).
    for digit in digits.get(start..).unwrap_or_default() {
        out.push(char::from(*digit));
    }
}

/// Appends `ip` in dotted-quad form to `out`, as its `Display` would.
pub fn push_ipv4(out: &mut impl PushStr, ip: Ipv4Addr) {
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        push_decimal(out, u64::from(octet));
    }
}

/// A text buffer that can be appended to.
pub trait PushStr {
    /// Appends `c`.
    fn push(&mut self, c: char);
    /// Appends `s`.
    fn push_str(&mut self, s: &str);
}

impl PushStr for String {
    fn push(&mut self, c: char) {
        String::push(self, c);
    }
    fn push_str(&mut self, s: &str) {
        String::push_str(self, s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use proptest::prelude::*;

    fn decimal(n: u64) -> String {
        let mut out = String::from("x");
        push_decimal(&mut out, n);
        out
    }

    #[test]
    fn edges_read_as_display_does() {
        for n in [0, 1, 9, 10, 99, 100, 4_294_967_295, u64::MAX] {
            assert_eq!(decimal(n), alloc::format!("x{n}"));
        }
    }

    proptest! {
        #[test]
        fn decimal_matches_display(n in any::<u64>()) {
            prop_assert_eq!(decimal(n), alloc::format!("x{n}"));
        }

        #[test]
        fn ipv4_matches_display(bits in any::<u32>()) {
            let ip = Ipv4Addr::from(bits);
            let mut out = String::new();
            push_ipv4(&mut out, ip);
            prop_assert_eq!(out, ip.to_string());
        }
    }
}
