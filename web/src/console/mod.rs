//! The operator console at `/console`: server-rendered pages (minijinja, no script at all,
//! charts as inline SVG) behind a login, off unless `[console]` is configured.
//!
//! * Login with the operator password (`[console] password_hash`, Argon2) or, without one,
//!   the admin token; an opaque session cookie (`HttpOnly`, `SameSite=Strict`, `Secure` when
//!   the public URL is https, `Max-Age` = `session_ttl`). Failed logins are throttled per
//!   client and for all clients together ([`auth`]).
//! * Every state-changing action is a `POST` carrying the session's CSRF token, from a page of
//!   this origin (`Origin`/`Sec-Fetch-Site` checked like the confirm `POST`).
//! * A person is looked up by a `POST` of the address, never a URL holding it.
//! * Pages: [`overview`] (funnel, daily chart, pending ages), [`drift`] (ledger ↔ campaigns
//!   list), [`operations`] (outbox, dead letters, circuits, leases, rules, ledger
//!   verification), [`person`] (timeline, proof bundle, erasure).
//! * The CSP allows no script and styles only from `/console/console.css` (vendored here).

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use sha2::{Digest, Sha256};

use optinsync_engine::engine::Engine;

use crate::links::{cross_site, origin_of, rate_key, request_client, trusted_proxies};

pub mod auth;
mod chart;
mod drift;
mod operations;
mod overview;
mod person;
mod render;

use auth::{Secret, Session, Sessions};

/// The console's policy: nothing runs, styles come from the console's own stylesheet.
const CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; \
                   frame-ancestors 'none'; base-uri 'none'";

const STYLESHEET: &str = include_str!("templates/console.css");

/// The console's shared state (one per server).
#[derive(Debug)]
pub struct Console {
    secret: Secret,
    sessions: Sessions,
    /// Cookies get `Secure` when the public URL is https.
    secure: bool,
    public_origin: String,
    trusted: Vec<IpAddr>,
    pages: render::Pages,
    drift: drift::Cache,
}

/// The logged-in operator, put in the request by [`guard`].
#[derive(Debug, Clone)]
pub struct Operator(pub Session);

/// The console's routes, or none when `[console]` is not configured.
pub fn routes(engine: &Engine) -> Router<Arc<Engine>> {
    let Some(settings) = engine.settings().console.as_ref() else {
        return Router::new();
    };
    let secret = match (&settings.password_hash, &engine.settings().admin.token) {
        (Some(hash), _) => Secret::Argon2(hash.clone()),
        (None, Some(token)) => Secret::AdminToken(Sha256::digest(token.as_bytes()).into()),
        // The configuration check refuses a console nobody can log in to.
        (None, None) => return Router::new(),
    };
    let public_url = &engine.settings().server.public_url;
    let console = Arc::new(Console {
        secret,
        sessions: Sessions::new(settings.session_ttl.0),
        secure: public_url.to_ascii_lowercase().starts_with("https://"),
        public_origin: origin_of(public_url),
        trusted: trusted_proxies(&engine.settings().server),
        pages: render::Pages::new(),
        drift: drift::Cache::default(),
    });
    Router::new()
        .route("/console", get(overview::page))
        .route("/console/console.css", get(stylesheet))
        .route("/console/favicon.svg", get(favicon))
        .route("/console/login", get(login_page).post(login))
        .route("/console/logout", post(logout))
        .route("/console/drift", get(drift::page).post(drift::compute))
        .route("/console/operations", get(operations::page))
        .route("/console/operations/verify", post(operations::verify))
        .route("/console/operations/retry", post(operations::retry))
        .route("/console/operations/drop", post(operations::drop_letter))
        .route("/console/person", get(person::search).post(person::lookup))
        .route("/console/person/erase", post(person::erase))
        .route("/console/person/proof", post(person::proof))
        .route_layer(middleware::from_fn_with_state(Arc::clone(&console), guard))
        .layer(Extension(console))
}

/// Paths served without a session.
fn is_public(path: &str) -> bool {
    matches!(
        path,
        "/console/login" | "/console/console.css" | "/console/favicon.svg"
    )
}

/// Security headers on every answer; a session for everything but the login page and the
/// stylesheet (else a redirect to the login); same-origin `POST`s only.
async fn guard(State(console): State<Arc<Console>>, mut req: Request, next: Next) -> Response {
    let mut resp = if req.method() == Method::POST
        && let Some(why) = cross_site(req.headers(), &console.public_origin)
    {
        tracing::warn!(reason = why, "console: cross-site POST refused");
        (StatusCode::FORBIDDEN, "cross-site request refused\n").into_response()
    } else if is_public(req.uri().path()) {
        next.run(req).await
    } else {
        match session_of(&console, req.headers()) {
            Some(session) => {
                req.extensions_mut().insert(Operator(session));
                next.run(req).await
            }
            None => Redirect::to("/console/login").into_response(),
        }
    };
    crate::links::set_security_headers(resp.headers_mut(), CSP);
    resp
}

/// The session cookie's value in the request, if any.
fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| auth::cookie_value(v, auth::COOKIE))
}

fn session_of(console: &Console, headers: &HeaderMap) -> Option<Session> {
    session_cookie(headers).and_then(|c| console.sessions.get(c))
}

async fn stylesheet() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        STYLESHEET,
    )
        .into_response()
}

async fn favicon() -> Response {
    (
        [(header::CONTENT_TYPE, "image/svg+xml")],
        "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 16 16\"><rect width=\"16\" height=\"16\" rx=\"3\" fill=\"#1f3a5f\"/><path d=\"M4 8l3 3 5-6\" stroke=\"#fff\" stroke-width=\"2\" fill=\"none\"/></svg>",
    )
        .into_response()
}

/// What every console page handler works with: the engine, the console and the operator
/// whose session [`guard`] found.
#[derive(Debug)]
pub struct Ctx {
    pub engine: Arc<Engine>,
    pub console: Arc<Console>,
    pub op: Operator,
}

impl FromRequestParts<Arc<Engine>> for Ctx {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, engine: &Arc<Engine>) -> Result<Self, Response> {
        match (
            parts.extensions.get::<Arc<Console>>(),
            parts.extensions.get::<Operator>(),
        ) {
            (Some(console), Some(op)) => Ok(Self {
                engine: Arc::clone(engine),
                console: Arc::clone(console),
                op: op.clone(),
            }),
            _ => Err(Redirect::to("/console/login").into_response()),
        }
    }
}

impl Ctx {
    /// Render `name` with `ctx` and what the layout needs (the CSRF token, the page name).
    fn render(
        &self,
        name: &str,
        page: &str,
        status: StatusCode,
        ctx: minijinja::Value,
    ) -> Response {
        let mut resp = self.console.pages.render(
            name,
            minijinja::context! { csrf => self.op.0.csrf.clone(), page => page, ..ctx },
        );
        if resp.status() == StatusCode::OK {
            *resp.status_mut() = status;
        }
        resp
    }

    /// The error page for a store or connector failure (details go to the log).
    fn unavailable(&self, what: &str) -> Response {
        unavailable(&self.console, what)
    }
}

/// A console form: it carries the session's CSRF token.
pub trait CsrfForm: serde::de::DeserializeOwned + Send {
    fn csrf(&self) -> &str;
}

/// A form whose CSRF token is the session's; any other is refused (403) before a handler
/// sees it.
#[derive(Debug)]
pub struct Checked<T>(pub T);

impl<T: CsrfForm> FromRequest<Arc<Engine>> for Checked<T> {
    type Rejection = Response;

    async fn from_request(req: Request, engine: &Arc<Engine>) -> Result<Self, Response> {
        let expected = req.extensions().get::<Operator>().map(|o| o.0.csrf.clone());
        let axum::Form(form) = axum::Form::<T>::from_request(req, engine)
            .await
            .map_err(IntoResponse::into_response)?;
        match expected {
            Some(e) if auth::same_secret(&e, form.csrf()) => Ok(Self(form)),
            _ => Err((
                StatusCode::FORBIDDEN,
                "the form's CSRF token is missing or stale; reload the page\n",
            )
                .into_response()),
        }
    }
}

/// Forms that carry nothing but the CSRF token (logout, verify, compute drift).
#[derive(Debug, serde::Deserialize)]
pub struct Csrf {
    csrf: String,
}

/// `impl CsrfForm` for forms with a `csrf` field.
macro_rules! csrf_forms {
    ($($form:ty),* $(,)?) => {
        $(impl $crate::console::CsrfForm for $form {
            fn csrf(&self) -> &str {
                &self.csrf
            }
        })*
    };
}
pub(crate) use csrf_forms;

csrf_forms!(Csrf);

fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

async fn login_page(Extension(console): Extension<Arc<Console>>) -> Response {
    login_form(&console, None, StatusCode::OK)
}

fn login_form(console: &Console, error: Option<&str>, status: StatusCode) -> Response {
    let ctx = minijinja::context! {
        token => console.sessions.login_token(now_secs()),
        error => error,
    };
    let mut resp = console.pages.render("login.html", ctx);
    *resp.status_mut() = status;
    resp
}

#[derive(Debug, serde::Deserialize)]
struct LoginForm {
    password: String,
    token: String,
}

async fn login(Extension(console): Extension<Arc<Console>>, req: Request) -> Response {
    let client = rate_key(request_client(&req, &console.trusted));
    if console.sessions.throttled(client) {
        metrics::counter!("optinsync_console_logins_total", "result" => "throttled").increment(1);
        let mut resp = login_form(
            &console,
            Some("Too many failed logins: wait a minute."),
            StatusCode::TOO_MANY_REQUESTS,
        );
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("60"));
        return resp;
    }
    let Ok(axum::Form(form)) = axum::Form::<LoginForm>::from_request(req, &()).await else {
        return login_form(
            &console,
            Some("Fill in the password."),
            StatusCode::BAD_REQUEST,
        );
    };
    if !console.sessions.login_token_valid(&form.token, now_secs()) {
        return login_form(
            &console,
            Some("The form expired; try again."),
            StatusCode::FORBIDDEN,
        );
    }
    let checker = Arc::clone(&console);
    let ok = tokio::task::spawn_blocking(move || checker.secret.verify(&form.password))
        .await
        .unwrap_or(false);
    if !ok {
        console.sessions.record_failure(client);
        metrics::counter!("optinsync_console_logins_total", "result" => "refused").increment(1);
        tracing::warn!("console: a login was refused");
        return login_form(&console, Some("Wrong password."), StatusCode::UNAUTHORIZED);
    }
    metrics::counter!("optinsync_console_logins_total", "result" => "ok").increment(1);
    tracing::info!("console: operator logged in");
    let (cookie, _) = console.sessions.start();
    let mut resp = Redirect::to("/console").into_response();
    if let Ok(v) = HeaderValue::from_str(&auth::set_cookie(
        &cookie,
        console.sessions.ttl(),
        console.secure,
    )) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

async fn logout(
    Extension(console): Extension<Arc<Console>>,
    headers: HeaderMap,
    Checked(_): Checked<Csrf>,
) -> Response {
    if let Some(c) = session_cookie(&headers) {
        console.sessions.end(c);
    }
    let mut resp = Redirect::to("/console/login").into_response();
    if let Ok(v) = HeaderValue::from_str(&auth::clear_cookie(console.secure)) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

/// An error page for a store or connector failure (details go to the log, not the page).
fn unavailable(console: &Console, what: &str) -> Response {
    let mut resp = console.pages.render(
        "error.html",
        minijinja::context! { message => format!("{what} failed; see the daemon's log.") },
    );
    *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    resp
}
