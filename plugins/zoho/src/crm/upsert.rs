//! Website signups into Zoho CRM: `POST /crm/v8/{module}/upsert` matched by the address
//! (`duplicate_check_fields`), with the consent fields of a write-back.

use chrono::DateTime;
use optinsync_plugin_api::{
    ConnectorError, ConnectorResult, ConsentWriteBack, NewContact, RecordRef,
};
use reqwest::Method;
use serde_json::{Value, json};

use super::ZohoCrm;
use super::http::Envelope;

impl ZohoCrm {
    /// The record of one signup: address, name (Zoho requires `Last_Name` on Contacts and
    /// Leads: the name's last word, else the address's local part), the consent fields.
    pub(super) fn upsert_item(&self, c: &NewContact) -> Value {
        let mut item = serde_json::Map::new();
        item.insert(self.settings.email_field.clone(), json!(c.email));
        let name = c.name.as_deref().map(str::trim).filter(|n| !n.is_empty());
        let (first, last) = match name.and_then(|n| n.rsplit_once(' ')) {
            Some((first, last)) => (Some(first.trim()), last),
            None => (
                None,
                name.unwrap_or(c.email.split('@').next().unwrap_or("")),
            ),
        };
        if let Some(first) = first {
            item.insert("First_Name".into(), json!(first));
        }
        item.insert("Last_Name".into(), json!(last));
        if let (Some(field), Some(lang)) = (&self.settings.language_field, &c.language) {
            item.insert(field.clone(), json!(lang));
        }
        let consent = ConsentWriteBack {
            key: c.key.clone(),
            records: vec![],
            email: c.email.clone(),
            list: c.list.clone(),
            state: c.state,
            opt_out: false,
            at: c.at,
            ledger_seq: 0,
        };
        if let Some(Value::Object(fields)) = self.write_back_item("", &consent) {
            item.extend(fields.into_iter().filter(|(k, _)| k != "id"));
        }
        Value::Object(item)
    }

    /// Create or update the record of `c` in the configured `signup_module`.
    pub(super) async fn upsert(&self, c: &NewContact) -> ConnectorResult<RecordRef> {
        let Some(module) = self.settings.signup_module.as_deref() else {
            return Err(ConnectorError::permanent(
                "Zoho CRM creates no records without `signup_module`",
            ));
        };
        let body = json!({
            "data": [self.upsert_item(c)],
            "duplicate_check_fields": [self.settings.email_field],
            "trigger": [],
        });
        let path = format!("/{module}/upsert");
        let (status, value) = self.write_json(Method::POST, &path, module, &body).await?;
        let result = value
            .get("data")
            .and_then(Value::as_array)
            .and_then(|d| d.first())
            .cloned()
            .unwrap_or(Value::Null);
        let id = result
            .get("details")
            .and_then(|d| d.get("id"))
            .and_then(Value::as_str);
        match (result.get("code").and_then(Value::as_str), id) {
            (Some("SUCCESS"), Some(id)) => {
                if let Some(t) = result
                    .get("details")
                    .and_then(|d| d.get("Modified_Time"))
                    .and_then(Value::as_str)
                    .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                {
                    // The record comes back in the feed: our own write, not the person's.
                    self.remember_echo(module, id, t.timestamp(), false);
                }
                let action = result.get("action").and_then(Value::as_str).unwrap_or("-");
                tracing::info!(record = %format!("{module}/{id}"), action, "signup written to Zoho CRM");
                Ok(RecordRef {
                    module: module.to_owned(),
                    id: id.to_owned(),
                })
            }
            (code, _) => {
                let env = Envelope::of(&result);
                let message = format!(
                    "Zoho CRM refused the upsert into {module}: {} {} {}",
                    code.unwrap_or("NO_RESULT"),
                    env.message,
                    env.details
                );
                tracing::warn!(status = status.as_u16(), code = %env.code, "Zoho CRM refused a signup's upsert");
                Err(
                    if matches!(code, None | Some("INTERNAL_ERROR" | "TOO_MANY_REQUESTS")) {
                        ConnectorError::transient(message)
                    } else {
                        ConnectorError::permanent(message)
                    },
                )
            }
        }
    }
}
