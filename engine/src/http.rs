//! The HTTP server: confirmation and unsubscribe links, health.
//!
//! `GET` and `HEAD` never change state (invariant 6): link scanners fetch links in mails, so
//! the GET page only shows a button, and only the `POST` it sends confirms. An RFC 8058
//! one-click `POST` to the unsubscribe link unsubscribes at once.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use chrono::Utc;

use crate::consent::Input;
use crate::engine::{Applied, Engine};
use crate::ledger::Evidence;
use crate::mail::{content_hash, html_escape};
use crate::tokens::{Claims, Purpose, TokenError};

pub fn router(engine: Arc<Engine>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(crate::metrics::handler))
        .route("/confirm/{token}", get(confirm_page).post(confirm_post))
        .route(
            "/unsubscribe/{token}",
            get(unsubscribe_page).post(unsubscribe_post),
        )
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

fn page(status: StatusCode, title: &str, body_html: &str) -> Response {
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width\">\
         <meta name=\"robots\" content=\"noindex\"><title>{t}</title></head>\
         <body style=\"font-family:sans-serif;max-width:40em;margin:2em auto;padding:0 1em\"><h1>{t}</h1>{body_html}</body></html>",
        t = html_escape(title)
    );
    (status, [(header::CACHE_CONTROL, "no-store")], Html(html)).into_response()
}

fn token_error_page(e: &TokenError) -> Response {
    match e {
        TokenError::Expired(_) => page(
            StatusCode::GONE,
            "This link has expired",
            "<p>Confirmation links are valid for a limited time. Nothing was changed. \
             If you still want to subscribe, please sign up again.</p>",
        ),
        _ => page(
            StatusCode::BAD_REQUEST,
            "This link is not valid",
            "<p>Please use the link exactly as it appears in the mail. Nothing was changed.</p>",
        ),
    }
}

fn verify(engine: &Engine, token: &str, purpose: Purpose) -> Result<Claims, Box<Response>> {
    engine
        .tokens
        .verify(token, purpose, Utc::now().timestamp())
        .map_err(|e| Box::new(token_error_page(&e)))
}

/// The confirmation page exactly as shown; its hash is the evidence of what the person saw.
fn confirm_body(engine: &Engine, list_name: &str, description: &str) -> String {
    let sender = &engine.config.config.sender;
    format!(
        "<p>{org} asks whether you want to receive <strong>{list}</strong>.</p>{desc}\
         <form method=\"post\"><button type=\"submit\" style=\"font-size:1.2em;padding:.5em 1.5em\">Yes, subscribe me</button></form>\
         <p>If you did not ask for this, close this page: nothing will happen.</p>\
         <p style=\"font-size:small;color:#555\">{org}, {address}</p>",
        org = html_escape(&sender.organisation),
        list = html_escape(list_name),
        desc = if description.is_empty() {
            String::new()
        } else {
            format!("<p>{}</p>", html_escape(description))
        },
        address = html_escape(&sender.postal_address),
    )
}

async fn confirm_page(State(engine): State<Arc<Engine>>, Path(token): Path<String>) -> Response {
    let claims = match verify(&engine, &token, Purpose::Confirm) {
        Ok(c) => c,
        Err(resp) => return *resp,
    };
    let Some(list) = engine.list(&claims.list_id) else {
        return token_error_page(&TokenError::Malformed);
    };
    page(
        StatusCode::OK,
        &format!("Confirm: {}", list.name),
        &confirm_body(&engine, &list.name, &list.description),
    )
}

fn request_evidence(addr: SocketAddr, headers: &HeaderMap, token_id: &str) -> Evidence {
    Evidence {
        ip: Some(addr.ip().to_string()),
        user_agent: headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.chars().take(512).collect()),
        token_id: Some(token_id.to_owned()),
        ..Evidence::default()
    }
}

async fn confirm_post(
    State(engine): State<Arc<Engine>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(token): Path<String>,
) -> Response {
    let claims = match verify(&engine, &token, Purpose::Confirm) {
        Ok(c) => c,
        Err(resp) => return *resp,
    };
    let (Some(list), Ok(Some(contact))) = (
        engine.list(&claims.list_id),
        engine.store.contact_by_id(&claims.contact_id).await,
    ) else {
        return token_error_page(&TokenError::Malformed);
    };
    let shown = confirm_body(&engine, &list.name, &list.description);
    let mut evidence = request_evidence(addr, &headers, &claims.token_id);
    evidence.content_hash = Some(content_hash(&[&shown]));
    let input = Input::Confirm {
        token: claims.token_id.clone(),
    };
    match engine.apply(&contact, list, input, "web", evidence).await {
        Ok(Applied::Changed(_)) | Ok(Applied::Unchanged) => page(
            StatusCode::OK,
            "Thank you: you are subscribed",
            &format!(
                "<p>You confirmed that you want to receive <strong>{}</strong>. You can unsubscribe at any time with the link in every mail.</p>",
                html_escape(&list.name)
            ),
        ),
        Ok(Applied::Refused(_)) => page(
            StatusCode::CONFLICT,
            "This link can no longer be used",
            "<p>This confirmation link belongs to a request that is no longer open (it was replaced, or you unsubscribed since). Nothing was changed.</p>",
        ),
        Err(e) => {
            tracing::error!(contact_id = %contact.id, error = %e, "confirmation could not be recorded");
            page(
                StatusCode::SERVICE_UNAVAILABLE,
                "Please try again",
                "<p>We could not record your confirmation just now. Nothing was changed; please try again in a minute.</p>",
            )
        }
    }
}

async fn unsubscribe_page(
    State(engine): State<Arc<Engine>>,
    Path(token): Path<String>,
) -> Response {
    let claims = match verify(&engine, &token, Purpose::Unsubscribe) {
        Ok(c) => c,
        Err(resp) => return *resp,
    };
    let Some(list) = engine.list(&claims.list_id) else {
        return token_error_page(&TokenError::Malformed);
    };
    page(
        StatusCode::OK,
        &format!("Unsubscribe from {}", list.name),
        "<form method=\"post\"><button type=\"submit\" style=\"font-size:1.2em;padding:.5em 1.5em\">Unsubscribe</button></form>",
    )
}

async fn unsubscribe_post(
    State(engine): State<Arc<Engine>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(token): Path<String>,
) -> Response {
    let claims = match verify(&engine, &token, Purpose::Unsubscribe) {
        Ok(c) => c,
        Err(resp) => return *resp,
    };
    let (Some(list), Ok(Some(contact))) = (
        engine.list(&claims.list_id),
        engine.store.contact_by_id(&claims.contact_id).await,
    ) else {
        return token_error_page(&TokenError::Malformed);
    };
    let evidence = request_evidence(addr, &headers, &claims.token_id);
    match engine
        .apply(&contact, list, Input::Unsubscribe, "web", evidence)
        .await
    {
        Ok(_) => page(
            StatusCode::OK,
            "You are unsubscribed",
            &format!(
                "<p>You will receive no more <strong>{}</strong>.</p>",
                html_escape(&list.name)
            ),
        ),
        Err(e) => {
            tracing::error!(contact_id = %contact.id, error = %e, "unsubscribe could not be recorded");
            page(
                StatusCode::SERVICE_UNAVAILABLE,
                "Please try again",
                "<p>We could not record your request just now; please try again in a minute.</p>",
            )
        }
    }
}
