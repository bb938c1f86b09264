//! Strings from outside (CRM record ids and field values, connector messages): made safe
//! to log and to store.
//!
//! * [`Escaped`] displays a value with control and line-breaking characters escaped, so a
//!   CRM-supplied `"x\n2026-… INFO forged"` cannot start a log line of its own. Log such
//!   values as `field = %Escaped(&value)`; never log them bare above DEBUG.
//! * [`clean_fields`] removes control characters (NUL included) from CRM field values at
//!   ingest (line breaks become a space): they end up in rules, exports and the campaigns
//!   tool, where a NUL or an escape sequence only does harm.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};

/// Characters that must not reach a log line or a stored single-line value as they are:
/// C0/C1 controls, Unicode line and paragraph separators, and bidirectional overrides (which
/// reorder what a reader sees).
fn is_hostile(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}')
        || ('\u{202a}'..='\u{202e}').contains(&c)
        || ('\u{2066}'..='\u{2069}').contains(&c)
}

/// Displays the inner value with control, line-separator and bidi-override characters
/// escaped (`\n`, `\u{202e}`).
#[derive(Debug, Clone, Copy)]
pub struct Escaped<T>(pub T);

impl<T: fmt::Display> fmt::Display for Escaped<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Escaping<'a, 'b>(&'a mut fmt::Formatter<'b>);
        impl fmt::Write for Escaping<'_, '_> {
            fn write_str(&mut self, s: &str) -> fmt::Result {
                for c in s.chars() {
                    if is_hostile(c) {
                        write!(self.0, "{}", c.escape_default())?;
                    } else {
                        self.0.write_char(c)?;
                    }
                }
                Ok(())
            }
        }
        write!(Escaping(f), "{}", self.0)
    }
}

/// `value` without control, line-separator and bidi-override characters. Line breaks and
/// tabs become one space (so `"line\r\none"` stays two words); the others are dropped.
pub fn clean_text(value: &str) -> String {
    if !value.chars().any(is_hostile) {
        return value.to_owned();
    }
    let mut out = String::with_capacity(value.len());
    let mut spaced = false;
    for c in value.chars() {
        if !is_hostile(c) {
            out.push(c);
            spaced = false;
        } else if c.is_whitespace() && !spaced {
            out.push(' ');
            spaced = true;
        }
    }
    out
}

/// A JSON value with every string in it (nested ones too) passed through [`clean_text`].
pub fn clean_value(value: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::String(s) => Value::String(clean_text(s)),
        Value::Array(items) => Value::Array(items.iter().map(clean_value).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (clean_text(k), clean_value(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// CRM fields, names and values, with [`clean_text`] applied.
pub fn clean_fields(
    fields: &BTreeMap<String, serde_json::Value>,
) -> BTreeMap<String, serde_json::Value> {
    fields
        .iter()
        .map(|(k, v)| (clean_text(k), clean_value(v)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn f6_escaped_values_cannot_start_a_log_line() {
        let forged =
            "nobody\n2026-12-06T00:00:00.000000Z  INFO optinsync::admin: FORGED\r\u{1b}[2K";
        let shown = Escaped(forged).to_string();
        assert!(!shown.contains('\n') && !shown.contains('\r') && !shown.contains('\u{1b}'));
        assert_eq!(
            shown,
            "nobody\\n2026-12-06T00:00:00.000000Z  INFO optinsync::admin: FORGED\\r\\u{1b}[2K"
        );
        assert_eq!(
            Escaped("a\u{2028}b\u{202e}c").to_string(),
            "a\\u{2028}b\\u{202e}c"
        );
        // Ordinary text, accents included, is shown as it is.
        assert_eq!(Escaped("Contacts/José-17").to_string(), "Contacts/José-17");
    }

    #[test]
    fn f11_field_values_lose_nul_and_control_characters() {
        let fields: BTreeMap<String, serde_json::Value> = [
            ("Company".to_owned(), json!("Byte\u{0}Here")),
            (
                "Notes\u{7}".to_owned(),
                json!(["line\r\none", {"k": "\u{1b}[31mred"}]),
            ),
            ("Score".to_owned(), json!(7)),
            ("Name".to_owned(), json!("Zoë")),
        ]
        .into_iter()
        .collect();
        let clean = clean_fields(&fields);
        assert_eq!(clean["Company"], json!("ByteHere"));
        assert_eq!(clean["Notes"], json!(["line one", {"k": "[31mred"}]));
        assert_eq!(clean["Score"], json!(7));
        assert_eq!(clean["Name"], json!("Zoë"));
    }
}
