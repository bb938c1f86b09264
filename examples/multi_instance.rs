//! The multi-instance run at full size: three `optinsync run` daemons on one PostgreSQL sync
//! the fake Zoho CRM's contacts, send every DOI mail to a loopback SMTP sink, subscribe the
//! people who confirm on the fake Zoho Campaigns under a shared quota, and one daemon is
//! `kill -9`ed mid-run (and restarted). The harness is `optinsync_testkit::harness::multi_instance`,
//! shared with the CI test `tests/e2e/multi_instance.rs`.
//!
//! ```sh
//! cargo build --release --bin optinsync --example multi_instance
//! target/release/examples/multi_instance [--contacts 100000] [--instances 3] [--confirm-every 2]
//!     [--subscribe-limit 20/1s] [--poll 10s] [--pg-url postgres://...] [--timeout SECONDS] [--keep]
//! ```
//!
//! Without `--pg-url` a throwaway PostgreSQL server is started (`initdb`/`pg_ctl`, as the tests
//! do). The `optinsync` binary is taken from beside the example's directory, or from
//! `OPTINSYNC_BIN`. Exits 1 if a guarantee does not hold.

#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::time::Duration;

use optinsync_testkit::harness::{multi_instance as harness, util};
use optinsync_testkit_engine::Engine;

fn usage(msg: &str) -> ! {
    eprintln!(
        "multi_instance: {msg}\nusage: multi_instance [--contacts N] [--instances N] [--confirm-every N] \
         [--subscribe-limit CALLS/SECONDSs] [--poll DURATION] [--pg-url URL] [--timeout SECONDS] [--keep]"
    );
    std::process::exit(2);
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    let mut contacts = 100_000usize;
    let mut instances = 3usize;
    let mut confirm_every = 2usize;
    let mut subscribe_limit = (20u32, Duration::from_secs(1));
    let mut poll: &'static str = "10s";
    let mut pg_url: Option<String> = None;
    let mut keep = false;
    let mut timeout = Duration::from_secs(6 * 3600);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| usage(&format!("{a} needs a value")))
        };
        match a.as_str() {
            "--contacts" => contacts = value().parse().unwrap_or_else(|_| usage("--contacts N")),
            "--instances" => {
                instances = value().parse().unwrap_or_else(|_| usage("--instances N"));
                if instances < 2 {
                    usage("--instances must be at least 2");
                }
            }
            "--confirm-every" => {
                confirm_every = value()
                    .parse()
                    .unwrap_or_else(|_| usage("--confirm-every N"))
            }
            "--subscribe-limit" => {
                let v = value();
                let parsed = v.split_once('/').and_then(|(n, s)| {
                    Some((
                        n.parse().ok()?,
                        Duration::from_secs(s.trim_end_matches('s').parse().ok()?),
                    ))
                });
                subscribe_limit = parsed.unwrap_or_else(|| usage("--subscribe-limit 20/1s"));
            }
            "--poll" => poll = Box::leak(value().into_boxed_str()),
            "--pg-url" => pg_url = Some(value()),
            "--timeout" => {
                timeout = Duration::from_secs(
                    value()
                        .parse()
                        .unwrap_or_else(|_| usage("--timeout SECONDS")),
                )
            }
            "--keep" => keep = true,
            other => usage(&format!("unknown argument `{other}`")),
        }
    }
    let server = pg_url.is_none().then(optinsync_testkit::PgServer::start);
    let url = match (&pg_url, &server) {
        (Some(u), _) => u.clone(),
        (None, Some(s)) => s.create_database(),
        (None, None) => usage("no PostgreSQL"),
    };
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut opts = harness::Options::new(
        util::binary_for_example().unwrap_or_else(|e| usage(e)),
        repo,
        url,
        contacts,
    );
    opts.instances = instances;
    opts.confirm_every = confirm_every.max(1);
    opts.subscribe_limit = subscribe_limit;
    opts.poll_interval = poll;
    opts.keep_dir = keep;
    opts.drain_timeout = timeout;
    opts.units_per_connection =
        u32::try_from(optinsync_engine::outbox::MAIL_UNITS_PER_CALL).expect("a small number");
    match harness::run(&opts, &Engine).await {
        Ok(report) => {
            report.print();
            drop(server);
            if !report.violations().is_empty() {
                std::process::exit(1);
            }
        }
        Err(e) => {
            eprintln!("multi_instance: {e:#}");
            std::process::exit(1);
        }
    }
}
