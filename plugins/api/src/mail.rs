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
