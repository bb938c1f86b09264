//! A fake Zoho Campaigns (v1.1) on `127.0.0.1:0`, speaking the wire formats of
//! Zoho Campaigns' public API pages (summarised in README.md "Zoho Campaigns"), with its own OAuth token
//! endpoint (`/oauth/v2/token`, refresh grant) so it runs alone:
//!
//! Why one long file: it is one vendor API surface with one shared state (lists,
//! subscribers, quotas), read side by side with the vendor's documentation.
//!
//! * every answer is **HTTP 200** with `status` and a **string** `code` (`"0"` on success);
//!   parameters are read from the query string and from a form body alike; `resfmt=JSON` is
//!   required (without it the fake answers XML, as Zoho does by default);
//! * `getmailinglists` (`is_public` as text, `2401` when there is no list),
//!   `json/listsubscribe` (`contactinfo` as strict JSON or Zoho's loose `{First Name:mac,...}`;
//!   a signup-form (public) list holds the contact pending and counts a confirmation mail, a
//!   private one adds at once; `2501`, `2004`, `2005`, `2001`), `addlistsubscribersinbulk`
//!   (at most 10 `emailids`, `903`), `json/listunsubscribe` (for an address the list does
//!   not hold: `2103`, or `2101` with [`FakeCampaignsOptions::unknown_unsubscribe_retry`]),
//!   `getlistsubscribers` (`status` filter, `fromindex`/`range`, `2203` when nothing
//!   matches), `listsubscriberscount`, `json/contactdonotmail`; an unknown path is `1004`;
//! * per-endpoint quotas with the documented numbers and the lock (30 min; 10 min for the bulk
//!   add), as sliding windows; [`FakeCampaignsOptions::time_scale`] shrinks every window and
//!   lock so tests exercise them in seconds. The lock-out answer is not documented: the fake
//!   sends `{"status":"error","code":"429","message":"... locked ..."}` (code configurable);
//! * test hooks: unsubscribe / bounce / confirm an address inside Campaigns, inspect members,
//!   count calls and locks, inject faults.
//!
//! Inferred behaviour, where Zoho's documents say nothing: re-subscribing an address that
//! unsubscribed makes it active again with a new `added_time`; the bulk add on a public list
//! leaves contacts pending.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

pub use crate::zoho::{CLIENT_ID, CLIENT_SECRET, REFRESH_TOKEN};

/// Where a contact stands on a list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberStatus {
    /// Subscribed to a signup-form list, confirmation mail not clicked yet.
    Pending,
    Active,
    Unsub,
    Bounce,
}

#[derive(Debug, Clone)]
pub struct Member {
    pub email: String,
    /// Display name → value, as sent in `contactinfo`.
    pub fields: BTreeMap<String, String>,
    pub status: MemberStatus,
    /// Epoch ms, as `added_time`.
    pub added: i64,
    pub source: Option<String>,
}

#[derive(Debug, Clone)]
pub struct FakeList {
    pub key: String,
    pub name: String,
    /// Signup form enabled: `listsubscribe` sends a confirmation mail.
    pub public: bool,
    /// Lower-cased address → member.
    pub members: BTreeMap<String, Member>,
    /// Confirmation mails "sent" by Zoho for this list.
    pub confirmation_mails: usize,
}

/// Quota of one endpoint.
#[derive(Debug, Clone)]
pub struct Quota {
    pub windows: Vec<(u32, Duration)>,
    pub lock: Duration,
}

/// A fault for the next API call (token requests are not affected).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CampaignsFault {
    /// This HTTP status with an empty body.
    Status(u16),
    /// HTTP 200 with a body that is not JSON.
    Garbage,
    /// HTTP 200 with `{"status":"error","code":code,"message":message}`.
    Code { code: String, message: String },
}

#[derive(Debug, Clone)]
pub struct FakeCampaignsOptions {
    /// Multiply every quota window and lock by this (1.0: Zoho's real numbers).
    pub time_scale: f64,
    /// The in-body code `json/listunsubscribe` answers for an address the list does not hold
    /// (see [`CampaignsState::unknown_unsubscribe_code`]).
    pub unknown_unsubscribe_code: String,
}

impl Default for FakeCampaignsOptions {
    fn default() -> Self {
        Self {
            time_scale: 1.0,
            unknown_unsubscribe_code: "2103".into(),
        }
    }
}

impl FakeCampaignsOptions {
    /// Answer `2101` "Please retry after sometime." for an address the list does not hold,
    /// the only error code Zoho's contact-unsubscribe page documents.
    pub fn unknown_unsubscribe_retry() -> Self {
        Self {
            unknown_unsubscribe_code: "2101".into(),
            ..Self::default()
        }
    }
}

/// Everything the fake holds; reachable with [`FakeCampaigns::with`].
#[derive(Debug)]
pub struct CampaignsState {
    pub client_id: String,
    pub client_secret: String,
    pub refresh_token: String,
    pub tokens: HashSet<String>,
    pub token_requests: usize,
    next_token: u64,
    /// listkey → list.
    pub lists: BTreeMap<String, FakeList>,
    /// Endpoint name (`listsubscribe`, ...) → quota.
    pub quotas: HashMap<String, Quota>,
    windows: HashMap<String, Vec<VecDeque<Instant>>>,
    pub locked_until: HashMap<String, Instant>,
    /// Locks triggered, per endpoint.
    pub locks: BTreeMap<String, u64>,
    /// Calls answered, per endpoint (including refused ones).
    pub calls: BTreeMap<String, u64>,
    /// Per endpoint, the most calls any of its windows ever held (one number per window, in
    /// the order of its quota), counting a call that exceeded it: a test asserts these stay
    /// within the limits.
    pub peaks: BTreeMap<String, Vec<usize>>,
    /// Calls that were inside the quota, with when they arrived (for rate measurements).
    pub accepted: Vec<(String, Instant)>,
    /// In-body code of the lock-out answer.
    pub lock_code: String,
    /// What `json/listunsubscribe` answers for an address the list does not hold: `2103`
    /// "Contact does not exist." (the global catalog, the default) or `2101` "Please retry
    /// after sometime." (the only code the endpoint's own page lists); the reference does not
    /// say which one Zoho sends, so tests choose.
    pub unknown_unsubscribe_code: String,
    /// Local parts treated as group addresses (`2005`).
    pub group_locals: Vec<String>,
    pub do_not_mail: HashSet<String>,
    pub faults: VecDeque<CampaignsFault>,
    /// Seeded random faults on every endpoint, token requests included (see [`crate::faults`]).
    pub random_faults: Option<crate::faults::FaultPlan>,
}

/// (endpoint, documented windows as (calls, seconds), lock in seconds).
type EndpointQuota = (&'static str, &'static [(u32, u64)], u64);

const ENDPOINTS: [EndpointQuota; 7] = [
    ("getmailinglists", &[(500, 300)], 1800),
    (
        "listsubscribe",
        &[(500, 60), (12_500, 3600), (75_000, 86_400)],
        1800,
    ),
    ("listunsubscribe", &[(500, 300)], 1800),
    ("addlistsubscribersinbulk", &[(2000, 60)], 600),
    ("getlistsubscribers", &[(500, 300)], 1800),
    ("listsubscriberscount", &[(500, 300)], 1800),
    ("contactdonotmail", &[(500, 300)], 1800),
];

impl CampaignsState {
    fn new(options: &FakeCampaignsOptions) -> Self {
        let scale = |secs: u64| Duration::from_secs(secs).mul_f64(options.time_scale);
        let quotas = ENDPOINTS
            .iter()
            .map(|(name, windows, lock)| {
                (
                    (*name).to_owned(),
                    Quota {
                        windows: windows.iter().map(|(n, s)| (*n, scale(*s))).collect(),
                        lock: scale(*lock),
                    },
                )
            })
            .collect();
        Self {
            client_id: CLIENT_ID.into(),
            client_secret: CLIENT_SECRET.into(),
            refresh_token: REFRESH_TOKEN.into(),
            tokens: HashSet::new(),
            token_requests: 0,
            next_token: 1,
            lists: BTreeMap::new(),
            quotas,
            windows: HashMap::new(),
            locked_until: HashMap::new(),
            locks: BTreeMap::new(),
            calls: BTreeMap::new(),
            peaks: BTreeMap::new(),
            accepted: Vec::new(),
            lock_code: "429".into(),
            unknown_unsubscribe_code: options.unknown_unsubscribe_code.clone(),
            group_locals: vec![
                "info".into(),
                "sales".into(),
                "admin".into(),
                "support".into(),
            ],
            do_not_mail: HashSet::new(),
            faults: VecDeque::new(),
            random_faults: None,
        }
    }

    /// Count a call against the quota; `false` when it locks (or is locked).
    fn admit(&mut self, endpoint: &str) -> bool {
        let now = Instant::now();
        if let Some(until) = self.locked_until.get(endpoint) {
            if now < *until {
                return false;
            }
            self.locked_until.remove(endpoint);
        }
        let Some(quota) = self.quotas.get(endpoint).cloned() else {
            return true;
        };
        let logs = self
            .windows
            .entry(endpoint.to_owned())
            .or_insert_with(|| vec![VecDeque::new(); quota.windows.len()]);
        if logs.len() != quota.windows.len() {
            *logs = vec![VecDeque::new(); quota.windows.len()];
        }
        let mut over = false;
        let peaks = self
            .peaks
            .entry(endpoint.to_owned())
            .or_insert_with(|| vec![0; quota.windows.len()]);
        peaks.resize(quota.windows.len(), 0);
        for ((log, (limit, length)), peak) in
            logs.iter_mut().zip(&quota.windows).zip(peaks.iter_mut())
        {
            while log
                .front()
                .is_some_and(|t| now.duration_since(*t) >= *length)
            {
                log.pop_front();
            }
            log.push_back(now);
            *peak = (*peak).max(log.len());
            if log.len() > *limit as usize {
                over = true;
            }
        }
        if over {
            self.locked_until
                .insert(endpoint.to_owned(), now + quota.lock);
            *self.locks.entry(endpoint.to_owned()).or_default() += 1;
            return false;
        }
        self.accepted.push((endpoint.to_owned(), now));
        true
    }
}

/// A running fake; stopped when dropped.
#[derive(Debug)]
pub struct FakeCampaigns {
    addr: SocketAddr,
    state: Arc<Mutex<CampaignsState>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for FakeCampaigns {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

type Shared = Arc<Mutex<CampaignsState>>;

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl FakeCampaigns {
    /// Start with Zoho's real quotas.
    pub fn start() -> FakeCampaigns {
        Self::start_with(FakeCampaignsOptions::default())
    }

    /// Start on a free loopback port, on its own thread and runtime.
    pub fn start_with(options: FakeCampaignsOptions) -> FakeCampaigns {
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("fake-zoho-campaigns".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                    let addr = listener.local_addr().unwrap();
                    let state = Arc::new(Mutex::new(CampaignsState::new(&options)));
                    tx.send((addr, Arc::clone(&state))).unwrap();
                    let app = Router::new()
                        .route("/oauth/v2/token", post(token))
                        .fallback(api)
                        .layer(axum::middleware::from_fn_with_state(
                            Arc::clone(&state),
                            random_fault,
                        ))
                        .with_state(state);
                    axum::serve(listener, app)
                        .with_graceful_shutdown(async move {
                            let _ = stop_rx.await;
                        })
                        .await
                        .unwrap();
                });
            })
            .unwrap();
        let (addr, state) = rx.recv().unwrap();
        FakeCampaigns {
            addr,
            state,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT`: the accounts server and the Campaigns host at once.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn lock(&self) -> MutexGuard<'_, CampaignsState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn with<R>(&self, f: impl FnOnce(&mut CampaignsState) -> R) -> R {
        f(&mut self.lock())
    }

    /// Create a mailing list; `public` = signup form enabled.
    pub fn add_list(&self, key: &str, name: &str, public: bool) {
        self.lock().lists.insert(
            key.to_owned(),
            FakeList {
                key: key.to_owned(),
                name: name.to_owned(),
                public,
                members: BTreeMap::new(),
                confirmation_mails: 0,
            },
        );
    }

    /// Put an address on a list directly (as an import in the Campaigns UI would).
    pub fn insert_member(&self, key: &str, email: &str, status: MemberStatus) {
        let mut s = self.lock();
        let list = s
            .lists
            .get_mut(key)
            .unwrap_or_else(|| panic!("no list {key}"));
        list.members.insert(
            email.to_lowercase(),
            Member {
                email: email.to_owned(),
                fields: BTreeMap::new(),
                status,
                added: now_ms(),
                source: None,
            },
        );
    }

    pub fn member(&self, key: &str, email: &str) -> Option<Member> {
        self.lock()
            .lists
            .get(key)?
            .members
            .get(&email.to_lowercase())
            .cloned()
    }

    pub fn members(&self, key: &str) -> Vec<Member> {
        self.lock()
            .lists
            .get(key)
            .map(|l| l.members.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Addresses with status active, sorted.
    pub fn active(&self, key: &str) -> Vec<String> {
        self.members(key)
            .into_iter()
            .filter(|m| m.status == MemberStatus::Active)
            .map(|m| m.email.to_lowercase())
            .collect()
    }

    fn set_status(&self, key: &str, email: &str, status: MemberStatus) {
        let mut s = self.lock();
        let list = s
            .lists
            .get_mut(key)
            .unwrap_or_else(|| panic!("no list {key}"));
        let m = list
            .members
            .get_mut(&email.to_lowercase())
            .unwrap_or_else(|| panic!("{email} is not on list {key}"));
        m.status = status;
    }

    /// The person clicks "unsubscribe" in a Campaigns mail.
    pub fn unsubscribe(&self, key: &str, email: &str) {
        self.set_status(key, email, MemberStatus::Unsub);
    }

    /// A hard bounce inside Campaigns.
    pub fn bounce(&self, key: &str, email: &str) {
        self.set_status(key, email, MemberStatus::Bounce);
    }

    /// The person clicks Zoho's own confirmation mail (signup-form lists).
    pub fn confirm(&self, key: &str, email: &str) {
        self.set_status(key, email, MemberStatus::Active);
    }

    pub fn confirmation_mails(&self, key: &str) -> usize {
        self.lock()
            .lists
            .get(key)
            .map_or(0, |l| l.confirmation_mails)
    }

    /// Calls answered by `endpoint` (e.g. `listsubscribe`).
    pub fn calls(&self, endpoint: &str) -> u64 {
        self.lock().calls.get(endpoint).copied().unwrap_or(0)
    }

    /// Locks triggered on any endpoint.
    pub fn locks(&self) -> u64 {
        self.lock().locks.values().sum()
    }

    /// The most calls each window of `endpoint` ever held (see [`CampaignsState::peaks`]).
    pub fn peaks(&self, endpoint: &str) -> Vec<usize> {
        self.lock().peaks.get(endpoint).cloned().unwrap_or_default()
    }

    /// Arrival times of the calls of `endpoint` that were inside the quota.
    pub fn accepted_times(&self, endpoint: &str) -> Vec<Instant> {
        self.lock()
            .accepted
            .iter()
            .filter(|(e, _)| e == endpoint)
            .map(|(_, t)| *t)
            .collect()
    }

    /// Replace an endpoint's quota (exact durations, not scaled).
    pub fn set_quota(&self, endpoint: &str, windows: &[(u32, Duration)], lock: Duration) {
        self.lock().quotas.insert(
            endpoint.to_owned(),
            Quota {
                windows: windows.to_vec(),
                lock,
            },
        );
    }

    /// Lock an endpoint now, as if its quota had been exceeded.
    pub fn lock_endpoint(&self, endpoint: &str, lock: Duration) {
        self.lock()
            .locked_until
            .insert(endpoint.to_owned(), Instant::now() + lock);
    }

    pub fn fail_next(&self, fault: CampaignsFault) {
        self.lock().faults.push_back(fault);
    }

    pub fn token_requests(&self) -> usize {
        self.lock().token_requests
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_params(text: &str, into: &mut HashMap<String, String>) {
    for pair in text.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        into.insert(decode(k), decode(v));
    }
}

fn json_ok(body: Value) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json;charset=UTF-8")],
        body.to_string(),
    )
        .into_response()
}

fn error(uri: &str, code: &str, message: &str) -> Response {
    json_ok(
        json!({"status": "error", "code": code, "message": message, "uri": uri, "version": "1.1"}),
    )
}

async fn token(State(state): State<Shared>, RawQuery(query): RawQuery, body: Bytes) -> Response {
    let mut p = HashMap::new();
    parse_params(query.as_deref().unwrap_or_default(), &mut p);
    parse_params(&String::from_utf8_lossy(&body), &mut p);
    let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
    s.token_requests += 1;
    let get = |k: &str| p.get(k).map(String::as_str).unwrap_or_default();
    if get("client_id") != s.client_id {
        return json_ok(json!({"error": "invalid_client"}));
    }
    if get("client_secret") != s.client_secret {
        return json_ok(json!({"error": "invalid_client_secret"}));
    }
    if get("grant_type") != "refresh_token" || get("refresh_token") != s.refresh_token {
        return json_ok(json!({"error": "invalid_code"}));
    }
    let t = format!("1000.campaigns.{}", s.next_token);
    s.next_token += 1;
    s.tokens.insert(t.clone());
    json_ok(
        json!({"access_token": t, "api_domain": "https://www.zohoapis.invalid",
                   "token_type": "Bearer", "expires_in": 3600}),
    )
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

fn valid_address(email: &str) -> bool {
    let Some((local, domain)) = email.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !email.contains(char::is_whitespace)
        && !domain.contains('@')
}

/// `contactinfo` as strict JSON, or Zoho's loose `{First Name:mac,Contact Email:x@y}`.
fn parse_contact_info(text: &str) -> Option<BTreeMap<String, String>> {
    if let Ok(Value::Object(m)) = serde_json::from_str::<Value>(text) {
        return Some(
            m.into_iter()
                .map(|(k, v)| {
                    let v = match v {
                        Value::String(s) => s,
                        other => other.to_string(),
                    };
                    (k, v)
                })
                .collect(),
        );
    }
    let inner = text.trim().strip_prefix('{')?.strip_suffix('}')?;
    let mut out = BTreeMap::new();
    for part in inner.split(',') {
        let (k, v) = part.split_once(':')?;
        out.insert(k.trim().to_owned(), v.trim().to_owned());
    }
    Some(out)
}

fn member_json(m: &Member) -> Value {
    let f = |k: &str| m.fields.get(k).cloned().unwrap_or_default();
    json!({"contact_email": m.email, "firstname": f("First Name"), "lastname": f("Last Name"),
           "phone": f("Phone"), "companyname": f("Company Name"), "zuid": "",
           "added_time": m.added.to_string()})
}

async fn api(
    State(state): State<Shared>,
    uri: Uri,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Response {
    let path = uri.path().to_owned();
    let mut p = HashMap::new();
    parse_params(query.as_deref().unwrap_or_default(), &mut p);
    parse_params(&String::from_utf8_lossy(&body), &mut p);
    let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
    let endpoint = path
        .strip_prefix("/api/v1.1/json/")
        .or_else(|| path.strip_prefix("/api/v1.1/"))
        .unwrap_or_default()
        .to_owned();
    if !ENDPOINTS.iter().any(|(n, _, _)| *n == endpoint) {
        return error(
            &path,
            "1004",
            "Unable to find the resource you're looking for. Please recheck the documentation and try again.",
        );
    }
    let authorised = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Zoho-oauthtoken "))
        .is_some_and(|t| s.tokens.contains(t.trim()));
    *s.calls.entry(endpoint.clone()).or_default() += 1;
    if !authorised {
        return error(&path, "1007", "Unauthorized key.");
    }
    if p.get("resfmt").map(String::as_str) != Some("JSON") {
        return (
            [(header::CONTENT_TYPE, "application/xml")],
            format!("<response uri=\"{path}\" version=\"1.1\"><status>error</status><code>1003</code></response>"),
        )
            .into_response();
    }
    if let Some(fault) = s.faults.pop_front() {
        return match fault {
            CampaignsFault::Status(code) => axum::http::StatusCode::from_u16(code)
                .unwrap_or(axum::http::StatusCode::INTERNAL_SERVER_ERROR)
                .into_response(),
            CampaignsFault::Garbage => {
                "<html>Service temporarily unavailable</html>".into_response()
            }
            CampaignsFault::Code { code, message } => error(&path, &code, &message),
        };
    }
    if !s.admit(&endpoint) {
        let code = s.lock_code.clone();
        return error(
            &path,
            &code,
            "You have exceeded the API call limit. This API is locked for 30 minutes.",
        );
    }
    let get = |k: &str| p.get(k).map(|v| v.trim().to_owned()).unwrap_or_default();
    let ok = |extra: Value| {
        let mut v = json!({"status": "success", "code": "0", "uri": path, "version": "1.1"});
        if let (Value::Object(v), Value::Object(extra)) = (&mut v, extra) {
            v.extend(extra);
        }
        json_ok(v)
    };
    match endpoint.as_str() {
        "getmailinglists" => {
            if s.lists.is_empty() {
                return error(
                    &path,
                    "2401",
                    "No mailing list has been created. Please create a list.",
                );
            }
            let from: usize = get("fromindex").parse().unwrap_or(1).max(1);
            let range: usize = get("range").parse().unwrap_or(20);
            let items: Vec<Value> = s
                .lists
                .values()
                .skip(from - 1)
                .take(range)
                .map(|l| {
                    let count = |st| l.members.values().filter(|m| m.status == st).count().to_string();
                    json!({"listkey": l.key, "listname": l.name, "listunino": "6361736964559881",
                           "lockstatus": "unlocked", "is_public": l.public.to_string(), "owner": "Fake",
                           "zuid": "229788", "noofcontacts": count(MemberStatus::Active),
                           "noofunsubcnt": count(MemberStatus::Unsub), "noofbouncecnt": count(MemberStatus::Bounce),
                           "created_date": "1316108278000", "segments": []})
                })
                .collect();
            ok(
                json!({"sort": "Ascending Order", "range": range.to_string(),
                      "fromindex": from.to_string(), "list_of_details": items}),
            )
        }
        "listsubscribe" => {
            let key = get("listkey");
            let groups = s.group_locals.clone();
            let Some(list) = s.lists.get_mut(&key) else {
                return error(&path, "2501", "Listkey is empty or invalid.");
            };
            let Some(info) = parse_contact_info(&get("contactinfo")) else {
                return error(&path, "2001", "Please enter correct XML(or)JSON format.");
            };
            let Some(email) = info.get("Contact Email").map(|e| e.trim().to_owned()) else {
                return error(&path, "2001", "Please enter correct XML(or)JSON format.");
            };
            if !valid_address(&email) {
                return error(&path, "2004", "Invalid contact email address.");
            }
            let local = email.split('@').next().unwrap_or_default().to_lowercase();
            if groups.contains(&local) {
                return error(&path, "2005", "Group email address added.");
            }
            let fields: BTreeMap<String, String> = info
                .into_iter()
                .filter(|(k, _)| k != "Contact Email")
                .collect();
            let source = p.get("source").cloned();
            let public = list.public;
            let entry = list
                .members
                .entry(email.to_lowercase())
                .or_insert_with(|| Member {
                    email: email.clone(),
                    fields: BTreeMap::new(),
                    status: MemberStatus::Unsub,
                    added: now_ms(),
                    source: source.clone(),
                });
            entry.fields.extend(fields);
            let pending = match (entry.status, public) {
                (MemberStatus::Active, _) => false,
                (MemberStatus::Pending, _) => true,
                (_, true) => {
                    entry.status = MemberStatus::Pending;
                    entry.added = now_ms();
                    true
                }
                (_, false) => {
                    entry.status = MemberStatus::Active;
                    entry.added = now_ms();
                    false
                }
            };
            if pending {
                list.confirmation_mails += 1;
                ok(
                    json!({"message": "A confirmation email is sent to the user. User needs to confirm to successfully subscribe."}),
                )
            } else {
                ok(json!({"message": "User successfully subscribed."}))
            }
        }
        "addlistsubscribersinbulk" => {
            let key = get("listkey");
            let ids = get("emailids");
            if key.is_empty() || ids.is_empty() {
                return error(&path, "903", "Mandatory fields are missing.");
            }
            let emails: Vec<String> = ids
                .split(',')
                .map(|e| e.trim().to_owned())
                .filter(|e| !e.is_empty())
                .collect();
            if emails.len() > 10 {
                return error(
                    &path,
                    "903",
                    "Mandatory fields are missing. (at most 10 emailids)",
                );
            }
            let Some(list) = s.lists.get_mut(&key) else {
                return error(&path, "2206", "List has been deleted.");
            };
            for email in emails.into_iter().filter(|e| valid_address(e)) {
                let status = if list.public {
                    MemberStatus::Pending
                } else {
                    MemberStatus::Active
                };
                let m = list
                    .members
                    .entry(email.to_lowercase())
                    .or_insert_with(|| Member {
                        email: email.clone(),
                        fields: BTreeMap::new(),
                        status,
                        added: now_ms(),
                        source: None,
                    });
                if m.status != MemberStatus::Active {
                    m.status = status;
                }
            }
            let (k, n) = (list.key.clone(), list.name.clone());
            ok(json!({"listkey": k, "listname": n}))
        }
        "listunsubscribe" => {
            let key = get("listkey");
            let email = parse_contact_info(&get("contactinfo"))
                .and_then(|i| i.get("Contact Email").cloned())
                .unwrap_or_default();
            let unknown = s.unknown_unsubscribe_code.clone();
            let Some(list) = s.lists.get_mut(&key) else {
                return error(&path, "2102", "Listkey is empty or invalid.");
            };
            match list.members.get_mut(&email.trim().to_lowercase()) {
                None if unknown == "2101" => error(&path, "2101", "Please retry after sometime."),
                None => error(&path, "2103", "Contact does not exist."),
                Some(m) => {
                    if matches!(m.status, MemberStatus::Active | MemberStatus::Pending) {
                        m.status = MemberStatus::Unsub;
                    }
                    ok(json!({"message": "User successfully unsubscribed."}))
                }
            }
        }
        "getlistsubscribers" | "listsubscriberscount" => {
            let key = get("listkey");
            let Some(list) = s.lists.get(&key) else {
                return error(&path, "2501", "Listkey is empty or invalid.");
            };
            let status = get("status");
            let wanted = match status.as_str() {
                "" | "active" | "recent" | "mostrecent" => Some(MemberStatus::Active),
                "unsub" => Some(MemberStatus::Unsub),
                "bounce" => Some(MemberStatus::Bounce),
                _ => None,
            };
            let mut matching: Vec<&Member> = list
                .members
                .values()
                .filter(|m| Some(m.status) == wanted)
                .collect();
            if endpoint == "listsubscriberscount" {
                return ok(json!({"no_of_contacts": matching.len()}));
            }
            matching.sort_by(|a, b| (a.added, &a.email).cmp(&(b.added, &b.email)));
            if get("sort") == "desc" || matches!(status.as_str(), "recent" | "mostrecent") {
                matching.reverse();
            }
            let from: usize = get("fromindex").parse().unwrap_or(1).max(1);
            let range: usize = get("range").parse().unwrap_or(20);
            if matching.is_empty() {
                return error(&path, "2203", "There are no contacts in this list.");
            }
            let items: Vec<Value> = matching
                .iter()
                .skip(from - 1)
                .take(range)
                .map(|m| member_json(m))
                .collect();
            ok(json!({"list_of_details": items, "message": ""}))
        }
        "contactdonotmail" => {
            let email = parse_contact_info(&get("contactinfo"))
                .and_then(|i| i.get("Contact Email").cloned())
                .unwrap_or_default();
            if !valid_address(&email) {
                return error(&path, "2004", "Invalid email address pattern.");
            }
            s.do_not_mail.insert(email.to_lowercase());
            ok(json!({"message": "User successfully moved to Do-Not-Mail."}))
        }
        _ => error(&path, "1004", "Wrong URL entered."),
    }
}

/// Shortest time (seconds, unscaled) in which `n` instant calls fit the sliding windows
/// `(calls, seconds)`: the best any client could do under those limits, the yardstick of the
/// pacing measurements.
pub fn best_schedule_seconds(n: u64, windows: &[(u32, u64)]) -> f64 {
    let mut sent: std::collections::VecDeque<(f64, u64)> = std::collections::VecDeque::new();
    let (mut t, mut left) = (0.0f64, n);
    loop {
        let room = windows
            .iter()
            .map(|(limit, len)| {
                let used: u64 = sent
                    .iter()
                    .filter(|(at, _)| t - at < *len as f64)
                    .map(|(_, k)| k)
                    .sum();
                u64::from(*limit).saturating_sub(used)
            })
            .min()
            .unwrap_or(left);
        let k = room.min(left);
        if k > 0 {
            sent.push_back((t, k));
            left -= k;
        }
        if left == 0 {
            return t;
        }
        // Next moment a full window frees a slot.
        t = windows
            .iter()
            .filter_map(|(limit, len)| {
                let inside: Vec<_> = sent.iter().filter(|(at, _)| t - at < *len as f64).collect();
                let used: u64 = inside.iter().map(|(_, k)| k).sum();
                (used >= u64::from(*limit)).then(|| inside[0].0 + *len as f64)
            })
            .fold(t, f64::max);
        let longest = windows.iter().map(|(_, l)| *l).max().unwrap_or(0) as f64;
        while sent.front().is_some_and(|(at, _)| t - at >= longest) {
            sent.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loose_contact_info_is_understood() {
        let m =
            parse_contact_info("{First Name:mac,Last Name:Last Name,Contact Email:jai@zoho.com}")
                .unwrap();
        assert_eq!(m["Contact Email"], "jai@zoho.com");
        assert_eq!(m["First Name"], "mac");
        let m = parse_contact_info(r#"{"Contact Email":"a@b.org"}"#).unwrap();
        assert_eq!(m["Contact Email"], "a@b.org");
        assert_eq!(decode("%7BFirst+Name%3Amac%7D"), "{First Name:mac}");
    }

    #[test]
    fn the_best_schedule_fills_each_window_and_waits_for_the_next() {
        // 2,000 calls fit the first minute; one more waits a whole minute.
        assert_eq!(super::best_schedule_seconds(2_000, &[(2_000, 60)]), 0.0);
        assert_eq!(super::best_schedule_seconds(2_001, &[(2_000, 60)]), 60.0);
        // The tighter of two windows rules: 500/min but 12,500/h.
        let t = super::best_schedule_seconds(13_000, &[(500, 60), (12_500, 3_600)]);
        assert_eq!(t, 3_600.0);
    }
}
