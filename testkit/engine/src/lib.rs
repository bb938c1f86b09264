//! The engine's store as [`optinsync_testkit::harness::Store`]: the one adapter the end-to-end
//! tests and the harness examples pass to the harnesses.
//!
//! It is a crate of its own because testkit cannot depend on the engine (the engine's tests
//! depend on testkit), and the tests and examples of the `optinsync` package share no code
//! but through a crate.

use std::sync::Arc;

use async_trait::async_trait;
use optinsync_engine::{export, ledger, store};
use optinsync_testkit::harness::{self, LedgerEvent};

/// Opens the engine's store; pass it to [`harness::crash::run`] and
/// [`harness::multi_instance::run`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Engine;

#[async_trait]
impl harness::OpenStore for Engine {
    async fn open(&self, url: &str) -> anyhow::Result<Arc<dyn harness::Store>> {
        Ok(Arc::new(EngineStore(store::open(url).await?)))
    }
}

/// A store opened by [`Engine`].
#[derive(Debug)]
pub struct EngineStore(pub Arc<dyn store::Store>);

#[async_trait]
impl harness::Store for EngineStore {
    async fn ledger_page(&self, after: i64, limit: i64) -> anyhow::Result<Vec<LedgerEvent>> {
        let page = self.0.ledger_page(after, limit).await?;
        Ok(page.into_iter().map(event).collect())
    }

    async fn verify_ledger(&self) -> Result<(), String> {
        export::verify_ledger(self.0.as_ref())
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    async fn outbox_pending(&self) -> anyhow::Result<i64> {
        Ok(self.0.outbox_counts().await?.pending)
    }

    async fn contacts_page(
        &self,
        after: Option<&str>,
        limit: i64,
    ) -> anyhow::Result<Vec<(String, String)>> {
        let page = self.0.contacts_page(after, limit).await?;
        Ok(page.into_iter().map(|c| (c.id, c.email)).collect())
    }

    async fn consent_state(
        &self,
        contact_id: &str,
        list_id: &str,
    ) -> anyhow::Result<Option<String>> {
        let consent = self.0.consent(contact_id, list_id).await?;
        Ok(consent.map(|c| c.state.as_str().to_owned()))
    }
}

fn event(e: ledger::LedgerEvent) -> LedgerEvent {
    LedgerEvent {
        seq: e.seq,
        contact_id: e.contact_id,
        kind: e.kind,
        to_state: e.to_state,
        source: e.source,
        evidence: e.evidence,
        hash: e.hash,
    }
}
