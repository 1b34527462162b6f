//! The record: a request's status, value or error, metadata and timings, as
//! stored in the result store (a JetStream KV bucket, key = request id).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use time::OffsetDateTime;

use crate::error::{Error, Result};
use crate::request::Request;

/// Version of the record written by this crate.
pub const RECORD_VERSION: u32 = 1;

/// Where a request is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Status {
    /// Stored, waiting for a worker.
    Pending,
    /// A worker is running it.
    Running,
    /// An attempt failed; another is due.
    Retrying,
    /// Finished with a value. Terminal.
    Succeeded,
    /// Failed for good. Terminal.
    Failed,
    /// Cancelled. Terminal.
    Cancelled,
    /// A workflow waits (a durable sleep, a `recv`) and holds no worker: a
    /// wake-up message resumes it at `next_attempt_at`, or earlier when a
    /// message it waits for is sent. Not an attempt, not a failure.
    Suspended,
    /// A status this version does not know (written by a newer one); treated
    /// as not terminal. Written back as `unknown` if this version rewrites
    /// the record.
    #[serde(other)]
    Unknown,
}

impl Status {
    /// Whether the request is done (`succeeded`, `failed` or `cancelled`).
    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Succeeded | Status::Failed | Status::Cancelled)
    }

    /// The lowercase name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Running => "running",
            Status::Retrying => "retrying",
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
            Status::Suspended => "suspended",
            Status::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a request failed: a machine-readable kind and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorInfo {
    /// e.g. `unknown_task`, `invalid_args`, `panic`, `error`; see [`crate::task_error::kinds`].
    pub kind: String,
    /// What went wrong.
    pub message: String,
}

impl ErrorInfo {
    /// The longest message kept, in bytes; a longer one (an error quoting a
    /// large argument, say) is cut there, so that the record stays small.
    pub const MAX_MESSAGE: usize = 2048;

    /// An error of `kind` (see [`crate::task_error::kinds`]) with a message,
    /// cut to [`MAX_MESSAGE`](Self::MAX_MESSAGE) bytes.
    pub fn new(kind: impl Into<String>, message: impl Into<String>) -> Self {
        let mut message = message.into();
        if message.len() > Self::MAX_MESSAGE {
            let mut end = Self::MAX_MESSAGE;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
            message.push('…');
        }
        ErrorInfo {
            kind: kind.into(),
            message,
        }
    }
}

/// How far a running task has come.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Units done.
    pub current: u64,
    /// Units in all, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
    /// What the task is doing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The versioned JSON record of one request. See `docs/wire-format.md`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Record {
    /// Record version (`1`).
    pub v: u32,
    /// Request id (also the KV key).
    pub id: String,
    /// Task name.
    pub task: String,
    /// Queue.
    pub queue: String,
    /// Status.
    pub status: Status,
    /// The task's return value once `succeeded` (a `null` value is not
    /// written: absent reads as `null`).
    #[serde(default, skip_serializing_if = "is_absent")]
    pub value: Option<Value>,
    /// The last error: the reason of a `failed` record, the last failed attempt of a `retrying` one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
    /// The request's metadata, merged with what the task set (`null` reads
    /// as none).
    #[serde(
        default,
        deserialize_with = "crate::request::null_as_default",
        skip_serializing_if = "Map::is_empty"
    )]
    pub metadata: Map<String, Value>,
    /// Progress reported by the task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// Attempts started so far.
    #[serde(default)]
    pub attempts: u32,
    /// Retries allowed after the first attempt.
    #[serde(default)]
    pub max_retries: u32,
    /// When the request was published.
    #[serde(with = "crate::rfc3339")]
    pub enqueued_at: OffsetDateTime,
    /// When the current (or last) attempt started.
    #[serde(
        default,
        with = "crate::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub started_at: Option<OffsetDateTime>,
    /// When the request reached a terminal status.
    #[serde(
        default,
        with = "crate::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub finished_at: Option<OffsetDateTime>,
    /// When the next attempt is due: a `retrying` record, or a `pending` one
    /// published with a delay.
    #[serde(
        default,
        with = "crate::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub next_attempt_at: Option<OffsetDateTime>,
    /// When a client asked to cancel the request. A running attempt sees its
    /// cancellation token fire; the record then ends `cancelled`.
    #[serde(
        default,
        with = "crate::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub cancel_requested_at: Option<OffsetDateTime>,
    /// Name of the worker that ran (or runs) the last attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// Broker sequence of the message that owns this record: a second
    /// message with the same id (published after the dedup window) is a
    /// duplicate and is dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// What a `suspended` workflow waits for: `sleep`, or `recv` /
    /// `recv:<topic>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
    /// The token of the wake-up message that may resume a `suspended`
    /// workflow: only a message carrying it takes the record over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<String>,
    /// The request whose task published this one (the envelope's `parent`),
    /// woken when this one ends if it is a workflow waiting for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Fields this version does not know (written by a newer one), kept as
    /// they are when the record is rewritten.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A value that is not written: none, or `null` (which reads back the same).
fn is_absent(value: &Option<Value>) -> bool {
    value.as_ref().is_none_or(Value::is_null)
}

impl Record {
    /// The `pending` record of a request just published.
    pub fn pending(req: &Request) -> Self {
        let mut record = Record::pending_unnamed(req);
        record.id.clone_from(&req.id);
        record.task.clone_from(&req.task);
        record.queue.clone_from(&req.queue);
        record.parent.clone_from(&req.parent);
        record
    }

    /// [`pending`](Self::pending) without its identity (`id`, `task`,
    /// `queue` and `parent` left empty), for a worker that fills it in
    /// from the request only if it writes the record.
    pub(crate) fn pending_unnamed(req: &Request) -> Self {
        Record {
            v: RECORD_VERSION,
            id: String::new(),
            task: String::new(),
            queue: String::new(),
            status: Status::Pending,
            value: None,
            error: None,
            metadata: req.metadata.clone(),
            progress: None,
            attempts: 0,
            max_retries: req
                .max_retries
                .unwrap_or(crate::request::DEFAULT_MAX_RETRIES),
            enqueued_at: req.enqueued_at.to_offset(time::UtcOffset::UTC),
            started_at: None,
            finished_at: None,
            next_attempt_at: req.not_before,
            cancel_requested_at: None,
            worker: None,
            seq: None,
            waiting: None,
            resume: None,
            parent: None,
            extra: Map::new(),
        }
    }

    /// The record a client writes to cancel request `id` before any record
    /// of it exists (it is queued, or unknown): `cancelled`, with no task or
    /// queue known. A worker given the request drops it.
    pub fn cancelled_unseen(id: &str, now: OffsetDateTime) -> Self {
        let mut record = Record {
            v: RECORD_VERSION,
            id: id.to_owned(),
            task: String::new(),
            queue: String::new(),
            status: Status::Pending,
            value: None,
            error: None,
            metadata: Map::new(),
            progress: None,
            attempts: 0,
            max_retries: 0,
            enqueued_at: now,
            started_at: None,
            finished_at: None,
            next_attempt_at: None,
            cancel_requested_at: None,
            worker: None,
            seq: None,
            waiting: None,
            resume: None,
            parent: None,
            extra: Map::new(),
        };
        record.mark_cancelled(now);
        record
    }

    /// Make this record `cancelled` at a client's request, as of `now`: the
    /// terminal state the client writes for a request that is not running,
    /// and the worker writes when a cancelled attempt ends.
    pub fn mark_cancelled(&mut self, now: OffsetDateTime) {
        self.status = Status::Cancelled;
        self.value = None;
        self.error = Some(ErrorInfo::new(
            crate::task_error::kinds::CANCELLED,
            "cancelled at a client's request",
        ));
        self.cancel_requested_at.get_or_insert(now);
        self.finished_at = Some(now);
        self.next_attempt_at = None;
        self.waiting = None;
        self.resume = None;
    }

    /// Encode as JSON.
    pub fn to_json(&self) -> Result<Vec<u8>> {
        // Room for a small record at once: growing from empty reallocates
        // several times.
        let mut out = Vec::with_capacity(512);
        serde_json::to_writer(&mut out, self)
            .map_err(|e| Error::serialization("encoding the record", e))?;
        Ok(out)
    }

    /// Decode from JSON.
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        serde_json::from_slice(bytes).map_err(|e| Error::serialization("malformed record", e))
    }

    /// Decode the stored record of request `id`; an error names the id.
    pub fn decode(id: &str, bytes: &[u8]) -> Result<Self> {
        serde_json::from_slice(bytes).map_err(|e| {
            Error::serialization(
                &format!(
                    "the stored record of `{id}` is not a jetq record ({} bytes)",
                    bytes.len()
                ),
                e,
            )
        })
    }

    /// Decode the value of a `succeeded` record into `T`.
    pub fn value_as<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        T::deserialize(self.value.as_ref().unwrap_or(&Value::Null)).map_err(value_error)
    }

    /// [`value_as`](Self::value_as) for a value still in its JSON text (as
    /// a record is read without decoding its value).
    pub(crate) fn raw_value_as<T: serde::de::DeserializeOwned>(value: Option<&str>) -> Result<T> {
        match value {
            Some(value) => serde_json::from_str(value),
            None => T::deserialize(Value::Null),
        }
        .map_err(value_error)
    }
}

/// A task's value that does not decode into the type asked for.
fn value_error(e: serde_json::Error) -> Error {
    Error::serialization("decoding the task's value", e)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unset fields are left out, never written as `null`, and read back as
    /// they were.
    #[test]
    fn records_are_written_without_nulls_and_read_back_the_same() -> Result<()> {
        let mut request = Request::new("demo.add");
        request.id = "compact-1".to_owned();
        let pending = Record::pending(&request);
        let json: Map<String, Value> = serde_json::from_slice(&pending.to_json()?)
            .map_err(|e| Error::serialization("test", e))?;
        let keys: Vec<&str> = json.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "attempts",
                "enqueued_at",
                "id",
                "max_retries",
                "queue",
                "status",
                "task",
                "v"
            ],
            "{json:?}"
        );
        assert!(json.values().all(|v| !v.is_null()), "{json:?}");
        assert_eq!(Record::from_json(&pending.to_json()?)?, pending);

        let mut done = pending.clone();
        done.status = Status::Succeeded;
        done.value = Some(Value::Null);
        done.worker = Some("w".to_owned());
        done.finished_at = Some(done.enqueued_at);
        let bytes = done.to_json()?;
        let json: Map<String, Value> =
            serde_json::from_slice(&bytes).map_err(|e| Error::serialization("test", e))?;
        assert!(
            !json.contains_key("value") && json.values().all(|v| !v.is_null()),
            "{json:?}"
        );
        let back = Record::from_json(&bytes)?;
        assert_eq!((back.value, back.worker.as_deref()), (None, Some("w")));
        assert_eq!(back.finished_at, done.finished_at);

        // The explicit nulls of earlier writers read the same as absent fields.
        let old = br#"{"v":1,"id":"x","task":"t","queue":"default","status":"running","value":null,"error":null,"metadata":null,"progress":null,"attempts":1,"max_retries":3,"enqueued_at":"2026-01-01T00:00:00Z","started_at":null,"finished_at":null,"next_attempt_at":null,"worker":null}"#;
        let old = Record::from_json(old)?;
        assert!(old.value.is_none() && old.error.is_none() && old.metadata.is_empty());
        assert!(old.worker.is_none() && old.started_at.is_none());
        Ok(())
    }
}
