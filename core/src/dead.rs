//! Dead letters: requests that failed for good, kept with the reason so an
//! operator can look at them and requeue them.

use bytes::Bytes;
use time::OffsetDateTime;

use crate::error::{Error, Result};
use crate::names;
use crate::record::ErrorInfo;
use crate::request::Request;

/// A request that failed for good: the original envelope, byte for byte,
/// and why it died.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct DeadLetter {
    /// The request id; for an envelope without a usable id,
    /// `invalid-<queue>-<sequence>`.
    pub id: String,
    /// The queue it was consumed from.
    pub queue: String,
    /// The task name, if the envelope had one.
    pub task: String,
    /// Why it died (the same kind and message as the `failed` record).
    pub error: ErrorInfo,
    /// Attempts started.
    pub attempts: u32,
    /// When it was dead-lettered.
    pub died_at: OffsetDateTime,
    /// The worker that gave up on it.
    pub worker: String,
    /// The broker sequence of the original message.
    pub sequence: u64,
    /// The original request envelope (empty if it was left out).
    pub payload: Bytes,
    /// The size of the request, when the dead letter was stored without it
    /// because the two together were larger than the broker accepts.
    pub payload_omitted: Option<usize>,
    /// Where the broker keeps this letter among its dead letters (NATS: its
    /// sequence in the dead-letter stream), set on letters read back from a
    /// broker; `None` on one not stored yet. Later letters have higher
    /// numbers. [`Client::requeue`](crate::Client::requeue) removes the
    /// letter it requeued by it, with
    /// [`Broker::remove_dead_letters_through`](crate::broker::Broker::remove_dead_letters_through).
    pub dead_sequence: Option<u64>,
}

impl DeadLetter {
    /// A dead letter of the message at `sequence` on `queue`.
    pub fn new(
        id: impl Into<String>,
        queue: impl Into<String>,
        task: impl Into<String>,
        error: ErrorInfo,
        payload: Bytes,
    ) -> Self {
        DeadLetter {
            id: id.into(),
            queue: queue.into(),
            task: task.into(),
            error,
            attempts: 0,
            died_at: OffsetDateTime::now_utc(),
            worker: String::new(),
            sequence: 0,
            payload,
            payload_omitted: None,
            dead_sequence: None,
        }
    }

    /// The key of the dead letter of an envelope without a usable id.
    pub fn invalid_key(queue: &str, sequence: u64) -> String {
        format!("invalid-{queue}-{sequence}")
    }

    /// The original request, decoded; an error of kind
    /// [`ErrorKind::Serialization`](crate::ErrorKind::Serialization) or
    /// [`ErrorKind::InvalidName`](crate::ErrorKind::InvalidName) if the
    /// envelope itself was the problem.
    pub fn request(&self) -> Result<Request> {
        if let Some(size) = self.payload_omitted {
            return Err(Error::new(
                crate::ErrorKind::PayloadTooLarge,
                format!(
                    "the dead letter `{}` was stored without its request ({size} bytes): with the reason it did not fit in a message",
                    self.id
                ),
            ));
        }
        Request::from_json(&self.payload).map_err(|e| {
            Error::new(
                e.kind(),
                format!(
                    "the dead letter `{}` does not hold a valid request: {}",
                    self.id,
                    e.message()
                ),
            )
        })
    }

    /// Check the names that become part of subjects.
    pub fn validate(&self) -> Result<()> {
        names::validate_id(&self.id)?;
        names::validate_queue(&self.queue)
    }
}
