//! Zoho CRM notifications: registering the channel, and what a callback must carry to be believed.

use chrono::Utc;
use optinsync_plugin_api::{ConnectorError, ConnectorResult};
use reqwest::Method;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

use super::http::{Reply, Request};
use super::{Channel, Webhook, ZohoCrm, zoho_time};

impl ZohoCrm {
    /// Register or renew the notification channel when due.
    pub(super) async fn maintain_channel(&self, w: &Webhook) -> ConnectorResult<()> {
        let mut channel = self.channel.lock().await;
        let now = tokio::time::Instant::now();
        if channel.is_some_and(|c| now < c.renew_at) {
            return Ok(());
        }
        let ttl = chrono::Duration::from_std(w.ttl).unwrap_or(chrono::Duration::days(1));
        let expiry = Utc::now() + ttl;
        let body = json!({ "watch": [{
            "channel_id": w.channel_id,
            "events": self.settings.modules.iter().map(|m| format!("{m}.all")).collect::<Vec<_>>(),
            "channel_expiry": zoho_time(expiry),
            "token": w.token,
            "notify_url": w.notify_url,
        }]});
        // A channel this process has not registered yet may still exist from before: POST,
        // and PUT if Zoho refuses; a known one is renewed with PUT, and re-created if gone.
        let order = if channel.is_some() {
            [Method::PUT, Method::POST]
        } else {
            [Method::POST, Method::PUT]
        };
        let mut last_error = None;
        for method in order {
            let reply = self
                .call(Request {
                    method: method.clone(),
                    path: "/actions/watch",
                    query: vec![],
                    if_modified_since: None,
                    body: Some(&body),
                })
                .await;
            let outcome = match reply {
                Ok(Reply::Json(_, v)) => {
                    let item = v.get("watch").and_then(|w| w.get(0));
                    let code = item
                        .and_then(|i| i.get("code"))
                        .and_then(Value::as_str)
                        .unwrap_or("");
                    if code == "SUCCESS" {
                        Ok(())
                    } else {
                        Err(ConnectorError::permanent(format!(
                            "Zoho CRM refused the notification channel: {}",
                            item.map(Value::to_string).unwrap_or_default()
                        )))
                    }
                }
                Ok(Reply::Empty) => Err(ConnectorError::permanent(
                    "Zoho CRM answered the channel registration with no content",
                )),
                Err(e) => Err(self.crm_error(e, "actions/watch")),
            };
            match outcome {
                Ok(()) => {
                    tracing::info!(channel_id = w.channel_id, expiry = %zoho_time(expiry), method = %method, "Zoho CRM notification channel registered");
                    *channel = Some(Channel {
                        renew_at: now + w.ttl / 2,
                    });
                    return Ok(());
                }
                Err(e @ ConnectorError::Transient { .. }) => return Err(e),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error
            .unwrap_or_else(|| ConnectorError::permanent("notification channel not registered")))
    }
}

/// A notification callback (Zoho's notification API); unknown fields are ignored.
#[derive(Debug, Deserialize)]
pub(super) struct Notification {
    #[serde(default)]
    pub(super) token: Option<String>,
    #[serde(default)]
    pub(super) channel_id: Option<Value>,
    #[serde(default)]
    pub(super) module: Option<String>,
    #[serde(default)]
    pub(super) ids: Vec<Value>,
    #[serde(default)]
    pub(super) operation: Option<String>,
}

/// Whether a notification's channel token is the configured one, in time independent of
/// where or whether they differ and of the given token's length: subtle's slice `ct_eq`
/// returns early on a length mismatch (security review F13), so fixed-size SHA-256 digests
/// are compared instead, as the admin API's bearer check does. An empty token never matches.
pub(super) fn webhook_token_matches(expected: &str, given: &str) -> bool {
    let expected: [u8; 32] = Sha256::digest(expected.as_bytes()).into();
    let digest: [u8; 32] = Sha256::digest(given.as_bytes()).into();
    bool::from(digest.ct_eq(&expected)) && !given.is_empty()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use optinsync_plugin_api::WebhookEvent;

    use super::*;
    use crate::crm::tests::crm;

    #[test]
    fn f13_webhook_token_compare_is_length_independent() {
        let expected = "s3cr3t-channel-token";
        assert!(webhook_token_matches(expected, expected));
        for wrong in [
            "",
            "s3cr3t",                        // a prefix (shorter)
            "s3cr3t-channel-toke",           // one character short
            "s3cr3t-channel-token-and-more", // longer, with the right token as its prefix
            "s3cr3t-channel-tokem",          // same length, last character differs
            "S3cr3t-channel-token",          // same length, first character differs
        ] {
            assert!(
                !webhook_token_matches(expected, wrong),
                "`{wrong}` must not match"
            );
        }
        // The parser refuses a wrong-length token the same way as a wrong token.
        let crm = crm(
            "[webhook]\nnotify_url = \"https://example.org/webhooks/crm\"\ntoken = \"s3cr3t-channel-token\"\nchannel_id = 1",
        );
        let body = |token: &str| {
            json!({"channel_id": 1, "token": token, "module": "Contacts",
                "ids": ["41"], "operation": "update"})
            .to_string()
        };
        assert!(matches!(
            crm.parse_webhook(&[], body(expected).as_bytes()),
            Ok(WebhookEvent::Changed { records }) if records.len() == 1
        ));
        for token in ["s3cr3t", "s3cr3t-channel-token-and-more"] {
            let err = crm.parse_webhook(&[], body(token).as_bytes()).unwrap_err();
            assert!(
                matches!(&err, ConnectorError::InvalidInput { message } if message.contains("wrong channel token")),
                "{token}: {err:?}"
            );
        }
    }
}
