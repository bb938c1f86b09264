//! Two HubSpot connectors — two optinsync instances — sharing one `QuotaLedger` keep
//! HubSpot's burst limit together. The ledger is an in-memory stand-in for the engine's
//! store-backed one (`engine/src/quota.rs`).

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use optinsync_plugin_api::{
    ConnectorResult, CrmConnector, QuotaLedger, QuotaSlot, QuotaWindow, RecordRef, Settings,
};
use optinsync_plugin_hubspot::HubSpotCrm;
use optinsync_testkit::hubspot::{self, FakeHubSpot};
use serde_json::json;

/// Exact sliding windows over call times.
#[derive(Debug, Default)]
struct MemoryLedger {
    calls: Mutex<HashMap<String, Vec<i64>>>,
    locks: Mutex<HashMap<String, i64>>,
}

fn counts(calls: &[i64], w: &QuotaWindow, now: i64) -> usize {
    calls.iter().filter(|t| **t > now - w.length_ms).count()
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
            return Ok(QuotaSlot::Wait(Duration::from_millis(20)));
        }
        list.push(now);
        Ok(QuotaSlot::Go(now))
    }

    async fn settle(&self, _: &str, _: &[QuotaWindow], _: i64, _: i64) -> ConnectorResult<()> {
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
        Ok((
            windows
                .iter()
                .map(|w| counts(&list, w, now) as u32)
                .collect(),
            None,
        ))
    }
}

fn instance(fake: &FakeHubSpot, ledger: Option<&Arc<MemoryLedger>>) -> Arc<HubSpotCrm> {
    let text = format!(
        "token = \"{}\"\napi_url = \"{}\"\nrequests_per_10s = 20\n",
        hubspot::PRIVATE_APP_TOKEN,
        fake.url()
    );
    let table: toml::Table = toml::from_str(&text).unwrap();
    let crm = HubSpotCrm::from_settings(&Settings::from_serialize(&table).unwrap()).unwrap();
    Arc::new(match ledger {
        Some(l) => crm.with_quota_ledger(Arc::clone(l) as Arc<dyn QuotaLedger>),
        None => crm,
    })
}

async fn fetch_n(crm: Arc<HubSpotCrm>, id: u64, n: usize) {
    let r = RecordRef {
        module: "contacts".into(),
        id: id.to_string(),
    };
    for _ in 0..n {
        crm.fetch(&r).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_share_the_burst_limit() {
    let fake = FakeHubSpot::start();
    // HubSpot's window holds 30 calls here; each instance may make 20 per 10 s.
    fake.with(|s| s.burst_max = 30);
    let id = fake.insert(json!({"email": "a@example.org"}));
    let ledger = Arc::new(MemoryLedger::default());
    let (a, b) = (
        instance(&fake, Some(&ledger)),
        instance(&fake, Some(&ledger)),
    );
    let started = Instant::now();
    tokio::join!(fetch_n(a, id, 15), fetch_n(b, id, 15));
    // Together they made 30 calls but only 20 in the first 10 seconds: no 429.
    assert!(
        started.elapsed() >= Duration::from_secs(9),
        "{:?}",
        started.elapsed()
    );
    let log = fake.request_log();
    assert_eq!(log.len(), 30);
    assert!(
        log.iter().all(|r| r.status == 200),
        "a 429 despite the shared ledger"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_a_shared_ledger_two_instances_can_exceed_it() {
    let fake = FakeHubSpot::start();
    fake.with(|s| s.burst_max = 30);
    let id = fake.insert(json!({"email": "a@example.org"}));
    let (a, b) = (instance(&fake, None), instance(&fake, None));
    let r = RecordRef {
        module: "contacts".into(),
        id: id.to_string(),
    };
    let (ra, rb) = tokio::join!(
        async {
            let mut errs = 0;
            for _ in 0..20 {
                errs += usize::from(a.fetch(&r).await.is_err());
            }
            errs
        },
        async {
            let mut errs = 0;
            for _ in 0..20 {
                errs += usize::from(b.fetch(&r).await.is_err());
            }
            errs
        }
    );
    assert!(
        ra + rb > 0,
        "each instance alone keeps 20 per 10 s; together 40 > 30"
    );
}
