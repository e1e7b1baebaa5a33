//! A literal run of a glob pattern, compared exactly or ignoring ASCII case,
//! and found in a text in linear time without allocating.
//!
//! `str::find` has no case-insensitive form; lowering each request path
//! would allocate per request. A literal that ignores case is therefore
//! found with Knuth–Morris–Pratt, comparing bytes ASCII-case-insensitively,
//! with its table of fallbacks built once when the pattern is compiled.

use alloc::string::String;
use alloc::vec::Vec;

/// A run of pattern characters, each matching itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Literal {
    text: String,
    /// `None` when case matters. Otherwise, for each prefix of `text`, the
    /// length of its longest proper prefix that is also its suffix (ASCII
    /// case ignored): where a partial match resumes after a mismatch.
    fallback: Option<Vec<usize>>,
}

impl Literal {
    /// A literal that matches `text`, ignoring ASCII case or not.
    pub(super) fn new(text: &str, ignore_case: bool) -> Literal {
        if ignore_case {
            Literal::ignoring_case(text)
        } else {
            Literal::exact(text)
        }
    }

    /// A literal that matches `text` exactly.
    fn exact(text: &str) -> Literal {
        Literal {
            text: text.into(),
            fallback: None,
        }
    }

    /// A literal that matches `text` with ASCII letters in either case.
    fn ignoring_case(text: &str) -> Literal {
        let bytes = text.as_bytes();
        let mut fallback = Vec::with_capacity(bytes.len());
        let mut matched = 0;
        for (i, &b) in bytes.iter().enumerate() {
            if i > 0 {
                matched = resume(bytes, &fallback, matched, b);
            }
            fallback.push(matched);
        }
        Literal {
            text: text.into(),
            fallback: Some(fallback),
        }
    }

    /// Whether ASCII letters match in either case.
    pub(super) fn ignores_case(&self) -> bool {
        self.fallback.is_some()
    }

    /// Length in bytes.
    pub(super) fn len(&self) -> usize {
        self.text.len()
    }

    /// Whether `a` equals the literal.
    pub(super) fn equals(&self, a: &str) -> bool {
        match self.fallback {
            None => a == self.text,
            Some(_) => a.eq_ignore_ascii_case(&self.text),
        }
    }

    /// `text` after the literal, if it starts with it.
    pub(super) fn strip_prefix_of<'t>(&self, text: &'t str) -> Option<&'t str> {
        let head = text.get(..self.len())?;
        self.equals(head).then(|| text.get(self.len()..))?
    }

    /// `text` before the literal, if it ends with it.
    pub(super) fn strip_suffix_of<'t>(&self, text: &'t str) -> Option<&'t str> {
        let start = text.len().checked_sub(self.len())?;
        self.equals(text.get(start..)?).then(|| text.get(..start))?
    }

    /// Where the literal first occurs in `text`.
    pub(super) fn find_in(&self, text: &str) -> Option<usize> {
        let Some(fallback) = &self.fallback else {
            return text.find(self.text.as_str());
        };
        let needle = self.text.as_bytes();
        if needle.is_empty() {
            return Some(0);
        }
        let mut matched = 0;
        for (i, &b) in text.as_bytes().iter().enumerate() {
            matched = resume(needle, fallback, matched, b);
            if matched == needle.len() {
                return Some(i + 1 - matched);
            }
        }
        None
    }
}

/// How much of `needle` is matched after byte `b`, when `matched` bytes of
/// it were before: extend the match, or fall back until it extends (or to
/// nothing). Each fallback shortens the match, so a search takes time
/// linear in the text.
fn resume(needle: &[u8], fallback: &[usize], mut matched: usize, b: u8) -> usize {
    loop {
        if needle
            .get(matched)
            .is_some_and(|n| n.eq_ignore_ascii_case(&b))
        {
            return matched + 1;
        }
        match matched.checked_sub(1).and_then(|last| fallback.get(last)) {
            Some(&shorter) => matched = shorter,
            None => return 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_ignoring_case() {
        let cases: &[(&str, &str, Option<usize>)] = &[
            ("", "abc", Some(0)),
            ("b", "ABC", Some(1)),
            ("ABAC", "abababac", Some(4)),
            ("aab", "aaaaAB", Some(3)),
            ("abcabd", "ABCABCABD", Some(3)),
            ("aa", "a", None),
            ("é", "xÉé", Some(3)),
            ("x", "", None),
        ];
        for &(needle, text, expected) in cases {
            assert_eq!(
                Literal::ignoring_case(needle).find_in(text),
                expected,
                "{needle:?} in {text:?}"
            );
            // Agrees with a lowered copy, the obvious way.
            let lowered = text.to_ascii_lowercase();
            assert_eq!(expected, lowered.find(&needle.to_ascii_lowercase()));
        }
        assert_eq!(Literal::exact("B").find_in("abB"), Some(2));
    }

    #[test]
    fn strips_ignoring_case_only_when_asked() {
        let folded = Literal::ignoring_case("/Api");
        assert_eq!(folded.strip_prefix_of("/aPI/x"), Some("/x"));
        assert_eq!(folded.strip_suffix_of("/x/API"), Some("/x"));
        assert_eq!(folded.strip_prefix_of("/Ap"), None);
        let exact = Literal::exact("/Api");
        assert_eq!(exact.strip_prefix_of("/aPI/x"), None);
        assert_eq!(exact.strip_prefix_of("/Api/x"), Some("/x"));
        // A multi-byte character is never split.
        assert_eq!(Literal::ignoring_case("a").strip_suffix_of("é"), None);
    }

    #[test]
    fn search_is_linear() {
        // A naive search would compare about n·m bytes here.
        let text = "a".repeat(1 << 16);
        let needle = alloc::format!("{}B", "A".repeat(1 << 12));
        let literal = Literal::ignoring_case(&needle);
        for _ in 0..20 {
            assert_eq!(literal.find_in(&text), None);
        }
    }
}
