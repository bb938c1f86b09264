//! Test support for optinsync, shared by the crates' tests, the end-to-end tests, the examples
//! and the benchmarks:
//!
//! - [`PgServer`] / [`shared_pg`] (here): a throwaway PostgreSQL server, started from the
//!   machine's `initdb`/`pg_ctl` in a temporary directory on a free loopback port;
//! - [`zoho`] and [`zoho_campaigns`]: fake Zoho CRM and Zoho Campaigns servers on loopback,
//!   with [`faults`] to inject seeded failures into them;
//! - [`hubspot`]: a fake HubSpot (CRM v3 contacts, search, properties, communication
//!   preferences, OAuth, signed webhooks, rate limits) on loopback;
//! - [`mailchimp`]: a fake Mailchimp Marketing API v3 on loopback (members, webhooks, the
//!   concurrency limit), written from Mailchimp's Marketing API documentation;
//! - [`smtp`]: an SMTP sink on loopback that keeps every message;
//! - [`fake_connectors`]: in-memory CRM, campaigns and mail connectors, for driving the engine
//!   in-process;
//! - [`harness`]: the `kill -9` harnesses that run the `optinsync` binary against all of these,
//!   and the helpers the end-to-end tests share with them.
//!
//! This crate depends on the plugin API but not on the engine (the engine's tests depend on
//! it); what needs the engine is passed in (see [`harness`]).
//!
//! PostgreSQL refuses to run as root; when the tests run as root (as CI does), the server is
//! started as the `postgres` user through `runuser`, with its directory owned by that user.

pub mod calls;
pub mod fake_connectors;
pub mod faults;
pub mod harness;
pub mod hubspot;
pub mod mailchimp;
pub mod smtp;
pub mod zoho;
pub mod zoho_campaigns;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// A running PostgreSQL server; stopped (immediate mode) when dropped.
#[derive(Debug)]
pub struct PgServer {
    dir: tempfile::TempDir,
    data: PathBuf,
    port: u16,
    as_postgres_user: bool,
    pg_ctl: PathBuf,
}

static DB_COUNTER: AtomicUsize = AtomicUsize::new(0);

impl PgServer {
    /// Start a fresh server. Panics with a clear message if the binaries are missing, because a
    /// test that needs PostgreSQL must fail loudly rather than be skipped.
    pub fn start() -> PgServer {
        let bin = find_bin_dir().unwrap_or_else(|| {
            panic!("PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in /usr/lib/postgresql/*/bin")
        });
        let as_postgres_user = is_root();
        let dir = tempfile::Builder::new()
            .prefix("optinsync-pg-")
            .tempdir()
            .expect("create temp dir for PostgreSQL");
        let data = dir.path().join("data");
        if as_postgres_user {
            // The postgres user must be able to traverse and own the directory.
            run(Command::new("chmod").arg("755").arg(dir.path()));
            run(Command::new("chown")
                .arg("postgres:postgres")
                .arg(dir.path()));
        }
        let initdb = bin.join("initdb");
        let pg_ctl = bin.join("pg_ctl");
        run(command(as_postgres_user, &initdb)
            .args(["-D"])
            .arg(&data)
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ]));

        // Retry on a port race: another process may take the port between probe and bind.
        for attempt in 0..5 {
            let port = free_port();
            let opts = format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200",
                dir.path().display()
            );
            let log = dir.path().join("server.log");
            let status = command(as_postgres_user, &pg_ctl)
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(&log)
                .arg("-o")
                .arg(&opts)
                .args(["-w", "-t", "60", "start"])
                .stdout(Stdio::null())
                .status()
                .expect("run pg_ctl start");
            if status.success() && wait_for_port(port, Duration::from_secs(30)) {
                return PgServer {
                    dir,
                    data,
                    port,
                    as_postgres_user,
                    pg_ctl,
                };
            }
            let log_text = std::fs::read_to_string(&log).unwrap_or_default();
            eprintln!("PostgreSQL start attempt {attempt} on port {port} failed:\n{log_text}");
        }
        panic!("could not start PostgreSQL after 5 attempts");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// URL of the `postgres` maintenance database.
    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Create a new empty database and return its URL, so tests sharing one server stay apart.
    pub fn create_database(&self) -> String {
        let n = DB_COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("t{}_{}", std::process::id(), n);
        let psql = find_bin_dir()
            .map(|b| b.join("psql"))
            .filter(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from("psql"));
        run(Command::new(psql)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-q",
                "-c",
            ])
            .arg(format!("CREATE DATABASE {name}")));
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = command(self.as_postgres_user, &self.pg_ctl)
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn command(as_postgres_user: bool, program: &Path) -> Command {
    if as_postgres_user {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("failed to run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether this process runs as root (PostgreSQL and Postfix's tools then need another user).
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn find_bin_dir() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("OPTINSYNC_PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("bin"))
            .collect();
        versions.sort();
        versions.reverse();
        candidates.extend(versions);
    }
    candidates
        .into_iter()
        .find(|d| d.join("initdb").exists() && d.join("pg_ctl").exists())
}

/// A program on `PATH`, or in `/usr/sbin` (where Debian puts Postfix's tools, often not on a
/// user's `PATH`).
pub fn find_program(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral loopback port")
}

fn wait_for_port(port: u16, timeout: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// One server shared by every test in a test binary (starting one costs about a second).
///
/// A `static` is never dropped, so a watchdog process stops the server and removes its
/// directory once the test process has exited.
pub fn shared_pg() -> &'static PgServer {
    static SERVER: std::sync::OnceLock<PgServer> = std::sync::OnceLock::new();
    SERVER.get_or_init(|| {
        let server = PgServer::start();
        server.stop_when_process_exits();
        server
    })
}

impl PgServer {
    /// Spawn a detached shell that waits for this process to exit, then stops the server
    /// (immediate mode) and deletes its temporary directory.
    fn stop_when_process_exits(&self) {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(
                r#"pid=$1; dir=$2; shift 2
while kill -0 "$pid" 2>/dev/null; do sleep 1; done
"$@" >/dev/null 2>&1
rm -rf "$dir""#,
            )
            .arg("optinsync-pg-watchdog")
            .arg(std::process::id().to_string())
            .arg(self.dir.path());
        if self.as_postgres_user {
            cmd.args(["runuser", "-u", "postgres", "--"]);
        }
        cmd.arg(&self.pg_ctl)
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Err(e) = cmd.spawn() {
            eprintln!(
                "could not start the PostgreSQL watchdog (server will outlive the tests): {e}"
            );
        }
    }
}
