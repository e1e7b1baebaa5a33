//! A glob matcher that is obviously right rather than fast, to check
//! [`Glob`](super::Glob) against in tests and fuzzing: it follows the rules
//! one character at a time and remembers every (pattern position, text
//! position) answer, so it costs O(n·m) time and memory. Not for production.

use alloc::vec;
use alloc::vec::Vec;

/// Whether all of `text` matches `pattern`: `*` is any run of characters
/// other than `/`, two or more `*` any run at all, anything else itself.
pub fn glob_matches(pattern: &str, text: &str) -> bool {
    let pattern: Vec<char> = pattern.chars().collect();
    let text: Vec<char> = text.chars().collect();
    let memo = vec![None; (pattern.len() + 1) * (text.len() + 1)];
    Reference {
        pattern,
        text,
        memo,
    }
    .matches(0, 0)
}

struct Reference {
    pattern: Vec<char>,
    text: Vec<char>,
    /// Answers by `p * (text.len() + 1) + t`.
    memo: Vec<Option<bool>>,
}

impl Reference {
    /// Whether `pattern[p..]` matches `text[t..]`.
    fn matches(&mut self, p: usize, t: usize) -> bool {
        let slot = p * (self.text.len() + 1) + t;
        if let Some(&Some(known)) = self.memo.get(slot) {
            return known;
        }
        let next = self.text.get(t).copied();
        let answer = match self.pattern.get(p) {
            None => next.is_none(),
            Some('*') => {
                let stars = self
                    .pattern
                    .iter()
                    .skip(p)
                    .take_while(|&&c| c == '*')
                    .count();
                let crosses = stars >= 2;
                // The wildcard ends here, or takes one more character.
                self.matches(p + stars, t)
                    || (next.is_some_and(|c| crosses || c != '/') && self.matches(p, t + 1))
            }
            Some(&c) => next == Some(c) && self.matches(p + 1, t + 1),
        };
        if let Some(entry) = self.memo.get_mut(slot) {
            *entry = Some(answer);
        }
        answer
    }
}
