//! Revision-checked record writes, with their acknowledgement decoded here.
//!
//! A record write is a publish to the bucket's subject with
//! `Nats-Expected-Last-Subject-Sequence`, answered by a JetStream
//! acknowledgement. async-nats' `update` decodes that answer through an
//! untagged enum: each acknowledgement is buffered into a generic `Content`
//! tree, and an error text is formatted for the variant that does not match
//! before the one that does: about eleven allocations per write, on every
//! task. Here the same request goes out through the connection's request
//! path and the answer is read into a plain struct (no allocation when it
//! is a success).

use async_nats::header::{HeaderMap, HeaderValue, NATS_EXPECTED_LAST_SUBJECT_SEQUENCE};
use async_nats::jetstream::kv::{self, UpdateErrorKind};
use async_nats::jetstream::ErrorCode;
use async_nats::{Client, RequestErrorKind};
use bytes::Bytes;
use jetq::{Error, ErrorKind};
use serde::Deserialize;

use crate::broker::{payload_too_large, too_large};
use crate::error::{record, wrap};

/// A JetStream publish acknowledgement: the sequence stored, or an error.
#[derive(Deserialize)]
struct Ack {
    #[serde(default)]
    seq: u64,
    #[serde(default)]
    error: Option<AckError>,
}

/// The error of a refused publish.
#[derive(Deserialize)]
struct AckError {
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
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
/// in errors ("cannot update record X").
pub(crate) async fn write_expecting(
    client: &Client,
    kv: &kv::Store,
    key: &str,
    value: Bytes,
    revision: u64,
    what: &(dyn Fn() -> String + Sync),
) -> Result<u64, WriteFailure> {
    if kv.use_jetstream_prefix {
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
    let answer = match client.request_with_headers(subject, headers, value).await {
        Ok(answer) => answer,
        Err(err) if err.kind() == RequestErrorKind::MaxPayloadExceeded => {
            return Err(WriteFailure::Failed(too_large(client, &err)));
        }
        Err(err) => return Err(WriteFailure::Failed(record(what(), err))),
    };
    let ack: Ack = serde_json::from_slice(&answer.payload).map_err(|err| {
        WriteFailure::Failed(wrap(
            ErrorKind::Broker,
            format!("{}: the server's acknowledgement is not one", what()),
            err,
        ))
    })?;
    match ack.error {
        None if ack.seq > 0 => Ok(ack.seq),
        None => Err(WriteFailure::Failed(Error::new(
            ErrorKind::Broker,
            format!("{}: the server acknowledged no sequence", what()),
        ))),
        Some(refused) if ErrorCode(refused.err_code) == ErrorCode::STREAM_WRONG_LAST_SEQUENCE => {
            Err(WriteFailure::WrongRevision(Error::new(
                ErrorKind::Conflict,
                format!("refused by the server: {}", refused.description),
            )))
        }
        Some(refused)
            if ErrorCode(refused.err_code) == ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM =>
        {
            Err(WriteFailure::Failed(too_large(
                client,
                &refused.description,
            )))
        }
        Some(refused) => Err(WriteFailure::Failed(Error::new(
            ErrorKind::Broker,
            format!(
                "{}: refused by the server: {} (error code {})",
                what(),
                refused.description,
                refused.err_code
            ),
        ))),
    }
}
