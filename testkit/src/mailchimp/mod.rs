//! A fake Mailchimp Marketing API v3 on `127.0.0.1:0`, written from Mailchimp's Marketing API
//! documentation (not from any connector), for the campaigns connector's tests.
//!
//! Split by concern: this file holds the public types, the options and the state;
//! `fake.rs` starts the server and has the seeding and inspection API; `people.rs` the test
//! hooks that play what a person or Mailchimp itself does; `http.rs` the server (auth, the
//! concurrency gate, the timeout, faults, routing); `errors.rs` the problem+json errors;
//! `members.rs` the member rules (upsert, status transitions, validation); `listing.rs` the
//! member listing; `batch.rs` the synchronous batch subscribe; `fields.rs` the
//! `fields`/`exclude_fields` projection; `webhooks.rs` webhook registration (with its
//! validation GET) and form-encoded delivery.
//!
//! What it reproduces:
//!
//! * **Auth**: HTTP Basic with any user name and the API key as the password, or
//!   `Authorization: Bearer <token>` / `OAuth <token>` for OAuth tokens. The key ends in
//!   `-<dc>`; a key whose suffix is not the fake's data centre answers 401 `API Key Invalid`
//!   (or 403 `Wrong Datacenter` with [`MailchimpOptions::wrong_dc_forbidden`]); a
//!   `Host: <dc>.api.mailchimp.com` header names the data centre too. No credentials: 401
//!   `API Key Missing`. The API lives under `/3.0/` of [`FakeMailchimp::url`].
//! * **Errors**: `application/problem+json; charset=utf-8` with `type`, `title`, `status`,
//!   `detail`, `instance` (a fresh UUID, also sent as `X-Request-Id`), `errors[]` for field
//!   errors, the `Link: <…ProblemDetailDocument.json>; rel="describedBy"` header; titles in
//!   their human form ("Resource Not Found"). [`MailchimpState::omit_type_titles`] drops
//!   `type` for chosen titles (seen in the wild on `Forgotten Email Not Subscribed`).
//! * **Lists**: `GET /ping`, `GET /lists` and `GET /lists/{id}` (`count`/`offset`,
//!   `total_items`), `GET /lists/{id}/merge-fields`; merge fields and GDPR marketing
//!   permissions are seeded per list.
//! * **Members**: `GET/PUT/PATCH/DELETE /lists/{id}/members/{hash}`, `POST
//!   /lists/{id}/members`, `POST …/actions/delete-permanent`; the hash slot takes the MD5 of
//!   the trimmed, lower-cased address, the address itself, or the `contact_id`; the status
//!   rules of [`members`] (compliance state, forgotten addresses, archive, `pending` sending a
//!   confirmation mail that [`FakeMailchimp::confirmation_mails`] counts).
//! * **Listing**: `GET /lists/{id}/members` with `status`, `since_last_changed`,
//!   `before_last_changed`, `unsubscribed_since`, `sort_field`/`sort_dir`, `count` (default
//!   10, max 1000), `offset`, `fields`/`exclude_fields` (422 `Requested Fields Invalid` for an
//!   unknown path), `total_items`.
//! * **Batch**: the synchronous `POST /lists/{id}` (≤ 500 members, `update_existing`,
//!   per-member `errors[]` with `ERROR_CONTACT_EXISTS`/`ERROR_GENERIC`).
//! * **Webhooks**: `GET/POST /lists/{id}/webhooks`, `GET/DELETE /lists/{id}/webhooks/{id}`;
//!   registration really GETs the URL (User-Agent `MailChimp.com WebHook Validator`) and is
//!   refused unless it answers 2xx; deliveries are form-encoded POSTs (`type`, `fired_at`,
//!   `data[…]`, User-Agent `MailChimp.com`) honouring the hook's `events` and `sources`, with
//!   a 10 s timeout and retries at increasing intervals over 75 minutes (both time-scaled);
//!   unsigned unless [`MailchimpOptions::webhook_signing`]; the test hooks of `people.rs`
//!   (and `POST /__fake/confirm/{list_id}/{subscriber_hash}`) play the person's side.
//! * **Limits**: at most 10 requests in flight per credential; the 11th answers 429 `Too Many
//!   Requests` ("You have exceeded the limit of 10 simultaneous connections."); a 120 s
//!   server-side timeout ([`MailchimpOptions::time_scale`] scales it), after which the client
//!   gets 504 while the request still runs to its end and keeps its slot, as Mailchimp warns
//!   ("those requests could still be considered open"); optionally a bare 403 instead of the
//!   429 ([`MailchimpOptions::throttle_as_bare_403`]).
//! * **Faults**: [`FakeMailchimp::fail_next`] ([`Fault`]) and seeded random faults
//!   ([`crate::faults`]); a request log ([`FakeMailchimp::request_log`]).
//!
//! Where the documentation is unsure the fake takes the stricter reading; each such place says
//! "Stricter" in its doc comment. Not built: `POST /batches` (answers 501 problem+json), batch
//! webhooks, member tags and notes endpoints, interests/interest categories, creating lists
//! over the API, the newer Audiences/Contacts API.

mod batch;
mod errors;
mod fake;
mod fields;
mod http;
mod listing;
pub mod members;
mod people;
mod webhooks;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use md5::{Digest as _, Md5};
use serde_json::Value;

pub use fake::FakeMailchimp;
pub use webhooks::{Delivery, Webhook, WebhookEvent, signature};

/// The default API key (data centre `us6`).
pub const API_KEY: &str = "0123456789abcdef0123456789abcdef-us6";
/// The fake's default data centre.
pub const DC: &str = "us6";
/// An OAuth access token the fake accepts (Mailchimp's tokens carry no data-centre suffix).
pub const OAUTH_TOKEN: &str = "fake-oauth-2b7e151628aed2a6abf7158809cf4f3c";

/// `subscriber_hash`: lower-case hex MD5 of the trimmed, lower-cased address.
pub fn subscriber_hash(email: &str) -> String {
    let digest = Md5::digest(email.trim().to_lowercase().as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// A member's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Status {
    Subscribed,
    Unsubscribed,
    Cleaned,
    Pending,
    Transactional,
    /// Read-only: reached with `DELETE …/members/{hash}`, never through `status`.
    Archived,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Subscribed => "subscribed",
            Status::Unsubscribed => "unsubscribed",
            Status::Cleaned => "cleaned",
            Status::Pending => "pending",
            Status::Transactional => "transactional",
            Status::Archived => "archived",
        }
    }

    /// Any status, `archived` included (the filter and response enum).
    pub fn parse(s: &str) -> Option<Status> {
        Some(match s {
            "subscribed" => Status::Subscribed,
            "unsubscribed" => Status::Unsubscribed,
            "cleaned" => Status::Cleaned,
            "pending" => Status::Pending,
            "transactional" => Status::Transactional,
            "archived" => Status::Archived,
            _ => return None,
        })
    }
}

/// Who made a change: the webhook `sources` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// The person (a form, an unsubscribe link, the confirmation click).
    User,
    /// The account owner in Mailchimp's web app.
    Admin,
    /// A call to the Marketing API.
    Api,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::User => "user",
            Source::Admin => "admin",
            Source::Api => "api",
        }
    }
}

/// A merge field of a list.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeField {
    pub merge_id: u32,
    pub tag: String,
    pub name: String,
    /// `text`, `number`, … (only `number` is type-checked: "Please enter a number").
    pub kind: String,
    pub required: bool,
}

impl MergeField {
    pub fn text(tag: &str, required: bool) -> Self {
        Self {
            merge_id: 0,
            tag: tag.to_owned(),
            name: tag.to_owned(),
            kind: "text".into(),
            required,
        }
    }

    pub fn number(tag: &str, required: bool) -> Self {
        Self {
            kind: "number".into(),
            ..Self::text(tag, required)
        }
    }
}

/// A GDPR marketing permission of a list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MarketingPermission {
    pub id: String,
    pub text: String,
}

/// One list member.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    /// The subscriber hash.
    pub id: String,
    pub email_address: String,
    pub unique_email_id: String,
    pub contact_id: String,
    pub web_id: u64,
    pub email_type: String,
    pub status: Status,
    /// The status a member had when it was archived.
    pub archived_from: Option<Status>,
    /// Who unsubscribed the member (decides the compliance state, see [`members`]).
    pub unsubscribed_by: Option<Source>,
    pub unsubscribe_reason: String,
    pub merge_fields: BTreeMap<String, Value>,
    pub language: String,
    pub vip: bool,
    /// Marketing permission id → enabled.
    pub marketing_permissions: BTreeMap<String, bool>,
    /// `""` when empty, as Mailchimp sends them.
    pub ip_signup: String,
    pub timestamp_signup: String,
    pub ip_opt: String,
    pub timestamp_opt: String,
    pub last_changed: DateTime<Utc>,
    pub source: String,
    /// Creation order (ties in sorted listings keep it).
    pub seq: u64,
}

/// A list ("audience").
#[derive(Debug, Clone)]
pub struct FakeList {
    pub id: String,
    pub name: String,
    pub web_id: u64,
    pub double_optin: bool,
    pub date_created: DateTime<Utc>,
    pub merge_fields: Vec<MergeField>,
    /// Non-empty: the list has GDPR fields (`marketing_permissions: true`).
    pub permissions: Vec<MarketingPermission>,
    /// Subscriber hash → member.
    pub members: BTreeMap<String, Member>,
    /// Subscriber hashes permanently deleted: never accepted again over the API.
    pub forgotten: BTreeSet<String>,
    /// Addresses Mailchimp sent its opt-in confirmation mail to, in order.
    pub confirmation_mails: Vec<String>,
    pub webhooks: Vec<Webhook>,
}

/// What [`FakeMailchimp::fail_next`] does to the next authenticated API call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// This status with the glossary's problem+json body for it; not processed.
    Status(u16),
    /// This status with an empty body (the "bare 403" seen under heavy throttling); not
    /// processed.
    Bare(u16),
    /// HTTP 200 with an HTML body; not processed.
    Garbage,
    /// Processed, answered after this delay (holding its concurrency slot; past the
    /// request timeout the client gets 504 although the call took effect).
    Delay(Duration),
}

/// What a `count` above 1000 does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CountOverMax {
    /// 400 `Invalid Resource` (the default). Stricter: what Mailchimp does is not documented.
    Refuse,
    /// Serve 1000 and note it in the request log.
    Clamp,
}

#[derive(Debug, Clone)]
pub struct MailchimpOptions {
    /// Data centre of the account (the key suffix must match).
    pub dc: String,
    /// Multiplies the request timeout, webhook timeout and retry intervals, and the signup
    /// throttle window (1.0: Mailchimp's numbers).
    pub time_scale: f64,
    /// Requests in flight per credential before 429 (10).
    pub max_connections: usize,
    /// Server-side request timeout before scaling (120 s).
    pub request_timeout: Duration,
    /// Answer a request over the concurrency limit with a bare 403 (no body) instead of the
    /// glossary's 429: seen under very high volume according to third-party reports.
    pub throttle_as_bare_403: bool,
    /// Added to every API call while it holds its slot, so tests can reach the limit.
    pub latency: Duration,
    /// Answer a key of another data centre with 403 `Wrong Datacenter` instead of 401.
    pub wrong_dc_forbidden: bool,
    pub count_over_max: CountOverMax,
    /// Let a member unsubscribed over the API be set back to `subscribed` over the API (some
    /// reports say this works). Stricter default `false`: every unsubscribe is a compliance
    /// state, as the documentation does not say which unsubscribes are.
    pub resubscribe_after_api_unsubscribe: bool,
    /// The per-address anti-abuse throttle: more than N signups (to `subscribed`/`pending`,
    /// across lists) within the window → 400 "… has signed up to a lot of lists very
    /// recently". Mailchimp's numbers are not published; off by default.
    pub signup_throttle: Option<(u32, Duration)>,
    /// Webhook delivery and validation timeout before scaling (10 s); never below 1 s once
    /// scaled, so a loaded test machine does not time out on loopback.
    pub webhook_timeout: Duration,
    /// How long failed webhook deliveries are retried before scaling (75 min); zero: never.
    pub webhook_retry_window: Duration,
    /// Sign webhook deliveries (`X-Mailchimp-Signature`, see `webhooks.rs`); off by default,
    /// as Mailchimp Support describes audience webhooks as unsigned.
    pub webhook_signing: bool,
}

impl Default for MailchimpOptions {
    fn default() -> Self {
        Self {
            dc: DC.into(),
            time_scale: 1.0,
            max_connections: 10,
            request_timeout: Duration::from_secs(120),
            throttle_as_bare_403: false,
            latency: Duration::ZERO,
            wrong_dc_forbidden: false,
            count_over_max: CountOverMax::Refuse,
            resubscribe_after_api_unsubscribe: false,
            signup_throttle: None,
            webhook_timeout: Duration::from_secs(10),
            webhook_retry_window: Duration::from_secs(75 * 60),
            webhook_signing: false,
        }
    }
}

impl MailchimpOptions {
    fn scaled(&self, d: Duration) -> Duration {
        d.mul_f64(self.time_scale.max(0.0))
    }

    fn webhook_timeout(&self) -> Duration {
        self.scaled(self.webhook_timeout)
            .max(Duration::from_secs(1))
    }
}

/// One answered API call.
#[derive(Debug, Clone)]
pub struct RequestRecord {
    pub method: String,
    pub path: String,
    pub query: String,
    /// `METHOD /lists/{list_id}/members/{subscriber_hash}`-style label (see
    /// [`FakeMailchimp::calls`]).
    pub endpoint: String,
    pub body: String,
    pub status: u16,
    pub request_id: String,
    /// Anything worth knowing (e.g. a clamped `count`).
    pub note: String,
}

/// Everything the fake holds; reachable with [`FakeMailchimp::with`].
#[derive(Debug)]
pub struct MailchimpState {
    pub options: MailchimpOptions,
    pub api_keys: BTreeSet<String>,
    pub oauth_tokens: BTreeSet<String>,
    pub lists: BTreeMap<String, FakeList>,
    /// Lower-cased addresses under compliance review: never `subscribed` over the API.
    pub compliance: BTreeSet<String>,
    /// Lower-cased addresses refused as "looks fake or invalid".
    pub fake_looking: BTreeSet<String>,
    /// Local parts refused as "looks fake or invalid" at any domain (default `asdf`, `test`:
    /// Mailchimp's list is not published).
    pub fake_looking_locals: BTreeSet<String>,
    /// Problem titles whose body leaves out `type`.
    pub omit_type_titles: BTreeSet<String>,
    pub faults: VecDeque<Fault>,
    pub random_faults: Option<crate::faults::FaultPlan>,
    pub log: Vec<RequestRecord>,
    /// Requests in flight per credential.
    pub in_flight: HashMap<String, usize>,
    /// The most requests one credential ever had in flight (admitted ones).
    pub peak_concurrency: usize,
    /// Requests refused with 429 by the concurrency gate.
    pub refused_concurrency: u64,
    /// Webhook deliveries, every attempt.
    pub deliveries: Vec<Delivery>,
    /// URLs the fake GET to validate a webhook, with the status they answered (None: no
    /// answer).
    pub validations: Vec<(String, Option<u16>)>,
    signups: HashMap<String, VecDeque<Instant>>,
    /// Churn mode: every `GET /lists/{id}/members` moves `last_changed` of this many random
    /// members to now after answering, so paging clients meet rows that move (0: off).
    pub churn: usize,
    /// Added to the wall clock for every timestamp the fake writes.
    pub clock_offset: chrono::Duration,
    next_seq: u64,
}

impl MailchimpState {
    fn new(options: MailchimpOptions) -> Self {
        Self {
            options,
            api_keys: [API_KEY.to_owned()].into(),
            oauth_tokens: [OAUTH_TOKEN.to_owned()].into(),
            lists: BTreeMap::new(),
            compliance: BTreeSet::new(),
            fake_looking: BTreeSet::new(),
            fake_looking_locals: ["asdf".to_owned(), "test".to_owned()].into(),
            omit_type_titles: BTreeSet::new(),
            faults: VecDeque::new(),
            random_faults: None,
            log: Vec::new(),
            in_flight: HashMap::new(),
            peak_concurrency: 0,
            refused_concurrency: 0,
            deliveries: Vec::new(),
            validations: Vec::new(),
            signups: HashMap::new(),
            churn: 0,
            clock_offset: chrono::Duration::zero(),
            next_seq: 1,
        }
    }

    /// The fake's clock, to the second (Mailchimp's timestamps have no fraction).
    pub fn now(&self) -> DateTime<Utc> {
        let t = Utc::now() + self.clock_offset;
        DateTime::from_timestamp(t.timestamp(), 0).unwrap_or(t)
    }

    fn next_seq(&mut self) -> u64 {
        let n = self.next_seq;
        self.next_seq += 1;
        n
    }

    /// Random lower-case hex of `n` digits.
    fn hex(n: usize) -> String {
        use rand::Rng as _;
        let mut rng = rand::thread_rng();
        (0..n)
            .map(|_| char::from_digit(rng.gen_range(0..16), 16).unwrap_or('0'))
            .collect()
    }

    fn web_id() -> u64 {
        use rand::Rng as _;
        rand::thread_rng().gen_range(100_000_000..999_999_999)
    }
}

/// Mailchimp's timestamp format: `2024-05-01T10:05:12+00:00`.
pub fn iso(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S+00:00").to_string()
}

/// A member to seed with [`FakeMailchimp::insert_member`].
#[derive(Debug, Clone)]
pub struct SeedMember {
    pub email: String,
    pub status: Status,
    /// For `unsubscribed`: who did it (default [`Source::User`], a compliance state).
    pub unsubscribed_by: Option<Source>,
    pub merge_fields: BTreeMap<String, Value>,
    /// Default: now.
    pub last_changed: Option<DateTime<Utc>>,
}

impl SeedMember {
    pub fn new(email: &str, status: Status) -> Self {
        Self {
            email: email.to_owned(),
            status,
            unsubscribed_by: (status == Status::Unsubscribed).then_some(Source::User),
            merge_fields: BTreeMap::new(),
            last_changed: None,
        }
    }
}

type Shared = Arc<Mutex<MailchimpState>>;

fn lock_state(state: &Shared) -> MutexGuard<'_, MailchimpState> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}
