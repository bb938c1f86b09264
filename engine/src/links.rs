//! The public link endpoints: `/confirm/{token}` and `/unsubscribe/{token}`.
//!
//! * `GET`/`HEAD` never change consent (invariant 6). They render the page (from the
//!   templates, in the contact's language) and record a `link_fetched` evidence event, at most
//!   a few per token per hour, so a scanner cannot flood the ledger.
//! * The confirm page's button POSTs a per-page nonce: an HMAC over the token id, the page's
//!   snapshot hash and the time, so no server state is needed and only a POST from a page we
//!   served (within a day) confirms. Repeated POSTs are idempotent.
//! * An expired confirmation link shows a page offering a fresh mail; its POST starts a new
//!   signup (`Input::PersonSignup`), rate-limited per contact and list.
//! * `POST /unsubscribe/{token}` withdraws at once: RFC 8058 one-click (form-urlencoded or
//!   multipart), or the button of the unsubscribe page. No cookies, no redirect, `200`.
//! * Every response carries security headers; requests are rate-limited per client IP (taking
//!   `X-Forwarded-For` only from `server.trusted_proxies`) and bodies are size-limited.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::FormRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Form, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::Utc;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::config::ListConfig;
use crate::consent::{ConsentState, Input};
use crate::engine::{Applied, Engine};
use crate::ledger::{Evidence, NewEvent};
use crate::mail;
use crate::store::{Contact, Snapshot};
use crate::templates::{Page, RenderedPage};
use crate::tokens::{Claims, Purpose, TokenError};

/// How long a served confirm page's button stays usable.
pub const NONCE_TTL_SECS: i64 = 86_400;
const NONCE_CONFIRM: &str = "confirm";
const NONCE_RESEND: &str = "resend";

/// Security headers on every page.
const CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; \
                   frame-ancestors 'none'; base-uri 'none'";

/// The client address as decided by [`client_ip`], for handlers.
#[derive(Debug, Clone, Copy)]
pub struct ClientIp(pub IpAddr);

/// Limiters and keys of the link endpoints (one per server).
pub struct LinkState {
    ip_limiter: DefaultKeyedRateLimiter<IpAddr>,
    fetch_limiter: DefaultKeyedRateLimiter<String>,
    resend_limiter: DefaultKeyedRateLimiter<String>,
    nonce_key: Vec<u8>,
    trusted: Vec<IpAddr>,
    stored: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for LinkState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkState")
            .field("trusted", &self.trusted)
            .finish_non_exhaustive()
    }
}

type HmacSha256 = Hmac<Sha256>;

fn hmac(key: &[u8], parts: &[&str]) -> HmacSha256 {
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    for p in parts {
        mac.update(&(p.len() as u64).to_be_bytes());
        mac.update(p.as_bytes());
    }
    mac
}

impl LinkState {
    pub fn new(engine: &Engine) -> Self {
        let server = &engine.config.config.server;
        let per_ip =
            NonZeroU32::new(server.rate_limit_per_minute.max(1)).unwrap_or(NonZeroU32::MIN);
        let burst3 = NonZeroU32::new(3).unwrap_or(NonZeroU32::MIN);
        let nonce_key = hmac(
            engine.config.config.tokens.secret.as_bytes(),
            &["optinsync page nonce key v1"],
        )
        .finalize()
        .into_bytes()
        .to_vec();
        Self {
            ip_limiter: RateLimiter::keyed(Quota::per_minute(per_ip)),
            // At most 3 `link_fetched` events at once per token, then one per 6 minutes.
            fetch_limiter: RateLimiter::keyed(
                Quota::with_period(Duration::from_secs(360))
                    .unwrap_or_else(|| Quota::per_hour(NonZeroU32::MIN))
                    .allow_burst(burst3),
            ),
            // One fresh confirmation mail per contact and list per hour.
            resend_limiter: RateLimiter::keyed(Quota::per_hour(NonZeroU32::MIN)),
            nonce_key,
            trusted: server
                .trusted_proxies
                .iter()
                .map(|ip| ip.to_canonical())
                .collect(),
            stored: Mutex::new(HashSet::new()),
        }
    }

    /// `time.mac`: binds the page's purpose, the token id and the page's snapshot hash.
    pub fn nonce(&self, purpose: &str, token_id: &str, page_hash: &str, now: i64) -> String {
        let ts = now.to_string();
        let tag = hmac(&self.nonce_key, &[purpose, token_id, page_hash, &ts])
            .finalize()
            .into_bytes();
        format!("{ts}.{}", URL_SAFE_NO_PAD.encode(tag))
    }

    /// Constant-time check of a nonce from a form, and that it is at most a day old.
    pub fn verify_nonce(
        &self,
        purpose: &str,
        token_id: &str,
        page_hash: &str,
        nonce: &str,
        now: i64,
    ) -> bool {
        let Some((ts, tag)) = nonce.split_once('.') else {
            return false;
        };
        let (Ok(t), Ok(tag)) = (ts.parse::<i64>(), URL_SAFE_NO_PAD.decode(tag)) else {
            return false;
        };
        if t > now + 60 || now - t > NONCE_TTL_SECS {
            return false;
        }
        hmac(&self.nonce_key, &[purpose, token_id, page_hash, ts])
            .verify_slice(&tag)
            .is_ok()
    }
}

/// The client's address: the peer, unless the peer is a trusted proxy, in which case the
/// right-most `X-Forwarded-For` entry that is not itself a trusted proxy.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpAddr]) -> IpAddr {
    let peer = peer.to_canonical();
    if !trusted.contains(&peer) {
        return peer;
    }
    let hops: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let mut ip = peer;
    for hop in hops.iter().rev() {
        match hop.parse::<IpAddr>() {
            Ok(h) => {
                ip = h.to_canonical();
                if !trusted.contains(&ip) {
                    return ip;
                }
            }
            Err(_) => return ip,
        }
    }
    ip
}

/// The routes, with their limits and headers; merged into [`crate::http::router`].
pub fn routes(engine: &Engine) -> Router<Arc<Engine>> {
    let state = Arc::new(LinkState::new(engine));
    Router::new()
        .route("/confirm/{token}", get(confirm_get).post(confirm_post))
        .route(
            "/unsubscribe/{token}",
            get(unsubscribe_get).post(unsubscribe_post),
        )
        .layer(middleware::from_fn_with_state(Arc::clone(&state), guard))
        .layer(DefaultBodyLimit::max(
            engine.config.config.server.max_body_bytes,
        ))
        .layer(Extension(state))
}

fn set_security_headers(headers: &mut HeaderMap) {
    for (name, value) in [
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
}

async fn guard(State(st): State<Arc<LinkState>>, mut req: Request, next: Next) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let ip = client_ip(peer, req.headers(), &st.trusted);
    if st.ip_limiter.len() > 10_000 {
        st.ip_limiter.retain_recent();
        st.fetch_limiter.retain_recent();
        st.resend_limiter.retain_recent();
    }
    let mut resp = if st.ip_limiter.check_key(&ip).is_err() {
        tracing::debug!(%ip, "rate limit: request refused");
        let mut r = (
            StatusCode::TOO_MANY_REQUESTS,
            Html(
                "<!doctype html><html><head><meta charset=\"utf-8\"><title>Too many requests</title></head>\
                 <body><h1>Too many requests</h1><p>Please wait a minute and try again. Nothing was changed.</p></body></html>",
            ),
        )
            .into_response();
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("60"));
        r
    } else {
        req.extensions_mut().insert(ClientIp(ip));
        next.run(req).await
    };
    set_security_headers(resp.headers_mut());
    resp
}

/// Everything a handler needs to know about the request, for evidence.
struct Req {
    ip: IpAddr,
    user_agent: Option<String>,
    method: String,
    accept_language: Option<String>,
}

impl Req {
    fn new(ip: &ClientIp, method: &Method, headers: &HeaderMap) -> Self {
        let text = |h| {
            headers
                .get(h)
                .and_then(|v: &HeaderValue| v.to_str().ok())
                .map(|s| s.chars().take(512).collect::<String>())
        };
        Self {
            ip: ip.0,
            user_agent: text(header::USER_AGENT),
            method: method.as_str().to_owned(),
            accept_language: text(header::ACCEPT_LANGUAGE),
        }
    }

    fn evidence(&self, token_id: &str) -> Evidence {
        Evidence {
            ip: Some(self.ip.to_string()),
            user_agent: self.user_agent.clone(),
            token_id: Some(token_id.to_owned()),
            method: Some(self.method.clone()),
            ..Evidence::default()
        }
    }
}

/// What a valid (or expired) token points at.
struct Target<'a> {
    claims: Claims,
    contact: Contact,
    list: &'a ListConfig,
    lang: String,
}

enum Lookup<'a> {
    Found(Box<Target<'a>>),
    Invalid,
    Unavailable,
}

async fn lookup(engine: &Engine, claims: Claims) -> Lookup<'_> {
    let Some(list) = engine.list(&claims.list_id) else {
        return Lookup::Invalid;
    };
    match engine.store.contact_by_id(&claims.contact_id).await {
        Ok(Some(contact)) => {
            let lang = engine
                .config
                .templates
                .language_for(contact.language.as_deref(), &list.default_language);
            Lookup::Found(Box::new(Target {
                claims,
                contact,
                list,
                lang,
            }))
        }
        Ok(None) => Lookup::Invalid,
        Err(e) => {
            tracing::error!(error = %e, "link lookup failed");
            Lookup::Unavailable
        }
    }
}

/// Language for a page about no known contact: the browser's, else the first list's default.
fn fallback_lang(engine: &Engine, req: &Req) -> String {
    let default = engine
        .lists()
        .first()
        .map(|l| l.default_language.as_str())
        .unwrap_or("en");
    let browser = req
        .accept_language
        .as_deref()
        .and_then(|a| a.split([',', ';']).next())
        .map(str::trim);
    engine.config.templates.language_for(browser, default)
}

impl LinkState {
    /// Render `page`, store its snapshot once, and answer with `status`.
    async fn page(
        &self,
        engine: &Engine,
        status: StatusCode,
        page: Page,
        lang: &str,
        list: Option<&ListConfig>,
        nonce: impl Fn(&str) -> String,
    ) -> (Response, Option<String>) {
        let sender = &engine.config.config.sender;
        let common = match list {
            Some(l) => mail::common(l, sender),
            None => crate::templates::Common {
                organisation: sender.organisation.clone(),
                postal_address: sender.postal_address.clone(),
                ..Default::default()
            },
        };
        let templates = &engine.config.templates;
        let rendered: RenderedPage = match templates.render_page(page, lang, &common, nonce) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "page cannot be rendered");
                return (
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        Html("<!doctype html><title>Please try again</title><p>Please try again later. Nothing was changed.</p>"),
                    )
                        .into_response(),
                    None,
                );
            }
        };
        let fresh = self
            .stored
            .lock()
            .map(|mut s| {
                if s.len() > 10_000 {
                    s.clear();
                }
                s.insert(rendered.content_hash.clone())
            })
            .unwrap_or(true);
        if fresh {
            let snap = Snapshot {
                hash: rendered.content_hash.clone(),
                kind: page.kind(),
                language: rendered.language.clone(),
                template_version: templates.version().to_owned(),
                content: rendered.snapshot.clone(),
                created_at: Utc::now(),
            };
            if let Err(e) = engine.store.put_snapshot(&snap).await {
                tracing::error!(error = %e, "page snapshot not stored");
                if let Ok(mut s) = self.stored.lock() {
                    s.remove(&rendered.content_hash);
                }
            }
        }
        let hash = rendered.content_hash.clone();
        ((status, Html(rendered.html)).into_response(), Some(hash))
    }

    async fn notice(
        &self,
        engine: &Engine,
        status: StatusCode,
        notice: &'static str,
        lang: &str,
        list: Option<&ListConfig>,
    ) -> Response {
        self.page(engine, status, Page::Notice(notice), lang, list, |_| {
            String::new()
        })
        .await
        .0
    }

    /// Record a GET/HEAD as evidence that changes no state, a few times per token at most.
    async fn record_fetch(
        &self,
        engine: &Engine,
        t: &Target<'_>,
        req: &Req,
        page_hash: Option<String>,
        detail: &str,
    ) {
        if self.fetch_limiter.check_key(&t.claims.token_id).is_err() {
            tracing::debug!(contact_id = %t.contact.id, "link fetch not recorded (rate limit)");
            return;
        }
        let state = match engine.store.consent(&t.contact.id, &t.list.id).await {
            Ok(c) => c.map(|c| c.state).unwrap_or(ConsentState::None),
            Err(e) => {
                tracing::error!(contact_id = %t.contact.id, error = %e, "link fetch not recorded");
                return;
            }
        };
        let mut evidence = req.evidence(&t.claims.token_id);
        evidence.content_hash = page_hash;
        evidence.detail = Some(detail.to_owned());
        let event = NewEvent {
            event_id: uuid::Uuid::new_v4().to_string(),
            at: Utc::now(),
            contact_id: t.contact.id.clone(),
            list_id: t.list.id.clone(),
            kind: "link_fetched".into(),
            from_state: state,
            to_state: state,
            source: "web".into(),
            evidence,
        };
        if let Err(e) = engine.append_event(event).await {
            tracing::error!(contact_id = %t.contact.id, error = %e, "link fetch not recorded");
        }
    }
}

fn verify(engine: &Engine, token: &str, purpose: Purpose) -> Result<Claims, TokenError> {
    engine.tokens.verify(token, purpose, Utc::now().timestamp())
}

/// Verify `token` for `purpose` and find what it names; `Err` is the page to answer with (an
/// invalid link, or the store unavailable). An expired *confirmation* link is still resolved
/// and flagged, because its page offers a fresh mail; unsubscribe links never expire.
async fn resolve<'e>(
    engine: &'e Engine,
    st: &LinkState,
    req: &Req,
    token: &str,
    purpose: Purpose,
) -> Result<(Box<Target<'e>>, bool), Response> {
    let invalid = || async {
        let lang = fallback_lang(engine, req);
        st.notice(engine, StatusCode::BAD_REQUEST, "invalid", &lang, None)
            .await
    };
    let (claims, expired) = match verify(engine, token, purpose) {
        Ok(c) => (c, false),
        Err(TokenError::Expired(c)) if purpose == Purpose::Confirm => (*c, true),
        Err(_) => return Err(invalid().await),
    };
    match lookup(engine, claims).await {
        Lookup::Found(t) => Ok((t, expired)),
        Lookup::Invalid => Err(invalid().await),
        Lookup::Unavailable => {
            let lang = fallback_lang(engine, req);
            Err(st
                .notice(
                    engine,
                    StatusCode::SERVICE_UNAVAILABLE,
                    "retry",
                    &lang,
                    None,
                )
                .await)
        }
    }
}

async fn confirm_get(
    State(engine): State<Arc<Engine>>,
    Extension(st): Extension<Arc<LinkState>>,
    Extension(ip): Extension<ClientIp>,
    method: Method,
    headers: HeaderMap,
    Path(token): Path<String>,
) -> Response {
    let req = Req::new(&ip, &method, &headers);
    let now = Utc::now().timestamp();
    let (t, expired) = match resolve(&engine, &st, &req, &token, Purpose::Confirm).await {
        Ok(found) => found,
        Err(page) => return page,
    };
    let (page, status, purpose, detail) = if expired {
        (
            Page::Expired,
            StatusCode::GONE,
            NONCE_RESEND,
            "expired confirmation link fetched",
        )
    } else {
        (
            Page::Confirm,
            StatusCode::OK,
            NONCE_CONFIRM,
            "confirmation page fetched",
        )
    };
    let token_id = t.claims.token_id.clone();
    let (resp, hash) = st
        .page(&engine, status, page, &t.lang, Some(t.list), |h| {
            st.nonce(purpose, &token_id, h, now)
        })
        .await;
    st.record_fetch(&engine, &t, &req, hash, detail).await;
    resp
}

/// The DOI (or reminder) mail that carried this token: its Message-ID and snapshot hash.
async fn mail_of_token(engine: &Engine, t: &Target<'_>) -> (Option<String>, Option<String>) {
    match engine.store.events_of_contact(&t.contact.id).await {
        Ok(events) => events
            .iter()
            .rev()
            .filter(|e| e.list_id == t.list.id && e.kind.ends_with("_mail_sent"))
            .map(|e| e.evidence())
            .find(|ev| ev.token_id.as_deref() == Some(t.claims.token_id.as_str()))
            .map(|ev| (ev.message_id, ev.content_hash))
            .unwrap_or((None, None)),
        Err(e) => {
            tracing::warn!(contact_id = %t.contact.id, error = %e, "mail evidence not found");
            (None, None)
        }
    }
}

async fn confirm_post(
    State(engine): State<Arc<Engine>>,
    Extension(st): Extension<Arc<LinkState>>,
    Extension(ip): Extension<ClientIp>,
    headers: HeaderMap,
    Path(token): Path<String>,
    form: Result<Form<HashMap<String, String>>, FormRejection>,
) -> Response {
    let req = Req::new(&ip, &Method::POST, &headers);
    let form = form.map(|f| f.0).unwrap_or_default();
    let field = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
    let now = Utc::now().timestamp();
    let (t, expired) = match resolve(&engine, &st, &req, &token, Purpose::Confirm).await {
        Ok(found) => found,
        Err(page) => return page,
    };
    let purpose = if expired { NONCE_RESEND } else { NONCE_CONFIRM };
    let page_hash = field("page");
    if !st.verify_nonce(purpose, &t.claims.token_id, page_hash, field("nonce"), now) {
        if expired {
            // A POST on an expired link (a stale tab, a scanner) gets the offer again.
            let token_id = t.claims.token_id.clone();
            return st
                .page(
                    &engine,
                    StatusCode::GONE,
                    Page::Expired,
                    &t.lang,
                    Some(t.list),
                    |h| st.nonce(NONCE_RESEND, &token_id, h, now),
                )
                .await
                .0;
        }
        return st
            .notice(
                &engine,
                StatusCode::BAD_REQUEST,
                "stale_page",
                &t.lang,
                Some(t.list),
            )
            .await;
    }
    if expired {
        return resend(&engine, &st, &t, &req, page_hash).await;
    }
    let (message_id, mail_hash) = mail_of_token(&engine, &t).await;
    let mut evidence = req.evidence(&t.claims.token_id);
    evidence.content_hash = Some(page_hash.to_owned());
    evidence.message_id = message_id;
    evidence.mail_content_hash = mail_hash;
    let input = Input::Confirm {
        token: t.claims.token_id.clone(),
    };
    match engine
        .apply(&t.contact, t.list, input, "web", evidence)
        .await
    {
        Ok(Applied::Changed(_)) | Ok(Applied::Unchanged) => {
            st.page(
                &engine,
                StatusCode::OK,
                Page::Confirmed,
                &t.lang,
                Some(t.list),
                |_| String::new(),
            )
            .await
            .0
        }
        Ok(Applied::Refused(_)) => {
            st.notice(
                &engine,
                StatusCode::CONFLICT,
                "refused",
                &t.lang,
                Some(t.list),
            )
            .await
        }
        Err(e) => {
            tracing::error!(contact_id = %t.contact.id, error = %e, "confirmation could not be recorded");
            st.notice(
                &engine,
                StatusCode::SERVICE_UNAVAILABLE,
                "retry",
                &t.lang,
                Some(t.list),
            )
            .await
        }
    }
}

/// The expired page's button: start a fresh signup (a new DOI mail), rate-limited.
async fn resend(
    engine: &Engine,
    st: &LinkState,
    t: &Target<'_>,
    req: &Req,
    page_hash: &str,
) -> Response {
    let key = format!("{}/{}", t.contact.id, t.list.id);
    if st.resend_limiter.check_key(&key).is_err() {
        return st
            .notice(
                engine,
                StatusCode::TOO_MANY_REQUESTS,
                "too_many",
                &t.lang,
                Some(t.list),
            )
            .await;
    }
    let mut evidence = req.evidence(&t.claims.token_id);
    evidence.content_hash = Some(page_hash.to_owned());
    evidence.detail = Some("fresh confirmation mail requested from an expired link".into());
    let input = Input::PersonSignup {
        token: uuid::Uuid::new_v4().to_string(),
    };
    match engine
        .apply(&t.contact, t.list, input, "web", evidence)
        .await
    {
        Ok(Applied::Changed(_)) => {
            st.notice(engine, StatusCode::OK, "resent", &t.lang, Some(t.list))
                .await
        }
        Ok(_) => {
            st.notice(engine, StatusCode::OK, "not_resent", &t.lang, Some(t.list))
                .await
        }
        Err(e) => {
            tracing::error!(contact_id = %t.contact.id, error = %e, "fresh signup could not be recorded");
            st.notice(
                engine,
                StatusCode::SERVICE_UNAVAILABLE,
                "retry",
                &t.lang,
                Some(t.list),
            )
            .await
        }
    }
}

async fn unsubscribe_get(
    State(engine): State<Arc<Engine>>,
    Extension(st): Extension<Arc<LinkState>>,
    Extension(ip): Extension<ClientIp>,
    method: Method,
    headers: HeaderMap,
    Path(token): Path<String>,
) -> Response {
    let req = Req::new(&ip, &method, &headers);
    let t = match resolve(&engine, &st, &req, &token, Purpose::Unsubscribe).await {
        Ok((t, _)) => t,
        Err(page) => return page,
    };
    let (resp, hash) = st
        .page(
            &engine,
            StatusCode::OK,
            Page::Unsubscribe,
            &t.lang,
            Some(t.list),
            |_| String::new(),
        )
        .await;
    st.record_fetch(&engine, &t, &req, hash, "unsubscribe page fetched")
        .await;
    resp
}

/// Percent-decode one `application/x-www-form-urlencoded` component.
fn form_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                if let Some(v) = s
                    .get(i + 1..i + 3)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    out.push(v);
                    i += 2;
                } else {
                    out.push(b'%');
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Form fields of a POST body, urlencoded or multipart (RFC 8058 allows both).
pub fn form_fields(content_type: &str, body: &[u8]) -> HashMap<String, String> {
    let body = String::from_utf8_lossy(body);
    let ct = content_type.to_ascii_lowercase();
    let mut out = HashMap::new();
    if ct.starts_with("multipart/form-data") {
        let boundary = content_type
            .split(';')
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("boundary"))
            .map(|(_, v)| v.trim().trim_matches('"').to_owned());
        let Some(boundary) = boundary else {
            return out;
        };
        for part in body.split(&format!("--{boundary}")).skip(1) {
            if part.starts_with("--") {
                break;
            }
            let part = part.trim_start_matches(['\r', '\n']);
            let Some((head, value)) = part
                .split_once("\r\n\r\n")
                .or_else(|| part.split_once("\n\n"))
            else {
                continue;
            };
            let name = head
                .split([';', '\r', '\n'])
                .filter_map(|p| p.trim().strip_prefix("name="))
                .next()
                .map(|n| n.trim_matches('"').to_owned());
            if let Some(name) = name {
                let value = value
                    .strip_suffix("\r\n")
                    .or_else(|| value.strip_suffix('\n'))
                    .unwrap_or(value);
                out.insert(name, value.to_owned());
            }
        }
    } else {
        for pair in body.trim().split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            out.insert(form_decode(k), form_decode(v));
        }
    }
    out
}

async fn unsubscribe_post(
    State(engine): State<Arc<Engine>>,
    Extension(st): Extension<Arc<LinkState>>,
    Extension(ip): Extension<ClientIp>,
    headers: HeaderMap,
    Path(token): Path<String>,
    body: Bytes,
) -> Response {
    let req = Req::new(&ip, &Method::POST, &headers);
    let t = match resolve(&engine, &st, &req, &token, Purpose::Unsubscribe).await {
        Ok((t, _)) => t,
        Err(page) => return page,
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let fields = form_fields(content_type, &body);
    let one_click = fields.get("List-Unsubscribe").map(String::as_str) == Some("One-Click");
    let mut evidence = req.evidence(&t.claims.token_id);
    evidence.content_hash = fields.get("page").filter(|p| !p.is_empty()).cloned();
    evidence.detail = Some(
        if one_click {
            "RFC 8058 one-click unsubscribe"
        } else {
            "unsubscribe page"
        }
        .into(),
    );
    match engine
        .apply(&t.contact, t.list, Input::Unsubscribe, "web", evidence)
        .await
    {
        // No redirect (RFC 8058 §3.2): the answer is the page itself.
        Ok(_) => {
            st.page(
                &engine,
                StatusCode::OK,
                Page::Unsubscribed,
                &t.lang,
                Some(t.list),
                |_| String::new(),
            )
            .await
            .0
        }
        Err(e) => {
            tracing::error!(contact_id = %t.contact.id, error = %e, "unsubscribe could not be recorded");
            st.notice(
                &engine,
                StatusCode::SERVICE_UNAVAILABLE,
                "retry",
                &t.lang,
                Some(t.list),
            )
            .await
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn forwarded_for_only_from_trusted_proxies() {
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("203.0.113.9, 10.0.0.2"),
        );
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        let inner: IpAddr = "10.0.0.2".parse().unwrap();
        let other: IpAddr = "198.51.100.7".parse().unwrap();
        // Not trusted: the header is ignored.
        assert_eq!(client_ip(other, &h, &[proxy]), other);
        // Trusted chain: the right-most untrusted hop.
        assert_eq!(
            client_ip(proxy, &h, &[proxy, inner]),
            "203.0.113.9".parse::<IpAddr>().unwrap()
        );
        assert_eq!(client_ip(proxy, &h, &[proxy]), inner);
        // A garbage hop stops the walk at the last good address.
        h.insert("x-forwarded-for", HeaderValue::from_static("nonsense"));
        assert_eq!(client_ip(proxy, &h, &[proxy]), proxy);
    }

    #[test]
    fn both_form_encodings_are_read() {
        let f = form_fields(
            "application/x-www-form-urlencoded",
            b"List-Unsubscribe=One-Click",
        );
        assert_eq!(
            f.get("List-Unsubscribe").map(String::as_str),
            Some("One-Click")
        );
        let body = "--XyZ\r\nContent-Disposition: form-data; name=\"List-Unsubscribe\"\r\n\r\nOne-Click\r\n--XyZ--\r\n";
        let f = form_fields("multipart/form-data; boundary=XyZ", body.as_bytes());
        assert_eq!(
            f.get("List-Unsubscribe").map(String::as_str),
            Some("One-Click")
        );
        let f = form_fields("application/x-www-form-urlencoded", b"page=a%2Bb+c&x");
        assert_eq!(f.get("page").map(String::as_str), Some("a+b c"));
    }
}
