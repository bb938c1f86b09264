//! Consent write-back: the fields written for a record, and recognising their echo in the feed.

use optinsync_plugin_api::ConsentWriteBack;
use serde_json::Value;

use super::ZohoCrm;

impl ZohoCrm {
    /// Was `(module, id)` at `ts` written by optinsync itself? Forgets the write once a later
    /// version of the record shows up. Modified_Time has whole seconds, so a person's edit
    /// in the same second as the write-back looks the same; an opt-out is therefore never
    /// taken for an echo unless optinsync wrote that opt-out (withdrawal wins).
    pub(super) fn is_echo(&self, module: &str, id: &str, ts: Option<i64>, opted_out: bool) -> bool {
        let Some(ts) = ts else { return false };
        let key = format!("{module}/{id}");
        let mut echoes = match self.echoes.lock() {
            Ok(e) => e,
            Err(poisoned) => poisoned.into_inner(),
        };
        match echoes.get(&key).copied() {
            Some((written, wrote_opt_out)) if written == ts => wrote_opt_out || !opted_out,
            Some((written, _)) if written < ts => {
                echoes.remove(&key);
                false
            }
            _ => false,
        }
    }

    pub(super) fn remember_echo(&self, module: &str, id: &str, ts: i64, opt_out: bool) {
        let mut echoes = match self.echoes.lock() {
            Ok(e) => e,
            Err(poisoned) => poisoned.into_inner(),
        };
        // Bounded: write-backs far outnumbering polls would only cost a re-read, never a loop.
        if echoes.len() >= 100_000 {
            echoes.clear();
        }
        echoes.insert(format!("{module}/{id}"), (ts, opt_out));
    }

    /// The fields written for one record.
    pub(super) fn write_back_item(&self, id: &str, consent: &ConsentWriteBack) -> Option<Value> {
        let wb = &self.settings.write_back;
        let mut item = serde_json::Map::new();
        if consent.opt_out {
            let field = wb
                .opt_out_field
                .clone()
                .unwrap_or_else(|| self.settings.opt_out_field.clone());
            item.insert(field, Value::Bool(true));
        }
        if wb.gdpr {
            let confirmed = consent.state == optinsync_plugin_api::ConsentState::Confirmed;
            let date = consent.at.format("%Y-%m-%d").to_string();
            let mut gdpr = serde_json::Map::new();
            let basis = if confirmed {
                Some(wb.basis_confirmed.clone())
            } else {
                wb.basis_withdrawn.clone()
            };
            if let Some(basis) = basis {
                gdpr.insert(wb.basis_field.clone(), Value::String(basis));
            }
            gdpr.insert(
                wb.contact_through_email_field.clone(),
                Value::Bool(confirmed),
            );
            if confirmed {
                gdpr.insert(wb.consent_date_field.clone(), Value::String(date.clone()));
            }
            gdpr.insert(
                wb.consent_remarks_field.clone(),
                Value::String(remarks(consent.state.as_str(), &date, &consent.list)),
            );
            item.insert(wb.consent_field.clone(), Value::Object(gdpr));
        }
        if item.is_empty() {
            return None;
        }
        item.insert("id".into(), Value::String(id.to_owned()));
        Some(Value::Object(item))
    }
}

/// `Consent_Remarks`: a short human-readable reason.
fn remarks(state: &str, date: &str, list: &str) -> String {
    let what = match state {
        "confirmed" => "DOI confirmed".to_owned(),
        "withdrawn" => "Unsubscribed".to_owned(),
        "lapsed" => "Consent lapsed (not confirmed in time)".to_owned(),
        "bounced" => "Address bounced".to_owned(),
        "complained" => "Spam complaint".to_owned(),
        "erased" => "Erased on request".to_owned(),
        other => format!("Consent {other}"),
    };
    format!("{what} {date} via optinsync (list {list})")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use chrono::{DateTime, Utc};
    use serde_json::json;

    use super::*;
    use crate::crm::tests::crm;

    #[test]
    fn write_back_fields() {
        let zoho = crm("");
        let wb = ConsentWriteBack {
            key: "k".into(),
            records: vec![],
            email: "a@example.com".into(),
            list: "newsletter".into(),
            state: optinsync_plugin_api::ConsentState::Confirmed,
            opt_out: false,
            at: DateTime::parse_from_rfc3339("2026-11-27T10:00:00Z")
                .unwrap()
                .with_timezone(&Utc),
            ledger_seq: 1,
        };
        let item = zoho.write_back_item("7", &wb).unwrap();
        assert_eq!(
            item,
            json!({"id": "7", "Data_Processing_Basis_Details": {
                "Data_Processing_Basis": "Obtained", "Contact_Through_Email": true,
                "Consent_Date": "2026-11-27",
                "Consent_Remarks": "DOI confirmed 2026-11-27 via optinsync (list newsletter)"}})
        );
        let out = ConsentWriteBack {
            state: optinsync_plugin_api::ConsentState::Withdrawn,
            opt_out: true,
            ..wb
        };
        let item = zoho.write_back_item("7", &out).unwrap();
        assert_eq!(item["Email_Opt_Out"], json!(true));
        assert_eq!(
            item["Data_Processing_Basis_Details"]["Contact_Through_Email"],
            json!(false)
        );
        let plain = crm("[write_back]\ngdpr = false");
        let confirmed = ConsentWriteBack {
            state: optinsync_plugin_api::ConsentState::Confirmed,
            opt_out: false,
            ..out
        };
        assert_eq!(plain.write_back_item("7", &confirmed), None);
    }
}
