//! A JSONL file standing in for the Campaigns tool's lists.
//!
//! The subscribers file holds one JSON object per line, sorted by list and address:
//!
//! ```json
//! {"list":"newsletter","email":"ann@example.com","language":"en","fields":{},"subscribed_at":"2026-01-01T00:00:00Z"}
//! ```
//!
//! To simulate what happens inside a real campaigns tool, append lines to the status file:
//!
//! ```json
//! {"list":"newsletter","email":"ann@example.com","kind":"unsubscribed","at":"2026-01-01T00:00:00Z"}
//! ```
//!
//! `kind` is `unsubscribed`, `bounced` or `complained`; `at` (default: when read) and `detail`
//! are optional, and so is a bounce's class, `"bounce": "hard"` (the default), `"soft"` or
//! `"policy"`.
//!
//! Or push them the way a real tool's webhook would, when `webhook_secret` is set:
//! `POST /webhooks/campaigns` with the header `X-Webhook-Secret` and a body of such lines'
//! objects, `{"events": [{"list": ..., "email": ..., "kind": ...}]}` (one list per call);
//! a `GET` (a tool validating the URL) is answered without work.
//!
//! # What a subscriber line carries (data minimisation)
//!
//! The address and the language always; of the contact's other fields (CRM columns) only
//! those the `fields` setting maps, as `list field = "contact field"` — by default
//! `First_Name` and `Last_Name`, like the Zoho Campaigns connector's default. A CRM's ids,
//! opt-out flags and other columns are not the campaigns tool's business. Lines written
//! before this setting existed keep their fields until the subscriber is next updated.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use chrono::{DateTime, SubsecRound, Utc};
use optinsync_plugin_api::{
    BatchResult, CampaignsConnector, Connector, ConnectorError, ConnectorResult, Cursor, Health,
    HttpMethod, Keyed, MemberPage, StatusEvent, StatusKind, StatusPage, Subscriber, WebhookEvent,
    WebhookRequest,
};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::{
    SettingsError, WEBHOOK_SECRET_HEADER, WebhookSecret, fsutil, json_error, parse_settings,
};

/// Items per subscribe or removal call: one rewrite of the file each.
const MAX_BATCH: usize = 100;

/// Settings of [`JsonlList`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonlListConfig {
    /// The subscribers file. Relative to the configuration file's directory.
    pub path: String,
    /// Optional file of simulated unsubscribes, bounces and complaints.
    #[serde(default)]
    pub status_path: Option<String>,
    /// List field → contact field it is filled from (a CRM field name as the CRM connector
    /// reports it). Only these are written; see the module docs. Empty: address and
    /// language only.
    #[serde(default = "default_fields")]
    pub fields: BTreeMap<String, String>,
    /// Accept status events at `/webhooks/campaigns` with this shared secret in the
    /// `X-Webhook-Secret` header. Unset: the connector takes no webhooks.
    #[serde(default)]
    pub webhook_secret: Option<WebhookSecret>,
}

fn default_fields() -> BTreeMap<String, String> {
    ["First_Name", "Last_Name"]
        .into_iter()
        .map(|f| (f.to_owned(), f.to_owned()))
        .collect()
}

/// A [`CampaignsConnector`] keeping every list in one JSONL file.
#[derive(Debug)]
pub struct JsonlList {
    path: PathBuf,
    status_path: Option<PathBuf>,
    /// [`JsonlListConfig::fields`].
    fields: BTreeMap<String, String>,
    webhook_secret: Option<WebhookSecret>,
    /// Serialises read-modify-write cycles so concurrent calls never lose each other's update,
    /// and holds the entries as last read or written.
    lock: Mutex<Option<Cached>>,
}

/// The subscribers file's entries as last read or written, with the file's size and
/// modification time then: a change reads and parses the file again only if someone else
/// changed it (a hand edit). Without it every batch parsed and rendered the whole file twice
/// on a runtime thread: with 10,000 subscribers a few milliseconds per batch that every
/// request on that thread waited for.
#[derive(Debug)]
struct Cached {
    entries: Entries,
    stamp: FileStamp,
}

/// Size and modification time of a file.
type FileStamp = (u64, Option<std::time::SystemTime>);

async fn stamp_of(path: &Path) -> std::io::Result<FileStamp> {
    let meta = tokio::fs::metadata(path).await?;
    Ok((meta.len(), meta.modified().ok()))
}

/// One line of the subscribers file. Unknown keys are refused rather than dropped, because
/// the file is rewritten on every change and anything not modelled here would be lost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    list: String,
    email: String,
    #[serde(default)]
    language: Option<String>,
    #[serde(default)]
    fields: BTreeMap<String, serde_json::Value>,
    subscribed_at: DateTime<Utc>,
}

/// One line of the status file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StatusLine {
    list: String,
    email: String,
    kind: StatusKind,
    #[serde(default)]
    at: Option<DateTime<Utc>>,
    #[serde(default)]
    detail: Option<String>,
    /// For `bounced`: `hard` (the default), `soft` or `policy`.
    #[serde(default)]
    bounce: Option<optinsync_plugin_api::BounceClass>,
}

/// Entries keyed by (list, [`address_key`]), which is also file order.
type Entries = BTreeMap<(String, String), Entry>;

fn entry_key(list: &str, email: &str) -> (String, String) {
    (list.to_owned(), address_key(email))
}

/// One key for every spelling of a mailbox, so updates and removals find the entry however
/// the address is spelled: case-insensitive (as mail systems are in practice), NFC, and the
/// domain in its IDNA ASCII form — like the engine's address canonicalisation, which may
/// re-spell a contact stored before it (`a@xn--bcher-kva.example` becomes `a@bücher.example`)
/// whose older line here keeps the old spelling.
fn address_key(email: &str) -> String {
    use unicode_normalization::UnicodeNormalization;
    let lower: String = email.trim().to_lowercase().nfc().collect();
    match lower.rsplit_once('@') {
        Some((local, domain)) => match idna::domain_to_ascii(domain) {
            Ok(ascii) => format!("{local}@{ascii}"),
            Err(_) => lower,
        },
        None => lower,
    }
}

impl JsonlList {
    /// Build from the connector's TOML table; relative paths are resolved against `base_dir`.
    pub fn from_config(settings: toml::Table, base_dir: &Path) -> Result<Self, SettingsError> {
        let config: JsonlListConfig = parse_settings(settings)?;
        Self::new(&config, base_dir)
    }

    /// Build from already-parsed settings; relative paths are resolved against `base_dir`.
    pub fn new(config: &JsonlListConfig, base_dir: &Path) -> Result<Self, SettingsError> {
        Ok(Self {
            path: fsutil::resolve(base_dir, "path", &config.path)?,
            status_path: config
                .status_path
                .as_deref()
                .map(|p| fsutil::resolve(base_dir, "status_path", p))
                .transpose()?,
            fields: config.fields.clone(),
            webhook_secret: config.webhook_secret.clone(),
            lock: Mutex::new(None),
        })
    }

    /// The resolved subscribers file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Addresses currently on `list`, in file order.
    pub async fn members(&self, list: &str) -> ConnectorResult<Vec<String>> {
        let _guard = self.lock.lock().await;
        let entries = self.load().await?.unwrap_or_default();
        Ok(entries
            .into_values()
            .filter(|e| e.list == list)
            .map(|e| e.email)
            .collect())
    }

    /// Read the file; `None` when it does not exist yet (no raw bytes to compare against).
    async fn load(&self) -> ConnectorResult<Option<Entries>> {
        match tokio::fs::read_to_string(&self.path).await {
            Ok(text) => parse_entries(&text, &fsutil::file_name(&self.path)).map(Some),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(fsutil::transient("cannot read", &self.path, &err)),
        }
    }

    /// Apply `change` (which says whether it changed anything) to the entries and write the
    /// file back only if it did, so repeating a call leaves the file untouched (same bytes,
    /// same mtime). The file is rendered on a blocking thread, not a runtime one.
    async fn modify(&self, change: impl FnOnce(&mut Entries) -> bool) -> ConnectorResult<()> {
        let mut cached = self.lock.lock().await;
        let now = stamp_of(&self.path).await.ok();
        // The kept entries only while the file is as this connector left it.
        let mut entries = match cached.take() {
            Some(c) if Some(c.stamp) == now => c.entries,
            _ => self.load().await?.unwrap_or_default(),
        };
        if !change(&mut entries) {
            *cached = self.cache(entries).await;
            return Ok(());
        }
        let (entries, text) = tokio::task::spawn_blocking(move || {
            let text = render(&entries);
            (entries, text)
        })
        .await
        .map_err(|e| ConnectorError::transient(format!("rendering the subscribers file: {e}")))?;
        fsutil::write_atomic(&self.path, text.as_bytes())
            .await
            .map_err(|err| fsutil::transient("cannot write", &self.path, &err))?;
        *cached = self.cache(entries).await;
        Ok(())
    }

    /// The entries with the file's stamp as it is now; `None` (read again next time) when the
    /// file cannot be looked at.
    async fn cache(&self, entries: Entries) -> Option<Cached> {
        let stamp = stamp_of(&self.path).await.ok()?;
        Some(Cached { entries, stamp })
    }

    /// The subscriber's fields the `fields` setting maps, under their list names.
    fn mapped_fields(&self, subscriber: &Subscriber) -> BTreeMap<String, serde_json::Value> {
        self.fields
            .iter()
            .filter_map(|(list_field, source)| {
                let value = subscriber.fields.get(source)?;
                (!value.is_null()).then(|| (list_field.clone(), value.clone()))
            })
            .collect()
    }

    async fn read_status_file(&self, path: &Path) -> ConnectorResult<String> {
        match tokio::fs::read_to_string(path).await {
            Ok(text) => Ok(text),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
            Err(err) => Err(fsutil::transient("cannot read", path, &err)),
        }
    }
}

/// A webhook body: status events of one list.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WebhookBody {
    events: Vec<StatusLine>,
}

impl JsonlList {
    /// `{"events": [...]}` with the secret header; refusals never quote the body.
    fn status_webhook(&self, request: &WebhookRequest) -> ConnectorResult<WebhookEvent> {
        let Some(secret) = &self.webhook_secret else {
            return Err(ConnectorError::InvalidInput {
                message: "the JSONL list takes no webhooks (no webhook_secret)".into(),
            });
        };
        if !crate::csv_crm::secret_matches(request.header(WEBHOOK_SECRET_HEADER), secret) {
            return Err(ConnectorError::InvalidInput {
                message: format!(
                    "JSONL list webhook without the right `{WEBHOOK_SECRET_HEADER}` header"
                ),
            });
        }
        if request.method == HttpMethod::Get {
            return Ok(WebhookEvent::Ignored);
        }
        let body: WebhookBody =
            serde_json::from_str(&request.body).map_err(|err| ConnectorError::InvalidInput {
                message: format!(
                    r#"JSONL list webhook body must be {{"events": [...]}}: {}"#,
                    json_error(&err)
                ),
            })?;
        let Some(list) = body.events.first().map(|e| e.list.clone()) else {
            return Ok(WebhookEvent::Ignored);
        };
        if body.events.iter().any(|e| e.list != list) {
            return Err(ConnectorError::InvalidInput {
                message: "JSONL list webhook with events of several lists".into(),
            });
        }
        let events = body
            .events
            .into_iter()
            .map(|e| StatusEvent {
                email: e.email,
                kind: e.kind,
                at: e.at.unwrap_or_else(Utc::now),
                detail: e.detail,
                bounce: e.bounce,
            })
            .collect();
        Ok(WebhookEvent::Status { list, events })
    }
}

#[async_trait]
impl Connector for JsonlList {
    fn accepts_webhooks(&self) -> bool {
        self.webhook_secret.is_some()
    }

    async fn webhook(&self, request: &WebhookRequest) -> ConnectorResult<WebhookEvent> {
        self.status_webhook(request)
    }

    async fn health(&self) -> ConnectorResult<Health> {
        let dir = fsutil::parent_dir(&self.path);
        if let Err(detail) = fsutil::probe_writable_dir(&dir).await {
            return Ok(Health { ok: false, detail });
        }
        Ok(match self.load().await {
            Ok(entries) => Health {
                ok: true,
                detail: format!(
                    "{}: {} subscriptions",
                    self.path.display(),
                    entries.map_or(0, |e| e.len())
                ),
            },
            Err(err) => Health {
                ok: false,
                detail: err.to_string(),
            },
        })
    }
}

#[async_trait]
impl CampaignsConnector for JsonlList {
    /// The whole list in one page: the local file is small.
    async fn list_members(
        &self,
        list: &str,
        _cursor: Option<&Cursor>,
    ) -> ConnectorResult<MemberPage> {
        let _guard = self.lock.lock().await;
        let entries = self.load().await?.unwrap_or_default();
        let members = entries
            .into_values()
            .filter(|e| e.list == list)
            .map(|e| Subscriber {
                email: e.email,
                language: e.language,
                fields: e.fields,
                proof: None,
            })
            .collect();
        Ok(MemberPage {
            members,
            next_cursor: None,
            has_more: false,
        })
    }

    /// One file rewrite per batch; an item without an address fails alone.
    fn max_batch(&self) -> usize {
        MAX_BATCH
    }

    async fn subscribe(&self, list: &str, items: &[Keyed<Subscriber>]) -> BatchResult {
        check_list(list)?;
        let results: Vec<ConnectorResult<()>> = items
            .iter()
            .enumerate()
            .map(|(index, s)| {
                let email = s.item.email.trim();
                if email.is_empty() {
                    Err(ConnectorError::permanent(format!(
                        "subscriber #{index} for list `{list}` has an empty email"
                    )))
                } else if !email.contains('@') {
                    // A list tool would refuse it too; never quoted (it may be anything).
                    Err(ConnectorError::permanent(format!(
                        "subscriber #{index} for list `{list}` is not an address"
                    )))
                } else {
                    Ok(())
                }
            })
            .collect();
        let now = Utc::now().trunc_subsecs(0);
        self.modify(|entries| {
            let mut changed = false;
            for (keyed, _) in items.iter().zip(&results).filter(|(_, r)| r.is_ok()) {
                let subscriber = &keyed.item;
                let key = entry_key(list, &subscriber.email);
                // Keep the original subscription date: an update is not a new subscription.
                let subscribed_at = entries.get(&key).map_or(now, |e| e.subscribed_at);
                let entry = Entry {
                    list: list.to_owned(),
                    email: subscriber.email.trim().to_owned(),
                    language: subscriber.language.clone(),
                    fields: self.mapped_fields(subscriber),
                    subscribed_at,
                };
                if entries.get(&key) != Some(&entry) {
                    entries.insert(key, entry);
                    changed = true;
                }
            }
            changed
        })
        .await?;
        Ok(results)
    }

    async fn remove(&self, list: &str, items: &[Keyed<String>]) -> BatchResult {
        check_list(list)?;
        self.modify(|entries| {
            let mut changed = false;
            for email in items {
                changed |= entries.remove(&entry_key(list, &email.item)).is_some();
            }
            changed
        })
        .await?;
        Ok(vec![Ok(()); items.len()])
    }

    async fn status_events(
        &self,
        list: &str,
        cursor: Option<&Cursor>,
    ) -> ConnectorResult<StatusPage> {
        let start = match cursor {
            Some(cursor) => {
                cursor
                    .0
                    .trim()
                    .parse::<usize>()
                    .map_err(|_| ConnectorError::InvalidInput {
                        message: format!(
                            "not a JSONL status cursor (expected a line count): {:?}",
                            cursor.0
                        ),
                    })?
            }
            None => 0,
        };
        let Some(path) = &self.status_path else {
            return Ok(StatusPage {
                events: Vec::new(),
                next_cursor: Some(Cursor(start.to_string())),
                has_more: false,
            });
        };
        let text = self.read_status_file(path).await?;
        let (events, consumed) = read_status_lines(&text, &fsutil::file_name(path), list, start);
        Ok(StatusPage {
            events,
            next_cursor: Some(Cursor(consumed.to_string())),
            has_more: false,
        })
    }
}

fn check_list(list: &str) -> ConnectorResult<()> {
    if list.trim().is_empty() {
        return Err(ConnectorError::permanent("list name must not be empty"));
    }
    Ok(())
}

/// Parse the subscribers file. Any bad line fails the whole read: the file is rewritten on
/// every change, so skipping a line here would silently delete it.
fn parse_entries(text: &str, file: &str) -> ConnectorResult<Entries> {
    let mut entries = Entries::new();
    let mut first_line = BTreeMap::new();
    for (index, line) in text.lines().enumerate() {
        let line_no = index + 1;
        if line.trim().is_empty() {
            continue;
        }
        let entry: Entry = serde_json::from_str(line).map_err(|err| {
            ConnectorError::permanent(format!(
                "{file}:{line_no}: not a subscriber line: {}",
                json_error(&err)
            ))
        })?;
        let key = entry_key(&entry.list, &entry.email);
        if let Some(first) = first_line.insert(key.clone(), line_no) {
            return Err(ConnectorError::permanent(format!(
                "{file}:{line_no}: same address on list `{}` as line {first}",
                entry.list
            )));
        }
        entries.insert(key, entry);
    }
    Ok(entries)
}

fn render(entries: &Entries) -> String {
    let mut out = String::new();
    for entry in entries.values() {
        // Plain strings, maps and dates always serialise; `unwrap_or_default` keeps it panic-free.
        out.push_str(&serde_json::to_string(entry).unwrap_or_default());
        out.push('\n');
    }
    out
}

/// Events for `list` after line `start`, and the number of lines consumed.
///
/// A final line without a newline that does not parse is probably still being written, so it
/// is left for the next call; any other bad line is skipped with a warning.
fn read_status_lines(
    text: &str,
    file: &str,
    list: &str,
    start: usize,
) -> (Vec<StatusEvent>, usize) {
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let start = if start > lines.len() {
        // The file shrank (truncated or replaced). Re-reading it is safe: status events are
        // idempotent for the engine, while skipping them could ignore an unsubscribe.
        tracing::warn!(
            file,
            cursor = start,
            lines = lines.len(),
            "status file is shorter than the cursor; reading it again"
        );
        0
    } else {
        start
    };
    let mut events = Vec::new();
    let mut consumed = start;
    for (index, raw) in lines.iter().enumerate().skip(start) {
        let complete = raw.ends_with('\n');
        let line = raw.trim();
        if !line.is_empty() {
            match serde_json::from_str::<StatusLine>(line) {
                Ok(status) if status.list == list => events.push(StatusEvent {
                    email: status.email,
                    kind: status.kind,
                    at: status.at.unwrap_or_else(Utc::now),
                    detail: status.detail,
                    bounce: status.bounce,
                }),
                Ok(_) => {}
                Err(_) if !complete => break,
                Err(err) => {
                    tracing::warn!(file, line = index + 1, error = %json_error(&err), "skipping malformed status line")
                }
            }
        }
        consumed = index + 1;
    }
    (events, consumed)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn keyed<T: Clone>(items: &[T]) -> Vec<Keyed<T>> {
        items
            .iter()
            .enumerate()
            .map(|(i, t)| Keyed::new(format!("k{i}"), t.clone()))
            .collect()
    }

    fn list(dir: &Path) -> JsonlList {
        let settings: toml::Table =
            toml::from_str("path = \"lists/subscribers.jsonl\"\nstatus_path = \"status.jsonl\"")
                .unwrap();
        JsonlList::from_config(settings, dir).unwrap()
    }

    fn sub(email: &str, language: Option<&str>) -> Subscriber {
        Subscriber {
            email: email.to_owned(),
            language: language.map(str::to_owned),
            fields: BTreeMap::from([("First_Name".to_owned(), serde_json::json!("Ann"))]),
            proof: None,
        }
    }

    /// The entries are kept between calls, but a change made to the file by someone else
    /// in between is read, not overwritten; a removal of nobody leaves the file as it is.
    #[tokio::test]
    async fn a_hand_edit_between_calls_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let jl = list(dir.path());
        jl.subscribe("newsletter", &keyed(&[sub("ann@example.com", None)]))
            .await
            .unwrap();
        let path = jl.path().to_owned();
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str(
            "{\"list\":\"newsletter\",\"email\":\"hand@example.com\",\"subscribed_at\":\"2026-01-01T00:00:00Z\"}\n",
        );
        std::fs::write(&path, &text).unwrap();
        jl.subscribe("newsletter", &keyed(&[sub("ben@example.com", None)]))
            .await
            .unwrap();
        let mut members = jl.members("newsletter").await.unwrap();
        members.sort();
        assert_eq!(
            members,
            ["ann@example.com", "ben@example.com", "hand@example.com"]
        );
        let before = std::fs::read(&path).unwrap();
        let stamp = std::fs::metadata(&path).unwrap().modified().unwrap();
        jl.remove("newsletter", &keyed(&["nobody@example.com".to_owned()]))
            .await
            .unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), before);
        assert_eq!(std::fs::metadata(&path).unwrap().modified().unwrap(), stamp);
    }

    #[tokio::test]
    async fn f2_every_spelling_of_a_mailbox_is_one_entry() {
        let dir = tempfile::tempdir().unwrap();
        let jl = list(dir.path());
        // Written by a version that stored the CRM's punycode spelling.
        jl.subscribe(
            "newsletter",
            &keyed(&[sub("jos\u{e9}@xn--bcher-kva.example", None)]),
        )
        .await
        .unwrap();
        // The contact is now spelled canonically: an update is the same entry ...
        jl.subscribe(
            "newsletter",
            &keyed(&[sub("jos\u{e9}@b\u{fc}cher.example", Some("es"))]),
        )
        .await
        .unwrap();
        assert_eq!(jl.members("newsletter").await.unwrap().len(), 1);
        // ... and a removal in any spelling (NFD here) takes it off.
        jl.remove(
            "newsletter",
            &keyed(&["JOSE\u{301}@BU\u{308}CHER.example".to_owned()]),
        )
        .await
        .unwrap();
        assert!(jl.members("newsletter").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn f11_only_mapped_fields_reach_the_list() {
        let dir = tempfile::tempdir().unwrap();
        // Every CSV column, as the CRM connector reports them.
        let crm_columns = Subscriber {
            email: "ann@example.com".to_owned(),
            language: Some("en".to_owned()),
            fields: [
                ("Id", "1001"),
                ("First_Name", "Ann"),
                ("Last_Name", "Lee"),
                ("Email", "ann@example.com"),
                ("Email_Opt_Out", "false"),
                ("Newsletter_Requested", "true"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), serde_json::json!(v)))
            .collect(),
            proof: None,
        };
        let default = list(dir.path());
        default
            .subscribe("newsletter", &keyed(std::slice::from_ref(&crm_columns)))
            .await
            .unwrap();
        let entry: Entry = serde_json::from_str(read(dir.path()).trim()).unwrap();
        assert_eq!(
            entry.fields.keys().collect::<Vec<_>>(),
            ["First_Name", "Last_Name"],
            "by default the name fields only"
        );
        assert_eq!(entry.language.as_deref(), Some("en"));
        assert_eq!(entry.email, "ann@example.com");

        // A mapping renames, and leaves out what it does not name.
        let settings: toml::Table = toml::from_str(
            "path = \"mapped.jsonl\"\n[fields]\n\"First name\" = \"First_Name\"\nCompany = \"Company\"",
        )
        .unwrap();
        let mapped = JsonlList::from_config(settings, dir.path()).unwrap();
        mapped
            .subscribe("newsletter", &keyed(&[crm_columns]))
            .await
            .unwrap();
        let text = std::fs::read_to_string(dir.path().join("mapped.jsonl")).unwrap();
        let entry: Entry = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(
            entry.fields,
            BTreeMap::from([("First name".to_owned(), serde_json::json!("Ann"))])
        );
        assert!(
            !text.contains("1001") && !text.contains("Email_Opt_Out"),
            "{text}"
        );
    }

    fn read(dir: &Path) -> String {
        std::fs::read_to_string(dir.join("lists/subscribers.jsonl")).unwrap()
    }

    #[tokio::test]
    async fn subscribe_is_idempotent_and_sorted() {
        let dir = tempfile::tempdir().unwrap();
        let jl = list(dir.path());
        let subs = [
            sub("zed@example.com", None),
            sub("ann@example.com", Some("en")),
        ];
        jl.subscribe("newsletter", &keyed(&subs)).await.unwrap();
        jl.subscribe("alerts", &keyed(&subs[..1])).await.unwrap();
        let first = read(dir.path());
        jl.subscribe("newsletter", &keyed(&subs)).await.unwrap();
        assert_eq!(read(dir.path()), first);

        let lines: Vec<Entry> = first
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let order: Vec<(&str, &str)> = lines
            .iter()
            .map(|e| (e.list.as_str(), e.email.as_str()))
            .collect();
        assert_eq!(
            order,
            [
                ("alerts", "zed@example.com"),
                ("newsletter", "ann@example.com"),
                ("newsletter", "zed@example.com")
            ]
        );
        assert_eq!(
            jl.members("newsletter").await.unwrap(),
            ["ann@example.com", "zed@example.com"]
        );

        // An update changes the data but keeps the original subscription date.
        jl.subscribe("newsletter", &keyed(&[sub("ANN@example.com", Some("es"))]))
            .await
            .unwrap();
        let updated: Vec<Entry> = read(dir.path())
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(updated.len(), 3);
        assert_eq!(updated[1].language.as_deref(), Some("es"));
        assert_eq!(updated[1].subscribed_at, lines[1].subscribed_at);

        // No temp files are left behind by the atomic writes.
        let names: Vec<_> = std::fs::read_dir(dir.path().join("lists"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["subscribers.jsonl"]);
    }

    #[tokio::test]
    async fn remove_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let jl = list(dir.path());
        jl.subscribe(
            "newsletter",
            &keyed(&[sub("ann@example.com", None), sub("bob@example.com", None)]),
        )
        .await
        .unwrap();
        jl.remove(
            "newsletter",
            &keyed(&[
                "ann@example.com".to_owned(),
                "absent@example.com".to_owned(),
            ]),
        )
        .await
        .unwrap();
        let once = read(dir.path());
        jl.remove("newsletter", &keyed(&["ann@example.com".to_owned()]))
            .await
            .unwrap();
        assert_eq!(read(dir.path()), once);
        assert_eq!(jl.members("newsletter").await.unwrap(), ["bob@example.com"]);
        // Removing from a list that never existed does not create the file.
        let other = tempfile::tempdir().unwrap();
        list(other.path())
            .remove("newsletter", &keyed(&["x@example.com".to_owned()]))
            .await
            .unwrap();
        assert!(!other.path().join("lists/subscribers.jsonl").exists());
    }

    #[tokio::test]
    async fn malformed_subscriber_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let jl = list(dir.path());
        jl.subscribe("newsletter", &keyed(&[sub("ann@example.com", None)]))
            .await
            .unwrap();
        let path = dir.path().join("lists/subscribers.jsonl");
        let mut text = read(dir.path());
        text.push_str("{broken\n");
        std::fs::write(&path, &text).unwrap();
        let err = jl
            .subscribe("newsletter", &keyed(&[sub("bob@example.com", None)]))
            .await
            .unwrap_err();
        assert!(matches!(err, ConnectorError::Permanent { .. }), "{err:?}");
        assert!(err.to_string().contains("subscribers.jsonl:2"), "{err}");
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            text,
            "file must not be rewritten"
        );
        assert!(!jl.health().await.unwrap().ok);
    }

    #[tokio::test]
    async fn status_events_follow_the_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let jl = list(dir.path());
        let status = dir.path().join("status.jsonl");

        let empty = jl.status_events("newsletter", None).await.unwrap();
        assert!(empty.events.is_empty());
        assert_eq!(empty.next_cursor, Some(Cursor("0".into())));

        std::fs::write(
            &status,
            concat!(
                r#"{"list":"newsletter","email":"ann@example.com","kind":"unsubscribed","at":"2026-01-01T00:00:00Z"}"#,
                "\n",
                r#"{"list":"alerts","email":"bob@example.com","kind":"bounced"}"#,
                "\n",
                "not json\n",
                r#"{"list":"newsletter","email":"cy@example.com","kind":"complained","detail":"spam button"}"#,
                "\n",
            ),
        )
        .unwrap();
        let page = jl
            .status_events("newsletter", empty.next_cursor.as_ref())
            .await
            .unwrap();
        assert_eq!(page.next_cursor, Some(Cursor("4".into())));
        assert!(!page.has_more);
        assert_eq!(page.events.len(), 2);
        assert_eq!(page.events[0].email, "ann@example.com");
        assert_eq!(page.events[0].kind, StatusKind::Unsubscribed);
        assert_eq!(
            page.events[0].at,
            "2026-01-01T00:00:00Z".parse::<DateTime<Utc>>().unwrap()
        );
        assert_eq!(page.events[1].kind, StatusKind::Complained);
        assert_eq!(page.events[1].detail.as_deref(), Some("spam button"));

        let again = jl
            .status_events("newsletter", page.next_cursor.as_ref())
            .await
            .unwrap();
        assert!(again.events.is_empty());
        assert_eq!(again.next_cursor, page.next_cursor);

        // A half-written last line is left for the next call.
        let mut text = std::fs::read_to_string(&status).unwrap();
        text.push_str(r#"{"list":"newsletter","email":"dan@exa"#);
        std::fs::write(&status, &text).unwrap();
        let partial = jl
            .status_events("newsletter", again.next_cursor.as_ref())
            .await
            .unwrap();
        assert!(partial.events.is_empty());
        assert_eq!(partial.next_cursor, Some(Cursor("4".into())));
        text.push_str("mple.com\",\"kind\":\"bounced\"}\n");
        std::fs::write(&status, &text).unwrap();
        let done = jl
            .status_events("newsletter", partial.next_cursor.as_ref())
            .await
            .unwrap();
        assert_eq!(done.events.len(), 1);
        assert_eq!(done.events[0].email, "dan@example.com");

        let err = jl
            .status_events("newsletter", Some(&Cursor("x".into())))
            .await
            .unwrap_err();
        assert!(matches!(err, ConnectorError::InvalidInput { .. }));
    }

    #[tokio::test]
    async fn health_ok_and_batches_of_a_hundred() {
        let dir = tempfile::tempdir().unwrap();
        let jl = list(dir.path());
        assert!(jl.health().await.unwrap().ok);
        assert_eq!(jl.max_batch(), MAX_BATCH);
    }

    #[tokio::test]
    async fn an_item_without_an_address_fails_alone() {
        let dir = tempfile::tempdir().unwrap();
        let jl = list(dir.path());
        let results = jl
            .subscribe(
                "newsletter",
                &keyed(&[
                    sub("ann@example.com", None),
                    sub("  ", None),
                    sub("bob@example.com", None),
                ]),
            )
            .await
            .unwrap();
        assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
        assert!(matches!(results[1], Err(ConnectorError::Permanent { .. })));
        let members = jl.list_members("newsletter", None).await.unwrap().members;
        assert_eq!(members.len(), 2);
    }

    #[tokio::test]
    async fn f6_a_bad_subscriber_line_is_reported_without_its_content() {
        let dir = tempfile::tempdir().unwrap();
        let jl = list(dir.path());
        std::fs::create_dir_all(dir.path().join("lists")).unwrap();
        std::fs::write(
            dir.path().join("lists/subscribers.jsonl"),
            "{\"list\":\"newsletter\",\"email\":\"a@example.org\",\"fields\":\"victim@example.com\",\"subscribed_at\":\"2026-01-01T00:00:00Z\"}\n",
        )
        .unwrap();
        let err = jl.members("newsletter").await.unwrap_err().to_string();
        assert!(err.contains("subscribers.jsonl:1"), "{err}");
        assert!(
            err.contains("unexpected value or type at line 1 column"),
            "{err}"
        );
        assert!(!err.contains("victim"), "{err}");
    }

    #[test]
    fn unknown_setting_is_named() {
        let settings: toml::Table = toml::from_str("path = \"a\"\nstatus = \"b\"").unwrap();
        let err = JsonlList::from_config(settings, Path::new("/tmp")).unwrap_err();
        assert!(err.to_string().contains("unknown field `status`"), "{err}");
    }
}
