//! Validation of every name and id that becomes part of a NATS subject or KV key.
//!
//! The rules are strict on purpose: a hostile task name or id must never reach
//! another queue's subject or another record's key.
//!
//! - **ids** and **queue names**: 1 to 128 (ids) or 64 (queues) characters of
//!   `A-Z a-z 0-9 - _`. No `.`, so an id is exactly one subject token.
//! - **task names**: 1 to 128 characters; one or more tokens separated by `.`,
//!   each token non-empty and made of `A-Z a-z 0-9 - _`. So `images.resize`
//!   is fine, `images..resize`, `.x`, `a.*` and `a.>` are not.
//! - **other names that become tokens** (workflow topics, event keys) follow
//!   the id rule ([`validate_key`]). Metadata keys never reach a subject and
//!   are free-form.

use crate::error::{Error, ErrorKind, Result};

/// Longest id accepted.
pub const MAX_ID_LEN: usize = 128;
/// Longest queue name accepted.
pub const MAX_QUEUE_LEN: usize = 64;
/// Longest task name accepted.
pub const MAX_TASK_LEN: usize = 128;

/// The bytes allowed in a token, as a table: names are checked several
/// times per request, a byte at a time.
const TOKEN_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric() || c == b'-' || c == b'_';
        b += 1;
    }
    table
};

fn token_byte(b: u8) -> bool {
    TOKEN_BYTES[usize::from(b)]
}

/// The first character of `value` that may not be in a token, if any.
/// Checked byte by byte (names are checked several times per request): a
/// byte that is not an allowed ASCII one starts the offending character,
/// since every byte before it is ASCII.
fn first_bad_char(value: &str) -> Option<char> {
    let at = value.bytes().position(|b| !token_byte(b))?;
    value.get(at..).and_then(|rest| rest.chars().next())
}

fn describe(c: char) -> String {
    if c.is_whitespace() {
        "whitespace".to_owned()
    } else {
        format!("`{}`", c.escape_default())
    }
}

fn check_token(what: &str, value: &str, max: usize) -> Result<()> {
    if value.is_empty() {
        return Err(Error::new(
            ErrorKind::InvalidName,
            format!("{what} must not be empty"),
        ));
    }
    if value.len() > max {
        return Err(Error::new(
            ErrorKind::InvalidName,
            format!("{what} is {} bytes long; the limit is {max}", value.len()),
        ));
    }
    if let Some(c) = first_bad_char(value) {
        return Err(Error::new(
            ErrorKind::InvalidName,
            format!(
                "{what} {value:?} contains {}; only letters, digits, `-` and `_` are allowed",
                describe(c)
            ),
        ));
    }
    Ok(())
}

/// Check a request id (or idempotency key).
pub fn validate_id(id: &str) -> Result<()> {
    check_token("id", id, MAX_ID_LEN)
}

/// Check a queue name.
pub fn validate_queue(queue: &str) -> Result<()> {
    check_token("queue name", queue, MAX_QUEUE_LEN)
}

/// Check a task name: dot-separated tokens.
pub fn validate_task(task: &str) -> Result<()> {
    if task.is_empty() {
        return Err(Error::new(
            ErrorKind::InvalidName,
            "task name must not be empty",
        ));
    }
    if task.len() > MAX_TASK_LEN {
        return Err(Error::new(
            ErrorKind::InvalidName,
            format!(
                "task name is {} bytes long; the limit is {MAX_TASK_LEN}",
                task.len()
            ),
        ));
    }
    for token in task.split('.') {
        if token.is_empty() {
            return Err(Error::new(
                ErrorKind::InvalidName,
                format!("task name {task:?} has an empty token; use tokens like `images.resize`"),
            ));
        }
        if let Some(c) = first_bad_char(token) {
            return Err(Error::new(
                ErrorKind::InvalidName,
                format!(
                    "task name {task:?} contains {}; only letters, digits, `-`, `_` and `.` between tokens are allowed",
                    describe(c)
                ),
            ));
        }
    }
    Ok(())
}

/// Check a name of the id kind (metadata key, topic, event key); `what` names it in the error.
pub fn validate_key(what: &str, key: &str) -> Result<()> {
    check_token(what, key, MAX_ID_LEN)
}

/// The subject token of a workflow mailbox's topic: the topic itself
/// (checked like an id: letters, digits, `-`, `_`), or `_` for messages sent
/// without a topic (so the topic `_` itself is refused).
pub fn topic_token(topic: Option<&str>) -> Result<&str> {
    match topic {
        None => Ok(NO_TOPIC),
        Some(NO_TOPIC) => Err(Error::new(
            ErrorKind::InvalidName,
            "the topic `_` is reserved for messages sent without a topic",
        )),
        Some(t) => check_token("topic", t, MAX_ID_LEN).map(|()| t),
    }
}

/// The subject token of the mailbox of messages sent without a topic.
pub const NO_TOPIC: &str = "_";

/// `text` with control characters escaped (`\n`, `\u{1b}`, ...) and cut to
/// 200 characters: safe to quote from the wire in a message or log line (a
/// forged name cannot put terminal escapes on a screen).
pub fn escape(text: &str) -> String {
    const MAX: usize = 200;
    let mut out = String::new();
    for (i, c) in text.chars().enumerate() {
        if i == MAX {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(validate_id("order-42_thumb").is_ok());
        assert!(validate_id("0190b7e2-6f1a-7c3e-9d2b-1a2b3c4d5e6f").is_ok());
        for bad in ["", "a.b", "a*", "a>", "a b", "a\tb", "ä", "a.b>", "$KV"] {
            let err = validate_id(bad).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidName, "{bad:?}");
        }
        assert!(validate_id(&"x".repeat(MAX_ID_LEN)).is_ok());
        assert!(validate_id(&"x".repeat(MAX_ID_LEN + 1)).is_err());
    }

    #[test]
    fn queues() {
        assert!(validate_queue("default").is_ok());
        for bad in ["", "a.b", "*", ">", "q q"] {
            assert!(validate_queue(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn tasks() {
        for ok in ["add", "images.resize", "a.b-c.d_e"] {
            assert!(validate_task(ok).is_ok(), "{ok:?}");
        }
        for bad in [
            "", ".", "a.", ".a", "a..b", "a.*", "a.>", "a b", "a.b c", "*", ">",
        ] {
            assert_eq!(
                validate_task(bad).unwrap_err().kind(),
                ErrorKind::InvalidName,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn the_offending_character_is_named_whole() {
        // A multi-byte character after ASCII ones is named as it is.
        let msg = validate_id("abcä").unwrap_err().to_string();
        assert!(msg.contains("`\\u{e4}`"), "{msg}");
        let msg = validate_task("ok.täsk").unwrap_err().to_string();
        assert!(msg.contains("\\u{e4}"), "{msg}");
        let msg = validate_id("a b").unwrap_err().to_string();
        assert!(msg.contains("whitespace"), "{msg}");
    }

    #[test]
    fn message_names_the_rule() {
        let msg = validate_id("a.b>").unwrap_err().to_string();
        assert!(msg.contains("`.`"), "{msg}");
        assert!(msg.contains("only letters"), "{msg}");
    }
}
