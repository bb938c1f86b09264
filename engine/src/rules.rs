//! The Rhai rules host: compiles a rule script once in a sandboxed engine and calls its
//! `decide(contact, consent, ctx)` per contact — plain maps in, an action map (or an array of
//! them, or `()`) out. Each action carries a `reason`, stored in the ledger with the hash of the
//! script that proposed it.
//!
//! Rules only *propose*. The consent state machine decides whether a proposal is legal.

use std::path::{Path, PathBuf};

use rhai::packages::Package as _;
use rhai::{AST, Dynamic, Engine, Map};
use serde::Serialize;
use sha2::{Digest, Sha256};

/// Actions a rule may propose (DESIGN.md §1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
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
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "send_doi" => Self::SendDoi,
            "send_reminder" => Self::SendReminder,
            "send_revalidation" => Self::SendRevalidation,
            "subscribe" => Self::Subscribe,
            "remove" => Self::Remove,
            "suppress" => Self::Suppress,
            "write_back" => Self::WriteBack,
            "none" => Self::None,
            _ => return None,
        })
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

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Proposal {
    pub action: Action,
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("cannot read rule file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Compile {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}: the script must define `fn decide(contact, consent, ctx)`")]
    NoDecide { path: PathBuf },
    #[error("{path}:{line}: rule failed: {message}")]
    Runtime {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{path}: rule returned {message}")]
    BadResult { path: PathBuf, message: String },
}

/// Limits set explicitly so debug and release builds behave the same (Rhai's defaults differ).
fn sandboxed_engine() -> Engine {
    let mut engine = Engine::new_raw();
    engine.register_global_module(rhai::packages::StandardPackage::new().as_shared_module());
    engine.set_max_operations(100_000);
    engine.set_max_call_levels(32);
    engine.set_max_expr_depths(64, 32);
    engine.set_max_string_size(64 * 1024);
    engine.set_max_array_size(10_000);
    engine.set_max_map_size(10_000);
    engine.set_max_modules(0);
    engine.disable_symbol("eval");
    engine.on_print(|s| tracing::info!(target: "optinsync::rules", "{s}"));
    engine.on_debug(|s, src, pos| tracing::debug!(target: "optinsync::rules", source = src.unwrap_or(""), line = pos.line().unwrap_or(0), "{s}"));
    engine
}

/// A compiled rule set, immutable once built (a reload builds a new one and swaps it in).
pub struct RuleSet {
    engine: Engine,
    ast: AST,
    path: PathBuf,
    hash: String,
}

impl std::fmt::Debug for RuleSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuleSet")
            .field("path", &self.path)
            .field("hash", &self.hash)
            .finish_non_exhaustive()
    }
}

impl RuleSet {
    pub fn load(path: &Path) -> Result<Self, RulesError> {
        let source = std::fs::read_to_string(path).map_err(|source| RulesError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::compile(path, &source)
    }

    pub fn compile(path: &Path, source: &str) -> Result<Self, RulesError> {
        let engine = sandboxed_engine();
        let ast = engine.compile(source).map_err(|e| RulesError::Compile {
            path: path.to_owned(),
            line: e.1.line().unwrap_or(0),
            column: e.1.position().unwrap_or(0),
            message: e.0.to_string(),
        })?;
        if !ast
            .iter_functions()
            .any(|f| f.name == "decide" && f.params.len() == 3)
        {
            return Err(RulesError::NoDecide {
                path: path.to_owned(),
            });
        }
        let hash = hex::encode(Sha256::digest(source.as_bytes()));
        Ok(Self {
            engine,
            ast,
            path: path.to_owned(),
            hash,
        })
    }

    /// SHA-256 of the script text: the ledger records which version of the policy acted.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Call `decide`. A script error fails this one decision only.
    pub fn decide(
        &self,
        contact: Map,
        consent: Map,
        ctx: Map,
    ) -> Result<Vec<Proposal>, RulesError> {
        let mut scope = rhai::Scope::new();
        let options = rhai::CallFnOptions::new()
            .eval_ast(false)
            .rewind_scope(true);
        let out: Dynamic = self
            .engine
            .call_fn_with_options(
                options,
                &mut scope,
                &self.ast,
                "decide",
                (contact, consent, ctx),
            )
            .map_err(|e| RulesError::Runtime {
                path: self.path.clone(),
                line: e.position().line().unwrap_or(0),
                message: e.to_string(),
            })?;
        self.proposals(out)
    }

    fn proposals(&self, out: Dynamic) -> Result<Vec<Proposal>, RulesError> {
        let bad = |message: String| RulesError::BadResult {
            path: self.path.clone(),
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
            let map = item.try_cast::<Map>().ok_or_else(|| bad(format!("a {type_name}; expected a map like #{{ action: \"send_doi\", reason: \"...\" }}")))?;
            let action = map
                .get("action")
                .and_then(|a| a.clone().into_string().ok())
                .ok_or_else(|| bad("a map without an `action` string".into()))?;
            let action =
                Action::parse(&action).ok_or_else(|| bad(format!("unknown action `{action}`")))?;
            let reason = map
                .get("reason")
                .and_then(|r| r.clone().into_string().ok())
                .filter(|r| !r.trim().is_empty())
                .ok_or_else(|| {
                    bad(format!(
                        "action `{}` without a `reason` string",
                        action.as_str()
                    ))
                })?;
            if action != Action::None {
                proposals.push(Proposal { action, reason });
            }
        }
        Ok(proposals)
    }
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

    #[test]
    fn decide_returns_proposals() {
        let rs = RuleSet::compile(
            Path::new("t.rhai"),
            r#"fn decide(contact, consent, ctx) { if consent.state == "asserted" { #{ action: "send_doi", reason: "asked" } } }"#,
        )
        .expect("compiles");
        let got = rs
            .decide(m(&[]), m(&[("state", "asserted".into())]), m(&[]))
            .expect("runs");
        assert_eq!(
            got,
            vec![Proposal {
                action: Action::SendDoi,
                reason: "asked".into()
            }]
        );
        assert!(
            rs.decide(m(&[]), m(&[("state", "none".into())]), m(&[]))
                .expect("runs")
                .is_empty()
        );
    }

    #[test]
    fn compile_error_names_line() {
        let err = RuleSet::compile(Path::new("r.rhai"), "fn decide(a, b, c) {\n  let x = ;\n}")
            .expect_err("bad");
        assert!(matches!(err, RulesError::Compile { line: 2, .. }), "{err}");
    }

    #[test]
    fn endless_loop_fails_one_decision() {
        let rs = RuleSet::compile(Path::new("r.rhai"), "fn decide(a, b, c) { loop { } }")
            .expect("compiles");
        assert!(matches!(
            rs.decide(m(&[]), m(&[]), m(&[])),
            Err(RulesError::Runtime { .. })
        ));
    }

    #[test]
    fn eval_is_disabled_and_missing_reason_refused() {
        assert!(
            RuleSet::compile(Path::new("r.rhai"), "fn decide(a, b, c) { eval(\"1\") }").is_err()
        );
        let rs = RuleSet::compile(
            Path::new("r.rhai"),
            "fn decide(a, b, c) { #{ action: \"send_doi\" } }",
        )
        .expect("compiles");
        assert!(matches!(
            rs.decide(m(&[]), m(&[]), m(&[])),
            Err(RulesError::BadResult { .. })
        ));
    }

    #[test]
    fn shipped_default_rules_compile() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../rules/consent.rhai");
        RuleSet::load(&path).expect("default rules compile");
    }
}
