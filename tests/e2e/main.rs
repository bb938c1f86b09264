//! End-to-end tests of the `optinsync` binary: the shipped demo configuration on a temporary
//! copy, a real HTTP server, SQLite files and a real PostgreSQL server.
//!
//! One test binary with topic modules (as ripgrep does); `support` holds the harness.

#![allow(clippy::unwrap_used)]

mod browser;
mod cli;
mod conformance;
mod console;
mod crash;
mod data_subject;
mod demo;
mod exec;
mod faults;
mod hardening;
mod hubspot;
mod import;
mod lifecycle;
mod log_scan;
mod mail;
mod mailchimp;
mod monitoring;
mod multi_instance;
mod outbox;
mod pairings;
mod postgres;
mod rules;
mod signup;
mod status_webhooks;
mod support;
mod waves;
mod zoho;
mod zoho_campaigns;
