//! What a mail transport exchanges with the engine.

use serde::{Deserialize, Serialize};

/// A fully rendered mail, ready for a transport.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutgoingMessage {
    /// Stable key: a transport that can deduplicate must not send the same key twice.
    pub idempotency_key: String,
    /// `Message-ID` without angle brackets, chosen by the engine so it is in the ledger.
    pub message_id: String,
    pub from: String,
    pub to: String,
    pub subject: String,
    pub text: String,
    pub html: Option<String>,
    /// Extra headers, e.g. `List-Unsubscribe`.
    pub headers: Vec<(String, String)>,
}

/// Proof that a transport accepted a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SentMessage {
    pub message_id: String,
    /// `true` when the transport recognised the idempotency key and did not send again.
    pub deduplicated: bool,
}

/// A message a transport made ready ahead of sending it ([`crate::MailTransport::prepare`]).
/// In-process only: the out-of-process protocol carries [`OutgoingMessage`], and an exec
/// connector keeps the default `prepare`, which does nothing ahead.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadyMessage {
    pub message: OutgoingMessage,
    /// The message as it goes on the wire, if the transport made it ahead.
    pub wire: Option<WireMessage>,
}

impl ReadyMessage {
    /// Nothing made ahead: [`crate::MailTransport::send_ready`] sends `message` as
    /// [`crate::MailTransport::send`] would.
    pub fn unprepared(message: OutgoingMessage) -> Self {
        Self {
            message,
            wire: None,
        }
    }
}

/// A message in its wire form: the SMTP envelope and the bytes as sent (RFC 5322, signed
/// where the transport signs).
#[derive(Clone, PartialEq, Eq)]
pub struct WireMessage {
    pub mail_from: Option<String>,
    pub rcpt_to: Vec<String>,
    pub bytes: Vec<u8>,
}

impl std::fmt::Debug for WireMessage {
    // Counts only: the bytes as numbers help nobody, and the addresses are personal data.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WireMessage")
            .field("rcpt_to", &self.rcpt_to.len())
            .field("bytes", &self.bytes.len())
            .finish_non_exhaustive()
    }
}
