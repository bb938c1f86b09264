//! optinsync's HTTP layer: everything that arrives over the network.
//!
//! A thin layer over the engine: it parses and checks requests, and hands every consent
//! change to [`optinsync_engine::engine::Engine`] — it has no way to write consent itself.
//!
//! - [`http`]: the server (accept loop, limits, security headers, health).
//! - [`links`]: confirm and unsubscribe links (the scanner-proof two-step confirm).
//! - [`webhooks`]: connector webhooks.
//! - [`admin`]: the admin JSON API and the views `status`/`contact show` share with it.
//! - [`console`]: the operator console (`/console`, server-rendered pages behind a login).
//! - [`metrics`]: the Prometheus recorder and `/metrics`.
pub mod admin;
pub mod console;
pub mod http;
pub mod links;
pub mod metrics;
pub mod webhooks;
