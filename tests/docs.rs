//! The documents and code comments cite only files the repository has.
//!
//! Every backticked path that starts with one of the repository's top-level folders (as in
//! `engine/src/outbox.rs` or `web/src/links/`) must exist, in the Markdown files and in the
//! Rust sources alike, and every Markdown document named anywhere (`README.md`) must be one
//! the repository has. A file moved without its citations fails here.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Folders that are not the project's own text (build output, fuzzing corpora).
const SKIP: &[&str] = &["target", ".git", "corpus", "artifacts"];

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if path.is_dir() {
            if !SKIP.contains(&name.as_ref()) {
                files(&path, out);
            }
        } else if name.ends_with(".md") || name.ends_with(".rs") {
            out.push(path);
        }
    }
}

/// The repository's top-level folders: a backticked path starting with one is a citation.
fn top_level() -> BTreeSet<String> {
    std::fs::read_dir(ROOT)
        .expect("repository root")
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !SKIP.contains(&n.as_str()))
        .collect()
}

/// Backticked spans of `text` that look like repository paths.
fn cited_paths(text: &str, roots: &BTreeSet<String>) -> Vec<String> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .filter_map(|span| {
            let span = span.trim();
            // `path:line`, `path::item` and `path (note)` cite the path.
            let path = span
                .split([':', ' ', ','])
                .next()
                .unwrap_or_default()
                .trim_end_matches(['.', ')']);
            let first = path.split('/').next()?;
            let looks_like_path = path.contains('/')
                && roots.contains(first)
                && !path.contains(['{', '}', '*', '$', '<', '>', '|', '[']);
            looks_like_path.then(|| path.to_owned())
        })
        .collect()
}

#[test]
fn the_citation_scanner_finds_paths_and_leaves_other_code_alone() {
    let roots: BTreeSet<String> = ["engine", "web"].map(String::from).into();
    let text = "see `engine/src/outbox.rs:12`, `web/src/links/` and `a/b.rs`; `engine::Engine`, \
                `engine/migrations/{sqlite,postgres}`";
    assert_eq!(
        cited_paths(text, &roots),
        ["engine/src/outbox.rs", "web/src/links/"]
    );
}

#[test]
fn every_cited_path_exists() {
    let root = Path::new(ROOT);
    let roots = top_level();
    assert!(roots.contains("engine"), "{roots:?}");
    let mut all = Vec::new();
    files(root, &mut all);
    assert!(all.len() > 50, "found only {} files", all.len());
    let mut missing = Vec::new();
    for file in &all {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        for cited in cited_paths(&text, &roots) {
            if !root.join(&cited).exists() {
                let shown = file.strip_prefix(root).unwrap_or(file);
                missing.push(format!("{}: `{cited}`", shown.display()));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "cited but not in the repository:\n{}",
        missing.join("\n")
    );
}

/// Every Markdown file name written in `text` (a document cited by name).
fn cited_documents(text: &str) -> Vec<&str> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        .map(|w| w.trim_matches('.'))
        .filter(|w| w.len() > 3 && w.ends_with(".md"))
        .collect()
}

#[test]
fn the_document_scanner_finds_md_names() {
    assert_eq!(
        cited_documents("see README.md, `docs/writing-rules.md` and SECURITY.md."),
        ["README.md", "writing-rules.md", "SECURITY.md"]
    );
}

#[test]
fn every_document_cited_by_name_is_in_the_repository() {
    let root = Path::new(ROOT);
    let mut all = Vec::new();
    files(root, &mut all);
    let have: BTreeSet<String> = all
        .iter()
        .filter_map(|f| f.file_name()?.to_str())
        .filter(|n| n.ends_with(".md"))
        .map(str::to_owned)
        .collect();
    assert!(have.contains("README.md"), "{have:?}");
    let mut missing = Vec::new();
    for file in &all {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        for name in cited_documents(&text) {
            if !have.contains(name) {
                let shown = file.strip_prefix(root).unwrap_or(file);
                missing.push(format!("{}: {name}", shown.display()));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "documents cited but not in the repository:\n{}",
        missing.join("\n")
    );
}
