//! Publishes to a stream, and revision-checked record writes, with their
//! acknowledgement decoded here.
//!
//! A JetStream publish is a request answered by an acknowledgement.
//! async-nats decodes that answer through an untagged enum: each
//! acknowledgement is buffered into a generic `Content` tree, and an error
//! text is formatted for the variant that does not match before the one
//! that does: about eleven allocations per publish, on every request and
//! every record write. Here the same publish goes out with a reply subject
//! of our own ([`Acks`]) and the answer is read into a plain struct (no
//! allocation when it is a success). A record write is such a publish to
//! the bucket's subject with `Nats-Expected-Last-Subject-Sequence`.

use std::time::Duration;

use async_nats::header::{HeaderMap, HeaderValue, NATS_EXPECTED_LAST_SUBJECT_SEQUENCE};
use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::kv::{self, UpdateErrorKind};
use async_nats::jetstream::ErrorCode;
use async_nats::Subject;
use bytes::Bytes;
use jetq::{Error, ErrorKind};
use serde::Deserialize;

use crate::acks::Acks;
use crate::broker::payload_too_large;
use crate::error::{record, wrap};

/// A JetStream publish acknowledgement: the sequence stored (and whether
/// the message was a duplicate of one stored before), or the refusal.
#[derive(Deserialize)]
struct Ack {
    #[serde(default)]
    seq: u64,
    #[serde(default)]
    duplicate: bool,
    #[serde(default)]
    error: Option<async_nats::jetstream::Error>,
}

/// What a stream stored for a publish.
pub(crate) struct Stored {
    /// The stream sequence of the message (of the earlier one, for a
    /// duplicate).
    pub(crate) sequence: u64,
    /// The stream had already stored a message with this `Nats-Msg-Id`.
    pub(crate) duplicate: bool,
}

/// Publish to a stream and wait for its acknowledgement, decoded here.
///
/// The same request as async-nats' `send_publish`, and failures of the same
/// kinds (a [`PublishError`], so that callers tell them apart as before),
/// without its per-publish costs: a future above 1 KiB, the
/// acknowledgement's decode through an untagged enum (about eleven
/// allocations), the boxed acknowledgement future and its hand-off to a
/// background task when dropped. `timeout`: how long to wait for the
/// acknowledgement (`None`: the connection's request timeout).
pub(crate) async fn publish_acked(
    acks: &Acks,
    subject: Subject,
    headers: HeaderMap,
    payload: Bytes,
    timeout: Option<Duration>,
) -> Result<Stored, PublishError> {
    let answer = acks.request(subject, headers, payload, timeout).await?;
    let ack: Ack = serde_json::from_slice(&answer.payload)
        .map_err(|err| PublishError::with_source(PublishErrorKind::Other, err))?;
    match ack.error {
        None if ack.seq > 0 => Ok(Stored {
            sequence: ack.seq,
            duplicate: ack.duplicate,
        }),
        None => Err(PublishError::with_source(
            PublishErrorKind::Other,
            "the server acknowledged no sequence",
        )),
        Some(refused) => {
            let kind = match refused.error_code() {
                ErrorCode::STREAM_WRONG_LAST_SEQUENCE => PublishErrorKind::WrongLastSequence,
                ErrorCode::STREAM_WRONG_LAST_MESSAGE_ID => PublishErrorKind::WrongLastMessageId,
                _ => PublishErrorKind::Other,
            };
            Err(PublishError::with_source(kind, refused))
        }
    }
}

/// Why a revision-checked write did not store.
pub(crate) enum WriteFailure {
    /// The stored revision is not the one expected (the server's refusal
    /// as the error).
    WrongRevision(Error),
    /// Anything else: the error to report (its kind says a timeout, a
    /// payload too large, or a broker failure).
    Failed(Error),
}

/// Write `value` under `key` of `kv` if its last revision is `revision` (0:
/// nothing stored under it yet); the new revision. `what` names the write
/// in errors ("cannot update record X"). `tag`: the ended record's tag for
/// a producer that follows it (header [`jetq::tag::TAG_HEADER`]).
pub(crate) async fn write_expecting(
    acks: &Acks,
    kv: &kv::Store,
    key: &str,
    value: Bytes,
    tag: Option<&str>,
    revision: u64,
    what: &(dyn Fn() -> String + Sync),
) -> Result<u64, WriteFailure> {
    let client = acks.client();
    if kv.use_jetstream_prefix {
        // (Such a bucket's republished changes are not followed: no tag.)
        let _ = tag;
        // A bucket reached through another domain's API prefix, which
        // async-nats keeps to itself: its own write.
        return Box::pin(kv.update(key, value, revision))
            .await
            .map_err(|err| match err.kind() {
                UpdateErrorKind::WrongLastRevision => WriteFailure::WrongRevision(wrap(
                    ErrorKind::Conflict,
                    "the record's revision is not the one expected",
                    err,
                )),
                _ => WriteFailure::Failed(
                    payload_too_large(client, &err).unwrap_or_else(|| record(what(), err)),
                ),
            });
    }
    let prefix = kv.put_prefix.as_deref().unwrap_or(kv.prefix.as_str());
    let mut subject = String::with_capacity(prefix.len() + key.len());
    subject.push_str(prefix);
    subject.push_str(key);
    let mut headers = HeaderMap::new();
    headers.insert(
        NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
        HeaderValue::from(revision),
    );
    if let Some(tag) = tag {
        headers.insert(jetq::tag::TAG_HEADER, tag);
    }
    // Boxed: inline, it would make the record write's future an allocation
    // of 1 KiB or more, which glibc's allocator serves slowly (see acks.rs).
    match Box::pin(publish_acked(
        acks,
        Subject::from(subject),
        headers,
        value,
        None,
    ))
    .await
    {
        Ok(stored) => Ok(stored.sequence),
        Err(err) if err.kind() == PublishErrorKind::WrongLastSequence => {
            Err(WriteFailure::WrongRevision(wrap(
                ErrorKind::Conflict,
                "the record's revision is not the one expected",
                err,
            )))
        }
        Err(err) => Err(WriteFailure::Failed(
            payload_too_large(client, &err).unwrap_or_else(|| record(what(), err)),
        )),
    }
}
