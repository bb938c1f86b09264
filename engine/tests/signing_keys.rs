//! The record of key ids that signed mailed links (`signing_keys`), on a real SQLite store:
//! a fresh store records the current key; dropping a recorded key is refused until it is kept
//! (as `unsubscribe_only` is enough); a store from before the record seeds every key
//! configured at that start.

#![allow(clippy::unwrap_used)]

use chrono::Utc;
use optinsync_engine::consent::ConsentState;
use optinsync_engine::ledger::{Evidence, NewEvent};
use optinsync_engine::signing_keys::{self, CURSOR, SigningKeysError};
use optinsync_engine::store::{self, ContactUpsert, Store};
use optinsync_engine::tokens::TokenKeys;

const K1: &[u8] = b"first-key-first-key-first-key-01";
const K2: &[u8] = b"second-key-second-key-second-k02";

async fn sqlite() -> (tempfile::TempDir, std::sync::Arc<dyn Store>) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("db.sqlite").display());
    let store = store::open(&url).await.unwrap();
    store.migrate().await.unwrap();
    (dir, store)
}

async fn recorded(store: &dyn Store) -> Vec<String> {
    serde_json::from_str(&store.cursor(CURSOR).await.unwrap().unwrap()).unwrap()
}

#[tokio::test]
async fn a_key_that_signed_mailed_links_cannot_be_dropped() {
    let (_dir, store) = sqlite().await;
    let k1 = TokenKeys::new("k1", K1, vec![]);
    signing_keys::check_and_record(store.as_ref(), &k1)
        .await
        .unwrap();
    assert_eq!(recorded(store.as_ref()).await, ["k1"]);

    let k2_only = TokenKeys::new("k2", K2, vec![]);
    match signing_keys::check_and_record(store.as_ref(), &k2_only).await {
        Err(SigningKeysError::Dropped { missing }) => assert_eq!(missing, ["k1"]),
        other => panic!("dropping k1 accepted: {other:?}"),
    }
    assert_eq!(recorded(store.as_ref()).await, ["k1"], "nothing recorded");

    let k2_keeping_k1 =
        TokenKeys::new("k2", K2, vec![]).with_unsubscribe_only(vec![("k1".into(), K1.to_vec())]);
    signing_keys::check_and_record(store.as_ref(), &k2_keeping_k1)
        .await
        .unwrap();
    assert_eq!(recorded(store.as_ref()).await, ["k1", "k2"]);
}

#[tokio::test]
async fn a_store_from_before_the_record_keeps_every_key_configured_then() {
    let (_dir, store) = sqlite().await;
    let contact = store
        .upsert_contact(
            &ContactUpsert {
                email: "a@example.org".into(),
                language: None,
                fields: Default::default(),
                crm_record: None,
            },
            Utc::now(),
        )
        .await
        .unwrap();
    store
        .append_event(&NewEvent {
            event_id: uuid::Uuid::new_v4().to_string(),
            at: Utc::now(),
            contact_id: contact.id,
            list_id: "news".into(),
            kind: "doi_mail_sent".into(),
            from_state: ConsentState::Pending,
            to_state: ConsentState::Pending,
            source: optinsync_engine::ledger::EventSource::Outbox,
            evidence: Evidence::default(),
        })
        .await
        .unwrap();
    // k1 may have signed the mail above: the first start records it beside k2.
    let both = TokenKeys::new("k2", K2, vec![("k1".into(), K1.to_vec())]);
    signing_keys::check_and_record(store.as_ref(), &both)
        .await
        .unwrap();
    assert_eq!(recorded(store.as_ref()).await, ["k1", "k2"]);
    let k2_only = TokenKeys::new("k2", K2, vec![]);
    assert!(matches!(
        signing_keys::check_and_record(store.as_ref(), &k2_only).await,
        Err(SigningKeysError::Dropped { .. })
    ));
}

#[tokio::test]
async fn an_unreadable_record_is_a_clear_error() {
    let (_dir, store) = sqlite().await;
    store
        .set_cursor(CURSOR, "not json", Utc::now())
        .await
        .unwrap();
    let err = signing_keys::check_and_record(store.as_ref(), &TokenKeys::new("k1", K1, vec![]))
        .await
        .unwrap_err();
    assert!(matches!(err, SigningKeysError::Corrupt(_)), "{err}");
    assert!(err.to_string().contains(CURSOR), "{err}");
}
