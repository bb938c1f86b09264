//! The contacts object: the stored contact and how the API renders it, seeding and edits for
//! tests, list, get, create, update, archive and GDPR delete. Property definitions and
//! validation live in `properties`, batch endpoints in `batch`, search in `search`.
//!
//! Inferred, where HubSpot's documentation says nothing: a requested property the portal does
//! not define is left out of `properties` (a defined but unset one is `null`); emails are
//! stored lower-cased and unique case-insensitively; every accepted write bumps
//! `lastmodifieddate`, even one that sets a value it already had (stricter: a connector sees
//! its own echoes); the list cursor `after` is an opaque token (stricter: HubSpot's looks like
//! a record id, but is documented as opaque); `DELETE` of an unknown id is 404.

use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};

use super::http::{Query, Reply, error};
use super::properties::{PropertyDef, validate};
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
pub(crate) fn apply(
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
pub(crate) fn create_one(
    s: &mut HubSpotState,
    changes: &[(String, String)],
    at: DateTime<Utc>,
) -> u64 {
    s.next_id += 1;
    let id = s.next_id;
    let mut c = Contact::new(id, at);
    // Not searchable before the lag: the first version is recorded by `apply`.
    c.index.clear();
    s.contacts.insert(id, c);
    apply(s, id, changes, at, "API");
    id
}

pub(crate) fn email_of(changes: &[(String, String)]) -> Option<String> {
    changes
        .iter()
        .find(|(k, _)| k == "email")
        .map(|(_, v)| v.to_lowercase())
        .filter(|v| !v.is_empty())
}

pub(crate) fn conflict(existing: u64) -> Reply {
    error(
        409,
        "CONFLICT",
        &format!("Contact already exists. Existing ID: {existing}"),
    )
}

pub(crate) fn not_found() -> Reply {
    error(404, "OBJECT_NOT_FOUND", "resource not found")
}

/// The contact `id` names under `id_property` (`None`: the record id), archived or not.
pub(crate) fn resolve(
    s: &HubSpotState,
    id: &str,
    id_property: Option<&str>,
) -> Result<Option<u64>, Reply> {
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

pub(crate) fn archived_param(q: &Query) -> bool {
    q.get("archived") == Some("true")
}

pub(crate) fn names(v: Option<&Value>) -> Option<Vec<String>> {
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

pub(crate) fn render_written(s: &HubSpotState, id: u64) -> Value {
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
