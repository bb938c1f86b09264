//! The HTTP server: confirmation and unsubscribe links (see [`crate::links`]), health.
//!
//! `GET` and `HEAD` never change state (invariant 6): link scanners fetch links in mails, so
//! the GET page only shows a button, and only the `POST` it sends confirms. An RFC 8058
//! one-click `POST` to the unsubscribe link unsubscribes at once.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::routing::get;

use crate::engine::Engine;

pub fn router(engine: Arc<Engine>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(crate::metrics::handler))
        .merge(crate::links::routes(&engine))
        .merge(crate::webhooks::routes())
        .with_state(engine)
}

/// Serve until `shutdown` resolves.
pub async fn serve(
    engine: Arc<Engine>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(engine).into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn healthz() -> &'static str {
    "ok\n"
}
