//! The Rhai rules host.
//!
//! A **rule set** is a directory: every `*.rhai` file defines `fn decide(contact, consent, ctx)`
//! — except **helper files**, named `_*.rhai`, which hold functions only and are compiled into
//! every rule file — and every `*.tests.toml` file holds table tests for the whole set. Scripts
//! are compiled once in a sandboxed engine and called per contact — plain maps in, an action map
//! (or an array of them, or nothing) out. Each action carries a `reason`, stored in the ledger
//! with the file and content hash of the script that proposed it.
//!
//! Mistakes are loud: reading a key the maps do not have is an error (at run time, and at load
//! time where [`check`] can see it), and so is an unknown action name written in a script.
//!
//! A rule set is only ever used after it compiled, passed those checks **and** passed its tests
//! ([`RuleSet::load_checked`]); reload builds a new set and swaps it in whole.
//!
//! Rules only *propose*. The consent state machine decides whether a proposal is legal.

mod check;
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
    #[error("{path}: no rule scripts (*.rhai; files named `_*.rhai` are helpers) found")]
    Empty { path: PathBuf },
    #[error("{path}:{line}:{column}: {message}")]
    Compile {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error(
        "{path}: the script must define `fn decide(contact, consent, ctx)` (files named `_*.rhai` are helpers: functions only)"
    )]
    NoDecide { path: PathBuf },
    /// A mistake the load-time checks found without running the script.
    #[error("{path}:{line}:{column}: {message}")]
    Check {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
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
    // A mistyped key must fail loudly, not read as `()` and quietly stop a rule from firing.
    // Keys that may have no value are always present in the maps (as `()`).
    engine.set_fail_on_invalid_map_property(true);
    // A variable used but never defined is a compile error with its line, not a run-time error
    // in whichever branch reaches it — the usual case being a file-level `let`, which
    // `decide` cannot see (the top level never runs).
    engine.set_strict_variables(true);
    // Scripts are parsed as written, so the load-time checks see every branch (the optimiser
    // drops `if false { .. }` and folds literals); `compile_sources` optimises after checking.
    engine.set_optimization_level(rhai::OptimizationLevel::None);
    engine.disable_symbol("eval");
    engine.on_print(|s| tracing::info!(target: "optinsync::rules", "{s}"));
    engine.on_debug(|s, src, pos| {
        tracing::debug!(target: "optinsync::rules", source = src.unwrap_or(""), line = pos.line().unwrap_or(0), "{s}")
    });
    engine
}

/// One compiled script.
struct Script {
    /// The rule file with the helper files' functions merged in.
    ast: AST,
    path: PathBuf,
    /// `path` as text, made once: every proposal carries it.
    file: String,
    /// The file's content hash; with helper files, the hash of the file and the helpers.
    hash: String,
}

/// Whether a `.rhai` file is a helper: functions shared by the rule files, no `decide`.
fn is_helper(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('_'))
}

/// One parsed helper file.
struct Helper {
    ast: AST,
    path: PathBuf,
    source: String,
}

/// A compiled rule set, immutable once built.
pub struct RuleSet {
    engine: Engine,
    dir: PathBuf,
    scripts: Vec<Script>,
    /// `(file, sha256)` of each helper file.
    helpers: Vec<(PathBuf, String)>,
    /// Which helper file defines each helper function, to name it in a run-time error.
    helper_fns: std::collections::HashMap<String, PathBuf>,
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
        let compile = |path: &Path, source: &str| {
            let ast = engine.compile(source).map_err(|e| {
                let hint = match *e.0 {
                    rhai::ParseErrorType::VariableUndefined(_) => {
                        " (variables from outside a function, such as a file-level `let`, are not visible in it)"
                    }
                    _ => "",
                };
                RulesError::Compile {
                    path: path.to_owned(),
                    line: e.1.line().unwrap_or(0),
                    column: e.1.position().unwrap_or(0),
                    message: format!("{}{hint}", e.0),
                }
            })?;
            let findings: Vec<RulesError> = check::check(&ast)
                .into_iter()
                .map(|f| RulesError::Check {
                    path: path.to_owned(),
                    line: f.line,
                    column: f.column,
                    message: f.message,
                })
                .collect();
            if findings.is_empty() {
                Ok(engine.optimize_ast(&rhai::Scope::new(), ast, rhai::OptimizationLevel::Simple))
            } else {
                Err(several(findings))
            }
        };
        let (helper_sources, rule_sources): (Vec<_>, Vec<_>) =
            sources.iter().partition(|(path, _)| is_helper(path));
        let mut helpers: Vec<Helper> = Vec::new();
        let mut helper_fns: std::collections::HashMap<String, PathBuf> = Default::default();
        let mut helper_sigs: std::collections::HashMap<(String, usize), PathBuf> =
            Default::default();
        for (path, source) in helper_sources {
            let Ok(ast) = compile(path, source).map_err(|e| errors.push(e)) else {
                continue;
            };
            // Top-level code never runs (only `decide` is called), and `decide` here would
            // clash with every rule file's own.
            if let Some(stmt) = ast.statements().first() {
                let pos = stmt.position();
                errors.push(RulesError::Check {
                    path: path.clone(),
                    line: pos.line().unwrap_or(0),
                    column: pos.position().unwrap_or(0),
                    message: "a helper file (`_*.rhai`) holds functions only; this statement would never run".into(),
                });
            }
            for f in ast.iter_fn_def() {
                let pos = f.body.start_position();
                if f.name == "decide" {
                    errors.push(RulesError::Check {
                        path: path.clone(),
                        line: pos.line().unwrap_or(0),
                        column: pos.position().unwrap_or(0),
                        message: "a helper file (`_*.rhai`) must not define `decide`; rename the file without the leading `_` to make it a rule file".into(),
                    });
                }
                let sig = (f.name.to_string(), f.params.len());
                if let Some(other) = helper_sigs.get(&sig) {
                    errors.push(clash(path, pos, &sig, other));
                } else {
                    helper_sigs.insert(sig, path.clone());
                }
                helper_fns.insert(f.name.to_string(), path.clone());
            }
            helpers.push(Helper {
                ast,
                path: path.clone(),
                source: source.clone(),
            });
        }
        let helper_hashes: Vec<(PathBuf, String)> = helpers
            .iter()
            .map(|h| (h.path.clone(), sha256_hex(h.source.as_bytes())))
            .collect();
        let mut scripts = Vec::new();
        for (path, source) in rule_sources {
            let Ok(ast) = compile(path, source).map_err(|e| errors.push(e)) else {
                continue;
            };
            if !ast
                .iter_functions()
                .any(|f| f.name == "decide" && f.params.len() == 3)
            {
                errors.push(RulesError::NoDecide { path: path.clone() });
                continue;
            }
            for f in ast.iter_fn_def() {
                let sig = (f.name.to_string(), f.params.len());
                if let Some(helper) = helper_sigs.get(&sig) {
                    errors.push(clash(path, f.body.start_position(), &sig, helper));
                }
            }
            let mut merged = ast;
            for h in &helpers {
                merged += h.ast.clone_functions_only();
            }
            // The file alone when there are no helpers (the hash `sha256sum` gives); else
            // the file and the helpers it was compiled with, so the ledger pins both.
            let hash = if helpers.is_empty() {
                sha256_hex(source.as_bytes())
            } else {
                let mut h = Sha256::new();
                h.update(source.as_bytes());
                for (p, hash) in &helper_hashes {
                    h.update([0]);
                    h.update(file_name(p).as_bytes());
                    h.update([0]);
                    h.update(hash.as_bytes());
                }
                hex::encode(h.finalize())
            };
            scripts.push(Script {
                ast: merged,
                path: path.clone(),
                file: path.display().to_string(),
                hash,
            });
        }
        if !errors.is_empty() {
            return Err(several(errors));
        }
        if scripts.is_empty() && !helpers.is_empty() {
            return Err(RulesError::Empty {
                path: dir.to_owned(),
            });
        }
        let mut h = Sha256::new();
        for (name, hash) in scripts
            .iter()
            .map(|s| (&s.path, &s.hash))
            .chain(helper_hashes.iter().map(|(p, h)| (p, h)))
        {
            h.update(file_name(name).as_bytes());
            h.update([0]);
            h.update(hash.as_bytes());
        }
        Ok(Self {
            engine,
            dir: dir.to_owned(),
            scripts,
            helpers: helper_hashes,
            helper_fns,
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

    /// `(file, sha256)` of each helper file (`_*.rhai`).
    pub fn helpers(&self) -> &[(PathBuf, String)] {
        &self.helpers
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
            .map_err(|e| self.runtime_error(script, &e))?;
        proposals(script, out)
    }
}

fn file_name(path: &Path) -> &str {
    path.file_name().and_then(|n| n.to_str()).unwrap_or("")
}

fn clash(path: &Path, pos: rhai::Position, sig: &(String, usize), other: &Path) -> RulesError {
    RulesError::Check {
        path: path.to_owned(),
        line: pos.line().unwrap_or(0),
        column: pos.position().unwrap_or(0),
        message: format!(
            "function `{}` with {} parameter(s) is also defined in helper file {}",
            sig.0,
            sig.1,
            other.display()
        ),
    }
}

impl RuleSet {
    /// A run-time error at the place it happened: calls wrap it once per function, and the
    /// innermost names the function, so a helper's error names the helper file.
    fn runtime_error(&self, script: &Script, e: &rhai::EvalAltResult) -> RulesError {
        let mut err = e;
        let mut in_fn = None;
        while let rhai::EvalAltResult::ErrorInFunctionCall(name, _, inner, _) = err {
            in_fn = Some(name.as_str());
            err = inner;
        }
        let path = in_fn
            .and_then(|f| self.helper_fns.get(f))
            .unwrap_or(&script.path);
        let pos = if err.position().is_none() {
            e.position()
        } else {
            err.position()
        };
        RulesError::Runtime {
            path: path.clone(),
            line: pos.line().unwrap_or(0),
            column: pos.position().unwrap_or(0),
            message: e.to_string(),
        }
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
        let action = Action::parse(&action).ok_or_else(|| bad(check::unknown_action(&action)))?;
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
    use crate::consent::ConsentState;

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
        // An action name built at run time is still checked when it is returned (a literal
        // one fails at load: `unknown_action_literals_fail_at_load`).
        let rs = one(
            "fn decide(a, b, c) { let n = \"mail_\"; n += \"everyone\"; #{ action: n, reason: \"x\" } }",
        )
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

    fn set(files: &[(&str, &str)]) -> Result<RuleSet, RulesError> {
        let sources: Vec<(PathBuf, String)> = files
            .iter()
            .map(|(p, s)| (PathBuf::from(p), (*s).to_owned()))
            .collect();
        RuleSet::compile_sources(Path::new("."), &sources, vec![])
    }

    fn test_now() -> chrono::DateTime<chrono::Utc> {
        chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default()
    }

    /// Consent in `state` since `age_secs` ago, mid-signup (a token, one DOI mail).
    fn consent_in(state: ConsentState, age_secs: i64) -> crate::consent::Consent {
        let since = test_now() - chrono::Duration::seconds(age_secs);
        crate::consent::Consent {
            state,
            since,
            signup_token: Some("t".into()),
            doi_mails: 1,
            reminders_sent: 0,
            confirmed_at: (state == ConsentState::Confirmed).then_some(since),
            confirmed_token: None,
            last_seq: None,
        }
    }

    /// Maps as the daemon builds them, for a contact in `state` on `list`.
    fn real_maps(state: ConsentState, age_secs: i64, list: &str) -> (Map, Map, Map) {
        let now = test_now();
        let list: crate::config::ListConfig = toml::from_str(list).expect("list");
        (
            input::contact_map(&input::test_contact(now)),
            input::consent_map(&consent_in(state, age_secs), None, now),
            input::ctx_map(&list, now),
        )
    }

    fn check_err(files: &[(&str, &str)]) -> String {
        set(files).expect_err("refused at load").to_string()
    }

    #[test]
    fn reading_an_unknown_key_is_an_error_at_run_time() {
        // A key built at run time: the load-time check cannot see it, the engine option can.
        let rs = one(
            "fn decide(contact, consent, ctx) {\n  let k = \"reminder_sent\";\n  if consent[k] > 0 { }\n}",
        )
        .expect("compiles");
        let (c, k, x) = real_maps(ConsentState::Pending, 10, "id = \"l\"\nname = \"L\"");
        let err = rs.decide(&c, &k, &x).expect_err("unknown key");
        assert!(matches!(err, RulesError::Runtime { line: 3, .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.starts_with("r.rhai:3:") && msg.contains("reminder_sent"),
            "{msg}"
        );
    }

    #[test]
    fn every_key_of_the_real_maps_reads_without_error() {
        // Keys that may have no value are present as `()`: a correct script never fails.
        let mut reads = Vec::new();
        for k in input::CONTACT_KEYS {
            reads.push(format!("contact.{k}"));
        }
        for k in input::CONSENT_KEYS {
            reads.push(format!("consent.{k}"));
        }
        for k in input::CTX_KEYS {
            reads.push(format!("ctx.{k}"));
        }
        for k in input::LIST_KEYS {
            reads.push(format!("ctx.list.{k}"));
        }
        let src = format!(
            "fn decide(contact, consent, ctx) {{ let all = [{}]; }}",
            reads.join(", ")
        );
        let rs = one(&src).expect("every documented key passes the load-time check");
        for state in ConsentState::ALL {
            let (c, k, x) = real_maps(state, 10, "id = \"l\"\nname = \"L\"");
            rs.decide(&c, &k, &x).expect("every key is present");
        }
    }

    /// What docs/writing-rules.md promises about CRM fields and file-level variables.
    #[test]
    fn crm_fields_a_contact_lacks_read_with_get_or_in_and_file_level_lets_are_invisible() {
        let (c, k, x) = real_maps(ConsentState::Asserted, 10, "id = \"l\"\nname = \"L\"");
        let rs = one(
            "fn decide(contact, consent, ctx) {\n  if contact.fields.get(\"Country\") == () && !(\"Country\" in contact.fields) { #{ action: \"send_doi\", reason: \"r\" } }\n}",
        )
        .expect("compiles");
        assert_eq!(rs.decide(&c, &k, &x).expect("runs").len(), 1);
        let rs = one("fn decide(contact, consent, ctx) {\n  contact.fields.Country\n}")
            .expect("compiles");
        let msg = rs.decide(&c, &k, &x).expect_err("absent field").to_string();
        assert!(
            msg.starts_with("r.rhai:2:18:") && msg.contains("Country"),
            "{msg}"
        );
        // Refused at load, not in whichever branch first reaches it.
        let msg =
            one("let limit = 3;\nfn decide(contact, consent, ctx) {\n  if false { limit }\n}")
                .expect_err("invisible")
                .to_string();
        assert!(
            msg.starts_with("r.rhai:3:14: Undefined variable: limit (variables from outside"),
            "{msg}"
        );
    }

    #[test]
    fn a_mistyped_key_fails_at_load_even_in_a_branch_that_never_runs() {
        let msg = check_err(&[(
            "consent.rhai",
            "fn decide(contact, consent, ctx) {\n  if consent.state == \"nobody\" {\n    if consent.reminder_sent > 0 { }\n  }\n}",
        )]);
        assert!(msg.starts_with("consent.rhai:3:16: "), "{msg}");
        assert!(
            msg.contains("`consent` has no key `reminder_sent`; did you mean `reminders_sent`?"),
            "{msg}"
        );
        // Through `ctx`, an alias of `ctx.list`, an index, and decide's own parameter names.
        for (src, want) in [
            (
                "fn decide(a, b, c) {\n  c.list.reminder_aftr\n}",
                "r.rhai:2:10: `ctx.list` has no key `reminder_aftr`",
            ),
            (
                "fn decide(a, b, c) {\n  let list = c.list;\n  list.doi_mode\n}",
                "r.rhai:3:8: `ctx.list` has no key `doi_mode`",
            ),
            (
                "fn decide(a, b, c) {\n  c.nw\n}",
                "r.rhai:2:5: `ctx` has no key `nw`",
            ),
            // The optimiser would drop this branch; the check runs before it.
            (
                "fn decide(a, b, c) {\n  if false { b.typo }\n}",
                "r.rhai:2:16: `consent` has no key `typo`",
            ),
            (
                "fn decide(a, b, c) {\n  a[\"email\"]\n}",
                "r.rhai:2:5: `contact` has no key `email`",
            ),
            // A helper function's parameter called `consent` is the consent map too.
            (
                "fn due(consent) {\n  consent.agee\n}\nfn decide(a, b, c) { due(b) }",
                "r.rhai:2:11: `consent` has no key `agee`",
            ),
        ] {
            let msg = one(src).expect_err(src).to_string();
            assert!(msg.starts_with(want), "{src}: {msg}");
        }
        // Writing a new key is allowed; a name bound to something else too is not guessed at;
        // CRM fields are not known here.
        for src in [
            "fn decide(a, b, c) { b.note = 1; b.note }",
            "fn decide(a, b, c) { let l = c.list; l = #{ x: 1 }; l.x }",
            "fn decide(contact, consent, ctx) { contact.fields.Country }",
        ] {
            one(src).expect(src);
        }
    }

    #[test]
    fn unknown_action_literals_fail_at_load() {
        let msg = check_err(&[(
            "r.rhai",
            "fn decide(a, b, c) {\n  if b.state == \"nobody\" {\n    return #{ action: \"send_remider\", reason: \"x\" };\n  }\n}",
        )]);
        assert!(
            msg.starts_with("r.rhai:3:23: unknown action `send_remider` (known: send_doi,"),
            "{msg}"
        );
        let msg = check_err(&[(
            "r.rhai",
            "fn decide(a, b, c) {\n  let m = #{ reason: \"x\" };\n  m.action = \"mail\";\n  m\n}",
        )]);
        assert!(
            msg.starts_with("r.rhai:3:14: unknown action `mail`"),
            "{msg}"
        );
    }

    #[test]
    fn helper_files_share_functions_with_every_rule_file() {
        let lib = "fn overdue(consent, ctx) {\n  consent.age >= ctx.list.reminder_after\n}\nfn act(a, r) { #{ action: a, reason: r } }\n";
        let rs = set(&[
            ("_lib.rhai", lib),
            (
                "a.rhai",
                "fn decide(contact, consent, ctx) { if overdue(consent, ctx) { act(\"send_reminder\", \"due\") } }",
            ),
            (
                "b.rhai",
                "fn decide(contact, consent, ctx) { if !overdue(consent, ctx) { act(\"none\", \"not yet\") } }",
            ),
        ])
        .expect("helpers compile into every rule file");
        assert_eq!(rs.scripts().len(), 2, "a helper is not a rule file");
        assert_eq!(rs.helpers().len(), 1);
        let (c, k, x) = real_maps(
            ConsentState::Pending,
            4 * 86_400,
            "id = \"l\"\nname = \"L\"",
        );
        let got = rs.decide(&c, &k, &x).expect("runs");
        assert_eq!(
            got.iter()
                .map(|p| (p.action, p.rule_file.as_str()))
                .collect::<Vec<_>>(),
            vec![(Action::SendReminder, "a.rhai")]
        );
        // The ledger's hash pins the helpers too: change one, and the rule file's hash changes.
        let other = set(&[
            ("_lib.rhai", &lib.replace(">=", ">")),
            ("a.rhai", "fn decide(contact, consent, ctx) { }"),
        ])
        .expect("compiles");
        let plain = one("fn decide(contact, consent, ctx) { }").expect("compiles");
        assert_ne!(other.scripts()[0].1, plain.scripts()[0].1);
        assert_eq!(
            plain.scripts()[0].1,
            sha256_hex(b"fn decide(contact, consent, ctx) { }")
        );

        // A run-time error in a helper names the helper file and its line.
        let rs = set(&[
            ("_lib.rhai", "fn boom(x) {\n  x[\"nope\"]\n}"),
            (
                "a.rhai",
                "fn decide(contact, consent, ctx) { boom(consent) }",
            ),
        ])
        .expect("compiles");
        let msg = rs.decide(&c, &k, &x).expect_err("fails").to_string();
        assert!(msg.starts_with("_lib.rhai:2:"), "{msg}");
    }

    #[test]
    fn helper_files_hold_functions_only() {
        let rule = ("a.rhai", "fn decide(contact, consent, ctx) { }");
        for (helper, want) in [
            (
                "fn decide(a, b, c) { }",
                "_lib.rhai:1:20: a helper file (`_*.rhai`) must not define `decide`",
            ),
            (
                "let limit = 3;\nfn f() { }",
                "_lib.rhai:1:1: a helper file (`_*.rhai`) holds functions only",
            ),
            (
                "fn f() {\n  limit\n}",
                "_lib.rhai:2:3: Undefined variable: limit (variables from outside a function",
            ),
            (
                "fn f() {\n  #{ action: \"sned_doi\", reason: \"x\" }\n}",
                "_lib.rhai:2:14: unknown action `sned_doi`",
            ),
            (
                "fn f(consent) {\n  consent.stat\n}",
                "_lib.rhai:2:11: `consent` has no key `stat`",
            ),
            ("fn f() {\n  let = ;\n}", "_lib.rhai:2:"),
        ] {
            let msg = check_err(&[("_lib.rhai", helper), rule]);
            assert!(msg.starts_with(want), "{helper}: {msg}");
        }
        // One function name, one meaning: no silent override between files.
        let msg = check_err(&[
            ("_lib.rhai", "fn f(x) { 1 }"),
            (
                "a.rhai",
                "fn f(x) { 2 } fn decide(contact, consent, ctx) { }",
            ),
        ]);
        assert!(msg.contains("a.rhai:1:9: function `f` with 1 parameter(s) is also defined in helper file _lib.rhai"), "{msg}");
        // Helpers alone are not a rule set; a rule file still needs `decide`.
        assert!(matches!(
            set(&[("_lib.rhai", "fn f() { }")]),
            Err(RulesError::Empty { .. })
        ));
        assert!(matches!(
            set(&[("_lib.rhai", "fn f() { }"), ("lib.rhai", "fn f() { }")]),
            Err(RulesError::NoDecide { .. }) | Err(RulesError::Several(_))
        ));
    }

    #[test]
    fn shipped_policy_proposes_nothing_the_engine_refuses_on_a_campaigns_doi_list() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../rules");
        let set = RuleSet::load_checked(&dir).expect("default rules load");
        let list = "id = \"l\"\nname = \"L\"\ndoi = \"campaigns\"\nreminder_after = \"1d\"\npending_expiry = \"30d\"\ninactivity = \"10d\"";
        let now = test_now();
        let cx = crate::consent::Context {
            suppressed: false,
            campaigns_doi: true,
            erasure_only: false,
        };
        let limits = crate::consent::Limits::with_reminders(1);
        let mut proposed = 0;
        for state in ConsentState::ALL {
            for days in [0, 2, 5, 11, 40, 400] {
                let (c, k, x) = real_maps(state, days * 86_400, list);
                let consent = consent_in(state, days * 86_400);
                for p in set.decide(&c, &k, &x).expect("decides") {
                    proposed += 1;
                    assert!(
                        !matches!(p.action, Action::SendReminder | Action::SendRevalidation),
                        "{state:?} after {days}d: {p:?}"
                    );
                    if let Some(input) = input_for(p.action) {
                        crate::consent::transition(&consent, &input, limits, cx, now)
                            .unwrap_or_else(|r| {
                                panic!("{state:?} after {days}d: {p:?} refused: {r:?}")
                            });
                    }
                }
            }
        }
        assert!(
            proposed > 0,
            "the policy still acts on such a list (DOI, expiry)"
        );
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
