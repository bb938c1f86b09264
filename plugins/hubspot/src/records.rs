//! One HubSpot contact object (`{"id", "properties": {...}, "updatedAt", ...}`) turned into a
//! [`CrmRecord`] or an [`InvalidRecord`]. Every property value is a string (or `null`).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use optinsync_plugin_api::{CrmRecord, InvalidRecord, RecordRef};
use serde_json::{Map, Value};

use crate::config::AssertRule;
use crate::{HubSpotCrm, MODULE};

/// A parsed contact: its id, its `lastmodifieddate` (epoch ms) and the record.
#[derive(Debug)]
pub(crate) struct Parsed {
    pub(crate) id: Option<u64>,
    pub(crate) modified_ms: Option<i64>,
    pub(crate) record: Result<CrmRecord, InvalidRecord>,
}

/// A HubSpot date-time: ISO 8601, or epoch milliseconds as text.
pub(crate) fn parse_time(v: &str) -> Option<DateTime<Utc>> {
    let v = v.trim();
    if let Ok(ms) = v.parse::<i64>() {
        return DateTime::from_timestamp_millis(ms);
    }
    DateTime::parse_from_rfc3339(v)
        .ok()
        .map(|t| t.with_timezone(&Utc))
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

/// HubSpot checkboxes are `"true"`/`"false"`; older data and imports spell them otherwise.
pub(crate) fn is_truthy(value: &str) -> bool {
    let value = value.trim();
    ["true", "yes", "y", "1", "on"]
        .iter()
        .any(|t| value.eq_ignore_ascii_case(t))
}

fn asserts(rule: &AssertRule, value: Option<&str>) -> bool {
    match (rule, value) {
        (_, None) => false,
        (AssertRule::Property(_), Some(v)) => is_truthy(v),
        (AssertRule::Value(want), Some(v)) => v.split(';').any(|p| p.trim() == want.value),
    }
}

impl HubSpotCrm {
    /// One contact object as HubSpot answers it (JSON), turned into a record or the reason it
    /// cannot be one; with its id and `lastmodifieddate` in epoch ms where readable. For the
    /// fuzz target over HubSpot's answers.
    pub fn read_contact(
        &self,
        item: &Value,
    ) -> (Option<u64>, Option<i64>, Result<CrmRecord, InvalidRecord>) {
        let p = self.parse_contact(item);
        (p.id, p.modified_ms, p.record)
    }

    /// Turn one contact object into a record, or say why it cannot be one.
    pub(crate) fn parse_contact(&self, item: &Value) -> Parsed {
        let s = &self.settings;
        let bad = |location: String, reason: String| Parsed {
            id: None,
            modified_ms: None,
            record: Err(InvalidRecord { location, reason }),
        };
        let Some(obj) = item.as_object() else {
            return bad(
                "contacts (an item of the page)".into(),
                format!("not a JSON object but {}", type_name(item)),
            );
        };
        let id = match obj.get("id") {
            Some(Value::String(t)) => t.trim().parse::<u64>().ok(),
            Some(Value::Number(n)) => n.as_u64(),
            _ => None,
        };
        let Some(id) = id else {
            return bad(
                "contacts (an item of the page)".into(),
                "missing or non-numeric id".into(),
            );
        };
        let location = format!("{MODULE}/{id}");
        let empty = Map::new();
        let props = match obj.get("properties") {
            Some(Value::Object(p)) => p,
            None | Some(Value::Null) => &empty,
            Some(v) => {
                return Parsed {
                    id: Some(id),
                    modified_ms: None,
                    record: Err(InvalidRecord {
                        location,
                        reason: format!("properties is {}, expected an object", type_name(v)),
                    }),
                };
            }
        };
        // Values are strings; a non-string is reported rather than guessed at.
        let mut text: BTreeMap<&str, Option<&str>> = BTreeMap::new();
        for (k, v) in props {
            match v {
                Value::String(t) => {
                    text.insert(k.as_str(), Some(t.as_str()));
                }
                Value::Null => {
                    text.insert(k.as_str(), None);
                }
                other => {
                    return Parsed {
                        id: Some(id),
                        modified_ms: None,
                        record: Err(InvalidRecord {
                            location,
                            reason: format!(
                                "property `{k}` is {}, expected text",
                                type_name(other)
                            ),
                        }),
                    };
                }
            }
        }
        let get = |name: &str| text.get(name).copied().flatten();
        let modified_raw =
            get("lastmodifieddate").or_else(|| obj.get("updatedAt").and_then(Value::as_str));
        let modified = match modified_raw {
            None => None,
            Some(t) => match parse_time(t) {
                Some(t) => Some(t),
                None => {
                    return Parsed {
                        id: Some(id),
                        modified_ms: None,
                        record: Err(InvalidRecord {
                            location,
                            reason: "lastmodifieddate is not a date-time".into(),
                        }),
                    };
                }
            },
        };
        let modified_ms = modified.map(|t| t.timestamp_millis());
        let email = get("email").map(str::trim).filter(|e| !e.is_empty());
        let Some(email) = email else {
            return Parsed {
                id: Some(id),
                modified_ms,
                record: Err(InvalidRecord {
                    location,
                    reason: "no email address (property `email`)".into(),
                }),
            };
        };
        let mut opted_out = get(&s.opt_out_property).is_some_and(is_truthy);
        let mut asserted: Vec<String> = s
            .asserts
            .iter()
            .filter(|(_, rule)| asserts(rule, get(rule.property())))
            .map(|(list, _)| list.clone())
            .collect();
        // A person who opted out of a list's subscription type does not ask for that list.
        for (property, list) in &s.type_opt_outs {
            if get(property).is_some_and(is_truthy) {
                asserted.retain(|l| l != list);
                if s.opt_out_subscriptions {
                    opted_out = true;
                }
            }
        }
        let language = s
            .language_property
            .as_deref()
            .and_then(get)
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned);
        let mut fields = BTreeMap::new();
        for name in &s.fields {
            // The address itself never goes to the rules.
            if name == "email" {
                continue;
            }
            if let Some(v) = text.get(name.as_str()) {
                fields.insert(
                    name.clone(),
                    v.map_or(Value::Null, |t| Value::String(t.to_owned())),
                );
            }
        }
        Parsed {
            id: Some(id),
            modified_ms,
            record: Ok(CrmRecord {
                record: RecordRef {
                    module: MODULE.into(),
                    id: id.to_string(),
                },
                email: Some(email.to_owned()),
                language,
                opted_out,
                asserted_lists: asserted,
                fields,
                modified_at: modified,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::*;
    use crate::config::HubSpotConfig;

    pub(crate) fn make(extra: &str) -> HubSpotCrm {
        let text = format!(
            "token = \"t\"\napi_url = \"http://127.0.0.1:9\"\nfields = [\"firstname\"]\n\
             language_property = \"hs_language\"\n{extra}\n\
             [asserts]\nnewsletter = \"newsletter_optin\"\nevents = {{ property = \"interests\", value = \"Events\" }}\n\
             [write_back.lists.newsletter]\nsubscription_id = 9\n"
        );
        let table: serde_json::Value =
            serde_json::to_value(text.parse::<toml::Table>().unwrap()).unwrap();
        let c: HubSpotConfig = serde_json::from_value(table).unwrap();
        HubSpotCrm::new(c).unwrap()
    }

    #[test]
    fn contact_mapping() {
        let crm = make("");
        let p = crm.parse_contact(&json!({"id": "512", "properties": {
            "email": " Ann@Example.com ", "firstname": "Ann", "hs_language": "es",
            "newsletter_optin": "true", "interests": "Sports;Events", "hs_email_optout": "false",
            "lastmodifieddate": "2024-05-02T09:13:44.123Z"}}));
        let rec = p.record.unwrap();
        assert_eq!(p.id, Some(512));
        assert_eq!(p.modified_ms, Some(1_714_641_224_123));
        assert_eq!(rec.email.as_deref(), Some("Ann@Example.com"));
        assert_eq!(rec.language.as_deref(), Some("es"));
        assert_eq!(rec.asserted_lists, ["events", "newsletter"]);
        assert!(!rec.opted_out);
        assert_eq!(rec.fields["firstname"], json!("Ann"));
        assert!(!rec.fields.contains_key("email"));

        let out = crm.parse_contact(&json!({"id": "513", "properties": {
            "email": "b@example.com", "newsletter_optin": "true", "hs_email_optout_9": "true"}}));
        let rec = out.record.unwrap();
        assert!(rec.opted_out, "an opt-out of the list's subscription type");
        assert!(rec.asserted_lists.is_empty());
        let keep = make("opt_out_subscriptions = false");
        let rec = keep
            .parse_contact(&json!({"id": "513", "properties": {
                "email": "b@example.com", "newsletter_optin": "true", "hs_email_optout_9": "true"}}))
            .record
            .unwrap();
        assert!(!rec.opted_out);
        assert!(rec.asserted_lists.is_empty());
    }

    #[test]
    fn malformed_contacts_are_invalid_with_their_id() {
        let crm = make("");
        for (item, reason) in [
            (
                json!({"properties": {"email": "a@x.org"}}),
                "missing or non-numeric id",
            ),
            (json!({"id": "x1"}), "missing or non-numeric id"),
            (
                json!({"id": "1", "properties": {"email": 7}}),
                "property `email` is a number",
            ),
            (json!({"id": "2", "properties": []}), "expected an object"),
            (
                json!({"id": "3", "properties": {"email": "a@x.org", "lastmodifieddate": "yesterday"}}),
                "not a date-time",
            ),
            (
                json!({"id": "4", "properties": {"email": null}}),
                "no email address",
            ),
            (json!("text"), "not a JSON object"),
        ] {
            let got = crm.parse_contact(&item).record.unwrap_err();
            assert!(got.reason.contains(reason), "{item}: {}", got.reason);
        }
    }
}
