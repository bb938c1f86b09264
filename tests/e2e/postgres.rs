//! The binary on a real PostgreSQL server (started by the test): the same demo flow, and two
//! daemons on one database sending each DOI mail once.

use std::collections::BTreeSet;

use crate::support::*;

#[tokio::test(flavor = "multi_thread")]
async fn demo_runs_on_postgres() {
    let url = optinsync_testkit::shared_pg().create_database();
    let demo = Demo::with_store(Some(&url));
    demo.run_ok(&["sync", "--once"]);
    assert_eq!(demo.mails().len(), 2);
    let daemon = demo.spawn_daemon();
    let link = demo.confirm_link("ana.garcia@example.org");
    assert_eq!(click_confirm(&http(), &link, "e2e").await.status(), 200);
    wait_until(20, "subscription", || {
        demo.list_members() == vec!["ana.garcia@example.org".to_owned()]
    });
    assert_eq!(daemon.terminate(), Some(0));
    assert!(demo.run_ok(&["ledger", "verify"]).contains("events"));
}

#[tokio::test(flavor = "multi_thread")]
async fn two_daemons_on_one_database_send_each_mail_once() {
    let url = optinsync_testkit::shared_pg().create_database();
    let a = Demo::with_store(Some(&url));
    const N: usize = 150;
    write_contacts(&a.path("demo/contacts.csv"), N);
    // Second instance: same database, same CRM file and mail folder, its own port.
    let b = Demo::with_store(Some(&url));
    let shared_cfg = std::fs::read_to_string(b.config())
        .unwrap()
        .replace(
            "path = \"demo/contacts.csv\"",
            &format!("path = \"{}\"", a.path("demo/contacts.csv").display()),
        )
        .replace(
            "dir = \"var/mail\"",
            &format!("dir = \"{}\"", a.path("var/mail").display()),
        )
        .replace(
            "path = \"var/lists.jsonl\"",
            &format!("path = \"{}\"", a.path("var/lists.jsonl").display()),
        );
    std::fs::write(b.config(), shared_cfg).unwrap();

    let da = a.spawn_daemon();
    let db = b.spawn_daemon();
    wait_until(120, "all mails", || a.mails().len() >= N);
    // Let both finish whatever they claimed.
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert_eq!(da.terminate(), Some(0));
    assert_eq!(db.terminate(), Some(0));

    let events = all_events(&url).await;
    let sent: Vec<_> = events
        .iter()
        .filter(|e| e.kind == "doi_mail_sent")
        .collect();
    let contacts: BTreeSet<_> = sent.iter().map(|e| e.contact_id.clone()).collect();
    assert_eq!(sent.len(), N, "each DOI mail recorded once");
    assert_eq!(contacts.len(), N);
    assert_eq!(
        events.iter().filter(|e| e.kind == "doi_requested").count(),
        N,
        "each signup requested once"
    );
    assert_eq!(a.mails().len(), N);
    optinsync_engine::ledger::verify_chain(&events).expect("one chain across both instances");

    // Each job (CRM poll, campaigns poll, rules pass) ran on exactly one instance: its lease
    // holder renewed it every pass; the other instance never ran it.
    let logs =
        [a.path("daemon.log"), b.path("daemon.log")].map(|p| std::fs::read_to_string(p).unwrap());
    for job in ["crm-poller", "campaigns-poller", "scheduler"] {
        let runs = logs
            .iter()
            .map(|l| l.matches(&format!("job {job}: ")).count())
            .collect::<Vec<_>>();
        assert!(
            runs.iter().filter(|n| **n > 0).count() == 1,
            "job {job} ran on exactly one instance: {runs:?}"
        );
    }
}
