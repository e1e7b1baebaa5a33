//! Where a validation error's field path (`rules[2].limit.per`) is in the
//! pasted JSON text, so the page can point at the line.

/// One step of a field path.
#[derive(Debug, PartialEq, Eq)]
enum Step<'a> {
    /// An object member.
    Key(&'a str),
    /// An array element.
    Index(usize),
}

/// The steps of `path` (`a.b[2].c`); a path that is no field path, such
/// as `(document)`, gives none.
fn steps(path: &str) -> Vec<Step<'_>> {
    let mut out = Vec::new();
    for part in path.split('.') {
        let (name, indexes) = part.split_once('[').unwrap_or((part, ""));
        if !name.is_empty() {
            out.push(Step::Key(name));
        }
        for index in indexes.split('[') {
            if let Some(n) = index.strip_suffix(']').and_then(|n| n.parse().ok()) {
                out.push(Step::Index(n));
            }
        }
    }
    out
}

/// Line and column (both 1-based) of the deepest part of `path` present in
/// `text`: the member's name, or the element, or the nearest enclosing
/// value when the field itself is missing.
pub fn locate(text: &str, path: &str) -> Option<(usize, usize)> {
    let mut cursor = Cursor {
        bytes: text.as_bytes(),
        at: 0,
    };
    cursor.skip_space();
    let offset = cursor.find(&steps(path))?;
    let before = text.get(..offset)?;
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    Some((line, column))
}

/// A position in JSON text.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn skip_space(&mut self) {
        while self.peek().is_some_and(|b| b.is_ascii_whitespace()) {
            self.at += 1;
        }
    }

    /// Takes `byte` (after any space) if it is next.
    fn eat(&mut self, byte: u8) -> bool {
        self.skip_space();
        let found = self.peek() == Some(byte);
        if found {
            self.at += 1;
        }
        found
    }

    /// Reads a string at the cursor, giving its raw contents.
    fn string(&mut self) -> Option<&'a [u8]> {
        let bytes = self.bytes;
        if !self.eat(b'"') {
            return None;
        }
        let start = self.at;
        while let Some(b) = self.peek() {
            self.at += 1;
            match b {
                b'\\' => self.at += 1,
                b'"' => return bytes.get(start..self.at - 1),
                _ => {}
            }
        }
        None
    }

    /// Skips one value of any kind.
    fn skip_value(&mut self) -> Option<()> {
        self.skip_space();
        match self.peek()? {
            b'"' => self.string().map(|_| ()),
            open @ (b'{' | b'[') => {
                let close = if open == b'{' { b'}' } else { b']' };
                self.at += 1;
                if self.eat(close) {
                    return Some(());
                }
                loop {
                    if open == b'{' {
                        self.string()?;
                        if !self.eat(b':') {
                            return None;
                        }
                    }
                    self.skip_value()?;
                    if self.eat(close) {
                        return Some(());
                    }
                    if !self.eat(b',') {
                        return None;
                    }
                }
            }
            _ => {
                while self
                    .peek()
                    .is_some_and(|b| !matches!(b, b',' | b'}' | b']') && !b.is_ascii_whitespace())
                {
                    self.at += 1;
                }
                Some(())
            }
        }
    }

    /// From the value at the cursor, the offset of the deepest of `steps`
    /// found (the value's own offset when none is).
    fn find(&mut self, steps: &[Step<'_>]) -> Option<usize> {
        self.skip_space();
        let here = self.at;
        let Some((step, rest)) = steps.split_first() else {
            return Some(here);
        };
        match (step, self.peek()) {
            (Step::Key(name), Some(b'{')) => {
                self.at += 1;
                if self.eat(b'}') {
                    return Some(here);
                }
                loop {
                    self.skip_space();
                    let key_at = self.at;
                    let key = self.string()?;
                    if !self.eat(b':') {
                        return Some(here);
                    }
                    if key == name.as_bytes() {
                        return match rest {
                            [] => Some(key_at),
                            _ => self.find(rest).or(Some(key_at)),
                        };
                    }
                    self.skip_value()?;
                    if !self.eat(b',') {
                        return Some(here);
                    }
                }
            }
            (Step::Index(n), Some(b'[')) => {
                self.at += 1;
                for _ in 0..*n {
                    self.skip_value()?;
                    if !self.eat(b',') {
                        return Some(here);
                    }
                }
                self.skip_space();
                if self.peek() == Some(b']') {
                    return Some(here);
                }
                self.find(rest)
            }
            _ => Some(here),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "{\n  \"rules\": [\n    {\"name\": \"a\"},\n    {\"name\": \"b\",\n     \"limit\": {\"count\": 0, \"per\": \"1x\"}}\n  ]\n}";

    #[test]
    fn a_field_is_found_at_its_name() {
        assert_eq!(locate(TEXT, "rules[1].limit.per"), Some((5, 28)));
        assert_eq!(locate(TEXT, "rules[0].name"), Some((3, 6)));
    }

    #[test]
    fn a_missing_field_points_at_its_parent() {
        // rules[1] has no `key`: its object, at line 4.
        assert_eq!(locate(TEXT, "rules[1].key"), Some((4, 5)));
        assert_eq!(locate(TEXT, "rules[7].name"), Some((2, 12)));
        assert_eq!(locate(TEXT, "(document)"), Some((1, 1)));
    }

    #[test]
    fn paths_split_into_steps() {
        assert_eq!(
            steps("rules[2].limit.per"),
            [
                Step::Key("rules"),
                Step::Index(2),
                Step::Key("limit"),
                Step::Key("per")
            ]
        );
        assert_eq!(
            steps("a[1][2]"),
            [Step::Key("a"), Step::Index(1), Step::Index(2)]
        );
    }
}
