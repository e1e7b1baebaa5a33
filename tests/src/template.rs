//! Rendering of `envoy/sluice-http.template.yaml`.
//!
//! The template language is deliberately tiny:
//! - `{{NAME}}` is replaced by the value of variable `NAME`. When the
//!   placeholder is alone on its line, the value may span several lines: each
//!   is indented like the placeholder (for YAML block scalars).
//! - Lines between `#{{#NAME}}` and `#{{/NAME}}` (YAML comments, so the
//!   template stays readable YAML) are kept only when section `NAME` is on.
//! - The leading comment block (the template's own documentation, up to the
//!   first line that is not a comment) is replaced by a caller-given header.
//! - Whole-line comments are copied as they are, placeholders included.
//!
//! Unknown sections, unbalanced markers and placeholders left without a value
//! are errors: a typo must not render a silently different config.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use anyhow::{bail, Context as _, Result};

use crate::repo_root;

/// The template's path in the repository.
pub fn template_path() -> PathBuf {
    repo_root().join("envoy/sluice-http.template.yaml")
}

/// The template's text.
pub fn load_template() -> Result<String> {
    let path = template_path();
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

/// Variables and sections for one rendering.
#[derive(Debug, Clone, Default)]
pub struct Vars {
    values: BTreeMap<String, String>,
    sections: BTreeSet<String>,
}

impl Vars {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets variable `name`.
    pub fn set(mut self, name: &str, value: impl Into<String>) -> Self {
        self.values.insert(name.to_owned(), value.into());
        self
    }

    /// Turns section `name` on.
    pub fn section(mut self, name: &str) -> Self {
        self.sections.insert(name.to_owned());
        self
    }

    /// Turns section `name` on or off.
    pub fn section_if(self, name: &str, on: bool) -> Self {
        if on {
            self.section(name)
        } else {
            self
        }
    }
}

/// Quotes `s` as a YAML double-quoted scalar (JSON string syntax is valid
/// YAML).
pub fn yaml_quote(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

/// Renders `template` with `vars`, replacing its leading comment block with
/// `header` (each line should be a `#` comment; may be empty).
pub fn render(template: &str, vars: &Vars, header: &str) -> Result<String> {
    let mut known_sections = BTreeSet::new();
    let mut out = String::with_capacity(template.len() + 1024);
    out.push_str(header);
    if !header.is_empty() && !header.ends_with('\n') {
        out.push('\n');
    }

    let mut lines = template.lines().enumerate().peekable();
    // Skip the template's own documentation.
    while let Some((_, line)) = lines.peek() {
        let trimmed = line.trim();
        let is_marker = marker(trimmed, "#{{#").is_some() || marker(trimmed, "#{{/").is_some();
        if trimmed.starts_with('#') && !is_marker {
            lines.next();
        } else {
            break;
        }
    }
    // Skip blank lines that followed it when there is no header.
    if header.is_empty() {
        while let Some((_, line)) = lines.peek() {
            if line.trim().is_empty() {
                lines.next();
            } else {
                break;
            }
        }
    }

    // Stack of (section name, kept?).
    let mut stack: Vec<(String, bool)> = Vec::new();
    for (index, line) in lines {
        let lineno = index + 1;
        let trimmed = line.trim();
        if let Some(name) = marker(trimmed, "#{{#") {
            known_sections.insert(name.to_owned());
            stack.push((name.to_owned(), vars.sections.contains(name)));
            continue;
        }
        if let Some(name) = marker(trimmed, "#{{/") {
            match stack.pop() {
                Some((open, _)) if open == name => continue,
                Some((open, _)) => {
                    bail!("template line {lineno}: `#{{{{/{name}}}}}` closes section `{open}`")
                }
                None => bail!("template line {lineno}: `#{{{{/{name}}}}}` without an opening"),
            }
        }
        if stack.iter().any(|(_, kept)| !kept) {
            continue;
        }
        if trimmed.starts_with('#') {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        // A placeholder alone on its line: a block value.
        if let Some(name) = trimmed
            .strip_prefix("{{")
            .and_then(|rest| rest.strip_suffix("}}"))
            .filter(|name| is_name(name))
        {
            let value = vars
                .values
                .get(name)
                .with_context(|| format!("template line {lineno}: no value for {{{{{name}}}}}"))?;
            let indent = &line[..line.len() - line.trim_start().len()];
            for value_line in value.trim().lines() {
                if value_line.is_empty() {
                    out.push('\n');
                } else {
                    out.push_str(indent);
                    out.push_str(value_line);
                    out.push('\n');
                }
            }
            continue;
        }
        out.push_str(&substitute_inline(line, vars, lineno)?);
        out.push('\n');
    }
    if let Some((open, _)) = stack.pop() {
        bail!("template: section `{open}` is never closed");
    }
    if let Some(unknown) = vars.sections.iter().find(|s| !known_sections.contains(*s)) {
        bail!("template has no section `{unknown}`");
    }
    Ok(out)
}

fn marker<'a>(trimmed: &'a str, prefix: &str) -> Option<&'a str> {
    trimmed
        .strip_prefix(prefix)
        .and_then(|rest| rest.strip_suffix("}}"))
        .filter(|name| is_name(name))
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn substitute_inline(line: &str, vars: &Vars, lineno: usize) -> Result<String> {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            bail!("template line {lineno}: unterminated `{{{{`");
        };
        let name = &after[..end];
        let value = vars
            .values
            .get(name)
            .with_context(|| format!("template line {lineno}: no value for {{{{{name}}}}}"))?;
        if value.contains('\n') {
            bail!(
                "template line {lineno}: {{{{{name}}}}} has several lines; \
                 put the placeholder alone on its line"
            );
        }
        out.push_str(value);
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = "# doc {{X}}\n# more\n\na: {{X}}\n#{{#s}}\nb:\n  c: |\n    {{BLOCK}}\n#{{/s}}\n# kept {{Y}}\nd: 1\n";

    #[test]
    fn sections_blocks_and_comments() {
        let vars = Vars::new()
            .set("X", "1")
            .set("BLOCK", "{\n  \"k\": 2\n}")
            .section("s");
        let got = render(T, &vars, "# header").unwrap();
        assert_eq!(
            got,
            "# header\n\na: 1\nb:\n  c: |\n    {\n      \"k\": 2\n    }\n# kept {{Y}}\nd: 1\n"
        );
        let got = render(T, &Vars::new().set("X", "1"), "").unwrap();
        assert_eq!(got, "a: 1\n# kept {{Y}}\nd: 1\n");
    }

    #[test]
    fn errors() {
        assert!(render(T, &Vars::new(), "").is_err());
        assert!(render(T, &Vars::new().set("X", "1").section("nope"), "").is_err());
        assert!(render("a: {{X}}\n", &Vars::new().set("X", "1\n2"), "").is_err());
        assert!(render("#{{#a}}\nx: 1\n", &Vars::new(), "").is_err());
        assert!(render("#{{/a}}\nx: 1\n", &Vars::new(), "").is_err());
    }
}
