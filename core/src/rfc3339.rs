//! RFC 3339 timestamps in records and envelopes, formatted without an
//! allocation.
//!
//! The same text as `time::serde::rfc3339` (the same formatter), written
//! into a buffer on the stack instead of a `String`: a record has up to
//! four timestamps and is encoded at every write. Decoding is `time`'s.

use serde::{Deserializer, Serializer};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Longest RFC 3339 text `time` writes: `-999999-12-31T23:59:59.999999999+23:59`
/// is 38 bytes; the buffer leaves room.
const MAX_LEN: usize = 48;

/// Serialize `at` as RFC 3339 text.
pub(crate) fn serialize<S: Serializer>(
    at: &OffsetDateTime,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    let mut buf = [0u8; MAX_LEN];
    let mut out = &mut buf[..];
    at.format_into(&mut out, &Rfc3339)
        .map_err(serde::ser::Error::custom)?;
    // What was written, from what is left of the buffer: the count
    // `format_into` returns leaves out the fraction of a second (time 0.3.55).
    let len = MAX_LEN - out.len();
    let text = buf
        .get(..len)
        .and_then(|b| std::str::from_utf8(b).ok())
        .ok_or_else(|| serde::ser::Error::custom("timestamp text out of range"))?;
    serializer.serialize_str(text)
}

/// Deserialize RFC 3339 text.
pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<OffsetDateTime, D::Error> {
    time::serde::rfc3339::deserialize(deserializer)
}

/// The same for an optional timestamp (`null` or absent: `None`).
pub(crate) mod option {
    use super::*;

    /// Serialize `at` as RFC 3339 text, or `null`.
    pub(crate) fn serialize<S: Serializer>(
        at: &Option<OffsetDateTime>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match at {
            Some(at) => super::serialize(at, serializer),
            None => serializer.serialize_none(),
        }
    }

    /// Deserialize RFC 3339 text or `null`.
    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<OffsetDateTime>, D::Error> {
        time::serde::rfc3339::option::deserialize(deserializer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Serialize)]
    struct Both {
        #[serde(with = "crate::rfc3339")]
        ours: OffsetDateTime,
        #[serde(with = "time::serde::rfc3339")]
        theirs: OffsetDateTime,
    }

    #[test]
    fn writes_what_time_writes() {
        for at in [
            OffsetDateTime::UNIX_EPOCH,
            OffsetDateTime::now_utc(),
            time::macros::datetime!(9999-12-31 23:59:59.999_999_999 UTC),
            time::macros::datetime!(2026-12-02 01:02:03.5 +05:30),
        ] {
            let json = serde_json::to_value(Both {
                ours: at,
                theirs: at,
            })
            .unwrap();
            assert_eq!(json["ours"], json["theirs"], "{at}");
        }
    }
}
