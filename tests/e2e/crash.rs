//! `kill -9` at random moments during a real sync (fake Zoho CRM, SMTP sink, confirmations and
//! unsubscribes arriving meanwhile), restarts, and the ground-truth checks of the crash harness
//! (`optinsync_testkit::harness::crash`; the full 20,000-contact run is
//! `examples/crash_harness.rs`). The seed is printed; `CRASH_SEED=N` repeats a run.

use std::path::PathBuf;

use optinsync_testkit::harness::crash::{self as harness, Backend, Options};
use optinsync_testkit_engine::Engine;

use crate::support::BIN;

fn options(backend: Backend) -> Options {
    let mut opts = Options::new(
        PathBuf::from(BIN),
        PathBuf::from(env!("CARGO_MANIFEST_DIR")),
        backend,
        1000,
        12,
    );
    if let Some(seed) = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        opts.seed = seed;
    }
    // Eight SMTP connections (sixteen mails in flight: eight sent, eight more waiting for
    // their record), and a relay that takes 100 ms to answer each: about 80 mails/s, so the
    // 1,000 mails take ~15 s and the 12 kills (every 0.5-2 s) land while up to eight mails are
    // handed over and not yet acknowledged.
    opts.in_flight = 8;
    opts.units_per_connection =
        u32::try_from(optinsync_engine::outbox::MAIL_UNITS_PER_CALL).expect("a small number");
    opts.sink_accept_delay = std::time::Duration::from_millis(100);
    opts.uptime_ms = (500, 2000);
    opts
}

async fn crash_run(backend: Backend) {
    let opts = options(backend);
    let report = harness::run(&opts, &Engine)
        .await
        .expect("crash harness set-up");
    report.print();
    // Zero lost events, confirmations and withdrawals; every duplicate explained by the send
    // window (a repeated Message-ID, one ledger record), at most `in_flight` per kill (all
    // inside `violations`).
    assert_eq!(
        report.lost_events,
        Vec::<String>::new(),
        "seed {}",
        opts.seed
    );
    assert_eq!(
        report.lost_confirmations,
        Vec::<String>::new(),
        "seed {}",
        opts.seed
    );
    assert_eq!(
        report.lost_withdrawals,
        Vec::<String>::new(),
        "seed {}",
        opts.seed
    );
    assert!(report.chain_ok, "seed {}: {}", opts.seed, report.chain);
    assert!(
        report.confirmations_acked > 0 && report.withdrawals_acked > 0,
        "no clicks made"
    );
    assert_eq!(
        report.violations(),
        Vec::<String>::new(),
        "seed {}",
        opts.seed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_kill9_sqlite_loses_nothing() {
    crash_run(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_kill9_postgres_loses_nothing() {
    let url = optinsync_testkit::shared_pg().create_database();
    crash_run(Backend::Postgres { url }).await;
}
