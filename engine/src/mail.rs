//! Rendering of confirmation mails. The DOI mail says who asks, for what list, offers one
//! confirm link, and tells the reader to ignore it if it was not them — nothing else (a DOI
//! mail that advertises is itself unsolicited marketing).
//!
//! Every rendering has a content hash that goes into the ledger, so the proof names the exact
//! text the person received.

use sha2::{Digest, Sha256};

use crate::config::{ListConfig, SenderConfig};
use crate::consent::MailKind;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedMail {
    pub subject: String,
    pub text: String,
    pub html: String,
    /// SHA-256 over subject, text and HTML.
    pub content_hash: String,
}

pub fn content_hash(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p.as_bytes());
    }
    hex::encode(h.finalize())
}

pub fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

pub fn render(
    kind: MailKind,
    list: &ListConfig,
    sender: &SenderConfig,
    confirm_url: &str,
    unsubscribe_url: &str,
) -> RenderedMail {
    let org = &sender.organisation;
    let name = &list.name;
    let (subject, ask) = match kind {
        MailKind::Doi => (
            format!("Please confirm: {name}"),
            format!(
                "{org} was asked to send you \"{name}\". We need your confirmation before we send anything."
            ),
        ),
        MailKind::Reminder => (
            format!("Reminder: please confirm {name}"),
            format!(
                "A few days ago {org} asked you to confirm that you want \"{name}\". We have not heard back yet; this is the only reminder."
            ),
        ),
        MailKind::Revalidation => (
            format!("Do you still want {name}?"),
            format!(
                "You have been receiving \"{name}\" from {org}. Please confirm that you still want it; if you do not, we will stop sending it."
            ),
        ),
    };
    let description = if list.description.is_empty() {
        String::new()
    } else {
        format!("\n\n{}", list.description)
    };
    let text = format!(
        "Hello,\n\n{ask}{description}\n\nTo confirm, open this link and press the button on the page:\n{confirm_url}\n\n\
         If you did not ask for this, ignore this mail: without your confirmation you will not receive anything.\n\n\
         --\n{org}\n{address}\nStop all mail from us: {unsubscribe_url}\n",
        address = sender.postal_address,
    );
    let html = format!(
        "<!doctype html><html><body style=\"font-family:sans-serif;max-width:40em\">\
         <p>Hello,</p><p>{ask}</p>{desc}\
         <p><a href=\"{confirm}\" style=\"display:inline-block;padding:.6em 1.2em;background:#1a5fb4;color:#fff;text-decoration:none;border-radius:4px\">Confirm</a></p>\
         <p>If you did not ask for this, ignore this mail: without your confirmation you will not receive anything.</p>\
         <hr><p style=\"font-size:small;color:#555\">{org}<br>{address}<br><a href=\"{unsub}\">Stop all mail from us</a></p>\
         </body></html>",
        ask = html_escape(&ask),
        desc = if list.description.is_empty() {
            String::new()
        } else {
            format!("<p>{}</p>", html_escape(&list.description))
        },
        confirm = html_escape(confirm_url),
        org = html_escape(org),
        address = html_escape(&sender.postal_address),
        unsub = html_escape(unsubscribe_url),
    );
    // Short lines: mail bodies must stay under 998 octets per line (RFC 5322).
    let html = html.replace("</p>", "</p>\n").replace("<hr>", "<hr>\n");
    let content_hash = content_hash(&[&subject, &text, &html]);
    RenderedMail {
        subject,
        text,
        html,
        content_hash,
    }
}
