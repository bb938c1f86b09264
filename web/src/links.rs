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
//! * An unsubscribe link that cannot be honoured gets a page offering another way out
//!   (`[sender] unsubscribe_mailbox`), never a bare "not valid".

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
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use optinsync_engine::config::ListConfig;
use optinsync_engine::consent::{ConsentState, Input};
use optinsync_engine::engine::{Applied, Engine};
use optinsync_engine::ledger::{Evidence, NewEvent};
use optinsync_engine::mail;
use optinsync_engine::store::{Contact, Snapshot};
use optinsync_engine::templates::{Page, RenderedPage};
use optinsync_engine::tokens::{Claims, Purpose, TokenError};

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
    global_limiter: DefaultDirectRateLimiter,
    /// `scheme://host[:port]` of `server.public_url`, as browsers send it in `Origin`.
    public_origin: String,
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

/// The key a client is rate-limited under: an IPv4 address, or the /64 of an IPv6 address
/// (one subscriber line gets a whole /64, so the full address would limit nothing).
pub fn rate_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(std::net::Ipv6Addr::from(bits))
        }
        v4 => v4,
    }
}

/// `scheme://host[:port]` of a URL, lower-case, without the scheme's default port: the form
/// browsers send in `Origin`.
pub fn origin_of(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let scheme = scheme.to_ascii_lowercase();
    let authority = rest
        .split(['/', '?', '#'])
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    let authority = match (scheme.as_str(), authority.rsplit_once(':')) {
        ("https", Some((host, "443"))) | ("http", Some((host, "80"))) => host.to_owned(),
        _ => authority,
    };
    format!("{scheme}://{authority}")
}

/// The client of a request: [`client_ip`] of the connection's peer (`ConnectInfo`) and the
/// request's `X-Forwarded-For`.
pub fn request_client(req: &Request, trusted: &[IpAddr]) -> IpAddr {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    client_ip(peer, req.headers(), trusted)
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
            engine.settings().server.max_body_bytes,
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
    let ip = request_client(&req, &st.trusted);
    if st.ip_limiter.len() > 10_000 {
        st.ip_limiter.retain_recent();
        st.fetch_limiter.retain_recent();
        st.resend_limiter.retain_recent();
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
    match engine.reads().contact_by_id(&claims.contact_id).await {
        Ok(Some(contact)) => {
            let lang = engine
                .config()
                .templates
                .language_for(contact.language.as_deref(), &list.default_language);
            Lookup::Found(Box::new(Target {
                claims,
                contact,
                list,
                lang,
                consent: None,
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
        let state = t.state();
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
    engine
        .tokens()
        .verify(token, purpose, Utc::now().timestamp())
}

/// What the mail that carried a link recorded about itself.
#[derive(Debug, Default)]
struct Mailed {
    message_id: Option<String>,
    content_hash: Option<String>,
}

/// Whether a link's token id went out in a mail to this contact for this list.
enum Binding {
    Mailed(Mailed),
    /// An unsubscribe link, and this list has mails from before unsubscribe token ids were
    /// recorded: honoured on its signature alone.
    Legacy,
    NotMailed,
}

async fn binding(
    engine: &Engine,
    t: &Target<'_>,
) -> Result<Binding, optinsync_engine::store::StoreError> {
    let events = engine.reads().events_of_contact(&t.contact.id).await?;
    let mut legacy = false;
    for e in events
        .iter()
        .rev()
        .filter(|e| e.list_id == t.list.id && e.kind.ends_with("_mail_sent"))
    {
        let ev = e.evidence();
        let mailed_id = match t.claims.purpose {
            Purpose::Confirm => ev.token_id.as_deref(),
            Purpose::Unsubscribe => ev.unsubscribe_token_id.as_deref(),
        };
        if mailed_id == Some(t.claims.token_id.as_str()) {
            return Ok(Binding::Mailed(Mailed {
                message_id: ev.message_id,
                content_hash: ev.content_hash,
            }));
        }
        legacy |= t.claims.purpose == Purpose::Unsubscribe && ev.unsubscribe_token_id.is_none();
    }
    Ok(if legacy {
        Binding::Legacy
    } else {
        Binding::NotMailed
    })
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
            Purpose::Unsubscribe => "unsubscribe_invalid",
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
    let mut t = match lookup(engine, claims).await {
        Lookup::Found(t) => t,
        Lookup::Invalid => {
            metrics::counter!("optinsync_link_refused_total", "reason" => "unknown_contact")
                .increment(1);
            return Err(invalid().await);
        }
        Lookup::Unavailable => return Err(unavailable().await),
    };
    match engine.reads().consent(&t.contact.id, &t.list.id).await {
        Ok(c) => t.consent = c,
        Err(e) => {
            tracing::error!(contact_id = %t.contact.id, error = %e, "link lookup failed");
            return Err(unavailable().await);
        }
    }
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
    let (t, expired, _) = match resolve(&engine, &st, &req, &token, Purpose::Confirm).await {
        Ok(found) => found,
        Err(page) => return page,
    };
    // After the fact the page says what happened instead of offering the button again.
    let settled = match standing(&t, expired) {
        Standing::Open => None,
        Standing::AlreadyConfirmed => Some("already_confirmed"),
        Standing::Closed => Some("refused"),
    };
    if let Some(notice) = settled {
        let status = if notice == "refused" {
            StatusCode::CONFLICT
        } else {
            StatusCode::OK
        };
        let (resp, hash) = st
            .list_page(&engine, &t, status, Page::Notice(notice))
            .await;
        st.record_fetch(
            &engine,
            &t,
            &req,
            hash,
            "confirmation link fetched after the fact",
        )
        .await;
        return resp;
    }
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

async fn confirm_post(
    State(engine): State<Arc<Engine>>,
    Extension(st): Extension<Arc<LinkState>>,
    Extension(ip): Extension<ClientIp>,
    headers: HeaderMap,
    Path(token): Path<String>,
    form: Result<Form<HashMap<String, String>>, FormRejection>,
) -> Response {
    let req = Req::new(&ip, &Method::POST, &headers);
    let now = Utc::now().timestamp();
    let (t, expired, mailed) = match resolve(&engine, &st, &req, &token, Purpose::Confirm).await {
        Ok(found) => found,
        Err(page) => return page,
    };
    if let Some(why) = cross_site(&headers, &st.public_origin) {
        metrics::counter!("optinsync_link_refused_total", "reason" => "cross_site").increment(1);
        tracing::info!(contact_id = %t.contact.id, why, "confirmation POST from another site refused");
        return st
            .notice(
                &engine,
                StatusCode::FORBIDDEN,
                "cross_site",
                &t.lang,
                Some(t.list),
            )
            .await;
    }
    let form = match form {
        Ok(f) => f.0,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return st
                .notice(
                    &engine,
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    &t.lang,
                    Some(t.list),
                )
                .await;
        }
        Err(_) => HashMap::new(),
    };
    let field = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
    // A link whose signup is settled answers as the state machine would, without a page's
    // nonce: pressing again after confirming (or a stale tab) changes nothing and says so, and
    // a link that can no longer confirm (withdrawn since, replaced) says that.
    match standing(&t, expired) {
        Standing::Open => {}
        Standing::AlreadyConfirmed => return st.confirmed(&engine, &t).await,
        Standing::Closed => {
            return st
                .notice(
                    &engine,
                    StatusCode::CONFLICT,
                    "refused",
                    &t.lang,
                    Some(t.list),
                )
                .await;
        }
    }
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
    // The confirmation names the mail that carried the link; a link whose mail is not on
    // record (yet) confirms nothing.
    let mailed = match mailed {
        Some(m) => m,
        None => match binding(&engine, &t).await {
            Ok(Binding::Mailed(m)) => m,
            Ok(_) => {
                metrics::counter!("optinsync_link_refused_total", "reason" => "not_mailed")
                    .increment(1);
                return st
                    .notice(
                        &engine,
                        StatusCode::BAD_REQUEST,
                        "invalid",
                        &t.lang,
                        Some(t.list),
                    )
                    .await;
            }
            Err(e) => {
                tracing::error!(contact_id = %t.contact.id, error = %e, "link lookup failed");
                return st
                    .notice(
                        &engine,
                        StatusCode::SERVICE_UNAVAILABLE,
                        "retry",
                        &t.lang,
                        Some(t.list),
                    )
                    .await;
            }
        },
    };
    let mut evidence = req.evidence(&t.claims.token_id);
    evidence.content_hash = Some(page_hash.to_owned());
    evidence.message_id = mailed.message_id;
    evidence.mail_content_hash = mailed.content_hash;
    let input = Input::Confirm {
        token: t.claims.token_id.clone(),
    };
    match engine
        .apply(&t.contact, t.list, input, "web", evidence)
        .await
    {
        Ok(Applied::Changed(_)) | Ok(Applied::Unchanged) => st.confirmed(&engine, &t).await,
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

/// Where a confirmation link's signup stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Standing {
    /// Waiting for this link's confirmation (or expired: its page offers a fresh mail).
    Open,
    /// Confirmed through this very link.
    AlreadyConfirmed,
    /// Withdrawn since, replaced by a newer signup, or never waiting: it can confirm nothing.
    Closed,
}

/// What the state machine would make of this link's confirmation now (a dry run of
/// `Input::Confirm`, so the page never disagrees with what the `POST` would do).
fn standing(t: &Target<'_>, expired: bool) -> Standing {
    let now = Utc::now();
    let current = t
        .consent
        .clone()
        .unwrap_or_else(|| optinsync_engine::consent::Consent::new(now));
    let input = Input::Confirm {
        token: t.claims.token_id.clone(),
    };
    match optinsync_engine::engine::transition_for(&current, &input, t.list, false, now) {
        Ok(Some(_)) => Standing::Open,
        Ok(None) => Standing::AlreadyConfirmed,
        // An expired link offers a fresh mail whatever became of its signup.
        Err(_) if expired => Standing::Open,
        Err(_) => Standing::Closed,
    }
}

/// Why a confirm `POST` comes from another site, if it does: an `Origin` other than the
/// public URL's, or the browser's own `Sec-Fetch-Site: cross-site`. `Origin: null` says
/// nothing (our pages' `Referrer-Policy: no-referrer` makes browsers send it for our own
/// button), and requests without either header (older browsers, privacy tools) are judged by
/// the page nonce alone, as before.
pub fn cross_site(headers: &HeaderMap, public_origin: &str) -> Option<&'static str> {
    let text = |h| headers.get(h).and_then(|v: &HeaderValue| v.to_str().ok());
    if text("sec-fetch-site").is_some_and(|v| v.trim().eq_ignore_ascii_case("cross-site")) {
        return Some("Sec-Fetch-Site: cross-site");
    }
    match headers
        .get(header::ORIGIN)
        .map(|v| v.to_str().map(str::trim))
    {
        None | Some(Ok("null")) => None,
        Some(Ok(o)) if origin_of(o) == public_origin => None,
        Some(_) => Some("Origin is not the public URL's"),
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
        Ok((t, _, _)) => t,
        Err(page) => return page,
    };
    let (resp, hash) = st
        .list_page(&engine, &t, StatusCode::OK, Page::Unsubscribe)
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
        Ok((t, _, _)) => t,
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
            st.list_page(&engine, &t, StatusCode::OK, Page::Unsubscribed)
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
