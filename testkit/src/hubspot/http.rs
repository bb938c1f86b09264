//! Request dispatch and the gate every API call passes: bearer token, scopes, the daily,
//! burst and search limits, injected faults, the `X-HubSpot-RateLimit-*` headers and the
//! request log; plus the OAuth token endpoint.
//!
//! Inferred (HubSpot's documentation gives no body for it): OAuth refresh errors answer 400
//! `{"status": "BAD_REFRESH_TOKEN" | "BAD_CLIENT_ID" | "BAD_GRANT_TYPE", "message": ...}`.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use serde_json::{Value, json};

use super::{
    Fault, HubSpotState, LoggedRequest, RateHeaders, Token, contacts, prefs, scopes, search,
};

pub(crate) type Shared = Arc<Mutex<HubSpotState>>;

pub(crate) fn lock(state: &Shared) -> MutexGuard<'_, HubSpotState> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// An answer before rendering.
#[derive(Debug)]
pub(crate) struct Reply {
    pub status: u16,
    pub body: Value,
}

impl Reply {
    pub fn ok(body: Value) -> Reply {
        Reply { status: 200, body }
    }
    pub fn new(status: u16, body: Value) -> Reply {
        Reply { status, body }
    }
}

/// A random UUID (for `correlationId`).
pub(crate) fn uuid() -> String {
    let b: [u8; 16] = rand::random();
    let h = hex::encode(b);
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

/// HubSpot's error envelope.
pub(crate) fn error(status: u16, category: &str, message: &str) -> Reply {
    Reply::new(
        status,
        json!({"status": "error", "message": message, "correlationId": uuid(), "category": category}),
    )
}

/// The error envelope with `errors[]` (and optional `context`).
pub(crate) fn error_with(
    status: u16,
    category: &str,
    message: &str,
    errors: Vec<Value>,
    context: Option<Value>,
) -> Reply {
    let mut r = error(status, category, message);
    r.body["errors"] = Value::Array(errors);
    if let Some(c) = context {
        r.body["context"] = c;
    }
    r
}

/// Query-string pairs, percent-decoded, in order.
#[derive(Debug, Default)]
pub(crate) struct Query(pub Vec<(String, String)>);

impl Query {
    pub fn parse(text: &str) -> Query {
        Query(
            text.split('&')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap_or((p, ""));
                    (decode(k, true), decode(v, true))
                })
                .collect(),
        )
    }
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
    /// Every value of a repeatable, comma-separable parameter (`properties=a,b&properties=c`).
    pub fn list(&self, key: &str) -> Option<Vec<String>> {
        let vals: Vec<String> = self
            .0
            .iter()
            .filter(|(k, _)| k == key)
            .flat_map(|(_, v)| v.split(',').map(|x| x.trim().to_owned()))
            .filter(|x| !x.is_empty())
            .collect();
        (!vals.is_empty()).then_some(vals)
    }
}

/// Percent-decoding (`+` as space in forms and query strings).
pub(crate) fn decode(s: &str, plus_is_space: bool) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' if plus_is_space => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub(crate) fn router(state: Shared) -> Router {
    Router::new()
        .fallback(handle)
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            random_fault,
        ))
        .with_state(state)
}

async fn random_fault(
    State(state): State<Shared>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let endpoint = crate::faults::endpoint_of(&req);
    let (fault, slow) = {
        let mut s = lock(&state);
        match s.random_faults.as_mut() {
            Some(plan) => (plan.roll(&endpoint), plan.slow),
            None => (None, Duration::ZERO),
        }
    };
    crate::faults::apply(fault, slow, req, next).await
}

/// What a request asks for.
#[derive(Debug, Clone)]
pub(crate) enum Op {
    Token { v3: bool },
    ContactsList,
    ContactCreate,
    ContactGet(String),
    ContactPatch(String),
    ContactArchive(String),
    Batch(String),
    Search,
    GdprDelete,
    PropertiesList,
    PropertyGet(String),
    V3Definitions,
    V3Status(String),
    V3Subscribe,
    V3Unsubscribe,
    V4Definitions,
    V4Status(String),
    V4SetStatus(String),
    V4UnsubscribeAllRead(String),
    V4UnsubscribeAll(String),
}

/// Route: the operation, its log label, and the scopes of which one is needed.
struct Route {
    op: Op,
    endpoint: String,
    needs: &'static [&'static str],
    search: bool,
}

fn is_dated(v: &str) -> bool {
    let b = v.as_bytes();
    b.len() == 7
        && b[4] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || c.is_ascii_digit())
}

const READ: &[&str] = &[scopes::CONTACTS_READ];
const WRITE: &[&str] = &[scopes::CONTACTS_WRITE];
const SCHEMAS: &[&str] = &[scopes::SCHEMAS_READ];
const PREFS_READ: &[&str] = &[scopes::PREFS_READ, scopes::PREFS_READ_WRITE];
const PREFS_WRITE: &[&str] = &[scopes::PREFS_WRITE, scopes::PREFS_READ_WRITE];

/// `Err(true)`: the path exists for another method (405); `Err(false)`: unknown path (404).
fn route(method: &Method, path: &str) -> Result<Route, bool> {
    let segs: Vec<String> = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| decode(s, false))
        .collect();
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let m = method.as_str();
    let r = |op: Op, label: &str, needs: &'static [&'static str]| Route {
        op,
        endpoint: format!("{m} {label}"),
        needs,
        search: false,
    };
    const C: &str = "/crm/v3/objects/contacts";
    let contacts_rest = match segs.as_slice() {
        ["crm", "v3", "objects", "contacts", rest @ ..] => Some(rest),
        ["crm", "objects", v, "contacts", rest @ ..] if is_dated(v) => Some(rest),
        _ => None,
    };
    if let Some(rest) = contacts_rest {
        return match (m, rest) {
            ("GET", []) => Ok(r(Op::ContactsList, C, READ)),
            ("POST", []) => Ok(r(Op::ContactCreate, C, WRITE)),
            ("POST", ["search"]) => Ok(Route {
                search: true,
                ..r(Op::Search, &format!("{C}/search"), READ)
            }),
            ("POST", ["gdpr-delete"]) => Ok(r(Op::GdprDelete, &format!("{C}/gdpr-delete"), WRITE)),
            ("POST", ["batch", op]) if *op == "read" => Ok(r(
                Op::Batch((*op).to_owned()),
                &format!("{C}/batch/{op}"),
                READ,
            )),
            ("POST", ["batch", op]) if ["update", "upsert", "create", "archive"].contains(op) => {
                Ok(r(
                    Op::Batch((*op).to_owned()),
                    &format!("{C}/batch/{op}"),
                    WRITE,
                ))
            }
            ("GET", [id]) if !["search", "batch", "gdpr-delete"].contains(id) => Ok(r(
                Op::ContactGet((*id).to_owned()),
                &format!("{C}/{{contactId}}"),
                READ,
            )),
            ("PATCH", [id]) => Ok(r(
                Op::ContactPatch((*id).to_owned()),
                &format!("{C}/{{contactId}}"),
                WRITE,
            )),
            ("DELETE", [id]) => Ok(r(
                Op::ContactArchive((*id).to_owned()),
                &format!("{C}/{{contactId}}"),
                WRITE,
            )),
            (_, [] | [_] | ["batch", _]) => Err(true),
            _ => Err(false),
        };
    }
    const P: &str = "/crm/v3/properties/contacts";
    let props_rest = match segs.as_slice() {
        ["crm", "v3", "properties", "contacts", rest @ ..] => Some(rest),
        ["crm", "properties", v, "contacts", rest @ ..] if is_dated(v) => Some(rest),
        _ => None,
    };
    if let Some(rest) = props_rest {
        return match (m, rest) {
            ("GET", []) => Ok(r(Op::PropertiesList, P, SCHEMAS)),
            ("GET", [name]) => Ok(r(
                Op::PropertyGet((*name).to_owned()),
                &format!("{P}/{{propertyName}}"),
                SCHEMAS,
            )),
            (_, [] | [_]) => Err(true),
            _ => Err(false),
        };
    }
    const V3: &str = "/communication-preferences/v3";
    match (m, segs.as_slice()) {
        ("GET", ["communication-preferences", "v3", "definitions"]) => {
            return Ok(r(
                Op::V3Definitions,
                &format!("{V3}/definitions"),
                PREFS_READ,
            ));
        }
        ("GET", ["communication-preferences", "v3", "status", "email", email]) => {
            return Ok(r(
                Op::V3Status((*email).to_owned()),
                &format!("{V3}/status/email/{{emailAddress}}"),
                PREFS_READ,
            ));
        }
        ("POST", ["communication-preferences", "v3", "subscribe"]) => {
            return Ok(r(Op::V3Subscribe, &format!("{V3}/subscribe"), PREFS_WRITE));
        }
        ("POST", ["communication-preferences", "v3", "unsubscribe"]) => {
            return Ok(r(
                Op::V3Unsubscribe,
                &format!("{V3}/unsubscribe"),
                PREFS_WRITE,
            ));
        }
        (_, ["communication-preferences", "v3", ..]) => return Err(false),
        _ => {}
    }
    const V4: &str = "/communication-preferences/v4";
    let v4_rest = match segs.as_slice() {
        ["communication-preferences", v, rest @ ..] if *v == "v4" || is_dated(v) => Some(rest),
        _ => None,
    };
    if let Some(rest) = v4_rest {
        return match (m, rest) {
            ("GET", ["definitions"]) => Ok(r(
                Op::V4Definitions,
                &format!("{V4}/definitions"),
                PREFS_READ,
            )),
            ("GET", ["statuses", id]) => Ok(r(
                Op::V4Status((*id).to_owned()),
                &format!("{V4}/statuses/{{subscriberIdString}}"),
                PREFS_READ,
            )),
            ("POST", ["statuses", id]) if *id != "batch" => Ok(r(
                Op::V4SetStatus((*id).to_owned()),
                &format!("{V4}/statuses/{{subscriberIdString}}"),
                PREFS_WRITE,
            )),
            ("GET", ["statuses", id, "unsubscribe-all"]) => Ok(r(
                Op::V4UnsubscribeAllRead((*id).to_owned()),
                &format!("{V4}/statuses/{{subscriberIdString}}/unsubscribe-all"),
                PREFS_READ,
            )),
            ("POST", ["statuses", id, "unsubscribe-all"]) => Ok(r(
                Op::V4UnsubscribeAll((*id).to_owned()),
                &format!("{V4}/statuses/{{subscriberIdString}}/unsubscribe-all"),
                PREFS_WRITE,
            )),
            _ => Err(false),
        };
    }
    match (m, segs.as_slice()) {
        ("POST", ["oauth", "v1", "token"]) => {
            Ok(r(Op::Token { v3: false }, "/oauth/v1/token", &[]))
        }
        ("POST", ["oauth", "v3", "token"]) => Ok(r(Op::Token { v3: true }, "/oauth/v3/token", &[])),
        (_, ["oauth", _, "token"]) => Err(true),
        _ => Err(false),
    }
}

fn json_response(reply: &Reply) -> Response {
    (
        StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        [(header::CONTENT_TYPE, "application/json;charset=utf-8")],
        reply.body.to_string(),
    )
        .into_response()
}

async fn handle(
    State(state): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_owned();
    let query = uri.query().unwrap_or_default().to_owned();
    let body_text = String::from_utf8_lossy(&body).into_owned();
    let route = match route(&method, &path) {
        Ok(r) => r,
        Err(wrong_method) => {
            let reply = if wrong_method {
                error(
                    405,
                    "VALIDATION_ERROR",
                    "HTTP method not allowed for this path",
                )
            } else {
                error(404, "OBJECT_NOT_FOUND", &format!("Unknown path {path}"))
            };
            let mut s = lock(&state);
            log(
                &mut s,
                &method,
                &path,
                &query,
                "unknown",
                &body_text,
                reply.status,
            );
            return json_response(&reply);
        }
    };
    if let Op::Token { v3 } = route.op {
        let mut s = lock(&state);
        let reply = token(&mut s, &body_text, &query, v3);
        log(
            &mut s,
            &method,
            &path,
            &query,
            &route.endpoint,
            &body_text,
            reply.status,
        );
        return json_response(&reply);
    }

    // The gate: auth, scopes, limits, faults.
    let (gate, fault) = {
        let mut s = lock(&state);
        let gate = check(&mut s, &headers, &route);
        let fault = if gate.is_ok() {
            let at = s
                .faults
                .iter()
                .position(|(e, _)| e.as_ref().is_none_or(|e| *e == route.endpoint));
            at.and_then(|i| s.faults.remove(i)).map(|(_, f)| f)
        } else {
            None
        };
        (gate, fault)
    };
    let headers_out = match gate {
        Err((reply, rate)) => {
            let mut s = lock(&state);
            log(
                &mut s,
                &method,
                &path,
                &query,
                &route.endpoint,
                &body_text,
                reply.status,
            );
            let mut resp = json_response(&reply);
            add_headers(&mut resp, rate);
            return resp;
        }
        Ok(rate) => rate,
    };
    let early = match fault {
        None => None,
        Some(Fault::Delay(d)) => {
            tokio::time::sleep(d).await;
            None
        }
        Some(Fault::Status(code)) => Some(json_response(&error(
            code,
            if code >= 500 {
                "INTERNAL_ERROR"
            } else {
                "VALIDATION_ERROR"
            },
            "injected failure",
        ))),
        Some(Fault::TooManyRequests) => Some(json_response(&rate_limited("TEN_SECONDLY_ROLLING"))),
        Some(Fault::Garbage) => Some(
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                "<html><body>502 Bad Gateway</body></html>{\"results\":[",
            )
                .into_response(),
        ),
    };
    if let Some(mut resp) = early {
        let mut s = lock(&state);
        log(
            &mut s,
            &method,
            &path,
            &query,
            &route.endpoint,
            &body_text,
            resp.status().as_u16(),
        );
        add_headers(&mut resp, headers_out);
        return resp;
    }

    let q = Query::parse(&query);
    let mut s = lock(&state);
    let reply = dispatch(&mut s, &route.op, &q, &body);
    log(
        &mut s,
        &method,
        &path,
        &query,
        &route.endpoint,
        &body_text,
        reply.status,
    );
    let mut resp = json_response(&reply);
    add_headers(&mut resp, headers_out);
    resp
}

fn dispatch(s: &mut HubSpotState, op: &Op, q: &Query, body: &[u8]) -> Reply {
    let parsed = || -> Result<Value, Reply> {
        serde_json::from_slice::<Value>(body).map_err(|e| {
            error(
                400,
                "VALIDATION_ERROR",
                &format!(
                    "Invalid input JSON on line {}, column {}: {e}",
                    e.line(),
                    e.column()
                ),
            )
        })
    };
    macro_rules! body {
        () => {
            match parsed() {
                Ok(v) => v,
                Err(r) => return r,
            }
        };
    }
    match op {
        Op::Token { .. } => error(404, "OBJECT_NOT_FOUND", "not here"),
        Op::ContactsList => contacts::list(s, q),
        Op::ContactCreate => contacts::create(s, &body!()),
        Op::ContactGet(id) => contacts::get(s, id, q),
        Op::ContactPatch(id) => contacts::patch(s, id, q, &body!()),
        Op::ContactArchive(id) => contacts::archive_by_api(s, id),
        Op::Batch(kind) => contacts::batch(s, kind, q, &body!()),
        Op::Search => search::search(s, &body!()),
        Op::GdprDelete => contacts::gdpr_delete(s, &body!()),
        Op::PropertiesList => contacts::properties_list(s),
        Op::PropertyGet(name) => contacts::property_get(s, name),
        Op::V3Definitions => prefs::v3_definitions(s),
        Op::V3Status(email) => Reply::ok(prefs::v3_status(s, email)),
        Op::V3Subscribe => prefs::v3_change(s, &body!(), true),
        Op::V3Unsubscribe => prefs::v3_change(s, &body!(), false),
        Op::V4Definitions => prefs::v4_definitions(s),
        Op::V4Status(email) => prefs::v4_status(s, email, q),
        Op::V4SetStatus(email) => prefs::v4_set_status(s, email, &body!()),
        Op::V4UnsubscribeAllRead(email) => prefs::v4_unsubscribe_all_read(s, email, q),
        Op::V4UnsubscribeAll(email) => prefs::v4_unsubscribe_all(s, email, q),
    }
}

fn log(
    s: &mut HubSpotState,
    method: &Method,
    path: &str,
    query: &str,
    endpoint: &str,
    body: &str,
    status: u16,
) {
    s.requests.push(LoggedRequest {
        method: method.as_str().to_owned(),
        path: path.to_owned(),
        query: query.to_owned(),
        endpoint: endpoint.to_owned(),
        body: body.to_owned(),
        status,
    });
}

/// Rate-limit header values to add (`None` on search answers and unauthenticated ones).
type RateOut = Option<Vec<(&'static str, String)>>;

fn add_headers(resp: &mut Response, rate: RateOut) {
    for (name, value) in rate.unwrap_or_default() {
        if let Ok(v) = HeaderValue::from_str(&value) {
            resp.headers_mut().insert(name, v);
        }
    }
}

/// The 429 body for a policy.
pub(crate) fn rate_limited(policy: &str) -> Reply {
    let message = match policy {
        "DAILY" => "You have reached your daily limit.".to_owned(),
        "SECONDLY" => "You have reached your secondly limit.".to_owned(),
        p => format!("You have reached your {} limit.", p.to_lowercase()),
    };
    Reply::new(
        429,
        json!({"status": "error", "message": message, "errorType": "RATE_LIMIT",
               "correlationId": uuid(), "policyName": policy, "requestId": uuid()}),
    )
}

fn prune(times: &mut std::collections::VecDeque<Instant>, now: Instant, window: Duration) {
    while times
        .front()
        .is_some_and(|t| now.duration_since(*t) >= window)
    {
        times.pop_front();
    }
}

/// Auth, scopes and rate limits. `Ok(headers)` lets the request through.
fn check(
    s: &mut HubSpotState,
    headers: &HeaderMap,
    route: &Route,
) -> Result<RateOut, (Reply, RateOut)> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or_default()
        .to_owned();
    let now = Instant::now();
    let token: Token = match s.tokens.get(&presented) {
        None => {
            return Err((
                error(
                    401,
                    "INVALID_AUTHENTICATION",
                    "Authentication credentials not found. This API supports OAuth 2.0 authentication and you can find more details at https://developers.hubspot.com/docs/methods/auth/oauth-overview",
                ),
                None,
            ));
        }
        Some(t) if t.expires.is_some_and(|e| now >= e) => {
            let ago = t
                .expires
                .map(|e| now.duration_since(e).as_secs())
                .unwrap_or(0);
            return Err((
                error(
                    401,
                    "EXPIRED_AUTHENTICATION",
                    &format!("The OAuth token used to make this call expired {ago} second(s) ago."),
                ),
                None,
            ));
        }
        Some(t) => t.clone(),
    };

    // Limits: every request with a valid token counts (refused ones too).
    let today = Utc::now().with_timezone(&s.portal_offset).date_naive();
    if today != s.daily_date {
        s.daily_date = today;
        s.daily_used = 0;
    }
    s.daily_used += 1;
    let window = s.scaled(Duration::from_secs(10));
    let second = s.scaled(Duration::from_secs(1));
    let burst_max = s.burst_max;
    let burst = s.burst.entry(token.app.clone()).or_default();
    prune(burst, now, window);
    burst.push_back(now);
    let in_window = burst.len();
    let in_second = burst
        .iter()
        .filter(|t| now.duration_since(**t) < second)
        .count();
    let secondly = burst_max.div_ceil(10) as usize;
    let rate: RateOut = if route.search {
        None
    } else {
        let remaining = (burst_max as usize).saturating_sub(in_window).to_string();
        let daily = s.daily_max.to_string();
        let daily_rem = s.daily_max.saturating_sub(s.daily_used).to_string();
        let interval = (
            "X-HubSpot-RateLimit-Interval-Milliseconds",
            window.as_millis().to_string(),
        );
        let max = ("X-HubSpot-RateLimit-Max", burst_max.to_string());
        let rem = ("X-HubSpot-RateLimit-Remaining", remaining);
        let d = ("X-HubSpot-RateLimit-Daily", daily);
        let dr = ("X-HubSpot-RateLimit-Daily-Remaining", daily_rem);
        let sec = ("X-HubSpot-RateLimit-Secondly", secondly.to_string());
        let secr = (
            "X-HubSpot-RateLimit-Secondly-Remaining",
            secondly.saturating_sub(in_second).to_string(),
        );
        Some(match s.rate_headers {
            RateHeaders::All => vec![d, dr, interval, max, rem, sec, secr],
            RateHeaders::Interval => vec![interval, max, rem],
            RateHeaders::DailySecondly => vec![d, dr, sec, secr],
            RateHeaders::None => vec![],
        })
    };

    if !route.needs.is_empty() && !route.needs.iter().any(|n| token.scopes.contains(*n)) {
        let needed: Vec<&str> = route.needs.to_vec();
        return Err((
            error_with(
                403,
                "MISSING_SCOPES",
                "This app hasn't been granted all required scopes to make this call. Read more about required scopes here: https://developers.hubspot.com/scopes.",
                vec![
                    json!({"message": "One or more of the following scopes are required.",
                            "context": {"requiredGranularScopes": needed}}),
                ],
                None,
            ),
            rate,
        ));
    }
    if s.daily_used > s.daily_max {
        return Err((rate_limited("DAILY"), rate));
    }
    if in_window > burst_max as usize {
        return Err((rate_limited("TEN_SECONDLY_ROLLING"), rate));
    }
    if route.search {
        let per_second = s.search_per_second as usize;
        prune(&mut s.search_times, now, second);
        s.search_times.push_back(now);
        if s.search_times.len() > per_second {
            return Err((rate_limited("SECONDLY"), None));
        }
    }
    Ok(rate)
}

/// `POST /oauth/v1/token` (and v3): the `refresh_token` grant, form-encoded.
fn token(s: &mut HubSpotState, body: &str, query: &str, v3: bool) -> Reply {
    s.token_requests += 1;
    let mut params = Query::parse(query);
    params.0.extend(Query::parse(body).0);
    let p = |k: &str| params.get(k).unwrap_or_default().to_owned();
    let bad = |status: &str, message: &str| {
        Reply::new(
            400,
            json!({"status": status, "message": message, "correlationId": uuid()}),
        )
    };
    if p("grant_type") != "refresh_token" {
        return bad("BAD_GRANT_TYPE", "Invalid grant type");
    }
    if p("client_id") != s.client_id {
        return bad("BAD_CLIENT_ID", "missing or unknown client id");
    }
    if p("client_secret") != s.client_secret {
        return bad("BAD_CLIENT_SECRET", "missing or invalid client secret");
    }
    let Some(granted) = s.refresh_tokens.remove(&p("refresh_token")) else {
        return bad("BAD_REFRESH_TOKEN", "missing or invalid refresh token");
    };
    let n = s.next_token;
    s.next_token += 1;
    let access = format!("oauth-access-{n}-{}", uuid());
    let refresh = format!("na1-refresh-{n}-{}", uuid());
    let ttl = s.token_ttl;
    s.tokens.insert(
        access.clone(),
        Token {
            app: "oauth-app".into(),
            scopes: granted.clone(),
            expires: Some(Instant::now() + ttl),
        },
    );
    s.refresh_tokens.insert(refresh.clone(), granted.clone());
    let mut out = json!({"token_type": "bearer", "refresh_token": refresh,
                         "access_token": access, "expires_in": ttl.as_secs()});
    if v3 {
        let scopes: Vec<&String> = granted
            .iter()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        out["token_use"] = json!("access_token");
        out["hub_id"] = json!(super::PORTAL_ID);
        out["user_id"] = json!(1);
        out["scopes"] = json!(scopes);
    }
    Reply::ok(out)
}
