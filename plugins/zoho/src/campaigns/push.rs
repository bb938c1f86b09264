//! Subscribe calls: the contact info sent, and one address or a bulk of them per call.

use optinsync_plugin_api::{ConnectorResult, Subscriber};
use serde_json::{Map, Value};

use super::http::CallError;
use super::{Api, ListMapping, ZohoCampaigns};

impl ZohoCampaigns {
    fn contact_info(&self, s: &Subscriber) -> String {
        let mut info = Map::new();
        info.insert(
            "Contact Email".into(),
            Value::String(s.email.trim().to_owned()),
        );
        for (display, source) in &self.settings.fields {
            let value = match s.fields.get(source) {
                Some(Value::String(v)) if !v.trim().is_empty() => v.trim().to_owned(),
                Some(Value::Number(n)) => n.to_string(),
                _ => continue,
            };
            info.insert(display.clone(), Value::String(value));
        }
        if let (Some(field), Some(lang)) = (&self.settings.language_field, &s.language) {
            info.insert(field.clone(), Value::String(lang.clone()));
        }
        Value::Object(info).to_string()
    }

    pub(super) fn has_mapped_fields(&self, s: &Subscriber) -> bool {
        let filled = self
            .settings
            .fields
            .values()
            .any(|source| match s.fields.get(source) {
                Some(Value::String(v)) => !v.trim().is_empty(),
                Some(Value::Number(_)) => true,
                _ => false,
            });
        filled || (self.settings.language_field.is_some() && s.language.is_some())
    }

    pub(super) async fn subscribe_one(
        &self,
        list: &str,
        m: &ListMapping,
        s: &Subscriber,
    ) -> ConnectorResult<()> {
        let params = [
            ("listkey", m.listkey.clone()),
            ("contactinfo", self.contact_info(s)),
            ("source", self.settings.source.clone()),
        ];
        match self.call(Api::ListSubscribe, &params).await {
            Ok(_) => Ok(()),
            // "Contact exists in this list": already done.
            Err(CallError::Api { code, .. }) if code == "2003" => Ok(()),
            Err(CallError::Api { code, message }) => {
                Err(self.api_error(Api::ListSubscribe, list, &code, &message))
            }
            Err(CallError::Connector(e)) => Err(e),
        }
    }

    pub(super) async fn bulk_add(
        &self,
        list: &str,
        m: &ListMapping,
        emails: &[&str],
    ) -> ConnectorResult<()> {
        let params = [
            ("listkey", m.listkey.clone()),
            ("emailids", emails.join(",")),
        ];
        match self.call(Api::BulkAdd, &params).await {
            Ok(_) => Ok(()),
            Err(CallError::Api { code, message }) => {
                Err(self.api_error(Api::BulkAdd, list, &code, &message))
            }
            Err(CallError::Connector(e)) => Err(e),
        }
    }
}
