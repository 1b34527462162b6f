//! Mapping of async-nats errors onto [`jetq::Error`].
//!
//! async-nats error types never leave this crate: they travel only as the
//! `source()` of a [`jetq::Error`].

use std::error::Error as StdError;

use async_nats::jetstream::context::{
    CreateStreamError, CreateStreamErrorKind, PublishError, PublishErrorKind,
};
use async_nats::jetstream::ErrorCode;
use jetq::{Error, ErrorKind};

/// An error of `kind` with `message`, keeping `source`.
pub(crate) fn wrap<E>(kind: ErrorKind, message: impl Into<String>, source: E) -> Error
where
    E: StdError + Send + Sync + 'static,
{
    Error::new(kind, message).with_source(source)
}

/// Walk the source chain looking for a JetStream API error code.
pub(crate) fn jetstream_code(err: &(dyn StdError + 'static)) -> Option<ErrorCode> {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(js) = e.downcast_ref::<async_nats::jetstream::Error>() {
            return Some(js.error_code());
        }
        if let Some(cs) = e.downcast_ref::<CreateStreamError>() {
            if let CreateStreamErrorKind::JetStream(js) = cs.kind() {
                return Some(js.error_code());
            }
        }
        cur = e.source();
    }
    None
}

/// Whether anything in the chain reports a timeout.
pub(crate) fn is_timeout(err: &(dyn StdError + 'static)) -> bool {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::TimedOut {
                return true;
            }
        }
        if let Some(p) = e.downcast_ref::<PublishError>() {
            if p.kind() == PublishErrorKind::TimedOut {
                return true;
            }
        }
        if timed_out_kind(e) {
            return true;
        }
        cur = e.source();
    }
    false
}

fn timed_out_kind(e: &(dyn StdError + 'static)) -> bool {
    use async_nats::jetstream::context::{CreateKeyValueError, CreateKeyValueErrorKind};
    use async_nats::jetstream::kv::{EntryError, EntryErrorKind, UpdateError, UpdateErrorKind};
    use async_nats::jetstream::stream::{
        ConsumerCreateStrictError, ConsumerCreateStrictErrorKind, ConsumerError, ConsumerErrorKind,
    };
    if let Some(x) = e.downcast_ref::<CreateStreamError>() {
        return x.kind() == CreateStreamErrorKind::TimedOut;
    }
    if let Some(x) = e.downcast_ref::<CreateKeyValueError>() {
        return x.kind() == CreateKeyValueErrorKind::TimedOut;
    }
    if let Some(x) = e.downcast_ref::<ConsumerError>() {
        return x.kind() == ConsumerErrorKind::TimedOut;
    }
    if let Some(x) = e.downcast_ref::<ConsumerCreateStrictError>() {
        return x.kind() == ConsumerCreateStrictErrorKind::TimedOut;
    }
    if let Some(x) = e.downcast_ref::<EntryError>() {
        return x.kind() == EntryErrorKind::TimedOut;
    }
    if let Some(x) = e.downcast_ref::<UpdateError>() {
        return x.kind() == UpdateErrorKind::TimedOut;
    }
    if let Some(x) = e.downcast_ref::<async_nats::RequestError>() {
        return x.kind() == async_nats::RequestErrorKind::TimedOut;
    }
    if let Some(x) = e.downcast_ref::<async_nats::jetstream::context::RequestError>() {
        return x.kind() == async_nats::jetstream::context::RequestErrorKind::TimedOut;
    }
    false
}

/// JetStream API error codes that mean "try again shortly": the cluster is
/// electing a leader or a peer is catching up.
pub(crate) fn is_transient_code(code: ErrorCode) -> bool {
    matches!(code.0, 10004 | 10008 | 10041 | 10118 | 10167)
}

/// A JetStream management call failed: a `Timeout` when it timed out, else a `Broker` error.
pub(crate) fn management<E>(what: String, err: E) -> Error
where
    E: StdError + Send + Sync + 'static,
{
    if is_timeout(&err) {
        wrap(
            ErrorKind::Timeout,
            format!("{what}: JetStream did not answer in time; check that the server is up and JetStream is enabled"),
            err,
        )
    } else {
        wrap(ErrorKind::Broker, what, err)
    }
}

/// A record-store call failed.
pub(crate) fn record<E>(what: String, err: E) -> Error
where
    E: StdError + Send + Sync + 'static,
{
    if is_timeout(&err) {
        wrap(
            ErrorKind::Timeout,
            format!("{what}: the server did not answer in time"),
            err,
        )
    } else {
        wrap(ErrorKind::Broker, what, err)
    }
}

/// Why opening a stream (or a bucket's stream) failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lookup {
    /// It does not exist.
    Missing,
    /// JetStream is not enabled on the server (nothing answers its API) or
    /// for the account.
    NoJetStream,
    /// Anything else (a timeout, a refusal).
    Other,
}

/// Classify the failure of `get_stream` or `get_key_value`.
pub(crate) fn lookup_failure(err: &(dyn StdError + 'static)) -> Lookup {
    use async_nats::jetstream::context::{
        GetStreamError, GetStreamErrorKind, RequestError, RequestErrorKind,
    };
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(g) = e.downcast_ref::<GetStreamError>() {
            if let GetStreamErrorKind::JetStream(js) = g.kind() {
                return match js.error_code() {
                    ErrorCode::STREAM_NOT_FOUND => Lookup::Missing,
                    ErrorCode::JETSTREAM_NOT_ENABLED
                    | ErrorCode::JETSTREAM_NOT_ENABLED_FOR_ACCOUNT => Lookup::NoJetStream,
                    _ => Lookup::Other,
                };
            }
        }
        if let Some(r) = e.downcast_ref::<RequestError>() {
            if r.kind() == RequestErrorKind::NoResponders {
                return Lookup::NoJetStream;
            }
        }
        if let Some(r) = e.downcast_ref::<async_nats::RequestError>() {
            if r.kind() == async_nats::RequestErrorKind::NoResponders {
                return Lookup::NoJetStream;
            }
        }
        if let Some(js) = e.downcast_ref::<async_nats::jetstream::Error>() {
            return match js.error_code() {
                ErrorCode::STREAM_NOT_FOUND => Lookup::Missing,
                ErrorCode::JETSTREAM_NOT_ENABLED | ErrorCode::JETSTREAM_NOT_ENABLED_FOR_ACCOUNT => {
                    Lookup::NoJetStream
                }
                _ => Lookup::Other,
            };
        }
        cur = e.source();
    }
    Lookup::Other
}

/// The error for a server (or account) without JetStream.
pub(crate) fn no_jetstream<E>(config: &crate::NatsConfig, err: E) -> Error
where
    E: StdError + Send + Sync + 'static,
{
    wrap(
        ErrorKind::Broker,
        format!(
            "JetStream is not enabled on the NATS server {} (or not for this account); jetq needs it: start the server with -js or enable JetStream for the account",
            config.servers.join(",")
        ),
        err,
    )
}
