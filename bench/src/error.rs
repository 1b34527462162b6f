//! Errors with context: what the benchmark was doing, and why it failed.

use std::error::Error as StdError;
use std::fmt;

/// Any error, with its causes.
pub(crate) type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// The benchmark's result type.
pub(crate) type Result<T, E = BoxError> = std::result::Result<T, E>;

/// An error with a note of what was being done when it happened.
#[derive(Debug)]
struct ContextError {
    what: String,
    source: BoxError,
}

impl fmt::Display for ContextError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.what)
    }
}

impl StdError for ContextError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&*self.source)
    }
}

/// Adds what was being done to an error.
pub(crate) trait Context<T> {
    /// Wrap the error with `what`.
    fn context(self, what: &str) -> Result<T>;
    /// Wrap the error with the text `what` makes (only on failure).
    fn with_context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: Into<BoxError>> Context<T> for std::result::Result<T, E> {
    fn context(self, what: &str) -> Result<T> {
        self.map_err(|e| wrap(what.to_owned(), e.into()))
    }

    fn with_context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| wrap(what(), e.into()))
    }
}

fn wrap(what: String, source: BoxError) -> BoxError {
    Box::new(ContextError { what, source })
}

/// An error that is just a message.
pub(crate) fn fail(message: impl Into<String>) -> BoxError {
    message.into().into()
}

/// The error and its causes on one line: `a: b: c`.
pub(crate) fn chain(err: &(dyn StdError + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let text = e.to_string();
        // Some errors repeat their source's text in their own; say it once.
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = e.source();
    }
    out
}
