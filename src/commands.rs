//! The commands behind the CLI. Start-up goes through [`boot`], the same path for every
//! command, so `run`, `sync --once` and the inspection commands see the same configuration.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use optinsync_engine::config::LoadedConfig;
use optinsync_engine::engine::Engine;
use optinsync_engine::ledger::ChainVerifier;
use optinsync_engine::rules::{self, RuleSet, RulesError};
use optinsync_engine::store::{self, Store};
use optinsync_engine::{email, http};

use crate::{Failure, registry};

fn load_config(path: &Path) -> Result<LoadedConfig, Failure> {
    LoadedConfig::load(path).map_err(|e| Failure::Config(e.into()))
}

async fn open_store(config: &LoadedConfig) -> Result<Arc<dyn Store>, Failure> {
    let store = store::open(&config.config.store.url)
        .await
        .context("opening the store")?;
    store.migrate().await.context("migrating the store")?;
    Ok(store)
}

/// Config, store, rules, connectors: everything a command that acts needs.
async fn boot(path: &Path) -> Result<Arc<Engine>, Failure> {
    let config = load_config(path)?;
    let rules =
        RuleSet::load_checked(&config.config.rules.dir).map_err(|e| Failure::Config(e.into()))?;
    let connectors = registry::build(&config).map_err(|e| Failure::Config(e.into()))?;
    let store = open_store(&config).await?;
    let engine = Arc::new(Engine::new(Arc::new(config), store, connectors, rules));
    // Quota budgets survive restarts: a restart must not reset a vendor's rate limits.
    engine
        .restore_connector_state()
        .await
        .context("restoring connector state")?;
    Ok(engine)
}

/// Vector-style start-up healthchecks: report, and refuse to start on a broken connector.
async fn healthchecks(engine: &Engine) -> Result<(), Failure> {
    let c = &engine.connectors;
    let checks = [
        ("crm", c.crm.health().await),
        ("campaigns", c.campaigns.health().await),
        ("mail", c.mail.health().await),
    ];
    for (name, result) in checks {
        match result {
            Ok(h) if h.ok => {
                tracing::info!(connector = name, detail = %h.detail, "healthcheck passed")
            }
            Ok(h) => {
                return Err(Failure::Runtime(anyhow::anyhow!(
                    "{name} connector is unhealthy: {}",
                    h.detail
                )));
            }
            // A setting to fix (e.g. a refused refresh token) is a configuration error: exit 2.
            Err(e @ optinsync_plugin_api::ConnectorError::Config { .. }) => {
                return Err(Failure::Config(anyhow::anyhow!("{name} connector: {e}")));
            }
            Err(e) => {
                return Err(Failure::Runtime(anyhow::anyhow!(
                    "{name} connector healthcheck failed: {e}"
                )));
            }
        }
    }
    Ok(())
}

fn worker_id() -> String {
    format!("{}-{}", std::process::id(), &uuid_short())
}

fn uuid_short() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{nanos:08x}")
}

/// One pull-decide pass; returns a summary line.
async fn pass(engine: &Engine, show_progress: bool) -> anyhow::Result<String> {
    let crm = engine
        .pull_crm(|s| {
            if show_progress {
                eprint!(
                    "\rCRM: {} records read, {} skipped, {} consent changes",
                    s.records, s.invalid, s.changes
                );
            }
        })
        .await
        .context("pulling CRM changes")?;
    if show_progress {
        eprintln!();
    }
    let campaigns = engine
        .pull_campaigns()
        .await
        .context("pulling campaigns status")?;
    let decided = engine.decide_all().await.context("running the rules")?;
    Ok(format!(
        "{} CRM records ({} skipped as invalid), {} CRM consent changes, {} campaigns changes, {} rule changes ({} refused, {} rule errors)",
        crm.records,
        crm.invalid,
        crm.changes,
        campaigns,
        decided.changes,
        decided.refused,
        decided.rule_errors
    ))
}

pub async fn sync_once(path: &Path) -> Result<(), Failure> {
    let engine = boot(path).await?;
    healthchecks(&engine).await?;
    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let summary = pass(&engine, progress).await?;
    let delivered = engine
        .drain_outbox(&worker_id())
        .await
        .context("delivering the outbox")?;
    engine
        .save_connector_state()
        .await
        .context("saving connector state")?;
    let counts = engine
        .store
        .outbox_counts()
        .await
        .context("counting the outbox")?;
    println!(
        "sync: {summary}; delivered {} effects, {} to retry, {} dead letters (outbox: {} pending)",
        delivered.done, delivered.retried, delivered.dead, counts.pending
    );
    Ok(())
}

pub async fn run(path: &Path) -> Result<(), Failure> {
    let engine = boot(path).await?;
    healthchecks(&engine).await?;
    let listen = engine.config.config.server.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen} (server.listen)"))?;
    tracing::info!(%listen, public_url = %engine.config.config.server.public_url, "HTTP server listening");

    optinsync_engine::metrics::install();
    let pass_now = Arc::new(tokio::sync::Notify::new());
    // Keep the watcher alive for the whole run; a failure to watch is not fatal (SIGHUP and
    // restarts still reload), but it is said loudly.
    let _watcher = {
        let pass_now = Arc::clone(&pass_now);
        match rules::watch::watch(Arc::clone(&engine), move || pass_now.notify_one()) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::error!(error = %e, "cannot watch the rules directory; reload with SIGHUP");
                None
            }
        }
    };
    spawn_sighup_reload(Arc::clone(&engine), Arc::clone(&pass_now));

    let stop = Arc::new(AtomicBool::new(false));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    {
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            shutdown_signal().await;
            tracing::info!("shutdown requested; finishing the current step");
            stop.store(true, Ordering::SeqCst);
            let _ = stop_tx.send(true);
        });
    }
    let server = {
        let mut rx = stop_rx.clone();
        let engine = Arc::clone(&engine);
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            http::serve(engine, listener, shutdown).await
        })
    };

    let worker = worker_id();
    let poll = engine.config.config.sync.poll_interval.0;
    let mut next_pass = tokio::time::Instant::now();
    let mut rx = stop_rx;
    // Steps are never cancelled half-way: shutdown waits for the running step, so a
    // commit or a delivery is either finished or not started.
    while !stop.load(Ordering::SeqCst) {
        if tokio::time::Instant::now() >= next_pass {
            // Connector upkeep (e.g. the Zoho CRM notification channel); polling goes on if it fails.
            if let Err(e) = engine.connectors.crm.maintain().await {
                tracing::warn!(error = %e, "CRM connector upkeep failed; polling goes on");
            }
            match pass(&engine, false).await {
                Ok(summary) => tracing::info!("sync pass: {summary}"),
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "sync pass failed; will retry next interval")
                }
            }
            next_pass = tokio::time::Instant::now() + poll;
        }
        if stop.load(Ordering::SeqCst) {
            break;
        }
        match engine.deliver_due(&worker, 20).await {
            Ok(s) if s.done + s.retried + s.dead > 0 => {
                if let Err(e) = engine.save_connector_state().await {
                    tracing::warn!(error = %e, "connector state not saved");
                }
                tracing::info!(
                    done = s.done,
                    retried = s.retried,
                    dead = s.dead,
                    "outbox delivered"
                );
                continue;
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "outbox delivery failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = engine.outbox_wake.notified() => {}
            // New rules: decide again now rather than at the next interval.
            _ = pass_now.notified() => next_pass = tokio::time::Instant::now(),
            _ = rx.wait_for(|s| *s) => {}
        }
    }
    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            return Err(Failure::Runtime(
                anyhow::Error::new(e).context("HTTP server failed"),
            ));
        }
        Err(e) => {
            return Err(Failure::Runtime(anyhow::anyhow!(
                "HTTP server task failed: {e}"
            )));
        }
    }
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

pub async fn migrate(path: &Path) -> Result<(), Failure> {
    let config = load_config(path)?;
    open_store(&config).await?;
    println!("migrations applied");
    Ok(())
}

pub async fn ledger_verify(path: &Path) -> Result<(), Failure> {
    let config = load_config(path)?;
    let store = open_store(&config).await?;
    let mut verifier = ChainVerifier::default();
    let mut after = 0;
    let mut head = None;
    loop {
        let page = store
            .ledger_page(after, 1000)
            .await
            .context("reading the ledger")?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        for ev in &page {
            verifier.check(ev).map_err(|e| {
                Failure::Runtime(anyhow::anyhow!("ledger verification FAILED: {e}"))
            })?;
        }
        head = Some((last.seq, last.hash.clone()));
    }
    match head {
        Some((seq, hash)) => println!(
            "ledger verified: {} events, head seq {seq} hash {hash}",
            verifier.checked
        ),
        None => println!("ledger verified: empty"),
    }
    Ok(())
}

pub async fn contact_show(path: &Path, raw_email: &str, json: bool) -> Result<(), Failure> {
    let config = load_config(path)?;
    let address = email::normalise(raw_email)
        .map_err(|e| Failure::Config(anyhow::anyhow!("`{raw_email}`: {e}")))?;
    let store = open_store(&config).await?;
    let Some(contact) = store
        .contact_by_email(&address)
        .await
        .context("looking up the contact")?
    else {
        return Err(Failure::Runtime(anyhow::anyhow!(
            "no contact with address {address}"
        )));
    };
    let consents = store
        .consents_of_contact(&contact.id)
        .await
        .context("reading consent")?;
    let events = store
        .events_of_contact(&contact.id)
        .await
        .context("reading the ledger")?;
    if json {
        let value = serde_json::json!({
            "contact": contact,
            "consents": consents.iter().map(|(list, c)| serde_json::json!({ "list": list, "consent": c })).collect::<Vec<_>>(),
            "events": events.iter().map(|e| {
                let mut v = serde_json::to_value(e).unwrap_or_default();
                v["evidence"] = serde_json::from_str(&e.evidence).unwrap_or_default();
                v
            }).collect::<Vec<_>>(),
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&value).context("formatting JSON")?
        );
        return Ok(());
    }
    println!("contact {} <{}>", contact.id, contact.email);
    println!("  language: {}", contact.language.as_deref().unwrap_or("-"));
    println!(
        "  CRM records: {}",
        if contact.crm_records.is_empty() {
            "-".to_owned()
        } else {
            contact.crm_records.join(", ")
        }
    );
    println!("consent:");
    if consents.is_empty() {
        println!("  (none recorded)");
    }
    for (list, c) in &consents {
        let confirmed = c
            .confirmed_at
            .map(|t| format!(", confirmed {}", t.to_rfc3339()))
            .unwrap_or_default();
        println!(
            "  {list:<16} {:<12} since {}{confirmed}",
            c.state.as_str(),
            c.since.to_rfc3339()
        );
    }
    println!("history:");
    for e in &events {
        println!(
            "  #{:<5} {}  {:<12} {} -> {}  {} (by {})",
            e.seq, e.at, e.list_id, e.from_state, e.to_state, e.kind, e.source
        );
        let ev = e.evidence();
        let fields = [
            ("reason", ev.reason),
            (
                "rule",
                ev.rule_file.map(|f| {
                    format!(
                        "{f} sha256:{}",
                        ev.rule_hash
                            .as_deref()
                            .map(|h| &h[..h.len().min(16)])
                            .unwrap_or("?")
                    )
                }),
            ),
            ("crm record", ev.crm_record),
            ("token", ev.token_id),
            ("message-id", ev.message_id),
            ("content sha256", ev.content_hash),
            ("mail content sha256", ev.mail_content_hash),
            ("method", ev.method),
            ("ip", ev.ip),
            ("user agent", ev.user_agent),
            ("detail", ev.detail),
        ];
        for (name, value) in fields {
            if let Some(v) = value {
                println!("           {name}: {v}");
            }
        }
    }
    Ok(())
}

#[cfg(unix)]
fn spawn_sighup_reload(engine: Arc<Engine>, pass_now: Arc<tokio::sync::Notify>) {
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP");
            return;
        }
    };
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading rules");
            let engine = Arc::clone(&engine);
            if let Ok(rules::watch::Reload::Swapped { .. }) =
                tokio::task::spawn_blocking(move || engine.reload_rules()).await
            {
                pass_now.notify_one();
            }
        }
    });
}

#[cfg(not(unix))]
fn spawn_sighup_reload(_engine: Arc<Engine>, _pass_now: Arc<tokio::sync::Notify>) {}

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
    let engine_tokens = {
        let t = &config.config.tokens;
        let previous = t
            .previous
            .iter()
            .map(|k| (k.key_id.clone(), k.secret.as_bytes().to_vec()))
            .collect();
        optinsync_engine::tokens::TokenKeys::new(&t.key_id, t.secret.as_bytes(), previous)
    };
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let started = std::time::Instant::now();
    let report = rules::simulate::simulate(
        store.as_ref(),
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

pub async fn import_existing(path: &Path, list_id: &str) -> Result<(), Failure> {
    let engine = boot(path).await?;
    let Some(list) = engine.list(list_id).cloned() else {
        let known: Vec<&str> = engine.lists().iter().map(|l| l.id.as_str()).collect();
        return Err(Failure::Config(anyhow::anyhow!(
            "no list `{list_id}` in the config (lists: {})",
            known.join(", ")
        )));
    };
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let stats = engine
        .import_existing(&list, |s| {
            if tty {
                eprint!(
                    "\rimporting: {} members read, {} asserted",
                    s.members, s.asserted
                );
            }
        })
        .await
        .context("importing the existing list")?;
    if tty {
        eprintln!();
    }
    println!(
        "import-existing {}: {} members; {} taken in as asserted (the rules will ask them to confirm), {} already known, {} removed (withdrawn earlier), {} invalid",
        list.id, stats.members, stats.asserted, stats.already_known, stats.removed, stats.invalid
    );
    Ok(())
}

pub async fn status(path: &Path, json: bool) -> Result<(), Failure> {
    let config = load_config(path)?;
    let store = open_store(&config).await?;
    let summary = store.consent_summary().await.context("reading consent")?;
    let outbox = store.outbox_counts().await.context("reading the outbox")?;
    let now = chrono::Utc::now();
    // Open signups settle by the end of their list's pending window (asserted ones are about
    // to be asked, so their window starts now).
    let mut forecast = std::collections::BTreeMap::new();
    for row in &summary {
        let Some(list) = config.list(&row.list_id) else {
            continue;
        };
        let window = chrono::Duration::seconds(list.pending_expiry.secs());
        let end = match row.state.as_str() {
            "pending" => Some(row.newest_since + window),
            "asserted" => Some(now + window),
            "revalidating" => {
                Some(row.newest_since + chrono::Duration::seconds(list.revalidation_grace.secs()))
            }
            _ => None,
        };
        if let Some(end) = end {
            let e = forecast.entry(row.list_id.clone()).or_insert(end);
            *e = (*e).max(end);
        }
    }
    if json {
        let v = serde_json::json!({ "consent": summary, "outbox": outbox, "settled_by": forecast });
        println!(
            "{}",
            serde_json::to_string_pretty(&v).context("formatting JSON")?
        );
        return Ok(());
    }
    for list in &config.config.lists {
        println!("{} ({})", list.id, list.name);
        let rows: Vec<_> = summary.iter().filter(|r| r.list_id == list.id).collect();
        if rows.is_empty() {
            println!("  no consent recorded yet");
        }
        for r in rows {
            println!("  {:<13} {:>9}", r.state, r.count);
        }
        if let Some(end) = forecast.get(&list.id) {
            println!(
                "  open signups settle by {} (confirm, or lapse at the end of their window)",
                end.format("%Y-%m-%d %H:%M UTC")
            );
        }
    }
    println!(
        "outbox: {} pending, {} done, {} dead letters",
        outbox.pending, outbox.done, outbox.dead
    );
    Ok(())
}
