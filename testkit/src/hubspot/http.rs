//! Request routing (`/crm/v3/...` and the date-based `/crm/objects/{YYYY-MM}/...` alike),
//! HubSpot's error envelope, injected faults and the request log. The gate (token, scopes,
//! limits) and the OAuth token endpoint are in `gate`.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::{
    Fault, HubSpotState, LoggedRequest, batch, contacts, gate, prefs, properties, scopes, search,
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
    if reply.status == 204 {
        return StatusCode::NO_CONTENT.into_response();
    }
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
        let reply = gate::token(&mut s, &body_text, &query, v3);
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
        let gate = gate::check(&mut s, &headers, route.needs, route.search);
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
            gate::add_headers(&mut resp, rate);
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
        Some(Fault::TooManyRequests) => {
            Some(json_response(&gate::rate_limited("TEN_SECONDLY_ROLLING")))
        }
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
        gate::add_headers(&mut resp, headers_out);
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
    gate::add_headers(&mut resp, headers_out);
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
        Op::Batch(kind) => batch::batch(s, kind, q, &body!()),
        Op::Search => search::search(s, &body!()),
        Op::GdprDelete => contacts::gdpr_delete(s, &body!()),
        Op::PropertiesList => properties::properties_list(s),
        Op::PropertyGet(name) => properties::property_get(s, name),
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
