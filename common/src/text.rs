//! Text from outside (agents' reports, hostnames, errors) made safe to print on a
//! terminal: control characters, which could move the cursor, rewrite earlier lines or
//! set the terminal's title, are shown escaped instead of obeyed.

use std::borrow::Cow;
use std::fmt::Write as _;

/// `text` with every control character (C0, DEL and C1, including ESC) written as a
/// `\u{..}` escape; borrowed when there is none.
pub fn printable(text: &str) -> Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_the_rest_kept() {
        assert!(matches!(printable("disk full: /var ü ✓"), Cow::Borrowed(_)));
        assert_eq!(
            printable("\u{1b}[2J\u{1b}]0;owned\u{7}x\ny\u{9b}"),
            "\\u{1b}[2J\\u{1b}]0;owned\\u{7}x\\u{a}y\\u{9b}"
        );
    }
}
