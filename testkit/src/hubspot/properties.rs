//! Contact property definitions (`GET /crm/v3/properties/contacts[/{name}]`), the
//! HubSpot-defined ones the fake knows, custom ones seeded by tests, and the validation of
//! every write against them.
//!
//! A write is refused whole (400 `VALIDATION_ERROR`, `Property values were not valid: [...]`,
//! one `errors[]` item per property with `code` and `context.propertyName`) when a property
//! does not exist (`PROPERTY_DOESNT_EXIST`), is read-only (`READ_ONLY_VALUE`), or has a value
//! its type does not allow (`INVALID_OPTION`, `INVALID_BOOLEAN`, `INVALID_INTEGER`,
//! `INVALID_DATE`, `INVALID_EMAIL`; these codes and texts are the fake's own where HubSpot's
//! documentation gives none). Stricter readings: `hs_marketable_status` is read-only (sources
//! conflict); values must be JSON strings (the spec types them so), `null` and numbers are
//! refused; the options of `hs_legal_basis` have values equal to their labels (as in
//! HubSpot's examples).

use std::collections::BTreeMap;

use chrono::DateTime;
use serde_json::{Value, json};

use super::HubSpotState;
use super::http::{Reply, error, error_with};

/// One property definition (`GET /crm/v3/properties/contacts`).
#[derive(Debug, Clone)]
pub struct PropertyDef {
    pub name: String,
    pub label: String,
    /// `string`, `number`, `date`, `datetime`, `enumeration`, `bool`.
    pub kind: String,
    /// `text`, `number`, `date`, `checkbox` (multiple values, `;`-separated),
    /// `booleancheckbox`, `radio`, `select`, `calculation_read_only`.
    pub field_type: String,
    /// `(label, value)`.
    pub options: Vec<(String, String)>,
    /// `modificationMetadata.readOnlyValue`: writes are refused.
    pub read_only: bool,
    pub hubspot_defined: bool,
    pub group: String,
}

impl PropertyDef {
    fn new(name: &str, label: &str, kind: &str, field_type: &str) -> Self {
        PropertyDef {
            name: name.into(),
            label: label.into(),
            kind: kind.into(),
            field_type: field_type.into(),
            options: Vec::new(),
            read_only: false,
            hubspot_defined: false,
            group: "contactinformation".into(),
        }
    }

    /// A custom single-line text property.
    pub fn text(name: &str, label: &str) -> Self {
        Self::new(name, label, "string", "text")
    }

    /// A custom date-time property (values: epoch milliseconds or ISO 8601).
    pub fn datetime(name: &str, label: &str) -> Self {
        Self::new(name, label, "datetime", "date")
    }

    /// A custom single checkbox (`"true"` / `"false"`).
    pub fn boolean(name: &str, label: &str) -> Self {
        let mut p = Self::new(name, label, "bool", "booleancheckbox");
        p.options = vec![("Yes".into(), "true".into()), ("No".into(), "false".into())];
        p
    }

    /// A custom multiple-checkbox enumeration (values `;`-separated); options are
    /// `(label, value)`.
    pub fn checkboxes(name: &str, label: &str, options: &[(&str, &str)]) -> Self {
        let mut p = Self::new(name, label, "enumeration", "checkbox");
        p.options = options
            .iter()
            .map(|(l, v)| ((*l).to_owned(), (*v).to_owned()))
            .collect();
        p
    }

    /// A custom single-choice enumeration (radio buttons).
    pub fn radio(name: &str, label: &str, options: &[(&str, &str)]) -> Self {
        let mut p = Self::checkboxes(name, label, options);
        p.field_type = "radio".into();
        p
    }

    fn hubspot(mut self, read_only: bool) -> Self {
        self.hubspot_defined = true;
        self.read_only = read_only;
        self
    }

    fn render(&self) -> Value {
        let options: Vec<Value> = self
            .options
            .iter()
            .enumerate()
            .map(|(i, (l, v))| json!({"label": l, "value": v, "displayOrder": i, "hidden": false}))
            .collect();
        json!({
            "name": self.name, "label": self.label, "type": self.kind, "fieldType": self.field_type,
            "description": "", "groupName": self.group, "options": options, "displayOrder": -1,
            "calculated": false, "externalOptions": false, "hasUniqueValue": false, "hidden": false,
            "hubspotDefined": self.hubspot_defined, "formField": !self.read_only,
            "modificationMetadata": {"archivable": !self.hubspot_defined,
                                     "readOnlyDefinition": self.hubspot_defined,
                                     "readOnlyValue": self.read_only},
            "createdAt": "2020-01-01T00:00:00.000Z", "updatedAt": "2020-01-01T00:00:00.000Z",
            "archived": false,
        })
    }

    fn is_numeric(&self) -> bool {
        self.kind == "number"
    }

    fn is_time(&self) -> bool {
        self.kind == "datetime" || self.kind == "date"
    }
}

/// The HubSpot-defined contact properties the fake knows.
pub(crate) fn default_properties() -> BTreeMap<String, PropertyDef> {
    let legal = [
        "Legitimate interest – prospect/lead",
        "Legitimate interest – existing customer",
        "Performance of a contract",
        "Freely given consent from contact",
        "Not applicable",
    ];
    let legal: Vec<(&str, &str)> = legal.iter().map(|l| (*l, *l)).collect();
    let stages = [
        "subscriber",
        "lead",
        "marketingqualifiedlead",
        "salesqualifiedlead",
        "opportunity",
        "customer",
        "evangelist",
        "other",
    ];
    let stages: Vec<(&str, &str)> = stages.iter().map(|v| (*v, *v)).collect();
    let mut defs = vec![
        PropertyDef::text("email", "Email").hubspot(false),
        PropertyDef::text("firstname", "First Name").hubspot(false),
        PropertyDef::text("lastname", "Last Name").hubspot(false),
        PropertyDef::text("phone", "Phone Number").hubspot(false),
        PropertyDef::text("company", "Company Name").hubspot(false),
        PropertyDef::new("hs_object_id", "Record ID", "number", "number").hubspot(true),
        PropertyDef::datetime("createdate", "Create Date").hubspot(true),
        PropertyDef::datetime("lastmodifieddate", "Last Modified Date").hubspot(true),
        PropertyDef::checkboxes(
            "hs_legal_basis",
            "Legal basis for processing contact's data",
            &legal,
        )
        .hubspot(false),
        PropertyDef::boolean("hs_email_optout", "Unsubscribed from all email").hubspot(true),
        PropertyDef::boolean("hs_marketable_status", "Marketing contact status").hubspot(true),
        PropertyDef::boolean(
            "hs_marketable_until_renewal",
            "Marketing contact until next update",
        )
        .hubspot(true),
        PropertyDef::radio("lifecyclestage", "Lifecycle Stage", &stages).hubspot(false),
        PropertyDef::new(
            "hs_email_bounce",
            "Marketing emails bounced",
            "number",
            "number",
        )
        .hubspot(true),
        PropertyDef::text("hs_email_hard_bounce_reason", "Email hard bounce reason").hubspot(true),
        PropertyDef::boolean("hs_email_quarantined", "Email address quarantined").hubspot(true),
    ];
    for d in super::prefs::default_definitions() {
        defs.push(
            PropertyDef::boolean(
                &format!("hs_email_optout_{}", d.id),
                &format!("Opted out of email: {}", d.name),
            )
            .hubspot(true),
        );
    }
    defs.into_iter().map(|d| (d.name.clone(), d)).collect()
}

pub(crate) fn validation_error(invalid: &[(String, String, String)]) -> Reply {
    let details: Vec<Value> = invalid
        .iter()
        .map(|(name, code, msg)| json!({"isValid": false, "message": msg, "error": code, "name": name}))
        .collect();
    let errors: Vec<Value> = invalid
        .iter()
        .map(|(name, code, msg)| json!({"message": msg, "code": code, "context": {"propertyName": [name]}}))
        .collect();
    error_with(
        400,
        "VALIDATION_ERROR",
        &format!("Property values were not valid: {}", Value::Array(details)),
        errors,
        None,
    )
}

pub(crate) fn valid_email(e: &str) -> bool {
    let Some((local, domain)) = e.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !e.chars().any(char::is_whitespace)
}

/// Milliseconds of an epoch-ms, ISO date-time or ISO date string.
pub(crate) fn time_ms(v: &str) -> Option<i64> {
    if let Ok(ms) = v.parse::<i64>() {
        return Some(ms);
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(v) {
        return Some(t.timestamp_millis());
    }
    chrono::NaiveDate::parse_from_str(v, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc().timestamp_millis())
}

/// Check a `properties` object for a write: every value a string, every name a defined,
/// writable property, every value valid for its type.
pub(crate) fn validate(
    s: &HubSpotState,
    props: Option<&Value>,
) -> Result<Vec<(String, String)>, Reply> {
    let Some(props) = props else {
        return Ok(Vec::new());
    };
    let Value::Object(m) = props else {
        return Err(error(
            400,
            "VALIDATION_ERROR",
            "properties must be an object of strings",
        ));
    };
    let mut out = Vec::new();
    let mut invalid: Vec<(String, String, String)> = Vec::new();
    for (name, value) in m {
        let Value::String(value) = value else {
            invalid.push((
                name.clone(),
                "INVALID_TYPE".into(),
                format!("Property \"{name}\" must be given as a string; {value} is not a string"),
            ));
            continue;
        };
        let Some(def) = s.properties.get(name) else {
            invalid.push((
                name.clone(),
                "PROPERTY_DOESNT_EXIST".into(),
                format!("Property \"{name}\" does not exist"),
            ));
            continue;
        };
        if def.read_only {
            invalid.push((
                name.clone(),
                "READ_ONLY_VALUE".into(),
                format!("Property \"{name}\" is a read only property"),
            ));
            continue;
        }
        if !value.is_empty() {
            let problem = match (def.kind.as_str(), def.field_type.as_str()) {
                _ if name == "email" && !valid_email(value) => {
                    Some(("INVALID_EMAIL", format!("Email address {value} is invalid")))
                }
                ("bool", _) if value != "true" && value != "false" => Some((
                    "INVALID_BOOLEAN",
                    format!("{value} was not a valid boolean option for {name}"),
                )),
                ("enumeration", ft) => {
                    let parts: Vec<&str> = if ft == "checkbox" {
                        value.split(';').collect()
                    } else {
                        vec![value.as_str()]
                    };
                    parts
                        .iter()
                        .find(|p| !def.options.iter().any(|(_, v)| v == *p))
                        .map(|p| {
                            let allowed: Vec<&str> =
                                def.options.iter().map(|(_, v)| v.as_str()).collect();
                            (
                                "INVALID_OPTION",
                                format!(
                                    "{p} was not one of the allowed options: [{}]",
                                    allowed.join(", ")
                                ),
                            )
                        })
                }
                ("number", _) if value.parse::<f64>().is_err() => Some((
                    "INVALID_INTEGER",
                    format!("{value} is not a valid number for {name}"),
                )),
                ("datetime" | "date", _) if time_ms(value).is_none() => Some((
                    "INVALID_DATE",
                    format!("{value} is not a valid date for {name}"),
                )),
                _ => None,
            };
            if let Some((code, msg)) = problem {
                invalid.push((name.clone(), code.into(), msg));
                continue;
            }
        }
        out.push((name.clone(), value.clone()));
    }
    if invalid.is_empty() {
        Ok(out)
    } else {
        Err(validation_error(&invalid))
    }
}

/// `GET /crm/v3/properties/contacts`.
pub(crate) fn properties_list(s: &HubSpotState) -> Reply {
    let results: Vec<Value> = s.properties.values().map(PropertyDef::render).collect();
    Reply::ok(json!({"results": results}))
}

/// `GET /crm/v3/properties/contacts/{name}`.
pub(crate) fn property_get(s: &HubSpotState, name: &str) -> Reply {
    match s.properties.get(name) {
        Some(p) => Reply::ok(p.render()),
        None => error(
            404,
            "OBJECT_NOT_FOUND",
            &format!("Unable to find property {name} for object type 0-1"),
        ),
    }
}

/// The definition of `name`, if the portal has it.
pub(crate) fn def<'a>(s: &'a HubSpotState, name: &str) -> Option<&'a PropertyDef> {
    s.properties.get(name)
}

/// Whether values of `name` compare as numbers (`Some(true)`), as times (`Some(false)`), or
/// as text (`None`).
pub(crate) fn ordering_kind(s: &HubSpotState, name: &str) -> Option<bool> {
    def(s, name).and_then(|d| {
        if d.is_numeric() {
            Some(true)
        } else if d.is_time() {
            Some(false)
        } else {
            None
        }
    })
}
