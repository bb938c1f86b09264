//! Zoho CRM records: one item of a list answer turned into a [`CrmRecord`] or an [`InvalidRecord`].

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use optinsync_plugin_api::{CrmRecord, InvalidRecord, RecordRef};
use serde_json::Value;

use super::ZohoCrm;
use crate::config::AssertRule;

impl ZohoCrm {
    /// Turn one item of `data` into a record, or say why it cannot be one: its id, its
    /// `Modified_Time` (unix seconds) and the record. Public only for fuzzing.
    #[doc(hidden)]
    pub fn parse_record(
        &self,
        module: &str,
        index: usize,
        item: &Value,
    ) -> (
        Option<String>,
        Option<i64>,
        Result<CrmRecord, InvalidRecord>,
    ) {
        let s = &self.settings;
        let Some(obj) = item.as_object() else {
            return (
                None,
                None,
                Err(InvalidRecord {
                    location: format!("{module} (item {index} of the page)"),
                    reason: format!("not a JSON object but {}", type_name(item)),
                }),
            );
        };
        let id = match obj.get("id") {
            Some(Value::String(id)) if !id.trim().is_empty() => id.trim().to_owned(),
            Some(Value::Number(n)) if n.is_u64() => n.to_string(),
            other => {
                return (
                    None,
                    None,
                    Err(InvalidRecord {
                        location: format!("{module} (item {index} of the page)"),
                        reason: match other {
                            None | Some(Value::Null) => "missing id".into(),
                            Some(v) => format!("id is {}, expected text", type_name(v)),
                        },
                    }),
                );
            }
        };
        let location = format!("{module}/{id}");
        let bad = |reason: String| InvalidRecord {
            location: location.clone(),
            reason,
        };
        let modified_at = match obj.get("Modified_Time") {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(t)) => DateTime::parse_from_rfc3339(t.trim())
                .map(|t| Some(t.with_timezone(&Utc)))
                .map_err(|_| bad(format!("Modified_Time `{t}` is not an ISO 8601 date-time"))),
            Some(v) => Err(bad(format!(
                "Modified_Time is {}, expected text",
                type_name(v)
            ))),
        };
        let modified_at = match modified_at {
            Ok(t) => t,
            Err(e) => return (Some(id), None, Err(e)),
        };
        let ts = modified_at.map(|t| t.timestamp());
        let result = (|| {
            let email = match obj.get(&s.email_field) {
                None | Some(Value::Null) => None,
                Some(Value::String(e)) => Some(e.trim().to_owned()).filter(|e| !e.is_empty()),
                Some(v) => {
                    return Err(bad(format!(
                        "field `{}` is {}, expected text",
                        s.email_field,
                        type_name(v)
                    )));
                }
            };
            let Some(email) = email else {
                return Err(bad(format!("no email address (field `{}`)", s.email_field)));
            };
            let opted_out = match obj.get(&s.opt_out_field) {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(Value::String(t)) => is_truthy(t),
                Some(v) => {
                    return Err(bad(format!(
                        "field `{}` is {}, expected true or false",
                        s.opt_out_field,
                        type_name(v)
                    )));
                }
            };
            let language = match s.language_field.as_ref().and_then(|f| obj.get(f)) {
                None | Some(Value::Null) => None,
                Some(Value::String(l)) => Some(l.trim().to_owned()).filter(|l| !l.is_empty()),
                Some(v) => {
                    return Err(bad(format!(
                        "field `{}` is {}, expected text",
                        s.language_field.as_deref().unwrap_or_default(),
                        type_name(v)
                    )));
                }
            };
            let asserted_lists = s
                .asserts
                .iter()
                .filter(|(_, rule)| asserts(rule, obj.get(rule.field())))
                .map(|(list, _)| list.clone())
                .collect();
            let mut fields = BTreeMap::new();
            let mapped = s
                .fields
                .iter()
                .chain(s.language_field.iter())
                .chain(std::iter::once(&s.opt_out_field))
                .chain(s.asserts.values().map(|r| match r {
                    AssertRule::Field(f) => f,
                    AssertRule::Value(v) => &v.field,
                }));
            for name in mapped {
                // The address itself never goes to the rules (they see only its domain).
                if *name == s.email_field {
                    continue;
                }
                if let Some(v) = obj.get(name.as_str()) {
                    fields.insert(name.clone(), v.clone());
                }
            }
            Ok(CrmRecord {
                record: RecordRef {
                    module: module.to_owned(),
                    id: id.clone(),
                },
                email: Some(email),
                language,
                opted_out,
                asserted_lists,
                fields,
                modified_at,
            })
        })();
        (Some(id), ts, result)
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "text",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// CRM exports spell booleans many ways; an unknown spelling counts as false.
fn is_truthy(value: &str) -> bool {
    let value = value.trim();
    ["true", "yes", "y", "1", "x"]
        .iter()
        .any(|t| value.eq_ignore_ascii_case(t))
}

fn asserts(rule: &AssertRule, value: Option<&Value>) -> bool {
    match (rule, value) {
        (_, None | Some(Value::Null)) => false,
        (AssertRule::Field(_), Some(Value::Bool(b))) => *b,
        (AssertRule::Field(_), Some(Value::String(s))) => is_truthy(s),
        (AssertRule::Field(_), Some(Value::Number(n))) => n.as_f64().is_some_and(|n| n != 0.0),
        (AssertRule::Field(_), Some(_)) => false,
        (AssertRule::Value(want), Some(Value::String(s))) => s.trim() == want.value,
        (AssertRule::Value(want), Some(Value::Array(items))) => items
            .iter()
            .any(|i| i.as_str().is_some_and(|s| s.trim() == want.value)),
        (AssertRule::Value(want), Some(Value::Bool(b))) => b.to_string() == want.value,
        (AssertRule::Value(want), Some(Value::Number(n))) => n.to_string() == want.value,
        (AssertRule::Value(_), Some(_)) => false,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::*;
    use crate::crm::tests::crm;

    #[test]
    fn record_mapping() {
        let crm = crm("");
        let item = json!({"id": "41", "Email": " Ann@Example.com ", "Language": "es",
            "Email_Opt_Out": false, "Newsletter": true, "Interests": ["Sports", "Events"],
            "First_Name": "Ann", "Modified_Time": "2026-11-27T10:00:00+02:00"});
        let (id, ts, rec) = crm.parse_record("Contacts", 0, &item);
        let rec = rec.unwrap();
        assert_eq!(id.as_deref(), Some("41"));
        assert_eq!(ts, Some(1_795_766_400));
        assert_eq!(rec.email.as_deref(), Some("Ann@Example.com"));
        assert_eq!(rec.language.as_deref(), Some("es"));
        assert_eq!(rec.asserted_lists, ["events", "newsletter"]);
        assert!(
            !rec.fields.contains_key("Email"),
            "no raw address for the rules"
        );
        assert_eq!(rec.fields["First_Name"], json!("Ann"));
    }

    #[test]
    fn malformed_records_are_invalid_with_their_id() {
        let crm = crm("");
        let cases = [
            (json!({"Email": "a@example.com"}), "missing id"),
            (json!({"id": true}), "id is a boolean"),
            (json!({"id": "1", "Email": 7}), "field `Email` is a number"),
            (
                json!({"id": "2", "Email": "a@x.org", "Email_Opt_Out": [1]}),
                "expected true or false",
            ),
            (
                json!({"id": "3", "Email": "a@x.org", "Modified_Time": "yesterday"}),
                "ISO 8601",
            ),
            (json!({"id": "4", "Email": null}), "no email address"),
            (json!("just text"), "not a JSON object"),
        ];
        for (item, reason) in cases {
            let (_, _, got) = crm.parse_record("Leads", 3, &item);
            let bad = got.unwrap_err();
            assert!(bad.reason.contains(reason), "{item}: {}", bad.reason);
            if let Some(id) = item.get("id").and_then(Value::as_str) {
                assert_eq!(bad.location, format!("Leads/{id}"));
            }
        }
    }
}
