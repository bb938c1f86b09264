//! `/signup/{list}`: the hosted signup page (`GET`), website signups as a form post or JSON
//! (`POST`, CORS for `[signup] allowed_origins`), and the preflight (`OPTIONS`).
//!
//! The answer never says whether an address is known: every accepted signup, whatever the
//! address's state, gets the same status and body ("check your inbox") no sooner than
//! `[signup] answer_floor`, and the mail itself goes out through the outbox. Abuse: a
//! per-client limit (IPv6 /64), a per-address limit (over it: the same answer, nothing done),
//! a honeypot field (`website`: filled in = the same answer, nothing done), and the
//! [`HumanCheck`] hook for a proof-of-work or CAPTCHA.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Extension;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde::Deserialize;

use optinsync_engine::config::{ListConfig, SignupConfig};
use optinsync_engine::email;
use optinsync_engine::engine::Engine;
use optinsync_engine::ledger::Evidence;
use optinsync_engine::signup::SignupRequest;
use optinsync_engine::templates::Page;
use optinsync_engine::untrusted::clean_text;

use super::{ClientIp, LinkState, Req, fallback_lang, form_fields, origin_of, rate_key};

/// Nonce purpose of the hosted page's form.
const NONCE_SIGNUP: &str = "signup";
/// The honeypot field: hidden from people, filled in by form-filling bots.
pub const HONEYPOT: &str = "website";
/// The JSON answer to every accepted signup.
const JSON_RECEIVED: &str = r#"{"status":"check_your_inbox"}"#;

/// A check that a signup comes from a person (a proof-of-work or a shared CAPTCHA), given
/// the posted fields. None is configured by default; a deployment that needs one builds it in
/// here. A failed check is answered like a honeypot hit: the same answer, nothing done.
pub trait HumanCheck: Send + Sync {
    fn passes(&self, fields: &HashMap<String, String>) -> bool;
}

/// The default: every signup passes (the limits and the honeypot still apply).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoCheck;

impl HumanCheck for NoCheck {
    fn passes(&self, _fields: &HashMap<String, String>) -> bool {
        true
    }
}

/// The signup endpoint's limits and allow-list (part of [`LinkState`]).
pub struct SignupState {
    per_client: DefaultKeyedRateLimiter<IpAddr>,
    per_address: DefaultKeyedRateLimiter<String>,
    allowed_origins: Vec<String>,
    floor: Duration,
    check: Box<dyn HumanCheck>,
}

impl std::fmt::Debug for SignupState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignupState")
            .field("allowed_origins", &self.allowed_origins)
            .field("floor", &self.floor)
            .finish_non_exhaustive()
    }
}

impl SignupState {
    pub fn new(config: &SignupConfig) -> Self {
        let per = |n: u32| Quota::per_hour(NonZeroU32::new(n.max(1)).unwrap_or(NonZeroU32::MIN));
        Self {
            per_client: RateLimiter::keyed(per(config.per_client_per_hour)),
            per_address: RateLimiter::keyed(per(config.per_address_per_hour)),
            allowed_origins: config.allowed_origins.clone(),
            floor: config.answer_floor.0,
            check: Box::new(NoCheck),
        }
    }

    pub(super) fn retain_recent(&self) {
        self.per_client.retain_recent();
        self.per_address.retain_recent();
    }

    fn allowed(&self, origin: &str) -> bool {
        self.allowed_origins.iter().any(|o| o == origin)
    }

    /// The client (IPv6 by /64) is over its hourly limit of public form posts.
    pub(super) fn client_over(&self, ip: IpAddr) -> bool {
        self.per_client.check_key(&rate_key(ip)).is_err()
    }

    /// The (normalised) address is over its hourly limit of public form posts.
    pub(super) fn address_over(&self, address: &str) -> bool {
        self.per_address.check_key(&email::key(address)).is_err()
    }

    /// Wait until `floor` after `started`: every answer alike takes at least that long.
    pub(super) async fn wait_floor(&self, started: Instant) {
        if let Some(rest) = self.floor.checked_sub(started.elapsed()) {
            tokio::time::sleep(rest).await;
        }
    }
}

/// The fields of a signup, from a form or JSON.
#[derive(Debug, Default, Deserialize)]
struct Fields {
    #[serde(default)]
    email: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    language: Option<String>,
    /// More lists than the one in the path (a form: comma-separated).
    #[serde(default)]
    lists: Vec<String>,
    #[serde(default)]
    website: Option<String>,
    /// The hash of the form's text, as the organisation's site declares it.
    #[serde(default)]
    form_text_hash: Option<String>,
    /// The hosted page's nonce and snapshot hash.
    #[serde(default)]
    nonce: Option<String>,
    #[serde(default)]
    page: Option<String>,
    #[serde(skip)]
    all: HashMap<String, String>,
}

impl Fields {
    fn from_form(content_type: &str, body: &[u8]) -> Self {
        let all = form_fields(content_type, body);
        let get = |k: &str| all.get(k).cloned();
        Self {
            email: get("email").unwrap_or_default(),
            name: get("name"),
            language: get("language"),
            lists: get("lists")
                .map(|l| l.split(',').map(|s| s.trim().to_owned()).collect())
                .unwrap_or_default(),
            website: get(HONEYPOT),
            form_text_hash: get("form_text_hash"),
            nonce: get("nonce"),
            page: get("page"),
            all,
        }
    }
}

/// How the request wants its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Html,
    Json,
}

/// `Origin`, else the origin of `Referer`: where the form was.
fn source_origin(headers: &HeaderMap) -> Option<String> {
    let text = |h| headers.get(h).and_then(|v: &HeaderValue| v.to_str().ok());
    match text(header::ORIGIN).map(str::trim) {
        Some(o) if o != "null" => Some(origin_of(o)),
        _ => text(header::REFERER).map(origin_of),
    }
}

/// A declared hash: up to 128 hex digits, optionally prefixed `sha256:`.
fn declared_hash(value: Option<&str>) -> Option<String> {
    let v = value?.trim();
    let hex = v.strip_prefix("sha256:").unwrap_or(v);
    (!hex.is_empty() && hex.len() <= 128 && hex.chars().all(|c| c.is_ascii_hexdigit()))
        .then(|| v.to_ascii_lowercase())
}

pub(super) async fn signup_get(
    State(engine): State<Arc<Engine>>,
    Extension(st): Extension<Arc<LinkState>>,
    Extension(ip): Extension<ClientIp>,
    method: Method,
    headers: HeaderMap,
    Path(list_id): Path<String>,
) -> Response {
    let req = Req::new(&ip, &method, &headers);
    let lang = fallback_lang(&engine, &req);
    let Some(list) = engine.list(&list_id) else {
        return st
            .notice(&engine, StatusCode::NOT_FOUND, "invalid", &lang, None)
            .await;
    };
    let lang = list_lang(&engine, &req, list);
    let now = Utc::now().timestamp();
    st.page(
        &engine,
        StatusCode::OK,
        Page::Signup,
        &lang,
        Some(list),
        |h| st.nonce(NONCE_SIGNUP, &list.id, h, now),
    )
    .await
    .0
}

/// The browser's language if the templates have it, else the list's default.
fn list_lang(engine: &Engine, req: &Req, list: &ListConfig) -> String {
    let browser = req
        .accept_language
        .as_deref()
        .and_then(|a| a.split([',', ';']).next())
        .map(str::trim);
    engine
        .config()
        .templates
        .language_for(browser, &list.default_language)
}

/// CORS preflight of the JSON variant: allowed origins only.
pub(super) async fn signup_options(
    Extension(st): Extension<Arc<LinkState>>,
    headers: HeaderMap,
) -> Response {
    match source_origin(&headers).filter(|o| st.signup.allowed(o)) {
        Some(origin) => {
            let mut r = StatusCode::NO_CONTENT.into_response();
            cors(r.headers_mut(), &origin);
            r.headers_mut().insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("POST"),
            );
            r.headers_mut().insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static("content-type"),
            );
            r.headers_mut().insert(
                header::ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from_static("600"),
            );
            r
        }
        None => StatusCode::FORBIDDEN.into_response(),
    }
}

fn cors(headers: &mut HeaderMap, origin: &str) {
    if let Ok(v) = HeaderValue::from_str(origin) {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
    }
    headers.insert(header::VARY, HeaderValue::from_static("Origin"));
}

pub(super) async fn signup_post(
    State(engine): State<Arc<Engine>>,
    Extension(st): Extension<Arc<LinkState>>,
    Extension(ip): Extension<ClientIp>,
    headers: HeaderMap,
    Path(list_id): Path<String>,
    body: Bytes,
) -> Response {
    let started = Instant::now();
    let req = Req::new(&ip, &Method::POST, &headers);
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let format = if content_type
        .to_ascii_lowercase()
        .starts_with("application/json")
    {
        Format::Json
    } else {
        Format::Html
    };
    let fields = match format {
        Format::Json => serde_json::from_slice::<Fields>(&body).ok(),
        Format::Html => Some(Fields::from_form(content_type, &body)),
    };
    let origin = source_origin(&headers);
    let answer = Answer {
        engine: &engine,
        st: &st,
        format,
        origin: origin.clone().filter(|o| st.signup.allowed(o)),
    };
    let Some(list) = engine.list(&list_id) else {
        return answer
            .notice(
                StatusCode::NOT_FOUND,
                "invalid",
                &fallback_lang(&engine, &req),
                None,
            )
            .await;
    };
    let lang = match fields.as_ref().and_then(|f| f.language.as_deref()) {
        Some(l) => engine
            .config()
            .templates
            .language_for(Some(l), &list.default_language),
        None => list_lang(&engine, &req, list),
    };
    // The hosted page (our own origin), an allowed site, or a client that names no origin.
    if let Some(o) = &origin
        && *o != st.public_origin
        && !st.signup.allowed(o)
    {
        metrics::counter!("optinsync_signup_total", "outcome" => "cross_site").increment(1);
        return answer
            .notice(
                StatusCode::FORBIDDEN,
                "signup_cross_site",
                &lang,
                Some(list),
            )
            .await;
    }
    if st.signup.client_over(req.ip) {
        metrics::counter!("optinsync_signup_total", "outcome" => "client_limit").increment(1);
        return answer
            .notice(StatusCode::TOO_MANY_REQUESTS, "too_many", &lang, Some(list))
            .await;
    }
    let Some(fields) = fields else {
        return answer
            .notice(StatusCode::BAD_REQUEST, "signup_invalid", &lang, Some(list))
            .await;
    };
    let Ok(address) = email::normalise(&fields.email) else {
        metrics::counter!("optinsync_signup_total", "outcome" => "invalid").increment(1);
        return answer
            .notice(StatusCode::BAD_REQUEST, "signup_invalid", &lang, Some(list))
            .await;
    };
    let outcome = if fields
        .website
        .as_deref()
        .is_some_and(|w| !w.trim().is_empty())
        || !st.signup.check.passes(&fields.all)
    {
        "honeypot"
    } else if st.signup.address_over(&address) {
        "address_limit"
    } else {
        let request = signup_request(&engine, &st, &req, list, &lang, address, &fields, origin);
        match engine.signup(&request).await {
            Ok((contact, outcomes)) => {
                for (list, o) in &outcomes {
                    tracing::info!(contact_id = %contact.id, list = %list, outcome = ?o, "website signup");
                }
                "accepted"
            }
            Err(e) => {
                tracing::error!(error = %e, "website signup could not be recorded");
                return answer
                    .notice(StatusCode::SERVICE_UNAVAILABLE, "retry", &lang, Some(list))
                    .await;
            }
        }
    };
    metrics::counter!("optinsync_signup_total", "outcome" => outcome).increment(1);
    // The same answer, no sooner than the floor, whatever happened above.
    st.signup.wait_floor(started).await;
    answer
        .notice(StatusCode::OK, "signup_received", &lang, Some(list))
        .await
}

/// The engine's request: the lists, the contact data, and the evidence of this post.
#[allow(clippy::too_many_arguments)]
fn signup_request(
    engine: &Engine,
    st: &LinkState,
    req: &Req,
    list: &ListConfig,
    lang: &str,
    address: String,
    fields: &Fields,
    origin: Option<String>,
) -> SignupRequest {
    let mut lists = vec![list.id.clone()];
    for extra in &fields.lists {
        if engine.list(extra).is_some() && !lists.contains(extra) {
            lists.push(extra.clone());
        }
    }
    // The hosted page's snapshot hash counts only with its nonce: then it is the page we
    // served, whose text is stored.
    let now = Utc::now().timestamp();
    let page = fields.page.as_deref().filter(|page| {
        st.verify_nonce(
            NONCE_SIGNUP,
            &list.id,
            page,
            fields.nonce.as_deref().unwrap_or(""),
            now,
        )
    });
    let evidence = Evidence {
        ip: Some(req.ip.to_string()),
        user_agent: req.user_agent.clone(),
        method: Some(req.method.clone()),
        content_hash: page.map(str::to_owned),
        origin: origin.map(|o| o.chars().take(512).collect()),
        form_text_hash: declared_hash(fields.form_text_hash.as_deref()),
        detail: Some(if page.is_some() {
            "website signup (hosted page)".into()
        } else {
            "website signup (organisation's form)".into()
        }),
        ..Evidence::default()
    };
    let name = fields
        .name
        .as_deref()
        .map(|n| clean_text(n).trim().chars().take(200).collect::<String>())
        .filter(|n| !n.is_empty());
    SignupRequest {
        email: address,
        name,
        language: fields.language.as_ref().map(|_| lang.to_owned()),
        lists,
        evidence,
    }
}

/// Answers in the request's format, with CORS for an allowed origin.
struct Answer<'a> {
    engine: &'a Engine,
    st: &'a LinkState,
    format: Format,
    origin: Option<String>,
}

impl Answer<'_> {
    async fn notice(
        &self,
        status: StatusCode,
        notice: &'static str,
        lang: &str,
        list: Option<&ListConfig>,
    ) -> Response {
        let mut resp = match self.format {
            Format::Html => {
                self.st
                    .notice(self.engine, status, notice, lang, list)
                    .await
            }
            Format::Json => {
                let body = if notice == "signup_received" {
                    JSON_RECEIVED.to_owned()
                } else {
                    format!(r#"{{"error":"{notice}"}}"#)
                };
                (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
            }
        };
        if let Some(o) = &self.origin {
            cors(resp.headers_mut(), o);
        }
        resp
    }
}
