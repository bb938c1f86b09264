//! Restarts and tampering: nothing lost, no DOI mail twice, edits to the ledger detected.

use std::collections::BTreeSet;

use crate::support::*;

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_mid_run_then_restart_loses_nothing_and_sends_no_mail_twice() {
    let demo = Demo::new();
    const N: usize = 400;
    write_contacts(&demo.path("demo/contacts.csv"), N);

    let daemon = demo.spawn_daemon();
    wait_until(60, "first mails", || !demo.mails().is_empty());
    assert_eq!(daemon.terminate(), Some(0), "SIGTERM is a clean stop");
    let after_first = demo.mails().len();
    assert!(
        after_first < N,
        "the stop must land mid-run for this test to mean anything"
    );

    let daemon = demo.spawn_daemon();
    wait_until(120, "all mails", || demo.mails().len() >= N);
    assert_eq!(daemon.terminate(), Some(0));

    assert_eq!(
        demo.mails().len(),
        N,
        "one mail per contact (first run had sent {after_first})"
    );
    let events = all_events(&demo.sqlite_url()).await;
    let sent: Vec<_> = events
        .iter()
        .filter(|e| e.kind == "doi_mail_sent")
        .collect();
    assert_eq!(sent.len(), N, "one doi_mail_sent event per contact");
    let contacts: BTreeSet<_> = sent.iter().map(|e| e.contact_id.clone()).collect();
    assert_eq!(contacts.len(), N, "no contact got two");
    assert_eq!(
        events.iter().filter(|e| e.kind == "doi_requested").count(),
        N
    );
    optinsync_engine::ledger::verify_chain(&events).expect("chain verifies after restarts");
}

#[tokio::test(flavor = "multi_thread")]
async fn ledger_verify_names_the_event_edited_by_hand() {
    let demo = Demo::new();
    demo.run_ok(&["sync", "--once"]);
    assert!(
        demo.run_ok(&["ledger", "verify"])
            .starts_with("ledger verified: 7 events")
    );

    // The database refuses edits outright...
    let pool = sqlx::SqlitePool::connect(&demo.sqlite_url()).await.unwrap();
    let refused = sqlx::query("UPDATE ledger SET to_state = 'confirmed' WHERE seq = 4")
        .execute(&pool)
        .await;
    assert!(refused.is_err(), "append-only trigger must refuse the edit");

    // ...and if someone drops the trigger first, the chain names the edited event.
    sqlx::query("DROP TRIGGER ledger_no_update")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("UPDATE ledger SET to_state = 'confirmed' WHERE seq = 4")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;

    let out = demo.output(&["ledger", "verify"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("seq 4") && err.contains("altered"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn deleted_ledger_row_is_detected() {
    let demo = Demo::new();
    demo.run_ok(&["sync", "--once"]);
    let pool = sqlx::SqlitePool::connect(&demo.sqlite_url()).await.unwrap();
    sqlx::query("DROP TRIGGER ledger_no_delete")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM ledger WHERE seq = 2")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    let out = demo.output(&["ledger", "verify"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("expected seq 2"), "{err}");
}
