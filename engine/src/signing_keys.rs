//! Which token keys have signed links that went out in mails.
//!
//! An unsubscribe link never expires, so the key that signed it must stay configured for as
//! long as the mail may sit in a mailbox: as the current key, a `[[tokens.previous]]` key, or
//! a `[[tokens.previous]]` key with `unsubscribe_only = true`. The store keeps the set of key
//! ids that have signed mailed links (cursor [`CURSOR`]); every start adds the current key id
//! and refuses a configuration that no longer holds one of them.
//!
//! A store from before this record existed may hold mails signed by any key configured at the
//! first start that records it, so that first start records them all; a store whose ledger
//! is still empty records only the current key.

use std::collections::BTreeSet;

use chrono::Utc;

use crate::store::{Store, StoreError};
use crate::tokens::TokenKeys;

/// Cursor name under which the set of signing key ids is kept (a JSON array).
pub const CURSOR: &str = "tokens:signing_key_ids";

#[derive(Debug, thiserror::Error)]
pub enum SigningKeysError {
    #[error(
        "`tokens`: key id(s) {} signed links already mailed (unsubscribe links never expire) but \
         are no longer configured; keep each as [[tokens.previous]] with its secret, with \
         `unsubscribe_only = true` to retire it for everything else",
        missing.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ")
    )]
    Dropped { missing: Vec<String> },
    #[error("the record of signing keys in the store is unreadable: {0}")]
    Corrupt(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Check `keys` against the recorded signing keys, then record the current key.
pub async fn check_and_record(store: &dyn Store, keys: &TokenKeys) -> Result<(), SigningKeysError> {
    let stored = store.cursor(CURSOR).await?;
    let recorded: BTreeSet<String> = match &stored {
        Some(text) => serde_json::from_str(text)
            .map_err(|e| SigningKeysError::Corrupt(format!("{CURSOR}: {e}")))?,
        None if store.ledger_page(0, 1).await?.is_empty() => BTreeSet::new(),
        None => keys.key_ids().map(str::to_owned).collect(),
    };
    let configured: BTreeSet<&str> = keys.key_ids().collect();
    let missing: Vec<String> = recorded
        .iter()
        .filter(|k| !configured.contains(k.as_str()))
        .cloned()
        .collect();
    if !missing.is_empty() {
        return Err(SigningKeysError::Dropped { missing });
    }
    let mut next = recorded.clone();
    next.insert(keys.current_key_id().to_owned());
    if next != recorded || stored.is_none() {
        let text = serde_json::to_string(&next).unwrap_or_else(|_| "[]".into());
        store.set_cursor(CURSOR, &text, Utc::now()).await?;
    }
    Ok(())
}
