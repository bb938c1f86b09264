//! The full crash run: a sync of 20,000 contacts (fake Zoho CRM, loopback SMTP sink, DOI mails,
//! confirmations and unsubscribes arriving during it) by `optinsync run`, `kill -9`ed 50 times
//! at random moments and restarted each time, then checked against ground truth. The harness
//! itself is `optinsync_testkit::harness::crash`, shared with the CI test `tests/e2e/crash.rs`.
//!
//! ```sh
//! cargo build --bin optinsync --example crash_harness
//! target/debug/examples/crash_harness [--contacts 20000] [--kills 50] [--backend sqlite|postgres|both]
//!     [--seed N] [--confirm PCT] [--unsubscribe PCT] [--uptime-ms LO-HI] [--keep]
//! ```
//!
//! The `optinsync` binary is taken from beside the example's directory (the same target
//! directory), or from `OPTINSYNC_BIN`. Exits 1 if a guarantee does not hold.

#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::time::Duration;

use optinsync_testkit::harness::crash::{Backend, Options};
use optinsync_testkit::harness::{crash as harness, util};
use optinsync_testkit_engine::Engine;

fn usage(msg: &str) -> ! {
    eprintln!(
        "crash_harness: {msg}\nusage: crash_harness [--contacts N] [--kills N] [--backend sqlite|postgres|both] [--seed N] \
         [--confirm PCT] [--unsubscribe PCT] [--uptime-ms LO-HI] [--in-flight N] [--sink-delay-ms N] [--keep]"
    );
    std::process::exit(2);
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    let mut contacts = 20_000usize;
    let mut kills = 50usize;
    let mut backends = vec!["sqlite".to_owned()];
    let mut seed = harness::clock_seed();
    let mut confirm = 20u64;
    let mut unsubscribe = 5u64;
    let mut uptime: Option<(u64, u64)> = None;
    let mut keep = false;
    let mut in_flight = 8u32;
    let mut sink_delay_ms = 0u64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| usage(&format!("{a} needs a value")))
        };
        let num = |v: String| {
            v.parse::<u64>()
                .unwrap_or_else(|_| usage(&format!("{a}: not a number: {v}")))
        };
        match a.as_str() {
            "--contacts" => contacts = num(value()) as usize,
            "--kills" => kills = num(value()) as usize,
            "--seed" => seed = num(value()),
            "--confirm" => confirm = num(value()),
            "--unsubscribe" => unsubscribe = num(value()),
            "--backend" => {
                backends = match value().as_str() {
                    "both" => vec!["sqlite".into(), "postgres".into()],
                    b @ ("sqlite" | "postgres") => vec![b.to_owned()],
                    other => usage(&format!("unknown backend {other}")),
                }
            }
            "--uptime-ms" => {
                let v = value();
                let Some((lo, hi)) = v.split_once('-') else {
                    usage("--uptime-ms takes LO-HI");
                };
                uptime = Some((num(lo.to_owned()), num(hi.to_owned())));
            }
            "--in-flight" => {
                in_flight = u32::try_from(num(value()))
                    .ok()
                    .filter(|n| *n >= 1)
                    .unwrap_or_else(|| usage("--in-flight takes 1 or more"))
            }
            "--sink-delay-ms" => sink_delay_ms = num(value()),
            "--keep" => keep = true,
            "-h" | "--help" => usage("help"),
            other => usage(&format!("unknown argument {other}")),
        }
    }
    if confirm + unsubscribe > 100 {
        usage("--confirm + --unsubscribe must not exceed 100");
    }
    // Spread the kills over the whole sync: a debug build delivers about 20 mails a second
    // to the sink, so the run lasts about contacts × 50 ms; the mean uptime is that / kills.
    let uptime = uptime.unwrap_or_else(|| {
        let hi = (contacts as u64 * 100 / kills.max(1) as u64).max(1000);
        (hi / 10, hi)
    });
    let bin = util::binary_for_example().unwrap_or_else(|e| usage(e));
    println!("crash harness: binary {}", bin.display());
    let mut failed = false;
    for b in backends {
        let backend = if b == "postgres" {
            Backend::Postgres {
                url: optinsync_testkit::shared_pg().create_database(),
            }
        } else {
            Backend::Sqlite
        };
        let mut opts = Options::new(
            bin.clone(),
            PathBuf::from(env!("CARGO_MANIFEST_DIR")),
            backend,
            contacts,
            kills,
        );
        opts.seed = seed;
        opts.confirm_percent = confirm;
        opts.unsubscribe_percent = unsubscribe;
        opts.uptime_ms = uptime;
        opts.keep_dir = keep;
        opts.in_flight = in_flight;
        opts.units_per_connection =
            u32::try_from(optinsync_engine::outbox::MAIL_UNITS_PER_CALL).expect("a small number");
        opts.sink_accept_delay = Duration::from_millis(sink_delay_ms);
        opts.drain_timeout = Duration::from_secs(1800);
        println!(
            "crash harness [{b}]: seed {seed}, {contacts} contacts, {kills} kills, uptime {}-{} ms, {in_flight} SMTP connection(s), sink answers after {sink_delay_ms} ms",
            uptime.0, uptime.1
        );
        match harness::run(&opts, &Engine).await {
            Ok(report) => {
                report.print();
                failed |= !report.violations().is_empty();
            }
            Err(e) => {
                eprintln!("crash harness [{b}]: set-up failed: {e:#}");
                failed = true;
            }
        }
    }
    if failed {
        std::process::exit(1);
    }
}
