//! The error type of jetq's client and worker APIs.

use std::fmt;

/// The kind of an [`Error`]: what went wrong, for code that must decide what to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A task name, queue name or id broke a naming rule (it could otherwise
    /// have reached a NATS subject or KV key).
    InvalidName,
    /// Arguments, metadata or a record could not be encoded or decoded.
    Serialization,
    /// The request is larger than the broker accepts.
    PayloadTooLarge,
    /// The broker (NATS) failed or could not be reached.
    Broker,
    /// An operation did not finish in the time allowed.
    Timeout,
    /// No record exists for the id.
    NotFound,
    /// An atomic create found the key already present.
    AlreadyExists,
    /// An update lost a race: the record changed since it was read.
    Conflict,
    /// The worker or client was configured wrongly (a missing state, a task
    /// registered twice, ...).
    Config,
    /// The task ended `failed`; the record's error says why.
    TaskFailed,
    /// The task ended `cancelled`.
    Cancelled,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            ErrorKind::InvalidName => "invalid name",
            ErrorKind::Serialization => "serialization error",
            ErrorKind::PayloadTooLarge => "payload too large",
            ErrorKind::Broker => "broker error",
            ErrorKind::Timeout => "timed out",
            ErrorKind::NotFound => "not found",
            ErrorKind::AlreadyExists => "already exists",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Config => "configuration error",
            ErrorKind::TaskFailed => "task failed",
            ErrorKind::Cancelled => "task cancelled",
        };
        f.write_str(s)
    }
}

type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An error of jetq: a [`kind`](Error::kind), a message saying what was wrong
/// and what to do, and, where there is one, the underlying error as `source()`.
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<Source>,
}

impl Error {
    /// A new error of `kind` with a message for the user.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// Attach the underlying error.
    pub fn with_source(mut self, source: impl Into<Source>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message, without the kind.
    pub fn message(&self) -> &str {
        &self.message
    }

    pub(crate) fn serialization(what: &str, err: serde_json::Error) -> Self {
        Error::new(ErrorKind::Serialization, format!("{what}: {err}")).with_source(err)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.kind).field("message", &self.message);
        if let Some(s) = &self.source {
            d.field("source", s);
        }
        d.finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some(s) = &self.source {
            let s = s.to_string();
            if !self.message.contains(&s) {
                write!(f, ": {s}")?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}

/// `Result` with jetq's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
