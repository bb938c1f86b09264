//! The contacts object: list, get, create, update, archive, batch, GDPR delete, property
//! validation and the property definitions. Search lives in `search`.
//!
//! Inferred, where HubSpot's documentation says nothing: a requested property the portal does
//! not define is left out of `properties` (a defined but unset one is `null`); emails are
//! stored lower-cased and unique case-insensitively; every accepted write bumps
//! `lastmodifieddate`, even one that sets a value it already had (stricter: a connector sees
//! its own echoes); a batch whose inputs fail validation is refused whole (400, nothing
//! written), while ids that do not exist are reported per item (207).

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::time::Instant;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};

use super::http::{Query, Reply, error, error_with};
use super::{HubSpotState, now_ms, render_time};

/// Properties returned when a request names none.
pub(crate) const DEFAULT_PROPERTIES: &[&str] = &[
    "createdate",
    "email",
    "firstname",
    "hs_object_id",
    "lastmodifieddate",
    "lastname",
];

/// Returned whatever a request names.
const ALWAYS: &[&str] = &["createdate", "hs_object_id", "lastmodifieddate"];

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

/// One past value of a property.
#[derive(Debug, Clone)]
pub struct HistoryEntry {
    pub value: String,
    pub timestamp: DateTime<Utc>,
    pub source_type: String,
}

/// One stored contact.
#[derive(Debug, Clone)]
pub struct Contact {
    pub id: u64,
    /// Every set property, `hs_object_id`, `createdate` and `lastmodifieddate` included.
    pub properties: BTreeMap<String, String>,
    pub created: DateTime<Utc>,
    pub updated: DateTime<Utc>,
    pub archived: bool,
    pub archived_at: Option<DateTime<Utc>>,
    /// Values written, newest last.
    pub history: BTreeMap<String, Vec<HistoryEntry>>,
    /// What search sees: versions with the instant they become searchable, oldest first
    /// (`None`: archived, not searchable).
    pub(crate) index: VecDeque<(Instant, Option<BTreeMap<String, String>>)>,
}

impl Contact {
    fn new(id: u64, at: DateTime<Utc>) -> Contact {
        let mut c = Contact {
            id,
            properties: BTreeMap::new(),
            created: at,
            updated: at,
            archived: false,
            archived_at: None,
            history: BTreeMap::new(),
            index: VecDeque::new(),
        };
        c.properties.insert("hs_object_id".into(), id.to_string());
        c.properties.insert("createdate".into(), render_time(at));
        c.touch(at);
        c
    }

    fn touch(&mut self, at: DateTime<Utc>) {
        self.updated = at;
        self.properties
            .insert("lastmodifieddate".into(), render_time(at));
    }

    /// Record the current version for search, searchable at `visible` (dropping versions
    /// already superseded by a searchable one).
    pub(crate) fn reindex(&mut self, visible: Instant) {
        let now = Instant::now();
        while self.index.len() >= 2 && self.index[1].0 <= now {
            self.index.pop_front();
        }
        let view = (!self.archived).then(|| self.properties.clone());
        self.index.push_back((visible, view));
    }

    /// The version search sees at `now` (`None`: not yet indexed, or archived).
    pub(crate) fn searchable(&self, now: Instant) -> Option<&BTreeMap<String, String>> {
        self.index
            .iter()
            .rev()
            .find(|(at, _)| *at <= now)
            .and_then(|(_, view)| view.as_ref())
    }

    fn set(&mut self, name: &str, value: &str, at: DateTime<Utc>, source: &str) {
        if value.is_empty() {
            self.properties.remove(name);
        } else {
            self.properties.insert(name.to_owned(), value.to_owned());
        }
        self.history
            .entry(name.to_owned())
            .or_default()
            .push(HistoryEntry {
                value: value.to_owned(),
                timestamp: at,
                source_type: source.to_owned(),
            });
    }

    /// The contact with every set property.
    pub(crate) fn render_all(&self) -> Value {
        let names: Vec<String> = self.properties.keys().cloned().collect();
        self.render(&self.properties, Some(&names), None, None)
    }

    /// As the API shows it: `names` (or the default set) plus the always-returned ones;
    /// `defs` (when given) drops names the portal does not define.
    pub(crate) fn render(
        &self,
        props: &BTreeMap<String, String>,
        names: Option<&[String]>,
        history: Option<&[String]>,
        defs: Option<&BTreeMap<String, PropertyDef>>,
    ) -> Value {
        let mut out = Map::new();
        let requested: Vec<String> = match names {
            Some(n) => n.to_vec(),
            None => DEFAULT_PROPERTIES.iter().map(|s| (*s).to_owned()).collect(),
        };
        for name in requested
            .iter()
            .map(String::as_str)
            .chain(ALWAYS.iter().copied())
        {
            let known = defs.is_none_or(|d| d.contains_key(name)) || props.contains_key(name);
            if !known {
                continue;
            }
            out.insert(
                name.to_owned(),
                props
                    .get(name)
                    .map_or(Value::Null, |v| Value::String(v.clone())),
            );
        }
        let created = props
            .get("createdate")
            .cloned()
            .unwrap_or_else(|| render_time(self.created));
        let updated = props
            .get("lastmodifieddate")
            .cloned()
            .unwrap_or_else(|| render_time(self.updated));
        let mut v = json!({"id": self.id.to_string(), "properties": out, "createdAt": created,
                           "updatedAt": updated, "archived": self.archived});
        if let Some(at) = self.archived_at.filter(|_| self.archived) {
            v["archivedAt"] = json!(render_time(at));
        }
        if let Some(h) = history {
            let mut m = Map::new();
            for name in h {
                let entries: Vec<Value> = self
                    .history
                    .get(name)
                    .map(|e| {
                        e.iter()
                            .rev()
                            .map(|e| json!({"value": e.value, "timestamp": render_time(e.timestamp),
                                            "sourceType": e.source_type, "sourceId": "optinsync-fake"}))
                            .collect()
                    })
                    .unwrap_or_default();
                m.insert(name.clone(), Value::Array(entries));
            }
            v["propertiesWithHistory"] = Value::Object(m);
        }
        v
    }
}

/// Add a contact without validation, searchable at once.
pub(crate) fn seed_one(s: &mut HubSpotState, properties: &Value, at: DateTime<Utc>) -> u64 {
    s.next_id += 1;
    let id = s.next_id;
    let mut c = Contact::new(id, at);
    if let Value::Object(m) = properties {
        for (k, v) in m {
            let v = match v {
                Value::String(t) => t.clone(),
                Value::Null => continue,
                other => other.to_string(),
            };
            let v = if k == "email" { v.to_lowercase() } else { v };
            c.set(k, &v, at, "IMPORT");
        }
    }
    if let Some(email) = c.properties.get("email") {
        s.email_index.insert(email.clone(), id);
    }
    c.reindex(Instant::now());
    s.contacts.insert(id, c);
    id
}

/// Change properties without validation (a CRM user's edit).
pub(crate) fn edit(s: &mut HubSpotState, id: u64, properties: &Value, at: DateTime<Utc>) {
    let changes: Vec<(String, String)> = match properties {
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    Value::String(t) => t.clone(),
                    Value::Null => String::new(),
                    other => other.to_string(),
                };
                (k.clone(), v)
            })
            .collect(),
        _ => Vec::new(),
    };
    apply(s, id, &changes, at, "CRM_UI");
}

/// Archive (restorable; no longer listed, fetched or searchable).
pub(crate) fn archive(s: &mut HubSpotState, id: u64, at: DateTime<Utc>) {
    let visible = Instant::now() + s.search_lag;
    if let Some(c) = s.contacts.get_mut(&id) {
        c.archived = true;
        c.archived_at = Some(at);
        c.touch(at);
        c.reindex(visible);
    }
}

/// Apply validated changes; bumps `lastmodifieddate`; searchable after the lag.
fn apply(
    s: &mut HubSpotState,
    id: u64,
    changes: &[(String, String)],
    at: DateTime<Utc>,
    source: &str,
) {
    let visible = Instant::now() + s.search_lag;
    let Some(c) = s.contacts.get_mut(&id) else {
        return;
    };
    let old_email = c.properties.get("email").cloned();
    for (k, v) in changes {
        let v = if k == "email" {
            v.to_lowercase()
        } else {
            v.clone()
        };
        c.set(k, &v, at, source);
    }
    c.touch(at);
    c.reindex(visible);
    let new_email = c.properties.get("email").cloned();
    if old_email != new_email {
        if let Some(e) = old_email {
            s.email_index.remove(&e);
        }
        if let Some(e) = new_email {
            s.email_index.insert(e, id);
        }
    }
}

/// Create a contact from validated properties; returns its id.
fn create_one(s: &mut HubSpotState, changes: &[(String, String)], at: DateTime<Utc>) -> u64 {
    s.next_id += 1;
    let id = s.next_id;
    let mut c = Contact::new(id, at);
    // Not searchable before the lag: the first version is recorded by `apply`.
    c.index.clear();
    s.contacts.insert(id, c);
    apply(s, id, changes, at, "API");
    id
}

fn validation_error(invalid: &[(String, String, String)]) -> Reply {
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

fn valid_email(e: &str) -> bool {
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
fn validate(s: &HubSpotState, props: Option<&Value>) -> Result<Vec<(String, String)>, Reply> {
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

fn email_of(changes: &[(String, String)]) -> Option<String> {
    changes
        .iter()
        .find(|(k, _)| k == "email")
        .map(|(_, v)| v.to_lowercase())
        .filter(|v| !v.is_empty())
}

fn conflict(existing: u64) -> Reply {
    error(
        409,
        "CONFLICT",
        &format!("Contact already exists. Existing ID: {existing}"),
    )
}

fn not_found() -> Reply {
    error(404, "OBJECT_NOT_FOUND", "resource not found")
}

/// The contact `id` names under `id_property` (`None`: the record id), archived or not.
fn resolve(s: &HubSpotState, id: &str, id_property: Option<&str>) -> Result<Option<u64>, Reply> {
    match id_property {
        None | Some("hs_object_id") => Ok(id
            .parse::<u64>()
            .ok()
            .filter(|n| s.contacts.contains_key(n))),
        Some("email") => Ok(s.id_by_email(id)),
        Some(p) if s.properties.contains_key(p) => Ok(s
            .contacts
            .values()
            .find(|c| c.properties.get(p).is_some_and(|v| v == id))
            .map(|c| c.id)),
        Some(p) => Err(error(
            400,
            "VALIDATION_ERROR",
            &format!("Property \"{p}\" does not exist"),
        )),
    }
}

fn archived_param(q: &Query) -> bool {
    q.get("archived") == Some("true")
}

fn names(v: Option<&Value>) -> Option<Vec<String>> {
    v.and_then(Value::as_array).map(|a| {
        a.iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect()
    })
}

const CURSOR_PREFIX: &str = "fake-hubspot-cursor:";

fn encode_after(id: u64) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{CURSOR_PREFIX}{id}"))
}

fn decode_after(token: &str) -> Option<u64> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .ok()?;
    String::from_utf8(bytes)
        .ok()?
        .strip_prefix(CURSOR_PREFIX)?
        .parse()
        .ok()
}

/// `GET .../contacts?limit&after&properties&propertiesWithHistory&archived`.
pub(crate) fn list(s: &mut HubSpotState, q: &Query) -> Reply {
    let limit = match q.get("limit").map(str::parse::<usize>) {
        None => 10,
        Some(Ok(n)) if n >= 1 && n <= s.list_max_limit => n,
        Some(_) => {
            return error(
                400,
                "VALIDATION_ERROR",
                &format!(
                    "limit must be between 1 and {} (got {})",
                    s.list_max_limit,
                    q.get("limit").unwrap_or_default()
                ),
            );
        }
    };
    let start = match q.get("after") {
        None => 0,
        Some(t) => match decode_after(t) {
            Some(id) => id,
            None => {
                return error(
                    400,
                    "VALIDATION_ERROR",
                    &format!("Invalid paging cursor: {t}"),
                );
            }
        },
    };
    let archived = archived_param(q);
    let props = q.list("properties");
    let history = q.list("propertiesWithHistory");
    let rows: Vec<&Contact> = s
        .contacts
        .range(start..)
        .map(|(_, c)| c)
        .filter(|c| c.archived == archived)
        .take(limit + 1)
        .collect();
    let results: Vec<Value> = rows
        .iter()
        .take(limit)
        .map(|c| {
            c.render(
                &c.properties,
                props.as_deref(),
                history.as_deref(),
                Some(&s.properties),
            )
        })
        .collect();
    let mut body = json!({"results": results});
    if let Some(next) = rows.get(limit) {
        let after = encode_after(next.id);
        body["paging"] = json!({"next": {"after": after,
            "link": format!("{}/crm/v3/objects/contacts?after={after}&limit={limit}", s.base_url)}});
    }
    Reply::ok(body)
}

/// `GET .../contacts/{id}[?idProperty=email]`.
pub(crate) fn get(s: &mut HubSpotState, id: &str, q: &Query) -> Reply {
    let found = match resolve(s, id, q.get("idProperty")) {
        Ok(f) => f,
        Err(r) => return r,
    };
    let archived = archived_param(q);
    match found
        .and_then(|n| s.contacts.get(&n))
        .filter(|c| c.archived == archived)
    {
        Some(c) => Reply::ok(c.render(
            &c.properties,
            q.list("properties").as_deref(),
            q.list("propertiesWithHistory").as_deref(),
            Some(&s.properties),
        )),
        None => not_found(),
    }
}

fn render_written(s: &HubSpotState, id: u64) -> Value {
    s.contacts
        .get(&id)
        .map(Contact::render_all)
        .unwrap_or(Value::Null)
}

/// `POST .../contacts` `{"properties": {...}}`.
pub(crate) fn create(s: &mut HubSpotState, body: &Value) -> Reply {
    let changes = match validate(s, body.get("properties")) {
        Ok(c) => c,
        Err(r) => return r,
    };
    if let Some(existing) = email_of(&changes).and_then(|e| s.id_by_email(&e)) {
        return conflict(existing);
    }
    let id = create_one(s, &changes, now_ms());
    Reply::new(201, render_written(s, id))
}

/// `PATCH .../contacts/{id}[?idProperty=email]`.
pub(crate) fn patch(s: &mut HubSpotState, id: &str, q: &Query, body: &Value) -> Reply {
    let found = match resolve(s, id, q.get("idProperty")) {
        Ok(f) => f,
        Err(r) => return r,
    };
    let Some(n) = found.filter(|n| s.contacts.get(n).is_some_and(|c| !c.archived)) else {
        return not_found();
    };
    let changes = match validate(s, body.get("properties")) {
        Ok(c) => c,
        Err(r) => return r,
    };
    if let Some(other) = email_of(&changes)
        .and_then(|e| s.id_by_email(&e))
        .filter(|o| *o != n)
    {
        return conflict(other);
    }
    apply(s, n, &changes, now_ms(), "API");
    Reply::ok(render_written(s, n))
}

/// `DELETE .../contacts/{id}`: archive; 204.
pub(crate) fn archive_by_api(s: &mut HubSpotState, id: &str) -> Reply {
    match id
        .parse::<u64>()
        .ok()
        .filter(|n| s.contacts.contains_key(n))
    {
        Some(n) => {
            archive(s, n, now_ms());
            Reply::new(204, Value::Null)
        }
        None => not_found(),
    }
}

/// `POST .../contacts/gdpr-delete` `{"objectId", "idProperty"}`: gone for good; 204.
pub(crate) fn gdpr_delete(s: &mut HubSpotState, body: &Value) -> Reply {
    let Some(object) = body.get("objectId").and_then(Value::as_str) else {
        return error(400, "VALIDATION_ERROR", "objectId is required");
    };
    let found = match resolve(s, object, body.get("idProperty").and_then(Value::as_str)) {
        Ok(f) => f,
        Err(r) => return r,
    };
    let Some(n) = found else {
        return not_found();
    };
    if let Some(c) = s.contacts.remove(&n)
        && let Some(e) = c.properties.get("email")
    {
        s.email_index.remove(e);
    }
    Reply::new(204, Value::Null)
}

fn batch_envelope(results: Vec<Value>, errors: Vec<Value>, ok_status: u16) -> Reply {
    let now = render_time(now_ms());
    let mut body = json!({"status": "COMPLETE", "results": results, "requestedAt": now,
                          "startedAt": now, "completedAt": now, "links": {}});
    let status = if errors.is_empty() {
        ok_status
    } else {
        body["numErrors"] = json!(errors.len());
        body["errors"] = Value::Array(errors);
        207
    };
    Reply::new(status, body)
}

fn not_found_item(ids: &[String]) -> Value {
    json!({"status": "error", "category": "OBJECT_NOT_FOUND",
           "message": "Could not get some CONTACT objects, they may be deleted or not exist. Check that ids are valid.",
           "context": {"ids": ids}, "errors": [], "links": {}})
}

fn input_id(input: &Value) -> Option<String> {
    match input.get("id") {
        Some(Value::String(t)) => Some(t.clone()),
        _ => None,
    }
}

/// `POST .../contacts/batch/{read,update,upsert,create,archive}`.
pub(crate) fn batch(s: &mut HubSpotState, kind: &str, q: &Query, body: &Value) -> Reply {
    let Some(inputs) = body.get("inputs").and_then(Value::as_array) else {
        return error(400, "VALIDATION_ERROR", "inputs is required");
    };
    if inputs.len() > s.batch_max {
        return error(
            400,
            "VALIDATION_ERROR",
            &format!(
                "Batch input has {} inputs; at most {} are allowed",
                inputs.len(),
                s.batch_max
            ),
        );
    }
    let default_id_property = body.get("idProperty").and_then(Value::as_str);
    if kind != "create" && inputs.iter().any(|i| input_id(i).is_none()) {
        return error(
            400,
            "VALIDATION_ERROR",
            "every input needs an id (a string)",
        );
    }
    match kind {
        "read" => {
            let archived = archived_param(q);
            let props = names(body.get("properties"));
            let history = names(body.get("propertiesWithHistory")).filter(|h| !h.is_empty());
            let mut results = Vec::new();
            let mut missing = Vec::new();
            let mut seen = HashSet::new();
            for input in inputs {
                let id = input_id(input).unwrap_or_default();
                let found = match resolve(s, &id, default_id_property) {
                    Ok(f) => f,
                    Err(r) => return r,
                };
                match found
                    .and_then(|n| s.contacts.get(&n))
                    .filter(|c| c.archived == archived)
                {
                    Some(c) if seen.insert(c.id) => results.push(c.render(
                        &c.properties,
                        props.as_deref().filter(|p| !p.is_empty()),
                        history.as_deref(),
                        Some(&s.properties),
                    )),
                    Some(_) => {}
                    None => missing.push(id),
                }
            }
            let errors = if missing.is_empty() {
                vec![]
            } else {
                vec![not_found_item(&missing)]
            };
            batch_envelope(results, errors, 200)
        }
        "update" | "upsert" => {
            let mut planned = Vec::new();
            for input in inputs {
                let changes = match validate(s, input.get("properties")) {
                    Ok(c) => c,
                    Err(r) => return r,
                };
                let id = input_id(input).unwrap_or_default();
                let id_property = input
                    .get("idProperty")
                    .and_then(Value::as_str)
                    .or(default_id_property);
                let found = match resolve(s, &id, id_property) {
                    Ok(f) => f.filter(|n| s.contacts.get(n).is_some_and(|c| !c.archived)),
                    Err(r) => return r,
                };
                planned.push((id, id_property.map(str::to_owned), found, changes));
            }
            let mut seen = HashSet::new();
            let dups: Vec<String> =
                planned
                    .iter()
                    .filter(|(id, _, found, _)| {
                        !seen.insert(found.map_or_else(
                            || format!("new:{}", id.to_lowercase()),
                            |n| n.to_string(),
                        ))
                    })
                    .map(|(id, ..)| id.clone())
                    .collect();
            if !dups.is_empty() {
                return error(
                    400,
                    "VALIDATION_ERROR",
                    &format!("Duplicate IDs found in batch input: {dups:?}. IDs must be unique"),
                );
            }
            let now = now_ms();
            let mut results = Vec::new();
            let mut missing = Vec::new();
            let mut errors = Vec::new();
            for (id, id_property, found, mut changes) in planned {
                let target = match found {
                    Some(n) => {
                        if let Some(other) = email_of(&changes)
                            .and_then(|e| s.id_by_email(&e))
                            .filter(|o| *o != n)
                        {
                            errors.push(json!({"status": "error", "category": "CONFLICT",
                                "message": format!("Contact already exists. Existing ID: {other}"),
                                "context": {"ids": [id]}, "errors": [], "links": {}}));
                            continue;
                        }
                        apply(s, n, &changes, now, "API");
                        (n, false)
                    }
                    None if kind == "upsert" && id_property.as_deref() == Some("email") => {
                        if !valid_email(&id) {
                            return validation_error(&[(
                                "email".into(),
                                "INVALID_EMAIL".into(),
                                format!("Email address {id} is invalid"),
                            )]);
                        }
                        changes.retain(|(k, _)| k != "email");
                        changes.push(("email".into(), id.to_lowercase()));
                        (create_one(s, &changes, now), true)
                    }
                    None => {
                        missing.push(id);
                        continue;
                    }
                };
                let mut v = render_written(s, target.0);
                if kind == "upsert" {
                    v["new"] = json!(target.1);
                }
                results.push(v);
            }
            if !missing.is_empty() {
                errors.push(not_found_item(&missing));
            }
            batch_envelope(results, errors, 200)
        }
        "create" => {
            let mut planned = Vec::new();
            for input in inputs {
                match validate(s, input.get("properties")) {
                    Ok(c) => planned.push((
                        input
                            .get("objectWriteTraceId")
                            .and_then(Value::as_str)
                            .map(str::to_owned),
                        c,
                    )),
                    Err(r) => return r,
                }
            }
            let traced = planned.iter().all(|(t, _)| t.is_some());
            let mut emails = HashSet::new();
            let mut conflicts = Vec::new();
            for (i, (_, c)) in planned.iter().enumerate() {
                if let Some(e) = email_of(c) {
                    if let Some(existing) = s.id_by_email(&e) {
                        conflicts.push((i, existing));
                    } else if !emails.insert(e) {
                        conflicts.push((i, 0));
                    }
                }
            }
            if !traced && let Some((_, existing)) = conflicts.first() {
                return conflict(*existing);
            }
            let now = now_ms();
            let mut results = Vec::new();
            let mut errors = Vec::new();
            for (i, (trace, changes)) in planned.iter().enumerate() {
                if let Some((_, existing)) = conflicts.iter().find(|(j, _)| *j == i) {
                    errors.push(json!({"status": "error", "category": "CONFLICT",
                        "message": format!("Contact already exists. Existing ID: {existing}"),
                        "context": {"objectWriteTraceId": [trace]}, "errors": [], "links": {}}));
                    continue;
                }
                let id = create_one(s, changes, now);
                let mut v = render_written(s, id);
                v["objectWriteTraceId"] = json!(trace);
                results.push(v);
            }
            batch_envelope(results, errors, 201)
        }
        "archive" => {
            let now = now_ms();
            for input in inputs {
                let id = input_id(input).unwrap_or_default();
                if let Ok(Some(n)) = resolve(s, &id, None) {
                    archive(s, n, now);
                }
            }
            Reply::new(204, Value::Null)
        }
        _ => error(404, "OBJECT_NOT_FOUND", "unknown batch operation"),
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
