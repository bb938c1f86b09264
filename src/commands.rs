//! The commands behind the CLI. Start-up goes through [`boot`], the same path for every
//! command, so `run`, `sync --once` and the inspection commands see the same configuration.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use optinsync_engine::config::LoadedConfig;
use optinsync_engine::email;
use optinsync_engine::engine::{Engine, StoreReads};
use optinsync_engine::ledger::ChainVerifier;
use optinsync_engine::rules::{self, RuleSet, RulesError};
use optinsync_engine::store::{self, Store};
use optinsync_web::http;

use crate::{Failure, registry};

pub(crate) fn load_config(path: &Path) -> Result<LoadedConfig, Failure> {
    LoadedConfig::load(path).map_err(|e| Failure::Config(e.into()))
}

pub(crate) async fn open_store(config: &LoadedConfig) -> Result<Arc<dyn Store>, Failure> {
    let store = store::open(&config.config.store.url)
        .await
        .context("opening the store")?;
    store.migrate().await.context("migrating the store")?;
    Ok(store)
}

/// Config, store, rules, connectors: everything a command that acts needs.
pub(crate) async fn boot(path: &Path) -> Result<Arc<Engine>, Failure> {
    let config = load_config(path)?;
    let rules =
        RuleSet::load_checked(&config.config.rules.dir).map_err(|e| Failure::Config(e.into()))?;
    // On PostgreSQL several instances share the vendors' quotas (and the connectors' own
    // bookkeeping) through the store; SQLite has one instance per file (`instance_lock`),
    // which keeps them in memory.
    let quota = optinsync_engine::quota::SharedQuota::new();
    let shared = !config.config.store.url.starts_with("sqlite://");
    let connectors = registry::build(
        &config,
        shared.then(|| {
            (
                Arc::clone(&quota) as Arc<dyn optinsync_plugin_api::QuotaLedger>,
                Arc::clone(&quota) as Arc<dyn optinsync_plugin_api::SharedMarks>,
            )
        }),
    )
    .map_err(|e| Failure::Config(e.into()))?;
    let store = open_store(&config).await?;
    quota.attach(Arc::clone(&store));
    let engine = Arc::new(Engine::new(Arc::new(config), store, connectors, rules));
    // A key that signed mailed (never-expiring) unsubscribe links must stay configured.
    use optinsync_engine::signing_keys::SigningKeysError;
    match engine.check_signing_keys().await {
        Ok(()) => {}
        Err(e @ (SigningKeysError::Dropped { .. } | SigningKeysError::Corrupt(_))) => {
            return Err(Failure::Config(anyhow::anyhow!("{}: {e}", path.display())));
        }
        Err(e) => {
            return Err(Failure::Runtime(
                anyhow::Error::new(e).context("checking the token keys"),
            ));
        }
    }
    // Quota budgets survive restarts: a restart must not reset a vendor's rate limits.
    engine
        .restore_connector_state()
        .await
        .context("restoring connector state")?;
    engine
        .canonicalise_stored_addresses()
        .await
        .context("canonicalising stored addresses")?;
    Ok(engine)
}

/// Vector-style start-up healthchecks: report, and refuse to start on a broken connector.
async fn healthchecks(engine: &Engine) -> Result<(), Failure> {
    let c = &engine.connectors();
    let checks = [
        ("crm", retry_transient("crm", || c.crm.health()).await),
        (
            "campaigns",
            retry_transient("campaigns", || c.campaigns.health()).await,
        ),
        ("mail", retry_transient("mail", || c.mail.health()).await),
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

/// A healthcheck that fails transiently (timeout, 5xx, 429) is asked again, 5 times over about
/// 8 s, before start-up gives up: a vendor's hiccup should not stop the daemon from starting.
async fn retry_transient<F, Fut>(
    name: &str,
    mut check: F,
) -> optinsync_plugin_api::ConnectorResult<optinsync_plugin_api::Health>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<
            Output = optinsync_plugin_api::ConnectorResult<optinsync_plugin_api::Health>,
        >,
{
    let mut wait = Duration::from_millis(500);
    let mut attempt = 1;
    loop {
        match check().await {
            Err(optinsync_plugin_api::ConnectorError::Transient { message, .. }) if attempt < 5 => {
                tracing::warn!(connector = name, attempt, error = %message, "healthcheck failed transiently; asking again");
                tokio::time::sleep(wait).await;
                wait *= 2;
                attempt += 1;
            }
            other => return other,
        }
    }
}

pub(crate) fn worker_id() -> String {
    format!("{}-{}", std::process::id(), &uuid_short())
}

/// This machine's name, to tell this host's outbox claims from other hosts'.
fn host_name() -> String {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
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
    let started = chrono::Utc::now();
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
    // The pull ran the rules for every contact it stored; the rest are decided now.
    let decided = engine
        .decide_all_but_updated_since(Some(started))
        .await
        .context("running the rules")?;
    Ok(format!(
        "{} CRM records ({} skipped as invalid, {} erased addresses not stored again), {} CRM consent changes, {} campaigns changes, {} rule changes ({} refused, {} rule errors)",
        crm.records,
        crm.invalid,
        crm.erased,
        crm.changes,
        campaigns,
        crm.rule_changes + decided.changes,
        crm.rule_refused + decided.refused,
        crm.rule_errors + decided.rule_errors
    ))
}

/// `deliver = false` (`--no-deliver`): pull and decide only; the outbox waits for `run`.
pub async fn sync_once(path: &Path, deliver: bool) -> Result<(), Failure> {
    let engine = boot(path).await?;
    healthchecks(&engine).await?;
    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let summary = pass(&engine, progress).await?;
    let delivered = if deliver {
        engine
            .drain_outbox(&worker_id())
            .await
            .context("delivering the outbox")?
    } else {
        Default::default()
    };
    engine
        .save_connector_state()
        .await
        .context("saving connector state")?;
    let counts = engine
        .reads()
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
    // SQLite: one daemon per database file, refused before anything is touched.
    let instance = crate::instance_lock::acquire(&load_config(path)?.config.store.url)?;
    // Take SIGTERM over before the port answers: a supervisor that stops the daemon as soon
    // as it listens must get the graceful stop (exit 0), not the default kill.
    // SIGHUP likewise: its default action ends the process, and a supervisor's `ExecReload`
    // may send it as soon as the port answers. Every handler is in place before the bind.
    #[cfg(unix)]
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    #[cfg(not(unix))]
    let term = ();
    #[cfg(unix)]
    let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    #[cfg(not(unix))]
    let hup = ();
    tracing::debug!("signal handlers installed (SIGTERM, SIGHUP)");
    let engine = boot(path).await?;
    if let Some(lock) = &instance {
        tracing::info!(lock_file = %lock.path.display(), "SQLite: this instance holds the database's instance lock");
    }
    healthchecks(&engine).await?;
    // `/readyz` answers 200 only from here on (and while the store and circuits are fine).
    engine.circuits().set_ready();
    let listen = engine.settings().server.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen} (server.listen)"))?;
    tracing::info!(%listen, public_url = %engine.settings().server.public_url, "HTTP server listening");

    optinsync_web::metrics::install();
    let pass_now = Arc::new(tokio::sync::Notify::new());
    // Keep the watcher alive for the whole run; a failure to watch is not fatal (SIGHUP and
    // restarts still reload), but it is said loudly.
    let _watcher = {
        let pass_now = Arc::clone(&pass_now);
        match optinsync_engine::reload::watch(Arc::clone(&engine), move || pass_now.notify_one()) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::error!(error = %e, "cannot watch the rules directory; reload with SIGHUP");
                None
            }
        }
    };
    spawn_sighup_reload(hup, Arc::clone(&engine), Arc::clone(&pass_now));

    let stop = Arc::new(AtomicBool::new(false));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    {
        let stop = Arc::clone(&stop);
        let circuits = Arc::clone(engine.circuits());
        let grace = engine.settings().sync.shutdown_grace.0;
        tokio::spawn(async move {
            shutdown_signal(term).await;
            tracing::info!(
                grace_secs = grace.as_secs(),
                "shutdown requested; finishing the current step"
            );
            // `/readyz` turns 503 at once; claimed outbox rows not started yet are handed back.
            circuits.set_stopping();
            stop.store(true, Ordering::SeqCst);
            let _ = stop_tx.send(true);
            // The bound: a step stuck on a slow vendor does not hold the shutdown forever.
            // Whatever is cut short is safe: an uncommitted transaction rolls back, and a
            // claimed outbox row is retried when its lease ends (`outbox::LEASE`).
            tokio::time::sleep(grace).await;
            tracing::error!(
                grace_secs = grace.as_secs(),
                "shutdown grace period over; exiting with work unfinished"
            );
            std::process::exit(1);
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

    // While this process holds the listen address, no other process on this host does: claims
    // tagged with this host and address but another worker id were left by a predecessor that
    // died (`kill -9`, OOM) between claiming and finishing. Take them back now instead of
    // waiting out `outbox::LEASE`; claims of other hosts and of `sync --once` are left alone.
    let instance = format!("{}/{listen}/", host_name());
    let worker = format!("{instance}{}", worker_id());
    match engine.release_claims(&instance, &worker).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            released = n,
            "outbox rows claimed by a crashed predecessor taken back"
        ),
        Err(e) => {
            tracing::warn!(error = %e, "cannot take back a predecessor's outbox claims; they wait for their lease")
        }
    }
    // Delivery runs beside the jobs, so a long rules pass over a large store never holds up
    // a confirmation mail queued by a webhook or a click.
    let delivery = {
        let engine = Arc::clone(&engine);
        let stop = Arc::clone(&stop);
        let worker = worker.clone();
        let mut rx = stop_rx.clone();
        tokio::spawn(async move {
            // Steps are never cancelled half-way: shutdown waits for the running delivery,
            // so it is either finished or not started.
            while !stop.load(Ordering::SeqCst) {
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
                    _ = engine.outbox_wake().notified() => {}
                    _ = rx.wait_for(|s| *s) => {}
                }
            }
        })
    };
    let poll = engine.settings().sync.poll_interval.0;
    let mut jobs = crate::jobs::Jobs::default();
    let mut rx = stop_rx;
    // Like deliveries, a job is never cancelled half-way.
    while !stop.load(Ordering::SeqCst) {
        // Each job (CRM poll, campaigns poll, rules pass) runs on one instance at a time
        // among those sharing the database, under its own lease (`jobs`).
        jobs.run_due(&engine, &worker).await;
        tokio::select! {
            _ = tokio::time::sleep(poll) => {}
            // New rules: decide again now rather than at the next interval.
            _ = pass_now.notified() => {}
            _ = rx.wait_for(|s| *s) => {}
        }
    }
    if let Err(e) = delivery.await {
        tracing::error!(error = %e, "outbox delivery task failed");
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

/// `term`: the SIGTERM stream, registered at start-up (`None`: it could not be).
#[cfg(unix)]
async fn shutdown_signal(term: Option<tokio::signal::unix::Signal>) {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match term {
            Some(mut s) => {
                s.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

#[cfg(not(unix))]
async fn shutdown_signal(_term: ()) {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
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
    match verify_whole_ledger(store.as_ref()).await? {
        (0, _, _) => println!("ledger verified: empty"),
        (n, seq, hash) => println!("ledger verified: {n} events, head seq {seq} hash {hash}"),
    }
    Ok(())
}

/// `since <time>[, confirmed <time>]` for one consent, as the inspection commands print it.
fn since_text(c: &optinsync_engine::consent::Consent) -> String {
    let confirmed = c
        .confirmed_at
        .map(|t| format!(", confirmed {}", t.to_rfc3339()))
        .unwrap_or_default();
    format!("since {}{confirmed}", c.since.to_rfc3339())
}

/// Normalise `raw_email` (not an address: a usage error) and find its contact.
pub(crate) async fn find_contact(
    store: StoreReads<'_>,
    raw_email: &str,
) -> Result<optinsync_engine::store::Contact, Failure> {
    let address = email::normalise(raw_email)
        .map_err(|e| Failure::Config(anyhow::anyhow!("`{raw_email}`: {e}")))?;
    store
        .contact_by_email(&address)
        .await
        .context("looking up the contact")?
        .ok_or_else(|| Failure::Runtime(anyhow::anyhow!("no contact with address {address}")))
}

pub async fn contact_show(path: &Path, raw_email: &str, json: bool) -> Result<(), Failure> {
    let config = load_config(path)?;
    let store = open_store(&config).await?;
    let contact = find_contact(store.as_ref().into(), raw_email).await?;
    let consents = store
        .consents_of_contact(&contact.id)
        .await
        .context("reading consent")?;
    let events = store
        .events_of_contact(&contact.id)
        .await
        .context("reading the ledger")?;
    if json {
        // The same JSON as the admin API's `GET /admin/contacts/{email}`.
        let value = optinsync_web::admin::contact_json(&contact, &consents, &events);
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
        println!("  {list:<16} {:<12} {}", c.state.as_str(), since_text(c));
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
fn spawn_sighup_reload(
    hup: std::io::Result<tokio::signal::unix::Signal>,
    engine: Arc<Engine>,
    pass_now: Arc<tokio::sync::Notify>,
) {
    let mut hup = match hup {
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
            if let Ok(optinsync_engine::reload::Reload::Swapped { .. }) =
                tokio::task::spawn_blocking(move || engine.reload_rules()).await
            {
                pass_now.notify_one();
            }
        }
    });
}

#[cfg(not(unix))]
fn spawn_sighup_reload(_hup: (), _engine: Arc<Engine>, _pass_now: Arc<tokio::sync::Notify>) {}

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
    // Open signups settle by the end of their list's pending window (asserted ones are about
    // to be asked, so their window starts now).
    let forecast = optinsync_web::admin::settled_by(&config, &summary, chrono::Utc::now());
    if json {
        // The same JSON as the admin API's `GET /admin/status`.
        let v = optinsync_web::admin::status_json(&summary, &outbox, &forecast);
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

pub async fn outbox_failed(path: &Path, json: bool) -> Result<(), Failure> {
    let config = load_config(path)?;
    let store = open_store(&config).await?;
    let dead = store.outbox_dead().await.context("reading dead letters")?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&dead).context("formatting JSON")?
        );
        return Ok(());
    }
    if dead.is_empty() {
        println!("no dead letters");
        return Ok(());
    }
    println!(
        "{:>6}  {:<20} {:<12} {:>8}  reason",
        "id", "kind", "list", "attempts"
    );
    for d in &dead {
        println!(
            "{:>6}  {:<20} {:<12} {:>8}  {}",
            d.id,
            d.kind,
            d.list_id,
            d.attempts,
            d.last_error.as_deref().unwrap_or("-")
        );
    }
    println!(
        "{} dead letter(s); `optinsync outbox retry ID...` queues them again, `optinsync outbox drop ID...` gives up",
        dead.len()
    );
    Ok(())
}

pub async fn outbox_retry(path: &Path, ids: &[i64], all: bool) -> Result<(), Failure> {
    let config = load_config(path)?;
    let store = open_store(&config).await?;
    let ids: Vec<i64> = if all {
        store
            .outbox_dead()
            .await
            .context("reading dead letters")?
            .iter()
            .map(|d| d.id)
            .collect()
    } else if ids.is_empty() {
        return Err(Failure::Config(anyhow::anyhow!(
            "name the outbox ids to retry, or pass --all"
        )));
    } else {
        ids.to_vec()
    };
    let mut missing = Vec::new();
    for id in &ids {
        if !store
            .retry_dead(*id, chrono::Utc::now())
            .await
            .context("queueing again")?
        {
            missing.push(*id);
        }
    }
    println!("{} dead letter(s) queued again", ids.len() - missing.len());
    if !missing.is_empty() {
        return Err(Failure::Runtime(anyhow::anyhow!(
            "not dead letters (unknown or not failed): {missing:?}"
        )));
    }
    Ok(())
}

pub async fn outbox_drop(path: &Path, ids: &[i64], force: bool) -> Result<(), Failure> {
    if ids.is_empty() {
        return Err(Failure::Config(anyhow::anyhow!(
            "name the outbox ids to drop"
        )));
    }
    let config = load_config(path)?;
    let store = open_store(&config).await?;
    let dead: std::collections::BTreeMap<i64, String> = store
        .outbox_dead()
        .await
        .context("reading dead letters")?
        .into_iter()
        .map(|d| (d.id, d.kind))
        .collect();
    let mut refused = Vec::new();
    let mut missing = Vec::new();
    let mut dropped = 0;
    for id in ids {
        match dead.get(id).map(String::as_str) {
            None => missing.push(*id),
            // Dropping a removal leaves a withdrawn address on the marketing list.
            Some("campaigns_remove") if !force => refused.push(*id),
            Some(_) => {
                if store
                    .drop_dead(*id, chrono::Utc::now())
                    .await
                    .context("dropping")?
                {
                    dropped += 1;
                }
            }
        }
    }
    println!("{dropped} dead letter(s) dropped");
    if !refused.is_empty() {
        return Err(Failure::Config(anyhow::anyhow!(
            "refused to drop removals {refused:?}: the address would stay on the campaigns list; fix the cause and `retry`, or pass --force"
        )));
    }
    if !missing.is_empty() {
        return Err(Failure::Runtime(anyhow::anyhow!(
            "not dead letters (unknown or not failed): {missing:?}"
        )));
    }
    Ok(())
}

/// Verify the whole chain; `(events, head seq, head hash)`.
async fn verify_whole_ledger(store: &dyn Store) -> Result<(u64, i64, String), Failure> {
    let mut verifier = ChainVerifier::default();
    let (mut after, mut head) = (0, (0, optinsync_engine::ledger::GENESIS_HASH.to_owned()));
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
        head = (last.seq, last.hash.clone());
    }
    let checked = verifier
        .finish()
        .map_err(|e| Failure::Runtime(anyhow::anyhow!("ledger verification FAILED: {e}")))?;
    Ok((checked, head.0, head.1))
}

pub async fn erase(path: &Path, raw_email: &str) -> Result<(), Failure> {
    // A typo in the address is a usage error before anything starts.
    email::normalise(raw_email)
        .map_err(|e| Failure::Config(anyhow::anyhow!("`{raw_email}`: {e}")))?;
    let engine = boot(path).await?;
    let contact = find_contact(engine.reads(), raw_email).await?;
    let report = engine.erase(&contact).await.context("erasing")?;
    // Queue the removals now rather than at the next daemon pass (legal deadline).
    let delivered = engine
        .drain_outbox(&worker_id())
        .await
        .context("delivering removals")?;
    println!(
        "erased contact {}: withdrawn and suppressed on {} list(s), evidence removed from {} ledger event(s), {} finished outbox row(s) scrubbed, {} removal(s) and CRM opt-out(s) delivered{}",
        contact.id,
        report.lists,
        report.store.redacted_events,
        report.store.scrubbed_outbox_rows,
        delivered.done,
        if report.store.legacy_events > 0 {
            format!(
                "; {} event(s) recorded before evidence digests existed keep their evidence (removing it would break the chain)",
                report.store.legacy_events
            )
        } else {
            String::new()
        }
    );
    println!(
        "the address stays only as a keyed hash on the suppression list, so it is never mailed again"
    );
    Ok(())
}
