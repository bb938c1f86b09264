//! Multi-instance harness: several `optinsync run` daemons on one PostgreSQL database sync the
//! fake Zoho CRM's contacts, send DOI mails to a loopback SMTP sink and subscribe the people who
//! confirm on the fake Zoho Campaigns (through `listsubscribe`, under a tight quota); one
//! daemon is `kill -9`ed mid-run and restarted on the same address, as a supervisor would.
//!
//! Run by the CI test `tests/e2e/multi_instance.rs` and at full size by
//! `examples/multi_instance.rs`.
//!
//! Ground truth, checked once everything is drained:
//! - every contact received its DOI mail; a contact that received it more than once got the
//!   same Message-ID each time, recorded at most once in the ledger, with the kill between the
//!   copies (the crash hit the send window: SMTP accepted, outbox row not finished) — at most
//!   one such mail per kill, counting mails delivered in the window whose retry was skipped
//!   because the person had confirmed meanwhile (unrecorded);
//! - no window of any Zoho Campaigns endpoint ever held more calls than its limit, and no
//!   endpoint was locked: the instances share one budget;
//! - every confirmation answered 200 is on the Campaigns list, nobody else is; the ledger chain
//!   verifies.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;

use super::OpenStore;
use super::util::{
    self, Mailbox, NewMail, ShippedConfig, all_events, confirm, copy_setup, first,
    recorded_message_ids, zoho_crm_section,
};
use crate::smtp::SmtpSink;
use crate::zoho::{self, FakeZoho};
use crate::zoho_campaigns::{FakeCampaigns, MemberStatus};

const LISTKEY: &str = "5a1b2c3d4e5f60718293a4b5c6d7e8f9";

/// The Campaigns endpoints the daemons call, for the quota check.
const ENDPOINTS: [&str; 4] = [
    "getmailinglists",
    "listsubscribe",
    "listunsubscribe",
    "getlistsubscribers",
];

#[derive(Debug, Clone)]
pub struct Options {
    /// The `optinsync` binary.
    pub bin: PathBuf,
    /// The repository root (shipped `config.toml`, `rules/`, `templates/`).
    pub repo: PathBuf,
    /// An empty PostgreSQL database.
    pub pg_url: String,
    pub contacts: usize,
    pub instances: usize,
    /// Every `confirm_every`-th contact confirms (the others ignore the mail).
    pub confirm_every: usize,
    /// Kill one instance once this many mails reached the sink.
    pub kill_after_mails: usize,
    /// Restart the killed instance after this long.
    pub restart_after: Duration,
    /// The `listsubscribe` quota on both sides (fake and connector): calls per window
    /// (whole seconds).
    pub subscribe_limit: (u32, Duration),
    pub poll_interval: &'static str,
    pub drain_timeout: Duration,
    pub keep_dir: bool,
    /// Each instance's SMTP `pool_size`.
    pub in_flight: u32,
    /// Mails the outbox keeps in flight per SMTP connection (the engine's
    /// `outbox::MAIL_UNITS_PER_CALL`); times `in_flight`, the most duplicates the kill may
    /// cause.
    pub units_per_connection: u32,
}

impl Options {
    pub fn new(bin: PathBuf, repo: PathBuf, pg_url: String, contacts: usize) -> Self {
        Options {
            bin,
            repo,
            pg_url,
            contacts,
            instances: 3,
            confirm_every: 2,
            kill_after_mails: contacts / 2,
            restart_after: Duration::from_secs(1),
            subscribe_limit: (20, Duration::from_secs(1)),
            poll_interval: "2s",
            drain_timeout: Duration::from_secs(600),
            keep_dir: false,
            in_flight: 4,
            units_per_connection: 1,
        }
    }
}

/// A duplicate DOI delivery and how it is explained.
#[derive(Debug, Clone)]
pub struct Duplicate {
    pub email: String,
    pub copies: usize,
    pub message_ids: usize,
    pub ledger_records: usize,
    pub kill_between: bool,
}

impl Duplicate {
    fn explained(&self) -> bool {
        self.copies == 2 && self.message_ids == 1 && self.ledger_records <= 1 && self.kill_between
    }
}

#[derive(Debug, Clone, Default)]
pub struct Report {
    pub contacts: usize,
    pub instances: usize,
    /// Mails in flight per instance (the SMTP `pool_size` times the mails per connection).
    pub in_flight: usize,
    pub wall: Duration,
    /// From the first daemon's start to the last DOI mail at the sink.
    pub mail_phase: Duration,
    pub mails_received: usize,
    pub contacts_without_mail: Vec<String>,
    pub duplicates: Vec<Duplicate>,
    pub unrecorded_mails: Vec<String>,
    /// `doi_mail_sent` events per contact above one.
    pub double_records: Vec<String>,
    pub confirmations_acked: usize,
    pub clicks_given_up: Vec<String>,
    /// Confirmations answered by each instance.
    pub clicks_per_instance: Vec<usize>,
    pub list_active: usize,
    pub list_mismatches: Vec<String>,
    /// Endpoint → (peak calls per window, limits per window).
    pub quota: BTreeMap<String, (Vec<usize>, Vec<u32>)>,
    pub quota_locks: u64,
    pub listsubscribe_calls: u64,
    /// Lines "quota in use ... calls wait" per instance (the shared budget made them wait).
    pub quota_waits: Vec<usize>,
    /// Per instance, how many times it ran each job.
    pub jobs: Vec<BTreeMap<String, usize>>,
    pub ledger_events: usize,
    pub chain_ok: bool,
    pub chain: String,
    pub kill_at_mail: usize,
    pub dir: Option<PathBuf>,
}

impl Report {
    /// Every guarantee that does not hold, in words; empty when all hold.
    pub fn violations(&self) -> Vec<String> {
        let mut v = Vec::new();
        if !self.contacts_without_mail.is_empty() {
            v.push(format!(
                "{} contact(s) never got their DOI mail: {:?}",
                self.contacts_without_mail.len(),
                first(&self.contacts_without_mail)
            ));
        }
        let unexplained: Vec<&Duplicate> =
            self.duplicates.iter().filter(|d| !d.explained()).collect();
        if !unexplained.is_empty() {
            v.push(format!(
                "{} duplicate(s) not explained by the send window of the kill: {:?}",
                unexplained.len(),
                unexplained.iter().take(5).collect::<Vec<_>>()
            ));
        }
        // One kill: at most the mails in flight can have been in its send window.
        let extra: usize = self.duplicates.iter().map(|d| d.copies - 1).sum();
        if extra + self.unrecorded_mails.len() > self.in_flight {
            v.push(format!(
                "{extra} duplicate mail(s) and {} unrecorded mail(s) for one kill: more than {} (mails in flight)",
                self.unrecorded_mails.len(),
                self.in_flight
            ));
        }
        if !self.double_records.is_empty() {
            v.push(format!(
                "DOI mail recorded more than once: {:?}",
                first(&self.double_records)
            ));
        }
        for (endpoint, (peaks, limits)) in &self.quota {
            for (p, l) in peaks.iter().zip(limits) {
                if *p > *l as usize {
                    v.push(format!(
                        "Zoho Campaigns `{endpoint}`: {p} calls in one window, limit {l}"
                    ));
                }
            }
        }
        if self.quota_locks > 0 {
            v.push(format!(
                "Zoho Campaigns locked an endpoint {} time(s)",
                self.quota_locks
            ));
        }
        if !self.clicks_given_up.is_empty() {
            v.push(format!(
                "{} confirmation(s) never answered 200: {:?}",
                self.clicks_given_up.len(),
                first(&self.clicks_given_up)
            ));
        }
        if !self.list_mismatches.is_empty() {
            v.push(format!(
                "Campaigns list disagrees with the confirmations: {:?}",
                first(&self.list_mismatches)
            ));
        }
        if !self.chain_ok {
            v.push(format!("ledger chain: {}", self.chain));
        }
        v
    }

    pub fn print(&self) {
        let extra: usize = self.duplicates.iter().map(|d| d.copies - 1).sum();
        println!(
            "multi-instance harness — {} contacts, {} instances on one PostgreSQL, one kill -9 after {} mails",
            self.contacts, self.instances, self.kill_at_mail
        );
        println!(
            "  wall time            {:.1} s (mails {:.1} s: {:.1} mails/s)",
            self.wall.as_secs_f64(),
            self.mail_phase.as_secs_f64(),
            self.mails_received as f64 / self.mail_phase.as_secs_f64().max(0.001)
        );
        println!(
            "  DOI mails            {} received, {} contacts without one, {extra} duplicate(s), {} unrecorded",
            self.mails_received,
            self.contacts_without_mail.len(),
            self.unrecorded_mails.len()
        );
        for d in &self.duplicates {
            println!(
                "    {} ×{}: {} Message-ID(s), {} ledger record(s), kill between copies: {} — {}",
                d.email,
                d.copies,
                d.message_ids,
                d.ledger_records,
                d.kill_between,
                if d.explained() {
                    "send window of the kill"
                } else {
                    "UNEXPLAINED"
                }
            );
        }
        println!(
            "  confirmations        {} answered 200 (per instance: {:?}), {} given up",
            self.confirmations_acked,
            self.clicks_per_instance,
            self.clicks_given_up.len()
        );
        println!(
            "  Campaigns list       {} active, {} mismatches; {} listsubscribe calls",
            self.list_active,
            self.list_mismatches.len(),
            self.listsubscribe_calls
        );
        for (endpoint, (peaks, limits)) in &self.quota {
            println!("  quota {endpoint:<22} peak per window {peaks:?}, limits {limits:?}");
        }
        println!(
            "  quota locks          {}; quota-wait log lines per instance {:?}",
            self.quota_locks, self.quota_waits
        );
        for (i, j) in self.jobs.iter().enumerate() {
            println!("  instance {i} ran       {j:?}");
        }
        println!(
            "  ledger               {} events; {}",
            self.ledger_events, self.chain
        );
        util::print_outcome(self.dir.as_deref(), &self.violations());
    }
}

#[derive(Debug, Clone)]
struct Click {
    email: String,
    /// Path and token (`/confirm/...`); sent to one instance or another.
    path: String,
    instance: usize,
    attempts: u32,
}

#[derive(Debug, Default)]
struct People {
    mailbox: Mailbox,
    last_mail: Option<Instant>,
    queue: Vec<Click>,
    in_flight: usize,
    acked: BTreeMap<String, usize>,
    given_up: Vec<String>,
}

fn lock(p: &Mutex<People>) -> std::sync::MutexGuard<'_, People> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

/// Read new mails at the sink and make the confirmations, each on some instance (any
/// instance serves any link: the token is signed with the shared key).
async fn people_step(
    sink: &SmtpSink,
    people: &Mutex<People>,
    opts: &Options,
    ports: &[u16],
    client: &reqwest::Client,
) {
    let (start, new) = {
        let p = lock(people);
        (p.mailbox.read, sink.messages_since(p.mailbox.read))
    };
    {
        let mut p = lock(people);
        if !new.is_empty() {
            p.last_mail = Some(Instant::now());
        }
        for NewMail { to, mail, first } in p.mailbox.file(start, &new) {
            let index: usize = to
                .trim_start_matches("person")
                .split('@')
                .next()
                .and_then(|i| i.parse().ok())
                .unwrap_or(1);
            if !first || !index.is_multiple_of(opts.confirm_every) {
                continue;
            }
            let link = mail.part("text/plain").and_then(|t| {
                t.split_whitespace()
                    .find(|w| w.starts_with("http") && w.contains("/confirm/"))
                    .and_then(|w| w.find("/confirm/").map(|at| w[at..].to_owned()))
            });
            match link {
                Some(path) => p.queue.push(Click {
                    email: to,
                    path,
                    instance: index % ports.len(),
                    attempts: 0,
                }),
                None => p
                    .given_up
                    .push(format!("{to}: no confirm link in the mail")),
            }
        }
    }
    let due: Vec<Click> = {
        let mut p = lock(people);
        let due = std::mem::take(&mut p.queue);
        p.in_flight += due.len();
        due
    };
    let mut set = tokio::task::JoinSet::new();
    for c in due {
        let client = client.clone();
        let url = format!("http://127.0.0.1:{}{}", ports[c.instance], c.path);
        set.spawn(async move {
            let r = confirm(&client, &url).await;
            (c, r)
        });
        if set.len() >= 16
            && let Some(Ok((c, r))) = set.join_next().await
        {
            settle(people, c, r, ports.len());
        }
    }
    while let Some(res) = set.join_next().await {
        if let Ok((c, r)) = res {
            settle(people, c, r, ports.len());
        }
    }
}

fn settle(people: &Mutex<People>, mut c: Click, r: Result<u16, reqwest::Error>, n: usize) {
    let mut p = lock(people);
    p.in_flight -= 1;
    c.attempts += 1;
    match r {
        Ok(200) => {
            p.acked.insert(c.email, c.instance);
        }
        // That instance is down (killed, restarting) or answered otherwise: the person tries
        // again, and the load balancer sends them to the next instance.
        other => {
            if c.attempts >= 200 {
                p.given_up.push(format!("{}: {other:?}", c.email));
            } else {
                c.instance = (c.instance + 1) % n;
                p.queue.push(c);
            }
        }
    }
}

/// The working directory: one config per instance (own port), rules and templates copied.
fn write_setup(
    dir: &Path,
    opts: &Options,
    ports: &[u16],
    sink: &SmtpSink,
    crm: &FakeZoho,
    campaigns: &FakeCampaigns,
) -> anyhow::Result<()> {
    let (limit, per) = opts.subscribe_limit;
    let campaigns_section = format!(
        "[connectors.campaigns]\nkind = \"zoho-campaigns\"\nclient_id = \"{cid}\"\nclient_secret = \"{cs}\"\nrefresh_token = \"{rt}\"\n\
         accounts_url = \"{zc}\"\ncampaigns_url = \"{zc}\"\nstatus_interval = \"2s\"\n\n\
         [connectors.campaigns.limits]\nlistsubscribe = [\"{limit}/{per_s}s\"]\n\n\
         [connectors.campaigns.fields]\n\"First Name\" = \"First_Name\"\n\"Last Name\" = \"Last_Name\"\n\n\
         [connectors.campaigns.lists.newsletter]\nlistkey = \"{LISTKEY}\"\ndoi = \"optinsync\"\n\n",
        cid = zoho::CLIENT_ID,
        cs = zoho::CLIENT_SECRET,
        rt = zoho::REFRESH_TOKEN,
        zc = campaigns.url(),
        per_s = per.as_secs().max(1),
    );
    let mut shared = ShippedConfig::read(&opts.repo)?;
    shared.replace_sections(
        "[connectors.crm]",
        "[connectors.mail]",
        &format!("{}{campaigns_section}", zoho_crm_section(&crm.url(), "")),
    )?;
    shared.smtp_to(sink.port())?;
    shared.smtp_pool(opts.in_flight)?;
    shared.store(&opts.pg_url)?;
    shared.replace(
        "poll_interval = \"10s\"",
        &format!("poll_interval = \"{}\"", opts.poll_interval),
    )?;
    // Every "person" clicks from 127.0.0.1: lift the per-IP limit of the pages.
    shared.lift_rate_limits(10_000_000)?;
    shared.secret("multi-instance-secret-0123456789abcdef-012")?;
    for (i, port) in ports.iter().enumerate() {
        let mut cfg = shared.clone();
        cfg.serve_on(*port)?;
        cfg.write(&dir.join(format!("config-{i}.toml")))?;
    }
    copy_setup(&opts.repo, dir)
}

fn spawn_daemon(opts: &Options, dir: &Path, i: usize, start: usize) -> anyhow::Result<Child> {
    let config = dir.join(format!("config-{i}.toml"));
    let start = format!("instance {i} start #{start}");
    util::spawn_daemon(&opts.bin, &config, &log_path(dir, i), &start)
}

fn log_path(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("daemon-{i}.log"))
}

/// Run the harness once, reading the store through `stores`; `Err` only when the set-up
/// itself fails or it does not finish.
pub async fn run(opts: &Options, stores: &dyn OpenStore) -> anyhow::Result<Report> {
    let started = Instant::now();
    let tmp = tempfile::Builder::new()
        .prefix("optinsync-multi-")
        .tempdir()?;
    let dir = tmp.path().to_path_buf();
    let sink = Arc::new(SmtpSink::start());
    let crm = FakeZoho::start();
    crm.with(|s| {
        s.token_limit = usize::MAX;
        s.credits_remaining = i64::MAX;
    });
    crm.seed("Contacts", opts.contacts);
    let campaigns = FakeCampaigns::start();
    campaigns.add_list(LISTKEY, "Newsletter", false);
    let (limit, per) = opts.subscribe_limit;
    campaigns.set_quota("listsubscribe", &[(limit, per)], Duration::from_secs(60));
    let ports: Vec<u16> = (0..opts.instances).map(|_| crate::free_port()).collect();
    write_setup(&dir, opts, &ports, &sink, &crm, &campaigns)?;

    let people = Arc::new(Mutex::new(People::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let people_task = {
        let (sink, people, stop, opts, ports) = (
            Arc::clone(&sink),
            Arc::clone(&people),
            Arc::clone(&stop),
            opts.clone(),
            ports.clone(),
        );
        tokio::spawn(async move {
            let client = util::people_client();
            while !stop.load(Ordering::SeqCst) {
                people_step(&sink, &people, &opts, &ports, &client).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    let mut children: Vec<Child> = Vec::new();
    for i in 0..opts.instances {
        children.push(spawn_daemon(opts, &dir, i, 0)?);
    }
    let store = {
        let t = Instant::now();
        loop {
            if let Ok(s) = stores.open(&opts.pg_url).await
                && s.outbox_pending().await.is_ok()
            {
                break s;
            }
            if t.elapsed() > Duration::from_secs(60) {
                bail!("cannot open the store {}", opts.pg_url);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };

    // Kill the last instance once enough mails are out, then restart it on the same address.
    let victim = opts.instances - 1;
    let mut kill_at: Option<usize> = None;
    let mut restarted = false;
    let mut killed_at = Instant::now();
    let deadline = Instant::now() + opts.drain_timeout;
    let done = loop {
        if Instant::now() > deadline {
            break false;
        }
        for (i, c) in children.iter_mut().enumerate() {
            if let Some(status) = c.try_wait()?
                && !(i == victim && kill_at.is_some() && !restarted)
            {
                bail!(
                    "instance {i} exited by itself with {status}:\n{}",
                    util::log_tail(&log_path(&dir, i))
                );
            }
        }
        if kill_at.is_none() && sink.count() >= opts.kill_after_mails {
            children[victim].kill()?; // SIGKILL
            children[victim].wait()?;
            // Let the sink store a message whose end of DATA arrived just before the kill.
            tokio::time::sleep(Duration::from_millis(30)).await;
            kill_at = Some(sink.count());
            killed_at = Instant::now();
        }
        if kill_at.is_some() && !restarted && killed_at.elapsed() >= opts.restart_after {
            children[victim] = spawn_daemon(opts, &dir, victim, 1)?;
            restarted = true;
        }
        let (open_clicks, mailed, acked) = {
            let p = lock(&people);
            (
                p.queue.len() + p.in_flight,
                p.mailbox.by_recipient.len(),
                p.acked.len(),
            )
        };
        let pending = store.outbox_pending().await.unwrap_or(i64::MAX);
        let active = campaigns.active(LISTKEY).len();
        if restarted
            && open_clicks == 0
            && mailed >= opts.contacts
            && pending == 0
            && active >= acked
        {
            break true;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    stop.store(true, Ordering::SeqCst);
    let _ = people_task.await;
    for c in &mut children {
        util::terminate(c, Duration::from_secs(40)).await?;
    }
    if !done {
        let (mailed, acked) = {
            let p = lock(&people);
            (p.mailbox.by_recipient.len(), p.acked.len())
        };
        bail!(
            "not drained within {:?}: {mailed} contacts mailed, {acked} confirmations, outbox pending {:?}, {} on the list; kept {}\n{}",
            opts.drain_timeout,
            store.outbox_pending().await.ok(),
            campaigns.active(LISTKEY).len(),
            tmp.keep().display(),
            util::log_tail(&log_path(&dir, 0))
        );
    }

    let mut report = Report {
        contacts: opts.contacts,
        instances: opts.instances,
        in_flight: usize::try_from(
            opts.in_flight
                .max(1)
                .saturating_mul(opts.units_per_connection.max(1)),
        )
        .unwrap_or(1),
        kill_at_mail: kill_at.unwrap_or(0),
        ..Report::default()
    };
    let people = std::mem::take(&mut *lock(&people));
    report.mail_phase = people
        .last_mail
        .map(|t| t.duration_since(started))
        .unwrap_or_default();

    // Ledger: Message-IDs named by mail-sent events, DOI records per contact, the chain.
    let events = all_events(store.as_ref()).await?;
    report.ledger_events = events.len();
    match store.verify_ledger().await {
        Ok(()) => {
            report.chain_ok = true;
            report.chain = "verified".into();
        }
        Err(e) => report.chain = e,
    }
    let recorded = recorded_message_ids(&events);
    let mut doi_records: HashMap<&str, usize> = HashMap::new();
    for e in events.iter().filter(|e| e.kind.ends_with("_mail_sent")) {
        *doi_records.entry(e.contact_id.as_str()).or_default() += 1;
    }
    report.double_records = doi_records
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(c, n)| format!("contact {c}: {n} records"))
        .collect();

    let kill = report.kill_at_mail;
    report.mails_received = people.mailbox.count();
    let mails = people.mailbox.check(opts.contacts, &recorded);
    report.contacts_without_mail = mails.without_mail;
    report.unrecorded_mails = mails.unrecorded.into_iter().map(|(_, mid)| mid).collect();
    report.duplicates = mails
        .duplicates
        .into_iter()
        .map(|c| Duplicate {
            copies: c.mails.len(),
            message_ids: c.message_ids,
            ledger_records: c.ledger_records,
            // The first copy reached the sink before the kill, the second after it.
            kill_between: c.mails[0].1 < kill && c.mails[1].1 >= kill,
            email: c.email,
        })
        .collect();

    report.confirmations_acked = people.acked.len();
    report.clicks_given_up = people.given_up.clone();
    report.clicks_per_instance = (0..opts.instances)
        .map(|i| people.acked.values().filter(|v| **v == i).count())
        .collect();
    let active: std::collections::BTreeSet<String> = campaigns
        .members(LISTKEY)
        .into_iter()
        .filter(|m| m.status == MemberStatus::Active)
        .map(|m| m.email.to_ascii_lowercase())
        .collect();
    report.list_active = active.len();
    for email in people.acked.keys() {
        if !active.contains(email) {
            report
                .list_mismatches
                .push(format!("{email} confirmed but is not on the list"));
        }
    }
    for email in &active {
        if !people.acked.contains_key(email) {
            report
                .list_mismatches
                .push(format!("{email} is on the list without confirming"));
        }
    }

    campaigns.with(|s| {
        for endpoint in ENDPOINTS {
            let limits = s
                .quotas
                .get(endpoint)
                .map(|q| q.windows.iter().map(|(n, _)| *n).collect())
                .unwrap_or_default();
            let peaks = s.peaks.get(endpoint).cloned().unwrap_or_default();
            report.quota.insert(endpoint.to_owned(), (peaks, limits));
        }
        report.quota_locks = s.locks.values().sum();
        report.listsubscribe_calls = s.calls.get("listsubscribe").copied().unwrap_or(0);
    });

    for i in 0..opts.instances {
        let log = std::fs::read_to_string(log_path(&dir, i)).unwrap_or_default();
        report
            .quota_waits
            .push(log.matches("calls wait for their slot").count());
        let mut jobs = BTreeMap::new();
        for job in ["crm-poller", "campaigns-poller", "scheduler"] {
            jobs.insert(job.to_owned(), log.matches(&format!("job {job}: ")).count());
        }
        report.jobs.push(jobs);
    }

    report.wall = started.elapsed();
    if opts.keep_dir || !report.violations().is_empty() {
        report.dir = Some(tmp.keep());
    }
    Ok(report)
}
