//! Three `optinsync run` daemons on one PostgreSQL: the fake Zoho CRM's contacts get their DOI
//! mails at the SMTP sink exactly once (apart from the send window of the one `kill -9`), the
//! people who confirm — on whichever instance — reach the fake Zoho Campaigns list, and no
//! Campaigns quota window ever holds more calls than its limit although all three subscribe
//! (the budget is shared through the database). The harness is
//! `optinsync_testkit::harness::multi_instance`; the 100,000-contact run is
//! `examples/multi_instance.rs`.

use std::path::PathBuf;

use optinsync_testkit::harness::multi_instance as harness;
use optinsync_testkit_engine::Engine;

use crate::support::BIN;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_share_the_work_and_the_vendor_quota() {
    let url = optinsync_testkit::shared_pg().create_database();
    let mut opts = harness::Options::new(
        PathBuf::from(BIN),
        PathBuf::from(env!("CARGO_MANIFEST_DIR")),
        url,
        300,
    );
    opts.drain_timeout = std::time::Duration::from_secs(240);
    opts.units_per_connection =
        u32::try_from(optinsync_engine::outbox::MAIL_UNITS_PER_CALL).expect("a small number");
    let report = harness::run(&opts, &Engine)
        .await
        .expect("multi-instance harness");
    report.print();
    assert_eq!(report.violations(), Vec::<String>::new());
    // The run exercised what it claims to: every contact mailed, half of them confirmed and
    // subscribed, and the shared listsubscribe budget was the limit that paced them.
    assert_eq!(report.contacts_without_mail, Vec::<String>::new());
    assert_eq!(report.confirmations_acked, 150);
    assert_eq!(report.list_active, 150);
    let (peaks, limits) = &report.quota["listsubscribe"];
    assert!(
        peaks.first().copied().unwrap_or(0) > 0 && limits.first().copied().unwrap_or(0) == 20,
        "listsubscribe peaks {peaks:?}, limits {limits:?}"
    );
    // Confirmations were answered by more than one instance (links work on any of them).
    assert!(
        report
            .clicks_per_instance
            .iter()
            .filter(|n| **n > 0)
            .count()
            >= 2,
        "{:?}",
        report.clicks_per_instance
    );
}

/// SQLite allows one daemon per database file: a second `optinsync run` on the same file is
/// refused (exit 2) with what, which file, which PID holds it and how to fix it, while the
/// read-only commands keep working; a `kill -9`ed holder does not block the next start.
#[tokio::test(flavor = "multi_thread")]
async fn sqlite_refuses_a_second_run_on_the_same_file() {
    use crate::support::*;

    let demo = Demo::new();
    let first = demo.spawn_daemon();
    wait_until(20, "the first daemon's DOI mails", || {
        demo.mails().len() >= 2
    });

    let second = demo.output(&["run"]);
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(2), "{stderr}");
    let db = demo.path("var/optinsync.db");
    for needle in [
        format!("another `optinsync run` (PID {})", first.pid()),
        format!("SQLite database {}", db.display()),
        format!("{}.lock", db.display()),
        "use PostgreSQL".to_owned(),
    ] {
        assert!(
            stderr.contains(&needle),
            "`{needle}` missing from: {stderr}"
        );
    }

    // Reading goes on beside the running daemon.
    assert!(demo.run_ok(&["status"]).contains("newsletter"));
    assert!(
        demo.run_ok(&["contact", "show", "ana.garcia@example.org"])
            .contains("pending")
    );
    assert!(
        demo.run_ok(&["ledger", "verify"])
            .contains("ledger verified")
    );
    assert!(
        demo.run_ok(&["evidence", "export", "ana.garcia@example.org", "--json"])
            .contains("doi_mail_sent")
    );

    // The OS drops the lock with the process, even on `kill -9`: the next start is not blocked.
    drop(first); // SIGKILL
    let again = demo.spawn_daemon();
    assert_eq!(again.terminate(), Some(0));
}
