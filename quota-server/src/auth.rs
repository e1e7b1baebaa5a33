//! Bearer tokens, checked alike by the admin API and the gRPC listener.

use subtle::ConstantTimeEq;

/// The token of an `Authorization` value in the `Bearer` scheme, whose
/// name is case-insensitive (RFC 7235); `None` for any other scheme.
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_start_matches(' '))
}

/// Whether `presented` is `expected`, compared in constant time so that
/// the time taken does not tell how much of a guess was right (only the
/// length may leak).
pub fn matches(presented: &str, expected: &str) -> bool {
    presented.as_bytes().ct_eq(expected.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scheme_name_is_case_insensitive() {
        for value in ["Bearer t", "bearer t", "BEARER t", "bEaReR  t"] {
            assert_eq!(bearer(value), Some("t"), "{value}");
        }
        assert_eq!(bearer("Basic t"), None);
        assert_eq!(bearer("Bearer"), None);
        assert_eq!(bearer("Bearert"), None);
    }

    #[test]
    fn tokens_match_exactly() {
        assert!(matches("secret", "secret"));
        assert!(!matches("secreT", "secret"));
        assert!(!matches("secret", "secret2"));
        assert!(!matches("", "secret"));
        assert!(!matches("secret", ""));
    }
}
