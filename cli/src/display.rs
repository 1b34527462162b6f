//! Text from the wire (ids, task and worker names, error messages) made safe
//! to print on a terminal.
//!
//! Anyone who can publish on jetq's subjects can put any bytes into a dead
//! letter or a record. Printed as they are, an escape sequence could rewrite
//! the screen, set the window title or hide text. [`escape`] writes every
//! control character as a visible escape; [`json_safe`] does the same inside
//! JSON text with `\uXXXX` escapes, so the JSON means the same.

use std::borrow::Cow;
use std::fmt::Write as _;

/// Whether printing `c` could make a terminal do something other than show
/// a character: C0 and C1 control characters, DEL, and the Unicode
/// bidirectional controls that reorder how text is shown.
pub fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
        )
}

/// `text` with every [unsafe](is_unsafe) character written as an escape:
/// `\e` for ESC, `\n`, `\r`, `\t`, `\0`, `\xNN` for other ASCII controls and
/// `\u{NNNN}` for the rest. Other text is unchanged (not copied).
///
/// ```
/// assert_eq!(jetq_cli::display::escape("a\u{1b}[2Jb\n"), "a\\e[2Jb\\n");
/// assert_eq!(jetq_cli::display::escape("plain"), "plain");
/// ```
pub fn escape(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_unsafe) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\u{1b}' => out.push_str("\\e"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\0' => out.push_str("\\0"),
            c if c.is_ascii() && is_unsafe(c) => {
                let _ = write!(out, "\\x{:02x}", u32::from(c));
            }
            c if is_unsafe(c) => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// JSON text with every [unsafe](is_unsafe) character that serde_json
/// leaves as it is (DEL, C1 controls, bidirectional controls) written as a
/// `\uXXXX` escape. Such characters can only stand inside JSON strings, where
/// the escape means the same character, so the JSON value is unchanged.
///
/// ```
/// let text = serde_json::to_string("a\u{9b}2Jb\u{1b}").unwrap();
/// assert_eq!(jetq_cli::display::json_safe(&text), r#""a\u009b2Jb\u001b""#);
/// ```
pub fn json_safe(json: &str) -> Cow<'_, str> {
    if !json.chars().any(is_unsafe) {
        return Cow::Borrowed(json);
    }
    let mut out = String::with_capacity(json.len() + 8);
    for c in json.chars() {
        if is_unsafe(c) {
            let _ = write!(out, "\\u{:04x}", u32::from(c));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// `text` [escaped](escape) and cut to at most `max` characters (the last
/// one then `…`), for a table cell.
pub fn cell(text: &str, max: usize) -> String {
    let safe = escape(text);
    if safe.chars().count() > max {
        let mut cut: String = safe.chars().take(max.saturating_sub(1)).collect();
        cut.push('…');
        cut
    } else {
        safe.into_owned()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn escapes_every_control() {
        let nasty = "x\u{1b}]0;title\u{7}\u{9b}31m\u{7f}\u{202e}\r\t\0y";
        let safe = escape(nasty);
        assert!(!safe.chars().any(is_unsafe), "{safe}");
        assert_eq!(safe, "x\\e]0;title\\x07\\u{9b}31m\\x7f\\u{202e}\\r\\t\\0y");
        assert!(matches!(escape("héllo wörld ✓"), Cow::Borrowed(_)));
    }

    #[test]
    fn json_stays_the_same_value() {
        let value = serde_json::json!({"m": "a\u{1b}b\u{9b}c\u{7f}d\u{2066}e", "n": 1});
        let text = serde_json::to_string(&value).unwrap();
        let safe = json_safe(&text);
        assert!(!safe.chars().any(is_unsafe), "{safe}");
        let back: serde_json::Value = serde_json::from_str(&safe).unwrap();
        assert_eq!(back, value);
    }

    #[test]
    fn cells_are_cut() {
        assert_eq!(cell("abcdef", 4), "abc…");
        assert_eq!(cell("ab", 4), "ab");
        assert_eq!(cell("a\u{1b}", 10), "a\\e");
    }
}
