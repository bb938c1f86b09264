//! optinsync engine: consent state machine, ledger, store, rules host, outbox and HTTP.
pub mod admin;
pub mod circuit;
pub mod config;
pub mod consent;
pub mod email;
pub mod engine;
pub mod http;
pub mod ledger;
pub mod links;
pub mod mail;
pub mod metrics;
pub mod outbox;
pub mod rules;
pub mod store;
pub mod templates;
pub mod tokens;
pub mod webhooks;
