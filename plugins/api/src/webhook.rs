//! Webhooks: an outside system calls `GET` or `POST /webhooks/{name}` on the daemon; the
//! connector named `name` verifies the call and says what it means.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::{RecordRef, StatusEvent};

/// The HTTP methods a webhook may use (others are refused before any connector sees them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum HttpMethod {
    /// Vendors validate a webhook URL with a `GET` (Mailchimp) before they post to it.
    Get,
    Post,
}

/// One webhook call as the daemon received it: everything a vendor's signature may cover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookRequest {
    pub method: HttpMethod,
    /// The path as received (`/webhooks/crm`), without the query.
    pub path: String,
    /// The raw query string without `?` (`""` when there is none), undecoded, as a signature
    /// over the full URI needs it.
    pub query: String,
    /// Header names in lowercase, values as received (headers that are not UTF-8 left out).
    pub headers: Vec<(String, String)>,
    /// The body; non-UTF-8 bodies are refused by the daemon (every vendor sends JSON or form
    /// data).
    pub body: String,
    /// The direct peer (or the client a trusted proxy names).
    pub peer: Option<IpAddr>,
}

impl WebhookRequest {
    /// The first header of that (lowercase) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// A query parameter, decoded as a form (first occurrence).
    pub fn query_param(&self, name: &str) -> Option<String> {
        form_urlencoded::parse(self.query.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }
}

/// What a webhook call means.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WebhookEvent {
    /// CRM: fetch these records now (incremental fetch of the named ids).
    Changed { records: Vec<RecordRef> },
    /// Campaigns: these things happened on `list` (the list's id in the tool), handled like
    /// polled status events.
    Status {
        list: String,
        events: Vec<StatusEvent>,
    },
    /// A call the connector recognised but that needs no work (a validation `GET`, a ping).
    Ignored,
}
