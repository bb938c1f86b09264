//! The `kill -9` harnesses: real `optinsync run` daemons (the binary whose path the caller
//! passes) against the fake Zoho services and the SMTP sink of this crate, checked afterwards
//! against what the outside world saw.
//!
//! - [`crash`]: one daemon killed and restarted many times (SQLite or PostgreSQL);
//! - [`multi_instance`]: several daemons on one PostgreSQL database, one of them killed;
//! - [`util`]: what both use, and the end-to-end tests too (clicking a confirmation page as a
//!   browser does, copying the shipped set-up, reading the whole ledger).
//!
//! They run as the CI tests `tests/e2e/crash.rs` and `tests/e2e/multi_instance.rs`, and at full
//! size as `examples/crash_harness.rs` and `examples/multi_instance.rs`.
//!
//! The harnesses read the daemon's store while it runs, through [`Store`]. This crate cannot
//! depend on the engine (the engine's tests depend on this crate), so the caller passes the
//! store in as an [`OpenStore`]: `optinsync-testkit-engine` is that adapter.

pub mod crash;
pub mod multi_instance;
pub mod util;

use std::sync::Arc;

use async_trait::async_trait;

/// One ledger event: the fields the harnesses look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerEvent {
    pub seq: i64,
    pub contact_id: String,
    pub kind: String,
    pub to_state: String,
    pub source: String,
    /// The evidence as JSON text.
    pub evidence: String,
    pub hash: String,
}

/// The daemon's store, read beside the running daemons.
#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Ledger events after `after` (a `seq`), in order, at most `limit`.
    async fn ledger_page(&self, after: i64, limit: i64) -> anyhow::Result<Vec<LedgerEvent>>;
    /// Recompute the hash chain of the whole ledger; the first break in words.
    async fn verify_ledger(&self) -> Result<(), String>;
    /// Outbox rows not yet done.
    async fn outbox_pending(&self) -> anyhow::Result<i64>;
    /// Contacts as `(id, email)`, by id, after `after`, at most `limit`.
    async fn contacts_page(
        &self,
        after: Option<&str>,
        limit: i64,
    ) -> anyhow::Result<Vec<(String, String)>>;
    /// The consent state (`"confirmed"`, `"withdrawn"`, ...) of a contact on a list, if any.
    async fn consent_state(
        &self,
        contact_id: &str,
        list_id: &str,
    ) -> anyhow::Result<Option<String>>;
}

/// Opens the store a daemon is configured with (`sqlite://...`, `postgres://...`).
#[async_trait]
pub trait OpenStore: Send + Sync {
    async fn open(&self, url: &str) -> anyhow::Result<Arc<dyn Store>>;
}
