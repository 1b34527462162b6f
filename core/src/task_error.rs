//! The error a task returns, and whether it is worth retrying.

use std::fmt;
use std::time::Duration;

use crate::record::ErrorInfo;

/// The `kind` strings jetq writes into a record's `error`.
pub mod kinds {
    /// The handler returned an error.
    pub const ERROR: &str = "error";
    /// No handler is registered for the task on this queue.
    pub const UNKNOWN_TASK: &str = "unknown_task";
    /// The request envelope could not be decoded or broke a naming rule.
    pub const INVALID_REQUEST: &str = "invalid_request";
    /// The arguments did not deserialize into the handler's type.
    pub const INVALID_ARGS: &str = "invalid_args";
    /// The metadata did not deserialize into the handler's type.
    pub const INVALID_METADATA: &str = "invalid_metadata";
    /// An extractor (dependency, resource) failed.
    pub const EXTRACTOR: &str = "extractor";
    /// The handler panicked.
    pub const PANIC: &str = "panic";
    /// The attempt ran past its time limit.
    pub const TIMEOUT: &str = "timeout";
    /// The request was cancelled by a client (on a `cancelled` record).
    pub const CANCELLED: &str = "cancelled";
    /// The request used up its attempts without the last one reporting back
    /// within the ack wait (its worker stopped, died or was cut off).
    pub const ABANDONED: &str = "abandoned";
    /// The task's value or metadata does not fit in a record (the broker's
    /// message size limit).
    pub const TOO_LARGE: &str = "too_large";
    /// The worker shut down during the attempt and released the request for
    /// immediate redelivery (on a `retrying` record).
    pub const INTERRUPTED: &str = "interrupted";
    /// The message carries an id that another request holds (a different
    /// task or queue), so it was refused without touching that request's
    /// record (on its dead letter, keyed `invalid-<queue>-<sequence>`).
    pub const ID_CONFLICT: &str = "id_conflict";
    /// The stored record of the request is not a jetq record (not JSON); the
    /// request was failed with a fresh record instead of looping on it.
    pub const CORRUPT_RECORD: &str = "corrupt_record";
    /// A step of a chained workflow aborted the run
    /// ([`Next::Abort`](crate::workflow::Next::Abort)): permanent, so the
    /// request fails at once and is dead-lettered.
    pub const ABORTED: &str = "aborted";
}

/// Whether and when a failed attempt should be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Retry {
    /// Retry per the task's policy.
    Default,
    /// Do not retry: the failure is permanent.
    Never,
    /// Retry after this delay (still bounded by max retries).
    After(Duration),
}

/// The error of a task: a kind, a message, and whether to retry.
///
/// Any `std::error::Error` converts into a retryable `TaskError`, so `?`
/// works in handlers; use [`TaskError::permanent`] for failures that another
/// attempt cannot fix.
pub struct TaskError {
    kind: String,
    message: String,
    retry: Retry,
    /// Set when a workflow suspends: not a failure, the worker parks the run.
    suspend: Option<Box<Suspension>>,
}

/// A workflow's wish to stop here and be resumed later, without holding a
/// worker (see `Status::Suspended`). It travels out of the workflow function
/// as a [`TaskError`] so that `?` carries it; the worker recognises it.
#[derive(Debug, Clone)]
pub(crate) struct Suspension {
    /// When to resume at the latest.
    pub(crate) until: time::OffsetDateTime,
    /// What the run waits for, as the record shows it (`sleep`, `recv:<topic>`).
    pub(crate) waiting: String,
    /// What to look at once the record says `suspended`, in case what the
    /// run waits for came in meanwhile (its sender saw no `suspended` record
    /// and woke nobody).
    pub(crate) check: Option<WakeCheck>,
}

/// What a suspended run waits for, to look at after suspending.
#[derive(Debug, Clone)]
pub(crate) enum WakeCheck {
    /// A message in the mailbox of run `id` for `topic`, from sequence `from`.
    Mail {
        id: String,
        topic: Option<String>,
        from: u64,
    },
    /// The end of child request `child`.
    Child { child: String },
}

impl TaskError {
    /// A retryable error.
    pub fn new(message: impl Into<String>) -> Self {
        TaskError {
            kind: kinds::ERROR.to_owned(),
            message: message.into(),
            retry: Retry::Default,
            suspend: None,
        }
    }

    /// The error that carries a workflow's suspension out of its function.
    pub(crate) fn suspend(suspension: Suspension) -> Self {
        let message = format!(
            "the workflow waits ({}) and is suspended until it is woken",
            suspension.waiting
        );
        let mut e = TaskError::new(message).with_kind("suspended");
        e.suspend = Some(Box::new(suspension));
        e
    }

    /// The suspension this error carries, if it is one.
    pub(crate) fn suspension(&self) -> Option<&Suspension> {
        self.suspend.as_deref()
    }

    /// Whether this error is a workflow's suspension (not a failure): a
    /// handler that catches errors of a workflow's calls must pass these on.
    pub fn is_suspension(&self) -> bool {
        self.suspend.is_some()
    }

    /// An error that retrying cannot fix: the request fails at once.
    pub fn permanent(message: impl Into<String>) -> Self {
        TaskError::new(message).with_retry(Retry::Never)
    }

    /// Set the machine-readable kind written to the record (default `error`).
    pub fn with_kind(mut self, kind: impl Into<String>) -> Self {
        self.kind = kind.into();
        self
    }

    /// Set the retry decision.
    pub fn with_retry(mut self, retry: Retry) -> Self {
        self.retry = retry;
        self
    }

    /// The kind.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The retry decision.
    pub fn retry(&self) -> Retry {
        self.retry
    }

    /// Whether another attempt may help.
    pub fn is_retryable(&self) -> bool {
        !matches!(self.retry, Retry::Never)
    }

    /// The record's view of this error.
    pub fn info(&self) -> ErrorInfo {
        ErrorInfo::new(self.kind.clone(), self.message.clone())
    }
}

impl fmt::Debug for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskError")
            .field("kind", &self.kind)
            .field("message", &self.message)
            .field("retry", &self.retry)
            .finish()
    }
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

impl<E> From<E> for TaskError
where
    E: std::error::Error + Send + Sync + 'static,
{
    fn from(err: E) -> Self {
        TaskError::new(err.to_string())
    }
}
