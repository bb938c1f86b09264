//! The HTTP server: confirmation and unsubscribe links (see [`crate::links`]), health.
//!
//! `GET` and `HEAD` never change state (an architecture invariant): link scanners fetch links
//! in mails, so the GET page only shows a button, and only the `POST` it sends confirms. An RFC 8058
//! one-click `POST` to the unsubscribe link unsubscribes at once.

use std::sync::Arc;

use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tower_http::add_extension::AddExtension;
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::timeout::RequestBodyTimeoutLayer;

use optinsync_engine::engine::Engine;

/// Largest request head (request line and headers) a client may send, in bytes.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

pub fn router(engine: Arc<Engine>) -> Router {
    let body_timeout = engine.settings().server.client_timeout.0;
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(crate::metrics::handler))
        .merge(crate::links::routes(&engine))
        .merge(crate::webhooks::routes(&engine))
        .merge(crate::admin::routes(&engine))
        .merge(crate::console::routes(&engine))
        // Applied to each route (so it sees the matched template) and to the fallback.
        .layer(axum::middleware::from_fn(crate::metrics::track))
        .with_state(engine)
        // A body that trickles in slower than this is cut off (the head has its own timeout).
        .layer(RequestBodyTimeoutLayer::new(body_timeout));
    // Every answer, 404s and errors included, is neither sniffed nor cached (header layers:
    // no boxed future per request).
    BASELINE_HEADERS
        .into_iter()
        .fold(app, |app, (name, value)| {
            app.layer(SetResponseHeaderLayer::if_not_present(
                name,
                HeaderValue::from_static(value),
            ))
        })
}

/// Security headers for every answer (set where a route has not set its own: the link pages
/// carry a stricter policy).
const BASELINE_HEADERS: [(header::HeaderName, &str); 5] = [
    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    (header::CACHE_CONTROL, "no-store"),
    (header::X_FRAME_OPTIONS, "DENY"),
    (header::REFERRER_POLICY, "no-referrer"),
    (
        header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; frame-ancestors 'none'; base-uri 'none'",
    ),
];

/// Serve until `shutdown` resolves, then let the requests in flight finish.
///
/// hyper's HTTP/1 connection builder, not bare `axum::serve`, because a public server needs
/// what that does not set: a deadline for the request head (which also closes idle
/// keep-alive connections), a bounded head buffer ([`MAX_HEAD_BYTES`]), and a cap on the
/// connections served at once (`server.max_connections`; the rest wait in the listen queue),
/// so a slow or greedy client cannot hold the daemon's file descriptors.
pub async fn serve(
    engine: Arc<Engine>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let server = &engine.settings().server;
    let head_timeout = server.client_timeout.0;
    let slots = Arc::new(tokio::sync::Semaphore::new(server.max_connections.max(1)));
    let app = router(engine);
    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(head_timeout)
        .max_buf_size(MAX_HEAD_BYTES);
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors (EMFILE) or a connection reset before accept: wait a
                    // little instead of spinning, and keep serving.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(AddExtension::new(app.clone(), ConnectInfo(peer)));
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Liveness: 200 while the process serves HTTP, whatever its connectors do (restarting a
/// daemon whose vendor is down helps nobody). The body names each circuit's state.
async fn healthz(State(engine): State<Arc<Engine>>) -> String {
    let mut out = String::from("ok\n");
    for c in engine.circuits().report() {
        out.push_str(&format!("circuit {} {}\n", c.connector, c.state.as_str()));
    }
    out
}

/// Readiness for a load balancer: 200 only when start-up healthchecks passed, the store
/// answers (within 2 s) and no connector's circuit is open; otherwise 503. JSON either way.
async fn readyz(State(engine): State<Arc<Engine>>) -> Response {
    let started = engine.circuits().is_ready();
    let stopping = engine.circuits().is_stopping();
    let store_ok = matches!(
        tokio::time::timeout(Duration::from_secs(2), engine.reads().cursor("readyz")).await,
        Ok(Ok(_))
    );
    let circuits = engine.circuits().report();
    let open = engine.circuits().open();
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
