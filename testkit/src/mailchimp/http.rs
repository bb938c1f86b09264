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
use axum::http::{HeaderMap, header};
use axum::response::Response;
use base64::Engine as _;
use serde_json::{Map, Value, json};

use super::errors::{Answer, ApiError, render};
use super::fields::project;
use super::listing;
use super::members::{self, Mode};
use super::webhooks::{self, Rendered};
use super::{Fault, MailchimpState, RequestRecord, Shared, batch, lock_state};

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
            let bare = lock_state(state).options.throttle_as_bare_403;
            let answer = if bare {
                Answer::Raw(403, "text/plain", String::new())
            } else {
                Answer::Problem(ApiError::glossary(429))
            };
            return (answer, String::new());
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
            let (count, offset) = listing::paging(&s, &q, &mut call.note)?;
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
                batch::batch(
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
            let (count, offset) = listing::paging(&s, &q, &mut call.note)?;
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
            let v = listing::list_members(&s, id, &q, &mut call.note)?;
            let churn = s.churn;
            if churn > 0 {
                listing::churn(&mut s, id, churn);
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
            webhooks::create_webhook(state, id, &body).await
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
}
