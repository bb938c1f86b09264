//! `run` (the daemon) and `sync --once`: one pull-decide pass, the delivery task, the jobs,
//! signals and shutdown.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use optinsync_engine::engine::Engine;
use optinsync_engine::work::ConnectorRole;
use optinsync_web::http;

use super::{boot, healthchecks, host_name, load_config, worker_id};
use crate::Failure;

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
    stop_connectors(&engine).await;
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

/// Last state saved, then each connector stopped (an exec connector ends its process).
async fn stop_connectors(engine: &Engine) {
    if let Err(e) = engine.save_connector_state().await {
        tracing::warn!(error = %e, "connector state not saved at stop");
    }
    let c = engine.connectors();
    c.crm.shutdown().await;
    c.campaigns.shutdown().await;
    c.mail.shutdown().await;
}

/// `optinsync run`: the daemon. Each step below is one function; none is cancelled half-way.
pub async fn run(path: &Path) -> Result<(), Failure> {
    // SQLite: one daemon per database file, refused before anything is touched.
    let instance = crate::instance_lock::acquire(&load_config(path)?.config.store.url)?;
    let signals = Signals::install();
    // Before boot: the engine registers series (circuits at zero) as it is built.
    optinsync_web::metrics::install();
    optinsync_web::metrics::build_info(env!("CARGO_PKG_VERSION"), env!("OPTINSYNC_COMMIT"));
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
    if !engine.connectors().crm.creates_records() {
        // The operator must know where website signups end up (`/signup/{list}`).
        tracing::warn!(
            "the CRM connector cannot create records: people who sign up on the website live in optinsync only (the CRM learns of them only if it gets them some other way); with Zoho CRM set `signup_module`"
        );
    }

    let pass_now = Arc::new(tokio::sync::Notify::new());
    // Kept alive for the whole run.
    let _watcher = watch_rules(&engine, &pass_now);
    spawn_sighup_reload(signals.hup, Arc::clone(&engine), Arc::clone(&pass_now));
    let stop = spawn_shutdown(signals.term, &engine);
    let server = {
        let mut rx = stop.rx.clone();
        let engine = Arc::clone(&engine);
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            http::serve(engine, listener, shutdown).await
        })
    };
    let instance = format!("{}/{listen}/", host_name());
    let worker = format!("{instance}{}", worker_id());
    take_back_claims(&engine, &instance, &worker).await;
    let delivery = spawn_delivery(&engine, &worker, &stop);
    let gauges = crate::gauges::spawn(&engine, &worker, stop.rx.clone());
    run_jobs(&engine, &worker, &stop, &pass_now).await;

    // The gauges only read (and renew a lease row in one statement): cut short rather than
    // let a slow member listing of the campaigns tool hold the shutdown.
    gauges.abort();
    if let Err(e) = gauges.await
        && !e.is_cancelled()
    {
        tracing::error!(error = %e, "metrics task failed");
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
    // Fetched links' records are queued without waiting; write them before exiting.
    engine.flush_writes().await;
    stop_connectors(&engine).await;
    tracing::info!("stopped");
    Ok(())
}

/// The signal streams, taken over before the port answers: a supervisor that stops the daemon
/// as soon as it listens must get the graceful stop (exit 0), not the default kill. SIGHUP
/// likewise: its default action ends the process, and a supervisor's `ExecReload` may send it
/// as soon as the port answers.
struct Signals {
    term: TermSignal,
    hup: HupSignal,
}

#[cfg(unix)]
type TermSignal = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type TermSignal = ();
#[cfg(unix)]
type HupSignal = std::io::Result<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type HupSignal = ();

impl Signals {
    fn install() -> Self {
        #[cfg(unix)]
        let signals = Self {
            term: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok(),
            hup: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()),
        };
        #[cfg(not(unix))]
        let signals = Self { term: (), hup: () };
        tracing::debug!("signal handlers installed (SIGTERM, SIGHUP)");
        signals
    }
}

/// Watch the rules directory; a failure to watch is not fatal (SIGHUP and restarts still
/// reload), but it is said loudly.
fn watch_rules(
    engine: &Arc<Engine>,
    pass_now: &Arc<tokio::sync::Notify>,
) -> Option<impl Sized + use<>> {
    let pass_now = Arc::clone(pass_now);
    match optinsync_engine::reload::watch(Arc::clone(engine), move || pass_now.notify_one()) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::error!(error = %e, "cannot watch the rules directory; reload with SIGHUP");
            None
        }
    }
}

/// The stop flag every loop checks between steps, and its channel for those that wait.
struct Stop {
    flag: Arc<AtomicBool>,
    rx: tokio::sync::watch::Receiver<bool>,
}

impl Stop {
    fn requested(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
}

/// On SIGTERM or Ctrl-C: `/readyz` turns 503, the loops stop after their current step, and
/// after `[sync] shutdown_grace` the process exits anyway.
fn spawn_shutdown(term: TermSignal, engine: &Engine) -> Stop {
    let flag = Arc::new(AtomicBool::new(false));
    let (tx, rx) = tokio::sync::watch::channel(false);
    let stop = Arc::clone(&flag);
    let circuits = Arc::clone(engine.circuits());
    let grace = engine.settings().sync.shutdown_grace.0;
    tokio::spawn(async move {
        shutdown_signal(term).await;
        tracing::info!(
            grace_secs = grace.as_secs(),
            "shutdown requested; finishing the current step"
        );
        // Claimed outbox rows not started yet are handed back.
        circuits.set_stopping();
        stop.store(true, Ordering::SeqCst);
        let _ = tx.send(true);
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
    Stop { flag, rx }
}

/// While this process holds the listen address, no other process on this host does: claims
/// tagged with this host and address but another worker id were left by a predecessor that
/// died (`kill -9`, OOM) between claiming and finishing. Take them back now instead of
/// waiting out `outbox::LEASE`; claims of other hosts and of `sync --once` are left alone.
async fn take_back_claims(engine: &Engine, instance: &str, worker: &str) {
    match engine.release_claims(instance, worker).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            released = n,
            "outbox rows claimed by a crashed predecessor taken back"
        ),
        Err(e) => {
            tracing::warn!(error = %e, "cannot take back a predecessor's outbox claims; they wait for their lease")
        }
    }
}

/// Delivery runs beside the jobs, so a long rules pass over a large store never holds up a
/// confirmation mail queued by a webhook or a click. Woken by every commit that queues work.
fn spawn_delivery(engine: &Arc<Engine>, worker: &str, stop: &Stop) -> tokio::task::JoinHandle<()> {
    let engine = Arc::clone(engine);
    let flag = Arc::clone(&stop.flag);
    let worker = worker.to_owned();
    let rx = stop.rx.clone();
    tokio::spawn(async move {
        // One lane per connector: a slow connector never holds up another's work.
        let [crm, campaigns, mail] =
            ConnectorRole::ALL.map(|role| deliver_lane(&engine, &worker, role, &flag, rx.clone()));
        tokio::join!(crm, campaigns, mail);
    })
}

/// How long a campaigns or CRM lane lets rows gather after a claim that was not full.
const LANE_LINGER: Duration = Duration::from_millis(100);

/// One connector's delivery loop. Steps are never cancelled half-way: shutdown waits for the
/// running delivery, so it is either finished or not started.
async fn deliver_lane(
    engine: &Engine,
    worker: &str,
    role: ConnectorRole,
    flag: &AtomicBool,
    mut rx: tokio::sync::watch::Receiver<bool>,
) {
    let claim = engine.delivery_claim_size(Some(role));
    while !flag.load(Ordering::SeqCst) {
        match engine.deliver_lane(worker, Some(role), claim).await {
            Ok(s) if s.done + s.retried + s.dead > 0 => {
                if let Err(e) = engine.save_connector_state().await {
                    tracing::warn!(error = %e, "connector state not saved");
                }
                tracing::info!(
                    connector = role.as_str(),
                    done = s.done,
                    retried = s.retried,
                    dead = s.dead,
                    "outbox delivered"
                );
                let claimed = s.done + s.retried + s.dead + s.postponed;
                if role != ConnectorRole::Mail && claimed < u64::try_from(claim).unwrap_or(0) {
                    // Less than a full claim was due: let rows gather for a moment, so the
                    // next claim and its finish (two commits of the store's one writer)
                    // carry many rows rather than the one or two of each confirmation
                    // (under 5,000 confirmations/s those commits competed with the
                    // confirmations' own). Mails do not wait: a DOI mail's delay is seen.
                    tokio::select! {
                        _ = tokio::time::sleep(LANE_LINGER) => {}
                        _ = rx.wait_for(|s| *s) => {}
                    }
                }
                continue;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(connector = role.as_str(), error = %e, "outbox delivery failed")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = engine.outbox_wake().notified(role) => {}
            _ = rx.wait_for(|s| *s) => {}
        }
    }
}

/// The periodic jobs (CRM poll, campaigns poll, rules pass), each on one instance at a time
/// among those sharing the database, under its own lease (`jobs`). Like deliveries, a job is
/// never cancelled half-way.
async fn run_jobs(engine: &Engine, worker: &str, stop: &Stop, pass_now: &tokio::sync::Notify) {
    let mut jobs = crate::jobs::Jobs::default();
    let mut rx = stop.rx.clone();
    let mut all = true;
    while !stop.requested() {
        let next = jobs.run_due(engine, worker, all).await;
        tokio::select! {
            _ = tokio::time::sleep(next) => all = false,
            // New rules: decide again now rather than at the next interval.
            _ = pass_now.notified() => all = true,
            _ = rx.wait_for(|s| *s) => {}
        }
    }
}

/// `term`: the SIGTERM stream, registered at start-up (`None`: it could not be).
#[cfg(unix)]
async fn shutdown_signal(term: TermSignal) {
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

#[cfg(unix)]
fn spawn_sighup_reload(hup: HupSignal, engine: Arc<Engine>, pass_now: Arc<tokio::sync::Notify>) {
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
