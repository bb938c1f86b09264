//! A fake Zoho (accounts + CRM v8) on `127.0.0.1:0`, speaking the wire formats of
//! Zoho's public API documentation (OAuth, CRM v8; summarised in README.md "Zoho CRM"): the OAuth refresh grant (errors as HTTP 200
//! `{"error": ...}`, throttling past 10 token requests per 10 minutes), record lists with the
//! `page` / `page_token` rules (no `page` past 2,000 records), `If-Modified-Since`, 204/304,
//! `/deleted`, updates with 207 partial success, `INVALID_TOKEN`, injectable faults, and
//! Notification API channels with callbacks sent on request.
//!
//! Why one long file: it is one vendor API surface (the accounts server and CRM v8 share
//! state: tokens, records, channels), read side by side with the vendor's documentation.
//!
//! The server runs on its own thread and runtime, so it works from plain `#[test]`s and from
//! `#[tokio::test]`s alike. Tests drive it through [`FakeZoho`]; everything it holds is in
//! [`ZohoState`] (reachable with [`FakeZoho::with`]), so further Zoho products (Campaigns)
//! can be added as more routes and fields without touching the CRM ones.
//!
//! Inferred behaviour, where Zoho's documents say nothing: `page_token` continues after the
//! last record returned (a keyset position), `If-Modified-Since` is inclusive, and a record
//! that does not exist answers 204.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{DateTime, FixedOffset, Utc};
use serde_json::{Map, Value, json};

mod synthetic;
pub use synthetic::SyntheticSource;

/// Default credentials the fake accepts.
pub const CLIENT_ID: &str = "1000.FAKECLIENTID";
pub const CLIENT_SECRET: &str = "fake-client-secret";
pub const REFRESH_TOKEN: &str = "1000.fake.refresh";

/// A fault injected into the next CRM API call (token requests are not affected).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// HTTP 429 `TOO_MANY_REQUESTS`, with a `Retry-After` header when given (seconds).
    TooManyRequests { retry_after: Option<u64> },
    /// This HTTP status with Zoho's error envelope (`INTERNAL_ERROR` for 5xx).
    Status(u16),
    /// HTTP 200 with a body that is not JSON.
    Garbage,
    /// Answer normally, after this delay (for timeouts).
    Delay(Duration),
}

/// One stored record.
#[derive(Debug, Clone)]
pub struct FakeRecord {
    pub modified: DateTime<Utc>,
    /// The fields; `id` included unless the record is a malformed one.
    pub fields: Map<String, Value>,
    /// Served exactly as stored (no `Modified_Time` rendering, no field selection).
    pub raw: bool,
}

/// One request the fake answered.
#[derive(Debug, Clone)]
pub struct LoggedRequest {
    pub method: String,
    pub path: String,
    pub query: String,
    pub if_modified_since: Option<String>,
    pub status: u16,
    /// Records returned (list calls).
    pub returned: usize,
}

/// Everything the fake holds. Tests may read and change it through [`FakeZoho::with`].
#[derive(Debug)]
pub struct ZohoState {
    pub client_id: String,
    pub client_secret: String,
    pub refresh_token: String,
    /// `expires_in` of issued tokens.
    pub token_ttl: Duration,
    /// Valid access tokens and when they expire.
    pub tokens: HashMap<String, Instant>,
    /// Token requests received (all grants, including refused ones).
    pub token_requests: usize,
    token_times: VecDeque<Instant>,
    /// Zoho's throttle: more than this many token requests per 10 minutes are denied.
    pub token_limit: usize,
    next_token: u64,
    /// Module → key → record. Keys are record ids (`raw-N` for malformed records).
    pub modules: BTreeMap<String, BTreeMap<String, FakeRecord>>,
    /// Module → deleted-record entries (`id`, `deleted_time`, ...).
    pub deleted: BTreeMap<String, Vec<(DateTime<Utc>, Value)>>,
    /// Every accepted update call: `{"module": ..., "body": ...}`.
    pub updates: Vec<Value>,
    /// Every accepted upsert call (`POST /crm/v8/{module}/upsert`): `{"module": ..., "body": ...}`.
    pub upserts: Vec<Value>,
    /// Ids whose update is refused with `INVALID_DATA` (for 207 partial success).
    pub reject_updates: HashSet<String>,
    pub faults: VecDeque<Fault>,
    /// Seeded random faults on every endpoint, token requests included (see [`crate::faults`]).
    pub random_faults: Option<crate::faults::FaultPlan>,
    /// Channel id → the watch configuration last registered.
    pub channels: BTreeMap<String, Value>,
    pub requests: Vec<LoggedRequest>,
    /// Status for "nothing modified since": 304 (documented) or 204 (seen in some versions).
    pub not_modified_status: u16,
    /// Offset of the org's time zone in rendered date-times.
    pub offset: FixedOffset,
    pub credits_remaining: i64,
    /// Module → field API names served by `/settings/fields`. `None`: answered as a token
    /// without the `ZohoCRM.settings.fields.READ` scope would be (403).
    pub field_names: Option<BTreeMap<String, Vec<String>>>,
    /// Module → records computed from their index (benchmarks: a million records without
    /// holding them). Records in `modules` with the same id shadow them (edits).
    pub synthetic: BTreeMap<String, SyntheticSource>,
    next_id: u64,
    base_url: String,
}

impl ZohoState {
    fn new(base_url: String) -> Self {
        let mut modules = BTreeMap::new();
        modules.insert("Contacts".to_owned(), BTreeMap::new());
        modules.insert("Leads".to_owned(), BTreeMap::new());
        Self {
            client_id: CLIENT_ID.into(),
            client_secret: CLIENT_SECRET.into(),
            refresh_token: REFRESH_TOKEN.into(),
            token_ttl: Duration::from_secs(3600),
            tokens: HashMap::new(),
            token_requests: 0,
            token_times: VecDeque::new(),
            token_limit: 10,
            next_token: 1,
            modules,
            deleted: BTreeMap::new(),
            updates: Vec::new(),
            upserts: Vec::new(),
            reject_updates: HashSet::new(),
            faults: VecDeque::new(),
            random_faults: None,
            channels: BTreeMap::new(),
            requests: Vec::new(),
            not_modified_status: 304,
            offset: FixedOffset::east_opt(2 * 3600).unwrap(),
            credits_remaining: 100_000,
            field_names: None,
            synthetic: BTreeMap::new(),
            next_id: 4_150_868_000_001_000_000,
            base_url,
        }
    }

    fn new_id(&mut self) -> String {
        self.next_id += 1;
        self.next_id.to_string()
    }

    fn render_time(&self, t: DateTime<Utc>) -> String {
        t.with_timezone(&self.offset).to_rfc3339()
    }

    /// The record as the API shows it (all fields).
    fn render(&self, r: &FakeRecord) -> Value {
        let mut v = r.fields.clone();
        if !r.raw {
            v.insert(
                "Modified_Time".into(),
                Value::String(self.render_time(r.modified)),
            );
        }
        Value::Object(v)
    }
}

/// A running fake; stopped when dropped.
#[derive(Debug)]
pub struct FakeZoho {
    addr: SocketAddr,
    state: Arc<Mutex<ZohoState>>,
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for FakeZoho {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn now_s() -> DateTime<Utc> {
    DateTime::from_timestamp(Utc::now().timestamp(), 0).unwrap()
}

impl FakeZoho {
    /// Start on a free loopback port.
    pub fn start() -> FakeZoho {
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("fake-zoho".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                    let addr = listener.local_addr().unwrap();
                    let state = Arc::new(Mutex::new(ZohoState::new(format!("http://{addr}"))));
                    tx.send((addr, Arc::clone(&state), tokio::runtime::Handle::current()))
                        .unwrap();
                    let app = router(state);
                    axum::serve(listener, app)
                        .with_graceful_shutdown(async move {
                            let _ = stop_rx.await;
                        })
                        .await
                        .unwrap();
                });
            })
            .unwrap();
        let (addr, state, handle) = rx.recv().unwrap();
        FakeZoho {
            addr,
            state,
            handle,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT`: the accounts server and the API domain at once.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn lock(&self) -> MutexGuard<'_, ZohoState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Read or change the state.
    pub fn with<R>(&self, f: impl FnOnce(&mut ZohoState) -> R) -> R {
        f(&mut self.lock())
    }

    /// Add a record modified now; returns its id.
    pub fn insert(&self, module: &str, fields: Value) -> String {
        self.insert_at(module, fields, now_s())
    }

    /// Add a record with the given `Modified_Time`; returns its id.
    pub fn insert_at(&self, module: &str, fields: Value, modified: DateTime<Utc>) -> String {
        let mut s = self.lock();
        let mut fields = match fields {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        let id = match fields.get("id").and_then(Value::as_str) {
            Some(id) => id.to_owned(),
            None => s.new_id(),
        };
        fields.insert("id".into(), Value::String(id.clone()));
        s.modules.entry(module.to_owned()).or_default().insert(
            id.clone(),
            FakeRecord {
                modified,
                fields,
                raw: false,
            },
        );
        id
    }

    /// Add `n` contacts `person{i}@example.org` with `Newsletter = true`, modified one minute
    /// apart starting 2024-01-01 (so they sort in insertion order); returns their ids.
    pub fn seed(&self, module: &str, n: usize) -> Vec<String> {
        let base = DateTime::parse_from_rfc3339("2024-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        (0..n)
            .map(|i| {
                self.insert_at(
                    module,
                    json!({"Email": format!("person{i}@example.org"), "First_Name": format!("P{i}"),
                           "Last_Name": format!("Q{i}"), "Email_Opt_Out": false, "Newsletter": true}),
                    base + chrono::Duration::minutes(i as i64),
                )
            })
            .collect()
    }

    /// Store a malformed record exactly as given (it is served as is).
    pub fn insert_raw(&self, module: &str, value: Value, modified: DateTime<Utc>) {
        let mut s = self.lock();
        let key = format!("raw-{}", s.new_id());
        let fields = match value {
            Value::Object(m) => m,
            other => {
                let mut m = Map::new();
                m.insert("__not_an_object".into(), other);
                m
            }
        };
        s.modules.entry(module.to_owned()).or_default().insert(
            key,
            FakeRecord {
                modified,
                fields,
                raw: true,
            },
        );
    }

    /// Change fields of a record (as a CRM user would); its `Modified_Time` becomes now.
    pub fn edit(&self, module: &str, id: &str, changes: Value) {
        let mut s = self.lock();
        let r = s
            .modules
            .get_mut(module)
            .and_then(|m| m.get_mut(id))
            .unwrap_or_else(|| panic!("no record {module}/{id}"));
        if let Value::Object(changes) = changes {
            for (k, v) in changes {
                r.fields.insert(k, v);
            }
        }
        r.modified = now_s();
    }

    /// Delete a record (it appears in `/deleted`).
    pub fn delete(&self, module: &str, id: &str) {
        let mut s = self.lock();
        let removed = s.modules.get_mut(module).and_then(|m| m.remove(id));
        let name = removed
            .and_then(|r| r.fields.get("Last_Name").cloned())
            .unwrap_or(Value::Null);
        let at = now_s();
        let entry = json!({"deleted_by": {"name": "Admin", "id": "1"}, "id": id, "display_name": name,
                           "type": "recycle", "created_by": {"name": "Admin", "id": "1"},
                           "deleted_time": s.render_time(at)});
        s.deleted
            .entry(module.to_owned())
            .or_default()
            .push((at, entry));
    }

    /// A record as the API shows it.
    pub fn record(&self, module: &str, id: &str) -> Option<Value> {
        let s = self.lock();
        let r = s.modules.get(module)?.get(id)?;
        Some(s.render(r))
    }

    /// Invalidate every access token issued so far (server-side expiry).
    pub fn expire_tokens(&self) {
        self.lock().tokens.clear();
    }

    pub fn fail_next(&self, fault: Fault) {
        self.lock().faults.push_back(fault);
    }

    pub fn token_requests(&self) -> usize {
        self.lock().token_requests
    }

    /// The accepted upsert calls, oldest first.
    pub fn upserts(&self) -> Vec<Value> {
        self.lock().upserts.clone()
    }

    pub fn updates(&self) -> Vec<Value> {
        self.lock().updates.clone()
    }

    pub fn requests(&self) -> Vec<LoggedRequest> {
        self.lock().requests.clone()
    }

    pub fn channels(&self) -> Vec<Value> {
        self.lock().channels.values().cloned().collect()
    }

    /// Send a notification callback, as Zoho does, for `ids` of `module` to the registered
    /// channel (its `notify_url`, token and id). `token` overrides the channel token (forged
    /// callbacks). Returns the HTTP status the receiver answered.
    pub async fn notify(
        &self,
        module: &str,
        ids: &[&str],
        operation: &str,
        token: Option<&str>,
    ) -> Result<u16, String> {
        let (url, body) = {
            let s = self.lock();
            let channel = s
                .channels
                .values()
                .find(|c| {
                    c["events"].as_array().is_some_and(|e| {
                        e.iter().any(|e| {
                            e.as_str()
                                .is_some_and(|e| e.starts_with(&format!("{module}.")))
                        })
                    })
                })
                .ok_or_else(|| format!("no notification channel registered for {module}"))?;
            let url = channel["notify_url"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let body = json!({
                "server_time": Utc::now().timestamp_millis(),
                "query_params": {},
                "module": module,
                "resource_uri": format!("{}/crm/v2/{module}", s.base_url),
                "ids": ids,
                "affected_fields": [],
                "operation": operation,
                "channel_id": channel["channel_id"],
                "token": token.map(Value::from).unwrap_or_else(|| channel["token"].clone()),
            });
            (url, body)
        };
        self.post_json(url, body).await
    }

    /// POST any JSON to a URL from the fake's runtime (e.g. a hand-made callback).
    pub async fn post_json(&self, url: String, body: Value) -> Result<u16, String> {
        let task = self.handle.spawn(async move {
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .map_err(|e| e.to_string())?;
            client
                .post(url)
                .json(&body)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .map_err(|e| e.to_string())
        });
        task.await.map_err(|e| e.to_string())?
    }
}

// ---------------------------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------------------------

type Shared = Arc<Mutex<ZohoState>>;

fn router(state: Shared) -> Router {
    Router::new()
        .route("/oauth/v2/token", post(token))
        .route(
            "/crm/v8/actions/watch",
            get(watch).post(watch).put(watch).delete(watch),
        )
        .route("/crm/v8/settings/fields", get(field_metadata))
        .route("/crm/v8/{module}", get(list).put(update))
        .route("/crm/v8/{module}/deleted", get(deleted))
        .route("/crm/v8/{module}/upsert", post(upsert))
        .route("/crm/v8/{module}/{id}", get(one))
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
        let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
        match s.random_faults.as_mut() {
            Some(plan) => (plan.roll(&endpoint), plan.slow),
            None => (None, Duration::ZERO),
        }
    };
    crate::faults::apply(fault, slow, req, next).await
}

fn json_response(status: u16, body: &Value) -> Response {
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        [(header::CONTENT_TYPE, "application/json;charset=UTF-8")],
        body.to_string(),
    )
        .into_response()
}

fn envelope(status: u16, code: &str, message: &str, details: Value) -> Response {
    json_response(
        status,
        &json!({"code": code, "details": details, "message": message, "status": "error"}),
    )
}

fn empty(status: u16) -> Response {
    StatusCode::from_u16(status)
        .unwrap_or(StatusCode::NO_CONTENT)
        .into_response()
}

/// `application/x-www-form-urlencoded` (and query strings) into pairs.
fn parse_form(text: &str) -> HashMap<String, String> {
    fn decode(s: &str) -> String {
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < bytes.len() => {
                    match std::str::from_utf8(&bytes[i + 1..i + 3])
                        .ok()
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
    text.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn log(
    s: &mut ZohoState,
    method: &str,
    path: &str,
    query: &str,
    ims: Option<&str>,
    status: u16,
    returned: usize,
) {
    s.requests.push(LoggedRequest {
        method: method.to_owned(),
        path: path.to_owned(),
        query: query.to_owned(),
        if_modified_since: ims.map(str::to_owned),
        status,
        returned,
    });
}

async fn token(State(state): State<Shared>, RawQuery(query): RawQuery, body: Bytes) -> Response {
    let mut params = parse_form(query.as_deref().unwrap_or_default());
    params.extend(parse_form(&String::from_utf8_lossy(&body)));
    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
    s.token_requests += 1;
    let now = Instant::now();
    while s
        .token_times
        .front()
        .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(600))
    {
        s.token_times.pop_front();
    }
    s.token_times.push_back(now);
    if s.token_times.len() > s.token_limit {
        return json_response(
            400,
            &json!({"error": "Access Denied", "error_description": "You have made too many requests continuously. Please try again after some time."}),
        );
    }
    let p = |k: &str| params.get(k).map(String::as_str).unwrap_or_default();
    if p("client_id") != s.client_id {
        return json_response(200, &json!({"error": "invalid_client"}));
    }
    if p("client_secret") != s.client_secret {
        return json_response(200, &json!({"error": "invalid_client_secret"}));
    }
    let grant_ok = match p("grant_type") {
        "refresh_token" => p("refresh_token") == s.refresh_token,
        "authorization_code" => !p("code").is_empty(),
        _ => false,
    };
    if !grant_ok {
        return json_response(200, &json!({"error": "invalid_code"}));
    }
    let token = format!(
        "1000.fakeaccess{}.{}",
        s.next_token,
        now.elapsed().as_nanos()
    );
    s.next_token += 1;
    let ttl = s.token_ttl;
    s.tokens.insert(token.clone(), now + ttl);
    let mut body = json!({"access_token": token, "api_domain": s.base_url, "token_type": "Bearer",
                          "expires_in": ttl.as_secs(), "scope": "ZohoCRM.modules.ALL ZohoCRM.notifications.ALL"});
    if p("grant_type") == "authorization_code" {
        body["refresh_token"] = Value::String(s.refresh_token.clone());
    }
    json_response(200, &body)
}

/// Authorization and injected faults shared by every CRM call: `Some(response)` ends it.
async fn gate(state: &Shared, headers: &HeaderMap) -> Option<Response> {
    let (fault, authorized) = {
        let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Zoho-oauthtoken "))
            .unwrap_or_default()
            .to_owned();
        let now = Instant::now();
        let authorized = s.tokens.get(&presented).is_some_and(|exp| now < *exp);
        let fault = if authorized {
            s.faults.pop_front()
        } else {
            None
        };
        if authorized {
            s.credits_remaining -= 1;
        }
        (fault, authorized)
    };
    if !authorized {
        return Some(envelope(
            401,
            "INVALID_TOKEN",
            "invalid oauth token",
            json!({}),
        ));
    }
    match fault {
        None => None,
        Some(Fault::Delay(d)) => {
            tokio::time::sleep(d).await;
            None
        }
        Some(Fault::TooManyRequests { retry_after }) => {
            let mut r = envelope(
                429,
                "TOO_MANY_REQUESTS",
                "Number of API requests for the 24 hour period is exceeded or the concurrency limit of the user for the app is exceeded",
                json!({}),
            );
            if let Some(secs) = retry_after {
                r.headers_mut()
                    .insert(header::RETRY_AFTER, secs.to_string().parse().unwrap());
            }
            Some(r)
        }
        Some(Fault::Status(code)) => Some(envelope(
            code,
            if code >= 500 {
                "INTERNAL_ERROR"
            } else {
                "INVALID_DATA"
            },
            "injected failure",
            json!({}),
        )),
        Some(Fault::Garbage) => Some(
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                "<html>502 Bad Gateway</html>{\"data\":[",
            )
                .into_response(),
        ),
    }
}

fn with_credits(mut r: Response, credits: i64) -> Response {
    r.headers_mut().insert(
        "X-API-CREDITS-REMAINING",
        credits.to_string().parse().unwrap(),
    );
    r
}

fn if_modified_since(
    headers: &HeaderMap,
) -> Result<Option<(String, DateTime<Utc>)>, Box<Response>> {
    let Some(raw) = headers
        .get(header::IF_MODIFIED_SINCE)
        .and_then(|v| v.to_str().ok())
    else {
        return Ok(None);
    };
    DateTime::parse_from_rfc3339(raw.trim())
        .map(|t| Some((raw.to_owned(), t.with_timezone(&Utc))))
        .map_err(|_| {
            Box::new(envelope(
                400,
                "INVALID_DATA",
                "invalid If-Modified-Since",
                json!({"header_name": "If-Modified-Since"}),
            ))
        })
}

/// `GET /crm/v8/settings/fields?module=M`: the module's fields (`api_name` only).
async fn field_metadata(
    State(state): State<Shared>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = gate(&state, &headers).await {
        return r;
    }
    let q = parse_form(&query.unwrap_or_default());
    let s = state.lock().unwrap_or_else(|p| p.into_inner());
    let Some(module) = q
        .get("module")
        .filter(|m| s.modules.contains_key(m.as_str()))
    else {
        return envelope(
            400,
            "INVALID_MODULE",
            "the module name given seems to be invalid",
            json!({}),
        );
    };
    // Without declared fields the fake behaves like a token lacking the
    // `ZohoCRM.settings.fields.READ` scope: the connector then skips its field check.
    let Some(names) = s.field_names.as_ref().and_then(|f| f.get(module)).cloned() else {
        return envelope(403, "NO_PERMISSION", "permission denied", json!({}));
    };
    let fields: Vec<Value> = names.iter().map(|n| json!({ "api_name": n })).collect();
    json_response(200, &json!({ "fields": fields }))
}

async fn list(
    State(state): State<Shared>,
    Path(module): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = gate(&state, &headers).await {
        return r;
    }
    let raw_query = query.unwrap_or_default();
    let q = parse_form(&raw_query);
    let ims = match if_modified_since(&headers) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
    let path = format!("/crm/v8/{module}");
    let (status, response, returned) = list_inner(&s, &module, &q, ims.as_ref().map(|(_, t)| *t));
    log(
        &mut s,
        "GET",
        &path,
        &raw_query,
        ims.as_ref().map(|(r, _)| r.as_str()),
        status,
        returned,
    );
    let credits = s.credits_remaining;
    with_credits(response, credits)
}

fn list_inner(
    s: &ZohoState,
    module: &str,
    q: &HashMap<String, String>,
    since: Option<DateTime<Utc>>,
) -> (u16, Response, usize) {
    let err = |status: u16, code: &str, msg: &str, details: Value| {
        (status, envelope(status, code, msg, details), 0)
    };
    let Some(records) = s.modules.get(module) else {
        return err(
            400,
            "INVALID_MODULE",
            "the module name given seems to be invalid",
            json!({}),
        );
    };
    let Some(fields) = q.get("fields").filter(|f| !f.is_empty()) else {
        return err(
            400,
            "REQUIRED_PARAM_MISSING",
            "One of the expected parameter is missing",
            json!({"param_name": "fields"}),
        );
    };
    let fields: Vec<&str> = fields.split(',').map(str::trim).collect();
    if fields.len() > 50 {
        return err(
            400,
            "LIMIT_EXCEEDED",
            "fields limit exceeded",
            json!({"limit": 50, "param_name": "fields"}),
        );
    }
    let per_page: usize = q
        .get("per_page")
        .and_then(|p| p.parse().ok())
        .unwrap_or(200);
    if per_page == 0 || per_page > 200 {
        return err(
            400,
            "INVALID_DATA",
            "invalid per_page",
            json!({"param_name": "per_page", "maximum_length": 200}),
        );
    }
    if q.contains_key("page") && q.contains_key("page_token") {
        return err(
            400,
            "AMBIGUITY_DURING_PROCESSING",
            "page and page_token cannot be given together",
            json!({"ambiguity_due_to": ["page", "page_token"]}),
        );
    }
    let sort_by = q.get("sort_by").map(String::as_str).unwrap_or("id");
    if !["id", "Created_Time", "Modified_Time"].contains(&sort_by) {
        return err(
            400,
            "INVALID_DATA",
            "invalid data",
            json!({"param_name": "sort_by", "supported_values": ["id", "Created_Time", "Modified_Time"]}),
        );
    }
    let desc = q.get("sort_order").map(String::as_str) == Some("desc");
    if let Some(src) = s.synthetic.get(module) {
        return synthetic::list_page(s, src, records, module, q, &fields, per_page, since);
    }
    let mut rows: Vec<(&String, &FakeRecord)> = records
        .iter()
        .filter(|(_, r)| since.is_none_or(|t| r.modified >= t))
        .collect();
    let key = |(k, r): &(&String, &FakeRecord)| {
        if sort_by == "Modified_Time" {
            (r.modified.timestamp(), (*k).clone())
        } else {
            (0, (*k).clone())
        }
    };
    rows.sort_by_key(key);
    if desc {
        rows.reverse();
    }
    let bound = token_bound(module, sort_by, desc, since);
    let (start, page) = match page_start(q, &bound, per_page) {
        Ok(PageStart::After(after)) => {
            let start = rows
                .iter()
                .position(|row| {
                    if desc {
                        key(row) < after
                    } else {
                        key(row) > after
                    }
                })
                .unwrap_or(rows.len());
            (start, None)
        }
        Ok(PageStart::Page(page)) => ((page - 1) * per_page, Some(page)),
        Err((status, code, msg, details)) => return err(status, code, msg, details),
    };
    let chunk: Vec<&(&String, &FakeRecord)> = rows.iter().skip(start).take(per_page).collect();
    if chunk.is_empty() {
        let status = if since.is_some() {
            s.not_modified_status
        } else {
            204
        };
        return (status, empty(status), 0);
    }
    let more = start + chunk.len() < rows.len();
    let data: Vec<Value> = chunk
        .iter()
        .map(|(_, r)| {
            if r.raw {
                return r
                    .fields
                    .get("__not_an_object")
                    .cloned()
                    .unwrap_or_else(|| Value::Object(r.fields.clone()));
            }
            let full = s.render(r);
            let mut out = Map::new();
            out.insert("id".into(), full["id"].clone());
            for f in &fields {
                if let Some(v) = full.get(*f) {
                    out.insert((*f).to_owned(), v.clone());
                }
            }
            Value::Object(out)
        })
        .collect();
    let next_page_token = more.then(|| {
        let last = chunk[chunk.len() - 1];
        let (ts, k) = key(last);
        encode_token(ts, &k, &bound)
    });
    let n = data.len();
    let body = json!({"data": data, "info": {
        "per_page": per_page, "count": n, "page": page.unwrap_or(0), "sort_by": sort_by,
        "sort_order": if desc { "desc" } else { "asc" }, "more_records": more,
        "next_page_token": next_page_token, "previous_page_token": null,
        "page_token_expiry": next_page_token.as_ref().map(|_| s.render_time(now_s() + chrono::Duration::days(1))),
    }});
    (200, json_response(200, &body), n)
}

fn encode_token(ts: i64, key: &str, bound: &str) -> String {
    let raw = format!("{ts}\u{1f}{key}\u{1f}{bound}");
    raw.bytes().map(|b| format!("{b:02x}")).collect()
}

/// Where a list request starts (shared by stored and synthetic modules).
enum PageStart {
    /// After the `(Modified_Time or 0, id)` position a `page_token` holds.
    After((i64, String)),
    /// At this `page` (1-based), within the first 2,000 records.
    Page(usize),
}

/// What a `page_token` is bound to: the query it came from.
fn token_bound(module: &str, sort_by: &str, desc: bool, since: Option<DateTime<Utc>>) -> String {
    format!(
        "{module}|{}|{sort_by}|{desc}",
        since.map(|t| t.timestamp()).unwrap_or(-1)
    )
}

/// The start a list request's `page_token` (bound to `bound`, see [`token_bound`]) or `page`
/// asks for; a refusal as `(status, code, message, details)`.
fn page_start(
    q: &HashMap<String, String>,
    bound: &str,
    per_page: usize,
) -> Result<PageStart, (u16, &'static str, &'static str, Value)> {
    match (q.get("page_token"), q.get("page")) {
        (Some(token), _) => {
            let Some((ts, k, b)) = decode_token(token) else {
                return Err((
                    400,
                    "INVALID_DATA",
                    "invalid page_token",
                    json!({"param_name": "page_token"}),
                ));
            };
            if b != bound {
                return Err((
                    400,
                    "TOKEN_BOUND_DATA_MISMATCH",
                    "the page token does not match the query",
                    json!({"param_name": "page_token"}),
                ));
            }
            Ok(PageStart::After((ts, k)))
        }
        (None, page) => {
            let page: usize = page.and_then(|p| p.parse().ok()).unwrap_or(1).max(1);
            if page * per_page > 2000 {
                return Err((
                    400,
                    "DISCRETE_PAGINATION_LIMIT_EXCEEDED",
                    "You can only get the first 2000 records without using page_token param.",
                    json!({"limit": 2000}),
                ));
            }
            Ok(PageStart::Page(page))
        }
    }
}

fn decode_token(token: &str) -> Option<(i64, String, String)> {
    if !token.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok())
        .collect();
    let text = String::from_utf8(bytes?).ok()?;
    let mut parts = text.split('\u{1f}');
    let ts = parts.next()?.parse().ok()?;
    let key = parts.next()?.to_owned();
    let bound = parts.next()?.to_owned();
    Some((ts, key, bound))
}

async fn one(
    State(state): State<Shared>,
    Path((module, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = gate(&state, &headers).await {
        return r;
    }
    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
    let path = format!("/crm/v8/{module}/{id}");
    if !s.modules.contains_key(&module) {
        log(&mut s, "GET", &path, "", None, 400, 0);
        return envelope(
            400,
            "INVALID_MODULE",
            "the module name given seems to be invalid",
            json!({}),
        );
    }
    let found = s
        .modules
        .get(&module)
        .and_then(|m| m.get(&id))
        .map(|r| s.render(r))
        .or_else(|| synthetic::find(&s, &module, &id));
    match found {
        Some(v) => {
            log(&mut s, "GET", &path, "", None, 200, 1);
            json_response(200, &json!({"data": [v]}))
        }
        None => {
            log(&mut s, "GET", &path, "", None, 204, 0);
            empty(204)
        }
    }
}

async fn deleted(
    State(state): State<Shared>,
    Path(module): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = gate(&state, &headers).await {
        return r;
    }
    let raw_query = query.unwrap_or_default();
    let q = parse_form(&raw_query);
    let ims = match if_modified_since(&headers) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
    let per_page: usize = q
        .get("per_page")
        .and_then(|p| p.parse().ok())
        .unwrap_or(200)
        .clamp(1, 200);
    let page: usize = q
        .get("page")
        .and_then(|p| p.parse().ok())
        .unwrap_or(1)
        .max(1);
    let rows: Vec<Value> = s
        .deleted
        .get(&module)
        .map(|d| {
            d.iter()
                .filter(|(at, _)| ims.as_ref().is_none_or(|(_, t)| at >= t))
                .map(|(_, v)| v.clone())
                .collect()
        })
        .unwrap_or_default();
    let chunk: Vec<Value> = rows
        .iter()
        .skip((page - 1) * per_page)
        .take(per_page)
        .cloned()
        .collect();
    let path = format!("/crm/v8/{module}/deleted");
    if chunk.is_empty() {
        log(
            &mut s,
            "GET",
            &path,
            &raw_query,
            ims.as_ref().map(|(r, _)| r.as_str()),
            204,
            0,
        );
        return empty(204);
    }
    let more = page * per_page < rows.len();
    let n = chunk.len();
    log(
        &mut s,
        "GET",
        &path,
        &raw_query,
        ims.as_ref().map(|(r, _)| r.as_str()),
        200,
        n,
    );
    json_response(
        200,
        &json!({"data": chunk, "info": {"per_page": per_page, "count": n, "page": page, "more_records": more}}),
    )
}

async fn update(
    State(state): State<Shared>,
    Path(module): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = format!("/crm/v8/{module}");
    let (mut s, parsed, items) =
        match write_request(&state, &headers, "PUT", &path, &module, &body).await {
            Ok(r) => r,
            Err(refused) => return *refused,
        };
    let now = now_s();
    let mut results = Vec::new();
    let mut ok = 0;
    for (i, item) in items.iter().enumerate() {
        let Some(id) = item.get("id").and_then(Value::as_str).map(str::to_owned) else {
            results.push(json!({"code": "MANDATORY_NOT_FOUND", "details": {"api_name": "id", "json_path": format!("$.data[{i}].id")}, "message": "required field not found", "status": "error"}));
            continue;
        };
        let rejected = s.reject_updates.contains(&id);
        let rendered_now = s.render_time(now);
        // A generated record is stored once written, and shadows the generated one.
        if !rejected
            && !s.modules.get(&module).is_some_and(|m| m.contains_key(&id))
            && let Some(record) = synthetic::stored_form(&s, &module, &id)
        {
            s.modules
                .entry(module.clone())
                .or_default()
                .insert(id.clone(), record);
        }
        let Some(r) = s
            .modules
            .get_mut(&module)
            .and_then(|m| m.get_mut(&id))
            .filter(|_| !rejected)
        else {
            results.push(json!({"code": "INVALID_DATA", "details": {"api_name": "id", "json_path": format!("$.data[{i}].id"), "id": id}, "message": "the related id given seems to be invalid", "status": "error"}));
            continue;
        };
        merge_fields(r, item);
        r.modified = now;
        ok += 1;
        results.push(json!({"code": "SUCCESS", "details": {"Modified_Time": rendered_now, "Modified_By": {"name": "API User", "id": "1"}, "Created_Time": rendered_now, "id": id, "Created_By": {"name": "API User", "id": "1"}}, "message": "record updated", "status": "success"}));
    }
    s.updates.push(json!({"module": module, "body": parsed}));
    let status = if ok == results.len() {
        200
    } else if ok == 0 {
        400
    } else {
        207
    };
    log(&mut s, "PUT", &path, "", None, status, ok);
    let credits = s.credits_remaining;
    with_credits(json_response(status, &json!({"data": results})), credits)
}

/// The checks every write call makes before looking at records (the token and seeded
/// faults, the body, `data`, at most 100 records, a known module): the locked state, the body
/// and its records, or the refusal (logged).
async fn write_request<'s>(
    state: &'s Shared,
    headers: &HeaderMap,
    method: &str,
    path: &str,
    module: &str,
    body: &[u8],
) -> Result<(MutexGuard<'s, ZohoState>, Value, Vec<Value>), Box<Response>> {
    if let Some(r) = gate(state, headers).await {
        return Err(Box::new(r));
    }
    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
    let refuse = |s: &mut ZohoState, r: Response| {
        log(s, method, path, "", None, 400, 0);
        Err(Box::new(r))
    };
    let Ok(parsed) = serde_json::from_slice::<Value>(body) else {
        return refuse(
            &mut s,
            envelope(400, "INVALID_DATA", "body is not JSON", json!({})),
        );
    };
    let Some(items) = parsed.get("data").and_then(Value::as_array).cloned() else {
        let r = envelope(
            400,
            "REQUIRED_PARAM_MISSING",
            "data is missing",
            json!({"param_name": "data"}),
        );
        return refuse(&mut s, r);
    };
    if items.len() > 100 {
        let r = envelope(
            400,
            "LIMIT_EXCEEDED",
            "more than 100 records",
            json!({"limit": 100}),
        );
        return refuse(&mut s, r);
    }
    if !s.modules.contains_key(module) {
        let r = envelope(
            400,
            "INVALID_MODULE",
            "the module name given seems to be invalid",
            json!({}),
        );
        return refuse(&mut s, r);
    }
    Ok((s, parsed, items))
}

/// Apply a write's fields to a record: nested objects (the consent lookup) are merged.
fn merge_fields(r: &mut FakeRecord, item: &Value) {
    let Value::Object(changes) = item else { return };
    for (k, v) in changes {
        if k == "id" {
            continue;
        }
        match (r.fields.get_mut(k), v) {
            (Some(Value::Object(old)), Value::Object(new)) => {
                for (nk, nv) in new {
                    old.insert(nk.clone(), nv.clone());
                }
            }
            _ => {
                r.fields.insert(k.clone(), v.clone());
            }
        }
    }
}

/// `POST /crm/v8/{module}/upsert`: insert, or update the record whose
/// `duplicate_check_fields` match (default: the module's system check, `Email`, for Contacts
/// and Leads). Per record `action` is `insert` or `update` and `duplicate_field` the field
/// that matched; `201` when anything was inserted, else `200`; `Last_Name` is mandatory on an
/// insert into Contacts or Leads.
async fn upsert(
    State(state): State<Shared>,
    Path(module): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = format!("/crm/v8/{module}/upsert");
    let (mut s, parsed, items) =
        match write_request(&state, &headers, "POST", &path, &module, &body).await {
            Ok(r) => r,
            Err(refused) => return *refused,
        };
    let check: Vec<String> = parsed
        .get("duplicate_check_fields")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_else(|| vec!["Email".to_owned()]);
    let now = now_s();
    let rendered_now = s.render_time(now);
    let mut results = Vec::new();
    let (mut ok, mut inserted) = (0, false);
    for (i, item) in items.iter().enumerate() {
        let same = |a: &Value, b: &Value| match (a.as_str(), b.as_str()) {
            (Some(a), Some(b)) => a.eq_ignore_ascii_case(b),
            _ => a == b,
        };
        let matched = s.modules.get(&module).and_then(|m| {
            m.iter().find_map(|(id, r)| {
                check
                    .iter()
                    .find(|f| {
                        matches!((r.fields.get(*f), item.get(*f)), (Some(a), Some(b)) if same(a, b))
                    })
                    .map(|f| (id.clone(), f.clone()))
            })
        });
        let (id, action, duplicate_field, message) = match matched {
            Some((id, field)) => {
                if let Some(r) = s.modules.get_mut(&module).and_then(|m| m.get_mut(&id)) {
                    merge_fields(r, item);
                    r.modified = now;
                }
                (id, "update", Value::String(field), "record updated")
            }
            None => {
                let needs_last_name = matches!(module.as_str(), "Contacts" | "Leads");
                if needs_last_name
                    && item
                        .get("Last_Name")
                        .and_then(Value::as_str)
                        .is_none_or(str::is_empty)
                {
                    results.push(json!({"code": "MANDATORY_NOT_FOUND", "details": {"api_name": "Last_Name", "json_path": format!("$.data[{i}].Last_Name")}, "message": "required field not found", "status": "error"}));
                    continue;
                }
                let id = s.new_id();
                let mut fields = Map::new();
                fields.insert("id".into(), Value::String(id.clone()));
                let mut record = FakeRecord {
                    modified: now,
                    fields,
                    raw: false,
                };
                merge_fields(&mut record, item);
                s.modules
                    .entry(module.clone())
                    .or_default()
                    .insert(id.clone(), record);
                inserted = true;
                (id, "insert", Value::Null, "record added")
            }
        };
        ok += 1;
        results.push(json!({"code": "SUCCESS", "duplicate_field": duplicate_field, "action": action, "details": {"Modified_Time": rendered_now, "Modified_By": {"name": "API User", "id": "1"}, "Created_Time": rendered_now, "id": id, "Created_By": {"name": "API User", "id": "1"}}, "message": message, "status": "success"}));
    }
    s.upserts.push(json!({"module": module, "body": parsed}));
    let status = match (ok == results.len(), ok) {
        (_, 0) => 400,
        (true, _) if inserted => 201,
        (true, _) => 200,
        _ => 207,
    };
    log(&mut s, "POST", &path, "", None, status, ok);
    let credits = s.credits_remaining;
    with_credits(json_response(status, &json!({"data": results})), credits)
}

async fn watch(
    State(state): State<Shared>,
    method: Method,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(r) = gate(&state, &headers).await {
        return r;
    }
    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
    let path = "/crm/v8/actions/watch";
    if method == Method::GET {
        let list: Vec<Value> = s.channels.values().cloned().collect();
        log(&mut s, "GET", path, "", None, 200, list.len());
        return json_response(
            200,
            &json!({"watch": list, "info": {"count": list.len(), "more_records": false}}),
        );
    }
    if method == Method::DELETE {
        let q = parse_form(query.as_deref().unwrap_or_default());
        for id in q
            .get("channel_ids")
            .map(String::as_str)
            .unwrap_or_default()
            .split(',')
        {
            s.channels.remove(id);
        }
        log(&mut s, "DELETE", path, "", None, 200, 0);
        return json_response(
            200,
            &json!({"watch": [{"code": "SUCCESS", "status": "success", "message": "Successfully unsubscribed"}]}),
        );
    }
    let Some(items) = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v.get("watch").and_then(Value::as_array).cloned())
    else {
        log(&mut s, method.as_str(), path, "", None, 400, 0);
        return envelope(400, "INVALID_DATA", "watch is missing", json!({}));
    };
    let mut out = Vec::new();
    let mut all_ok = true;
    for item in items {
        let id = match &item["channel_id"] {
            Value::Number(n) => n.to_string(),
            Value::String(t) => t.clone(),
            _ => String::new(),
        };
        let valid = !id.is_empty()
            && item["notify_url"].is_string()
            && item["events"].as_array().is_some_and(|e| !e.is_empty())
            && item["token"].as_str().is_none_or(|t| t.len() <= 50);
        if !valid || (method == Method::PUT && !s.channels.contains_key(&id)) {
            all_ok = false;
            out.push(json!({"code": "INVALID_DATA", "details": {"channel_id": id}, "message": "invalid data", "status": "error"}));
            continue;
        }
        let events: Vec<Value> = item["events"]
            .as_array()
            .map(|e| {
                e.iter()
                    .map(|ev| {
                        let module = ev.as_str().unwrap_or_default().split('.').next().unwrap_or_default();
                        json!({"channel_expiry": item["channel_expiry"], "resource_uri": format!("{}/crm/v8/{module}", s.base_url),
                               "resource_id": "1", "resource_name": module, "channel_id": id})
                    })
                    .collect()
            })
            .unwrap_or_default();
        s.channels.insert(id, item);
        out.push(json!({"code": "SUCCESS", "details": {"events": events}, "message": "Successfully subscribed for actions-watch of the given module", "status": "success"}));
    }
    let status = match (all_ok, method == Method::POST) {
        (true, true) => 201,
        (true, false) => 200,
        (false, _) => 400,
    };
    log(&mut s, method.as_str(), path, "", None, status, 0);
    json_response(status, &json!({"watch": out}))
}
