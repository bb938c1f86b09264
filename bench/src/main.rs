//! `optinsync-bench`: the benchmark suite. One command,
//!
//! ```text
//! cargo run --release -p optinsync-bench -- all [--sizes 10000,100000,1000000] [--only 1,5] [--no-pg]
//! ```
//!
//! builds the release `optinsync` binary (`cargo build --release --bin optinsync`, skipped
//! with `--no-build`), starts a fake Zoho CRM with synthetic contacts, an SMTP sink and (for
//! row 3) a throwaway PostgreSQL, all on 127.0.0.1, measures each figure at each size and
//! prints a fixed-format table with the machine and the git commit. The daemon under test is
//! always the real binary in its own process, so its wall time and peak RSS are its own.
//! Progress goes to stderr, the table to stdout. Figures never fail the run; a step that
//! breaks does (exit 1).

mod baseline;
mod decide;
mod delivery;
mod exec;
mod floor;
mod load;
mod reads;
mod setup;
mod webhook;
mod wrk;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};
use optinsync_testkit::PgServer;
use optinsync_testkit::smtp::SmtpSink;
use optinsync_testkit::zoho::{FakeZoho, SyntheticSource};

#[derive(Debug, Parser)]
#[command(
    name = "optinsync-bench",
    about = "optinsync benchmark suite (prints a table)"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run every row (or `--only` some) at every size and print the table.
    All(Opts),
}

#[derive(Debug, Args)]
struct Opts {
    /// Contact counts, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "10000,100000,1000000")]
    sizes: Vec<u64>,
    /// Rows to run (1-13), comma-separated; default all. Rows 4 and 6-9 use row 1's store, so
    /// its sync runs whenever one of them is chosen; rows 11-13 are one run of their own.
    /// Rows 10-13 run up to 100k.
    #[arg(long, value_delimiter = ',')]
    only: Vec<u8>,
    /// Measure row 3 on a throwaway PostgreSQL (default).
    #[arg(long, overrides_with = "no_pg")]
    pg: bool,
    /// Skip row 3.
    #[arg(long)]
    no_pg: bool,
    /// Do not run `cargo build --release --bin optinsync` first.
    #[arg(long)]
    no_build: bool,
    /// The `optinsync` binary (default: next to this executable).
    #[arg(long)]
    bin: Option<PathBuf>,
    /// Where the temporary set-ups go (default: the system temp dir).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Keep the set-ups (stores, logs) after the run.
    #[arg(long)]
    keep: bool,
    /// Concurrent connections of the confirm load client (rows 8, 9).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Confirm links per size (rows 8, 9), at most the pending consents.
    #[arg(long, default_value_t = 20_000)]
    confirm_requests: usize,
    /// Webhook samples per size (row 7).
    #[arg(long, default_value_t = 200)]
    webhook_samples: usize,
}

/// A measured figure, or why there is none.
type Cell = Result<f64, String>;

/// The cells rows 11-13 fill (one run measures them all).
const DELIVERY_KEYS: [&str; 6] = [
    "mail_rate",
    "mail_ceiling",
    "mail_ratio",
    "wave",
    "push_share",
    "push_locks",
];

/// Row keys, in table order: (key, row number, label, target, check).
type Check = fn(f64) -> bool;
const ROWS: &[(&str, u8, &str, &str, Option<Check>)] = &[
    (
        "sync",
        1,
        "1 initial sync, SQLite (contacts/s)",
        ">= 50,000/s",
        Some(|v| v >= 50_000.0),
    ),
    (
        "floor",
        1,
        "1 the same rows written by SQLite alone (contacts/s)",
        "ceiling",
        None,
    ),
    ("floor_share", 1, "1 sync / that ceiling", "printed", None),
    (
        "baseline",
        2,
        "2 raw baseline: fetch+parse+insert (contacts/s)",
        "reference",
        None,
    ),
    (
        "fetch",
        2,
        "2 of it, CRM fetch+parse alone (contacts/s)",
        "reference",
        None,
    ),
    (
        "sync_ratio",
        2,
        "2 sync / raw baseline",
        ">= 0.5",
        Some(|v| v >= 0.5),
    ),
    (
        "pg",
        3,
        "3 initial sync, PostgreSQL (contacts/s)",
        "printed",
        None,
    ),
    ("pg_ratio", 3, "3 PostgreSQL / SQLite", "printed", None),
    (
        "rss",
        4,
        "4 peak RSS of the daemon in row 1 (MiB)",
        "<= 256 MB (244 MiB)",
        // The target is in MB (10^6 bytes); the figure is in MiB.
        Some(|v| v <= 256.0 * 1e6 / 1_048_576.0),
    ),
    (
        "decide",
        5,
        "5 rule decisions, default policy, 1 thread (/s)",
        ">= 200,000/s",
        Some(|v| v >= 200_000.0),
    ),
    (
        "simulate",
        6,
        "6 rules simulate over the store (s)",
        "<= 15 s",
        Some(|v| v <= 15.0),
    ),
    (
        "webhook_p50",
        7,
        "7 webhook -> DOI mail at the SMTP sink, p50 (ms)",
        "<= 10 ms",
        Some(|v| v <= 10.0),
    ),
    (
        "webhook_p99",
        7,
        "7 webhook -> DOI mail at the SMTP sink, p99 (ms)",
        "<= 50 ms",
        Some(|v| v <= 50.0),
    ),
    (
        "post",
        8,
        "8 confirm POST under load, SQLite (req/s)",
        ">= 5,000/s",
        Some(|v| v >= 5_000.0),
    ),
    (
        "post_p99",
        8,
        "8 confirm POST under load, p99 (ms)",
        "<= 25 ms",
        Some(|v| v <= 25.0),
    ),
    (
        "get",
        9,
        "9 confirm page GET (req/s)",
        ">= 20,000/s",
        Some(|v| v >= 20_000.0),
    ),
    (
        "get_p99",
        9,
        "9 confirm page GET, p99 (ms)",
        "printed",
        None,
    ),
    (
        "reads_store",
        9,
        "9 link look-ups through the store, alone (/s)",
        "ceiling",
        None,
    ),
    (
        "reads_sqlx",
        9,
        "9 same look-up through a sqlx SQLite pool (/s)",
        "reference",
        None,
    ),
    (
        "exec_pipe",
        10,
        "10 exec protocol ceiling: replay connector pull (records/s)",
        ">= 50,000/s",
        Some(|v| v >= 50_000.0),
    ),
    (
        "exec_pull",
        10,
        "10 exec: Python example CRM pull (records/s)",
        "printed",
        None,
    ),
    (
        "csv_pull",
        10,
        "10 in process: CSV connector pull, same records (records/s)",
        "reference",
        None,
    ),
    (
        "exec_ratio",
        10,
        "10 Python example / CSV connector",
        "printed",
        None,
    ),
    (
        "mail_rate",
        11,
        "11 DOI mails into Postfix smtp-sink, DKIM, 8 connections (/s)",
        ">= 1,000/s",
        Some(|v| v >= 1_000.0),
    ),
    (
        "mail_ceiling",
        11,
        "11 smtp-source -> smtp-sink, 8 sessions, same size (/s)",
        "ceiling",
        None,
    ),
    (
        "mail_ratio",
        11,
        "11 DOI mails / smtp-source",
        "printed",
        None,
    ),
    (
        "wave",
        12,
        "12 initial DOI wave: run start -> last mail recorded (s)",
        "<= 180 s at 100k",
        Some(|v| v <= 180.0),
    ),
    (
        "push_share",
        13,
        "13 Zoho Campaigns push of the confirmations, share of allowed rate",
        ">= 0.90",
        Some(|v| v >= 0.9),
    ),
    (
        "push_locks",
        13,
        "13 Zoho Campaigns lock-outs during the push",
        "0",
        Some(|v| v == 0.0),
    ),
];

fn main() -> ExitCode {
    let Cli {
        command: Cmd::All(opts),
    } = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("optinsync-bench: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(all(opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("optinsync-bench: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn progress(size: u64, what: &str) {
    eprintln!("[bench {:>5}] {what}", label(size));
}

async fn all(opts: Opts) -> anyhow::Result<()> {
    let rows: Vec<u8> = if opts.only.is_empty() {
        (1..=13).collect()
    } else {
        opts.only.clone()
    };
    if let Some(bad) = rows.iter().find(|r| !(1..=13).contains(*r)) {
        bail!("--only: no row {bad} (rows are 1-13)");
    }
    let bin = binary(&opts)?;
    let work = match &opts.work_dir {
        Some(d) => tempfile::Builder::new()
            .prefix("optinsync-bench-")
            .tempdir_in(d)?,
        None => tempfile::Builder::new()
            .prefix("optinsync-bench-")
            .tempdir()?,
    };
    // A snapshot: the shared target dir may get a newer build mid-run (its migrations
    // would then not match the store the earlier rows wrote).
    let bin = {
        let copy = work.path().join("optinsync");
        std::fs::copy(&bin, &copy).with_context(|| format!("copying {}", bin.display()))?;
        copy
    };
    eprintln!(
        "optinsync-bench: binary {}, work dir {}",
        bin.display(),
        work.path().display()
    );
    let use_pg = !opts.no_pg && rows.contains(&3);
    let mut pg: Option<&'static PgServer> = None;
    let mut results: Vec<(u64, BTreeMap<&'static str, Cell>)> = Vec::new();
    let mut details: Vec<String> = Vec::new();
    let mut failure = None;
    for &n in &opts.sizes {
        let mut cells = BTreeMap::new();
        let dir = work.path().join(format!("n{n}"));
        std::fs::create_dir_all(&dir)?;
        let outcome = size(
            n,
            &opts,
            &rows,
            &bin,
            &dir,
            use_pg,
            &mut pg,
            &mut cells,
            &mut details,
        )
        .await;
        results.push((n, cells));
        // A broken step ends the run, after the table of what was measured.
        if let Err(e) = outcome {
            details.push(format!("{}: STOPPED: {e:#}", label(n)));
            failure = Some(e);
            break;
        }
    }
    print_table(&opts, &rows, &results, &details);
    if opts.keep {
        let kept = work.keep();
        eprintln!("optinsync-bench: set-ups kept in {}", kept.display());
    }
    match failure {
        Some(e) => Err(e.context("a benchmark step broke (the table above has what was measured)")),
        None => Ok(()),
    }
}

/// The release binary next to this executable, built first unless `--no-build`.
fn binary(opts: &Opts) -> anyhow::Result<PathBuf> {
    if let Some(b) = &opts.bin {
        return Ok(b.clone());
    }
    let exe = std::env::current_exe().context("locating this executable")?;
    let dir = exe.parent().context("executable directory")?;
    let profile = dir
        .file_name()
        .and_then(|p| p.to_str())
        .unwrap_or("release");
    if profile != "release" {
        eprintln!("optinsync-bench: WARNING: not a release build ({profile}); figures mean little");
    }
    if !opts.no_build {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--bin", "optinsync"])
            .current_dir(setup::repo());
        if profile == "release" {
            cmd.arg("--release");
        }
        eprintln!("optinsync-bench: building optinsync ({profile})");
        let status = cmd.status().context("running cargo build")?;
        if !status.success() {
            bail!("cargo build --bin optinsync failed ({status})");
        }
    }
    let bin = dir.join("optinsync");
    if !bin.exists() {
        bail!(
            "{} not found: build it with `cargo build --release --bin optinsync` or pass --bin",
            bin.display()
        );
    }
    Ok(bin)
}

/// Every chosen row at one size.
#[allow(clippy::too_many_arguments)]
async fn size(
    n: u64,
    opts: &Opts,
    rows: &[u8],
    bin: &Path,
    dir: &Path,
    use_pg: bool,
    pg: &mut Option<&'static PgServer>,
    cells: &mut BTreeMap<&'static str, Cell>,
    details: &mut Vec<String>,
) -> anyhow::Result<()> {
    let want = |r: u8| rows.contains(&r);
    progress(n, "starting the fake Zoho CRM and the SMTP sink");
    let fake = FakeZoho::start();
    let src = SyntheticSource::new(n);
    fake.seed_synthetic("Contacts", src.clone());
    let sink = SmtpSink::start();

    if want(2) {
        progress(
            n,
            "row 2: raw baseline (connector paging + plain SQLite insert)",
        );
        let (read, took, fetching) = baseline::run(&fake, dir).await?;
        if read != n {
            bail!("raw baseline read {read} records, expected {n}");
        }
        cells.insert("baseline", Ok(n as f64 / took.as_secs_f64()));
        cells.insert("fetch", Ok(n as f64 / fetching.as_secs_f64()));
    }

    let need_store = [1, 4, 6, 7, 8, 9].iter().any(|r| want(*r));
    let mut sqlite = None;
    if need_store || want(2) && want(1) {
        let setup = setup::write(&dir.join("sqlite"), None, &fake, sink.port())?;
        progress(n, "row 1: optinsync sync --once --no-deliver (SQLite)");
        let run = sync_child(&setup, bin).await?;
        let rate = n as f64 / run.wall.as_secs_f64();
        cells.insert("sync", Ok(rate));
        cells.insert(
            "rss",
            run.peak_rss_kib
                .map(|k| k as f64 / 1024.0)
                .ok_or_else(|| "n/a (no /proc)".to_owned()),
        );
        details.push(format!(
            "{} SQLite sync: {:.2} s; {}",
            label(n),
            run.wall.as_secs_f64(),
            run.stdout.trim()
        ));
        if want(1) {
            progress(n, "row 1's ceiling: the same rows copied by SQLite alone");
            let store = setup.dir.join("var/optinsync.db");
            let took = floor::run(&store, dir, n)?;
            let ceiling = n as f64 / took.as_secs_f64();
            cells.insert("floor", Ok(ceiling));
            cells.insert("floor_share", Ok(rate / ceiling));
        }
        sqlite = Some(setup);
    }
    if let (Some(sync), Some(Ok(base))) =
        (cells.get("sync").cloned(), cells.get("baseline").cloned())
    {
        cells.insert("sync_ratio", sync.map(|s| s / base));
    }

    if want(3) {
        let cell = if use_pg {
            if pg.is_none() {
                progress(n, "starting a throwaway PostgreSQL");
                // The shared server is stopped by a watchdog when this process exits, even
                // after Ctrl-C.
                *pg = std::panic::catch_unwind(optinsync_testkit::shared_pg).ok();
            }
            match *pg {
                Some(server) => {
                    let url = server.create_database();
                    let setup = setup::write(&dir.join("pg"), Some(&url), &fake, sink.port())?;
                    progress(n, "row 3: optinsync sync --once --no-deliver (PostgreSQL)");
                    let run = sync_child(&setup, bin).await?;
                    details.push(format!(
                        "{} PostgreSQL sync: {:.2} s; {}",
                        label(n),
                        run.wall.as_secs_f64(),
                        run.stdout.trim()
                    ));
                    Ok(n as f64 / run.wall.as_secs_f64())
                }
                None => Err("n/a (PostgreSQL binaries not found)".to_owned()),
            }
        } else {
            Err("n/a (--no-pg)".to_owned())
        };
        if let (Ok(p), Some(Ok(s))) = (&cell, cells.get("sync")) {
            cells.insert("pg_ratio", Ok(p / s));
        }
        cells.insert("pg", cell);
    }

    if want(10) && n > exec::MAX_CONTACTS {
        not_run_above(
            cells,
            &["exec_pull", "exec_pipe", "csv_pull", "exec_ratio"],
            exec::MAX_CONTACTS,
        );
    } else if want(10) {
        progress(
            n,
            "row 10: the exec protocol (Python example, replay) against the CSV connector",
        );
        let f = exec::run(n, &dir.join("exec")).await?;
        cells.insert("exec_pull", Ok(f.example));
        cells.insert("exec_pipe", Ok(f.replay));
        cells.insert("csv_pull", Ok(f.csv));
        cells.insert("exec_ratio", Ok(f.example / f.csv));
    }

    if [11, 12, 13].iter().any(|r| want(*r)) {
        if n > delivery::MAX_CONTACTS {
            not_run_above(cells, &DELIVERY_KEYS, delivery::MAX_CONTACTS);
        } else {
            progress(
                n,
                "rows 11-13: DOI wave into Postfix smtp-sink, confirmations, Zoho Campaigns push",
            );
            match delivery::run(n, bin, &dir.join("delivery"), opts.concurrency).await {
                Ok(f) => {
                    cells.insert("mail_rate", Ok(f.mail_rate));
                    cells.insert("mail_ceiling", Ok(f.ceiling_rate));
                    cells.insert("mail_ratio", Ok(f.mail_rate / f.ceiling_rate));
                    cells.insert("wave", Ok(f.wave_secs));
                    cells.insert(
                        "push_share",
                        f.push_share
                            .ok_or_else(|| "n/a (no push measured)".to_owned()),
                    );
                    cells.insert("push_locks", Ok(f.push_locks as f64));
                    let cpu = f
                        .cpu_per_mail
                        .map(|c| format!(", daemon CPU {:.0} µs per mail", c.as_secs_f64() * 1e6))
                        .unwrap_or_default();
                    details.push(format!(
                        "{} DOI wave: {} bytes per mail as the sink stored it{cpu}; push: {}",
                        label(n),
                        f.message_bytes,
                        f.push_detail
                    ));
                }
                Err(e) => {
                    details.push(format!("{} rows 11-13 failed: {e:#}", label(n)));
                    for key in DELIVERY_KEYS {
                        cells.insert(key, Err("failed (see notes)".to_owned()));
                    }
                }
            }
        }
    }

    if want(5) {
        progress(n, &format!("row 5: {n} rule decisions, one thread"));
        let (took, _) = tokio::task::spawn_blocking(move || decide::run(n)).await??;
        cells.insert("decide", Ok(n as f64 / took.as_secs_f64()));
    }

    let Some(setup) = sqlite else {
        return Ok(());
    };
    if want(6) {
        progress(n, "row 6: optinsync rules simulate");
        let cmd = setup.command(bin, &["rules", "simulate"]);
        let log = setup.dir.join("simulate.log");
        let run = tokio::task::spawn_blocking(move || setup::run_measured(cmd, &log)).await??;
        cells.insert("simulate", Ok(run.wall.as_secs_f64()));
    }

    if [7, 8, 9].iter().any(|r| want(*r)) {
        // The initial DOI mails stay queued after `--no-deliver`; mark them delivered, as
        // `run` would have by now, so the webhook's mail is not behind a million others.
        let marked = mark_outbox_delivered(&setup.store_url).await?;
        details.push(format!(
            "{} before `run`: {marked} queued initial effects marked delivered in the store",
            label(n)
        ));
        progress(n, "starting optinsync run (waits for its start-up pass)");
        let mut daemon = setup::Daemon::spawn(&setup, bin)?;
        // The start-up rules pass over every contact ends with this line (one `sync pass`
        // before the jobs split); measuring during it would measure it.
        daemon.wait_for_log(&["sync pass:", "job scheduler:"], Duration::from_secs(3600))?;
        // So do the start-up gauges: a full verification of the ledger and the drift of
        // every list (then every few hours and every hour by default).
        daemon.wait_for_log(
            &["metrics: ledger verified", "ledger verification failed"],
            Duration::from_secs(3600),
        )?;
        daemon.wait_for_log(
            &["metrics: drift checked", "cannot take the drift lease"],
            Duration::from_secs(3600),
        )?;
        let start = Instant::now();
        while fake.channels().is_empty() {
            if start.elapsed() > Duration::from_secs(30) {
                bail!("the daemon registered no Zoho notification channel");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if want(7) {
            let samples = opts.webhook_samples.min(src.unasserted().count());
            progress(
                n,
                &format!("row 7: {samples} webhooks, each until its DOI mail"),
            );
            let mut lat = webhook::run(&fake, &sink, &src, samples).await?;
            lat.sort();
            cells.insert("webhook_p50", ms(percentile(&lat, 50.0)));
            cells.insert("webhook_p99", ms(percentile(&lat, 99.0)));
        }
        if want(8) || want(9) {
            let base = format!("http://127.0.0.1:{}", setup.port);
            let links = load::confirm_links(&setup.store_url, &base, opts.confirm_requests).await?;
            match wrk::find() {
                Some(wrk) => {
                    let pid = daemon.pid();
                    confirm_rows_wrk(n, &wrk, &base, links, pid, opts, dir, cells, details).await?;
                }
                None => {
                    details.push(format!(
                        "{} rows 8 and 9: wrk is not installed (apt-get install wrk): measured with the bench's own client",
                        label(n)
                    ));
                    confirm_rows_own_client(n, links, opts, cells, details).await?;
                }
            }
        }
        if let Some(pid) = daemon.pid()
            && let Some(k) = setup::vm_hwm_kib(pid)
        {
            details.push(format!(
                "{} peak RSS of `optinsync run`: {:.0} MiB",
                label(n),
                k as f64 / 1024.0
            ));
        }
        daemon.stop();
        if want(8) || want(9) {
            progress(
                n,
                &format!(
                    "row 9 ceiling: link look-ups, store alone then through a sqlx pool, {} tasks",
                    opts.concurrency
                ),
            );
            let c =
                reads::measure(&setup.store_url, opts.concurrency, Duration::from_secs(3)).await?;
            cells.insert("reads_store", Ok(c.store));
            cells.insert("reads_sqlx", Ok(c.sqlx));
        }
    }
    Ok(())
}

/// Mark `keys` as not measured at this size: their rows run up to `max` contacts.
fn not_run_above(cells: &mut BTreeMap<&'static str, Cell>, keys: &[&'static str], max: u64) {
    for key in keys {
        cells.insert(key, Err(format!("n/a (run up to {})", label(max))));
    }
}

/// Rows 9 and 8 with `wrk`: `GET` over the links (each thread cycling through its share)
/// for 5 s, then one `POST` per link with the form its page carries, for as long as the
/// links last at 10,000/s (a link confirmed twice would measure the cheaper second answer).
#[allow(clippy::too_many_arguments)]
async fn confirm_rows_wrk(
    n: u64,
    wrk: &Path,
    base: &str,
    links: Vec<String>,
    daemon: Option<u32>,
    opts: &Opts,
    dir: &Path,
    cells: &mut BTreeMap<&'static str, Cell>,
    details: &mut Vec<String>,
) -> anyhow::Result<()> {
    // The daemon's CPU time per answered request: a figure a busy or slow machine moves less
    // than the rate.
    let cpu = || daemon.and_then(setup::cpu_time);
    let path = |l: &String| l.strip_prefix(base).unwrap_or(l).to_owned();
    let gets: Vec<(&str, String, String)> = links
        .iter()
        .map(|l| ("GET", path(l), String::new()))
        .collect();
    progress(
        n,
        &format!(
            "row 9: wrk GET over {} confirm pages, {} connections, 5 s",
            links.len(),
            opts.concurrency
        ),
    );
    let work = dir.join("wrk");
    let before = cpu();
    let g = wrk::run(
        wrk,
        base,
        &gets,
        opts.concurrency,
        Duration::from_secs(5),
        &work,
    )?;
    let get_cpu = before.zip(cpu()).map(|(a, b)| b.saturating_sub(a));
    progress(n, "row 8: reading each page's form");
    let (read, forms) = load::page_forms(links.clone(), opts.concurrency).await?;
    if read.failed > 0 {
        bail!(
            "{} confirm pages could not be read: {:?}",
            read.failed,
            read.first_error
        );
    }
    let posts: Vec<(&str, String, String)> = links
        .iter()
        .zip(forms)
        .map(|(l, f)| ("POST", path(l), f))
        .collect();
    let secs = (links.len() as u64 / 10_000).max(1);
    progress(
        n,
        &format!(
            "row 8: wrk POST, one per link, {} connections, {secs} s",
            opts.concurrency
        ),
    );
    let before = cpu();
    let p = wrk::run(
        wrk,
        base,
        &posts,
        opts.concurrency,
        Duration::from_secs(secs),
        &work,
    )?;
    let post_cpu = before.zip(cpu()).map(|(a, b)| b.saturating_sub(a));
    for (name, r, used) in [("GET", &g, get_cpu), ("POST", &p, post_cpu)] {
        let per_request = used
            .filter(|_| r.requests > 0)
            .map(|c| {
                format!(
                    ", daemon CPU {:.0} µs per request",
                    c.as_secs_f64() * 1e6 / r.requests as f64
                )
            })
            .unwrap_or_default();
        details.push(format!(
            "{} confirm {name} (wrk, {} connections): {} requests, {} not 2xx or failed, p50 {:.1} ms{per_request}",
            label(n),
            opts.concurrency,
            r.requests,
            r.bad,
            r.p50.map_or(f64::NAN, |d| d.as_secs_f64() * 1e3),
        ));
    }
    if p.requests > links.len() as u64 {
        details.push(format!(
            "{} confirm POST: {} requests for {} links: some links were confirmed twice",
            label(n),
            p.requests,
            links.len()
        ));
    }
    cells.insert("get", Ok(g.rate));
    cells.insert("get_p99", ms(g.p99));
    cells.insert("post", Ok(p.rate));
    cells.insert("post_p99", ms(p.p99));
    Ok(())
}

/// Rows 9 and 8 with the bench's own client (when `wrk` is missing).
async fn confirm_rows_own_client(
    n: u64,
    links: Vec<String>,
    opts: &Opts,
    cells: &mut BTreeMap<&'static str, Cell>,
    details: &mut Vec<String>,
) -> anyhow::Result<()> {
    let count = links.len();
    progress(
        n,
        &format!(
            "rows 9 and 8: {count} confirm pages GET, then POST, {} connections",
            opts.concurrency
        ),
    );
    let (gets, posts) = load::confirm_load(links, opts.concurrency).await?;
    for (name, r) in [("GET", &gets), ("POST", &posts)] {
        details.push(format!(
            "{} confirm {name}: {} ok, {} failed{} in {:.2} s; p50 {:.1} ms",
            label(n),
            r.ok,
            r.failed,
            r.first_error
                .as_ref()
                .map(|e| format!(" (first: {e})"))
                .unwrap_or_default(),
            r.wall.as_secs_f64(),
            r.percentile(50.0)
                .map_or(f64::NAN, |d| d.as_secs_f64() * 1e3),
        ));
    }
    if posts.failed > 0 || gets.failed > 0 {
        eprintln!("[bench] WARNING: some confirm requests failed; see the notes under the table");
    }
    cells.insert("get", Ok(gets.rate()));
    cells.insert("get_p99", ms(gets.percentile(99.0)));
    cells.insert("post", Ok(posts.rate()));
    cells.insert("post_p99", ms(posts.percentile(99.0)));
    Ok(())
}

async fn sync_child(setup: &setup::Setup, bin: &Path) -> anyhow::Result<setup::ChildRun> {
    let cmd = setup.command(bin, &["sync", "--once", "--no-deliver"]);
    let log = setup.dir.join("sync.log");
    tokio::task::spawn_blocking(move || setup::run_measured(cmd, &log)).await?
}

/// Mark the queued initial DOI mails delivered, and record each as `run` would have: a
/// `doi_mail_sent` ledger event naming the signup's token (links act only if they were
/// mailed, so the load rows need this record to be honoured).
async fn mark_outbox_delivered(store_url: &str) -> anyhow::Result<u64> {
    use optinsync_engine::consent::ConsentState;
    use optinsync_engine::ledger::{Evidence, NewEvent};

    let pool = sqlx::SqlitePool::connect(store_url).await?;
    let now = chrono::Utc::now();
    let done = sqlx::query(
        "UPDATE outbox SET status = 'done', done_at = $1, note = 'bench: marked delivered' WHERE status = 'pending'",
    )
    .bind(optinsync_engine::ledger::format_time(now))
    .execute(&pool)
    .await
    .context("marking the initial outbox delivered")?
    .rows_affected();
    let pending: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT contact_id, list_id, signup_token FROM consents \
         WHERE state = 'pending' AND signup_token IS NOT NULL",
    )
    .fetch_all(&pool)
    .await
    .context("reading pending consents")?;
    pool.close().await;
    let store = optinsync_engine::store::open(store_url).await?;
    for chunk in pending.chunks(1_000) {
        let events: Vec<NewEvent> = chunk
            .iter()
            .map(|(contact_id, list_id, token)| NewEvent {
                event_id: uuid::Uuid::new_v4().to_string(),
                at: now,
                contact_id: contact_id.clone(),
                list_id: list_id.clone(),
                kind: "doi_mail_sent".into(),
                from_state: ConsentState::Pending,
                to_state: ConsentState::Pending,
                source: optinsync_engine::ledger::EventSource::Outbox,
                evidence: Evidence {
                    token_id: Some(token.clone()),
                    detail: Some("bench: marked delivered".into()),
                    ..Evidence::default()
                },
            })
            .collect();
        store
            .append_events(&events)
            .await
            .context("recording the initial mails in the ledger")?;
    }
    Ok(done)
}

/// Nearest-rank percentile of sorted durations.
pub fn percentile(sorted: &[Duration], p: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

fn ms(d: Option<Duration>) -> Cell {
    d.map(|d| d.as_secs_f64() * 1e3)
        .ok_or_else(|| "n/a (no samples)".to_owned())
}

fn label(n: u64) -> String {
    match n {
        n if n >= 1_000_000 && n.is_multiple_of(1_000_000) => format!("{}M", n / 1_000_000),
        n if n >= 1_000 && n.is_multiple_of(1_000) => format!("{}k", n / 1_000),
        n => n.to_string(),
    }
}

fn thousands(v: f64) -> String {
    let s = format!("{:.0}", v);
    let (sign, digits) = s.strip_prefix('-').map_or(("", s.as_str()), |d| ("-", d));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    format!("{sign}{out}")
}

fn format_cell(key: &str, cell: Option<&Cell>) -> String {
    match cell {
        None => "not run".into(),
        Some(Err(reason)) => reason.clone(),
        Some(Ok(v)) => match key {
            "sync" | "floor" | "baseline" | "fetch" | "pg" | "decide" | "post" | "get"
            | "exec_pipe" | "exec_pull" | "csv_pull" | "mail_rate" | "mail_ceiling"
            | "reads_store" | "reads_sqlx" => {
                format!("{}/s", thousands(*v))
            }
            "sync_ratio" | "floor_share" | "pg_ratio" | "exec_ratio" | "mail_ratio"
            | "push_share" => {
                format!("{v:.2}")
            }
            "push_locks" => format!("{v:.0}"),
            "rss" => format!("{v:.0} MiB"),
            "simulate" | "wave" => format!("{v:.2} s"),
            _ => format!("{v:.1} ms"),
        },
    }
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let ram = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|k| k.parse::<f64>().ok())
        })
        .map(|k| format!("{:.1} GiB RAM", k / 1024.0 / 1024.0))
        .unwrap_or_else(|| "RAM unknown".into());
    format!("{model}, {cores} cores, {ram}")
}

fn commit() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(setup::repo())
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    match git(&["rev-parse", "--short", "HEAD"]) {
        Some(head) => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{head} + uncommitted changes")
            } else {
                head
            }
        }
        None => "unknown (not a git checkout)".into(),
    }
}

fn print_table(
    opts: &Opts,
    rows: &[u8],
    results: &[(u64, BTreeMap<&'static str, Cell>)],
    details: &[String],
) {
    let chosen: Vec<_> = ROWS.iter().filter(|r| rows.contains(&r.1)).collect();
    let headers: Vec<String> = results.iter().map(|(n, _)| label(*n)).collect();
    let mut lines: Vec<Vec<String>> = Vec::new();
    for (key, _, name, target, check) in &chosen {
        let mut line = vec![(*name).to_owned()];
        for (_, cells) in results {
            line.push(format_cell(key, cells.get(key)));
        }
        line.push((*target).to_owned());
        // Judged at the largest size measured (the targets are stated for 1M contacts).
        let last = results.iter().rev().find_map(|(n, c)| match c.get(key) {
            Some(Ok(v)) => Some((*n, *v)),
            _ => None,
        });
        let met = match (check, last) {
            (None, _) => "-".to_owned(),
            (Some(_), None) => "n/a".to_owned(),
            (Some(f), Some((n, v))) => {
                let verdict = if f(v) { "yes" } else { "NO" };
                if n == 1_000_000 {
                    verdict.to_owned()
                } else {
                    format!("{verdict} (at {})", label(n))
                }
            }
        };
        line.push(met);
        lines.push(line);
    }
    let mut head = vec!["figure".to_owned()];
    head.extend(headers);
    head.push("target".into());
    head.push("met?".into());
    let widths: Vec<usize> = (0..head.len())
        .map(|i| {
            lines
                .iter()
                .map(|l| l[i].chars().count())
                .chain([head[i].chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let render = |cols: &[String]| {
        let cells: Vec<String> = cols
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i == 0 {
                    format!("{c:<w$}", w = widths[i])
                } else {
                    format!("{c:>w$}", w = widths[i])
                }
            })
            .collect();
        format!("| {} |", cells.join(" | "))
    };
    let sizes: Vec<String> = opts.sizes.iter().map(|n| n.to_string()).collect();
    println!();
    println!(
        "optinsync benchmark, {}",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC")
    );
    println!("machine: {}", machine());
    println!("commit:  {}", commit());
    println!(
        "command: cargo run --release -p optinsync-bench -- all --sizes {}{}{}",
        sizes.join(","),
        if rows.len() < 13 {
            format!(
                " --only {}",
                rows.iter().map(u8::to_string).collect::<Vec<_>>().join(",")
            )
        } else {
            String::new()
        },
        if opts.no_pg { " --no-pg" } else { "" }
    );
    println!();
    println!("{}", render(&head));
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    println!("|-{}-|", rule.join("-|-"));
    for l in &lines {
        println!("{}", render(l));
    }
    if !details.is_empty() {
        println!();
        for d in details {
            println!("- {d}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_is_nearest_rank() {
        let ms: Vec<Duration> = (1..=200).map(Duration::from_millis).collect();
        assert_eq!(percentile(&ms, 50.0), Some(Duration::from_millis(100)));
        assert_eq!(percentile(&ms, 99.0), Some(Duration::from_millis(198)));
        assert_eq!(percentile(&ms, 100.0), Some(Duration::from_millis(200)));
        assert_eq!(percentile(&[], 99.0), None);
    }

    #[test]
    fn figures_are_formatted_for_the_table() {
        assert_eq!(label(10_000), "10k");
        assert_eq!(label(1_000_000), "1M");
        assert_eq!(label(12_345), "12345");
        assert_eq!(thousands(1_234_567.4), "1,234,567");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(format_cell("sync", Some(&Ok(51_234.0))), "51,234/s");
        assert_eq!(format_cell("floor", Some(&Ok(70_184.8))), "70,185/s");
        assert_eq!(format_cell("floor_share", Some(&Ok(0.2376))), "0.24");
        assert_eq!(format_cell("post_p99", Some(&Ok(12.34))), "12.3 ms");
        assert_eq!(format_cell("exec_pipe", Some(&Ok(410_686.4))), "410,686/s");
        assert_eq!(format_cell("exec_ratio", Some(&Ok(29.83))), "29.83");
        assert_eq!(
            format_cell("pg", Some(&Err("n/a (--no-pg)".into()))),
            "n/a (--no-pg)"
        );
    }
}
