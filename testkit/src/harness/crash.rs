//! Crash harness: a real sync by the `optinsync run` binary, `kill -9`ed at random moments and
//! restarted each time, checked afterwards against what the outside world saw.
//!
//! Why one long file: the run and its ground-truth checks read as one story (what was
//! done, what the outside world saw, what must hold); the shared parts are in `util.rs`.
//!
//! Run by the CI test `tests/e2e/crash.rs` and at full size by `examples/crash_harness.rs`.
//!
//! The world around the daemon is real wherever that shows a crash's effects: the fake Zoho
//! CRM ([`crate::zoho`], in this process, so it outlives every daemon) holds the contacts, a
//! loopback SMTP sink ([`crate::smtp`]) receives the DOI mails (it does not deduplicate, so a
//! mail delivered twice is seen twice), and a "people" task reads each mail at the sink and,
//! per a seeded plan, confirms (GET the page, POST its form) or unsubscribes (RFC 8058
//! one-click POST) a moment later, retrying until the daemon answers 200. The store is SQLite
//! or PostgreSQL.
//!
//! Ground truth, checked after a final clean run that drains everything:
//! - every ledger event the harness read while the daemon ran (right before each kill) is
//!   still there with the same hash, and `optinsync ledger verify` passes;
//! - every confirmation and withdrawal answered with 200 is in the ledger and is the final
//!   state;
//! - every contact received its DOI mail; a contact that received it more than once got the
//!   same Message-ID each time (the same outbox row, whose key the Message-ID derives from),
//!   recorded once in the ledger, with a kill between the copies: the crash hit the send
//!   window (SMTP accepted, outbox row not yet finished). At most `in_flight ×
//!   units_per_connection` such duplicates per kill: the outbox has at most that many mails
//!   started and not yet finished (`Options::in_flight`, the SMTP `pool_size`, times the
//!   engine's mails in flight per send, `Options::units_per_connection`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;

use super::util::{
    self, Mailbox, NewMail, ShippedConfig, all_events, confirm, copy_setup, email_of, first,
    link_in, recorded_message_ids, zoho_crm_section,
};
use super::{LedgerEvent, OpenStore, Store};
use crate::smtp::SmtpSink;
use crate::zoho::FakeZoho;

/// The list the shipped configuration defines.
const LIST: &str = "newsletter";

/// splitmix64: small, seeded, reproducible (the seed is printed, so a run can be repeated).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi.saturating_sub(lo) + 1)
    }
}

/// A seed from the clock, for runs that do not name one.
pub fn clock_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0x5EED)
}

#[derive(Debug, Clone)]
pub enum Backend {
    Sqlite,
    Postgres { url: String },
}

impl Backend {
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres { .. } => "postgres",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    /// The `optinsync` binary.
    pub bin: PathBuf,
    /// The repository root (shipped `config.toml`, `rules/`, `templates/`).
    pub repo: PathBuf,
    pub backend: Backend,
    pub contacts: usize,
    pub kills: usize,
    pub seed: u64,
    /// Share of contacts who confirm / unsubscribe when their mail arrives, in percent.
    pub confirm_percent: u64,
    pub unsubscribe_percent: u64,
    /// Each daemon lives this long (uniform, in ms, from its start) before `kill -9`.
    pub uptime_ms: (u64, u64),
    /// People act this long after their mail arrived (uniform, in ms).
    pub click_delay_ms: (u64, u64),
    /// Limit for the final clean run to drain everything.
    pub drain_timeout: Duration,
    /// Keep the working directory (printed) instead of deleting it.
    pub keep_dir: bool,
    /// The SMTP transport's `pool_size`: mails in flight at once, and so the most duplicate
    /// mails one kill may cause.
    pub in_flight: u32,
    /// Mails the outbox keeps in flight per SMTP connection (the engine's
    /// `outbox::MAIL_UNITS_PER_CALL`): one being sent, one sent and waiting for its record.
    pub units_per_connection: u32,
    /// The sink waits this long before answering `250` to a message it has stored: a slow
    /// relay, so that kills land while mails are handed over but not yet acknowledged.
    pub sink_accept_delay: Duration,
}

impl Options {
    pub fn new(
        bin: PathBuf,
        repo: PathBuf,
        backend: Backend,
        contacts: usize,
        kills: usize,
    ) -> Self {
        Options {
            bin,
            repo,
            backend,
            contacts,
            kills,
            seed: clock_seed(),
            confirm_percent: 20,
            unsubscribe_percent: 5,
            uptime_ms: (300, 2500),
            click_delay_ms: (0, 2000),
            drain_timeout: Duration::from_secs(600),
            keep_dir: false,
            in_flight: 1,
            units_per_connection: 1,
            sink_accept_delay: Duration::ZERO,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    Nothing,
    Confirm,
    Unsubscribe,
}

/// A duplicate DOI delivery and how it is explained.
#[derive(Debug, Clone)]
pub struct Duplicate {
    pub email: String,
    pub copies: usize,
    /// Distinct Message-IDs among the copies (1 = the same outbox row each time).
    pub message_ids: usize,
    /// How many `*_mail_sent` events name that Message-ID (1 = the copy's finish was lost).
    pub ledger_records: usize,
    /// The kill that fell between each copy and the next (`None`: no kill between them).
    /// A row re-sent after one kill may be caught again by the next: each extra copy needs
    /// a kill of its own.
    pub kills: Vec<Option<usize>>,
    pub explained: bool,
}

#[derive(Debug, Clone, Default)]
pub struct Report {
    pub backend: String,
    pub seed: u64,
    pub contacts: usize,
    pub kills: usize,
    /// Kills that happened while the daemon was still starting (before it listened).
    pub kills_during_start: usize,
    /// Mails in flight at once (the SMTP `pool_size` times the mails per connection): the
    /// most duplicates one kill may cause.
    pub in_flight: usize,
    /// The most duplicate mails one kill caused.
    pub most_duplicates_per_kill: usize,
    pub wall: Duration,
    pub kill_phase: Duration,
    pub drain: Duration,
    pub ledger_events: usize,
    /// Events read while the daemons ran (the acknowledged prefix at each kill).
    pub seen_events: usize,
    pub lost_events: Vec<String>,
    pub chain: String,
    pub chain_ok: bool,
    pub confirmations_acked: usize,
    pub withdrawals_acked: usize,
    pub lost_confirmations: Vec<String>,
    pub lost_withdrawals: Vec<String>,
    pub clicks_refused: Vec<String>,
    pub clicks_given_up: Vec<String>,
    pub click_attempts: u64,
    pub mails_received: usize,
    pub contacts_without_mail: Vec<String>,
    pub duplicates: Vec<Duplicate>,
    /// Delivered mails whose Message-ID no `*_mail_sent` event names: the crash hit the send
    /// window and the person confirmed or withdrew before the row was retried (the retry then
    /// skips, as the signup is no longer waiting).
    pub unrecorded_mails: Vec<String>,
    pub list_mismatches: Vec<String>,
    pub list_members: usize,
    pub crm_write_backs: usize,
    pub dir: Option<PathBuf>,
}

impl Report {
    /// Every guarantee that does not hold, in words; empty when all hold.
    pub fn violations(&self) -> Vec<String> {
        let mut v = Vec::new();
        if !self.lost_events.is_empty() {
            v.push(format!(
                "{} acknowledged ledger event(s) lost: {:?}",
                self.lost_events.len(),
                first(&self.lost_events)
            ));
        }
        if !self.chain_ok {
            v.push(format!("ledger verify failed: {}", self.chain));
        }
        if !self.lost_confirmations.is_empty() {
            v.push(format!(
                "{} acknowledged confirmation(s) lost: {:?}",
                self.lost_confirmations.len(),
                first(&self.lost_confirmations)
            ));
        }
        if !self.lost_withdrawals.is_empty() {
            v.push(format!(
                "{} acknowledged withdrawal(s) lost: {:?}",
                self.lost_withdrawals.len(),
                first(&self.lost_withdrawals)
            ));
        }
        if !self.contacts_without_mail.is_empty() {
            v.push(format!(
                "{} contact(s) never got their DOI mail: {:?}",
                self.contacts_without_mail.len(),
                first(&self.contacts_without_mail)
            ));
        }
        if !self.clicks_given_up.is_empty() {
            v.push(format!(
                "{} click(s) never answered 200: {:?}",
                self.clicks_given_up.len(),
                first(&self.clicks_given_up)
            ));
        }
        if !self.clicks_refused.is_empty() {
            v.push(format!(
                "{} click(s) refused: {:?}",
                self.clicks_refused.len(),
                first(&self.clicks_refused)
            ));
        }
        let unexplained: Vec<&Duplicate> =
            self.duplicates.iter().filter(|d| !d.explained).collect();
        if !unexplained.is_empty() {
            v.push(format!(
                "{} duplicate(s) not explained by the send window: {:?}",
                unexplained.len(),
                unexplained.iter().take(5).collect::<Vec<_>>()
            ));
        }
        let extra: usize = self.duplicates.iter().map(|d| d.copies - 1).sum();
        if extra + self.unrecorded_mails.len() > self.kills * self.in_flight {
            v.push(format!(
                "{extra} duplicate mail(s) and {} unrecorded mail(s) for {} kills: more than {} (mails in flight) per kill",
                self.unrecorded_mails.len(),
                self.kills,
                self.in_flight
            ));
        }
        if !self.list_mismatches.is_empty() {
            v.push(format!(
                "campaigns list disagrees with consent: {:?}",
                first(&self.list_mismatches)
            ));
        }
        v
    }

    pub fn print(&self) {
        let extra: usize = self.duplicates.iter().map(|d| d.copies - 1).sum();
        println!(
            "crash harness [{}] seed {} — {} contacts, {} kills ({} during start-up), {} mail(s) in flight",
            self.backend,
            self.seed,
            self.contacts,
            self.kills,
            self.kills_during_start,
            self.in_flight
        );
        println!(
            "  wall time            {:.1} s (kill phase {:.1} s, final drain {:.1} s)",
            self.wall.as_secs_f64(),
            self.kill_phase.as_secs_f64(),
            self.drain.as_secs_f64()
        );
        println!(
            "  ledger               {} events; {} read while running; chain: {}",
            self.ledger_events, self.seen_events, self.chain
        );
        println!("  lost events          {}", self.lost_events.len());
        println!(
            "  confirmations        {} acknowledged, {} lost",
            self.confirmations_acked,
            self.lost_confirmations.len()
        );
        println!(
            "  withdrawals          {} acknowledged, {} lost",
            self.withdrawals_acked,
            self.lost_withdrawals.len()
        );
        println!(
            "  clicks               {} attempts, {} refused, {} never answered",
            self.click_attempts,
            self.clicks_refused.len(),
            self.clicks_given_up.len()
        );
        println!(
            "  DOI mails            {} received, {} contacts without one",
            self.mails_received,
            self.contacts_without_mail.len()
        );
        println!(
            "  duplicate mails      {extra} (contacts: {}; at most {} from one kill)",
            self.duplicates.len(),
            self.most_duplicates_per_kill
        );
        for d in &self.duplicates {
            println!(
                "    {} ×{}: {} Message-ID(s), {} ledger record(s), {} — {}",
                d.email,
                d.copies,
                d.message_ids,
                d.ledger_records,
                if d.kills.iter().all(Option::is_some) {
                    let ks: Vec<String> =
                        d.kills.iter().flatten().map(|k| format!("#{k}")).collect();
                    format!("kill {} between the copies", ks.join(", "))
                } else {
                    "no kill between copies".to_owned()
                },
                if d.explained {
                    "send window (SMTP accepted, outbox row not finished)"
                } else {
                    "UNEXPLAINED"
                }
            );
        }
        println!(
            "  unrecorded mails     {} (send window, then confirmed/withdrawn before the retry)",
            self.unrecorded_mails.len()
        );
        for m in &self.unrecorded_mails {
            println!("    {m}");
        }
        println!(
            "  campaigns list       {} members, {} mismatches; CRM write-backs {}",
            self.list_members,
            self.list_mismatches.len(),
            self.crm_write_backs
        );
        util::print_outcome(self.dir.as_deref(), &self.violations());
    }
}

/// One person's pending action.
#[derive(Debug, Clone)]
struct Click {
    email: String,
    plan: Plan,
    link: String,
    due: Instant,
    attempts: u32,
}

#[derive(Debug, Default)]
struct People {
    mailbox: Mailbox,
    queue: Vec<Click>,
    acked_confirm: BTreeMap<String, Instant>,
    acked_unsubscribe: BTreeMap<String, Instant>,
    refused: Vec<String>,
    given_up: Vec<String>,
    attempts: u64,
    in_flight: usize,
}

/// Per-contact plans, drawn from the seed.
fn plans(rng: &mut Rng, opts: &Options) -> HashMap<String, (Plan, u64)> {
    (0..opts.contacts)
        .map(|i| {
            let roll = rng.between(0, 99);
            let plan = if roll < opts.confirm_percent {
                Plan::Confirm
            } else if roll < opts.confirm_percent + opts.unsubscribe_percent {
                Plan::Unsubscribe
            } else {
                Plan::Nothing
            };
            let delay = rng.between(opts.click_delay_ms.0, opts.click_delay_ms.1);
            (email_of(i), (plan, delay))
        })
        .collect()
}

/// RFC 8058 one-click unsubscribe, as a mailbox provider sends it.
async fn unsubscribe(client: &reqwest::Client, link: &str) -> Result<u16, reqwest::Error> {
    let resp = client
        .post(link)
        .header("content-type", "application/x-www-form-urlencoded")
        .body("List-Unsubscribe=One-Click")
        .send()
        .await?;
    Ok(resp.status().as_u16())
}

/// Read new mails at the sink, queue the planned clicks, and make those that are due.
async fn people_step(
    sink: &SmtpSink,
    people: &Arc<Mutex<People>>,
    plans: &HashMap<String, (Plan, u64)>,
    client: &reqwest::Client,
) {
    let (start, new) = {
        let p = lock(people);
        (p.mailbox.read, sink.messages_since(p.mailbox.read))
    };
    let now = Instant::now();
    {
        let mut p = lock(people);
        for NewMail { to, mail, first } in p.mailbox.file(start, &new) {
            if !first {
                continue;
            }
            let Some(&(plan, delay)) = plans.get(&to) else {
                continue;
            };
            let link = match plan {
                Plan::Nothing => continue,
                Plan::Confirm => mail
                    .part("text/plain")
                    .and_then(|t| link_in(t, "/confirm/")),
                Plan::Unsubscribe => mail
                    .header("List-Unsubscribe")
                    .and_then(|h| link_in(h, "/unsubscribe/")),
            };
            match link {
                Some(link) => p.queue.push(Click {
                    email: to,
                    plan,
                    link,
                    due: now + Duration::from_millis(delay),
                    attempts: 0,
                }),
                None => p.given_up.push(format!("{to}: no link in the mail")),
            }
        }
    }
    let due: Vec<Click> = {
        let mut p = lock(people);
        let (due, rest): (Vec<Click>, Vec<Click>) = p.queue.drain(..).partition(|c| c.due <= now);
        p.queue = rest;
        p.in_flight += due.len();
        due
    };
    let mut set = tokio::task::JoinSet::new();
    for c in due {
        let client = client.clone();
        set.spawn(async move {
            let r = match c.plan {
                Plan::Confirm => confirm(&client, &c.link).await,
                _ => unsubscribe(&client, &c.link).await,
            };
            (c, r)
        });
        // Keep a handful in flight, as real traffic would.
        if set.len() >= 16
            && let Some(Ok((c, r))) = set.join_next().await
        {
            settle(people, c, r);
        }
    }
    while let Some(res) = set.join_next().await {
        if let Ok((c, r)) = res {
            settle(people, c, r);
        }
    }
}

fn settle(people: &Arc<Mutex<People>>, mut c: Click, r: Result<u16, reqwest::Error>) {
    let mut p = lock(people);
    p.in_flight -= 1;
    p.attempts += 1;
    c.attempts += 1;
    match r {
        Ok(200) => {
            let now = Instant::now();
            match c.plan {
                Plan::Confirm => p.acked_confirm.insert(c.email, now),
                _ => p.acked_unsubscribe.insert(c.email, now),
            };
        }
        Ok(409) => p.refused.push(format!("{}: 409", c.email)),
        // Daemon down or restarting (connection refused, a reset mid-request, a page nonce
        // from the previous process, 503): try again shortly, as a person would.
        other => {
            if c.attempts >= 400 {
                p.given_up.push(format!("{}: {other:?}", c.email));
            } else {
                c.due = Instant::now() + Duration::from_millis(150);
                p.queue.push(c);
            }
        }
    }
}

fn lock(p: &Arc<Mutex<People>>) -> std::sync::MutexGuard<'_, People> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

/// The set-up directory: shipped config adapted to the fakes, rules and templates copied.
fn write_setup(
    dir: &Path,
    opts: &Options,
    port: u16,
    sink: &SmtpSink,
    fake: &FakeZoho,
) -> anyhow::Result<String> {
    let store_url = match &opts.backend {
        Backend::Sqlite => format!("sqlite://{}", dir.join("var/optinsync.db").display()),
        Backend::Postgres { url } => url.clone(),
    };
    let mut cfg = ShippedConfig::read(&opts.repo)?;
    cfg.serve_on(port)?;
    // The shipped poll interval (10 s) stays: contacts are all in the CRM from the start, and
    // each pass runs the rules over every contact, which at 20,000 takes seconds.
    cfg.store(&store_url)?;
    cfg.lift_rate_limits(10_000_000)?;
    cfg.secret("crash-harness-secret-0123456789abcdef-0123")?;
    cfg.smtp_to(sink.port())?;
    cfg.smtp_pool(opts.in_flight)?;
    cfg.replace_sections(
        "[connectors.crm]",
        "[connectors.campaigns]",
        &zoho_crm_section(&fake.url(), ""),
    )?;
    cfg.write(&dir.join("config.toml"))?;
    copy_setup(&opts.repo, dir)?;
    std::fs::create_dir_all(dir.join("var"))?;
    Ok(store_url)
}

fn spawn_daemon(opts: &Options, dir: &Path, n: usize) -> anyhow::Result<Child> {
    let start = format!("daemon start #{n}");
    util::spawn_daemon(
        &opts.bin,
        &dir.join("config.toml"),
        &dir.join("daemon.log"),
        &start,
    )
}

fn log_tail(dir: &Path) -> String {
    util::log_tail(&dir.join("daemon.log"))
}

fn listening(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// Read the ledger forward from what was already seen.
async fn read_ledger(store: &dyn Store, seen: &mut BTreeMap<i64, String>) {
    let mut after = seen.keys().next_back().copied().unwrap_or(0);
    loop {
        // The tables may not exist yet (first daemon still migrating): try again later.
        let Ok(page) = store.ledger_page(after, 5000).await else {
            return;
        };
        let Some(last) = page.last() else { return };
        after = last.seq;
        for e in page {
            seen.insert(e.seq, e.hash);
        }
    }
}

/// Run the harness once, reading the store through `stores`; `Err` only when the set-up
/// itself fails.
pub async fn run(opts: &Options, stores: &dyn OpenStore) -> anyhow::Result<Report> {
    let started = Instant::now();
    let mut rng = Rng::new(opts.seed);
    let plans = Arc::new(plans(&mut rng, opts));
    let tmp = tempfile::Builder::new()
        .prefix("optinsync-crash-")
        .tempdir()?;
    let dir = tmp.path().to_path_buf();
    let sink = Arc::new(SmtpSink::start());
    sink.set_accept_delay(opts.sink_accept_delay);
    let fake = FakeZoho::start();
    fake.with(|s| {
        // A daemon restarted 50 times in a few minutes asks for 50 access tokens; the real
        // limit (10 per 10 minutes) is the OAuth client's business and tested elsewhere.
        s.token_limit = usize::MAX;
        s.credits_remaining = i64::MAX;
    });
    fake.seed("Contacts", opts.contacts);
    let port = crate::free_port();
    let store_url = write_setup(&dir, opts, port, &sink, &fake)?;

    let people = Arc::new(Mutex::new(People::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let people_task = {
        let (sink, people, plans, stop) = (
            Arc::clone(&sink),
            Arc::clone(&people),
            Arc::clone(&plans),
            Arc::clone(&stop),
        );
        tokio::spawn(async move {
            let client = util::people_client();
            while !stop.load(Ordering::SeqCst) {
                people_step(&sink, &people, &plans, &client).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    // Kill phase.
    let mut seen: BTreeMap<i64, String> = BTreeMap::new();
    let mut store: Option<Arc<dyn Store>> = None;
    let mut kills_at: Vec<usize> = Vec::new();
    let mut kills_during_start = 0;
    for k in 0..opts.kills {
        let mut child = spawn_daemon(opts, &dir, k)?;
        let uptime = Duration::from_millis(rng.between(opts.uptime_ms.0, opts.uptime_ms.1));
        tokio::time::sleep(uptime).await;
        if let Some(status) = child.try_wait()? {
            bail!(
                "daemon #{k} exited by itself with {status}:\n{}",
                log_tail(&dir)
            );
        }
        if !listening(port) {
            kills_during_start += 1;
        }
        let db_exists = match opts.backend {
            Backend::Sqlite => dir.join("var/optinsync.db").exists(),
            Backend::Postgres { .. } => true,
        };
        if store.is_none() && db_exists {
            store = stores.open(&store_url).await.ok();
        }
        if let Some(s) = &store {
            read_ledger(s.as_ref(), &mut seen).await;
        }
        child.kill()?; // SIGKILL
        child.wait()?;
        // Let the sink store a message whose end of DATA arrived just before the kill.
        tokio::time::sleep(Duration::from_millis(30)).await;
        kills_at.push(sink.count());
    }
    let kill_phase = started.elapsed();

    // Final clean run: drain everything, then stop with SIGTERM.
    let drain_start = Instant::now();
    let mut child = spawn_daemon(opts, &dir, opts.kills)?;
    let store = match store {
        Some(s) => s,
        None => {
            let t = Instant::now();
            loop {
                if let Ok(s) = stores.open(&store_url).await {
                    break s;
                }
                if t.elapsed() > Duration::from_secs(30) {
                    bail!("cannot open the store {store_url}");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let mut drained = false;
    while drain_start.elapsed() < opts.drain_timeout {
        if let Some(status) = child.try_wait()? {
            bail!(
                "final daemon exited by itself with {status}:\n{}",
                log_tail(&dir)
            );
        }
        let (clicks_open, mailed) = {
            let p = lock(&people);
            (p.queue.len() + p.in_flight, p.mailbox.by_recipient.len())
        };
        let outbox_pending = store.outbox_pending().await.unwrap_or(i64::MAX);
        if clicks_open == 0 && mailed >= opts.contacts && outbox_pending == 0 {
            drained = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let _ = people_task.await;
    util::terminate(&mut child, Duration::from_secs(30)).await?;
    let drain = drain_start.elapsed();
    if !drained {
        eprintln!(
            "crash harness: the final run did not drain within {:?}; checking what is there\n{}",
            opts.drain_timeout,
            log_tail(&dir)
        );
    }

    // Ground truth.
    let mut report = Report {
        backend: opts.backend.name().to_owned(),
        seed: opts.seed,
        contacts: opts.contacts,
        kills: opts.kills,
        kills_during_start,
        in_flight: usize::try_from(
            opts.in_flight
                .max(1)
                .saturating_mul(opts.units_per_connection.max(1)),
        )
        .unwrap_or(1),
        kill_phase,
        drain,
        seen_events: seen.len(),
        crm_write_backs: fake.updates().len(),
        ..Report::default()
    };
    let verify = Command::new(&opts.bin)
        .arg("--config")
        .arg(dir.join("config.toml"))
        .args(["ledger", "verify"])
        .env_remove("OPTINSYNC_CONFIG")
        .output()?;
    report.chain_ok = verify.status.success();
    report.chain = format!(
        "{}{}",
        String::from_utf8_lossy(&verify.stdout).trim(),
        String::from_utf8_lossy(&verify.stderr).trim()
    );

    let events = all_events(store.as_ref()).await?;
    report.ledger_events = events.len();
    let by_seq: HashMap<i64, &LedgerEvent> = events.iter().map(|e| (e.seq, e)).collect();
    for (seq, hash) in &seen {
        match by_seq.get(seq) {
            None => report.lost_events.push(format!("seq {seq} missing")),
            Some(e) if &e.hash != hash => report.lost_events.push(format!("seq {seq} changed")),
            Some(_) => {}
        }
    }
    let mut contacts: HashMap<String, String> = HashMap::new(); // id → email
    let mut after: Option<String> = None;
    loop {
        let page = store.contacts_page(after.as_deref(), 5000).await?;
        let Some(last) = page.last() else { break };
        after = Some(last.0.clone());
        contacts.extend(page);
    }
    // Per email: (to_state of web events); Message-IDs named by mail-sent events.
    let mut web_states: HashMap<&str, Vec<&str>> = HashMap::new();
    let recorded = recorded_message_ids(&events);
    for e in &events {
        let Some(email) = contacts.get(&e.contact_id) else {
            continue;
        };
        if e.source == "web" {
            web_states
                .entry(email.as_str())
                .or_default()
                .push(e.to_state.as_str());
        }
    }
    let email_to_id: HashMap<&str, &str> = contacts
        .iter()
        .map(|(id, e)| (e.as_str(), id.as_str()))
        .collect();
    let final_state = |email: &str| {
        let store = Arc::clone(&store);
        let id = email_to_id.get(email).map(|s| (*s).to_owned());
        async move {
            match id {
                Some(id) => store.consent_state(&id, LIST).await.ok().flatten(),
                None => None,
            }
        }
    };
    let people = std::mem::take(&mut *lock(&people));
    report.confirmations_acked = people.acked_confirm.len();
    report.withdrawals_acked = people.acked_unsubscribe.len();
    report.click_attempts = people.attempts;
    report.clicks_refused = people.refused.clone();
    report.clicks_given_up = people.given_up.clone();
    report.clicks_given_up.extend(
        people
            .queue
            .iter()
            .map(|c| format!("{}: still queued", c.email)),
    );
    for email in people.acked_confirm.keys() {
        let in_ledger = web_states
            .get(email.as_str())
            .is_some_and(|s| s.contains(&"confirmed"));
        let state = final_state(email).await;
        if !in_ledger || state.as_deref() != Some("confirmed") {
            report.lost_confirmations.push(format!(
                "{email}: in ledger {in_ledger}, final state {state:?}"
            ));
        }
    }
    for email in people.acked_unsubscribe.keys() {
        let in_ledger = web_states
            .get(email.as_str())
            .is_some_and(|s| s.contains(&"withdrawn"));
        let state = final_state(email).await;
        if !in_ledger || state.as_deref() != Some("withdrawn") {
            report.lost_withdrawals.push(format!(
                "{email}: in ledger {in_ledger}, final state {state:?}"
            ));
        }
    }

    report.mails_received = people.mailbox.count();
    let mails = people.mailbox.check(opts.contacts, &recorded);
    report.contacts_without_mail = mails.without_mail;
    for (email, mid) in mails.unrecorded {
        let state = final_state(&email).await;
        report
            .unrecorded_mails
            .push(format!("{email} <{mid}> (final state {state:?})"));
    }
    for c in mails.duplicates {
        // Between consecutive copies: the kill whose count of received mails includes the
        // earlier copy but not the later one.
        let kills: Vec<Option<usize>> = c
            .mails
            .windows(2)
            .map(|w| kills_at.iter().position(|&n| n > w[0].1 && n <= w[1].1))
            .collect();
        let distinct = kills.windows(2).all(|w| w[0] < w[1]);
        report.duplicates.push(Duplicate {
            copies: c.mails.len(),
            message_ids: c.message_ids,
            ledger_records: c.ledger_records,
            explained: c.message_ids == 1
                && c.ledger_records <= 1
                && kills.iter().all(Option::is_some)
                && distinct,
            kills,
            email: c.email,
        });
    }
    // More duplicates explained by one kill than mails in flight would mean a mail outside
    // any send window.
    let mut per_kill: HashMap<usize, usize> = HashMap::new();
    for d in &report.duplicates {
        for k in d.kills.iter().flatten() {
            *per_kill.entry(*k).or_default() += 1;
        }
    }
    let in_flight = report.in_flight;
    for d in &mut report.duplicates {
        if d.kills
            .iter()
            .flatten()
            .any(|k| per_kill.get(k).copied().unwrap_or(0) > in_flight)
        {
            d.explained = false;
        }
    }
    report.most_duplicates_per_kill = per_kill.values().copied().max().unwrap_or(0);

    // The campaigns list (JSONL) against the acknowledged choices.
    let members: std::collections::HashSet<String> =
        std::fs::read_to_string(dir.join("var/lists.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| {
                v.get("email")
                    .and_then(|e| e.as_str())
                    .map(str::to_ascii_lowercase)
            })
            .collect();
    report.list_members = members.len();
    for email in people.acked_confirm.keys() {
        if !members.contains(email) {
            report
                .list_mismatches
                .push(format!("{email} confirmed but not on the list"));
        }
    }
    for email in people.acked_unsubscribe.keys() {
        if members.contains(email) {
            report
                .list_mismatches
                .push(format!("{email} withdrew but is on the list"));
        }
    }
    if members.len() > people.acked_confirm.len() {
        report.list_mismatches.push(format!(
            "{} members for {} confirmations",
            members.len(),
            people.acked_confirm.len()
        ));
    }

    report.wall = started.elapsed();
    if opts.keep_dir || !report.violations().is_empty() {
        let kept = tmp.keep();
        report.dir = Some(kept);
    }
    Ok(report)
}
