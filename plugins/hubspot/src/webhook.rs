//! HubSpot webhooks: the v3 signature (`X-HubSpot-Signature-v3`: base64 of HMAC-SHA256 keyed
//! with the app's client secret over method + full URI + body + timestamp), the timestamp's
//! age, and the JSON array of events.

use std::collections::BTreeSet;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use optinsync_plugin_api::{ConnectorError, ConnectorResult, WebhookRequest};
use serde_json::Value;
use sha2::Sha256;

/// What one delivery asks for: the contacts to read again.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WebhookNotice {
    /// Contacts created or changed, in the order first named, without repeats.
    pub changed: Vec<u64>,
    /// Every `contact.propertyChange`: `(contact, property, occurredAt in epoch ms)`.
    pub properties: Vec<(u64, String, Option<i64>)>,
    /// Events of other kinds (deletions, merges, ...): the poll handles them.
    pub ignored: usize,
}

fn refuse(message: impl Into<String>) -> ConnectorError {
    ConnectorError::InvalidInput {
        message: message.into(),
    }
}

/// Parse a delivery body (a JSON array of events). Public for fuzzing.
pub fn parse_webhook_body(body: &str) -> ConnectorResult<WebhookNotice> {
    let value: Value = serde_json::from_str(body)
        .map_err(|e| refuse(format!("not a HubSpot webhook body: {e}")))?;
    let Value::Array(events) = value else {
        return Err(refuse("a HubSpot webhook body is a JSON array of events"));
    };
    if events.len() > 1000 {
        return Err(refuse("too many events in one HubSpot webhook delivery"));
    }
    let mut notice = WebhookNotice::default();
    let mut named = BTreeSet::new();
    for event in &events {
        let Some(obj) = event.as_object() else {
            return Err(refuse("a HubSpot webhook event is a JSON object"));
        };
        let kind = obj
            .get("subscriptionType")
            .and_then(Value::as_str)
            .ok_or_else(|| refuse("a HubSpot webhook event without subscriptionType"))?;
        let object_id = match obj.get("objectId") {
            Some(Value::Number(n)) => n.as_u64(),
            Some(Value::String(s)) => s.trim().parse::<u64>().ok(),
            _ => None,
        };
        match kind {
            "contact.creation" | "contact.propertyChange" => {
                let Some(id) = object_id.filter(|id| *id > 0) else {
                    return Err(refuse("a HubSpot contact event without a numeric objectId"));
                };
                if kind == "contact.propertyChange"
                    && let Some(p) = obj.get("propertyName").and_then(Value::as_str)
                {
                    let occurred = obj.get("occurredAt").and_then(Value::as_i64);
                    notice.properties.push((id, p.to_owned(), occurred));
                }
                if named.insert(id) {
                    notice.changed.push(id);
                }
            }
            _ => notice.ignored += 1,
        }
    }
    Ok(notice)
}

/// The URI HubSpot signed: the configured target URL (its path taken from the request when the
/// setting names only the host), the query as received, the documented escapes decoded.
pub(crate) fn signed_uri(configured: &str, request: &WebhookRequest) -> String {
    let after_scheme = configured
        .split_once("://")
        .map_or(configured, |(_, rest)| rest);
    let mut uri = if after_scheme.contains('/') {
        configured.to_owned()
    } else {
        format!("{configured}{}", request.path)
    };
    if !request.query.is_empty() {
        uri.push('?');
        uri.push_str(&request.query);
    }
    decode_escapes(&uri)
}

fn decode_escapes(uri: &str) -> String {
    const ESCAPES: &[(&str, &str)] = &[
        ("%3A", ":"),
        ("%2F", "/"),
        ("%3F", "?"),
        ("%40", "@"),
        ("%21", "!"),
        ("%24", "$"),
        ("%27", "'"),
        ("%28", "("),
        ("%29", ")"),
        ("%2A", "*"),
        ("%2C", ","),
        ("%3B", ";"),
    ];
    let mut out = uri.to_owned();
    for (from, to) in ESCAPES {
        out = out.replace(from, to).replace(&from.to_lowercase(), to);
    }
    out
}

/// Check `X-HubSpot-Signature-v3` and `X-HubSpot-Request-Timestamp` (epoch ms, at most
/// `max_age_ms` old or ahead); the HMAC comparison is constant-time.
pub(crate) fn verify_v3(
    secret: &str,
    uri: &str,
    request: &WebhookRequest,
    now_ms: i64,
    max_age_ms: i64,
) -> ConnectorResult<()> {
    let Some(signature) = request.header("x-hubspot-signature-v3") else {
        return Err(refuse(
            "HubSpot webhook without X-HubSpot-Signature-v3; refused",
        ));
    };
    let raw_timestamp = request
        .header("x-hubspot-request-timestamp")
        .map(str::trim)
        .unwrap_or_default();
    // Milliseconds as documented; a value in seconds is read as such for the age check.
    let Some(timestamp) = raw_timestamp.parse::<i64>().ok().map(|t| {
        if t < 100_000_000_000 {
            t.saturating_mul(1000)
        } else {
            t
        }
    }) else {
        return Err(refuse(
            "HubSpot webhook without a valid X-HubSpot-Request-Timestamp; refused",
        ));
    };
    if now_ms.saturating_sub(timestamp).abs() > max_age_ms {
        return Err(refuse(
            "HubSpot webhook timestamp is too old (or too far ahead); refused as a possible replay",
        ));
    }
    let Ok(given) = base64::engine::general_purpose::STANDARD.decode(signature.trim()) else {
        return Err(refuse("HubSpot webhook signature is not base64; refused"));
    };
    let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()) else {
        return Err(refuse("HubSpot webhook secret unusable"));
    };
    mac.update(b"POST");
    mac.update(uri.as_bytes());
    mac.update(request.body.as_bytes());
    mac.update(raw_timestamp.as_bytes());
    // `verify_slice` compares in constant time.
    mac.verify_slice(&given)
        .map_err(|_| refuse("HubSpot webhook signature does not match; refused"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use optinsync_plugin_api::HttpMethod;

    use super::*;

    fn request(body: &str, signature: &str, ts: i64) -> WebhookRequest {
        WebhookRequest {
            method: HttpMethod::Post,
            path: "/hubspot/webhook".into(),
            query: String::new(),
            headers: vec![
                ("x-hubspot-signature-v3".into(), signature.into()),
                ("x-hubspot-request-timestamp".into(), ts.to_string()),
            ],
            body: body.into(),
            peer: None,
        }
    }

    /// The worked example from HubSpot's request-validation page, as computed for the
    /// project's reference notes.
    #[test]
    fn v3_signature_test_vector() {
        let secret = "yyyyyyyy-yyyy-yyyy-yyyy-yyyyyyyyyyyy";
        let ts = 1_700_000_000_000;
        let req = request(
            r#"[{"eventId":1}]"#,
            "Uqayf9EATYg43PeNmeE17hOa4lFz6HGJNBfbAk94Uf0=",
            ts,
        );
        let uri = signed_uri("https://example.com", &req);
        assert_eq!(uri, "https://example.com/hubspot/webhook");
        verify_v3(secret, &uri, &req, ts + 1000, 300_000).unwrap();
        assert!(
            verify_v3(secret, &uri, &req, ts + 301_000, 300_000).is_err(),
            "stale"
        );
        assert!(verify_v3("other", &uri, &req, ts, 300_000).is_err());
        let forged = request(
            r#"[{"eventId":2}]"#,
            "Uqayf9EATYg43PeNmeE17hOa4lFz6HGJNBfbAk94Uf0=",
            ts,
        );
        assert!(verify_v3(secret, &uri, &forged, ts, 300_000).is_err());
    }

    #[test]
    fn events_name_contacts_once() {
        let n = parse_webhook_body(
            r#"[{"subscriptionType":"contact.propertyChange","objectId":512,"propertyName":"hs_email_optout","propertyValue":"true"},
                {"subscriptionType":"contact.creation","objectId":"513"},
                {"subscriptionType":"contact.propertyChange","objectId":512,"propertyName":"email"},
                {"subscriptionType":"contact.deletion","objectId":514}]"#,
        )
        .unwrap();
        assert_eq!(n.changed, [512, 513]);
        assert_eq!(n.ignored, 1);
        for bad in [
            "{}",
            "[1]",
            r#"[{"objectId":1}]"#,
            r#"[{"subscriptionType":"contact.creation","objectId":-1}]"#,
            "nope",
        ] {
            assert!(parse_webhook_body(bad).is_err(), "{bad}");
        }
    }
}
