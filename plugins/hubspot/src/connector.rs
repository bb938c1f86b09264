//! The [`CrmConnector`] implementation: health and start-up checks, fetch (single and batch),
//! webhooks, and the calls into the feed and the write-back.

use std::collections::BTreeSet;

use async_trait::async_trait;
use chrono::Utc;
use optinsync_plugin_api::{
    ChangePage, Connector, ConnectorError, ConnectorResult, ConsentWriteBack, CrmConnector,
    CrmRecord, Cursor, Health, HttpMethod, RecordRef, WebhookEvent, WebhookRequest,
};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::webhook::{parse_webhook_body, signed_uri, verify_v3};
use crate::{HubSpotCrm, MAX_BATCH, MODULE, PREFETCH_TTL, lock};

const CONTACT_PATH: &str = "/crm/v3/objects/contacts/";
const PROPERTIES_PATH: &str = "/crm/v3/properties/contacts";
const DEFINITIONS_PATH: &str = "/communication-preferences/v3/definitions";

impl HubSpotCrm {
    /// Does every mapped property exist? A typo would otherwise read as "nobody asked for
    /// anything". Needs `crm.schemas.contacts.read`.
    async fn check_properties(&self) -> ConnectorResult<String> {
        let (_, value) = self
            .api
            .call(Method::GET, PROPERTIES_PATH, &[], None, false)
            .await
            .map_err(|e| self.api.error(e, "property definitions"))?;
        let names: BTreeSet<&str> = value
            .get("results")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|p| p.get("name").and_then(Value::as_str))
            .collect();
        if names.is_empty() {
            return Err(ConnectorError::transient(
                "HubSpot listed no contact properties",
            ));
        }
        let s = &self.settings;
        let mut mapped: Vec<(String, &str)> =
            vec![("opt_out_property".into(), s.opt_out_property.as_str())];
        if let Some(l) = &s.language_property {
            mapped.push(("language_property".into(), l));
        }
        for f in &s.fields {
            mapped.push(("fields".into(), f));
        }
        for (list, rule) in &s.asserts {
            mapped.push((format!("asserts.{list}"), rule.property()));
        }
        for (list, t) in &s.lists {
            if let Some(p) = &t.consent_property {
                mapped.push((format!("write_back.lists.{list}.consent_property"), p));
            }
        }
        for (setting, property) in &mapped {
            if !names.contains(property) {
                return Err(ConnectorError::Config {
                    setting: Self::setting(setting),
                    message: format!(
                        "HubSpot has no contact property `{property}`; use the property's internal name (Settings > Properties)"
                    ),
                });
            }
        }
        let missing_types: Vec<&str> = s
            .type_opt_outs
            .keys()
            .map(String::as_str)
            .filter(|p| !names.contains(p))
            .collect();
        let note = if missing_types.is_empty() {
            String::new()
        } else {
            tracing::warn!(properties = ?missing_types, "HubSpot has no per-type opt-out properties; per-type opt-outs are not read from the contact");
            format!(" ({} not present)", missing_types.join(", "))
        };
        Ok(format!("{} mapped properties present{note}", mapped.len()))
    }

    /// Every subscription type named in `write_back.lists` exists and is active.
    async fn check_subscription_types(&self) -> ConnectorResult<String> {
        let wanted: Vec<(&String, &String)> = self
            .settings
            .lists
            .iter()
            .filter_map(|(l, t)| t.subscription_id.as_ref().map(|id| (l, id)))
            .collect();
        if wanted.is_empty() || !self.settings.write_back_enabled {
            return Ok("no subscription write-back".into());
        }
        let (_, value) = self
            .api
            .call(Method::GET, DEFINITIONS_PATH, &[], None, false)
            .await
            .map_err(|e| self.api.error(e, "subscription definitions"))?;
        let active: BTreeSet<String> = value
            .get("subscriptionDefinitions")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|d| d.get("isActive").and_then(Value::as_bool) != Some(false))
            .filter_map(|d| match d.get("id") {
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Number(n)) => Some(n.to_string()),
                _ => None,
            })
            .collect();
        for (list, id) in &wanted {
            if !active.contains(*id) {
                return Err(ConnectorError::Config {
                    setting: Self::setting(&format!("write_back.lists.{list}.subscription_id")),
                    message: format!(
                        "HubSpot has no active subscription type {id} (GET /communication-preferences/v3/definitions lists them)"
                    ),
                });
            }
        }
        Ok(format!("{} subscription type(s) active", wanted.len()))
    }

    /// Read these contacts in batches of 100 (unknown ids are left out).
    pub async fn fetch_many(&self, ids: &[u64]) -> ConnectorResult<Vec<CrmRecord>> {
        let mut out = Vec::new();
        for chunk in ids.chunks(MAX_BATCH) {
            let body = json!({
                "properties": self.settings.properties,
                "inputs": chunk.iter().map(|id| json!({"id": id.to_string()})).collect::<Vec<_>>(),
            });
            let (_, value) = self
                .api
                .call(
                    Method::POST,
                    "/crm/v3/objects/contacts/batch/read",
                    &[],
                    Some(&body),
                    false,
                )
                .await
                .map_err(|e| self.api.error(e, "contact batch read"))?;
            for item in value
                .get("results")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Ok(rec) = self.parse_contact(item).record {
                    out.push(rec);
                }
            }
        }
        Ok(out)
    }

    /// Verify a webhook delivery and name the contacts to read again. Own write-backs
    /// (changes of only the properties optinsync writes, on a contact it just wrote) are left
    /// out.
    pub fn verify_webhook(&self, request: &WebhookRequest) -> ConnectorResult<Vec<u64>> {
        let Some(w) = &self.settings.webhook else {
            return Err(ConnectorError::InvalidInput {
                message: "HubSpot webhooks are not configured ([connectors.crm.webhook])".into(),
            });
        };
        if request.method != HttpMethod::Post {
            return Err(ConnectorError::InvalidInput {
                message: "HubSpot webhooks are POSTed".into(),
            });
        }
        let uri = signed_uri(&w.url, request);
        let max_age = i64::try_from(w.max_age.as_millis()).unwrap_or(i64::MAX);
        verify_v3(
            &w.client_secret,
            &uri,
            request,
            Utc::now().timestamp_millis(),
            max_age,
        )?;
        let notice = parse_webhook_body(&request.body)?;
        let written = self.written_properties();
        let ids = notice
            .changed
            .into_iter()
            .filter(|id| {
                let ours = self.echo_window(*id).is_some_and(|(before, after)| {
                    let mut changes = notice
                        .properties
                        .iter()
                        .filter(|(p, _, _)| p == id)
                        .peekable();
                    changes.peek().is_some()
                        && changes.all(|(_, name, at)| {
                            written.contains(name) && at.is_some_and(|t| before < t && t <= after)
                        })
                });
                if ours {
                    tracing::debug!(
                        contact = id,
                        "webhook for optinsync's own write-back; not CRM input"
                    );
                }
                !ours
            })
            .collect();
        Ok(ids)
    }
}

#[async_trait]
impl Connector for HubSpotCrm {
    async fn health(&self) -> ConnectorResult<Health> {
        let query = [
            ("limit", "1".to_owned()),
            ("properties", self.settings.properties.join(",")),
        ];
        match self
            .api
            .call(Method::GET, "/crm/v3/objects/contacts", &query, None, false)
            .await
            .map_err(|e| self.api.error(e, "contact list"))
        {
            Ok(_) => {}
            Err(e @ ConnectorError::Config { .. }) => return Err(e),
            Err(e) => {
                return Ok(Health {
                    ok: false,
                    detail: format!("HubSpot contacts: {e}"),
                });
            }
        }
        let properties = self.check_properties().await?;
        let types = self.check_subscription_types().await?;
        Ok(Health {
            ok: true,
            detail: format!(
                "HubSpot at {}: token ok, contacts readable, {properties}, {types}",
                self.api.base
            ),
        })
    }

    fn accepts_webhooks(&self) -> bool {
        self.settings.webhook.is_some()
    }

    async fn webhook(&self, request: &WebhookRequest) -> ConnectorResult<WebhookEvent> {
        let ids = self.verify_webhook(request)?;
        if ids.is_empty() {
            return Ok(WebhookEvent::Ignored);
        }
        // One batch read now; the engine's fetch of each record finds it here.
        match self.fetch_many(&ids).await {
            Ok(records) => {
                let now = tokio::time::Instant::now();
                let mut cache = lock(&self.prefetched);
                cache.retain(|_, (_, at)| now.duration_since(*at) < PREFETCH_TTL);
                for r in records {
                    cache.insert(r.record.id.clone(), (r, now));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "batch read for a HubSpot webhook failed; records are fetched one by one")
            }
        }
        Ok(WebhookEvent::Changed {
            records: ids
                .into_iter()
                .map(|id| RecordRef {
                    module: MODULE.into(),
                    id: id.to_string(),
                })
                .collect(),
        })
    }
}

#[async_trait]
impl CrmConnector for HubSpotCrm {
    async fn changes(&self, cursor: Option<&Cursor>, limit: usize) -> ConnectorResult<ChangePage> {
        self.next_changes(cursor, limit).await
    }

    async fn fetch(&self, record: &RecordRef) -> ConnectorResult<Option<CrmRecord>> {
        if record.module != MODULE {
            return Ok(None);
        }
        let Ok(id) = record.id.parse::<u64>() else {
            return Err(ConnectorError::InvalidInput {
                message: "not a HubSpot contact id (digits)".into(),
            });
        };
        if let Some((rec, at)) = lock(&self.prefetched).remove(&record.id)
            && at.elapsed() < PREFETCH_TTL
        {
            return Ok(Some(rec));
        }
        let path = format!("{CONTACT_PATH}{id}");
        let query = [("properties", self.settings.properties.join(","))];
        let value = match self.api.call(Method::GET, &path, &query, None, false).await {
            Ok((_, v)) => v,
            Err(e) if e.status() == Some(StatusCode::NOT_FOUND) => return Ok(None),
            Err(e) => return Err(self.api.error(e, "contact read")),
        };
        match self.parse_contact(&value).record {
            Ok(rec) => Ok(Some(rec)),
            Err(bad) => Err(ConnectorError::InvalidInput {
                message: format!("{}: {}", bad.location, bad.reason),
            }),
        }
    }

    async fn write_back(&self, consent: &ConsentWriteBack) -> ConnectorResult<()> {
        self.write_consent(consent).await
    }
}
