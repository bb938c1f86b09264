//! Table tests for rule sets: `*.tests.toml` files beside the scripts. Each `[[test]]` gives a
//! contact, its consent and list settings, and the actions the rules must return. They run in
//! `optinsync rules test`, at start-up and on every reload — a set that fails them is never used.
//!
//! ```toml
//! [list]                       # list settings for every test in this file (optional)
//! reminder_after = "3d"
//!
//! [[test]]
//! name = "a pending signup gets one reminder after the delay"
//! consent = { state = "pending", age = "4d", reminders_sent = 0 }
//! expect = ["send_reminder"]
//! ```

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use rhai::Map;
use serde::Deserialize;

use super::{RuleSet, RulesError, input};
use crate::config::{HumanDuration, ListConfig};
use crate::consent::{Consent, ConsentState};
use crate::store::Contact;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TestFile {
    #[serde(default)]
    list: toml::Table,
    #[serde(default, rename = "test")]
    tests: Vec<RawTest>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTest {
    name: toml::Spanned<String>,
    #[serde(default)]
    contact: RawContact,
    consent: RawConsent,
    #[serde(default)]
    list: toml::Table,
    expect: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawContact {
    language: Option<String>,
    #[serde(default = "default_domain")]
    email_domain: String,
    #[serde(default)]
    fields: std::collections::BTreeMap<String, serde_json::Value>,
}

fn default_domain() -> String {
    "example.org".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConsent {
    state: String,
    /// Time in the current state.
    age: Option<HumanDuration>,
    #[serde(default)]
    reminders_sent: u32,
    #[serde(default)]
    doi_mails: u32,
    confirmed_age: Option<HumanDuration>,
    engagement_age: Option<HumanDuration>,
}

/// One table test, with its maps already built.
#[derive(Debug, Clone)]
pub struct TableTest {
    pub file: PathBuf,
    pub line: usize,
    pub name: String,
    pub contact: Map,
    pub consent: Map,
    pub ctx: Map,
    pub expect: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TestFailure {
    pub file: PathBuf,
    pub line: usize,
    pub name: String,
    pub expected: Vec<String>,
    /// What the rules returned, or the error they raised.
    pub got: Result<Vec<String>, String>,
}

impl std::fmt::Display for TestFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let got = match &self.got {
            Ok(actions) => format!("{actions:?}"),
            Err(e) => format!("error: {e}"),
        };
        write!(
            f,
            "{}:{}: {}: expected {:?}, got {got}",
            self.file.display(),
            self.line,
            self.name,
            self.expected
        )
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct TestReport {
    pub passed: usize,
    pub failures: Vec<TestFailure>,
}

fn line_col(source: &str, offset: usize) -> (usize, usize) {
    let before = &source[..offset.min(source.len())];
    (
        before.matches('\n').count() + 1,
        before
            .rsplit('\n')
            .next()
            .map(|l| l.chars().count() + 1)
            .unwrap_or(1),
    )
}

fn list_from(defaults: &toml::Table, overrides: &toml::Table) -> Result<ListConfig, String> {
    let mut t = toml::Table::new();
    t.insert("id".into(), "test".into());
    t.insert("name".into(), "Test list".into());
    t.extend(defaults.clone());
    t.extend(overrides.clone());
    toml::Value::Table(t)
        .try_into::<ListConfig>()
        .map_err(|e| e.to_string())
}

/// Read one test file.
pub fn load(path: &Path) -> Result<Vec<TableTest>, RulesError> {
    let source = std::fs::read_to_string(path).map_err(|source| RulesError::Read {
        path: path.to_owned(),
        source,
    })?;
    let file: TestFile = toml::from_str(&source).map_err(|e| {
        let (line, column) = e
            .span()
            .map(|s| line_col(&source, s.start))
            .unwrap_or((0, 0));
        RulesError::TestFile {
            path: path.to_owned(),
            line,
            column,
            message: e.message().trim().to_owned(),
        }
    })?;
    // A fixed clock: tests describe ages, not dates.
    let now: DateTime<Utc> = DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default();
    let mut out = Vec::with_capacity(file.tests.len());
    for raw in file.tests {
        let (line, column) = line_col(&source, raw.name.span().start);
        let bad = |message: String| RulesError::TestFile {
            path: path.to_owned(),
            line,
            column,
            message,
        };
        let list =
            list_from(&file.list, &raw.list).map_err(|e| bad(format!("list settings: {e}")))?;
        let state: ConsentState = raw
            .consent
            .state
            .parse()
            .map_err(|e: crate::consent::UnknownState| bad(e.to_string()))?;
        for a in &raw.expect {
            if super::Action::parse(a).is_none() {
                return Err(bad(format!("unknown action `{a}` in expect")));
            }
        }
        let ago = |d: Option<HumanDuration>| d.map(|d| now - chrono::Duration::seconds(d.secs()));
        let consent = Consent {
            state,
            since: ago(raw.consent.age).unwrap_or(now),
            signup_token: None,
            doi_mails: raw.consent.doi_mails,
            reminders_sent: raw.consent.reminders_sent,
            confirmed_at: ago(raw.consent.confirmed_age),
            confirmed_token: None,
            last_seq: None,
        };
        let contact = Contact {
            id: "table-test-contact".into(),
            email: format!("person@{}", raw.contact.email_domain),
            erased: false,
            language: raw.contact.language,
            fields: raw.contact.fields,
            crm_records: vec![],
            created_at: now,
            updated_at: now,
        };
        out.push(TableTest {
            file: path.to_owned(),
            line,
            name: raw.name.into_inner(),
            contact: input::contact_map(&contact),
            consent: input::consent_map(&consent, ago(raw.consent.engagement_age), now),
            ctx: input::ctx_map(&list, now),
            expect: raw.expect,
        });
    }
    Ok(out)
}

/// Run every test of the set against the set.
pub fn run(set: &RuleSet) -> TestReport {
    let mut report = TestReport::default();
    for t in set.tests() {
        let got = set
            .decide(&t.contact, &t.consent, &t.ctx)
            .map(|ps| {
                ps.iter()
                    .map(|p| p.action.as_str().to_owned())
                    .collect::<Vec<_>>()
            })
            .map_err(|e| e.to_string());
        if got.as_ref() == Ok(&t.expect) {
            report.passed += 1;
        } else {
            report.failures.push(TestFailure {
                file: t.file.clone(),
                line: t.line,
                name: t.name.clone(),
                expected: t.expect.clone(),
                got,
            });
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set_with(rule: &str, tests: &str) -> (tempfile::TempDir, Result<RuleSet, RulesError>) {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("r.rhai"), rule).expect("write");
        std::fs::write(dir.path().join("r.tests.toml"), tests).expect("write");
        let set = RuleSet::load_checked(dir.path());
        (dir, set)
    }

    const RULE: &str = r#"fn decide(c, k, x) { if k.state == "asserted" { #{ action: "send_doi", reason: "r" } } }"#;

    /// Regression (fuzzing): an age too large for a date panicked instead of being refused.
    #[test]
    fn absurd_ages_are_refused_not_a_panic() {
        for age in ["99999999999999999w", "9223372036854775807s", "5000000d"] {
            let (_d, set) = set_with(
                RULE,
                &format!(
                    "[[test]]\nname = \"a\"\nconsent = {{ state = \"pending\", age = \"{age}\" }}\nexpect = []\n"
                ),
            );
            let err = set.expect_err("refused").to_string();
            assert!(err.contains("1000 years"), "{err}");
        }
    }

    #[test]
    fn passing_tests_accept_the_set() {
        let (_d, set) = set_with(
            RULE,
            "[[test]]\nname = \"a\"\nconsent = { state = \"asserted\" }\nexpect = [\"send_doi\"]\n",
        );
        assert_eq!(set.expect("passes").run_tests().passed, 1);
    }

    #[test]
    fn failing_test_refuses_the_set_and_names_file_and_line() {
        let (_d, set) = set_with(
            RULE,
            "\n\n[[test]]\nname = \"none gets nothing\"\nconsent = { state = \"none\" }\nexpect = [\"send_doi\"]\n",
        );
        let err = set.expect_err("fails");
        let msg = err.to_string();
        assert!(
            matches!(err, RulesError::TestsFailed(ref f) if f.len() == 1 && f[0].line == 4),
            "{msg}"
        );
        assert!(msg.contains("r.tests.toml:4: none gets nothing"), "{msg}");
    }

    #[test]
    fn malformed_test_file_names_line() {
        let (_d, set) = set_with(
            RULE,
            "[[test]]\nname = \"x\"\nconsent = { state = \"asserted\" }\nexpected = []\n",
        );
        let msg = set.expect_err("bad").to_string();
        assert!(
            msg.contains("r.tests.toml:") && msg.contains("expected"),
            "{msg}"
        );
        let (_d, set) = set_with(
            RULE,
            "[[test]]\nname = \"x\"\nconsent = { state = \"maybe\" }\nexpect = []\n",
        );
        assert!(
            set.expect_err("bad state")
                .to_string()
                .contains("unknown consent state `maybe`")
        );
    }
}
