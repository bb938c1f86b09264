//! Prometheus metrics. Names are `optinsync_*`; labels have bounded cardinality (results,
//! input kinds — never contact ids or addresses).

use std::sync::OnceLock;

use axum::http::header;
use axum::response::IntoResponse;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Install the global recorder once per process; later calls are no-ops.
pub fn install() {
    if HANDLE.get().is_some() {
        return;
    }
    match PrometheusBuilder::new().install_recorder() {
        Ok(handle) => {
            let _ = HANDLE.set(handle);
        }
        Err(e) => tracing::warn!(error = %e, "metrics recorder not installed"),
    }
}

/// Text exposition for `GET /metrics`.
pub fn render() -> String {
    match HANDLE.get() {
        Some(h) => {
            // Without the exporter's own listener nobody else runs upkeep.
            h.run_upkeep();
            h.render()
        }
        None => String::new(),
    }
}

pub async fn handler() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        render(),
    )
}
