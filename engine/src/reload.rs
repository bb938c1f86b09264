//! Hot reload: watch the rules **directory** (editors save by writing a temp file and renaming
//! it over the original, which breaks a watch on the file itself), debounce, and reload through
//! [`Engine::reload_rules`] — the same checked path as start-up. A broken set never replaces the
//! running one.

use std::sync::Arc;
use std::time::Duration;

use notify::RecursiveMode;
use notify_debouncer_full::{DebounceEventResult, Debouncer, RecommendedCache, new_debouncer};

use crate::engine::{Engine, ReloadRecord};
use crate::rules::{RuleSet, RulesError};

/// What a reload did.
#[derive(Debug)]
pub enum Reload {
    /// A new, checked rule set is in force.
    Swapped { hash: String },
    /// The files on disk are the rule set already in force.
    Unchanged,
    /// The new files failed to compile or to pass their tests; the old set keeps deciding.
    Rejected(RulesError),
}

impl Engine {
    /// What the last [`Engine::reload_rules`] of this process did; `None` before the first.
    pub fn last_reload(&self) -> Option<ReloadRecord> {
        self.last_reload.lock().ok().and_then(|r| r.clone())
    }

    /// Re-read, compile and test the rule directory; swap it in only if all of that passed.
    pub fn reload_rules(&self) -> Reload {
        let dir = self.config.config.rules.dir.clone();
        let outcome = match RuleSet::load_checked(&dir) {
            Ok(set) if set.hash() == self.rules().hash() => Reload::Unchanged,
            Ok(set) => {
                let hash = set.hash().to_owned();
                self.replace_rules(set);
                Reload::Swapped { hash }
            }
            Err(e) => Reload::Rejected(e),
        };
        let result = match &outcome {
            Reload::Swapped { hash } => {
                tracing::info!(rules = %dir.display(), hash = %hash, "rules reloaded");
                "ok"
            }
            Reload::Unchanged => "unchanged",
            Reload::Rejected(e) => {
                tracing::error!(rules = %dir.display(), "rules NOT reloaded; the previous rules stay in force:\n{e}");
                match e {
                    RulesError::TestsFailed(_) => "test_failure",
                    _ => "compile_error",
                }
            }
        };
        metrics::counter!("optinsync_rules_reload_total", "result" => result).increment(1);
        if let Ok(mut last) = self.last_reload.lock() {
            *last = Some(ReloadRecord {
                at: chrono::Utc::now(),
                result,
                error: match &outcome {
                    Reload::Rejected(e) => Some(e.to_string()),
                    _ => None,
                },
            });
        }
        outcome
    }
}

/// Keeps the watch alive; dropping it stops watching.
pub struct Watcher {
    _debouncer: Debouncer<notify::RecommendedWatcher, RecommendedCache>,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Watcher")
    }
}

fn is_rule_file(path: &std::path::Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    (name.ends_with(".rhai") || name.ends_with(".tests.toml")) && !name.starts_with('.')
}

/// Watch the rules directory; after each debounced batch that touches a rule or test file,
/// reload and call `on_swap` if a new set went in.
pub fn watch(
    engine: Arc<Engine>,
    on_swap: impl Fn() + Send + Sync + 'static,
) -> Result<Watcher, notify::Error> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<DebounceEventResult>();
    let mut debouncer = new_debouncer(Duration::from_millis(250), None, move |res| {
        let _ = tx.send(res);
    })?;
    let dir = engine.config.config.rules.dir.clone();
    debouncer.watch(&dir, RecursiveMode::NonRecursive)?;
    tokio::spawn(async move {
        while let Some(res) = rx.recv().await {
            let relevant = match &res {
                Ok(events) => events
                    .iter()
                    .any(|e| e.paths.iter().any(|p| is_rule_file(p))),
                Err(errors) => {
                    for e in errors {
                        tracing::warn!(error = %e, "rules watcher error");
                    }
                    true
                }
            };
            if !relevant {
                continue;
            }
            let engine = Arc::clone(&engine);
            // Compiling and testing is CPU work; keep it off the async workers.
            let outcome = tokio::task::spawn_blocking(move || engine.reload_rules()).await;
            if let Ok(Reload::Swapped { .. }) = outcome {
                on_swap();
            }
        }
    });
    Ok(Watcher {
        _debouncer: debouncer,
    })
}
