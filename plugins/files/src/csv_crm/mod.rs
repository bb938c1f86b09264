//! A CSV file standing in for a CRM.
//!
//! The file has a header row; one row is one contact. There is no change log in a CSV, so
//! the change feed is *incremental by row content*: the cursor remembers a hash of every row
//! it has handed out, and a later pass returns only rows whose hash changed (or that are
//! new), plus the ids that disappeared. The CSV is only ever read; write-backs go to an
//! optional JSONL file.
//!
//! Record ids (the id column, and the ids a webhook names) must be 1 to 64 characters of
//! `A-Z a-z 0-9 _ -`: they end up in log lines, so a newline (a forged log line) or an
//! address in an id is refused, and the refusal names the file and line, never the value.
//!
//! This file holds the settings and the [`CrmConnector`] impl; `parse` reads the CSV into
//! rows, and `diff` compares them with the cursor.

mod diff;
mod parse;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use optinsync_plugin_api::{
    ChangePage, Connector, ConnectorError, ConnectorResult, ConsentWriteBack, CrmConnector,
    CrmRecord, Cursor, Health, HttpMethod, RecordRef, WebhookEvent, WebhookRequest,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::Mutex;

use self::diff::{CursorState, diff};
use self::parse::{RowKey, Snapshot, parse_snapshot, read_snapshot};
use crate::{SettingsError, fsutil, json_error, parse_settings};

/// Settings of [`CsvCrm`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CsvCrmConfig {
    /// The CSV file. Relative to the configuration file's directory.
    pub path: String,
    /// Module name used in record references (`Contacts/17`).
    #[serde(default = "default_module")]
    pub module: String,
    #[serde(default = "default_id_column")]
    pub id_column: String,
    #[serde(default = "default_email_column")]
    pub email_column: String,
    /// Optional column; when absent from the file every record has no language.
    #[serde(default = "default_language_column")]
    pub language_column: String,
    /// Optional column; a truthy value means the person opted out of marketing.
    #[serde(default = "default_opt_out_column")]
    pub opt_out_column: String,
    /// List id → column whose truthy value means the CRM says the person asked for that list.
    #[serde(default)]
    pub asserts: BTreeMap<String, String>,
    /// JSONL file receiving consent write-backs, one JSON object per line. It stands for
    /// the CRM, outside optinsync's erasure: the line for an erasure carries the address on
    /// purpose (the CRM must find the record to set its opt-out), like a real CRM's record.
    #[serde(default)]
    pub writeback_path: Option<String>,
    /// When set, a webhook call must carry it in the [`WEBHOOK_SECRET_HEADER`] header
    /// (compared in constant time); may be `"${VAR}"`. Without it the webhook is open to
    /// anyone who can reach it (it can only make the connector re-read named rows).
    #[serde(default, skip_serializing)]
    pub webhook_secret: Option<WebhookSecret>,
}

/// Header carrying [`CsvCrmConfig::webhook_secret`].
pub const WEBHOOK_SECRET_HEADER: &str = "x-webhook-secret";

/// The webhook's shared secret; never printed.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct WebhookSecret(pub String);

impl std::fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

/// Whether the header holds the secret. Digests have one length whatever was sent, so the
/// compare is constant time.
pub(crate) fn secret_matches(given: Option<&str>, secret: &WebhookSecret) -> bool {
    given.is_some_and(|given| {
        bool::from(Sha256::digest(given.as_bytes()).ct_eq(&Sha256::digest(secret.0.as_bytes())))
    })
}

/// Longest record id accepted; see [`is_valid_id`].
const MAX_ID_LEN: usize = 64;

/// Record ids are 1-64 characters of `A-Z a-z 0-9 _ -` (see the module docs).
fn is_valid_id(id: &str) -> bool {
    (1..=MAX_ID_LEN).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn default_module() -> String {
    "Contacts".to_owned()
}
fn default_id_column() -> String {
    "Id".to_owned()
}
fn default_email_column() -> String {
    "Email".to_owned()
}
fn default_language_column() -> String {
    "Language".to_owned()
}
fn default_opt_out_column() -> String {
    "Email_Opt_Out".to_owned()
}

/// A [`CrmConnector`] reading contacts from a CSV file. See the module docs for how changes
/// are detected.
#[derive(Debug)]
pub struct CsvCrm {
    config: Arc<CsvCrmConfig>,
    path: PathBuf,
    writeback_path: Option<PathBuf>,
    /// Serialises appends so two write-backs never interleave within a line.
    writeback_lock: Mutex<()>,
    /// Missing optional columns are logged once, not on every poll.
    warned_optional: AtomicBool,
}

impl CsvCrm {
    /// Build from the connector's TOML table; relative paths are resolved against `base_dir`.
    pub fn from_config(settings: toml::Table, base_dir: &Path) -> Result<Self, SettingsError> {
        let config: CsvCrmConfig = parse_settings(settings)?;
        Self::new(config, base_dir)
    }

    /// Build from already-parsed settings; relative paths are resolved against `base_dir`.
    pub fn new(config: CsvCrmConfig, base_dir: &Path) -> Result<Self, SettingsError> {
        for (setting, value) in [
            ("module", &config.module),
            ("id_column", &config.id_column),
            ("email_column", &config.email_column),
        ] {
            if value.trim().is_empty() {
                return Err(SettingsError::invalid(
                    setting.to_owned(),
                    "must not be empty".to_owned(),
                ));
            }
        }
        if config
            .webhook_secret
            .as_ref()
            .is_some_and(|s| s.0.trim().len() < 16)
        {
            return Err(SettingsError::invalid(
                "webhook_secret".to_owned(),
                "must be at least 16 characters".to_owned(),
            ));
        }
        let path = fsutil::resolve(base_dir, "path", &config.path)?;
        let writeback_path = config
            .writeback_path
            .as_deref()
            .map(|p| fsutil::resolve(base_dir, "writeback_path", p))
            .transpose()?;
        Ok(Self {
            config: Arc::new(config),
            path,
            writeback_path,
            writeback_lock: Mutex::new(()),
            warned_optional: AtomicBool::new(false),
        })
    }

    /// The settings this connector runs with.
    pub fn config(&self) -> &CsvCrmConfig {
        &self.config
    }

    /// The resolved CSV path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One change page computed from `bytes` as if they were the file's content: the parsing
    /// and diffing of [`CrmConnector::changes`] without the file. For fuzzing and tests.
    #[doc(hidden)]
    pub fn changes_of_bytes(
        &self,
        bytes: &[u8],
        cursor: Option<&Cursor>,
        limit: usize,
    ) -> ConnectorResult<ChangePage> {
        let previous = match cursor {
            Some(cursor) => CursorState::decode(cursor)?,
            None => CursorState::default(),
        };
        let snapshot = parse_snapshot(bytes, "fuzz.csv", &self.config)?;
        Ok(diff(&self.config.module, &previous, snapshot, limit))
    }

    /// Read and parse the whole file off the async runtime (CSV parsing is CPU work).
    async fn snapshot(&self) -> ConnectorResult<Snapshot> {
        let config = Arc::clone(&self.config);
        let path = self.path.clone();
        let snapshot = tokio::task::spawn_blocking(move || read_snapshot(&path, &config))
            .await
            .map_err(|err| ConnectorError::transient(format!("CSV reader task failed: {err}")))??;
        if !snapshot.missing_optional.is_empty()
            && !self.warned_optional.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                file = %self.path.display(),
                columns = ?snapshot.missing_optional,
                "optional CSV columns not found; their values are treated as empty"
            );
        }
        Ok(snapshot)
    }
}

#[async_trait]
impl Connector for CsvCrm {
    async fn health(&self) -> ConnectorResult<Health> {
        Ok(match self.snapshot().await {
            Ok(snapshot) => Health {
                ok: true,
                detail: format!(
                    "{} readable, {} rows",
                    self.path.display(),
                    snapshot.rows.len()
                ),
            },
            Err(err) => Health {
                ok: false,
                detail: err.to_string(),
            },
        })
    }

    fn accepts_webhooks(&self) -> bool {
        true
    }

    async fn webhook(&self, request: &WebhookRequest) -> ConnectorResult<WebhookEvent> {
        if request.method != HttpMethod::Post {
            return Err(ConnectorError::InvalidInput {
                message: "CSV CRM webhooks are POSTed".into(),
            });
        }
        self.parse_webhook(&request.headers, request.body.as_bytes())
    }
}

impl CsvCrm {
    /// `{"ids": ["<record id>", ...]}`, with the shared secret header if one is configured.
    /// Refusals never quote the body: it is untrusted and ends up in a log line.
    pub fn parse_webhook(
        &self,
        headers: &[(String, String)],
        body: &[u8],
    ) -> ConnectorResult<WebhookEvent> {
        if let Some(secret) = &self.config.webhook_secret {
            let given = headers
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case(WEBHOOK_SECRET_HEADER))
                .map(|(_, value)| value.as_str());
            if !secret_matches(given, secret) {
                return Err(ConnectorError::InvalidInput {
                    message: format!(
                        "CSV CRM webhook without the right `{WEBHOOK_SECRET_HEADER}` header"
                    ),
                });
            }
        }
        let parsed: WebhookBody =
            serde_json::from_slice(body).map_err(|err| ConnectorError::InvalidInput {
                message: format!(
                    r#"CSV CRM webhook body must be {{"ids": ["<record id>", ...]}}: {}"#,
                    json_error(&err)
                ),
            })?;
        let mut records = Vec::with_capacity(parsed.ids.len());
        for (index, id) in parsed.ids.iter().enumerate() {
            let id = id.trim();
            if !is_valid_id(id) {
                return Err(ConnectorError::InvalidInput {
                    message: format!(
                        "CSV CRM webhook id #{} is not a record id (1-{MAX_ID_LEN} characters of A-Z a-z 0-9 _ -)",
                        index + 1
                    ),
                });
            }
            records.push(RecordRef {
                module: self.config.module.clone(),
                id: id.to_owned(),
            });
        }
        Ok(if records.is_empty() {
            WebhookEvent::Ignored
        } else {
            WebhookEvent::Changed { records }
        })
    }
}

#[async_trait]
impl CrmConnector for CsvCrm {
    async fn changes(&self, cursor: Option<&Cursor>, limit: usize) -> ConnectorResult<ChangePage> {
        let previous = match cursor {
            Some(cursor) => CursorState::decode(cursor)?,
            None => CursorState::default(),
        };
        let snapshot = self.snapshot().await?;
        Ok(diff(&self.config.module, &previous, snapshot, limit))
    }

    async fn fetch(&self, record: &RecordRef) -> ConnectorResult<Option<CrmRecord>> {
        if record.module != self.config.module {
            return Ok(None);
        }
        let snapshot = self.snapshot().await?;
        let row = snapshot
            .rows
            .into_iter()
            .find(|row| matches!(&row.key, RowKey::Id(id) if *id == record.id));
        match row.map(|row| row.outcome) {
            None => Ok(None),
            Some(Ok(found)) => Ok(Some(found)),
            // Answering `None` would read as "deleted"; the row exists but is unusable.
            Some(Err(invalid)) => Err(ConnectorError::InvalidInput {
                message: format!("{}: {}", invalid.location, invalid.reason),
            }),
        }
    }

    async fn write_back(&self, consent: &ConsentWriteBack) -> ConnectorResult<()> {
        let Some(path) = &self.writeback_path else {
            tracing::debug!(list = %consent.list, state = %consent.state, "CSV CRM has no writeback_path; write-back dropped");
            return Ok(());
        };
        let mut line = serde_json::to_string(consent)
            .map_err(|err| ConnectorError::permanent(format!("cannot encode write-back: {err}")))?;
        line.push('\n');
        let _guard = self.writeback_lock.lock().await;
        fsutil::append(path, line.as_bytes())
            .await
            .map_err(|err| fsutil::transient("cannot append to", path, &err))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WebhookBody {
    ids: Vec<String>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const CSV: &str = "Id,Email,Language,Email_Opt_Out,Newsletter\n\
                       1,ann@example.com,en,false,yes\n\
                       2,bob@example.com,es,true,\n\
                       3, cy@example.com ,,,x\n";

    fn crm(dir: &Path, csv: &str, extra: &str) -> CsvCrm {
        std::fs::write(dir.join("contacts.csv"), csv).unwrap();
        let settings: toml::Table = toml::from_str(&format!(
            "path = \"contacts.csv\"\nasserts = {{ newsletter = \"Newsletter\" }}\n{extra}"
        ))
        .unwrap();
        CsvCrm::from_config(settings, dir).unwrap()
    }

    fn ids(page: &ChangePage) -> Vec<&str> {
        page.records.iter().map(|r| r.record.id.as_str()).collect()
    }

    #[tokio::test]
    async fn first_pass_maps_rows() {
        let dir = tempfile::tempdir().unwrap();
        let crm = crm(dir.path(), CSV, "");
        let page = crm.changes(None, 100).await.unwrap();
        assert_eq!(ids(&page), ["1", "2", "3"]);
        assert!(page.invalid.is_empty() && page.deleted.is_empty() && !page.has_more);

        let ann = &page.records[0];
        assert_eq!(
            ann.record,
            RecordRef {
                module: "Contacts".into(),
                id: "1".into()
            }
        );
        assert_eq!(ann.email.as_deref(), Some("ann@example.com"));
        assert_eq!(ann.language.as_deref(), Some("en"));
        assert!(!ann.opted_out);
        assert_eq!(ann.asserted_lists, ["newsletter"]);
        assert_eq!(ann.fields["Newsletter"], serde_json::json!("yes"));
        assert!(page.records[1].opted_out);
        assert!(page.records[1].asserted_lists.is_empty());
        assert_eq!(page.records[2].email.as_deref(), Some("cy@example.com"));
        assert_eq!(page.records[2].language, None);
        assert_eq!(page.records[2].asserted_lists, ["newsletter"]);
    }

    #[tokio::test]
    async fn incremental_by_row_content() {
        let dir = tempfile::tempdir().unwrap();
        let crm = crm(dir.path(), CSV, "");
        let first = crm.changes(None, 100).await.unwrap();
        let cursor = first.next_cursor.unwrap();

        let again = crm.changes(Some(&cursor), 100).await.unwrap();
        assert!(again.records.is_empty() && again.deleted.is_empty() && again.invalid.is_empty());
        assert_eq!(again.next_cursor.as_ref(), Some(&cursor));

        // Edit row 2, delete row 3.
        std::fs::write(
            dir.path().join("contacts.csv"),
            "Id,Email,Language,Email_Opt_Out,Newsletter\n1,ann@example.com,en,false,yes\n2,bob@example.com,es,false,y\n",
        )
        .unwrap();
        let page = crm.changes(Some(&cursor), 100).await.unwrap();
        assert_eq!(ids(&page), ["2"]);
        assert!(!page.records[0].opted_out);
        assert_eq!(
            page.deleted,
            [RecordRef {
                module: "Contacts".into(),
                id: "3".into()
            }]
        );

        let settled = crm.changes(page.next_cursor.as_ref(), 100).await.unwrap();
        assert!(settled.records.is_empty() && settled.deleted.is_empty());
    }

    #[tokio::test]
    async fn paging_with_limit() {
        let dir = tempfile::tempdir().unwrap();
        let crm = crm(dir.path(), CSV, "");
        let first = crm.changes(None, 2).await.unwrap();
        assert_eq!(ids(&first), ["1", "2"]);
        assert!(first.has_more);
        let second = crm.changes(first.next_cursor.as_ref(), 2).await.unwrap();
        assert_eq!(ids(&second), ["3"]);
        assert!(!second.has_more);
        let third = crm.changes(second.next_cursor.as_ref(), 2).await.unwrap();
        assert!(third.records.is_empty() && !third.has_more);
    }

    #[tokio::test]
    async fn invalid_rows_are_reported_once_and_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let csv = "Id,Email,Language,Email_Opt_Out,Newsletter\n\
                   1,ann@example.com,en,false,yes\n\
                   2,bob@example.com\n\
                   ,nobody@example.com,en,,\n\
                   4,,en,,\n\
                   1,again@example.com,en,,\n\
                   5,eve@example.com,en,,\n";
        let crm = crm(dir.path(), csv, "");
        let page = crm.changes(None, 100).await.unwrap();
        assert_eq!(ids(&page), ["1", "5"]);
        let found: Vec<(&str, &str)> = page
            .invalid
            .iter()
            .map(|i| (i.location.as_str(), i.reason.as_str()))
            .collect();
        assert_eq!(
            found,
            [
                ("contacts.csv:3 (Id=2)", "expected 5 fields, found 2"),
                ("contacts.csv:4", "missing id (column `Id`)"),
                ("contacts.csv:5 (Id=4)", "empty email (column `Email`)"),
                (
                    "contacts.csv:6 (Id=1)",
                    "duplicate id (first used on line 2)"
                ),
            ]
        );

        let again = crm.changes(page.next_cursor.as_ref(), 100).await.unwrap();
        assert!(again.records.is_empty() && again.invalid.is_empty() && again.deleted.is_empty());

        // Fixing an invalid row makes it a normal change.
        std::fs::write(
            dir.path().join("contacts.csv"),
            csv.replace("4,,en", "4,dan@example.com,en"),
        )
        .unwrap();
        let fixed = crm.changes(again.next_cursor.as_ref(), 100).await.unwrap();
        assert_eq!(ids(&fixed), ["4"]);
        assert!(fixed.invalid.is_empty() && fixed.deleted.is_empty());
    }

    #[tokio::test]
    async fn invalid_utf8_and_oversize_rows_are_reported_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let mut csv: Vec<u8> = b"Id,Email,Language,Email_Opt_Out,Newsletter\n".to_vec();
        csv.extend_from_slice(b"1,ann@example.com,en,false,yes\n");
        // Latin-1 export: `\xe9` is not UTF-8, in the address and in another field.
        csv.extend_from_slice(b"2,cl\xe9o@example.org,en,false,yes\n");
        csv.extend_from_slice(b"3,dan@example.org,\xff\xfe,false,yes\n");
        // An invalid id: reported by position, no panic.
        csv.extend_from_slice(b"\xc3\x28,eve@example.org,en,false,yes\n");
        // A 1 MiB field.
        csv.extend_from_slice(
            format!("4,{}@example.org,en,false,yes\n", "x".repeat(1 << 20)).as_bytes(),
        );
        csv.extend_from_slice(b"5,fay@example.org,en,false,yes\n");
        std::fs::write(dir.path().join("contacts.csv"), &csv).unwrap();
        let settings: toml::Table =
            toml::from_str("path = \"contacts.csv\"\nasserts = { newsletter = \"Newsletter\" }")
                .unwrap();
        let crm = CsvCrm::from_config(settings, dir.path()).unwrap();
        let page = crm.changes(None, 100).await.unwrap();
        // The oversize address reaches the engine, whose normalisation refuses it.
        assert_eq!(ids(&page), ["1", "4", "5"]);
        let found: Vec<(&str, &str)> = page
            .invalid
            .iter()
            .map(|i| (i.location.as_str(), i.reason.as_str()))
            .collect();
        assert_eq!(
            found,
            [
                ("contacts.csv:3 (Id=2)", "row is not valid UTF-8"),
                ("contacts.csv:4 (Id=3)", "row is not valid UTF-8"),
                (
                    "contacts.csv:5",
                    "invalid id (column `Id`): must be 1-64 characters of A-Z a-z 0-9 _ -"
                ),
            ]
        );
        let again = crm.changes(page.next_cursor.as_ref(), 100).await.unwrap();
        assert!(again.records.is_empty() && again.invalid.is_empty());
    }

    #[tokio::test]
    async fn missing_required_column_is_config_error() {
        let dir = tempfile::tempdir().unwrap();
        let crm = crm(dir.path(), "Id,Mail,Newsletter\n1,a@example.com,yes\n", "");
        let err = crm.changes(None, 10).await.unwrap_err();
        match &err {
            ConnectorError::Config { setting, message } => {
                assert_eq!(setting, "email_column");
                assert!(message.contains("contacts.csv"), "{message}");
            }
            other => panic!("unexpected {other:?}"),
        }
        let health = crm.health().await.unwrap();
        assert!(!health.ok);
        assert!(health.detail.contains("email_column"), "{}", health.detail);
    }

    #[tokio::test]
    async fn bad_cursor_is_invalid_input() {
        let dir = tempfile::tempdir().unwrap();
        let crm = crm(dir.path(), CSV, "");
        let err = crm
            .changes(Some(&Cursor("not json".into())), 10)
            .await
            .unwrap_err();
        assert!(
            matches!(err, ConnectorError::InvalidInput { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn unknown_setting_is_named() {
        let settings: toml::Table = toml::from_str("pth = \"contacts.csv\"").unwrap();
        let err = CsvCrm::from_config(settings, Path::new("/tmp")).unwrap_err();
        let message = err.to_string();
        assert!(message.contains("unknown field `pth`"), "{message}");
    }

    #[test]
    fn relative_paths_resolve_against_base_dir() {
        let settings: toml::Table =
            toml::from_str("path = \"data/c.csv\"\nwriteback_path = \"/abs/wb.jsonl\"").unwrap();
        let crm = CsvCrm::from_config(settings, Path::new("/etc/optinsync")).unwrap();
        assert_eq!(crm.path(), Path::new("/etc/optinsync/data/c.csv"));
        assert_eq!(
            crm.writeback_path.as_deref(),
            Some(Path::new("/abs/wb.jsonl"))
        );
    }

    #[tokio::test]
    async fn fetch_one_record() {
        let dir = tempfile::tempdir().unwrap();
        let crm = crm(dir.path(), CSV, "");
        let found = crm
            .fetch(&RecordRef {
                module: "Contacts".into(),
                id: "2".into(),
            })
            .await
            .unwrap();
        assert_eq!(found.unwrap().email.as_deref(), Some("bob@example.com"));
        let absent = crm
            .fetch(&RecordRef {
                module: "Contacts".into(),
                id: "9".into(),
            })
            .await
            .unwrap();
        assert!(absent.is_none());
    }

    #[tokio::test]
    async fn webhook_parsing() {
        let dir = tempfile::tempdir().unwrap();
        let crm = crm(dir.path(), CSV, "module = \"Leads\"");
        let event = crm.parse_webhook(&[], br#"{"ids": ["1", "2"]}"#).unwrap();
        assert_eq!(
            event,
            WebhookEvent::Changed {
                records: vec![
                    RecordRef {
                        module: "Leads".into(),
                        id: "1".into()
                    },
                    RecordRef {
                        module: "Leads".into(),
                        id: "2".into()
                    },
                ]
            }
        );
        for bad in [
            &b"nope"[..],
            br#"{"id": "1"}"#,
            br#"{"ids": [1]}"#,
            br#"{"ids": [" "]}"#,
        ] {
            let err = crm.parse_webhook(&[], bad).unwrap_err();
            assert!(
                matches!(err, ConnectorError::InvalidInput { .. }),
                "{err:?}"
            );
        }
    }

    /// Hostile ids of the security review (F6): a forged log line and an address.
    const FORGED: &str =
        "nobody\n2026-12-06T00:00:00.000000Z  INFO optinsync::admin: FORGED log line";
    const ADDRESS_ID: &str = "someone.private@example.com";

    fn assert_not_echoed(message: &str) {
        for leaked in ["FORGED", "someone.private", "victim", "@", "\n"] {
            assert!(!message.contains(leaked), "{leaked:?} echoed: {message}");
        }
    }

    #[tokio::test]
    async fn f6_hostile_webhook_ids_are_refused_without_echoing_them() {
        let dir = tempfile::tempdir().unwrap();
        let crm = crm(dir.path(), CSV, "");
        let long = "a".repeat(65);
        for ids in [
            serde_json::json!([FORGED]),
            serde_json::json!(["1", ADDRESS_ID]),
            serde_json::json!([long]),
            serde_json::json!(["a/b"]),
            serde_json::json!([" "]),
        ] {
            let body = serde_json::json!({ "ids": ids }).to_string();
            match crm.parse_webhook(&[], body.as_bytes()).unwrap_err() {
                ConnectorError::InvalidInput { message } => {
                    assert!(message.contains("is not a record id"), "{message}");
                    assert_not_echoed(&message);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        // serde's own message would quote the value ("invalid type: string \"victim@...\"").
        for body in [
            r#"{"ids":"victim@example.com"}"#,
            r#"{"ids":["1"],"victim@example.com":1}"#,
            "victim@example.com",
        ] {
            match crm.parse_webhook(&[], body.as_bytes()).unwrap_err() {
                ConnectorError::InvalidInput { message } => {
                    assert!(message.contains("at line 1 column"), "{message}");
                    assert_not_echoed(&message);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        // Ids of the allowed alphabet still pass.
        let ok = crm
            .parse_webhook(&[], br#"{"ids": ["zcrm_4150868000000624001", "A-1"]}"#)
            .unwrap();
        assert!(matches!(ok, WebhookEvent::Changed { records: r } if r.len() == 2));
    }

    #[tokio::test]
    async fn f6_hostile_csv_ids_are_reported_by_line_only() {
        let dir = tempfile::tempdir().unwrap();
        let csv = format!(
            "Id,Email,Language,Email_Opt_Out,Newsletter\n\
             1,ann@example.com,en,false,yes\n\
             \"{FORGED}\",forged@example.com,en,false,yes\n\
             {ADDRESS_ID},leak.me@example.com,en,false,yes\n\
             5,eve@example.com,en,false,yes\n"
        );
        let crm = crm(dir.path(), &csv, "");
        let page = crm.changes(None, 100).await.unwrap();
        assert_eq!(ids(&page), ["1", "5"]);
        let found: Vec<&str> = page.invalid.iter().map(|i| i.location.as_str()).collect();
        assert_eq!(found, ["contacts.csv:3", "contacts.csv:5"]);
        for bad in &page.invalid {
            assert!(
                bad.reason.starts_with("invalid id (column `Id`)"),
                "{bad:?}"
            );
            assert_not_echoed(&format!("{} {}", bad.location, bad.reason));
        }
        // Reported once, like any invalid row.
        let again = crm.changes(page.next_cursor.as_ref(), 100).await.unwrap();
        assert!(again.invalid.is_empty() && again.records.is_empty());
    }

    #[tokio::test]
    async fn f6_webhook_secret_is_required_when_configured() {
        let dir = tempfile::tempdir().unwrap();
        let secret = "csv-webhook-secret-0123456789";
        let crm = crm(dir.path(), CSV, &format!("webhook_secret = \"{secret}\""));
        let body = br#"{"ids": ["1"]}"#;
        let header = |v: &str| vec![("X-Webhook-Secret".to_owned(), v.to_owned())];
        for refused in [
            vec![],
            header("wrong"),
            header(&format!("{secret}x")),
            header(&secret[1..]),
        ] {
            match crm.parse_webhook(&refused, body).unwrap_err() {
                ConnectorError::InvalidInput { message } => {
                    assert!(message.contains("x-webhook-secret"), "{message}");
                    assert!(!message.contains(secret), "{message}");
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(matches!(
            crm.parse_webhook(&header(secret), body).unwrap(),
            WebhookEvent::Changed { .. }
        ));
        // Never printed, and too short a secret is refused.
        assert!(!format!("{:?}", crm.config()).contains(secret));
        let settings: toml::Table =
            toml::from_str("path = \"contacts.csv\"\nwebhook_secret = \"short\"").unwrap();
        let err = CsvCrm::from_config(settings, dir.path()).unwrap_err();
        assert!(err.to_string().contains("webhook_secret"), "{err}");
        // Without the setting, no header is needed.
        let open = super::tests::crm(dir.path(), CSV, "");
        assert!(open.parse_webhook(&[], body).is_ok());
    }

    #[tokio::test]
    async fn write_back_appends_jsonl_and_leaves_csv_alone() {
        let dir = tempfile::tempdir().unwrap();
        let crm = crm(dir.path(), CSV, "writeback_path = \"out/writeback.jsonl\"");
        let wb = ConsentWriteBack {
            key: "outbox-7".into(),
            records: vec![RecordRef {
                module: "Contacts".into(),
                id: "1".into(),
            }],
            email: "ann@example.com".into(),
            list: "newsletter".into(),
            state: optinsync_plugin_api::ConsentState::Confirmed,
            opt_out: false,
            at: chrono::Utc::now(),
            ledger_seq: 7,
        };
        crm.write_back(&wb).await.unwrap();
        crm.write_back(&wb).await.unwrap();
        let written = std::fs::read_to_string(dir.path().join("out/writeback.jsonl")).unwrap();
        let lines: Vec<ConsentWriteBack> = written
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines, [wb.clone(), wb]);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("contacts.csv")).unwrap(),
            CSV
        );
        assert!(crm.health().await.unwrap().ok);
    }

    #[tokio::test]
    async fn spreadsheet_export_with_bom_and_crlf() {
        let dir = tempfile::tempdir().unwrap();
        let csv = "\u{feff}Id,Email,Newsletter\r\n7,ann@example.com,TRUE\r\n8,\"Bob, Jr.\" <b@example.com>,no\r\n";
        let crm = crm(dir.path(), csv, "");
        let page = crm.changes(None, 10).await.unwrap();
        assert_eq!(ids(&page), ["7", "8"]);
        assert_eq!(page.records[0].asserted_lists, ["newsletter"]);
        assert!(page.records[1].asserted_lists.is_empty());
        assert_eq!(
            page.records[1].email.as_deref(),
            Some("Bob, Jr. <b@example.com>")
        );
    }

    #[test]
    fn config_error_names_the_key() {
        let settings: toml::Table = toml::from_str("pth = \"contacts.csv\"").unwrap();
        let err = CsvCrm::from_config(settings, Path::new("/tmp")).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("pth"), "{err}");
        assert!(
            err.to_string()
                .contains("unknown field `pth`, expected one of `path`"),
            "{err}"
        );
        let settings: toml::Table = toml::from_str("path = \"\"").unwrap();
        let err = CsvCrm::from_config(settings, Path::new("/tmp")).unwrap_err();
        assert_eq!(err.to_string(), "setting `path`: must not be empty");
    }
}
