//! The tag of an ended record that a producer follows on the broker's
//! republished changes (envelope field `follow`; see `docs/wire-format.md`,
//! section 7): HMAC-SHA256 of the record's bytes, keyed by the request's
//! `notify` address, in lowercase hex.
//!
//! The republish subject is derived from the id, and ids are not secrets;
//! the `notify` address is what the producer's inbox already relies on
//! staying private. A record that arrives there with a tag that does not
//! verify is not taken as the result (the wait goes on: the inbox, or a read).

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// The name of the header that carries a record write's tag.
pub const TAG_HEADER: &str = "Jetq-Tag";

type HmacSha256 = Hmac<Sha256>;

/// The MAC of `record` keyed by `key`; `None` only if the key were refused
/// (HMAC takes keys of any length).
fn mac(key: &str, record: &[u8]) -> Option<HmacSha256> {
    let mut mac = HmacSha256::new_from_slice(key.as_bytes()).ok()?;
    mac.update(record);
    Some(mac)
}

/// The tag of `record` (its bytes as written) with `key` (the request's
/// `notify` address); `None` only if HMAC refused the key, which it does
/// not (it takes keys of any length).
pub fn tag(key: &str, record: &[u8]) -> Option<String> {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let code = mac(key, record)?.finalize().into_bytes();
    let mut out = String::with_capacity(code.len() * 2);
    for byte in code.iter() {
        out.push(char::from(HEX[usize::from(byte >> 4)]));
        out.push(char::from(HEX[usize::from(byte & 0x0f)]));
    }
    Some(out)
}

/// Whether `tag` is the tag of `record` with `key` (compared in constant
/// time).
pub fn verify(key: &str, record: &[u8], tag: &str) -> bool {
    let Some(code) = decode_hex(tag) else {
        return false;
    };
    mac(key, record).is_some_and(|mac| mac.verify_slice(&code).is_ok())
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    let bytes = text.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    bytes
        .chunks(2)
        .map(|pair| match pair {
            [hi, lo] => Some(nibble(*hi)? << 4 | nibble(*lo)?),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 4231, test case 2: the tag is HMAC-SHA256 in lowercase hex.
    #[test]
    fn tags_are_hmac_sha256_in_lowercase_hex() {
        let t = tag("Jefe", b"what do ya want for nothing?").unwrap();
        assert_eq!(
            t,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert!(verify("Jefe", b"what do ya want for nothing?", &t));
    }

    #[test]
    fn a_tag_made_with_another_key_or_for_other_bytes_does_not_verify() {
        let t = tag("_INBOX.abc", b"{\"status\":\"succeeded\"}").unwrap();
        assert!(!verify("_INBOX.abd", b"{\"status\":\"succeeded\"}", &t));
        assert!(!verify("_INBOX.abc", b"{\"status\":\"failed\"}", &t));
        assert!(!verify(
            "_INBOX.abc",
            b"{\"status\":\"succeeded\"}",
            &t.to_uppercase()
        ));
        assert!(!verify(
            "_INBOX.abc",
            b"{\"status\":\"succeeded\"}",
            &t[..62]
        ));
        assert!(!verify("_INBOX.abc", b"{\"status\":\"succeeded\"}", ""));
    }
}
