//! Collecting configuration problems with the path of the field at fault.

use sluice_core::config::FieldError;

/// Every problem found in one pass, so a user fixes them all at once.
#[derive(Debug, Default)]
pub struct Problems(Vec<FieldError>);

impl Problems {
    /// Records `message` about the field at `path`.
    pub fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            path: path.into(),
            message: message.into(),
        });
    }

    /// Records core's errors for a nested config, prefixed with where it sits.
    pub fn extend_under(&mut self, prefix: &str, errors: Vec<FieldError>) {
        for e in errors {
            self.add(format!("{prefix}.{}", e.path), e.message);
        }
    }

    /// Whether nothing was found.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The problems found.
    pub fn into_vec(self) -> Vec<FieldError> {
        self.0
    }
}
