//! Load-time checks on a script's compiled AST, so a mistake fails `rules check` and reload
//! with file:line:column even in a branch no table test runs:
//!
//! - a property read of `contact`, `consent`, `ctx` or `ctx.list` that the maps do not have
//!   (a typo would otherwise only fail when that branch runs);
//! - an action name that is not one of [`Action::ALL`], written as a string literal in an
//!   action map (`#{ action: "..." }`) or assigned to `.action`.
//!
//! Which variables hold which map is known by name: `decide`'s three parameters (whatever they
//! are called), parameters called `contact`, `consent` or `ctx` in any other function, and
//! variables set from those with `let` (`let list = ctx.list;`). A name that is bound to
//! anything else as well, or reassigned, is not checked: the check never guesses. Everything
//! it cannot see is still caught when it runs (unknown properties are an error at run time).

use std::collections::HashMap;

use rhai::{AST, ASTNode, Expr, Position, Stmt};

use super::Action;
use super::input::{CONSENT_KEYS, CONTACT_KEYS, CTX_KEYS, LIST_KEYS};

/// A map whose keys are known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Contact,
    Consent,
    Ctx,
    List,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Self::Contact => "contact",
            Self::Consent => "consent",
            Self::Ctx => "ctx",
            Self::List => "ctx.list",
        }
    }

    fn keys(self) -> &'static [&'static str] {
        match self {
            Self::Contact => &CONTACT_KEYS,
            Self::Consent => &CONSENT_KEYS,
            Self::Ctx => &CTX_KEYS,
            Self::List => &LIST_KEYS,
        }
    }

    /// The kind of a key's value when that value is itself a map with known keys.
    /// (`contact.fields` holds whatever the CRM has: its keys are not known here.)
    fn child(self, key: &str) -> Option<Kind> {
        (self == Self::Ctx && key == "list").then_some(Self::List)
    }

    /// Kinds for other functions' parameters, by the names `decide`'s are documented with.
    fn by_param_name(name: &str) -> Option<Kind> {
        match name {
            "contact" => Some(Self::Contact),
            "consent" => Some(Self::Consent),
            "ctx" => Some(Self::Ctx),
            _ => None,
        }
    }
}

/// A mistake found without running the script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Finding {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

fn finding(pos: Position, message: String) -> Finding {
    Finding {
        line: pos.line().unwrap_or(0),
        column: pos.position().unwrap_or(0),
        message,
    }
}

fn at(pos: Position) -> (usize, usize) {
    (pos.line().unwrap_or(0), pos.position().unwrap_or(0))
}

/// A function body's extent, and what its variables hold.
struct Scope {
    start: (usize, usize),
    end: (usize, usize),
    /// `None`: the name is bound to something else too, so it is not checked.
    vars: HashMap<String, Option<Kind>>,
}

struct Checker {
    scopes: Vec<Scope>,
    /// Targets of assignments: writing a new key is allowed, so they are not reads to check.
    written: Vec<*const Expr>,
    /// Keys a script adds to a map (`consent.note = 1`): reading them back is fine.
    added: Vec<(Kind, String)>,
    findings: Vec<Finding>,
}

impl Checker {
    /// The innermost function containing `pos` (closures are functions within functions).
    fn scope_at(&self, pos: Position) -> Option<usize> {
        let p = at(pos);
        self.scopes
            .iter()
            .enumerate()
            .filter(|(_, s)| s.start <= p && p <= s.end)
            .min_by_key(|(_, s)| (s.end.0 - s.start.0, s.end.1.abs_diff(s.start.1)))
            .map(|(i, _)| i)
    }

    fn var(&self, scope: Option<usize>, name: &str) -> Option<Kind> {
        self.scopes.get(scope?)?.vars.get(name).copied().flatten()
    }

    fn bind(&mut self, scope: Option<usize>, name: &str, kind: Option<Kind>) {
        let Some(s) = scope.and_then(|i| self.scopes.get_mut(i)) else {
            return;
        };
        s.vars
            .entry(name.to_owned())
            .and_modify(|k| {
                if *k != kind {
                    *k = None;
                }
            })
            .or_insert(kind);
    }

    /// The kind of map an expression evaluates to, if known: a variable, or a chain of
    /// properties from one (`ctx.list`).
    fn resolve(&self, scope: Option<usize>, expr: &Expr) -> Option<Kind> {
        match expr {
            Expr::Variable(v, ..) => self.var(scope, v.1.as_str()),
            Expr::Dot(..) => {
                let (kind, last) = self.last_property(scope, expr)?;
                kind.child(last)
            }
            _ => None,
        }
    }

    /// For a plain chain of properties on a known map (`ctx.list.doi`): the kind of map the
    /// last property is read from, and its name.
    fn last_property<'e>(&self, scope: Option<usize>, expr: &'e Expr) -> Option<(Kind, &'e str)> {
        let Expr::Dot(x, ..) = expr else { return None };
        let mut kind = self.resolve(scope, &x.lhs)?;
        let mut rhs = &x.rhs;
        loop {
            match rhs {
                Expr::Property(p, ..) => return Some((kind, p.2.as_str())),
                Expr::Dot(y, ..) => match &y.lhs {
                    Expr::Property(p, ..) => {
                        kind = kind.child(p.2.as_str())?;
                        rhs = &y.rhs;
                    }
                    _ => return None,
                },
                _ => return None,
            }
        }
    }

    fn key(&mut self, kind: Kind, key: &str, pos: Position) -> bool {
        if kind.keys().contains(&key) || self.added.iter().any(|(k, n)| *k == kind && n == key) {
            return true;
        }
        let hint = kind
            .keys()
            .iter()
            .filter(|k| edit_distance(k, key) <= 2)
            .min_by_key(|k| edit_distance(k, key))
            .map(|k| format!("did you mean `{k}`? "))
            .unwrap_or_default();
        self.findings.push(finding(
            pos,
            format!(
                "`{}` has no key `{key}`; {hint}its keys are: {}",
                kind.name(),
                kind.keys().join(", ")
            ),
        ));
        false
    }

    /// Check the properties read along `rhs`, the right side of a `.` on a `kind` map.
    fn chain(&mut self, mut kind: Kind, mut rhs: &Expr) {
        loop {
            let (name, pos, rest) = match rhs {
                Expr::Property(p, pos) => (p.2.as_str(), *pos, None),
                Expr::Dot(y, ..) => match &y.lhs {
                    Expr::Property(p, pos) => (p.2.as_str(), *pos, Some(&y.rhs)),
                    _ => return,
                },
                Expr::Index(y, ..) => match &y.lhs {
                    Expr::Property(p, pos) => {
                        self.key(kind, p.2.as_str(), *pos);
                        return;
                    }
                    _ => return,
                },
                _ => return,
            };
            if !self.key(kind, name, pos) {
                return;
            }
            match (kind.child(name), rest) {
                (Some(k), Some(r)) => {
                    kind = k;
                    rhs = r;
                }
                _ => return,
            }
        }
    }

    fn expr(&mut self, expr: &Expr) {
        if self.written.contains(&(expr as *const Expr)) {
            return;
        }
        match expr {
            Expr::Dot(x, ..) => {
                if let Expr::Variable(..) = x.lhs {
                    let scope = self.scope_at(x.lhs.position());
                    if let Some(kind) = self.resolve(scope, &x.lhs) {
                        self.chain(kind, &x.rhs);
                    }
                }
            }
            Expr::Index(x, ..) => {
                if let (Expr::Variable(..), Expr::StringConstant(key, pos)) = (&x.lhs, &x.rhs) {
                    let scope = self.scope_at(x.lhs.position());
                    if let Some(kind) = self.resolve(scope, &x.lhs) {
                        self.key(kind, key.as_str(), *pos);
                    }
                }
            }
            Expr::Map(x, ..) => {
                for (ident, value) in &x.0 {
                    if ident.name == "action"
                        && let Expr::StringConstant(s, pos) = value
                    {
                        self.action(s.as_str(), *pos);
                    }
                }
            }
            // A map of constants folded by the optimiser.
            Expr::DynamicConstant(d, pos) => {
                if let Some(action) = d
                    .read_lock::<rhai::Map>()
                    .and_then(|m| m.get("action").and_then(|a| a.clone().into_string().ok()))
                {
                    self.action(&action, *pos);
                }
            }
            _ => {}
        }
    }

    /// The key an assignment like `consent.note = 1` or `ctx.list.note = 1` adds, if any.
    fn added_key(&self, lhs: &Expr) -> Option<(Kind, String)> {
        let (kind, key) = self.last_property(self.scope_at(lhs.position()), lhs)?;
        Some((kind, key.to_owned()))
    }

    fn action(&mut self, name: &str, pos: Position) {
        if Action::parse(name).is_none() {
            self.findings.push(finding(pos, unknown_action(name)));
        }
    }
}

/// The message for an action name that is not one of [`Action::ALL`].
pub(crate) fn unknown_action(name: &str) -> String {
    let known: Vec<_> = Action::ALL.iter().map(|a| a.as_str()).collect();
    format!("unknown action `{name}` (known: {})", known.join(", "))
}

/// Levenshtein distance, for "did you mean" on short key names.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur.push((prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Whether an assignment target like `m.action` ends in the property `name`.
fn assigns_property(lhs: &Expr, name: &str) -> bool {
    let mut e = lhs;
    loop {
        match e {
            Expr::Dot(x, ..) => e = &x.rhs,
            Expr::Property(p, ..) => return p.2.as_str() == name,
            _ => return false,
        }
    }
}

/// Every finding in one script, in source order.
pub(crate) fn check(ast: &AST) -> Vec<Finding> {
    let mut c = Checker {
        scopes: Vec::new(),
        written: Vec::new(),
        added: Vec::new(),
        findings: Vec::new(),
    };
    for f in ast.iter_fn_def() {
        let decide = f.name == "decide" && f.params.len() == 3;
        let vars = f
            .params
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let kind = if decide {
                    [Kind::Contact, Kind::Consent, Kind::Ctx].get(i).copied()
                } else {
                    Kind::by_param_name(p.as_str())
                };
                (p.to_string(), kind)
            })
            .collect();
        c.scopes.push(Scope {
            start: at(f.body.start_position()),
            end: at(f.body.end_position()),
            vars,
        });
    }
    // First pass, in source order: what `let` binds, what is reassigned, what is written.
    ast.walk(&mut |path: &[ASTNode]| {
        match path.last() {
            Some(ASTNode::Stmt(Stmt::Var(x, _, pos))) => {
                let scope = c.scope_at(*pos);
                let kind = c.resolve(scope, &x.1);
                c.bind(scope, x.0.name.as_str(), kind);
            }
            Some(ASTNode::Stmt(Stmt::For(x, pos))) => {
                let scope = c.scope_at(*pos);
                c.bind(scope, x.0.name.as_str(), None);
                if let Some(counter) = &x.1 {
                    c.bind(scope, counter.name.as_str(), None);
                }
            }
            Some(ASTNode::Stmt(Stmt::Assignment(x))) => {
                let lhs = &x.1.lhs;
                c.written.push(lhs as *const Expr);
                if let Expr::Variable(v, _, pos) = lhs {
                    let scope = c.scope_at(*pos);
                    c.bind(scope, v.1.as_str(), None);
                }
                if let Some((kind, key)) = c.added_key(lhs) {
                    c.added.push((kind, key));
                }
                if let Expr::StringConstant(s, pos) = &x.1.rhs
                    && assigns_property(lhs, "action")
                {
                    c.action(s.as_str(), *pos);
                }
            }
            _ => {}
        }
        true
    });
    ast.walk(&mut |path: &[ASTNode]| {
        if let Some(ASTNode::Expr(e)) = path.last() {
            c.expr(e);
        }
        true
    });
    c.findings
        .sort_by_key(|f| (f.line, f.column, f.message.clone()));
    c.findings.dedup();
    c.findings
}
