//! The request envelope: what a producer publishes and a worker runs.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use time::OffsetDateTime;

use crate::error::{Error, ErrorKind, Result};
use crate::names;

/// Version of the request envelope written by this crate.
pub const REQUEST_VERSION: u32 = 1;

/// The queue used when none is given.
pub const DEFAULT_QUEUE: &str = "default";

/// Retries allowed when neither the request nor the task says otherwise.
pub const DEFAULT_MAX_RETRIES: u32 = 3;

/// The most retries a request may ask for. Larger values are refused at
/// publish and lowered to this by workers (a foreign producer may send any
/// number), so every count derived from it stays far from overflow.
pub const MAX_RETRIES_LIMIT: u32 = 10_000;

/// The longest delay a request may ask for (about ten years). NATS stores
/// schedule times and nak delays as 64-bit nanoseconds; a time it cannot
/// represent fires at once, so longer delays are refused at publish and
/// refused by workers.
pub const MAX_DELAY: std::time::Duration = std::time::Duration::from_secs(10 * 365 * 24 * 3600);

/// A request to run a task: the versioned JSON envelope published to the
/// task stream. See `docs/wire-format.md`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Request {
    /// Envelope version (`1`).
    pub v: u32,
    /// Request id: a UUID, or the caller's idempotency key.
    pub id: String,
    /// Task name, e.g. `images.resize`.
    pub task: String,
    /// Queue the request was published to.
    pub queue: String,
    /// The task's arguments: JSON text, kept as published until the task
    /// decodes it into its own type (with [`Args`](crate::Args) or
    /// [`args_as`](Self::args_as)), so that they are decoded once, not into
    /// a [`Value`] first. [`set_args`](Self::set_args) encodes them.
    #[serde(default)]
    pub args: Box<RawValue>,
    /// Free-form metadata (a JSON object), readable in the task and copied
    /// to the record; `null` means none. Left out of the envelope when
    /// empty.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Map::is_empty"
    )]
    pub metadata: Map<String, Value>,
    /// When the producer published it.
    #[serde(with = "crate::rfc3339")]
    pub enqueued_at: OffsetDateTime,
    /// Retries allowed after the first attempt; absent means the task's own
    /// policy (the worker's default is [`DEFAULT_MAX_RETRIES`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
    /// Not to run before this time (a delayed request). Brokers hold it back
    /// until then (NATS: a server-side message schedule); a worker that gets
    /// it early puts it back until it is due.
    #[serde(
        default,
        with = "crate::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub not_before: Option<OffsetDateTime>,
    /// Propagated headers: trace context (`traceparent`, `tracestate`) and
    /// auth (`authorization`).
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub headers: BTreeMap<String, String>,
    /// Where the worker sends the request's record once it has ended: the
    /// producer's private inbox (NATS: a subject under the connection's inbox
    /// prefix, `_INBOX.<token>`), so that a producer waiting for results
    /// needs one subscription for all of them. Optional; a worker ignores an
    /// address its broker does not accept as an inbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<String>,
    /// The producer will not read the result: a worker that runs the request
    /// successfully at its first delivery writes no record (it neither reads
    /// nor writes the record store, as Celery's `ignore_result`). Failures,
    /// retries, cancellations and attempts still running after a while are
    /// recorded as usual. Such a request runs at least once rather than once:
    /// see `docs/guarantees.md`.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "is_false"
    )]
    pub ignore_result: bool,
    /// A worker starts the request at its first delivery without reading
    /// its record first (the read that finds a cancellation made while it
    /// was queued, or the record of an earlier request under the same id):
    /// one server round trip less before the task runs. Its outcome is
    /// recorded as usual, and never over a record that another message
    /// owns or that was cancelled; but it runs at least once rather than
    /// once, as an `ignore_result` request does: see `docs/guarantees.md`.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "is_false"
    )]
    pub start_unchecked: bool,
    /// The producer follows the request's record as the broker republishes
    /// it (NATS: `{prefix}.records.<id>`), which reaches it before anything
    /// the worker could send: a worker tags the write that ends the record
    /// ([`crate::tag`]: an HMAC of the record keyed by `notify`), so that
    /// the producer can tell it from a forged one, and sends nothing to the
    /// inbox if the write carried the tag. Only with `notify`; a jetq client
    /// sets it while it waits on few requests, once it has seen following
    /// work.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "is_false"
    )]
    pub follow: bool,
    /// The id of the request whose task published this one, if a task did
    /// (through its context's client).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Set on the wake-up message of a suspended workflow: the token its
    /// record holds (`resume`). Such a message resumes the run without
    /// counting an attempt, and only while the record still holds the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<String>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl Request {
    /// A request for `task` on the default queue with a fresh id and `null` arguments.
    pub fn new(task: impl Into<String>) -> Self {
        Request {
            v: REQUEST_VERSION,
            id: new_id(),
            task: task.into(),
            queue: DEFAULT_QUEUE.to_owned(),
            args: Box::default(),
            metadata: Map::new(),
            enqueued_at: OffsetDateTime::now_utc(),
            max_retries: None,
            not_before: None,
            headers: BTreeMap::new(),
            notify: None,
            ignore_result: false,
            start_unchecked: false,
            follow: false,
            parent: None,
            resume: None,
        }
    }

    /// Encode `args` as the request's arguments; an error of kind
    /// [`ErrorKind::Serialization`] if they cannot be encoded as JSON.
    pub fn set_args<T: Serialize + ?Sized>(&mut self, args: &T) -> Result<()> {
        self.args = serde_json::value::to_raw_value(args)
            .map_err(|e| Error::serialization("encoding the arguments", e))?;
        Ok(())
    }

    /// The arguments decoded into `T`; an error of kind
    /// [`ErrorKind::Serialization`] if they do not match it.
    pub fn args_as<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_str(self.args.get())
            .map_err(|e| Error::serialization("decoding the arguments", e))
    }

    /// Check every name that will become part of a subject or key.
    pub fn validate(&self) -> Result<()> {
        names::validate_id(&self.id)?;
        names::validate_queue(&self.queue)?;
        names::validate_task(&self.task)?;
        Ok(())
    }

    /// Encode as JSON.
    pub fn to_json(&self) -> Result<Vec<u8>> {
        // Room for a small request at once: growing from empty reallocates
        // several times.
        let mut out = Vec::with_capacity(384);
        serde_json::to_writer(&mut out, self)
            .map_err(|e| Error::serialization("encoding the request", e))?;
        Ok(out)
    }

    /// Decode from JSON and validate its version and names.
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        let req: Request = serde_json::from_slice(bytes)
            .map_err(|e| Error::serialization("malformed request envelope", e))?;
        if req.v != REQUEST_VERSION {
            return Err(Error::new(
                ErrorKind::Serialization,
                format!(
                    "request envelope version {} is not supported (this version of jetq reads version {REQUEST_VERSION})",
                    req.v
                ),
            ));
        }
        req.validate()?;
        Ok(req)
    }

    /// Refuse a due time further ahead of `now` than [`MAX_DELAY`]: no
    /// broker can hold it, so it would come back at once, for ever.
    pub fn check_due(&self, now: OffsetDateTime) -> Result<()> {
        match self.not_before {
            Some(at) if at - now > max_delay() => Err(delay_too_long(
                std::time::Duration::try_from(at - now).unwrap_or(std::time::Duration::MAX),
            )),
            _ => Ok(()),
        }
    }

    /// Whether `key`, a message's deduplication key (`Nats-Msg-Id`), belongs
    /// to this request: the id itself, or the key of a requeue
    /// (`<id>.requeue.<sequence>`), or, for the wake-up message of a
    /// suspended workflow, `<id>.resume.<token>` or `<id>.wake.<token>` with
    /// the envelope's own `resume` token. A message whose key belongs to
    /// another request could make the broker drop that request as a
    /// duplicate.
    pub fn owns_dedup_key(&self, key: &str) -> bool {
        let Some(rest) = key.strip_prefix(self.id.as_str()) else {
            return false;
        };
        if rest.is_empty() {
            return true;
        }
        if let Some(seq) = rest.strip_prefix(".requeue.") {
            return !seq.is_empty() && seq.bytes().all(|b| b.is_ascii_digit());
        }
        let token = rest
            .strip_prefix(".resume.")
            .or_else(|| rest.strip_prefix(".wake."));
        matches!((token, &self.resume), (Some(t), Some(own)) if t == own)
    }

    /// The key of the wake-up message of a suspended workflow `id` holding
    /// `token`, as scheduled (`<id>.resume.<token>`).
    pub fn resume_dedup_key(id: &str, token: &str) -> String {
        format!("{id}.resume.{token}")
    }

    /// The key of the same wake-up message fired early (`<id>.wake.<token>`).
    pub fn wake_dedup_key(id: &str, token: &str) -> String {
        format!("{id}.wake.{token}")
    }

    /// The key of a requeue of request `id` from the dead letter of the
    /// message at `sequence`: a new message for an old id needs its own key.
    pub fn requeue_dedup_key(id: &str, sequence: u64) -> String {
        format!("{id}.requeue.{sequence}")
    }
}

/// [`MAX_DELAY`] as a `time` duration, for arithmetic with times.
fn max_delay() -> time::Duration {
    time::Duration::try_from(MAX_DELAY).unwrap_or(time::Duration::MAX)
}

/// The error for a delay longer than [`MAX_DELAY`].
pub(crate) fn delay_too_long(delay: std::time::Duration) -> Error {
    Error::new(
        ErrorKind::Config,
        format!(
            "a delay of {delay:?} is longer than jetq supports (at most {} days)",
            MAX_DELAY.as_secs() / 86_400
        ),
    )
}

/// `null` and absent alike give the default (Go and other clients send
/// `null` for an empty map).
pub(crate) fn null_as_default<'de, D, T>(de: D) -> std::result::Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(de)?.unwrap_or_default())
}

/// A new request id: a UUID v7 (time-ordered, so ids sort by creation).
pub fn new_id() -> String {
    // Encoded into a buffer, then copied once: `to_string` goes through the
    // formatting machinery, which costs more than the id itself.
    let mut buf = uuid::Uuid::encode_buffer();
    uuid::Uuid::now_v7()
        .hyphenated()
        .encode_lower(&mut buf)
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn null_in_an_optional_field_is_its_default() {
        let json = br#"{"v":1,"id":"r1","task":"t","queue":"default","args":null,"metadata":null,"enqueued_at":"2026-01-01T00:00:00Z","max_retries":null,"not_before":null,"headers":null,"notify":null,"ignore_result":null,"start_unchecked":null,"follow":null,"parent":null,"resume":null}"#;
        let r = Request::from_json(json).unwrap();
        assert!(!r.ignore_result && !r.start_unchecked && !r.follow);
        assert!(r.metadata.is_empty() && r.headers.is_empty());
        assert_eq!((r.max_retries, r.not_before, r.notify), (None, None, None));
        let set = br#"{"v":1,"id":"r1","task":"t","queue":"default","enqueued_at":"2026-01-01T00:00:00Z","start_unchecked":true}"#;
        assert!(Request::from_json(set).unwrap().start_unchecked);
        // Left out when false, written when set.
        let mut r = Request::new("t");
        assert!(!String::from_utf8(r.to_json().unwrap())
            .unwrap()
            .contains("start_unchecked"));
        r.start_unchecked = true;
        assert!(String::from_utf8(r.to_json().unwrap())
            .unwrap()
            .contains(r#""start_unchecked":true"#));
    }

    #[test]
    fn new_ids_are_hyphenated_lowercase_uuids_v7_and_valid_ids() {
        let id = new_id();
        let uuid = uuid::Uuid::parse_str(&id).unwrap();
        assert_eq!(uuid.get_version_num(), 7);
        assert_eq!(id, uuid.to_string());
        names::validate_id(&id).unwrap();
        assert_ne!(new_id(), id);
    }
}
