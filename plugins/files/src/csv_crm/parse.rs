//! Reading the CSV: the header row located, and every row turned into a record or a reason.

use std::collections::HashMap;
use std::path::Path;

use optinsync_plugin_api::{ConnectorError, ConnectorResult, CrmRecord, InvalidRecord, RecordRef};
use sha2::{Digest, Sha256};

use super::{CsvCrmConfig, MAX_ID_LEN, is_valid_id};
use crate::fsutil;

/// The whole file, parsed.
#[derive(Debug)]
pub(super) struct Snapshot {
    pub(super) rows: Vec<ParsedRow>,
    /// Optional columns (language, opt-out) the file does not have.
    pub(super) missing_optional: Vec<String>,
}

#[derive(Debug)]
pub(super) struct ParsedRow {
    pub(super) key: RowKey,
    pub(super) hash: String,
    pub(super) outcome: Result<CrmRecord, InvalidRecord>,
}

#[derive(Debug, PartialEq, Eq)]
pub(super) enum RowKey {
    /// The first row carrying this id.
    Id(String),
    /// No usable id (missing, or a duplicate of an earlier row's id).
    Unkeyed,
}

pub(super) fn read_snapshot(path: &Path, config: &CsvCrmConfig) -> ConnectorResult<Snapshot> {
    let bytes = std::fs::read(path).map_err(|err| match err.kind() {
        std::io::ErrorKind::NotFound => ConnectorError::Config {
            setting: "path".to_owned(),
            message: format!("CSV file {} does not exist", path.display()),
        },
        _ => fsutil::transient("cannot read", path, &err),
    })?;
    parse_snapshot(&bytes, &fsutil::file_name(path), config)
}

pub(super) fn parse_snapshot(
    bytes: &[u8],
    file: &str,
    config: &CsvCrmConfig,
) -> ConnectorResult<Snapshot> {
    // Flexible, so a row with the wrong field count is still read and reported with its id
    // instead of surfacing as an anonymous parse error.
    // Spreadsheet exports often start with a UTF-8 byte-order mark, which would otherwise
    // become part of the first column name and hide the id column.
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let mut reader = csv::ReaderBuilder::new().flexible(true).from_reader(bytes);
    let headers: Vec<String> = reader
        .byte_headers()
        .map_err(|err| ConnectorError::Config {
            setting: "path".to_owned(),
            message: format!("{file}: cannot read the header row: {err}"),
        })?
        .iter()
        .map(|h| String::from_utf8_lossy(h).trim().to_owned())
        .collect();
    let layout = Layout::locate(&headers, config, file)?;
    let mut parser = RowParser {
        layout: &layout,
        config,
        file,
        first_line: HashMap::new(),
    };
    let mut rows = Vec::new();
    for (index, result) in reader.byte_records().enumerate() {
        rows.push(match result {
            Ok(record) => parser.parse(&record),
            Err(err) => unreadable_row(file, index, &err),
        });
    }
    Ok(Snapshot {
        rows,
        missing_optional: layout.missing_optional,
    })
}

/// A row the CSV reader itself rejected. Only I/O-level failures get here (fields are read
/// as bytes, rows may have any length), so key it by position and message.
fn unreadable_row(file: &str, index: usize, err: &csv::Error) -> ParsedRow {
    let line = err.position().map_or(index as u64 + 2, csv::Position::line);
    let reason = format!("unreadable CSV row: {err}");
    ParsedRow {
        key: RowKey::Unkeyed,
        hash: hash_parts(&[line.to_string().as_bytes(), reason.as_bytes()]),
        outcome: Err(InvalidRecord {
            location: format!("{file}:{line}"),
            reason,
        }),
    }
}

/// Column positions resolved from the header row.
#[derive(Debug)]
struct Layout {
    headers: Vec<String>,
    id: usize,
    email: usize,
    language: Option<usize>,
    opt_out: Option<usize>,
    asserts: Vec<(String, usize)>,
    missing_optional: Vec<String>,
    /// Hash of the header row and the column mapping: part of every row hash, so changing
    /// the mapping makes every row count as changed and the engine sees the new meaning.
    fingerprint: String,
}

impl Layout {
    fn locate(headers: &[String], config: &CsvCrmConfig, file: &str) -> ConnectorResult<Self> {
        let find = |column: &str| headers.iter().position(|h| h == column);
        let require = |setting: &str, column: &str| {
            find(column).ok_or_else(|| ConnectorError::Config {
                setting: setting.to_owned(),
                message: format!(
                    "column `{column}` not found in {file} (columns: {})",
                    headers.join(", ")
                ),
            })
        };
        let id = require("id_column", &config.id_column)?;
        let email = require("email_column", &config.email_column)?;
        let asserts = config
            .asserts
            .iter()
            .map(|(list, column)| Ok((list.clone(), require(&format!("asserts.{list}"), column)?)))
            .collect::<ConnectorResult<Vec<_>>>()?;
        let language = find(&config.language_column);
        let opt_out = find(&config.opt_out_column);
        let missing_optional = [
            (language, &config.language_column),
            (opt_out, &config.opt_out_column),
        ]
        .into_iter()
        .filter(|(index, _)| index.is_none())
        .map(|(_, column)| column.clone())
        .collect();
        let mapping = serde_json::to_vec(&(config, headers)).unwrap_or_default();
        Ok(Self {
            headers: headers.to_vec(),
            id,
            email,
            language,
            opt_out,
            asserts,
            missing_optional,
            fingerprint: hash_parts(&[&mapping]),
        })
    }
}

/// Turns rows into records, remembering ids already seen to catch duplicates.
struct RowParser<'a> {
    layout: &'a Layout,
    config: &'a CsvCrmConfig,
    file: &'a str,
    first_line: HashMap<String, u64>,
}

impl RowParser<'_> {
    fn parse(&mut self, record: &csv::ByteRecord) -> ParsedRow {
        let line = record.position().map_or(0, csv::Position::line);
        let mut parts: Vec<&[u8]> = vec![self.layout.fingerprint.as_bytes()];
        parts.extend(record.iter());
        let hash = hash_parts(&parts);

        let id = record
            .get(self.layout.id)
            .map(|raw| String::from_utf8_lossy(raw).trim().to_owned());
        let id = id.filter(|id| !id.is_empty());
        // An id that is not one (a forged log line, an address) is never echoed: the row is
        // reported by file and line only, and recognised by content like a row without id.
        let bad_id = id.as_deref().is_some_and(|id| !is_valid_id(id));
        let id = id.filter(|_| !bad_id);
        let location = match &id {
            Some(id) => format!("{}:{line} (Id={id})", self.file),
            None => format!("{}:{line}", self.file),
        };
        if bad_id {
            return ParsedRow {
                key: RowKey::Unkeyed,
                hash,
                outcome: Err(InvalidRecord {
                    location,
                    reason: format!(
                        "invalid id (column `{}`): must be 1-{MAX_ID_LEN} characters of A-Z a-z 0-9 _ -",
                        self.config.id_column
                    ),
                }),
            };
        }
        let (key, duplicate_of) = match &id {
            None => (RowKey::Unkeyed, None),
            Some(id) => match self.first_line.get(id) {
                Some(first) => (RowKey::Unkeyed, Some(*first)),
                None => {
                    self.first_line.insert(id.clone(), line);
                    (RowKey::Id(id.clone()), None)
                }
            },
        };
        let outcome = self
            .check(record, id.as_deref(), duplicate_of)
            .map(|(id, fields)| self.to_record(id, fields))
            .map_err(|reason| InvalidRecord { location, reason });
        ParsedRow { key, hash, outcome }
    }

    /// Why a row cannot be used, or its id and decoded fields.
    fn check(
        &self,
        record: &csv::ByteRecord,
        id: Option<&str>,
        duplicate_of: Option<u64>,
    ) -> Result<(String, Vec<String>), String> {
        let expected = self.layout.headers.len();
        if record.len() != expected {
            return Err(format!(
                "expected {expected} fields, found {}",
                record.len()
            ));
        }
        let fields = record
            .iter()
            .map(|raw| String::from_utf8(raw.to_vec()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| "row is not valid UTF-8".to_owned())?;
        let id = id.ok_or_else(|| format!("missing id (column `{}`)", self.config.id_column))?;
        if let Some(first) = duplicate_of {
            return Err(format!("duplicate id (first used on line {first})"));
        }
        if fields[self.layout.email].trim().is_empty() {
            return Err(format!(
                "empty email (column `{}`)",
                self.config.email_column
            ));
        }
        Ok((id.to_owned(), fields))
    }

    fn to_record(&self, id: String, fields: Vec<String>) -> CrmRecord {
        let layout = self.layout;
        let cell = |index: Option<usize>| index.map(|i| fields[i].trim()).filter(|v| !v.is_empty());
        let asserted_lists = layout
            .asserts
            .iter()
            .filter(|(_, column)| is_truthy(&fields[*column]))
            .map(|(list, _)| list.clone())
            .collect();
        CrmRecord {
            record: RecordRef {
                module: self.config.module.clone(),
                id,
            },
            email: cell(Some(layout.email)).map(str::to_owned),
            language: cell(layout.language).map(str::to_owned),
            opted_out: layout.opt_out.is_some_and(|i| is_truthy(&fields[i])),
            asserted_lists,
            fields: layout
                .headers
                .iter()
                .zip(&fields)
                .map(|(name, value)| (name.clone(), serde_json::Value::String(value.clone())))
                .collect(),
            modified_at: None,
        }
    }
}

/// CSV exports spell booleans many ways; an unknown spelling counts as false.
fn is_truthy(value: &str) -> bool {
    let value = value.trim();
    ["true", "yes", "y", "1", "x"]
        .iter()
        .any(|t| value.eq_ignore_ascii_case(t))
}

/// SHA-256 over length-prefixed parts, so `["ab","c"]` and `["a","bc"]` hash differently.
fn hash_parts(parts: &[&[u8]]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    hex::encode(hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truthy_values() {
        for yes in ["true", "TRUE", "Yes", "y", "1", "x", " X "] {
            assert!(is_truthy(yes), "{yes}");
        }
        for no in ["", "false", "0", "no", "n", "maybe"] {
            assert!(!is_truthy(no), "{no}");
        }
    }
}
