//! [`Connector`] and [`CrmConnector`] for [`ZohoCrm`]: the change feed, fetch, webhooks,
//! write-back, health.

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use optinsync_plugin_api::{
    ChangePage, Connector, ConnectorError, ConnectorResult, ConsentWriteBack, CrmConnector,
    CrmRecord, Cursor, Health, HttpMethod, NewContact, RecordRef, WebhookEvent, WebhookRequest,
};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use super::cursor::CursorState;
use super::http::{CallError, Envelope, Reply, Request};
use super::webhook::{Notification, webhook_token_matches};
use super::{MAX_PER_PAGE, MAX_UPDATE_BATCH, ZohoCrm};

impl ZohoCrm {
    /// Before the first sync: does every mapped field exist in every module? A typo in a field
    /// name would otherwise read as "nobody asked for anything". Needs the
    /// `ZohoCRM.settings.fields.READ` scope; without it the check is skipped and said so.
    async fn check_fields(&self) -> ConnectorResult<String> {
        let mapped: Vec<&str> = self
            .settings
            .fields_param
            .split(',')
            .filter(|f| *f != "id")
            .collect();
        for module in &self.settings.modules {
            let reply = self
                .call(Request {
                    method: Method::GET,
                    path: "/settings/fields",
                    query: vec![("module", module.clone())],
                    if_modified_since: None,
                    body: None,
                })
                .await;
            let names: std::collections::HashSet<String> = match reply {
                Ok(Reply::Json(_, v)) => v
                    .get("fields")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(|f| {
                                f.get("api_name").and_then(Value::as_str).map(str::to_owned)
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                Ok(Reply::Empty) | Err(_) => {
                    return Ok("field names not checked (grant ZohoCRM.settings.fields.READ to check them)".into());
                }
            };
            if names.is_empty() {
                return Ok("field names not checked (empty field metadata)".into());
            }
            let missing: Vec<&str> = mapped
                .iter()
                .copied()
                .filter(|f| !names.contains(*f))
                .collect();
            if !missing.is_empty() {
                return Err(ConnectorError::Config {
                    setting: "connectors.crm (email_field, opt_out_field, language_field, fields, asserts)".into(),
                    message: format!(
                        "module {module} has no field named {}; use the field's API name (Setup > Developer Hub > APIs > API names)",
                        missing.join(", ")
                    ),
                });
            }
        }
        Ok(format!("{} mapped fields present", mapped.len()))
    }
}

impl ZohoCrm {
    /// A notification of the channel optinsync registered: its token compared as digests,
    /// its channel and module checked, the record ids named.
    pub fn parse_webhook(
        &self,
        _headers: &[(String, String)],
        body: &[u8],
    ) -> ConnectorResult<WebhookEvent> {
        let Some(w) = &self.settings.webhook else {
            return Err(ConnectorError::InvalidInput {
                message: "Zoho CRM webhooks are not configured ([connectors.crm.webhook])".into(),
            });
        };
        let parsed: Notification =
            serde_json::from_slice(body).map_err(|e| ConnectorError::InvalidInput {
                message: format!("not a Zoho CRM notification: {e}"),
            })?;
        let given = parsed.token.unwrap_or_default();
        if !webhook_token_matches(&w.token, &given) {
            return Err(ConnectorError::InvalidInput {
                message: "Zoho CRM notification with a wrong channel token; refused".into(),
            });
        }
        let channel = match &parsed.channel_id {
            Some(Value::Number(n)) => n.to_string(),
            Some(Value::String(s)) => s.trim().to_owned(),
            _ => String::new(),
        };
        if channel != w.channel_id.to_string() {
            return Err(ConnectorError::InvalidInput {
                message: format!("Zoho CRM notification for unknown channel `{channel}`"),
            });
        }
        let Some(module) = self
            .settings
            .modules
            .iter()
            .find(|m| parsed.module.as_deref() == Some(m.as_str()))
        else {
            return Err(ConnectorError::InvalidInput {
                message: format!(
                    "Zoho CRM notification for module `{}`, which is not synced",
                    parsed.module.unwrap_or_default()
                ),
            });
        };
        let mut records = Vec::with_capacity(parsed.ids.len());
        for id in &parsed.ids {
            let id = match id {
                Value::String(s) => s.trim().to_owned(),
                Value::Number(n) if n.is_u64() => n.to_string(),
                _ => String::new(),
            };
            if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric()) {
                return Err(ConnectorError::InvalidInput {
                    message: "Zoho CRM notification with an invalid record id".into(),
                });
            }
            records.push(RecordRef {
                module: module.clone(),
                id,
            });
        }
        // Deletions are read from `/deleted` by the poll; a deleted record cannot be fetched.
        if parsed.operation.as_deref() == Some("delete") || records.is_empty() {
            return Ok(WebhookEvent::Ignored);
        }
        Ok(WebhookEvent::Changed { records })
    }
}

#[async_trait]
impl Connector for ZohoCrm {
    async fn health(&self) -> ConnectorResult<Health> {
        let token = self.oauth.token().await?;
        let mut readable = Vec::new();
        for module in &self.settings.modules {
            let path = format!("/{module}");
            let reply = self
                .call(Request {
                    method: Method::GET,
                    path: &path,
                    query: vec![
                        ("fields", self.settings.fields_param.clone()),
                        ("per_page", "1".into()),
                    ],
                    if_modified_since: None,
                    body: None,
                })
                .await;
            match reply.map_err(|e| self.crm_error(e, module)) {
                Ok(_) => readable.push(module.as_str()),
                Err(e @ ConnectorError::Config { .. }) => return Err(e),
                Err(e) => {
                    return Ok(Health {
                        ok: false,
                        detail: format!("Zoho CRM module {module}: {e}"),
                    });
                }
            }
        }
        let fields = self.check_fields().await?;
        Ok(Health {
            ok: true,
            detail: format!(
                "Zoho CRM at {}: token ok, modules {} readable, {fields}",
                self.api_base(&token),
                readable.join(", ")
            ),
        })
    }

    async fn maintain(&self) -> ConnectorResult<()> {
        match &self.settings.webhook {
            Some(w) if w.register => self.maintain_channel(w).await,
            _ => Ok(()),
        }
    }

    fn accepts_webhooks(&self) -> bool {
        self.settings.webhook.is_some()
    }

    async fn webhook(&self, request: &WebhookRequest) -> ConnectorResult<WebhookEvent> {
        if request.method != HttpMethod::Post {
            return Err(ConnectorError::InvalidInput {
                message: "Zoho CRM notifications are POSTed".into(),
            });
        }
        self.parse_webhook(&request.headers, request.body.as_bytes())
    }
}

#[async_trait]
impl CrmConnector for ZohoCrm {
    async fn changes(&self, cursor: Option<&Cursor>, limit: usize) -> ConnectorResult<ChangePage> {
        let mut state = CursorState::decode(cursor, &self.settings.modules)?;
        if state.pos >= state.modules.len() {
            state.pos = 0; // a new round
        }
        let mut page = ChangePage {
            records: Vec::new(),
            invalid: Vec::new(),
            deleted: Vec::new(),
            next_cursor: None,
            has_more: false,
        };
        let now = Utc::now();
        let pos = state.pos;
        let Some(m) = state.modules.get_mut(pos) else {
            return Err(ConnectorError::Config {
                setting: Self::setting("modules"),
                message: "no module to sync".into(),
            });
        };
        let per_page = *m.per_page.get_or_insert_with(|| {
            u32::try_from(limit.max(1))
                .unwrap_or(MAX_PER_PAGE)
                .min(self.settings.per_page)
        });
        let started = *m.pass_started.get_or_insert(now);
        let done = self.next_page(m, per_page, &mut page).await?;
        if done {
            let first_pass = m.since.is_none();
            if first_pass {
                // Deletions before the first full sync concern no known record.
                m.deleted_since = Some(started - self.settings.overlap);
            } else {
                self.deleted(m, &mut page.deleted).await?;
            }
            m.finish_pass(started, self.settings.overlap);
            state.pos += 1;
        }
        page.has_more = state.pos < state.modules.len();
        page.next_cursor = Some(state.encode());
        Ok(page)
    }

    async fn fetch(&self, record: &RecordRef) -> ConnectorResult<Option<CrmRecord>> {
        if !self.settings.modules.contains(&record.module) {
            return Ok(None);
        }
        if record.id.is_empty() || !record.id.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(ConnectorError::InvalidInput {
                message: format!("`{}` is not a Zoho record id", record.id),
            });
        }
        let path = format!("/{}/{}", record.module, record.id);
        let reply = self
            .call(Request {
                method: Method::GET,
                path: &path,
                query: vec![],
                if_modified_since: None,
                body: None,
            })
            .await;
        let value = match reply {
            Ok(Reply::Empty) => return Ok(None),
            Ok(Reply::Json(_, v)) => v,
            Err(CallError::Api { status, env })
                if status == StatusCode::NOT_FOUND
                    || (status == StatusCode::BAD_REQUEST && env.code == "INVALID_DATA") =>
            {
                return Ok(None);
            }
            Err(e) => return Err(self.crm_error(e, &record.module)),
        };
        let Some(item) = value
            .get("data")
            .and_then(Value::as_array)
            .and_then(|d| d.first())
        else {
            return Ok(None);
        };
        match self.parse_record(&record.module, 0, item).2 {
            Ok(rec) => Ok(Some(rec)),
            Err(bad) => Err(ConnectorError::InvalidInput {
                message: format!("{}: {}", bad.location, bad.reason),
            }),
        }
    }

    fn creates_records(&self) -> bool {
        self.settings.signup_module.is_some()
    }

    async fn upsert_contact(&self, contact: &NewContact) -> ConnectorResult<RecordRef> {
        self.upsert(contact).await
    }

    async fn write_back(&self, consent: &ConsentWriteBack) -> ConnectorResult<()> {
        if !self.settings.write_back.enabled {
            return Ok(());
        }
        let mut by_module: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
        for r in &consent.records {
            if let Some(item) = self.write_back_item(&r.id, consent) {
                by_module.entry(r.module.as_str()).or_default().push(item);
            }
        }
        let mut failures = Vec::new();
        let mut transient = false;
        for (module, items) in by_module {
            let path = format!("/{module}");
            for batch in items.chunks(MAX_UPDATE_BATCH) {
                let body = json!({ "data": batch, "trigger": [] });
                let (status, value) = self.write_json(Method::PUT, &path, module, &body).await?;
                let results = value
                    .get("data")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                for (i, sent) in batch.iter().enumerate() {
                    let id = sent.get("id").and_then(Value::as_str).unwrap_or_default();
                    let result = results.get(i);
                    let code = result
                        .and_then(|r| r.get("code"))
                        .and_then(Value::as_str)
                        .unwrap_or("NO_RESULT");
                    if code == "SUCCESS" {
                        let modified = result
                            .and_then(|r| r.get("details"))
                            .and_then(|d| d.get("Modified_Time"))
                            .and_then(Value::as_str)
                            .and_then(|t| DateTime::parse_from_rfc3339(t).ok());
                        if let Some(t) = modified {
                            self.remember_echo(module, id, t.timestamp(), consent.opt_out);
                        }
                        tracing::info!(record = %format!("{module}/{id}"), list = %consent.list, state = %consent.state, opt_out = consent.opt_out, "consent written back to Zoho CRM");
                        continue;
                    }
                    let env = result.map(Envelope::of).unwrap_or_default();
                    tracing::warn!(record = %format!("{module}/{id}"), code = %env.code, status = status.as_u16(), details = %env.details, "Zoho CRM refused the consent write-back for a record");
                    if matches!(code, "INTERNAL_ERROR" | "NO_RESULT" | "TOO_MANY_REQUESTS") {
                        transient = true;
                    }
                    failures.push(format!("{module}/{id}: {code} {}", env.message));
                }
            }
        }
        if failures.is_empty() {
            return Ok(());
        }
        let message = format!("Zoho CRM write-back failed for {}", failures.join("; "));
        Err(if transient {
            ConnectorError::transient(message)
        } else {
            ConnectorError::permanent(message)
        })
    }
}
