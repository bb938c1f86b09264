//! The server: auth, the concurrency gate, the request timeout, faults, routing and
//! problem+json errors.
//!
//! Order of checks for a request under `/3.0/`: method override (`X-HTTP-Method-Override` on
//! anything but POST: 422), credentials (401/403), the concurrency gate (429), a seeded
//! fault, then the call itself under the request timeout.
//!
//! The gate counts requests in flight per credential, not TCP connections: an idle
//! keep-alive connection holds no slot (Mailchimp counts "connections"; a client that keeps
//! at most 10 requests in flight is what both readings accept).

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::{Map, Value, json};

use super::members::{self, Mode};
use super::webhooks::{self, EVENT_TYPES, Rendered, SOURCES, Webhook};
use super::{Fault, MailchimpState, RequestRecord, Shared, lock_state};

const ERROR_TYPE: &str = "https://mailchimp.com/developer/marketing/docs/errors/";

/// A Mailchimp error.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: u16,
    pub title: String,
    pub detail: String,
    /// `errors[]`: (field, message).
    pub errors: Vec<(String, String)>,
    /// The batch call's `error_code` for this error.
    pub batch_code: &'static str,
}

impl ApiError {
    pub fn new(status: u16, title: &str, detail: &str) -> Self {
        Self {
            status,
            title: title.to_owned(),
            detail: detail.to_owned(),
            errors: Vec::new(),
            batch_code: "ERROR_GENERIC",
        }
    }

    /// 400 `Invalid Resource` with this detail.
    pub fn invalid(detail: &str) -> Self {
        Self::new(400, "Invalid Resource", detail)
    }

    /// 400 `Invalid Resource` naming one field in `errors[]`.
    pub fn field(field: &str, message: &str) -> Self {
        let mut e = Self::invalid(
            "The resource submitted could not be validated. For field-specific details, see the 'errors' array.",
        );
        e.errors.push((field.to_owned(), message.to_owned()));
        e
    }

    pub fn not_found() -> Self {
        Self::new(
            404,
            "Resource Not Found",
            "The requested resource could not be found.",
        )
    }

    /// The glossary's error for a status.
    pub fn glossary(status: u16) -> Self {
        let (title, detail) = match status {
            400 => ("Bad Request", "Your request could not be processed."),
            401 => (
                "API Key Invalid",
                "Your API key may be invalid, or you've attempted to access the wrong data center.",
            ),
            403 => (
                "Forbidden",
                "You are not permitted to access this resource.",
            ),
            404 => return Self::not_found(),
            405 => (
                "Method Not Allowed",
                "The requested method and resource are not compatible. See the Allow header for this resource's available methods.",
            ),
            429 => (
                "Too Many Requests",
                "You have exceeded the limit of 10 simultaneous connections.",
            ),
            503 => ("Compliance Related", "This method has been disabled."),
            _ => (
                "Internal Server Error",
                "An unexpected internal error has occurred.",
            ),
        };
        Self::new(status, title, detail)
    }
}

/// What a call answers.
#[derive(Debug)]
pub(super) enum Answer {
    Json(u16, Value),
    NoContent,
    Problem(ApiError),
    Raw(u16, &'static str, String),
}

pub(super) fn router(state: Shared) -> Router {
    Router::new()
        .fallback(entry)
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            random_fault,
        ))
        .with_state(state)
}

async fn random_fault(
    State(state): State<Shared>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    let endpoint = crate::faults::endpoint_of(&req);
    let (fault, slow) = {
        let mut s = lock_state(&state);
        match s.random_faults.as_mut() {
            Some(plan) => (plan.roll(&endpoint), plan.slow),
            None => (None, std::time::Duration::ZERO),
        }
    };
    crate::faults::apply(fault, slow, req, next).await
}

fn uuid() -> String {
    use rand::Rng as _;
    let mut b: [u8; 16] = rand::thread_rng().r#gen();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// `METHOD /lists/{list_id}/…` for a path below `/3.0`.
fn endpoint_label(method: &str, segs: &[&str]) -> String {
    let mut out: Vec<String> = segs.iter().map(|s| (*s).to_owned()).collect();
    if segs.first() == Some(&"lists") {
        if out.len() > 1 {
            out[1] = "{list_id}".into();
        }
        if out.len() > 3 {
            match segs[2] {
                "members" => out[3] = "{subscriber_hash}".into(),
                "webhooks" => out[3] = "{webhook_id}".into(),
                _ => {}
            }
        }
    }
    if segs.first() == Some(&"batches") && out.len() > 1 {
        out[1] = "{batch_id}".into();
    }
    format!("{method} /{}", out.join("/"))
}

fn render(answer: Answer, request_id: &str, s: &MailchimpState) -> Response {
    let mut r = match answer {
        Answer::Json(status, v) => (
            StatusCode::from_u16(status).unwrap_or(StatusCode::OK),
            [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
            v.to_string(),
        )
            .into_response(),
        Answer::NoContent => StatusCode::NO_CONTENT.into_response(),
        Answer::Raw(status, content_type, body) => (
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            [(header::CONTENT_TYPE, content_type)],
            body,
        )
            .into_response(),
        Answer::Problem(e) => {
            let mut body = Map::new();
            if !s.omit_type_titles.contains(&e.title) {
                body.insert("type".into(), json!(ERROR_TYPE));
            }
            body.insert("title".into(), json!(e.title));
            body.insert("status".into(), json!(e.status));
            body.insert("detail".into(), json!(e.detail));
            body.insert("instance".into(), json!(request_id));
            if !e.errors.is_empty() {
                let errors: Vec<Value> = e
                    .errors
                    .iter()
                    .map(|(f, m)| json!({"field": f, "message": m}))
                    .collect();
                body.insert("errors".into(), Value::Array(errors));
            }
            let mut r = (
                StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST),
                [(
                    header::CONTENT_TYPE,
                    "application/problem+json; charset=utf-8",
                )],
                Value::Object(body).to_string(),
            )
                .into_response();
            let link = format!(
                "<https://{}.api.mailchimp.com/schema/3.0/Definitions/ProblemDetailDocument.json>; rel=\"describedBy\"",
                s.options.dc
            );
            if let Ok(v) = HeaderValue::from_str(&link) {
                r.headers_mut().insert(header::LINK, v);
            }
            r
        }
    };
    if let Ok(v) = HeaderValue::from_str(request_id) {
        r.headers_mut().insert("x-request-id", v);
    }
    r.headers_mut()
        .insert(header::SERVER, HeaderValue::from_static("openresty"));
    r
}

/// The credential of a request (the API key or the OAuth token), or why it is refused.
fn credential(s: &MailchimpState, headers: &HeaderMap) -> Result<String, ApiError> {
    let missing = || {
        ApiError::new(
            401,
            "API Key Missing",
            "Your request did not include an API key.",
        )
    };
    let Some(auth) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return Err(missing());
    };
    let (scheme, rest) = auth.trim().split_once(' ').unwrap_or((auth, ""));
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") || scheme.eq_ignore_ascii_case("oauth") {
        return if s.oauth_tokens.contains(rest) {
            Ok(format!("oauth:{rest}"))
        } else {
            Err(ApiError::glossary(401))
        };
    }
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(missing());
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| ApiError::glossary(401))?;
    let key = decoded
        .split_once(':')
        .map_or("", |(_, k)| k)
        .trim()
        .to_owned();
    if key.is_empty() {
        return Err(missing());
    }
    let host_dc = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .and_then(|h| h.split(':').next())
        .and_then(|h| h.strip_suffix(".api.mailchimp.com"))
        .map(str::to_owned);
    let dc = host_dc.unwrap_or_else(|| s.options.dc.clone());
    let Some((_, suffix)) = key.rsplit_once('-') else {
        return Err(ApiError::glossary(401));
    };
    if suffix != dc || dc != s.options.dc {
        return Err(if s.options.wrong_dc_forbidden {
            ApiError::new(
                403,
                "Wrong Datacenter",
                "The API key provided is linked to a different data center.",
            )
        } else {
            ApiError::glossary(401)
        });
    }
    if !s.api_keys.contains(&key) {
        return Err(ApiError::glossary(401));
    }
    Ok(key)
}

/// A slot of the concurrency gate; freed when dropped.
struct Slot {
    state: Shared,
    key: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut s = lock_state(&self.state);
        if let Some(n) = s.in_flight.get_mut(&self.key) {
            *n = n.saturating_sub(1);
        }
    }
}

fn acquire(state: &Shared, key: &str) -> Option<Slot> {
    let mut s = lock_state(state);
    let max = s.options.max_connections;
    let n = s.in_flight.entry(key.to_owned()).or_default();
    if *n >= max {
        s.refused_concurrency += 1;
        return None;
    }
    *n += 1;
    let n = *n;
    s.peak_concurrency = s.peak_concurrency.max(n);
    Some(Slot {
        state: Arc::clone(state),
        key: key.to_owned(),
    })
}

/// One request, parsed.
struct Call {
    method: String,
    query: HashMap<String, String>,
    body: axum::body::Bytes,
    note: String,
}

async fn entry(State(state): State<Shared>, req: Request) -> Response {
    let request_id = uuid();
    let (parts, body) = req.into_parts();
    let raw_path = parts.uri.path().to_owned();
    let raw_query = parts.uri.query().unwrap_or_default().to_owned();
    let mut method = parts.method.as_str().to_owned();
    let body = axum::body::to_bytes(body, 32 << 20).await;
    let segs: Vec<String> = raw_path
        .strip_prefix("/3.0")
        .unwrap_or("")
        .split('/')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    let seg_refs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let override_method = parts
        .headers
        .get("x-http-method-override")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_uppercase());
    let mut endpoint = endpoint_label(&method, &seg_refs);
    if let Some(rest) = raw_path.strip_prefix("/__fake/confirm/") {
        return confirm_hook(
            &state,
            rest,
            body.ok().as_deref().unwrap_or_default(),
            &request_id,
        );
    }
    let early = if !raw_path.starts_with("/3.0/") {
        Some(ApiError::not_found())
    } else if let Some(m) = override_method {
        if method == "POST" {
            method = m;
            endpoint = endpoint_label(&method, &seg_refs);
            None
        } else {
            Some(ApiError::new(
                422,
                "Invalid Method Override",
                "You can only use the X-HTTP-Method-Override header with the POST method.",
            ))
        }
    } else {
        None
    };
    let body_text = body
        .as_ref()
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .unwrap_or_default();
    let (answer, note) = match (early, body) {
        (Some(e), _) => (Answer::Problem(e), String::new()),
        (None, Err(_)) => (
            Answer::Problem(ApiError::new(
                400,
                "JSON Parse Error",
                "We encountered an unspecified JSON parsing error.",
            )),
            String::new(),
        ),
        (None, Ok(body)) => {
            let call = Call {
                method: method.clone(),
                query: form_urlencoded::parse(raw_query.as_bytes())
                    .into_owned()
                    .collect(),
                body,
                note: String::new(),
            };
            admit_and_serve(&state, &parts.headers, call, segs).await
        }
    };
    let s = lock_state(&state);
    let response = render(answer, &request_id, &s);
    drop(s);
    let mut s = lock_state(&state);
    s.log.push(RequestRecord {
        method,
        path: raw_path,
        query: raw_query,
        endpoint,
        body: body_text,
        status: response.status().as_u16(),
        request_id,
        note,
    });
    response
}

/// The test hook `POST /__fake/confirm/{list_id}/{subscriber_hash}` (see
/// [`super::FakeMailchimp::confirm`]); not logged, no credentials.
fn confirm_hook(state: &Shared, rest: &str, body: &[u8], request_id: &str) -> Response {
    let ip = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("ip").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| "127.0.0.1".to_owned());
    let rendered = match rest.split('/').collect::<Vec<_>>().as_slice() {
        [list, slot] => members::confirm(&mut lock_state(state), list, slot, &ip),
        _ => None,
    };
    let answer = match rendered {
        Some(r) => {
            spawn_events(state, vec![r]);
            Answer::NoContent
        }
        None => Answer::Problem(ApiError::not_found()),
    };
    let s = lock_state(state);
    render(answer, request_id, &s)
}

async fn admit_and_serve(
    state: &Shared,
    headers: &HeaderMap,
    call: Call,
    segs: Vec<String>,
) -> (Answer, String) {
    let (slot, fault, latency, timeout) = {
        let s = lock_state(state);
        let key = match credential(&s, headers) {
            Ok(k) => k,
            Err(e) => return (Answer::Problem(e), String::new()),
        };
        drop(s);
        let Some(slot) = acquire(state, &key) else {
            return (Answer::Problem(ApiError::glossary(429)), String::new());
        };
        let mut s = lock_state(state);
        let fault = s.faults.pop_front();
        let timeout = s.options.scaled(s.options.request_timeout);
        (slot, fault, s.options.latency, timeout)
    };
    let state2 = Arc::clone(state);
    let task = tokio::spawn(async move {
        let _slot = slot;
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        match fault {
            Some(Fault::Status(code)) => (Answer::Problem(ApiError::glossary(code)), String::new()),
            Some(Fault::Bare(code)) => (
                Answer::Raw(code, "text/plain", String::new()),
                String::new(),
            ),
            Some(Fault::Garbage) => (
                Answer::Raw(
                    200,
                    "text/html",
                    "<html><body>An error occurred while processing your request.</body></html>"
                        .into(),
                ),
                String::new(),
            ),
            Some(Fault::Delay(d)) => {
                let out = serve(&state2, call, segs).await;
                tokio::time::sleep(d).await;
                out
            }
            None => serve(&state2, call, segs).await,
        }
    });
    match tokio::time::timeout(timeout, task).await {
        Ok(Ok(out)) => out,
        Ok(Err(_)) => (Answer::Problem(ApiError::glossary(500)), String::new()),
        Err(_) => (
            Answer::Raw(
                504,
                "text/html",
                "<html><body><h1>504 Gateway Time-out</h1></body></html>".into(),
            ),
            "request timeout: the call goes on and keeps its slot".into(),
        ),
    }
}

fn json_body(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::new(
            400,
            "Invalid Resource",
            "The resource submitted could not be validated.",
        )),
        Err(_) => Err(ApiError::new(
            400,
            "JSON Parse Error",
            "We encountered an unspecified JSON parsing error.",
        )),
    }
}

fn flag(q: &HashMap<String, String>, key: &str) -> bool {
    q.get(key).is_some_and(|v| v.trim() == "true")
}

fn spawn_events(state: &Shared, events: Vec<Rendered>) {
    if !events.is_empty() {
        tokio::spawn(webhooks::deliver(Arc::clone(state), events));
    }
}

async fn serve(state: &Shared, mut call: Call, segs: Vec<String>) -> (Answer, String) {
    let seg: Vec<&str> = segs.iter().map(String::as_str).collect();
    let answer = match route(state, &mut call, &seg).await {
        Ok(a) => a,
        Err(e) => Answer::Problem(e),
    };
    let answer = match answer {
        Answer::Json(200, v) if call.method == "GET" => match project(&v, &call.query) {
            Ok(v) => Answer::Json(200, v),
            Err(e) => Answer::Problem(e),
        },
        other => other,
    };
    (answer, call.note)
}

fn list_json(l: &super::FakeList) -> Value {
    let count = |st| l.members.values().filter(|m| m.status == st).count();
    use super::Status::*;
    json!({
        "id": l.id, "web_id": l.web_id, "name": l.name,
        "contact": {"company": "", "address1": "", "address2": "", "city": "", "state": "", "zip": "",
                    "country": "", "phone": ""},
        "permission_reminder": "", "use_archive_bar": false,
        "campaign_defaults": {"from_name": "", "from_email": "", "subject": "", "language": "en"},
        "notify_on_subscribe": "", "notify_on_unsubscribe": "",
        "date_created": super::iso(l.date_created), "list_rating": 0, "email_type_option": false,
        "subscribe_url_short": "", "subscribe_url_long": "", "beamer_address": "",
        "visibility": "prv", "double_optin": l.double_optin, "has_welcome": false,
        "marketing_permissions": !l.permissions.is_empty(), "modules": [],
        "stats": {"member_count": count(Subscribed), "unsubscribe_count": count(Unsubscribed),
                  "cleaned_count": count(Cleaned), "member_count_since_send": 0,
                  "unsubscribe_count_since_send": 0, "cleaned_count_since_send": 0,
                  "campaign_count": 0, "campaign_last_sent": "", "merge_field_count": l.merge_fields.len(),
                  "avg_sub_rate": 0, "avg_unsub_rate": 0, "target_sub_rate": 0, "open_rate": 0,
                  "click_rate": 0, "last_sub_date": "", "last_unsub_date": ""},
        "_links": [],
    })
}

async fn route(state: &Shared, call: &mut Call, seg: &[&str]) -> Result<Answer, ApiError> {
    let method = call.method.clone();
    let q = call.query.clone();
    let skip_merge = flag(&q, "skip_merge_validation");
    match (method.as_str(), seg) {
        ("GET", ["ping"]) => Ok(Answer::Json(
            200,
            json!({"health_status": "Everything's Chimpy!"}),
        )),
        ("GET", ["lists"]) => {
            let s = lock_state(state);
            let (count, offset) = members::paging(&s, &q, &mut call.note)?;
            let lists: Vec<Value> = s
                .lists
                .values()
                .skip(offset)
                .take(count)
                .map(list_json)
                .collect();
            Ok(Answer::Json(
                200,
                json!({"lists": lists, "total_items": s.lists.len(), "constraints": {}, "_links": []}),
            ))
        }
        ("GET", ["lists", id]) => {
            let s = lock_state(state);
            let l = s.lists.get(*id).ok_or_else(ApiError::not_found)?;
            Ok(Answer::Json(200, list_json(l)))
        }
        ("POST", ["lists", id]) => {
            let body = json_body(&call.body)?;
            let (answer, events) = {
                let mut s = lock_state(state);
                members::batch(
                    &mut s,
                    id,
                    &body,
                    skip_merge,
                    flag(&q, "skip_duplicate_check"),
                )?
            };
            spawn_events(state, events);
            Ok(Answer::Json(200, answer))
        }
        ("GET", ["lists", id, "merge-fields"]) => {
            let s = lock_state(state);
            let (count, offset) = members::paging(&s, &q, &mut call.note)?;
            let l = s.lists.get(*id).ok_or_else(ApiError::not_found)?;
            let fields: Vec<Value> = l
                .merge_fields
                .iter()
                .skip(offset)
                .take(count)
                .map(|f| {
                    json!({"merge_id": f.merge_id, "tag": f.tag, "name": f.name, "type": f.kind,
                           "required": f.required, "default_value": "", "public": true,
                           "display_order": f.merge_id, "options": {}, "help_text": "",
                           "list_id": l.id, "_links": []})
                })
                .collect();
            Ok(Answer::Json(
                200,
                json!({"merge_fields": fields, "list_id": l.id,
                       "total_items": l.merge_fields.len(), "_links": []}),
            ))
        }
        ("GET", ["lists", id, "members"]) => {
            let mut s = lock_state(state);
            let v = members::list_members(&s, id, &q, &mut call.note)?;
            let churn = s.churn;
            if churn > 0 {
                members::churn(&mut s, id, churn);
            }
            Ok(Answer::Json(200, v))
        }
        ("POST", ["lists", id, "members"]) => {
            let body = json_body(&call.body)?;
            write(state, id, None, &body, Mode::Post, skip_merge)
        }
        ("GET", ["lists", id, "members", h]) => {
            let s = lock_state(state);
            Ok(Answer::Json(200, members::get(&s, id, h)?))
        }
        ("PUT", ["lists", id, "members", h]) => {
            let body = json_body(&call.body)?;
            write(state, id, Some(h), &body, Mode::Put, skip_merge)
        }
        ("PATCH", ["lists", id, "members", h]) => {
            let body = json_body(&call.body)?;
            write(state, id, Some(h), &body, Mode::Patch, skip_merge)
        }
        ("DELETE", ["lists", id, "members", h]) => {
            let events = {
                let mut s = lock_state(state);
                members::archive(&mut s, id, h)?
            };
            spawn_events(state, events);
            Ok(Answer::NoContent)
        }
        ("POST", ["lists", id, "members", h, "actions", "delete-permanent"]) => {
            let mut s = lock_state(state);
            members::delete_permanent(&mut s, id, h)?;
            Ok(Answer::NoContent)
        }
        ("GET", ["lists", id, "webhooks"]) => {
            let s = lock_state(state);
            let l = s.lists.get(*id).ok_or_else(ApiError::not_found)?;
            let hooks: Vec<Value> = l.webhooks.iter().map(|h| h.json(&l.id)).collect();
            Ok(Answer::Json(
                200,
                json!({"webhooks": hooks, "list_id": l.id, "total_items": l.webhooks.len(),
                       "_links": []}),
            ))
        }
        ("POST", ["lists", id, "webhooks"]) => {
            let body = json_body(&call.body)?;
            create_webhook(state, id, &body).await
        }
        ("GET", ["lists", id, "webhooks", w]) => {
            let s = lock_state(state);
            let l = s.lists.get(*id).ok_or_else(ApiError::not_found)?;
            let h = l
                .webhooks
                .iter()
                .find(|h| h.id == *w)
                .ok_or_else(ApiError::not_found)?;
            Ok(Answer::Json(200, h.json(&l.id)))
        }
        ("DELETE", ["lists", id, "webhooks", w]) => {
            let mut s = lock_state(state);
            let l = s.lists.get_mut(*id).ok_or_else(ApiError::not_found)?;
            let before = l.webhooks.len();
            l.webhooks.retain(|h| h.id != *w);
            if l.webhooks.len() == before {
                return Err(ApiError::not_found());
            }
            Ok(Answer::NoContent)
        }
        (_, ["batches", ..]) => Err(ApiError::new(
            501,
            "Not Implemented",
            "The fake Mailchimp does not reproduce POST /batches.",
        )),
        (
            _,
            ["ping"]
            | ["lists"]
            | ["lists", _]
            | ["lists", _, "merge-fields"]
            | ["lists", _, "members"]
            | ["lists", _, "members", _]
            | ["lists", _, "members", _, "actions", "delete-permanent"]
            | ["lists", _, "webhooks"]
            | ["lists", _, "webhooks", _],
        ) => Err(ApiError::glossary(405)),
        _ => Err(ApiError::not_found()),
    }
}

fn write(
    state: &Shared,
    list: &str,
    slot: Option<&str>,
    body: &Map<String, Value>,
    mode: Mode,
    skip_merge: bool,
) -> Result<Answer, ApiError> {
    let written = {
        let mut s = lock_state(state);
        members::write(&mut s, list, slot, body, mode, skip_merge)?
    };
    spawn_events(state, written.events);
    Ok(Answer::Json(200, written.member))
}

fn flags(
    body: &Map<String, Value>,
    key: &str,
    names: &[&str],
) -> Result<std::collections::BTreeMap<String, bool>, ApiError> {
    let mut out: std::collections::BTreeMap<String, bool> =
        names.iter().map(|n| ((*n).to_owned(), false)).collect();
    match body.get(key) {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) => {
            for (k, v) in m {
                if !names.contains(&k.as_str()) {
                    return Err(ApiError::field(
                        &format!("{key}.{k}"),
                        "This property is not allowed.",
                    ));
                }
                let Some(b) = v.as_bool() else {
                    return Err(ApiError::field(
                        &format!("{key}.{k}"),
                        "Schema describes boolean.",
                    ));
                };
                out.insert(k.clone(), b);
            }
        }
        Some(_) => return Err(ApiError::field(key, "Schema describes object.")),
    }
    Ok(out)
}

/// `POST /lists/{id}/webhooks`: validate the URL with a real GET, then register.
async fn create_webhook(
    state: &Shared,
    list_id: &str,
    body: &Map<String, Value>,
) -> Result<Answer, ApiError> {
    let url = body
        .get("url")
        .and_then(Value::as_str)
        .map(str::trim)
        .unwrap_or_default()
        .to_owned();
    let parsed = reqwest::Url::parse(&url)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
    if parsed.is_none() {
        return Err(ApiError::field("url", "This value should be a valid URL."));
    }
    let events = flags(body, "events", &EVENT_TYPES)?;
    let sources = flags(body, "sources", &SOURCES)?;
    let timeout = {
        let s = lock_state(state);
        let l = s.lists.get(list_id).ok_or_else(ApiError::not_found)?;
        if l.webhooks.iter().any(|h| h.url == url) {
            return Err(ApiError::field(
                "url",
                "A webhook with this URL already exists on this list.",
            ));
        }
        s.options.webhook_timeout()
    };
    let answered = webhooks::validate(&url, timeout).await;
    let mut s = lock_state(state);
    s.validations.push((url.clone(), answered));
    if !answered.is_some_and(|c| (200..300).contains(&c)) {
        return Err(ApiError::field(
            "url",
            "We couldn't verify the URL is working. Please double check and try again.",
        ));
    }
    let l = s.lists.get_mut(list_id).ok_or_else(ApiError::not_found)?;
    let hook = Webhook {
        id: MailchimpState::hex(10),
        url,
        events,
        sources,
    };
    let v = hook.json(&l.id);
    l.webhooks.push(hook);
    Ok(Answer::Json(200, v))
}

// ----- fields / exclude_fields -------------------------------------------------------------

fn paths(q: &HashMap<String, String>, key: &str) -> Vec<Vec<String>> {
    q.get(key)
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(|p| p.split('.').map(str::to_owned).collect())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether `path` names something in `v` (an empty array accepts anything below it).
fn path_valid(v: &Value, path: &[String]) -> bool {
    let Some((head, rest)) = path.split_first() else {
        return true;
    };
    match v {
        Value::Object(m) => m.get(head).is_some_and(|c| path_valid(c, rest)),
        Value::Array(a) => a.first().is_none_or(|x| path_valid(x, path)),
        _ => false,
    }
}

fn keep(v: &Value, include: &[Vec<String>]) -> Value {
    match v {
        Value::Object(m) => {
            let mut out = Map::new();
            for (k, val) in m {
                let subs: Vec<Vec<String>> = include
                    .iter()
                    .filter(|p| p.first() == Some(k))
                    .map(|p| p[1..].to_vec())
                    .collect();
                if subs.is_empty() {
                    continue;
                }
                if subs.iter().any(Vec::is_empty) {
                    out.insert(k.clone(), val.clone());
                } else {
                    out.insert(k.clone(), keep(val, &subs));
                }
            }
            Value::Object(out)
        }
        Value::Array(a) => Value::Array(a.iter().map(|x| keep(x, include)).collect()),
        other => other.clone(),
    }
}

fn drop_path(v: &mut Value, path: &[String]) {
    match v {
        Value::Object(m) => match path {
            [] => {}
            [last] => {
                m.remove(last);
            }
            [head, rest @ ..] => {
                if let Some(c) = m.get_mut(head) {
                    drop_path(c, rest);
                }
            }
        },
        Value::Array(a) => a.iter_mut().for_each(|x| drop_path(x, path)),
        _ => {}
    }
}

/// Apply `fields` / `exclude_fields`; 422 `Requested Fields Invalid` for an unknown path.
fn project(v: &Value, q: &HashMap<String, String>) -> Result<Value, ApiError> {
    let include = paths(q, "fields");
    let exclude = paths(q, "exclude_fields");
    if include.iter().chain(&exclude).any(|p| !path_valid(v, p)) {
        return Err(ApiError::new(
            422,
            "Requested Fields Invalid",
            "The fields requested from this resource are invalid.",
        ));
    }
    let mut out = if include.is_empty() {
        v.clone()
    } else {
        keep(v, &include)
    };
    for p in &exclude {
        drop_path(&mut out, p);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_labels_name_templates() {
        assert_eq!(
            endpoint_label("PUT", &["lists", "abc", "members", "9e26"]),
            "PUT /lists/{list_id}/members/{subscriber_hash}"
        );
        assert_eq!(endpoint_label("GET", &["ping"]), "GET /ping");
    }

    #[test]
    fn projection_keeps_and_drops_paths() {
        let v = json!({"members": [{"id": "a", "status": "x", "merge_fields": {"F": 1}}],
                       "total_items": 1, "list_id": "l"});
        let q: HashMap<String, String> = [(
            "fields".to_owned(),
            "members.id,members.merge_fields.F,total_items".to_owned(),
        )]
        .into();
        assert_eq!(
            project(&v, &q).ok(),
            Some(json!({"members": [{"id": "a", "merge_fields": {"F": 1}}], "total_items": 1}))
        );
        let q: HashMap<String, String> =
            [("exclude_fields".to_owned(), "members.status".to_owned())].into();
        assert_eq!(
            project(&v, &q).ok(),
            Some(json!({"members": [{"id": "a", "merge_fields": {"F": 1}}],
                        "total_items": 1, "list_id": "l"}))
        );
        let q: HashMap<String, String> = [("fields".to_owned(), "members.nope".to_owned())].into();
        assert_eq!(project(&v, &q).err().map(|e| e.status), Some(422));
    }
}
