//! Confirmation mails: rendering from the templates (see [`crate::templates`]), content
//! hashes, and the list headers. The DOI mail says who asks, for what list, offers one confirm
//! link, and tells the reader to ignore it if it was not them — nothing else (a DOI mail that
//! advertises is itself unsolicited marketing; the template check refuses such templates).
//!
//! Every rendering has a content hash that goes into the ledger, and the rendering itself is
//! stored as a snapshot under that hash, so the proof shows the exact text the person received.

use crate::config::{ListConfig, SenderConfig};
use crate::consent::MailKind;
use crate::templates::{Common, TemplateError, Templates};

pub use crate::templates::RenderedMail;

pub use crate::templates::{content_hash, html_escape};

/// Render a confirmation mail of `kind` from the template set, in `language` (chosen with
/// [`Templates::language_for`]).
#[allow(clippy::too_many_arguments)]
pub fn render(
    templates: &Templates,
    kind: MailKind,
    language: &str,
    list: &ListConfig,
    sender: &SenderConfig,
    confirm_url: &str,
    unsubscribe_url: &str,
) -> Result<RenderedMail, TemplateError> {
    templates.render_mail(
        kind,
        language,
        &common(list, sender),
        confirm_url,
        unsubscribe_url,
    )
}

/// The values every mail and page shows: who asks, for what.
pub fn common(list: &ListConfig, sender: &SenderConfig) -> Common {
    Common {
        organisation: sender.organisation.clone(),
        postal_address: sender.postal_address.clone(),
        list_name: list.name.clone(),
        list_description: list.description.clone(),
        unsubscribe_mailbox: sender.unsubscribe_mailbox.clone().unwrap_or_default(),
    }
}

/// `List-Unsubscribe` (RFC 2369/8058): the HTTPS URL first, then `mailto:` when an
/// unsubscribe mailbox is configured; angle brackets, no whitespace inside them.
pub fn list_unsubscribe(unsubscribe_url: &str, mailbox: Option<&str>, token: &str) -> String {
    match mailbox {
        Some(m) if !m.trim().is_empty() => {
            format!(
                "<{unsubscribe_url}>, <mailto:{}?subject=unsubscribe%20{token}>",
                m.trim()
            )
        }
        _ => format!("<{unsubscribe_url}>"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_unsubscribe_has_https_first_and_mailto() {
        assert_eq!(
            list_unsubscribe("https://e.org/unsubscribe/T", Some("unsub@e.org"), "T"),
            "<https://e.org/unsubscribe/T>, <mailto:unsub@e.org?subject=unsubscribe%20T>"
        );
        assert_eq!(
            list_unsubscribe("https://e.org/u/T", None, "T"),
            "<https://e.org/u/T>"
        );
    }
}
