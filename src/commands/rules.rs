//! `rules check`, `rules test` and `rules simulate`.

use std::path::Path;

use anyhow::Context as _;
use optinsync_engine::config::LoadedConfig;
use optinsync_engine::rules::{self, RuleSet, RulesError};

use super::{load_config, open_store};
use crate::Failure;

fn rules_dir(config: &LoadedConfig, explicit: Option<&Path>) -> std::path::PathBuf {
    explicit
        .map(Path::to_path_buf)
        .unwrap_or_else(|| config.config.rules.dir.clone())
}

/// `rules check` (compile + tests, quiet on success) and `rules test` (every test listed).
pub async fn rules_check(path: &Path, dir: Option<&Path>, list_tests: bool) -> Result<(), Failure> {
    let config = load_config(path)?;
    let dir = rules_dir(&config, dir);
    let set = RuleSet::load_dir(&dir)
        .map_err(|e| Failure::Config(anyhow::anyhow!("rules check FAILED:\n{e}")))?;
    for (file, hash) in set.scripts() {
        println!("compiled {} (sha256 {})", file.display(), &hash[..16]);
    }
    for (file, hash) in set.helpers() {
        println!(
            "compiled helper {} (sha256 {})",
            file.display(),
            &hash[..16]
        );
    }
    let report = set.run_tests();
    if list_tests {
        let failed: std::collections::BTreeSet<(String, usize)> = report
            .failures
            .iter()
            .map(|f| (f.file.display().to_string(), f.line))
            .collect();
        for t in set.tests() {
            let ok = !failed.contains(&(t.file.display().to_string(), t.line));
            println!(
                "{} {}:{}: {}",
                if ok { "ok  " } else { "FAIL" },
                t.file.display(),
                t.line,
                t.name
            );
        }
    }
    if !report.failures.is_empty() {
        return Err(Failure::Config(anyhow::anyhow!(
            "rules check FAILED:\n{}",
            RulesError::TestsFailed(report.failures)
        )));
    }
    println!(
        "rules ok: {} script(s), {} test(s) passed, rule set sha256 {}",
        set.scripts().len(),
        report.passed,
        set.hash()
    );
    Ok(())
}

pub async fn rules_simulate(
    path: &Path,
    dir: Option<&Path>,
    samples: usize,
    json: bool,
) -> Result<(), Failure> {
    let config = load_config(path)?;
    let candidate_dir = rules_dir(&config, dir);
    let candidate = RuleSet::load_checked(&candidate_dir).map_err(|e| {
        Failure::Config(anyhow::anyhow!(
            "candidate rules in {} are not usable:\n{e}",
            candidate_dir.display()
        ))
    })?;
    // The rules in force are the configured directory's; if it is broken, compare with nothing.
    let running = match RuleSet::load_checked(&config.config.rules.dir) {
        Ok(r) => Some(r),
        Err(e) => {
            eprintln!("note: the configured rules do not load ({e}); showing the candidate alone");
            None
        }
    };
    let store = open_store(&config).await?;
    let engine_tokens = config.config.tokens.keys();
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let started = std::time::Instant::now();
    let report = rules::simulate::simulate(
        store.clone(),
        &config.config.lists,
        &engine_tokens,
        &candidate,
        running.as_ref(),
        samples,
        |n| {
            if tty {
                eprint!("\rsimulating: {n} contacts");
            }
        },
    )
    .await
    .context("reading contacts for the simulation")?;
    if tty {
        eprintln!();
    }
    if json {
        let mut v = serde_json::to_value(&report).context("formatting JSON")?;
        v["diff"] = serde_json::to_value(report.diff()).context("formatting JSON")?;
        println!(
            "{}",
            serde_json::to_string_pretty(&v).context("formatting JSON")?
        );
        return Ok(());
    }
    println!(
        "simulated {} contacts ({} contact-list pairs) in {:.1}s; nothing was changed",
        report.contacts,
        report.pairs,
        started.elapsed().as_secs_f64()
    );
    println!("candidate rules {} would:", candidate_dir.display());
    print_outcomes(&report.candidate);
    if let Some(running) = &report.running {
        println!(
            "rules in force {} would:",
            config.config.rules.dir.display()
        );
        print_outcomes(running);
        let diff = report.diff();
        if diff.is_empty() && report.changed_pairs == 0 {
            println!("difference: none");
        } else {
            println!(
                "difference (candidate minus in force), {} pairs decided differently:",
                report.changed_pairs
            );
            for (action, delta) in diff {
                println!("  {action:<18} {delta:+}");
            }
        }
    }
    Ok(())
}

fn print_outcomes(o: &rules::simulate::Outcomes) {
    if o.would_apply.is_empty() && o.refused.is_empty() && o.rule_errors == 0 {
        println!("  nothing");
    }
    for (action, n) in &o.would_apply {
        let sample = o
            .samples
            .get(action)
            .map(|s| s.join(", "))
            .unwrap_or_default();
        println!("  {action:<18} {n:>8}   e.g. {sample}");
    }
    for (action, n) in &o.refused {
        println!("  {action:<18} {n:>8}   refused by the consent invariants");
    }
    if o.rule_errors > 0 {
        println!(
            "  rule errors        {:>8}   (those contacts would be left unchanged)",
            o.rule_errors
        );
    }
}
