//! Webhooks: registration on the mapped audiences (`maintain`) and reading Mailchimp's
//! deliveries and validation calls.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;

use chrono::Utc;
use optinsync_plugin_api::{
    ConnectorError, ConnectorResult, HttpMethod, StatusEvent, StatusKind, WebhookEvent,
    WebhookRequest,
};
use reqwest::Method;
use serde_json::{Value, json};
use subtle::ConstantTimeEq as _;

use crate::http::CallError;
use crate::parse::parse_webhook_form;
use crate::{DoiMode, Mailchimp, SETTING_PREFIX, subscriber_hash};

impl Mailchimp {
    /// Register the webhook on every mapped audience (once per process when it worked;
    /// listing the audience's webhooks first, so a restart adds none twice).
    pub(crate) async fn register_webhooks(&self) -> ConnectorResult<()> {
        let (Some(w), Some(url)) = (&self.webhook, self.webhook_url()) else {
            return Ok(());
        };
        if !w.register || self.registered.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut done = BTreeSet::new();
        for (name, m) in &self.lists {
            if !done.insert(m.audience.clone()) {
                continue;
            }
            let path = format!("/lists/{}/webhooks", m.audience);
            let existing = self
                .call(Method::GET, &path, &[], None)
                .await
                .map_err(|e| self.item_error(name, m, e))?;
            let present = existing
                .get("webhooks")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .any(|h| h.get("url").and_then(Value::as_str) == Some(url.as_str()));
            if present {
                continue;
            }
            let body = json!({
                "url": url,
                "events": {"subscribe": true, "unsubscribe": true, "profile": false,
                           "cleaned": true, "upemail": true, "campaign": false},
                "sources": {"user": true, "admin": true, "api": false},
            });
            match self.call(Method::POST, &path, &[], Some(&body)).await {
                Ok(_) => tracing::info!(list = %name, "Mailchimp webhook registered"),
                Err(CallError::Problem { title, detail, .. }) => {
                    return Err(ConnectorError::Config {
                        setting: format!("{SETTING_PREFIX}.webhook.url"),
                        message: format!(
                            "Mailchimp did not register the webhook ({}: {}); the URL must be reachable from the internet and answer GET",
                            title.escape_debug(),
                            detail.escape_debug()
                        ),
                    });
                }
                Err(CallError::Connector(e)) => return Err(e),
            }
        }
        self.registered.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Check the secret, then read the call (see the crate docs, "Webhooks").
    pub(crate) async fn handle_webhook(
        &self,
        request: &WebhookRequest,
    ) -> ConnectorResult<WebhookEvent> {
        let invalid = |message: &str| ConnectorError::InvalidInput {
            message: message.to_owned(),
        };
        let Some(w) = &self.webhook else {
            return Err(invalid(
                "this connector takes no webhooks (no [webhook] table)",
            ));
        };
        let given = request.query_param("secret").unwrap_or_default();
        if given.is_empty() || !bool::from(given.as_bytes().ct_eq(w.secret.as_bytes())) {
            return Err(invalid("missing or wrong webhook secret"));
        }
        if request.method == HttpMethod::Get {
            return Ok(WebhookEvent::Ignored);
        }
        let form = parse_webhook_form(&request.body)
            .map_err(|e| invalid(&format!("not a Mailchimp webhook delivery: {e}")))?;
        let Some((name, m)) = self.mapping_of_audience(&form.list_id) else {
            return Err(invalid("the delivery names an audience that no list maps"));
        };
        let at = form.fired_at.unwrap_or_else(Utc::now);
        let event = |email: &str, kind: StatusKind, detail: String| StatusEvent {
            email: email.to_owned(),
            kind,
            at,
            detail: Some(detail),
            // Mailchimp cleans an address after a hard bounce (`reason=hard`) or repeated
            // soft ones: for optinsync either is a lasting refusal of the address.
            bounce: (kind == StatusKind::Bounced)
                .then_some(optinsync_plugin_api::BounceClass::Hard),
        };
        let mut events = Vec::new();
        match form.kind.as_str() {
            "unsubscribe" if form.action == "delete" => {}
            "unsubscribe" => {
                let own = self.own_removals(&m.audience).await?;
                if form.reason == "abuse" {
                    events.push(event(
                        &form.email,
                        StatusKind::Complained,
                        "Mailchimp webhook: unsubscribed as a spam complaint".into(),
                    ));
                } else if !own.contains(&subscriber_hash(&form.email)) {
                    events.push(event(
                        &form.email,
                        StatusKind::Unsubscribed,
                        "Mailchimp webhook: unsubscribed".into(),
                    ));
                }
            }
            "cleaned" => {
                let (kind, what) = if form.reason == "abuse" {
                    (StatusKind::Complained, "cleaned after a spam complaint")
                } else {
                    (StatusKind::Bounced, "cleaned (bounced)")
                };
                events.push(event(
                    &form.email,
                    kind,
                    format!("Mailchimp webhook: {what}"),
                ));
            }
            "subscribe" if m.doi == DoiMode::Mailchimp => {
                events.push(event(
                    &form.email,
                    StatusKind::Confirmed,
                    format!(
                        "Mailchimp webhook: confirmed Mailchimp's own opt-in mail (ip_opt {})",
                        form.ip_opt.escape_debug()
                    ),
                ));
            }
            "upemail" => {
                events.push(event(
                    &form.old_email,
                    StatusKind::Unsubscribed,
                    "Mailchimp webhook: the member changed this address to another one".into(),
                ));
            }
            _ => {}
        }
        if events.is_empty() {
            return Ok(WebhookEvent::Ignored);
        }
        tracing::info!(
            events = events.len(),
            kind = %form.kind.escape_debug(),
            "Mailchimp webhook"
        );
        // The engine applies webhook events to the lists whose `campaigns_list` is `list`:
        // the name this audience is mapped under (the name `subscribe` and `status_events`
        // are called with), not the audience id.
        Ok(WebhookEvent::Status {
            list: name.clone(),
            events,
        })
    }
}
