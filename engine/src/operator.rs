//! The operator's actions beside consent, one function each for the CLI and the operator
//! console, so both behave alike: dead letters (retry; drop, a removal only when forced),
//! the ledger verification (recorded, so the console can show the last result) and the
//! proof bundle of one contact.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::engine::{Engine, StoreReads};
use crate::export::{self, ExportError, ExportResult};
use crate::store::{Contact, Store, StoreResult};

/// The cursor that keeps the last ledger verification (JSON of [`Verification`]).
pub const VERIFICATION_CURSOR: &str = "ledger-verify:last";

/// What dropping a dead letter did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropOutcome {
    Dropped,
    /// A removal, not forced: dropping it would leave the address on the campaigns list.
    RemovalNeedsForce,
    /// Unknown id, or not a dead letter.
    NotDead,
}

/// Whether dropping a dead letter of this kind needs the operator's explicit confirmation
/// (`outbox drop --force`, the console's confirmation step).
pub fn drop_needs_force(kind: &str) -> bool {
    kind == "campaigns_remove"
}

/// Drop dead letter `id` for good, unless it is a removal and `force` is not given.
pub async fn drop_dead_letter(
    store: &dyn Store,
    id: i64,
    force: bool,
    now: DateTime<Utc>,
) -> StoreResult<DropOutcome> {
    let dead = store.outbox_dead().await?;
    let Some(item) = dead.iter().find(|d| d.id == id) else {
        return Ok(DropOutcome::NotDead);
    };
    if drop_needs_force(item.kind()) && !force {
        return Ok(DropOutcome::RemovalNeedsForce);
    }
    Ok(if store.drop_dead(id, now).await? {
        DropOutcome::Dropped
    } else {
        DropOutcome::NotDead
    })
}

/// One verification of the whole hash chain, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verification {
    pub at: DateTime<Utc>,
    pub verified: bool,
    pub events_checked: u64,
    pub head_seq: i64,
    pub head_hash: String,
    /// The first broken event, when not verified.
    pub error: Option<String>,
}

/// Verify the whole chain ([`export::verify_ledger`]); a broken chain is a result, not an
/// error (only the store failing is).
pub async fn verify_ledger(store: &dyn Store, now: DateTime<Utc>) -> StoreResult<Verification> {
    match export::verify_ledger(store).await {
        Ok(s) => Ok(Verification {
            at: now,
            verified: s.verified,
            events_checked: s.events_checked,
            head_seq: s.head_seq,
            head_hash: s.head_hash,
            error: None,
        }),
        Err(ExportError::Store(e)) => Err(e),
        Err(ExportError::Chain(e)) => Ok(broken(now, e.to_string())),
        Err(e) => Ok(broken(now, e.to_string())),
    }
}

fn broken(now: DateTime<Utc>, error: String) -> Verification {
    Verification {
        at: now,
        verified: false,
        events_checked: 0,
        head_seq: 0,
        head_hash: String::new(),
        error: Some(error),
    }
}

/// Keep `v` as the last verification.
pub async fn record_verification(store: &dyn Store, v: &Verification) -> StoreResult<()> {
    let json = serde_json::to_string(v).unwrap_or_default();
    store.set_cursor(VERIFICATION_CURSOR, &json, v.at).await
}

/// The last recorded verification, if any (an unreadable record counts as none).
pub async fn last_verification(reads: StoreReads<'_>) -> StoreResult<Option<Verification>> {
    Ok(reads
        .cursor(VERIFICATION_CURSOR)
        .await?
        .and_then(|s| serde_json::from_str(&s).ok()))
}

impl Engine {
    /// Queue dead letter `id` again with fresh attempts; `false` if it is not dead.
    pub async fn retry_dead_letter(&self, id: i64) -> StoreResult<bool> {
        let queued = self.store.retry_dead(id, Utc::now()).await?;
        if queued {
            self.outbox_wake.wake_all();
        }
        Ok(queued)
    }

    /// [`drop_dead_letter`] on this engine's store.
    pub async fn drop_dead_letter(&self, id: i64, force: bool) -> StoreResult<DropOutcome> {
        drop_dead_letter(self.store.as_ref(), id, force, Utc::now()).await
    }

    /// Verify the ledger now and record the result.
    pub async fn verify_ledger(&self) -> StoreResult<Verification> {
        let v = verify_ledger(self.store.as_ref(), Utc::now()).await?;
        record_verification(self.store.as_ref(), &v).await?;
        Ok(v)
    }

    /// The proof bundle of `contact` ([`export::proof_bundle`], after a whole-chain check).
    pub async fn proof_bundle(&self, contact: &Contact) -> ExportResult<serde_json::Value> {
        let chain = export::verify_ledger(self.store.as_ref()).await?;
        export::proof_bundle(
            &self.config,
            self.store.as_ref(),
            contact,
            &chain,
            Utc::now(),
        )
        .await
    }
}
