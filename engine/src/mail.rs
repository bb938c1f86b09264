//! Confirmation mails: rendering from the templates (see [`crate::templates`]), content
//! hashes, and the list headers. The DOI mail says who asks, for what list, offers one confirm
//! link, and tells the reader to ignore it if it was not them — nothing else (a DOI mail that
//! advertises is itself unsolicited marketing; the template check refuses such templates).
//!
//! Every rendering has a content hash that goes into the ledger, and the rendering itself is
//! stored as a snapshot under that hash, so the proof shows the exact text the person received.

use chrono::{DateTime, Utc};
use optinsync_plugin_api::OutgoingMessage;
use sha2::{Digest, Sha256};

use crate::config::{ListConfig, LoadedConfig, SenderConfig};
use crate::consent::MailKind;
use crate::store::{Contact, Snapshot};
use crate::templates::{Common, TemplateError, Templates};
use crate::tokens::{Claims, Purpose, TokenKeys};

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
    preferences_url: &str,
) -> Result<RenderedMail, TemplateError> {
    templates.render_mail(
        kind,
        language,
        &common(list, sender),
        confirm_url,
        unsubscribe_url,
        preferences_url,
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

/// One confirmation mail to compose: to whom, for which list and signup.
#[derive(Debug, Clone, Copy)]
pub struct Letter<'a> {
    pub kind: MailKind,
    pub contact: &'a Contact,
    pub list: &'a ListConfig,
    /// The signup's token: the confirm link carries it.
    pub signup_token: &'a str,
    /// The outbox row's key: the Message-ID and the unsubscribe link derive from it, so a
    /// retry after a crash sends the same message as the attempt the relay may already have.
    pub outbox_key: &'a str,
    pub now: DateTime<Utc>,
}

/// A composed mail: the message for the transport, the snapshot of its text to store before
/// it leaves (under the hash the ledger names), and the ids the ledger records.
#[derive(Debug)]
pub struct Composed {
    pub message: OutgoingMessage,
    pub snapshot: Snapshot,
    pub content_hash: String,
    pub unsubscribe_token_id: String,
    /// Token id of the mail's preference-centre link.
    pub preferences_token_id: String,
}

/// Compose `letter`: mint its confirm and unsubscribe links, render it in the contact's
/// language, and build the message with its list headers. Pure apart from the clock in
/// `letter.now`; the outbox worker stores the snapshot, sends, and records the event.
pub fn compose(
    config: &LoadedConfig,
    tokens: &TokenKeys,
    letter: &Letter<'_>,
) -> Result<Composed, TemplateError> {
    let Letter {
        kind,
        contact,
        list,
        ..
    } = *letter;
    let ttl = chrono::Duration::from_std(config.config.tokens.confirm_ttl.0)
        .unwrap_or(chrono::Duration::days(7));
    let confirm = tokens.mint(&Claims {
        purpose: Purpose::Confirm,
        token_id: letter.signup_token.to_owned(),
        contact_id: contact.id.clone(),
        list_id: list.id.clone(),
        expires: Some((letter.now + ttl).timestamp()),
    });
    let unsubscribe_token_id = unsubscribe_token_id(letter.outbox_key);
    let unsubscribe = tokens.mint(&Claims {
        purpose: Purpose::Unsubscribe,
        token_id: unsubscribe_token_id.clone(),
        contact_id: contact.id.clone(),
        list_id: list.id.clone(),
        expires: None,
    });
    // The preference centre's link: long-lived like the unsubscribe link, its own token id.
    let preferences_token_id = preferences_token_id(letter.outbox_key);
    let preferences = tokens.mint(&Claims {
        purpose: Purpose::Preferences,
        token_id: preferences_token_id.clone(),
        contact_id: contact.id.clone(),
        list_id: list.id.clone(),
        expires: None,
    });
    let base = &config.config.server.public_url;
    let preferences_url = format!("{base}/preferences/{preferences}");
    let confirm_url = format!("{base}/confirm/{confirm}");
    let unsubscribe_url = format!("{base}/unsubscribe/{unsubscribe}");
    let sender = &config.config.sender;
    let templates = &config.templates;
    let language = templates.language_for(contact.language.as_deref(), &list.default_language);
    let rendered = render(
        templates,
        kind,
        &language,
        list,
        sender,
        &confirm_url,
        &unsubscribe_url,
        &preferences_url,
    )?;
    let snapshot = snapshot_of(
        &rendered,
        &format!("mail:{}", kind.as_str()),
        templates,
        letter.now,
    );
    // DOI mails come from the transactional sender (`sender.from`), never the newsletter's.
    let message = OutgoingMessage {
        idempotency_key: letter.outbox_key.replace(':', "-"),
        message_id: message_id(letter.outbox_key, &sender.from),
        from: sender.from.clone(),
        to: contact.email.clone(),
        subject: rendered.subject,
        text: rendered.text,
        html: Some(rendered.html),
        headers: vec![
            (
                "List-Unsubscribe".into(),
                list_unsubscribe(
                    &unsubscribe_url,
                    sender.unsubscribe_mailbox.as_deref(),
                    &unsubscribe,
                ),
            ),
            (
                "List-Unsubscribe-Post".into(),
                "List-Unsubscribe=One-Click".into(),
            ),
        ],
    };
    Ok(Composed {
        message,
        snapshot,
        content_hash: rendered.content_hash,
        unsubscribe_token_id,
        preferences_token_id,
    })
}

/// The mail with a preference-centre link that `contact` asked for (not a list mail: no
/// `List-Unsubscribe`), from the transactional sender; derived from the outbox key like the
/// others, so a retry sends the same message.
pub fn compose_preferences_link(
    config: &LoadedConfig,
    tokens: &TokenKeys,
    contact: &Contact,
    list: &ListConfig,
    outbox_key: &str,
    now: DateTime<Utc>,
) -> Result<Composed, TemplateError> {
    let preferences_token_id = preferences_token_id(outbox_key);
    let token = tokens.mint(&Claims {
        purpose: Purpose::Preferences,
        token_id: preferences_token_id.clone(),
        contact_id: contact.id.clone(),
        list_id: list.id.clone(),
        expires: None,
    });
    let url = format!("{}/preferences/{token}", config.config.server.public_url);
    let sender = &config.config.sender;
    let templates = &config.templates;
    let language = templates.language_for(contact.language.as_deref(), &list.default_language);
    let rendered = templates.render_preferences_link(&language, &common(list, sender), &url)?;
    let snapshot = snapshot_of(&rendered, "mail:preferences_link", templates, now);
    let message = OutgoingMessage {
        idempotency_key: outbox_key.replace(':', "-"),
        message_id: message_id(outbox_key, &sender.from),
        from: sender.from.clone(),
        to: contact.email.clone(),
        subject: rendered.subject,
        text: rendered.text,
        html: Some(rendered.html),
        headers: vec![],
    };
    Ok(Composed {
        message,
        snapshot,
        content_hash: rendered.content_hash,
        unsubscribe_token_id: String::new(),
        preferences_token_id,
    })
}

/// The snapshot of a rendered mail, stored under the hash the ledger names.
fn snapshot_of(
    rendered: &RenderedMail,
    kind: &str,
    templates: &Templates,
    now: DateTime<Utc>,
) -> Snapshot {
    Snapshot {
        hash: rendered.content_hash.clone(),
        kind: kind.to_owned(),
        language: rendered.language.clone(),
        template_version: templates.version().to_owned(),
        content: serde_json::json!({
            "subject": rendered.subject,
            "text": rendered.text,
            "html": rendered.html,
        })
        .to_string(),
        created_at: now,
    }
}

/// The unsubscribe link's token id for the mail of outbox row `key`: a UUID-shaped digest.
pub fn unsubscribe_token_id(key: &str) -> String {
    token_id_for(b"optinsync unsubscribe token id v1\0", key)
}

/// The preference-centre link's token id for the mail of outbox row `key`.
pub fn preferences_token_id(key: &str) -> String {
    token_id_for(b"optinsync preferences token id v1\0", key)
}

fn token_id_for(domain: &[u8], key: &str) -> String {
    let mut digest = Sha256::new();
    digest.update(domain);
    digest.update(key.as_bytes());
    let bytes: [u8; 32] = digest.finalize().into();
    let mut id = [0u8; 16];
    id.copy_from_slice(&bytes[..16]);
    uuid::Uuid::from_bytes(id).to_string()
}

/// Message-ID derived from the outbox key, so a re-sent attempt carries the same id as the
/// first and the ledger names the message the person actually got.
pub fn message_id(key: &str, from: &str) -> String {
    let domain = from
        .rsplit_once('@')
        .map(|(_, d)| d.trim_end_matches('>').trim())
        .filter(|d| !d.is_empty())
        .unwrap_or("optinsync.invalid");
    let digest = hex::encode(Sha256::digest(key.as_bytes()));
    format!("{}@{domain}", &digest[..32])
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

    #[test]
    fn message_id_is_stable_and_uses_sender_domain() {
        let a = message_id("mail:1", "Org <confirm@example.org>");
        assert_eq!(a, message_id("mail:1", "Org <confirm@example.org>"));
        assert!(a.ends_with("@example.org"), "{a}");
        assert_ne!(a, message_id("mail:2", "Org <confirm@example.org>"));
    }
}
