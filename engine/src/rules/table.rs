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
//!
//! [[test]]
//! name = "the reason is checked too where given"
//! consent = { state = "pending", age = "15d" }
//! expect = [{ action = "remove", reason = "no confirmation within the pending expiry window" }]
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
    expect: Vec<RawExpect>,
}

/// An entry of `expect`: an action name, or an action with the exact reason it must give.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawExpect {
    Action(String),
    WithReason(ActionWithReason),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionWithReason {
    action: String,
    reason: String,
}

/// One expected action; with a reason, the rules must give exactly that reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    pub action: String,
    pub reason: Option<String>,
}

impl Expected {
    fn matches(&self, got: &super::Proposal) -> bool {
        self.action == got.action.as_str() && self.reason.as_ref().is_none_or(|r| *r == got.reason)
    }
}

impl std::fmt::Display for Expected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.reason {
            Some(r) => write!(f, "{} ({r:?})", self.action),
            None => f.write_str(&self.action),
        }
    }
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
    pub expect: Vec<Expected>,
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
        let expect: Vec<Expected> = raw
            .expect
            .into_iter()
            .map(|e| match e {
                RawExpect::Action(action) => Expected {
                    action,
                    reason: None,
                },
                RawExpect::WithReason(a) => Expected {
                    action: a.action,
                    reason: Some(a.reason),
                },
            })
            .collect();
        for e in &expect {
            if super::Action::parse(&e.action).is_none() {
                return Err(bad(format!("unknown action `{}` in expect", e.action)));
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
            expect,
        });
    }
    Ok(out)
}

/// Run every test of the set against the set.
pub fn run(set: &RuleSet) -> TestReport {
    let mut report = TestReport::default();
    for t in set.tests() {
        let got = set.decide(&t.contact, &t.consent, &t.ctx);
        let passed = got.as_ref().is_ok_and(|ps| {
            ps.len() == t.expect.len() && t.expect.iter().zip(ps).all(|(e, p)| e.matches(p))
        });
        if passed {
            report.passed += 1;
            continue;
        }
        // Reasons are shown when the test names any, so the failure shows what differs.
        let with_reasons = t.expect.iter().any(|e| e.reason.is_some());
        let got = got
            .map(|ps| {
                ps.iter()
                    .map(|p| {
                        Expected {
                            action: p.action.as_str().to_owned(),
                            reason: with_reasons.then(|| p.reason.clone()),
                        }
                        .to_string()
                    })
                    .collect::<Vec<_>>()
            })
            .map_err(|e| e.to_string());
        report.failures.push(TestFailure {
            file: t.file.clone(),
            line: t.line,
            name: t.name.clone(),
            expected: t.expect.iter().map(ToString::to_string).collect(),
            got,
        });
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
    fn expect_may_give_reasons_too() {
        let (_d, set) = set_with(
            RULE,
            "[[test]]\nname = \"a\"\nconsent = { state = \"asserted\" }\nexpect = [{ action = \"send_doi\", reason = \"r\" }]\n\n\
             [[test]]\nname = \"old form\"\nconsent = { state = \"asserted\" }\nexpect = [\"send_doi\"]\n",
        );
        assert_eq!(set.expect("passes").run_tests().passed, 2);
        // The same action with another reason fails, and the failure shows both reasons.
        let (_d, set) = set_with(
            RULE,
            "[[test]]\nname = \"why\"\nconsent = { state = \"asserted\" }\nexpect = [{ action = \"send_doi\", reason = \"asked\" }]\n",
        );
        let msg = set.expect_err("wrong reason").to_string();
        assert!(
            msg.contains(r#"r.tests.toml:2: why: expected ["send_doi (\"asked\")"], got ["send_doi (\"r\")"]"#),
            "{msg}"
        );
        // A misspelt field or action in the long form is refused like any other test error.
        for (entry, want) in [
            ("{ action = \"send_doi\", reasn = \"r\" }", "r.tests.toml:"),
            (
                "{ action = \"sendd_doi\", reason = \"r\" }",
                "unknown action `sendd_doi` in expect",
            ),
        ] {
            let (_d, set) = set_with(
                RULE,
                &format!(
                    "[[test]]\nname = \"x\"\nconsent = {{ state = \"asserted\" }}\nexpect = [{entry}]\n"
                ),
            );
            let msg = set.expect_err(entry).to_string();
            assert!(msg.contains(want), "{entry}: {msg}");
        }
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
