//! The shared quota budget ([`Store::quota_take`] and friends, behind the engine's
//! `QuotaLedger`) on both backends: windows fill and empty as the connector's own budget does,
//! a lock pauses the key, a settled call moves to its answer time, and — on PostgreSQL —
//! three store instances (three daemons) taking slots at once never count more than the limit.
//! Also the shared connector sets (`SharedMarks`): one instance's mark is seen by another.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use optinsync_engine::store::{self, Store};
use optinsync_plugin_api::{QuotaSlot, QuotaWindow};

const W: QuotaWindow = QuotaWindow {
    limit: 3,
    length_ms: 600,
};

async fn sqlite() -> (Arc<dyn Store>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("db.sqlite").display());
    let s = store::open(&url).await.expect("open SQLite");
    s.migrate().await.expect("migrate");
    (s, dir)
}

async fn postgres() -> (Arc<dyn Store>, String) {
    let url = tokio::task::spawn_blocking(|| optinsync_testkit::shared_pg().create_database())
        .await
        .expect("PostgreSQL");
    let s = store::open(&url).await.expect("open PostgreSQL");
    s.migrate().await.expect("migrate");
    (s, url)
}

async fn windows_fill_lock_and_settle(s: &dyn Store) {
    let take = |now| s.quota_take("k", &[W], now);
    assert_eq!(take(0).await.unwrap(), QuotaSlot::Go(0));
    assert_eq!(take(15).await.unwrap(), QuotaSlot::Go(15));
    assert_eq!(take(30).await.unwrap(), QuotaSlot::Go(30));
    // Full: bucket 0 ([0, 10)) leaves the window at 610.
    assert_eq!(
        take(40).await.unwrap(),
        QuotaSlot::Wait(Duration::from_millis(570))
    );
    assert_eq!(s.quota_usage("k", &[W], 40).await.unwrap(), (vec![3], None));
    assert_eq!(take(610).await.unwrap(), QuotaSlot::Go(610));
    // Another key has its own budget.
    assert_eq!(
        s.quota_take("other", &[W], 40).await.unwrap(),
        QuotaSlot::Go(40)
    );
    // A lock pauses the key for everyone until it ends, and never shortens.
    s.quota_lock("k", 2000).await.unwrap();
    s.quota_lock("k", 1500).await.unwrap();
    assert_eq!(
        take(1000).await.unwrap(),
        QuotaSlot::Locked(Duration::from_millis(1000))
    );
    assert_eq!(s.quota_usage("k", &[W], 1000).await.unwrap().1, Some(2000));
    // After the lock: a call sent at 2000 and answered at 2500 counts until 3100, not 2610.
    assert_eq!(take(2000).await.unwrap(), QuotaSlot::Go(2000));
    s.quota_settle("k", &[W], 2000, 2500).await.unwrap();
    assert_eq!(s.quota_usage("k", &[W], 2700).await.unwrap().0, vec![1]);
    assert_eq!(s.quota_usage("k", &[W], 3110).await.unwrap().0, vec![0]);
    // The console's overview: every key, its window and lock, as `quota_usage` counts them.
    let overview = |now| async move {
        s.quota_overview(now)
            .await
            .unwrap()
            .into_iter()
            .map(|q| (q.key, q.windows, q.locked_until))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        overview(1000).await,
        vec![
            ("k".to_owned(), vec![(600, 1)], Some(2000)),
            ("other".to_owned(), vec![(600, 0)], None),
        ]
    );
    assert_eq!(
        overview(2700).await,
        vec![
            ("k".to_owned(), vec![(600, 1)], None),
            ("other".to_owned(), vec![(600, 0)], None),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_quota_windows_fill_lock_and_settle() {
    let (s, _dir) = sqlite().await;
    windows_fill_lock_and_settle(s.as_ref()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_quota_windows_fill_lock_and_settle() {
    let (s, _url) = postgres().await;
    windows_fill_lock_and_settle(s.as_ref()).await;
}

/// Three instances race for one budget of 50 calls per window: exactly 50 get a slot, however
/// the transactions interleave.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_three_instances_never_take_more_than_the_limit() {
    let (first, url) = postgres().await;
    let mut stores = vec![first];
    for _ in 0..2 {
        stores.push(store::open(&url).await.expect("another instance"));
    }
    let windows = [
        QuotaWindow {
            limit: 50,
            length_ms: 3_600_000,
        },
        QuotaWindow {
            limit: 1000,
            length_ms: 86_400_000,
        },
    ];
    let now = 1_800_000_000_000i64;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..120 {
        let s = Arc::clone(&stores[i % 3]);
        tasks.spawn(async move {
            s.quota_take("listsubscribe", &windows, now + i as i64)
                .await
        });
    }
    let mut go = 0;
    let mut wait = 0;
    while let Some(r) = tasks.join_next().await {
        match r.expect("task").expect("take") {
            QuotaSlot::Go(_) => go += 1,
            QuotaSlot::Wait(_) => wait += 1,
            QuotaSlot::Locked(_) => panic!("not locked"),
        }
    }
    assert_eq!((go, wait), (50, 70));
    let (used, locked) = stores[2]
        .quota_usage("listsubscribe", &windows, now + 200)
        .await
        .expect("usage");
    assert_eq!((used, locked), (vec![50, 50], None));
}

async fn marks_are_a_shared_set(s: &dyn Store, other: &dyn Store) {
    s.mark_add("own", "a").await.unwrap();
    s.mark_add("own", "a").await.unwrap();
    other.mark_add("own", "b").await.unwrap();
    other.mark_add("elsewhere", "c").await.unwrap();
    assert_eq!(other.marks("own").await.unwrap(), vec!["a", "b"]);
    s.mark_remove("own", &["a".to_owned(), "z".to_owned()])
        .await
        .unwrap();
    assert_eq!(other.marks("own").await.unwrap(), vec!["b"]);
    assert_eq!(s.marks("elsewhere").await.unwrap(), vec!["c"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_marks_are_a_shared_set() {
    let (s, _dir) = sqlite().await;
    marks_are_a_shared_set(s.as_ref(), s.as_ref()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_marks_are_a_shared_set() {
    let (s, url) = postgres().await;
    let other = store::open(&url).await.expect("another instance");
    marks_are_a_shared_set(s.as_ref(), other.as_ref()).await;
}
