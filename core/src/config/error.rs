//! What a refused configuration reports: every problem, with where it is.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

/// One problem in a configuration, with where it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the field, e.g. `rules[2].limit.per`.
    pub path: String,
    /// What is wrong and what is expected.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Why a configuration was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The text is not valid JSON/YAML of the expected shape.
    #[error("invalid {format}: {message}")]
    Syntax {
        /// `JSON` or `YAML`.
        format: &'static str,
        /// The parser's message, with line and column.
        message: String,
    },
    /// The shape is right but some values are not.
    #[error("{}", ErrorList(.0))]
    Invalid(Vec<FieldError>),
}

/// Displays field errors separated by `; `, as one message.
pub struct ErrorList<'a>(pub &'a [FieldError]);

impl fmt::Display for ErrorList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Collects field errors while validating, so every problem is reported.
#[derive(Default)]
pub(super) struct Errors(Vec<FieldError>);

impl Errors {
    /// Records `message` against field `field` of the item at `at`.
    pub(super) fn add(&mut self, at: &str, field: &str, message: String) {
        self.0.push(FieldError {
            path: format!("{at}{field}"),
            message,
        });
    }

    /// How many problems were recorded so far.
    pub(super) fn count(&self) -> usize {
        self.0.len()
    }

    /// `Ok` when nothing was recorded, else every problem.
    pub(super) fn finish(self) -> Result<(), ConfigError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(self.0))
        }
    }
}
