//! The HTTP server: confirmation and unsubscribe links (see [`crate::links`]), health.
//!
//! `GET` and `HEAD` never change state (invariant 6): link scanners fetch links in mails, so
//! the GET page only shows a button, and only the `POST` it sends confirms. An RFC 8058
//! one-click `POST` to the unsubscribe link unsubscribes at once.

use std::net::SocketAddr;
use std::sync::Arc;

use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::engine::Engine;

pub fn router(engine: Arc<Engine>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(crate::metrics::handler))
        .merge(crate::links::routes(&engine))
        .merge(crate::webhooks::routes())
        .merge(crate::admin::routes(&engine))
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

/// Liveness: 200 while the process serves HTTP, whatever its connectors do (restarting a
/// daemon whose vendor is down helps nobody). The body names each circuit's state.
async fn healthz(State(engine): State<Arc<Engine>>) -> String {
    let mut out = String::from("ok\n");
    for c in engine.circuits.report() {
        out.push_str(&format!("circuit {} {}\n", c.connector, c.state.as_str()));
    }
    out
}

/// Readiness for a load balancer: 200 only when start-up healthchecks passed, the store
/// answers (within 2 s) and no connector's circuit is open; otherwise 503. JSON either way.
async fn readyz(State(engine): State<Arc<Engine>>) -> Response {
    let started = engine.circuits.is_ready();
    let stopping = engine.circuits.is_stopping();
    let store_ok = matches!(
        tokio::time::timeout(Duration::from_secs(2), engine.store.cursor("readyz")).await,
        Ok(Ok(_))
    );
    let circuits = engine.circuits.report();
    let open = engine.circuits.open();
    let ready = started && !stopping && store_ok && open.is_empty();
    let body = serde_json::json!({
        "ready": ready,
        "started": started,
        "stopping": stopping,
        "store": if store_ok { "ok" } else { "unreachable" },
        "circuits": circuits,
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}
