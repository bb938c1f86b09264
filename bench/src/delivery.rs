//! Rows 11-13: delivery at scale, against Postfix's own SMTP benchmark pair on loopback.
//!
//! One `optinsync run` over `n` contacts who all asked for the newsletter (fake Zoho CRM),
//! mailing into Postfix's `smtp-sink` over eight connections, with DKIM (RSA-2048):
//! - row 11: the initial DOI wave, from the daemon's start to the last DOI mail recorded in
//!   the ledger (a mail is recorded once the relay accepted it), and the mail rate over the
//!   mailing part of it; beside it `smtp-source` → `smtp-sink` with eight sessions and the same
//!   message size, in the same run (the ceiling of this machine's loopback SMTP);
//! - row 13: then everyone confirms (the load client, GET and POST per link) and the daemon
//!   pushes the confirmations to a fake Zoho Campaigns with Zoho's real quotas scaled in time
//!   ([`SCALE`]); the share of the rate Zoho's documented limits allow, and lock-outs.
//!
//! The sinks append every message to a dump file, both the same way, so the message size is
//! measured, not assumed.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use optinsync_plugin_zoho::campaigns::Api;
use optinsync_testkit::zoho::{FakeZoho, SyntheticSource};
use optinsync_testkit::zoho_campaigns::{self as fake_campaigns, FakeCampaigns};

use crate::setup;

/// Time scale of the fake Zoho Campaigns and the connector: 1, Zoho's limits as documented.
/// The confirmations must arrive faster than the push may go, or the row measures how fast
/// this machine confirms, not the push: here the load client and the daemon confirm ~600 a
/// second on two cores, and at ×0.25 (a minute lasting 15 s) Zoho would allow ~1,300
/// addresses a second, so the push waited for confirmations (December 2026: 0.45 "of the
/// allowed rate" with nothing left to push). Unscaled it allows ~330 a second.
pub const SCALE: f64 = 1.0;
/// SMTP connections (`pool_size`) and `smtp-source` sessions.
pub const CONNECTIONS: u32 = 8;
const LIST_KEY: &str = "benchnewsletterkey";
/// Rows 11-13 run up to this many contacts (the targets are stated for 100k; a million DOI
/// mails would take a quarter of an hour at the target rate).
pub const MAX_CONTACTS: u64 = 100_000;

#[derive(Debug, Default)]
pub struct Figures {
    /// Row 11: seconds from the daemon's start to the last DOI mail recorded.
    pub wave_secs: f64,
    /// Row 11: DOI mails per second from the first recorded to the last.
    pub mail_rate: f64,
    /// Row 11: the daemon's CPU time per DOI mail over the same span as `mail_rate`.
    pub cpu_per_mail: Option<Duration>,
    /// Row 11: `smtp-source` messages per second into `smtp-sink`, same size and sessions.
    pub ceiling_rate: f64,
    /// Bytes per message as the sink stored it (the daemon's DOI mails).
    pub message_bytes: u64,
    /// Row 13: addresses per minute achieved / allowed by the documented limits.
    pub push_share: Option<f64>,
    pub push_locks: u64,
    pub push_detail: String,
}

/// Postfix's benchmark tools, or why they cannot run.
fn postfix_tool(name: &str) -> anyhow::Result<PathBuf> {
    optinsync_testkit::find_program(name).with_context(|| {
        format!("{name} not found: install the Debian package postfix (apt-get install postfix)")
    })
}

/// A running `smtp-sink`, appending each message to `dump`; killed when dropped.
struct Sink {
    child: Child,
    port: u16,
    dump: PathBuf,
}

impl Sink {
    fn start(dir: &Path, name: &str) -> anyhow::Result<Sink> {
        let bin = postfix_tool("smtp-sink")?;
        // As root smtp-sink must drop to another user (`-u`), who then writes the dump.
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777))?;
        let dump = dir.join(format!("{name}.dump"));
        let port = optinsync_testkit::free_port();
        let mut cmd = Command::new(bin);
        if optinsync_testkit::is_root() {
            cmd.args(["-u", "nobody"]);
        }
        let child = cmd
            .arg("-D")
            .arg(&dump)
            .arg(format!("127.0.0.1:{port}"))
            .arg("1000")
            .stdout(Stdio::null())
            .spawn()
            .context("starting smtp-sink")?;
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if start.elapsed() > Duration::from_secs(10) {
                bail!("smtp-sink did not listen on 127.0.0.1:{port} within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Sink { child, port, dump })
    }

    fn dumped_bytes(&self) -> u64 {
        std::fs::metadata(&self.dump).map(|m| m.len()).unwrap_or(0)
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.dump);
    }
}

/// `[connectors.campaigns]` for the fake Zoho Campaigns: the newsletter on one list, no
/// fields (so confirmations go ten per `addlistsubscribersinbulk` call), time-scaled quotas.
fn campaigns_section(url: &str) -> String {
    format!(
        "[connectors.campaigns]\nkind = \"zoho-campaigns\"\nclient_id = \"{}\"\nclient_secret = \"{}\"\n\
         refresh_token = \"{}\"\naccounts_url = \"{url}\"\ncampaigns_url = \"{url}\"\n\
         time_scale = {SCALE}\nfields = {{}}\nstatus_interval = \"1h\"\n\n\
         [connectors.campaigns.lists.newsletter]\nlistkey = \"{LIST_KEY}\"\ndoi = \"optinsync\"\n\n",
        fake_campaigns::CLIENT_ID,
        fake_campaigns::CLIENT_SECRET,
        fake_campaigns::REFRESH_TOKEN,
    )
}

/// Counts ledger events of one kind as they are appended, reading only the rows added since
/// the last look (a rowid range): a full count every poll would scan the whole ledger and take
/// CPU from the daemon it measures.
struct EventCounter {
    kind: &'static str,
    seen_seq: i64,
    count: u64,
}

impl EventCounter {
    fn new(kind: &'static str) -> Self {
        Self {
            kind,
            seen_seq: 0,
            count: 0,
        }
    }

    async fn count(&mut self, pool: &sqlx::SqlitePool) -> anyhow::Result<u64> {
        // The daemon may still be creating its tables. SQLite has one writer: rows commit in
        // `seq` order, so nothing lands behind `seen_seq` later.
        let row: Result<(i64, Option<i64>), _> = sqlx::query_as(
            "SELECT coalesce(sum(kind = $1), 0), max(seq) FROM ledger WHERE seq > $2",
        )
        .bind(self.kind)
        .bind(self.seen_seq)
        .fetch_one(pool)
        .await;
        if let Ok((n, Some(max))) = row {
            self.count += u64::try_from(n).unwrap_or(0);
            self.seen_seq = max;
        }
        Ok(self.count)
    }
}

/// Rows 11-13 at `n` contacts.
pub async fn run(n: u64, bin: &Path, dir: &Path, concurrency: usize) -> anyhow::Result<Figures> {
    let mut figures = Figures::default();
    let sinks = dir.join("sinks");
    let sink = Sink::start(&sinks, "daemon")?;
    let crm = FakeZoho::start();
    let src = SyntheticSource {
        unasserted_every: 0,
        ..SyntheticSource::new(n)
    };
    crm.seed_synthetic("Contacts", src);
    let campaigns = FakeCampaigns::start_with(fake_campaigns::FakeCampaignsOptions {
        time_scale: SCALE,
        ..fake_campaigns::FakeCampaignsOptions::default()
    });
    campaigns.add_list(LIST_KEY, "Bench newsletter", false);
    let wave_dir = dir.join("wave");
    std::fs::create_dir_all(&wave_dir)?;
    std::fs::copy(
        setup::repo().join("tests/e2e/fixtures/dkim-test-rsa.pem"),
        wave_dir.join("dkim.pem"),
    )
    .context("copying the test DKIM key")?;
    let setup = setup::write_with(&wave_dir, None, &crm, sink.port, |cfg| {
        cfg.smtp_pool(CONNECTIONS)?;
        cfg.replace(
            &format!("pool_size = {CONNECTIONS}\n"),
            &format!(
                "pool_size = {CONNECTIONS}\n\n[connectors.mail.dkim]\nselector = \"bench\"\n\
                 domain = \"example.org\"\nkey_file = \"dkim.pem\"\n"
            ),
        )?;
        cfg.replace_sections(
            "[connectors.campaigns]",
            "[connectors.mail]",
            &campaigns_section(&campaigns.url()),
        )
    })?;

    // Row 11: the wave.
    let started = Instant::now();
    let mut daemon = setup::Daemon::spawn(&setup, bin)?;
    let pool = sqlx::SqlitePool::connect(&format!("{}?mode=ro", setup.store_url))
        .await
        .context("opening the store read-only")?;
    let mut first: Option<(Instant, u64)> = None;
    // The daemon's CPU time when the first mail was recorded.
    let mut cpu_at_first: Option<Duration> = None;
    let mut last_report = Instant::now();
    let limit = Duration::from_secs(600).max(Duration::from_millis(n * 20));
    let mut sent_mails = EventCounter::new("doi_mail_sent");
    let done_at = loop {
        let sent = sent_mails.count(&pool).await?;
        let now = Instant::now();
        if sent > 0 && first.is_none() {
            first = Some((now, sent));
            cpu_at_first = daemon.pid().and_then(setup::cpu_time);
        }
        if sent >= n {
            break now;
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            crate::progress(n, &format!("row 11: {sent} DOI mails sent"));
            last_report = now;
        }
        if started.elapsed() > limit {
            bail!("only {sent} of {n} DOI mails after {} s", limit.as_secs());
        }
        daemon.check_alive()?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    figures.wave_secs = done_at.duration_since(started).as_secs_f64();
    let cpu_at_done = daemon.pid().and_then(setup::cpu_time);
    if let Some((at, count)) = first {
        let secs = done_at.duration_since(at).as_secs_f64();
        if secs > 0.0 {
            figures.mail_rate = (n - count) as f64 / secs;
        }
        let mails = u32::try_from(n - count).unwrap_or(u32::MAX);
        figures.cpu_per_mail = cpu_at_first
            .zip(cpu_at_done)
            .filter(|_| mails > 0)
            .map(|(a, b)| b.saturating_sub(a) / mails);
    }
    // The sink's dump is written as each message arrives: all n are in it by now.
    figures.message_bytes = sink.dumped_bytes() / n.max(1);

    // Row 13: everyone confirms; the daemon pushes the confirmations to Zoho Campaigns.
    let base = format!("http://127.0.0.1:{}", setup.port);
    let links = crate::load::confirm_links(&setup.store_url, &base, n as usize).await?;
    crate::progress(n, &format!("row 13: {} confirmations", links.len()));
    let confirmed = links.len();
    let (_, posts) = crate::load::confirm_load(links, concurrency).await?;
    if posts.failed > 0 {
        bail!(
            "{} confirmations failed: {:?}",
            posts.failed,
            posts.first_error
        );
    }
    let push_start = Instant::now();
    let push_limit = Duration::from_secs(600);
    loop {
        let on_list = campaigns.active(LIST_KEY).len();
        if on_list >= confirmed {
            break;
        }
        if push_start.elapsed() > push_limit {
            bail!("{on_list} of {confirmed} confirmations on the Zoho list after 600 s");
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            crate::progress(n, &format!("row 13: {on_list} on the Zoho list"));
            last_report = Instant::now();
        }
        daemon.check_alive()?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    daemon.stop();
    let endpoint = "addlistsubscribersinbulk";
    let times = campaigns.accepted_times(endpoint);
    let (windows, _) = Api::BulkAdd.documented_limits();
    figures.push_locks = campaigns.locks();
    if let (Some(first), Some(last)) = (times.first(), times.last()) {
        let calls = times.len() as u64;
        let span = last.duration_since(*first).as_secs_f64() / SCALE;
        let ideal = fake_campaigns::best_schedule_seconds(calls, windows);
        // Addresses per unscaled minute, achieved and allowed (the best schedule of the
        // same number of calls under the same windows).
        let achieved = confirmed as f64 / span * 60.0;
        let allowed = confirmed as f64 / ideal * 60.0;
        // Calls that all fit in the first quota window allow any speed: no share to compute.
        figures.push_share = (span > 0.0 && ideal > 0.0).then_some(achieved / allowed);
        if ideal == 0.0 {
            figures.push_detail = format!(
                "{confirmed} confirmations in {calls} {endpoint} calls: all fit in one quota window, \
                 so the limits never bound the push ({achieved:.0} addresses/min); {} lock-outs",
                figures.push_locks
            );
            return ceiling(figures, &sinks, n);
        }
        figures.push_detail = format!(
            "{confirmed} confirmations in {calls} {endpoint} calls ({} listsubscribe), {:.1} min unscaled \
             (×{SCALE}); {achieved:.0} addresses/min achieved, {allowed:.0} allowed; {} lock-outs",
            campaigns.calls("listsubscribe"),
            span / 60.0,
            figures.push_locks
        );
    }

    ceiling(figures, &sinks, n)
}

/// The ceiling: `smtp-source` → `smtp-sink`, same sessions and message size.
fn ceiling(mut figures: Figures, sinks: &Path, n: u64) -> anyhow::Result<Figures> {
    let ceiling = Sink::start(sinks, "ceiling")?;
    let source = postfix_tool("smtp-source")?;
    // smtp-source's own headers and the sink's added ones: measure them with a short burst.
    let probe = 100u64;
    let probe_len = figures.message_bytes.max(1000);
    let status = Command::new(&source)
        .args([
            "-s",
            "1",
            "-m",
            &probe.to_string(),
            "-l",
            &probe_len.to_string(),
        ])
        .arg(format!("127.0.0.1:{}", ceiling.port))
        .status()
        .context("running smtp-source")?;
    if !status.success() {
        bail!("smtp-source failed ({status})");
    }
    let overhead = (ceiling.dumped_bytes() / probe).saturating_sub(probe_len);
    let length = figures.message_bytes.saturating_sub(overhead).max(1);
    let before = ceiling.dumped_bytes();
    let start = Instant::now();
    let status = Command::new(&source)
        .args([
            "-s",
            &CONNECTIONS.to_string(),
            "-m",
            &n.to_string(),
            "-l",
            &length.to_string(),
        ])
        .arg(format!("127.0.0.1:{}", ceiling.port))
        .status()
        .context("running smtp-source")?;
    let took = start.elapsed().as_secs_f64();
    if !status.success() {
        bail!("smtp-source failed ({status})");
    }
    let per_message = (ceiling.dumped_bytes() - before) / n.max(1);
    crate::progress(
        n,
        &format!(
            "row 11: smtp-source sent {n} messages of {per_message} bytes (daemon's: {})",
            figures.message_bytes
        ),
    );
    figures.ceiling_rate = n as f64 / took;
    Ok(figures)
}
