//! optinsync engine: consent state machine, ledger, store, rules host, outbox and HTTP.
pub mod config;
pub mod consent;
pub mod email;
pub mod ledger;
pub mod rules;
pub mod store;
pub mod tokens;
