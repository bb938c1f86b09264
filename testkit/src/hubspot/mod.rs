//! A fake HubSpot (CRM v3 contacts, properties, search, communication preferences, OAuth,
//! webhooks) on `127.0.0.1:0`, written from HubSpot's API documentation (the public API
//! reference, the OpenAPI specs HubSpot publishes, its usage-guidelines, error-handling and
//! request-validation pages) and not from any connector code.
//!
//! Split by surface: `http` routes requests, renders HubSpot's error envelope, injects faults
//! and keeps the request log; `gate` checks the bearer token, scopes and rate limits and
//! serves the OAuth token endpoint; `contacts`, `batch`, `search` and `properties` serve the
//! contacts object; `prefs` serves communication preferences (v3 and v4); `webhooks` signs
//! and delivers webhook batches. Each module's notes say what it infers where HubSpot's
//! documentation is silent.
//!
//! What it reproduces:
//!
//! * **Auth**: `Authorization: Bearer <token>`; private-app tokens with scopes
//!   ([`FakeHubSpot::add_token`]); a token without the endpoint's scope gets 403
//!   `MISSING_SCOPES` naming the scope(s); OAuth `POST /oauth/v1/token` and `/oauth/v3/token`
//!   (`refresh_token` grant, form-encoded) issuing access tokens that expire after
//!   `expires_in` (1800 s) → 401 `EXPIRED_AUTHENTICATION`.
//! * **Contacts** under `/crm/v3/objects/contacts` and the date-based
//!   `/crm/objects/{YYYY-MM}/contacts`: list with `limit`/`after`/`properties`/`archived`/
//!   `propertiesWithHistory`, get (`idProperty=email`), create (409 `CONFLICT` "Contact already
//!   exists. Existing ID: N"), update, archive, `batch/read|update|upsert|create|archive`
//!   (200 or 207 with per-item `errors[]` and `context.ids`), GDPR delete; string-typed
//!   properties, `null` for unset requested properties, `hs_object_id`, `createdate`,
//!   `lastmodifieddate` (bumped by every write, the client's own included).
//! * **Property validation**: unknown property → 400 `PROPERTY_DOESNT_EXIST`; read-only
//!   property (`hs_email_optout`, `hs_object_id`, `createdate`, `lastmodifieddate`,
//!   `hs_marketable_status`, ...) → 400 `READ_ONLY_VALUE`; invalid enumeration option or
//!   boolean → 400; the whole request is refused and nothing is written.
//! * **Search** `POST .../contacts/search`: `filterGroups` (groups OR, filters AND) with the
//!   documented operators, one sort, `limit`, numeric `after`, `total`, the **10,000-result
//!   cap** (400 once `after + limit > 10000`), its own per-second limit (429 "You have reached
//!   your secondly limit.", no rate-limit headers), and index lag (a write becomes searchable
//!   [`HubSpotState::search_lag`] after it happened; GET sees it at once).
//! * **Properties** `GET /crm/v3/properties/contacts[/{name}]` with seedable custom
//!   properties ([`FakeHubSpot::add_property`]).
//! * **Communication preferences** v3 (`definitions`, `status/email/{email}`, `subscribe`,
//!   `unsubscribe`) and v4 (`statuses/{email}`, `unsubscribe-all`): `legalBasis` /
//!   `legalBasisExplanation` validated (mandatory when the portal is GDPR-enabled); v3 refuses
//!   to re-subscribe an address that opted out, v4 allows it with `RESUBSCRIBE_OCCURRED`.
//! * **Webhooks**: [`FakeHubSpot::fire`] sends JSON-array batches to the configured target URL
//!   signed with `X-HubSpot-Signature-v3` (base64 HMAC-SHA256 of method + URI + body +
//!   timestamp, keyed with the app's client secret), `X-HubSpot-Request-Timestamp` (ms) and the
//!   legacy `X-HubSpot-Signature` (v1 or v2); retries with exponential backoff on anything but
//!   400/401/403/404/405.
//! * **Rate limits**: a rolling burst window per app (100 per 10 s by default, the lowest
//!   documented tier) → 429 `TEN_SECONDLY_ROLLING`; for private apps a daily count per portal
//!   (250,000) reset at the portal's local midnight → 429 `DAILY` (OAuth apps have no daily
//!   limit); the `X-HubSpot-RateLimit-*` headers on every non-search API answer (the set
//!   depends on the token type); 429 bodies with `errorType: "RATE_LIMIT"` and `policyName`;
//!   [`HubSpotState::time_scale`] shrinks the windows (and the webhook backoff) for tests.
//! * **Errors and faults**: HubSpot's error envelope (`status`, `message`, `correlationId`,
//!   `category`, `errors`, `context`); [`FakeHubSpot::fail_next`] / [`FakeHubSpot::fail_next_on`]
//!   with [`Fault`]; seeded random faults ([`crate::faults`]; their 429 and 5xx bodies are the
//!   generic ones shared with the Zoho fakes, not HubSpot's envelope).
//! * **Test hooks**: seeding with an explicit `lastmodifieddate` (including more than 10,000
//!   contacts in one second, [`FakeHubSpot::seed_same_time`]), edits that bump it, archive,
//!   [`FakeHubSpot::contact`] / [`FakeHubSpot::contacts`], [`FakeHubSpot::subscription_status`],
//!   [`FakeHubSpot::calls`], [`FakeHubSpot::request_log`], [`FakeHubSpot::deliveries`].
//!   Editing contacts while a client pages a search shifts the offsets as it would on HubSpot
//!   (an edited contact moves to the end of a `lastmodifieddate` sort).
//!
//! Where HubSpot's documentation is unsure or its versions disagree, the fake takes the
//! **stricter** reading (each is configurable on [`HubSpotState`]):
//!
//! * list `limit` above 100 and search `limit` above [`HubSpotState::search_max_limit`]
//!   (default **100**; the newer spec says 200) are refused with 400 rather than clamped;
//! * search allows **3 filter groups × 3 filters** (the oldest and smallest documented limit)
//!   and one sort; more → 400;
//! * search is limited to **4 requests per second per portal** (older docs: 4 per token;
//!   newer: 5 per account) and search calls also count against the burst and daily limits;
//! * results past the cap: the last allowed page still offers `paging.next.after = "10000"`,
//!   and following it is the 400;
//! * index lag defaults to **2 s** (documented only as "a few moments");
//! * every request with a valid token counts against the limits, 429s included;
//! * the portal is **GDPR-enabled** by default: `legalBasis` and `legalBasisExplanation` are
//!   mandatory on subscribe/unsubscribe;
//! * v3 subscribe refuses an address that opted out of that subscription **or** of all email,
//!   and a repeated v3 subscribe/unsubscribe (no change) is refused with 400 too;
//! * OAuth refresh rotates the refresh token: the old one stops working;
//! * property values must be JSON strings (the spec types them as strings); `null` or numbers
//!   are refused;
//! * `hs_marketable_status` is read-only (sources conflict);
//! * the list cursor `after` is an opaque token, not a record id;
//! * batch endpoints take at most 100 inputs ([`HubSpotState::batch_max`]); duplicate ids in
//!   one batch update are refused;
//! * webhook deliveries time out after **1 s** (the oldest documented value; later pages say
//!   2 s and 5 s);
//! * a 429's body carries `errorType` only (some HubSpot answers use `category:
//!   "RATE_LIMITS"` instead), and no `Retry-After` (documented for workflow webhooks only).
//!
//! Not reproduced (and why): merges (ids that change), associations, `propertiesWithHistory`
//! beyond the values written through the fake, lifecycle-stage ordering (the rule is only
//! third-party), v4 batch status endpoints and definitions translations, webhook
//! `maxConcurrentRequests` (the fake delivers one batch at a time), the `authorization_code`
//! and `client_credentials` grants and token introspection, brand/business-unit-wide
//! statuses, the 423 "locked" answer on concurrent writes and the 477 "migration in progress"
//! (inject them with `Fault::Status(423)`), the 5% error-rate guideline, and checks of the
//! webhook subscription set (every fired event is delivered).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chrono::{DateTime, FixedOffset, NaiveDate, Offset as _, SecondsFormat, Utc};
use serde_json::{Value, json};

mod batch;
mod contacts;
mod gate;
mod http;
mod prefs;
mod properties;
mod search;
mod webhooks;

pub use contacts::{Contact, HistoryEntry};
pub use prefs::{EmailPrefs, SubscriptionDefinition, TypeStatus};
pub use properties::PropertyDef;
pub use webhooks::{
    Delivery, LegacySignature, WebhookEvent, signature_v1, signature_v2, signature_v3, signing_uri,
};

/// The private-app token every fake accepts, with every scope the fake knows.
pub const PRIVATE_APP_TOKEN: &str = "pat-na1-00000000-0000-0000-0000-000000000000";
/// OAuth app credentials and the initial refresh token.
pub const CLIENT_ID: &str = "00000000-1111-2222-3333-444444444444";
pub const CLIENT_SECRET: &str = "yyyyyyyy-yyyy-yyyy-yyyy-yyyyyyyyyyyy";
pub const REFRESH_TOKEN: &str = "na1-rrrr-0000-0000-0000-000000000000";
pub const PORTAL_ID: u64 = 62515;
pub const APP_ID: u64 = 54321;

/// Scopes the fake checks.
pub mod scopes {
    pub const CONTACTS_READ: &str = "crm.objects.contacts.read";
    pub const CONTACTS_WRITE: &str = "crm.objects.contacts.write";
    pub const SCHEMAS_READ: &str = "crm.schemas.contacts.read";
    pub const PREFS_READ: &str = "communication_preferences.read";
    pub const PREFS_WRITE: &str = "communication_preferences.write";
    pub const PREFS_READ_WRITE: &str = "communication_preferences.read_write";
    /// Every scope above.
    pub const ALL: &[&str] = &[
        CONTACTS_READ,
        CONTACTS_WRITE,
        SCHEMAS_READ,
        PREFS_READ,
        PREFS_WRITE,
        PREFS_READ_WRITE,
    ];
}

/// A fault injected into the next API call (OAuth token requests are not affected).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// This HTTP status with HubSpot's error envelope (no processing).
    Status(u16),
    /// 429 with the burst (`TEN_SECONDLY_ROLLING`) body (no processing).
    TooManyRequests,
    /// HTTP 200 with a body that is not JSON (no processing).
    Garbage,
    /// Answer normally, after this delay (for client timeouts).
    Delay(Duration),
}

/// An accepted bearer token.
#[derive(Debug, Clone)]
pub struct Token {
    /// The app it belongs to: the burst limit is counted per app.
    pub app: String,
    pub scopes: BTreeSet<String>,
    /// `None`: never expires (private-app tokens).
    pub expires: Option<Instant>,
    /// An OAuth access token (no daily limit; its own burst limit and header set).
    pub oauth: bool,
}

/// Which `X-HubSpot-RateLimit-*` headers normal answers carry (HubSpot: "which set is present
/// depends on auth type").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateHeaders {
    /// `-Daily`, `-Daily-Remaining`, `-Interval-Milliseconds`, `-Max`, `-Remaining`,
    /// `-Secondly`, `-Secondly-Remaining`.
    All,
    /// `-Interval-Milliseconds`, `-Max`, `-Remaining` only.
    Interval,
    /// `-Daily`, `-Daily-Remaining`, `-Secondly`, `-Secondly-Remaining` only.
    DailySecondly,
    None,
}

/// One request the fake answered.
#[derive(Debug, Clone)]
pub struct LoggedRequest {
    pub method: String,
    pub path: String,
    pub query: String,
    /// `METHOD /template`, e.g. `POST /crm/v3/objects/contacts/search` or
    /// `GET /crm/v3/objects/contacts/{contactId}` (date-based paths are logged with `v3`).
    pub endpoint: String,
    pub body: String,
    pub status: u16,
}

/// Everything the fake holds; tests read and change it through [`FakeHubSpot::with`].
#[derive(Debug)]
pub struct HubSpotState {
    pub tokens: HashMap<String, Token>,
    /// Valid refresh tokens → the scopes their access tokens get.
    pub refresh_tokens: HashMap<String, BTreeSet<String>>,
    pub client_id: String,
    pub client_secret: String,
    /// `expires_in` of OAuth access tokens (1800 s).
    pub token_ttl: Duration,
    pub token_requests: usize,
    pub contacts: BTreeMap<u64, Contact>,
    pub(crate) email_index: HashMap<String, u64>,
    pub(crate) next_id: u64,
    pub properties: BTreeMap<String, PropertyDef>,
    pub definitions: Vec<SubscriptionDefinition>,
    /// Lower-cased email → subscription state.
    pub prefs: BTreeMap<String, EmailPrefs>,
    /// Faults for the next calls: `(endpoint or None for any, fault)`.
    pub faults: VecDeque<(Option<String>, Fault)>,
    pub random_faults: Option<crate::faults::FaultPlan>,
    pub requests: Vec<LoggedRequest>,

    /// Burst limit of a private app per rolling window (10 s × `time_scale`): 100, the
    /// lowest documented tier (190 and 250 are the others).
    pub burst_max: u32,
    /// Burst limit of the OAuth app (100; a later changelog may say 110).
    pub oauth_burst_max: u32,
    /// Daily limit per portal for private apps (250,000, the lowest documented tier).
    pub daily_max: u64,
    /// Search requests per second (× `time_scale`) per portal.
    pub search_per_second: u32,
    /// Shrinks rate windows and webhook retry backoff (1.0 = real time).
    pub time_scale: f64,
    /// Which rate-limit headers answers carry; `None`: by token type (see `gate`).
    pub rate_headers: Option<RateHeaders>,
    /// The portal's time zone: the daily count resets at its midnight.
    pub portal_offset: FixedOffset,
    pub(crate) burst: HashMap<String, VecDeque<Instant>>,
    pub(crate) search_times: VecDeque<Instant>,
    /// Requests counted today.
    pub daily_used: u64,
    /// The portal-local day `daily_used` counts; another day resets it.
    pub daily_date: NaiveDate,

    /// Maximum `limit` of the list endpoint (100).
    pub list_max_limit: usize,
    /// Maximum `limit` of search (100; see the module notes).
    pub search_max_limit: usize,
    /// Results search can page through (10,000).
    pub search_result_cap: usize,
    pub filter_groups_max: usize,
    pub filters_per_group_max: usize,
    pub filters_total_max: usize,
    /// Inputs per batch call (100).
    pub batch_max: usize,
    /// How long a write takes to become searchable.
    pub search_lag: Duration,
    /// `legalBasis` and `legalBasisExplanation` are mandatory.
    pub gdpr_enabled: bool,

    /// Where webhook batches go (`None`: [`FakeHubSpot::fire`] fails).
    pub webhook_target: Option<String>,
    pub legacy_signature: LegacySignature,
    /// A delivery not answered within this counts as failed (and is retried).
    pub webhook_timeout: Duration,
    /// Retries after the first attempt (10).
    pub webhook_max_retries: u32,
    /// First retry delay (2 minutes, doubled each time, × `time_scale`).
    pub webhook_retry_base: Duration,
    /// Events per delivery (100).
    pub webhook_batch_size: usize,
    pub(crate) next_event_id: u64,
    pub deliveries: Vec<Delivery>,
    pub(crate) base_url: String,
    pub(crate) next_token: u64,
}

impl HubSpotState {
    fn new(base_url: String) -> Self {
        let all: BTreeSet<String> = scopes::ALL.iter().map(|s| (*s).to_owned()).collect();
        let mut tokens = HashMap::new();
        tokens.insert(
            PRIVATE_APP_TOKEN.to_owned(),
            Token {
                app: "private-app".into(),
                scopes: all.clone(),
                expires: None,
                oauth: false,
            },
        );
        let mut refresh_tokens = HashMap::new();
        refresh_tokens.insert(REFRESH_TOKEN.to_owned(), all);
        let portal_offset = FixedOffset::west_opt(5 * 3600).unwrap_or(Utc.fix());
        Self {
            tokens,
            refresh_tokens,
            client_id: CLIENT_ID.into(),
            client_secret: CLIENT_SECRET.into(),
            token_ttl: Duration::from_secs(1800),
            token_requests: 0,
            contacts: BTreeMap::new(),
            email_index: HashMap::new(),
            next_id: 100_000,
            properties: properties::default_properties(),
            definitions: prefs::default_definitions(),
            prefs: BTreeMap::new(),
            faults: VecDeque::new(),
            random_faults: None,
            requests: Vec::new(),
            burst_max: 100,
            oauth_burst_max: 100,
            daily_max: 250_000,
            search_per_second: 4,
            time_scale: 1.0,
            rate_headers: None,
            portal_offset,
            burst: HashMap::new(),
            search_times: VecDeque::new(),
            daily_used: 0,
            daily_date: Utc::now().with_timezone(&portal_offset).date_naive(),
            list_max_limit: 100,
            search_max_limit: 100,
            search_result_cap: 10_000,
            filter_groups_max: 3,
            filters_per_group_max: 3,
            filters_total_max: 9,
            batch_max: 100,
            search_lag: Duration::from_secs(2),
            gdpr_enabled: true,
            webhook_target: None,
            legacy_signature: LegacySignature::V1,
            webhook_timeout: Duration::from_secs(1),
            webhook_max_retries: 10,
            webhook_retry_base: Duration::from_secs(120),
            webhook_batch_size: 100,
            next_event_id: 100,
            deliveries: Vec::new(),
            base_url,
            next_token: 1,
        }
    }

    pub(crate) fn scaled(&self, d: Duration) -> Duration {
        d.mul_f64(self.time_scale.max(0.0))
    }

    /// The id of the contact with this email (any case), archived or not.
    pub fn id_by_email(&self, email: &str) -> Option<u64> {
        self.email_index.get(&email.to_lowercase()).copied()
    }
}

/// `2024-05-02T09:13:44.123Z`, as HubSpot renders date-times.
pub fn render_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Now, at millisecond precision (HubSpot's resolution).
pub(crate) fn now_ms() -> DateTime<Utc> {
    let now = Utc::now();
    DateTime::from_timestamp_millis(now.timestamp_millis()).unwrap_or(now)
}

/// A running fake; stopped when dropped.
#[derive(Debug)]
pub struct FakeHubSpot {
    addr: SocketAddr,
    state: Arc<Mutex<HubSpotState>>,
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for FakeHubSpot {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl FakeHubSpot {
    /// Start on a free loopback port, on its own thread and runtime (works from plain
    /// `#[test]`s and from `#[tokio::test]`s alike).
    pub fn start() -> FakeHubSpot {
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("fake-hubspot".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("fake HubSpot runtime");
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                        .await
                        .expect("bind the fake HubSpot");
                    let addr = listener.local_addr().expect("fake HubSpot address");
                    let state = Arc::new(Mutex::new(HubSpotState::new(format!("http://{addr}"))));
                    let _ = tx.send((addr, Arc::clone(&state), tokio::runtime::Handle::current()));
                    let _ = axum::serve(listener, http::router(state))
                        .with_graceful_shutdown(async move {
                            let _ = stop_rx.await;
                        })
                        .await;
                });
            })
            .expect("spawn the fake HubSpot thread");
        let (addr, state, handle) = rx.recv().expect("fake HubSpot started");
        FakeHubSpot {
            addr,
            state,
            handle,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT`: the API base URL (in place of `https://api.hubapi.com`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn lock(&self) -> MutexGuard<'_, HubSpotState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Read or change the state.
    pub fn with<R>(&self, f: impl FnOnce(&mut HubSpotState) -> R) -> R {
        f(&mut self.lock())
    }

    /// Lift the burst, daily and search limits and the index lag (tests that page a lot).
    pub fn unlimited(&self) {
        self.with(|s| {
            s.burst_max = u32::MAX;
            s.oauth_burst_max = u32::MAX;
            s.daily_max = u64::MAX;
            s.search_per_second = u32::MAX;
            s.search_lag = Duration::ZERO;
        });
    }

    /// Accept `token` as a private-app token with exactly these scopes (its own app, so its
    /// own burst window).
    pub fn add_token(&self, token: &str, scopes: &[&str]) {
        self.with(|s| {
            s.tokens.insert(
                token.to_owned(),
                Token {
                    app: format!("app-{token}"),
                    scopes: scopes.iter().map(|x| (*x).to_owned()).collect(),
                    expires: None,
                    oauth: false,
                },
            );
        });
    }

    /// Expire every OAuth access token issued so far (private-app tokens stay valid).
    pub fn expire_tokens(&self) {
        let past = Instant::now()
            .checked_sub(Duration::from_secs(1))
            .unwrap_or_else(Instant::now);
        self.with(|s| {
            for t in s.tokens.values_mut() {
                if t.expires.is_some() {
                    t.expires = Some(past);
                }
            }
        });
    }

    pub fn token_requests(&self) -> usize {
        self.lock().token_requests
    }

    /// The app's client secret (signs webhooks).
    pub fn client_secret(&self) -> String {
        self.lock().client_secret.clone()
    }

    pub fn fail_next(&self, fault: Fault) {
        self.lock().faults.push_back((None, fault));
    }

    /// Inject a fault into the next call of `endpoint` (as in [`LoggedRequest::endpoint`]).
    pub fn fail_next_on(&self, endpoint: &str, fault: Fault) {
        self.lock()
            .faults
            .push_back((Some(endpoint.to_owned()), fault));
    }

    pub fn request_log(&self) -> Vec<LoggedRequest> {
        self.lock().requests.clone()
    }

    /// How many requests hit `endpoint` (`METHOD /template` as in [`LoggedRequest::endpoint`],
    /// or a bare path).
    pub fn calls(&self, endpoint: &str) -> usize {
        self.lock()
            .requests
            .iter()
            .filter(|r| r.endpoint == endpoint || r.path == endpoint)
            .count()
    }

    /// Add a contact created and modified now; returns its id. `properties` is a JSON object
    /// of strings (no validation: seeding may set read-only properties such as
    /// `hs_email_optout`).
    pub fn insert(&self, properties: Value) -> u64 {
        let now = now_ms();
        self.insert_at(properties, now)
    }

    /// Add a contact with this `createdate` and `lastmodifieddate`, searchable at once (it
    /// stands for data that was there before the test).
    pub fn insert_at(&self, properties: Value, modified: DateTime<Utc>) -> u64 {
        self.with(|s| contacts::seed_one(s, &properties, modified))
    }

    /// Add `n` contacts `person{i}@example.org` all with the same `lastmodifieddate`
    /// (e.g. more than 10,000 in one second); returns their ids in order.
    pub fn seed_same_time(&self, n: usize, modified: DateTime<Utc>) -> Vec<u64> {
        self.with(|s| {
            (0..n)
                .map(|i| {
                    let email = format!("person{i}@example.org");
                    contacts::seed_one(
                        s,
                        &json!({"email": email, "firstname": format!("P{i}"), "lastname": format!("Q{i}")}),
                        modified,
                    )
                })
                .collect()
        })
    }

    /// Change properties as a CRM user would (no validation); `lastmodifieddate` becomes now
    /// and the change becomes searchable after the index lag.
    pub fn edit(&self, id: u64, properties: Value) {
        self.with(|s| contacts::edit(s, id, &properties, now_ms()));
    }

    /// Archive a contact (as a user deleting it; restorable).
    pub fn archive(&self, id: u64) {
        self.with(|s| contacts::archive(s, id, now_ms()));
    }

    /// The contact as the API shows it with every property set (archived ones too).
    pub fn contact(&self, id: u64) -> Option<Value> {
        let s = self.lock();
        s.contacts.get(&id).map(Contact::render_all)
    }

    /// Every contact (archived ones too), by id.
    pub fn contacts(&self) -> Vec<Value> {
        let s = self.lock();
        s.contacts.values().map(Contact::render_all).collect()
    }

    /// Add (or replace) a property definition, e.g. a custom `booleancheckbox` or
    /// `enumeration`/`checkbox` property.
    pub fn add_property(&self, def: PropertyDef) {
        self.with(|s| {
            s.properties.insert(def.name.clone(), def);
        });
    }

    /// The v3 view of an address's subscription statuses (`subscriptionStatuses`).
    pub fn subscription_status(&self, email: &str) -> Value {
        let s = self.lock();
        prefs::v3_status(&s, email)
    }

    /// Record that `email` unsubscribed from all email (as a recipient clicking "unsubscribe
    /// from all" would): `hs_email_optout` becomes `"true"` on its contact.
    pub fn unsubscribe_all(&self, email: &str) {
        self.with(|s| prefs::opt_out_of_all(s, email, "UNSUBSCRIBE_LINK"));
    }

    /// Where webhook batches are sent.
    pub fn set_webhook_target(&self, url: &str) {
        self.with(|s| s.webhook_target = Some(url.to_owned()));
    }

    /// Deliver `events` (in batches of [`HubSpotState::webhook_batch_size`]) to the target
    /// URL, signed, retrying as HubSpot does; returns every attempt once delivery of all
    /// batches is over.
    pub async fn fire(&self, events: Vec<WebhookEvent>) -> Result<Vec<Delivery>, String> {
        self.fire_at(events, None).await
    }

    /// [`FakeHubSpot::fire`] with a fixed `X-HubSpot-Request-Timestamp` (e.g. a stale one).
    pub async fn fire_at(
        &self,
        events: Vec<WebhookEvent>,
        timestamp_ms: Option<i64>,
    ) -> Result<Vec<Delivery>, String> {
        let state = Arc::clone(&self.state);
        let task = self
            .handle
            .spawn(async move { webhooks::deliver(state, events, timestamp_ms).await });
        task.await.map_err(|e| e.to_string())?
    }

    /// Every delivery attempt so far.
    pub fn deliveries(&self) -> Vec<Delivery> {
        self.lock().deliveries.clone()
    }
}
