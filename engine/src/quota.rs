//! Vendor quota budgets shared through the store, so that several instances on one database
//! together stay within a vendor's limits (three daemons must not each use Zoho Campaigns'
//! 500 calls per minute). [`SharedQuota`] implements the plugin API's [`QuotaLedger`] over
//! [`Store::quota_take`] and friends; the window arithmetic lives in `store/windows.rs`
//! beside the atomic SQL in `store/sql.rs` (one transaction per take, serialised per key by a row lock).
//!
//! Each window is 60 buckets of `length / 60`; a bucket counts until it has left the window
//! entirely (as the connector's in-memory budget does), so the count is never lower than the
//! vendor's sliding count.
//!
//! The same handle is the connectors' [`SharedMarks`] (small sets kept in the store, e.g. the
//! addresses optinsync removed from a campaigns list itself).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use optinsync_plugin_api::{
    ConnectorError, ConnectorResult, FailureScope, QuotaLedger, QuotaSlot, QuotaWindow, SharedMarks,
};

use crate::store::{Store, StoreError};

/// The store-backed [`QuotaLedger`]. Built before the store is opened (connectors are built
/// and checked first) and attached to it right after; a call before that is a transient error.
#[derive(Debug, Default)]
pub struct SharedQuota {
    store: OnceLock<Arc<dyn Store>>,
}

impl SharedQuota {
    pub fn new() -> Arc<SharedQuota> {
        Arc::new(SharedQuota::default())
    }

    /// Use this store from now on (a second call is ignored: one store per process).
    pub fn attach(&self, store: Arc<dyn Store>) {
        let _ = self.store.set(store);
    }

    fn store(&self) -> ConnectorResult<&Arc<dyn Store>> {
        self.store
            .get()
            .ok_or_else(|| ConnectorError::transient("the shared quota store is not open yet"))
    }
}

/// A store failure is temporary for the connector: the call is retried later.
fn unavailable(e: StoreError) -> ConnectorError {
    ConnectorError::Transient {
        message: format!("shared quota budget unavailable: {e}"),
        retry_after: Some(Duration::from_secs(5)),
        scope: FailureScope::Service,
    }
}

#[async_trait]
impl QuotaLedger for SharedQuota {
    async fn take(
        &self,
        key: &str,
        windows: &[QuotaWindow],
        now_ms: i64,
    ) -> ConnectorResult<QuotaSlot> {
        self.store()?
            .quota_take(key, windows, now_ms)
            .await
            .map_err(unavailable)
    }

    async fn settle(
        &self,
        key: &str,
        windows: &[QuotaWindow],
        sent_ms: i64,
        done_ms: i64,
    ) -> ConnectorResult<()> {
        if done_ms <= sent_ms {
            return Ok(());
        }
        self.store()?
            .quota_settle(key, windows, sent_ms, done_ms)
            .await
            .map_err(unavailable)
    }

    async fn lock(&self, key: &str, until_ms: i64) -> ConnectorResult<()> {
        self.store()?
            .quota_lock(key, until_ms)
            .await
            .map_err(unavailable)
    }

    async fn usage(
        &self,
        key: &str,
        windows: &[QuotaWindow],
        now_ms: i64,
    ) -> ConnectorResult<(Vec<u32>, Option<i64>)> {
        self.store()?
            .quota_usage(key, windows, now_ms)
            .await
            .map_err(unavailable)
    }
}

#[async_trait]
impl SharedMarks for SharedQuota {
    async fn mark(&self, set: &str, member: &str) -> ConnectorResult<()> {
        self.store()?
            .mark_add(set, member)
            .await
            .map_err(unavailable)
    }

    async fn unmark(&self, set: &str, members: &[String]) -> ConnectorResult<()> {
        self.store()?
            .mark_remove(set, members)
            .await
            .map_err(unavailable)
    }

    async fn marked(&self, set: &str) -> ConnectorResult<Vec<String>> {
        self.store()?.marks(set).await.map_err(unavailable)
    }
}
