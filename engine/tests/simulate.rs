//! `rules simulate` reads the store a page at a time with batch reads: each contact must still
//! get its own consents, engagement and suppression, across page boundaries and lists.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use chrono::{Duration, Utc};
use optinsync_engine::config::ListConfig;
use optinsync_engine::ledger::format_time;
use optinsync_engine::rules::RuleSet;
use optinsync_engine::rules::simulate::simulate;
use optinsync_engine::store;
use optinsync_engine::tokens::TokenKeys;

/// More than two pages of contacts.
const CONTACTS: usize = 2_500;

#[tokio::test]
async fn batch_reads_give_each_contact_its_own_consent_engagement_and_suppression() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("sim.db").display());
    let store = store::open(&url).await.unwrap();
    store.migrate().await.unwrap();
    let keys = TokenKeys::new("k1", b"simulate-test-key-simulate-test-key", vec![]);
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    let now = Utc::now();
    let ts = format_time(now);
    let long_ago = format_time(now - Duration::days(800));
    let recently = format_time(now - Duration::days(10));
    let mut tx = pool.begin().await.unwrap();
    for i in 0..CONTACTS {
        let id = format!("{i:08}");
        let email = format!("person{i}@example.org");
        sqlx::query("INSERT INTO contacts (id, email, language, fields, crm_records, created_at, updated_at) VALUES ($1, $2, 'en', '{}', '[]', $3, $3)")
            .bind(&id)
            .bind(&email)
            .bind(&ts)
            .execute(&mut *tx)
            .await
            .unwrap();
        let consent = |list: &'static str, state: &'static str, since: String, confirmed: bool| {
            sqlx::query("INSERT INTO consents (contact_id, list_id, state, since, signup_token, doi_mails, reminders_sent, confirmed_at, confirmed_token, last_seq) VALUES ($1, $2, $3, $4, NULL, 0, 0, $5, NULL, 0)")
                .bind(id.clone())
                .bind(list)
                .bind(state)
                .bind(since.clone())
                .bind(confirmed.then_some(since))
        };
        match i % 5 {
            // Confirmed long ago on both lists, but engaged recently on `news` only.
            0 => {
                for list in ["news", "offers"] {
                    consent(list, "confirmed", long_ago.clone(), true)
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                }
                sqlx::query(
                    "INSERT INTO engagement (contact_id, list_id, last_at) VALUES ($1, 'news', $2)",
                )
                .bind(&id)
                .bind(&recently)
                .execute(&mut *tx)
                .await
                .unwrap();
            }
            // Asserted on `news`, and the address is suppressed: the DOI mail is refused.
            1 => {
                consent("news", "asserted", ts.clone(), false)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                sqlx::query(
                    "INSERT INTO suppressions (address_hash, reason, at) VALUES ($1, 'test', $2)",
                )
                .bind(keys.address_hash(&email))
                .bind(&ts)
                .execute(&mut *tx)
                .await
                .unwrap();
            }
            // Asserted on `news`: a DOI mail.
            2 => {
                consent("news", "asserted", ts.clone(), false)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
            }
            // Erased on `news`: not decided at all there.
            3 => {
                consent("news", "erased", ts.clone(), false)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
            }
            // No consent anywhere: nothing.
            _ => {}
        }
    }
    tx.commit().await.unwrap();

    let rules =
        RuleSet::load_checked(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../rules")).unwrap();
    let lists: Vec<ListConfig> = ["news", "offers"]
        .iter()
        .map(|id| toml::from_str(&format!("id = \"{id}\"\nname = \"{id}\"")).unwrap())
        .collect();
    let mut pages = Vec::new();
    let report = simulate(store.clone(), &lists, &keys, &rules, None, 2, |n| {
        pages.push(n)
    })
    .await
    .unwrap();

    let fifth = (CONTACTS / 5) as u64;
    assert_eq!(report.contacts, CONTACTS as u64);
    assert_eq!(pages, vec![1000, 2000, 2500], "progress once per page");
    assert_eq!(
        report.pairs,
        2 * CONTACTS as u64 - fifth,
        "erased pairs skipped"
    );
    assert_eq!(report.candidate.rule_errors, 0);
    let applied = |a: &str| report.candidate.would_apply.get(a).copied().unwrap_or(0);
    let refused = |a: &str| report.candidate.refused.get(a).copied().unwrap_or(0);
    assert_eq!(applied("send_doi"), fifth, "asserted and not suppressed");
    assert_eq!(refused("send_doi"), fifth, "asserted but suppressed");
    assert_eq!(
        applied("send_revalidation"),
        fifth,
        "only the list without recent engagement"
    );
    assert_eq!(report.candidate.would_apply.len(), 2, "{report:?}");
    assert_eq!(
        report.candidate.samples.get("send_doi"),
        Some(&vec!["00000002".to_owned(), "00000007".to_owned()])
    );

    // With room for every sample, the samples are every applicable contact once, in order,
    // across pages.
    let all = simulate(store.clone(), &lists, &keys, &rules, None, CONTACTS, |_| {})
        .await
        .unwrap();
    let expected: Vec<String> = (0..CONTACTS)
        .filter(|i| i % 5 == 2)
        .map(|i| format!("{i:08}"))
        .collect();
    assert_eq!(all.candidate.samples.get("send_doi"), Some(&expected));
    assert_eq!(all.candidate.would_apply, report.candidate.would_apply);
    assert_eq!(all.pairs, report.pairs);
}
