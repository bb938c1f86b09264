//! The Rhai rules host.
//!
//! A **rule set** is a directory: every `*.rhai` file defines `fn decide(contact, consent, ctx)`
//! and every `*.tests.toml` file holds table tests for the whole set. Scripts are compiled once
//! in a sandboxed engine and called per contact — plain maps in, an action map (or an array of
//! them, or nothing) out. Each action carries a `reason`, stored in the ledger with the file and
//! content hash of the script that proposed it.
//!
//! A rule set is only ever used after it compiled **and** passed its tests
//! ([`RuleSet::load_checked`]); reload builds a new set and swaps it in whole.
//!
//! Rules only *propose*. The consent state machine decides whether a proposal is legal.

pub mod input;
pub mod simulate;
pub mod table;

use std::path::{Path, PathBuf};

use crate::consent::Input;
use rhai::packages::Package as _;
use rhai::{AST, Dynamic, Engine, Map};
use serde::Serialize;
use sha2::{Digest, Sha256};

pub use table::{TableTest, TestFailure, TestReport};

/// Actions a rule may propose (docs/writing-rules.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    SendDoi,
    SendReminder,
    SendRevalidation,
    Subscribe,
    Remove,
    Suppress,
    WriteBack,
    None,
}

impl Action {
    pub const ALL: [Action; 8] = [
        Self::SendDoi,
        Self::SendReminder,
        Self::SendRevalidation,
        Self::Subscribe,
        Self::Remove,
        Self::Suppress,
        Self::WriteBack,
        Self::None,
    ];

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::SendDoi => "send_doi",
            Self::SendReminder => "send_reminder",
            Self::SendRevalidation => "send_revalidation",
            Self::Subscribe => "subscribe",
            Self::Remove => "remove",
            Self::Suppress => "suppress",
            Self::WriteBack => "write_back",
            Self::None => "none",
        }
    }
}

/// One proposed action and which script proposed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Proposal {
    pub action: Action,
    pub reason: String,
    pub rule_file: String,
    pub rule_hash: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("cannot read rules from {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: no rule scripts (*.rhai) found")]
    Empty { path: PathBuf },
    #[error("{path}:{line}:{column}: {message}")]
    Compile {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}: the script must define `fn decide(contact, consent, ctx)`")]
    NoDecide { path: PathBuf },
    #[error("{path}:{line}:{column}: rule failed: {message}")]
    Runtime {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}: rule returned {message}")]
    BadResult { path: PathBuf, message: String },
    #[error("{path}:{line}:{column}: invalid rule test file: {message}")]
    TestFile {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{} rule test(s) failed:\n{}", .0.len(), .0.iter().map(|f| format!("  {f}")).collect::<Vec<_>>().join("\n"))]
    TestsFailed(Vec<TestFailure>),
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Several(Vec<RulesError>),
}

/// Limits set explicitly so debug and release builds behave the same (Rhai's defaults differ).
pub const MAX_OPERATIONS: u64 = 200_000;

fn sandboxed_engine() -> Engine {
    let mut engine = Engine::new_raw();
    engine.register_global_module(rhai::packages::StandardPackage::new().as_shared_module());
    engine.set_max_operations(MAX_OPERATIONS);
    engine.set_max_call_levels(32);
    engine.set_max_expr_depths(64, 32);
    engine.set_max_string_size(64 * 1024);
    engine.set_max_array_size(10_000);
    engine.set_max_map_size(10_000);
    engine.set_max_variables(1_000);
    engine.set_max_functions(1_000);
    engine.set_max_modules(0);
    engine.disable_symbol("eval");
    engine.on_print(|s| tracing::info!(target: "optinsync::rules", "{s}"));
    engine.on_debug(|s, src, pos| {
        tracing::debug!(target: "optinsync::rules", source = src.unwrap_or(""), line = pos.line().unwrap_or(0), "{s}")
    });
    engine
}

/// One compiled script.
struct Script {
    ast: AST,
    path: PathBuf,
    /// `path` as text, made once: every proposal carries it.
    file: String,
    hash: String,
}

/// A compiled rule set, immutable once built.
pub struct RuleSet {
    engine: Engine,
    dir: PathBuf,
    scripts: Vec<Script>,
    tests: Vec<TableTest>,
    hash: String,
}

impl std::fmt::Debug for RuleSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuleSet")
            .field("dir", &self.dir)
            .field(
                "scripts",
                &self.scripts.iter().map(|s| &s.path).collect::<Vec<_>>(),
            )
            .field("hash", &self.hash)
            .finish_non_exhaustive()
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Files in `dir` ending in `suffix`, sorted by name; editor temp files are skipped.
pub(crate) fn files_with_suffix(dir: &Path, suffix: &str) -> Result<Vec<PathBuf>, RulesError> {
    let read_err = |source| RulesError::Read {
        path: dir.to_owned(),
        source,
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(read_err)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.ends_with(suffix)
                && !name.starts_with('.')
                && !name.starts_with('#')
                && p.is_file()
        })
        .collect();
    files.sort();
    Ok(files)
}

impl RuleSet {
    /// Compile every script in `dir` and read its table tests (tests are not run).
    pub fn load_dir(dir: &Path) -> Result<Self, RulesError> {
        let mut errors = Vec::new();
        let mut sources = Vec::new();
        for path in files_with_suffix(dir, ".rhai")? {
            match std::fs::read_to_string(&path) {
                Ok(src) => sources.push((path, src)),
                Err(source) => errors.push(RulesError::Read { path, source }),
            }
        }
        if sources.is_empty() && errors.is_empty() {
            return Err(RulesError::Empty {
                path: dir.to_owned(),
            });
        }
        let mut tests = Vec::new();
        for path in files_with_suffix(dir, ".tests.toml")? {
            match table::load(&path) {
                Ok(t) => tests.extend(t),
                Err(e) => errors.push(e),
            }
        }
        let set = Self::compile_sources(dir, &sources, tests);
        match set {
            Ok(set) if errors.is_empty() => Ok(set),
            Ok(_) => Err(several(errors)),
            Err(e) => {
                errors.insert(0, e);
                Err(several(errors))
            }
        }
    }

    /// Compile and run the table tests: the only way the daemon accepts a rule set.
    pub fn load_checked(dir: &Path) -> Result<Self, RulesError> {
        let set = Self::load_dir(dir)?;
        let report = set.run_tests();
        if report.failures.is_empty() {
            Ok(set)
        } else {
            Err(RulesError::TestsFailed(report.failures))
        }
    }

    /// Build a set from in-memory sources (tests and tools).
    pub fn compile_sources(
        dir: &Path,
        sources: &[(PathBuf, String)],
        tests: Vec<TableTest>,
    ) -> Result<Self, RulesError> {
        let engine = sandboxed_engine();
        let mut errors = Vec::new();
        let mut scripts = Vec::new();
        for (path, source) in sources {
            match engine.compile(source) {
                Ok(ast) => {
                    if ast
                        .iter_functions()
                        .any(|f| f.name == "decide" && f.params.len() == 3)
                    {
                        scripts.push(Script {
                            ast,
                            path: path.clone(),
                            file: path.display().to_string(),
                            hash: sha256_hex(source.as_bytes()),
                        });
                    } else {
                        errors.push(RulesError::NoDecide { path: path.clone() });
                    }
                }
                Err(e) => errors.push(RulesError::Compile {
                    path: path.clone(),
                    line: e.1.line().unwrap_or(0),
                    column: e.1.position().unwrap_or(0),
                    message: e.0.to_string(),
                }),
            }
        }
        if !errors.is_empty() {
            return Err(several(errors));
        }
        let mut h = Sha256::new();
        for s in &scripts {
            h.update(
                s.path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or("")
                    .as_bytes(),
            );
            h.update([0]);
            h.update(s.hash.as_bytes());
        }
        Ok(Self {
            engine,
            dir: dir.to_owned(),
            scripts,
            tests,
            hash: hex::encode(h.finalize()),
        })
    }

    /// Hash over every script's name and content: names the policy version as a whole.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `(file, sha256)` of each script.
    pub fn scripts(&self) -> Vec<(PathBuf, String)> {
        self.scripts
            .iter()
            .map(|s| (s.path.clone(), s.hash.clone()))
            .collect()
    }

    pub fn tests(&self) -> &[TableTest] {
        &self.tests
    }

    pub fn run_tests(&self) -> TestReport {
        table::run(self)
    }

    /// Call every script's `decide`, in file-name order. A script error fails this one
    /// decision (the caller leaves the contact unchanged).
    pub fn decide(
        &self,
        contact: &Map,
        consent: &Map,
        ctx: &Map,
    ) -> Result<Vec<Proposal>, RulesError> {
        self.decide_owned(contact.clone(), consent.clone(), ctx.clone())
    }

    /// [`decide`](Self::decide) on maps the caller gives up: the fast path for passes over
    /// many contacts (build the maps with [`input`], the `ctx` from an [`input::ListCtx`]).
    /// Only a set of several scripts copies them, once per script but the last.
    pub fn decide_owned(
        &self,
        contact: Map,
        consent: Map,
        ctx: Map,
    ) -> Result<Vec<Proposal>, RulesError> {
        let mut all = Vec::new();
        let mut args = Some((contact, consent, ctx));
        let last = self.scripts.len().saturating_sub(1);
        for (i, script) in self.scripts.iter().enumerate() {
            let (contact, consent, ctx) =
                if i == last { args.take() } else { args.clone() }.unwrap_or_default();
            all.extend(self.call_decide(script, contact, consent, ctx)?);
        }
        Ok(all)
    }

    fn call_decide(
        &self,
        script: &Script,
        contact: Map,
        consent: Map,
        ctx: Map,
    ) -> Result<Vec<Proposal>, RulesError> {
        let mut scope = rhai::Scope::new();
        // Only `decide` runs, never the script's top level; the scope is rewound so nothing
        // a call declares survives into the next one.
        let options = rhai::CallFnOptions::new()
            .eval_ast(false)
            .rewind_scope(true);
        // `Dynamic::from_map` wraps the map as it is; passing a `Map` would make Rhai rebuild
        // it entry by entry (the largest single cost in the profile).
        let out: Dynamic = self
            .engine
            .call_fn_with_options(
                options,
                &mut scope,
                &script.ast,
                "decide",
                (
                    Dynamic::from_map(contact),
                    Dynamic::from_map(consent),
                    Dynamic::from_map(ctx),
                ),
            )
            .map_err(|e| RulesError::Runtime {
                path: script.path.clone(),
                line: e.position().line().unwrap_or(0),
                column: e.position().position().unwrap_or(0),
                message: e.to_string(),
            })?;
        proposals(script, out)
    }
}

fn several(mut errors: Vec<RulesError>) -> RulesError {
    if errors.len() == 1 {
        errors.remove(0)
    } else {
        RulesError::Several(errors)
    }
}

fn proposals(script: &Script, out: Dynamic) -> Result<Vec<Proposal>, RulesError> {
    let bad = |message: String| RulesError::BadResult {
        path: script.path.clone(),
        message,
    };
    if out.is_unit() {
        return Ok(vec![]);
    }
    let items: Vec<Dynamic> = if out.is_array() {
        out.into_array()
            .map_err(|t| bad(format!("an array that could not be read ({t})")))?
    } else {
        vec![out]
    };
    let mut proposals = Vec::with_capacity(items.len());
    for item in items {
        let type_name = item.type_name();
        let mut map = item.try_cast::<Map>().ok_or_else(|| {
            bad(format!(
                "a {type_name}; expected a map like #{{ action: \"send_doi\", reason: \"...\" }}"
            ))
        })?;
        let action = map
            .remove("action")
            .and_then(|a| a.into_immutable_string().ok())
            .ok_or_else(|| bad("a map without an `action` string".into()))?;
        let action = Action::parse(&action).ok_or_else(|| {
            let known: Vec<_> = Action::ALL.iter().map(|a| a.as_str()).collect();
            bad(format!(
                "unknown action `{action}` (known: {})",
                known.join(", ")
            ))
        })?;
        let reason = map
            .remove("reason")
            .and_then(|r| r.into_string().ok())
            .filter(|r| !r.trim().is_empty())
            .ok_or_else(|| {
                bad(format!(
                    "action `{}` without a `reason` string",
                    action.as_str()
                ))
            })?;
        if action != Action::None {
            proposals.push(Proposal {
                action,
                reason,
                rule_file: script.file.clone(),
                rule_hash: script.hash.clone(),
            });
        }
    }
    Ok(proposals)
}

/// The state-machine input a rule action stands for; `None` for actions the engine performs
/// by itself (`subscribe` on confirmation, `write_back` after every change) and `none`.
pub fn input_for(action: Action) -> Option<Input> {
    Some(match action {
        Action::SendDoi => Input::SendDoi {
            token: uuid::Uuid::new_v4().to_string(),
        },
        Action::SendReminder => Input::SendReminder,
        Action::SendRevalidation => Input::SendRevalidation {
            token: uuid::Uuid::new_v4().to_string(),
        },
        Action::Remove => Input::Lapse,
        Action::Suppress => Input::Suppress,
        Action::Subscribe | Action::WriteBack | Action::None => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pairs: &[(&str, Dynamic)]) -> Map {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), v.clone()))
            .collect()
    }

    fn one(src: &str) -> Result<RuleSet, RulesError> {
        RuleSet::compile_sources(
            Path::new("."),
            &[(PathBuf::from("r.rhai"), src.to_owned())],
            vec![],
        )
    }

    #[test]
    fn decide_returns_proposals_tagged_with_their_script() {
        let rs = one(r#"fn decide(contact, consent, ctx) { if consent.state == "asserted" { #{ action: "send_doi", reason: "asked" } } }"#)
            .expect("compiles");
        let got = rs
            .decide(&m(&[]), &m(&[("state", "asserted".into())]), &m(&[]))
            .expect("runs");
        assert_eq!(got.len(), 1);
        assert_eq!(
            (
                got[0].action,
                got[0].reason.as_str(),
                got[0].rule_file.as_str()
            ),
            (Action::SendDoi, "asked", "r.rhai")
        );
        assert_eq!(got[0].rule_hash.len(), 64);
        assert!(
            rs.decide(&m(&[]), &m(&[("state", "none".into())]), &m(&[]))
                .expect("runs")
                .is_empty()
        );
    }

    #[test]
    fn scripts_of_one_set_cannot_change_each_others_input() {
        let rs = RuleSet::compile_sources(
            Path::new("."),
            &[
                (
                    PathBuf::from("a.rhai"),
                    r#"fn decide(contact, consent, ctx) { consent.state = "asserted"; ctx.list = (); }"#
                        .to_owned(),
                ),
                (
                    PathBuf::from("b.rhai"),
                    r#"fn decide(contact, consent, ctx) { if consent.state == "asserted" || ctx.list == () { #{ action: "send_doi", reason: "changed" } } }"#
                        .to_owned(),
                ),
            ],
            vec![],
        )
        .expect("compiles");
        let ctx = m(&[("list", Dynamic::from_map(m(&[("id", "l".into())])))]);
        let consent = m(&[("state", "none".into())]);
        for got in [
            rs.decide(&m(&[]), &consent, &ctx),
            rs.decide_owned(m(&[]), consent.clone(), ctx.clone()),
        ] {
            assert_eq!(got.expect("runs"), vec![]);
        }
        assert_eq!(
            consent.get("state").map(ToString::to_string).as_deref(),
            Some("none"),
            "the caller's map is untouched"
        );
    }

    #[test]
    fn compile_error_names_line_and_column() {
        let err = one("fn decide(a, b, c) {\n  let x = ;\n}").expect_err("bad");
        assert!(
            matches!(
                err,
                RulesError::Compile {
                    line: 2,
                    column: 11,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn runaway_scripts_fail_one_decision_quickly() {
        for (name, src) in [
            ("loop", "fn decide(a, b, c) { loop { } }"),
            (
                "recursion",
                "fn f(x) { f(x + 1) } fn decide(a, b, c) { f(0) }",
            ),
            (
                "huge string",
                "fn decide(a, b, c) { let s = \"x\"; loop { s += s; } }",
            ),
        ] {
            let rs = one(src).expect("compiles");
            let start = std::time::Instant::now();
            let err = rs.decide(&m(&[]), &m(&[]), &m(&[])).expect_err(name);
            assert!(matches!(err, RulesError::Runtime { .. }), "{name}: {err}");
            // Not a timing assertion on speed, a guard against an unbounded run.
            assert!(
                start.elapsed() < std::time::Duration::from_secs(5),
                "{name} was not stopped"
            );
        }
    }

    #[test]
    fn eval_is_disabled_and_missing_reason_refused() {
        assert!(one("fn decide(a, b, c) { eval(\"1\") }").is_err());
        let rs = one("fn decide(a, b, c) { #{ action: \"send_doi\" } }").expect("compiles");
        assert!(matches!(
            rs.decide(&m(&[]), &m(&[]), &m(&[])),
            Err(RulesError::BadResult { .. })
        ));
        let rs = one("fn decide(a, b, c) { #{ action: \"mail_everyone\", reason: \"x\" } }")
            .expect("compiles");
        assert!(matches!(
            rs.decide(&m(&[]), &m(&[]), &m(&[])),
            Err(RulesError::BadResult { .. })
        ));
    }

    #[test]
    fn no_module_import_from_disk() {
        let rs = one("fn decide(a, b, c) { import \"other\" as o; o::x() }").expect("compiles");
        assert!(rs.decide(&m(&[]), &m(&[]), &m(&[])).is_err());
    }

    #[test]
    fn shipped_default_rules_compile_and_pass_their_tests() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../rules");
        let set = RuleSet::load_checked(&dir).expect("default rules compile and pass");
        assert!(
            set.tests().len() >= 8,
            "the default policy is covered by table tests"
        );
    }
}
