//! The set-up a measured daemon runs in: a directory with `config.toml` (the shipped one
//! adapted to the loopback fakes), `rules/` and `templates/`; and running the `optinsync`
//! binary as a separate process while sampling its peak RSS.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use optinsync_testkit::harness::util::{ShippedConfig, copy_setup, zoho_crm_section};
use optinsync_testkit::zoho::FakeZoho;

/// The token secret of the bench's config (confirm links are minted with it).
pub const SECRET: &str = "bench-only-secret-0123456789abcdef-0123456789";
pub const KEY_ID: &str = "k1";
pub const CHANNEL_TOKEN: &str = "bench-channel-token-0123456789";

/// The repository (rules, templates and the shipped config are read from it).
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// One daemon set-up directory.
#[derive(Debug)]
pub struct Setup {
    pub dir: PathBuf,
    pub port: u16,
    pub store_url: String,
}

impl Setup {
    pub fn config(&self) -> PathBuf {
        self.dir.join("config.toml")
    }

    /// `optinsync --config DIR/config.toml ARGS`, logging at the binary's default level.
    pub fn command(&self, bin: &Path, args: &[&str]) -> Command {
        let mut c = Command::new(bin);
        c.arg("--config")
            .arg(self.config())
            .args(args)
            .current_dir(&self.dir)
            .env_remove("OPTINSYNC_CONFIG")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null());
        c
    }
}

/// The `[connectors.crm]` section for the fake (also parsed by the raw baseline).
pub fn crm_section(fake: &FakeZoho, port: u16) -> String {
    format!(
        "{}[connectors.crm.webhook]\ntoken = \"{CHANNEL_TOKEN}\"\nnotify_url = \"http://127.0.0.1:{port}/webhooks/crm\"\nchannel_id = 1000000068001\n\n",
        zoho_crm_section(
            &fake.url(),
            "language_field = \"Language\"\nper_page = 200\n"
        ),
    )
}

/// Write the set-up into `dir`: the shipped `config.toml` with the store, the listen
/// address, the Zoho CRM fake, the SMTP sink, a long poll interval (webhooks and explicit
/// `sync --once` bring changes in) and no per-IP limit (every client is 127.0.0.1).
pub fn write(
    dir: &Path,
    store_url: Option<&str>,
    fake: &FakeZoho,
    smtp_port: u16,
) -> anyhow::Result<Setup> {
    write_with(dir, store_url, fake, smtp_port, |_| Ok(()))
}

/// [`write`], with `edit` applied to the config before it is written.
pub fn write_with(
    dir: &Path,
    store_url: Option<&str>,
    fake: &FakeZoho,
    smtp_port: u16,
    edit: impl FnOnce(&mut ShippedConfig) -> anyhow::Result<()>,
) -> anyhow::Result<Setup> {
    std::fs::create_dir_all(dir.join("var"))?;
    let port = optinsync_testkit::free_port();
    let store_url = store_url
        .map(str::to_owned)
        .unwrap_or_else(|| format!("sqlite://{}", dir.join("var/optinsync.db").display()));
    let repo = repo();
    let mut cfg = ShippedConfig::read(&repo)?;
    cfg.serve_on(port)?;
    cfg.store(&store_url)?;
    cfg.lift_rate_limits(100_000_000)?;
    cfg.secret(SECRET)?;
    cfg.replace("poll_interval = \"10s\"", "poll_interval = \"1h\"")?;
    cfg.smtp_to(smtp_port)?;
    cfg.replace_sections(
        "[connectors.crm]",
        "[connectors.campaigns]",
        &crm_section(fake, port),
    )?;
    edit(&mut cfg)?;
    cfg.write(&dir.join("config.toml"))?;
    copy_setup(&repo, dir)?;
    Ok(Setup {
        dir: dir.to_path_buf(),
        port,
        store_url,
    })
}

/// The peak resident set (`VmHWM`, KiB) of a running process.
pub fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|k| k.parse().ok())
}

/// CPU time a running process (all its threads) has used so far, from `/proc/{pid}/stat`
/// (`utime` + `stime`, in Linux's fixed 100 ticks a second).
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces: the state
    // is the first, `utime` and `stime` the 12th and 13th.
    let mut rest = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let ticks: u64 = rest.next()?.parse::<u64>().ok()? + rest.next()?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// A finished child: wall time, peak RSS (sampled every 10 ms from `/proc`, so the last
/// few milliseconds before exit may be missed), stdout.
#[derive(Debug)]
pub struct ChildRun {
    pub wall: Duration,
    pub peak_rss_kib: Option<u64>,
    pub stdout: String,
}

/// Run `cmd` to completion (stderr into `log`); an exit other than 0 is an error.
pub fn run_measured(mut cmd: Command, log: &Path) -> anyhow::Result<ChildRun> {
    let out_path = log.with_extension("stdout");
    cmd.stdout(std::fs::File::create(&out_path)?)
        .stderr(std::fs::File::create(log)?);
    let start = Instant::now();
    let mut child = cmd.spawn().context("starting optinsync")?;
    let pid = child.id();
    let mut peak = None;
    let status = loop {
        if let Some(k) = vm_hwm_kib(pid) {
            peak = Some(peak.map_or(k, |p: u64| p.max(k)));
        }
        if let Some(status) = child.try_wait()? {
            break status;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let wall = start.elapsed();
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    if !status.success() {
        bail!(
            "optinsync exited with {status}: {}\n{}",
            stdout.trim(),
            tail(log, 20)
        );
    }
    Ok(ChildRun {
        wall,
        peak_rss_kib: peak,
        stdout,
    })
}

/// The last `n` lines of a log file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `optinsync run`, stopped with SIGTERM (killed if it does not stop) when dropped.
#[derive(Debug)]
pub struct Daemon {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Daemon {
    pub fn spawn(setup: &Setup, bin: &Path) -> anyhow::Result<Daemon> {
        let log = setup.dir.join("daemon.log");
        let child = setup
            .command(bin, &["run"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting optinsync run")?;
        let mut d = Daemon {
            child: Some(child),
            log,
        };
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", setup.port)).is_err() {
            d.check_alive()?;
            if start.elapsed() > Duration::from_secs(300) {
                bail!(
                    "optinsync run did not listen within 300 s:\n{}",
                    tail(&d.log, 20)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(d)
    }

    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(child) = self.child.as_mut()
            && let Some(status) = child.try_wait()?
        {
            bail!(
                "optinsync run exited with {status}:\n{}",
                tail(&self.log, 20)
            );
        }
        Ok(())
    }

    /// Wait until the log has a line containing one of `needles` (e.g. the end of the
    /// start-up rules pass).
    pub fn wait_for_log(&mut self, needles: &[&str], timeout: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            if needles.iter().any(|n| text.contains(n)) {
                return Ok(());
            }
            self.check_alive()?;
            if start.elapsed() > timeout {
                bail!(
                    "none of {needles:?} in the daemon log after {timeout:?}:\n{}",
                    tail(&self.log, 20)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGTERM and wait (at most 30 s, then kill).
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// The bench's set-up must pass the engine's strict config parser, or every daemon row
    /// breaks only when the bench is run.
    #[test]
    fn written_config_is_accepted_by_the_engine() {
        let fake = FakeZoho::start();
        let dir = tempfile::tempdir().unwrap();
        let setup = write(dir.path(), None, &fake, 2525).unwrap();
        let loaded = optinsync_engine::config::LoadedConfig::load(&setup.config()).unwrap();
        let c = &loaded.config;
        assert_eq!(c.server.listen.port(), setup.port);
        assert_eq!(c.server.rate_limit_per_minute, 100_000_000);
        assert_eq!(c.tokens.secret, SECRET);
        assert_eq!(c.tokens.key_id, KEY_ID);
        assert!(setup.store_url.starts_with("sqlite://"));
        let text = std::fs::read_to_string(setup.config()).unwrap();
        assert!(text.contains("kind = \"zoho-crm\""), "{text}");
        assert!(text.contains("port = 2525"), "{text}");
        assert!(dir.path().join("rules/consent.rhai").exists());
    }

    /// The CPU time read from `/proc` grows while this process works.
    #[test]
    fn cpu_time_of_a_running_process_is_read() {
        let me = std::process::id();
        let start = cpu_time(me).expect("reads /proc/self's stat");
        let wall = Instant::now();
        let mut x = 0_u64;
        while cpu_time(me).expect("still readable") < start + Duration::from_millis(30) {
            assert!(
                wall.elapsed() < Duration::from_secs(20),
                "no CPU time counted"
            );
            for i in 0..100_000_u64 {
                x = x.wrapping_mul(31).wrapping_add(i);
            }
            std::hint::black_box(x);
        }
        assert_eq!(cpu_time(u32::MAX), None);
    }
}
