//! Services the engine hands a connector at construction ([`crate::BuildContext`]) so that
//! several daemons on one database share vendor budgets and bookkeeping.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::ConnectorResult;

/// One quota window of a vendor API: at most `limit` calls per `length_ms` milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaWindow {
    pub limit: u32,
    pub length_ms: i64,
}

/// What a [`QuotaLedger`] says about the next call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaSlot {
    /// Send now: the call was counted in every window at this time (epoch ms).
    Go(i64),
    /// A window is full: ask again after this long.
    Wait(Duration),
    /// The vendor locked the endpoint: no call for this long.
    Locked(Duration),
}

/// Quota budgets shared by every instance that calls one vendor account, so that several
/// daemons together stay within the vendor's limits. The engine implements it over its store
/// and hands it to a connector at construction; a connector without one keeps its budgets in
/// memory (one instance).
///
/// Windows slide: each is kept as 60 buckets of `length_ms / 60`, and a bucket counts until it
/// has left the window entirely, so the count is never lower than the vendor's, whatever its
/// window alignment. Times are wall-clock epoch milliseconds: instances need synchronised
/// clocks (as for the store's leases).
#[async_trait]
pub trait QuotaLedger: Send + Sync + fmt::Debug {
    /// Count one call of `key` in every window if each has room and the key is not locked;
    /// atomic across instances.
    async fn take(
        &self,
        key: &str,
        windows: &[QuotaWindow],
        now_ms: i64,
    ) -> ConnectorResult<QuotaSlot>;
    /// The call counted at `sent_ms` got its answer at `done_ms`: count it there instead, so a
    /// slow answer cannot make two calls look further apart than the vendor saw them.
    async fn settle(
        &self,
        key: &str,
        windows: &[QuotaWindow],
        sent_ms: i64,
        done_ms: i64,
    ) -> ConnectorResult<()>;
    /// The vendor locked `key` until `until_ms`: every instance pauses it until then.
    async fn lock(&self, key: &str, until_ms: i64) -> ConnectorResult<()>;
    /// Calls counted now, one number per window, and the lock end if locked.
    async fn usage(
        &self,
        key: &str,
        windows: &[QuotaWindow],
        now_ms: i64,
    ) -> ConnectorResult<(Vec<u32>, Option<i64>)>;
}

/// Small named sets shared by every instance on one database, for connector bookkeeping that
/// must not depend on which instance did what — e.g. the addresses optinsync itself removed
/// from a campaigns list, so that the status poll (run by whichever instance holds its lease)
/// does not take that removal for the person's own unsubscribe. Implemented by the engine over
/// its store; a connector without one keeps such sets in memory (one instance).
#[async_trait]
pub trait SharedMarks: Send + Sync + fmt::Debug {
    /// Add `member` to `set` (idempotent).
    async fn mark(&self, set: &str, member: &str) -> ConnectorResult<()>;
    /// Take these members out of `set`.
    async fn unmark(&self, set: &str, members: &[String]) -> ConnectorResult<()>;
    /// Every member of `set`.
    async fn marked(&self, set: &str) -> ConnectorResult<Vec<String>>;
}
