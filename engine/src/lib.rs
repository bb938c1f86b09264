//! optinsync engine: the one writer of consent. Store, rules host, sync, outbox.
pub use optinsync_core::{consent, email, ledger, tokens, untrusted};

pub mod bulk;
pub mod canonical;
pub mod circuit;
pub mod config;
pub mod connectors;
pub mod drift;
pub mod engine;
pub mod erasure;
pub mod export;
pub mod group_commit;
pub mod import;
pub mod mail;
pub mod operator;
pub mod outbox;
pub mod plan;
pub mod preferences;
pub mod quota;
pub mod reload;
pub mod retention;
pub mod rules;
pub mod signing_keys;
pub mod signup;
pub mod store;
pub mod suppression;
pub mod templates;
pub mod work;
