//! Query parameters, read lazily from the raw query string.
//!
//! Parameters are separated by `&`; a name runs to the first `=` (a
//! parameter without one has the empty value). Names and values are read
//! as a form (`application/x-www-form-urlencoded`, as most web frameworks
//! read a query): `%XX` is the byte XX, `+` a space, and a `%` not followed
//! by two hex digits stays as written. A decoded byte that is not part of
//! UTF-8 text is written back as `%XX` (upper-case hex), so every spelling
//! of the same bytes (`%ff`, `%FF`, `a+%FF`, `a%20%ff`) has one text,
//! compared by matching and written into keys alike: a client cannot get a
//! fresh counter by spelling a value differently. Names are
//! case-sensitive; the first parameter of a name is the one read.
//!
//! Nothing here allocates in proportion to the query, except
//! [`canonical`] for the one value it decodes.

use alloc::borrow::Cow;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;

/// The raw value of the first parameter named `name` (compared as decoded
/// text), or `None`.
pub fn find<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query.split('&').find_map(|pair| {
        let (raw_name, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
        canonical_eq(raw_name, name).then_some(raw_value)
    })
}

/// The text of a raw name or value: decoded, each byte that is not part
/// of UTF-8 text written `%XX` (upper-case hex digits).
pub fn canonical(raw: &str) -> Cow<'_, str> {
    if !is_encoded(raw) {
        return Cow::Borrowed(raw);
    }
    let bytes: Vec<u8> = decoded(raw).collect();
    match String::from_utf8(bytes) {
        Ok(text) => Cow::Owned(text),
        Err(e) => {
            let bytes = e.into_bytes();
            let mut text = String::with_capacity(bytes.len().saturating_mul(3));
            for chunk in bytes.utf8_chunks() {
                text.push_str(chunk.valid());
                for byte in chunk.invalid() {
                    let _ = write!(text, "%{byte:02X}");
                }
            }
            Cow::Owned(text)
        }
    }
}

/// Whether the text of `raw` ([`canonical`]) is `text`, without allocating
/// unless the decoded bytes are not UTF-8 and `text` holds a `%`.
pub fn canonical_eq(raw: &str, text: &str) -> bool {
    if !is_encoded(raw) {
        return raw == text;
    }
    // Decoded bytes equal to a `str` are UTF-8, so they are the text.
    if decoded(raw).eq(text.bytes()) {
        return true;
    }
    // Otherwise only a text with a byte written `%XX` can still be it.
    text.contains('%') && canonical(raw) == text
}

/// Whether decoding could change `raw`.
fn is_encoded(raw: &str) -> bool {
    raw.bytes().any(|b| b == b'%' || b == b'+')
}

/// The bytes of `raw` decoded: `%XX` is the byte XX, `+` a space, and
/// anything else (a `%` without two hex digits too) itself.
fn decoded(raw: &str) -> impl Iterator<Item = u8> + '_ {
    let mut rest = raw.as_bytes();
    core::iter::from_fn(move || {
        let (&first, tail) = rest.split_first()?;
        let (byte, tail) = match (first, tail) {
            (b'%', [high, low, after @ ..]) => match (hex(*high), hex(*low)) {
                (Some(h), Some(l)) => ((h << 4) | l, after),
                _ => (b'%', tail),
            },
            (b'+', _) => (b' ', tail),
            _ => (first, tail),
        };
        rest = tail;
        Some(byte)
    })
}

fn hex(digit: u8) -> Option<u8> {
    char::from(digit)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_escapes_and_plus_keeping_invalid_escapes() {
        let cases = [
            ("abc", "abc"),
            ("%61b%63", "abc"),
            ("a+b", "a b"),
            ("a%2Bb", "a+b"),
            ("a%2bb", "a+b"),
            ("100%", "100%"),
            ("%zz%4", "%zz%4"),
            ("%C3%A9", "é"),
            // Bytes that are not UTF-8 text: written back as `%XX`.
            ("%FF", "%FF"),
            ("%C3", "%C3"),
            ("%25FF", "%FF"),
        ];
        for (raw, text) in cases {
            assert_eq!(canonical(raw), text, "{raw:?}");
            assert!(canonical_eq(raw, text), "{raw:?} equals {text:?}");
        }
        assert!(!canonical_eq("a%20b", "a%20b"));
        assert!(!canonical_eq("%61", "%61"));
        assert!(!canonical_eq("a+b", "a+b"));
        assert!(!canonical_eq("%ff", "%ff"));
    }

    #[test]
    fn every_spelling_of_bytes_that_are_not_utf8_has_one_text() {
        // A client must not get a fresh key by spelling the same bytes
        // another way: hex digits' case, `+` or `%20`, a letter escaped.
        let spellings = ["%FF", "%ff", "%Ff"];
        for raw in spellings {
            assert_eq!(canonical(raw), "%FF", "{raw:?}");
            assert!(canonical_eq(raw, "%FF"), "{raw:?}");
        }
        let spellings = ["a+%FFb%C3%A9", "a%20%ffb%c3%a9", "%61 %fF%62é"];
        for raw in spellings {
            assert_eq!(canonical(raw), "a %FFbé", "{raw:?}");
            assert!(canonical_eq(raw, "a %FFbé"), "{raw:?}");
        }
        // A lone lead byte, then text.
        assert_eq!(canonical("%E2%82x"), "%E2%82x");
        assert!(!canonical_eq("%E2%82x", "%e2%82x"));
    }

    #[test]
    fn finds_the_first_parameter_by_decoded_name() {
        let query = "tier=free&tier=paid&%78=1&flag&empty=&Case=A&=v&a+b=c";
        assert_eq!(find(query, "tier"), Some("free"));
        assert_eq!(find(query, "x"), Some("1"));
        assert_eq!(find(query, "flag"), Some(""));
        assert_eq!(find(query, "empty"), Some(""));
        assert_eq!(find(query, "case"), None);
        assert_eq!(find(query, "Case"), Some("A"));
        assert_eq!(find(query, "a b"), Some("c"));
        assert_eq!(find(query, "missing"), None);
        assert_eq!(find("", "tier"), None);
    }
}
