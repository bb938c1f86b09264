//! Two Zoho Campaigns connectors — two optinsync instances — sharing one `QuotaLedger` stay
//! within one quota together, and a lock-out one of them meets pauses the other before it
//! calls. The ledger here is an in-memory stand-in for the engine's store-backed one
//! (`engine/src/quota.rs`, tested on both databases in `engine/tests/quota_contract.rs`).

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use optinsync_plugin_api::{
    CampaignsConnector, ConnectorError, ConnectorResult, FailureScope, QuotaLedger, QuotaSlot,
    QuotaWindow, SharedMarks, StatusKind, Subscriber,
};
use optinsync_plugin_zoho::ZohoCampaigns;
use optinsync_plugin_zoho::campaigns::Api;
use optinsync_testkit::calls::PlainCalls as _;
use optinsync_testkit::zoho_campaigns::{self as fake, FakeCampaigns};

const KEY: &str = "3c20ad524dfa4af86216a5be13e238ed";

/// Exact sliding windows over call times, each call counted one sixtieth of its window
/// longer (the slack of the store's buckets).
#[derive(Debug, Default)]
struct MemoryLedger {
    calls: Mutex<HashMap<String, Vec<i64>>>,
    locks: Mutex<HashMap<String, i64>>,
    marks: Mutex<HashMap<String, std::collections::BTreeSet<String>>>,
}

#[async_trait]
impl SharedMarks for MemoryLedger {
    async fn mark(&self, set: &str, member: &str) -> ConnectorResult<()> {
        let mut marks = self.marks.lock().unwrap();
        marks
            .entry(set.to_owned())
            .or_default()
            .insert(member.to_owned());
        Ok(())
    }

    async fn unmark(&self, set: &str, members: &[String]) -> ConnectorResult<()> {
        if let Some(s) = self.marks.lock().unwrap().get_mut(set) {
            s.retain(|m| !members.contains(m));
        }
        Ok(())
    }

    async fn marked(&self, set: &str) -> ConnectorResult<Vec<String>> {
        let marks = self.marks.lock().unwrap();
        Ok(marks
            .get(set)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default())
    }
}

fn counts(calls: &[i64], w: &QuotaWindow, now: i64) -> usize {
    let keep = w.length_ms + w.length_ms / 60;
    calls.iter().filter(|t| **t > now - keep).count()
}

#[async_trait]
impl QuotaLedger for MemoryLedger {
    async fn take(
        &self,
        key: &str,
        windows: &[QuotaWindow],
        now: i64,
    ) -> ConnectorResult<QuotaSlot> {
        if let Some(until) = self.locks.lock().unwrap().get(key).filter(|u| **u > now) {
            return Ok(QuotaSlot::Locked(Duration::from_millis(
                (until - now) as u64,
            )));
        }
        let mut calls = self.calls.lock().unwrap();
        let list = calls.entry(key.to_owned()).or_default();
        if windows
            .iter()
            .any(|w| counts(list, w, now) >= w.limit as usize)
        {
            return Ok(QuotaSlot::Wait(Duration::from_millis(10)));
        }
        list.push(now);
        Ok(QuotaSlot::Go(now))
    }

    async fn settle(
        &self,
        key: &str,
        _w: &[QuotaWindow],
        sent: i64,
        done: i64,
    ) -> ConnectorResult<()> {
        if let Some(list) = self.calls.lock().unwrap().get_mut(key)
            && let Some(t) = list.iter_mut().find(|t| **t == sent)
        {
            *t = done;
        }
        Ok(())
    }

    async fn lock(&self, key: &str, until: i64) -> ConnectorResult<()> {
        let mut locks = self.locks.lock().unwrap();
        let u = locks.entry(key.to_owned()).or_default();
        *u = (*u).max(until);
        Ok(())
    }

    async fn usage(
        &self,
        key: &str,
        windows: &[QuotaWindow],
        now: i64,
    ) -> ConnectorResult<(Vec<u32>, Option<i64>)> {
        let calls = self.calls.lock().unwrap();
        let list = calls.get(key).cloned().unwrap_or_default();
        let locked = self
            .locks
            .lock()
            .unwrap()
            .get(key)
            .copied()
            .filter(|u| *u > now);
        Ok((
            windows
                .iter()
                .map(|w| counts(&list, w, now) as u32)
                .collect(),
            locked,
        ))
    }
}

fn instance(f: &FakeCampaigns, ledger: &Arc<MemoryLedger>) -> Arc<ZohoCampaigns> {
    let text = format!(
        "client_id = \"{}\"\nclient_secret = \"{}\"\nrefresh_token = \"{}\"\naccounts_url = \"{url}\"\n\
         campaigns_url = \"{url}\"\nstatus_interval = \"0s\"\n[limits]\nlistsubscribe = [\"25/1s\"]\n[lists.newsletter]\nlistkey = \"{KEY}\"\n",
        fake::CLIENT_ID,
        fake::CLIENT_SECRET,
        fake::REFRESH_TOKEN,
        url = f.url(),
    );
    let c = ZohoCampaigns::from_config(toml::from_str(&text).unwrap(), Path::new(".")).unwrap();
    Arc::new(
        c.with_quota_ledger(Arc::clone(ledger) as Arc<dyn QuotaLedger>)
            .with_shared_marks(Arc::clone(ledger) as Arc<dyn SharedMarks>),
    )
}

fn sub(i: usize) -> Subscriber {
    Subscriber {
        email: format!("p{i}@example.org"),
        language: None,
        fields: BTreeMap::from([("First_Name".to_owned(), serde_json::json!("P"))]),
        proof: None,
    }
}

fn fake_with_quota() -> FakeCampaigns {
    let f = FakeCampaigns::start();
    f.add_list(KEY, "Newsletter", false);
    f.set_quota(
        "listsubscribe",
        &[(25, Duration::from_secs(1))],
        Duration::from_secs(60),
    );
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_sharing_a_ledger_stay_within_one_quota() {
    let f = fake_with_quota();
    let ledger = Arc::new(MemoryLedger::default());
    let (a, b) = (instance(&f, &ledger), instance(&f, &ledger));
    const N: usize = 90;
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let c = Arc::clone(if i % 2 == 0 { &a } else { &b });
            tokio::spawn(async move { c.sub("newsletter", &[sub(i)]).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(f.locks(), 0, "Zoho never locked the endpoint");
    assert_eq!(f.active(KEY).len(), N);
    let peak = f.peaks("listsubscribe");
    assert!(peak[0] <= 25, "at most 25 calls in any second: {peak:?}");
    // Both instances' calls are counted in the one budget.
    let (used, locked) = a.shared_usage(Api::ListSubscribe).await.unwrap();
    assert!(used[0] > 0 && locked.is_none(), "{used:?} {locked:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lock_out_met_by_one_instance_pauses_the_other() {
    let f = fake_with_quota();
    let ledger = Arc::new(MemoryLedger::default());
    let (a, b) = (instance(&f, &ledger), instance(&f, &ledger));
    f.lock_endpoint("listsubscribe", Duration::from_secs(60));
    let err = a.sub("newsletter", &[sub(1)]).await.unwrap_err();
    assert!(
        matches!(
            err,
            ConnectorError::Transient {
                retry_after: Some(_),
                ..
            }
        ),
        "{err:?}"
    );
    let calls = f.calls("listsubscribe");
    // The other instance does not call the locked endpoint at all: it is paused too.
    let err = b.sub("newsletter", &[sub(2)]).await.unwrap_err();
    match err {
        ConnectorError::Transient {
            retry_after: Some(rest),
            message,
            scope,
        } => assert!(
            rest > Duration::from_secs(30)
                && message.contains("locked")
                && scope == FailureScope::Service,
            "a lock-out concerns the whole endpoint: {rest:?} {message} {scope:?}"
        ),
        other => panic!("expected a transient lock-out, got {other:?}"),
    }
    assert_eq!(f.calls("listsubscribe"), calls);
    assert!(
        b.shared_usage(Api::ListSubscribe)
            .await
            .unwrap()
            .1
            .is_some()
    );
}

/// Instance A removes an address (a lapsed contact); instance B runs the status poll: it does
/// not read that removal back as the person's unsubscribe, but does report a real one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_own_removal_by_one_instance_is_not_echoed_by_the_other() {
    let f = fake_with_quota();
    let ledger = Arc::new(MemoryLedger::default());
    let (a, b) = (instance(&f, &ledger), instance(&f, &ledger));
    a.sub("newsletter", &[sub(1), sub(2)]).await.unwrap();
    a.rm("newsletter", &["p1@example.org".to_owned()])
        .await
        .unwrap();
    f.unsubscribe(KEY, "p2@example.org");
    let page = b.status_events("newsletter", None).await.unwrap();
    let unsubscribed: Vec<&str> = page
        .events
        .iter()
        .filter(|e| e.kind == StatusKind::Unsubscribed)
        .map(|e| e.email.as_str())
        .collect();
    assert_eq!(unsubscribed, vec!["p2@example.org"]);
    // The mark was consumed by the poll that recognised it.
    assert!(
        ledger
            .marked("zoho-campaigns:own-removals:3c20ad524dfa4af86216a5be13e238ed")
            .await
            .unwrap()
            .is_empty()
    );
}
