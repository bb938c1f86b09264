//! The public link endpoints: `/confirm/{token}` and `/unsubscribe/{token}`.
//!
//! * `GET`/`HEAD` never change consent (an architecture invariant). They render the page (from the
//!   templates, in the contact's language) and record a `link_fetched` evidence event, at most
//!   a few per token per hour, so a scanner cannot flood the ledger.
//! * The confirm page's button POSTs a per-page nonce: an HMAC over the token id, the page's
//!   snapshot hash and the time, so no server state is needed and only a POST from a page we
//!   served (within a day) confirms. Repeated POSTs are idempotent.
//! * An expired confirmation link shows a page offering a fresh mail; its POST starts a new
//!   signup (`Input::PersonSignup`), rate-limited per contact and list.
//! * `POST /unsubscribe/{token}` withdraws at once: RFC 8058 one-click (form-urlencoded or
//!   multipart), or the button of the unsubscribe page. No cookies, no redirect, `200`.
//! * Every response carries security headers; requests are rate-limited per client (an IPv4
//!   address or an IPv6 /64, taking `X-Forwarded-For` only from `server.trusted_proxies`) and
//!   all clients together (`server.global_rate_limit_per_second`), and bodies are size-limited.
//! * A link is honoured only if it was mailed: its token id must be in the ledger's record of
//!   a sent mail for that contact and list (`*_mail_sent`), so a leaked signing key alone
//!   forges nothing and a made-up token id cannot grow the ledger. Unsubscribe links of mails
//!   sent before their token id was recorded are honoured on their signature, as before.
//! * A confirm `POST` from another site (`Origin` not the public URL's, or `Sec-Fetch-Site:
//!   cross-site`) is refused; an unsubscribe `POST` is not checked so, because RFC 8058
//!   one-click requests come from mailbox providers' servers.
//! * `/signup/{list}` ([`signup`]) takes website signups behind the same guard, with its own
//!   per-client and per-address limits, and answers alike whatever the address's state.
//! * An unsubscribe link that cannot be honoured gets a page offering another way out
//!   (`[sender] unsubscribe_mailbox`), never a bare "not valid".

use std::collections::HashSet;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::Utc;
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use optinsync_engine::config::ListConfig;
use optinsync_engine::consent::ConsentState;
use optinsync_engine::engine::Engine;
use optinsync_engine::ledger::{EventSource, Evidence, NewEvent};
use optinsync_engine::mail;
use optinsync_engine::store::{Contact, Snapshot};
use optinsync_engine::templates::{Page, RenderedPage};
use optinsync_engine::tokens::{Claims, Purpose, TokenError};

mod binding;
mod client;
mod confirm;
mod preferences;
pub mod signup;
mod unsubscribe;

use binding::{Binding, Mailed, Standing, binding, standing};
pub use client::{
    ClientIp, client_ip, cross_site, origin_of, rate_key, request_client, trusted_proxies,
};
use confirm::{confirm_get, confirm_post};
pub use unsubscribe::form_fields;
use unsubscribe::{unsubscribe_get, unsubscribe_post};

/// How long a served confirm page's button stays usable.
pub const NONCE_TTL_SECS: i64 = 86_400;
const NONCE_CONFIRM: &str = "confirm";
const NONCE_RESEND: &str = "resend";

/// Security headers on every page.
const CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; \
                   frame-ancestors 'none'; base-uri 'none'";

/// Limiters and keys of the link endpoints (one per server).
pub struct LinkState {
    ip_limiter: DefaultKeyedRateLimiter<IpAddr>,
    global_limiter: DefaultDirectRateLimiter,
    /// `scheme://host[:port]` of `server.public_url`, as browsers send it in `Origin`.
    public_origin: String,
    fetch_limiter: DefaultKeyedRateLimiter<String>,
    resend_limiter: DefaultKeyedRateLimiter<String>,
    nonce_key: Vec<u8>,
    trusted: Vec<IpAddr>,
    stored: Mutex<HashSet<String>>,
    signup: signup::SignupState,
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
        let server = &engine.settings().server;
        let per_ip =
            NonZeroU32::new(server.rate_limit_per_minute.max(1)).unwrap_or(NonZeroU32::MIN);
        let burst3 = NonZeroU32::new(3).unwrap_or(NonZeroU32::MIN);
        let nonce_key = hmac(
            engine.settings().tokens.secret.as_bytes(),
            &["optinsync page nonce key v1"],
        )
        .finalize()
        .into_bytes()
        .to_vec();
        let global =
            NonZeroU32::new(server.global_rate_limit_per_second.max(1)).unwrap_or(NonZeroU32::MIN);
        Self {
            ip_limiter: RateLimiter::keyed(Quota::per_minute(per_ip)),
            global_limiter: RateLimiter::direct(Quota::per_second(global)),
            public_origin: origin_of(&server.public_url),
            // At most 3 `link_fetched` events at once per token, then one per 6 minutes.
            fetch_limiter: RateLimiter::keyed(
                Quota::with_period(Duration::from_secs(360))
                    .unwrap_or_else(|| Quota::per_hour(NonZeroU32::MIN))
                    .allow_burst(burst3),
            ),
            // One fresh confirmation mail per contact and list per hour.
            resend_limiter: RateLimiter::keyed(Quota::per_hour(NonZeroU32::MIN)),
            nonce_key,
            trusted: trusted_proxies(server),
            stored: Mutex::new(HashSet::new()),
            signup: signup::SignupState::new(&engine.settings().signup),
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

/// The routes, with their limits and headers; merged into [`crate::http::router`].
pub fn routes(engine: &Engine) -> Router<Arc<Engine>> {
    let state = Arc::new(LinkState::new(engine));
    Router::new()
        .route("/confirm/{token}", get(confirm_get).post(confirm_post))
        .route(
            "/unsubscribe/{token}",
            get(unsubscribe_get).post(unsubscribe_post),
        )
        .route(
            "/preferences",
            get(preferences::request_get).post(preferences::request_post),
        )
        .route(
            "/preferences/{token}",
            get(preferences::preferences_get).post(preferences::preferences_post),
        )
        .route(
            "/signup/{list}",
            get(signup::signup_get)
                .post(signup::signup_post)
                .options(signup::signup_options),
        )
        .layer(middleware::from_fn_with_state(Arc::clone(&state), guard))
        .layer(DefaultBodyLimit::max(
            engine.settings().server.max_body_bytes,
        ))
        .layer(Extension(state))
}

/// Count a confirmation or unsubscribe the person sent (`action`), by what the engine did.
fn count_action(
    action: &'static str,
    applied: &optinsync_engine::engine::EngineResult<optinsync_engine::engine::Applied>,
) {
    use optinsync_engine::engine::Applied;
    let result = match applied {
        Ok(Applied::Changed(_)) => "changed",
        Ok(Applied::Unchanged) => "unchanged",
        Ok(Applied::Refused(_)) => "refused",
        Err(_) => "failed",
    };
    metrics::counter!("optinsync_link_actions_total", "action" => action, "result" => result)
        .increment(1);
}

/// The pages' security headers with the policy `csp` (the console has its own).
pub fn set_security_headers(headers: &mut HeaderMap, csp: &'static str) {
    for (name, value) in [
        (header::CONTENT_SECURITY_POLICY, csp),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
}

async fn guard(State(st): State<Arc<LinkState>>, mut req: Request, next: Next) -> Response {
    let ip = request_client(&req, &st.trusted);
    if st.ip_limiter.len() > 10_000 {
        st.ip_limiter.retain_recent();
        st.fetch_limiter.retain_recent();
        st.resend_limiter.retain_recent();
        st.signup.retain_recent();
    }
    let limited = if st.ip_limiter.check_key(&rate_key(ip)).is_err() {
        Some("client")
    } else if st.global_limiter.check().is_err() {
        Some("global")
    } else {
        None
    };
    let mut resp = if let Some(limit) = limited {
        tracing::debug!(%ip, limit, "rate limit: request refused");
        metrics::counter!("optinsync_http_rate_limited_total", "limit" => limit).increment(1);
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
    set_security_headers(resp.headers_mut(), CSP);
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
    /// The consent as read when the link was resolved (one read serves every check).
    consent: Option<optinsync_engine::consent::Consent>,
}

impl Target<'_> {
    fn state(&self) -> ConsentState {
        self.consent
            .as_ref()
            .map(|c| c.state)
            .unwrap_or(ConsentState::None)
    }

    /// The link is this consent's current signup token or the one it was confirmed with:
    /// the engine made that token for a mail, so no look-up of the mail is needed to trust it.
    fn is_current_signup(&self) -> bool {
        let id = Some(self.claims.token_id.as_str());
        self.consent
            .as_ref()
            .is_some_and(|c| c.signup_token.as_deref() == id || c.confirmed_token.as_deref() == id)
    }
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
    match engine
        .reads()
        .contact_with_consent(&claims.contact_id, &list.id)
        .await
    {
        Ok(Some((contact, consent))) => {
            let lang = engine
                .config()
                .templates
                .language_for(contact.language.as_deref(), &list.default_language);
            Lookup::Found(Box::new(Target {
                claims,
                contact,
                list,
                lang,
                consent,
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
    engine.config().templates.language_for(browser, default)
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
        self.page_of(engine, status, page, lang, list, &[], nonce)
            .await
    }

    /// [`LinkState::page`] showing the person's lists (the preference centre).
    #[allow(clippy::too_many_arguments)]
    async fn page_of(
        &self,
        engine: &Engine,
        status: StatusCode,
        page: Page,
        lang: &str,
        list: Option<&ListConfig>,
        lists: &[optinsync_engine::templates::ListChoice],
        nonce: impl Fn(&str) -> String,
    ) -> (Response, Option<String>) {
        let sender = &engine.settings().sender;
        let common = match list {
            Some(l) => mail::common(l, sender),
            None => optinsync_engine::templates::Common {
                organisation: sender.organisation.clone(),
                postal_address: sender.postal_address.clone(),
                unsubscribe_mailbox: sender.unsubscribe_mailbox.clone().unwrap_or_default(),
                ..Default::default()
            },
        };
        let templates = &engine.config().templates;
        let rendered: RenderedPage = match templates
            .render_page_of(page, lang, &common, lists, nonce)
        {
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
            if let Err(e) = engine.record_snapshot(&snap).await {
                tracing::error!(error = %e, "page snapshot not stored");
                if let Ok(mut s) = self.stored.lock() {
                    s.remove(&rendered.content_hash);
                }
            }
        }
        let hash = rendered.content_hash.clone();
        ((status, Html(rendered.html)).into_response(), Some(hash))
    }

    /// A page about `t`'s list without a form, and its snapshot hash.
    async fn list_page(
        &self,
        engine: &Engine,
        t: &Target<'_>,
        status: StatusCode,
        page: Page,
    ) -> (Response, Option<String>) {
        self.page(engine, status, page, &t.lang, Some(t.list), |_| {
            String::new()
        })
        .await
    }

    /// The "you are subscribed" page.
    async fn confirmed(&self, engine: &Engine, t: &Target<'_>) -> Response {
        self.list_page(engine, t, StatusCode::OK, Page::Confirmed)
            .await
            .0
    }

    /// 503 "try again in a moment" on a link's page: the store failed, nothing changed.
    async fn retry_later(&self, engine: &Engine, t: &Target<'_>) -> Response {
        self.notice(
            engine,
            StatusCode::SERVICE_UNAVAILABLE,
            "retry",
            &t.lang,
            Some(t.list),
        )
        .await
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

    /// Record a GET/HEAD as evidence that changes no state, a few times per token at most,
    /// without waiting for the commit.
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
        let state = t.state();
        let mut evidence = req.evidence(&t.claims.token_id);
        evidence.content_hash = page_hash;
        evidence.detail = Some(detail.to_owned());
        let event = NewEvent {
            // Time-ordered, as every event id: appended to the ledger's unique index of
            // event ids rather than written into a random page of it.
            event_id: uuid::Uuid::now_v7().to_string(),
            at: Utc::now(),
            contact_id: t.contact.id.clone(),
            list_id: t.list.id.clone(),
            kind: "link_fetched".into(),
            from_state: state,
            to_state: state,
            source: EventSource::Web,
            evidence,
        };
        // The page does not wait for this record's commit (an fsync): the writer takes it
        // with its next batch, and the daemon flushes queued writes before it exits.
        engine.append_event_detached(event).await;
    }
}

fn verify(engine: &Engine, token: &str, purpose: Purpose) -> Result<Claims, TokenError> {
    engine
        .tokens()
        .verify(token, purpose, Utc::now().timestamp())
}

/// Verify `token` for `purpose`, find what it names and check that it was mailed; `Err` is
/// the page to answer with (a link that cannot be honoured, or the store unavailable). An
/// expired *confirmation* link is still resolved and flagged, because its page offers a fresh
/// mail; unsubscribe links never expire. Every refusal answers the same page, so the answer
/// tells a forger nothing about which check failed. The mail record (`Some`) is read only
/// when the link is not the consent's current signup token (see
/// [`Target::is_current_signup`]): the hot path of a confirmation costs no extra read.
async fn resolve<'e>(
    engine: &'e Engine,
    st: &LinkState,
    req: &Req,
    token: &str,
    purpose: Purpose,
) -> Result<(Box<Target<'e>>, bool, Option<Mailed>), Response> {
    let invalid = || async {
        let lang = fallback_lang(engine, req);
        let notice = match purpose {
            Purpose::Confirm => "invalid",
            Purpose::Unsubscribe | Purpose::Preferences => "unsubscribe_invalid",
        };
        st.notice(engine, StatusCode::BAD_REQUEST, notice, &lang, None)
            .await
    };
    let unavailable = || async {
        let lang = fallback_lang(engine, req);
        st.notice(
            engine,
            StatusCode::SERVICE_UNAVAILABLE,
            "retry",
            &lang,
            None,
        )
        .await
    };
    let (claims, expired) = match verify(engine, token, purpose) {
        Ok(c) => (c, false),
        Err(TokenError::Expired(c)) if purpose == Purpose::Confirm => (*c, true),
        Err(e) => {
            metrics::counter!("optinsync_link_refused_total", "reason" => token_error_label(&e))
                .increment(1);
            return Err(invalid().await);
        }
    };
    let t = match lookup(engine, claims).await {
        Lookup::Found(t) => t,
        Lookup::Invalid => {
            metrics::counter!("optinsync_link_refused_total", "reason" => "unknown_contact")
                .increment(1);
            return Err(invalid().await);
        }
        Lookup::Unavailable => return Err(unavailable().await),
    };
    if purpose == Purpose::Confirm && t.is_current_signup() {
        return Ok((t, expired, None));
    }
    match binding(engine, &t).await {
        Ok(Binding::Mailed(m)) => Ok((t, expired, Some(m))),
        Ok(Binding::Legacy) => Ok((t, expired, Some(Mailed::default()))),
        Ok(Binding::NotMailed) => {
            metrics::counter!("optinsync_link_refused_total", "reason" => "not_mailed")
                .increment(1);
            tracing::warn!(contact_id = %t.contact.id, list = %t.list.id, "link with a valid signature but a token id never mailed refused (a leaked or misused key?)");
            Err(invalid().await)
        }
        Err(e) => {
            tracing::error!(contact_id = %t.contact.id, error = %e, "link lookup failed");
            Err(unavailable().await)
        }
    }
}

fn token_error_label(e: &TokenError) -> &'static str {
    match e {
        TokenError::Malformed => "malformed",
        TokenError::UnknownKey => "unknown_key",
        TokenError::BadSignature => "bad_signature",
        TokenError::WrongPurpose => "wrong_purpose",
        TokenError::Expired(_) => "expired",
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

    /// F8: an IPv6 client is limited by its /64, an IPv4 one by its address.
    #[test]
    fn f8_ipv6_clients_are_keyed_by_their_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff:ffff:ffff:ffff".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(rate_key(a), rate_key(b));
        assert_eq!(rate_key(a), "2001:db8:1:2::".parse::<IpAddr>().unwrap());
        assert_ne!(rate_key(a), rate_key(other));
        let v4: IpAddr = "203.0.113.9".parse().unwrap();
        assert_eq!(rate_key(v4), v4);
        let mapped: IpAddr = "::ffff:203.0.113.9".parse().unwrap();
        assert_eq!(rate_key(mapped), v4);
    }

    /// F7: what counts as a POST from another site.
    #[test]
    fn f7_cross_site_confirm_posts_are_recognised() {
        let public = origin_of("https://Links.Example.org:443/optinsync");
        assert_eq!(public, "https://links.example.org");
        assert_eq!(origin_of("http://127.0.0.1:8080"), "http://127.0.0.1:8080");
        let with = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, HeaderValue::from_static(v));
            }
            h
        };
        assert_eq!(cross_site(&with(&[]), &public), None);
        assert_eq!(
            cross_site(&with(&[("origin", "https://links.example.org")]), &public),
            None
        );
        assert_eq!(cross_site(&with(&[("origin", "null")]), &public), None);
        assert_eq!(
            cross_site(&with(&[("sec-fetch-site", "same-origin")]), &public),
            None
        );
        assert!(cross_site(&with(&[("origin", "http://evil.example")]), &public).is_some());
        assert!(cross_site(&with(&[("origin", "http://links.example.org")]), &public).is_some());
        assert!(
            cross_site(
                &with(&[
                    ("origin", "https://links.example.org"),
                    ("sec-fetch-site", "cross-site")
                ]),
                &public
            )
            .is_some()
        );
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
