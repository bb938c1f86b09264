//! Zoho Campaigns as optinsync's campaigns tool (README.md, "Zoho Campaigns").
//!
//! # Lists and DOI modes
//!
//! Each optinsync list maps to a Campaigns `listkey` with a DOI mode
//! ([`DoiMode`]). [`CampaignsConnector::health`] (run at start-up) reads `getmailinglists`
//! and refuses, naming the setting, a mapped list that does not exist, and a list whose
//! signup form does not match its mode (`is_public`): a `doi = "optinsync"` list with a
//! signup form would make Zoho send a second confirmation; a `doi = "zoho"` list without one
//! would add contacts with no confirmation at all.
//!
//! For `doi = "zoho"` lists, Zoho holds a subscribed contact as pending until they click
//! Zoho's mail, and a pending contact is absent from `getlistsubscribers?status=active`
//! (inferred from Zoho's list-subscribers page: no "confirmed at" field is documented). Who confirmed is
//! therefore read with [`CampaignsConnector::list_members`] (active members); turning that
//! into a weaker-evidence ledger event (no IP, no text snapshot) is the engine's part and is
//! not wired yet. [`CampaignsConnector::status_events`] reports unsubscribes and bounces for
//! both modes.
//!
//! # Push
//!
//! `subscribe` uses `json/listsubscribe` with `contactinfo` as strict JSON (it also updates the
//! fields of a contact already on the list, so a retry is harmless). Several address-only
//! subscribers for a `doi = "optinsync"` list go through `addlistsubscribersinbulk`, ten per
//! call (the bulk call takes no fields, and whether it sends confirmation mails is not
//! documented, so never for `doi = "zoho"`). `remove` uses `json/listunsubscribe`. Its answers
//! `2101` ("Please retry after sometime.", the only code its page documents, and the answer
//! seen for an address the list does not hold) and `2103` ("Contact does not exist.") are
//! ambiguous, so the connector reads the list (`getlistsubscribers?status=active`; no
//! single-contact lookup is documented) before deciding: an address the list does not
//! hold as active is done (logged at INFO without the address, counted in
//! `optinsync_zoho_campaigns_removal_checks_total`); one it still holds is retried as a
//! [`FailureScope::Record`] failure. An invalid address (`2004`) is done at once: the list
//! cannot hold it. (A contact still pending Zoho's own confirmation on a `doi = "zoho"` list
//! is not `active`, and no documented status shows it: such a removal also counts as done.)
//!
//! # Pull back
//!
//! `status_events` reads `getlistsubscribers` with `status=unsub` and `status=bounce`, all
//! pages, at most once per `status_interval`. The opaque cursor holds when that was and a
//! short hash of every (status, address, added time) already reported, so each unsubscribe or
//! bounce is reported exactly once, and again if the person is re-added and leaves again.
//! Unsubscribes optinsync itself caused (`remove`) are recognised and not reported (no echo
//! loop turning a lapsed contact into a withdrawn one; an unsubscribe the person makes inside
//! Campaigns between optinsync's own removal and the next poll is taken for that echo, and the
//! contact is off the list either way). Spam complaints are not reported:
//! `getlistsubscribers` documents no `spam` status (only `listsubscriberscount` counts them).
//!
//! # Engagement
//!
//! The reference documents no reports/recipients endpoint for opens and clicks, so
//! `engagement` returns nothing; the inactivity rule reads engagement from a CRM field
//! instead (Zoho's own CRM sync can write campaign activity to the CRM).
//!
//! # Quotas and errors
//!
//! See [`budget`]: every endpoint has its documented windows; calls wait for a slot (with an
//! INFO log naming the expected completion time, never addresses) instead of triggering
//! Zoho's 30-minute lock. Budgets and locks survive restarts through
//! [`CampaignsConnector::export_state`] / [`CampaignsConnector::import_state`]. Handed a
//! [`QuotaLedger`] ([`ZohoCampaigns::with_quota_ledger`]; the engine does on PostgreSQL), the
//! connector takes every slot from that shared budget instead, so several instances together
//! stay within Zoho's limits and a lock-out one meets pauses them all.
//!
//! Zoho answers errors with HTTP 200 and a string `code`: invalid address (`2004`, `2005`) →
//! [`ConnectorError::Rejected`]; a "retry after sometime" about one address (`2001`, `2101`,
//! `2103` from `listsubscribe`/`listunsubscribe`; see `remove` above for how removals settle
//! `2101`/`2103` first) → `Transient` of [`FailureScope::Record`]: that row retries with backoff
//! and the engine's circuit breaker ignores it, so one class of failing addresses cannot pause
//! every other delivery; other "retry" codes (`2201`, `2402`, `2502`, ...) and unknown codes →
//! `Transient` of [`FailureScope::Service`]; a lock (a `lock_codes` code, or a message saying
//! "locked", at HTTP 200 or 429) → service `Transient` with `retry_after` = the rest of the
//! lock, and the endpoint is paused until then; any other HTTP 429 pauses the endpoint for its
//! `Retry-After` (5 s without one); list errors (`2501`, `2102`, ...) →
//! [`ConnectorError::Config`] naming the list's setting; `1007`/`401` → one token refresh; 5xx,
//! other statuses, timeouts and bodies that are not JSON → service `Transient`.

pub(crate) mod budget;
pub mod config;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use optinsync_plugin_api::{
    CampaignsConnector, ConnectorError, ConnectorResult, Cursor, Engagement, FailureScope, Health,
    Limits, MemberPage, QuotaLedger, QuotaSlot, QuotaWindow, SharedMarks, StatusEvent, StatusKind,
    StatusPage, Subscriber,
};
use reqwest::{Method, StatusCode, header};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::Semaphore;

use self::budget::{Endpoint, Slot, Window};
pub use self::config::{DoiMode, ListMapping, ZohoCampaignsConfig};
use crate::config::{
    ConfigError, DATA_CENTRES, OAuthSettings, check_url, invalid, parse_duration, parse_settings,
};
use crate::oauth::ZohoOAuth;

/// Pause after an HTTP 429 that names no wait and does not say "locked".
const THROTTLE_PAUSE: Duration = Duration::from_secs(5);

const SETTING_PREFIX: &str = "connectors.campaigns";
/// `addlistsubscribersinbulk` takes at most this many addresses (Zoho's bulk-add page).
pub const BULK_MAX: usize = 10;

/// The Campaigns endpoints the connector calls, with their documented quotas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Api {
    GetMailingLists,
    ListSubscribe,
    ListUnsubscribe,
    BulkAdd,
    GetListSubscribers,
}

/// In-body "retry after sometime" codes that, answered to a call about one address
/// (`listsubscribe`, `listunsubscribe`), concern that address on that list: Zoho answered, so
/// the service is alive (Zoho's subscribe and unsubscribe pages, and its error-code catalogue).
const RECORD_RETRY_CODES: [&str; 3] = ["2001", "2101", "2103"];

impl Api {
    /// The call is about one address on one list, so a "retry later" answer to it is about
    /// that address, not the service.
    fn concerns_one_address(self) -> bool {
        matches!(self, Api::ListSubscribe | Api::ListUnsubscribe)
    }

    pub const ALL: [Api; 5] = [
        Api::GetMailingLists,
        Api::ListSubscribe,
        Api::ListUnsubscribe,
        Api::BulkAdd,
        Api::GetListSubscribers,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Api::GetMailingLists => "getmailinglists",
            Api::ListSubscribe => "listsubscribe",
            Api::ListUnsubscribe => "listunsubscribe",
            Api::BulkAdd => "addlistsubscribersinbulk",
            Api::GetListSubscribers => "getlistsubscribers",
        }
    }

    fn path(self) -> &'static str {
        match self {
            Api::GetMailingLists => "/api/v1.1/getmailinglists",
            Api::ListSubscribe => "/api/v1.1/json/listsubscribe",
            Api::ListUnsubscribe => "/api/v1.1/json/listunsubscribe",
            Api::BulkAdd => "/api/v1.1/addlistsubscribersinbulk",
            Api::GetListSubscribers => "/api/v1.1/getlistsubscribers",
        }
    }

    fn method(self) -> Method {
        match self {
            Api::GetMailingLists | Api::GetListSubscribers => Method::GET,
            _ => Method::POST,
        }
    }

    /// Documented quotas: (calls, window in seconds), and the lock in seconds.
    pub fn documented_limits(self) -> (&'static [(u32, u64)], u64) {
        match self {
            Api::ListSubscribe => (&[(500, 60), (12_500, 3_600), (75_000, 86_400)], 1_800),
            Api::BulkAdd => (&[(2_000, 60)], 600),
            Api::GetMailingLists | Api::ListUnsubscribe | Api::GetListSubscribers => {
                (&[(500, 300)], 1_800)
            }
        }
    }

    fn from_name(name: &str) -> Option<Api> {
        Api::ALL.into_iter().find(|a| a.name() == name)
    }
}

#[derive(Debug, Clone)]
struct Settings {
    base_url: String,
    lists: BTreeMap<String, ListMapping>,
    fields: BTreeMap<String, String>,
    language_field: Option<String>,
    source: String,
    status_interval_ms: i64,
    page_size: u32,
    max_wait: Duration,
    lock_codes: Vec<String>,
    time_scale: f64,
}

/// A [`CampaignsConnector`] for Zoho Campaigns. See the module docs.
#[derive(Debug)]
pub struct ZohoCampaigns {
    settings: Settings,
    http: reqwest::Client,
    oauth: Arc<ZohoOAuth>,
    gate: Semaphore,
    budgets: std::sync::Mutex<BTreeMap<&'static str, Endpoint>>,
    /// Budgets shared with the other instances on the same database (PostgreSQL): when set,
    /// the windows and locks live there and `budgets` only keeps the wait bookkeeping.
    ledger: Option<Arc<dyn QuotaLedger>>,
    /// Own removals shared with the other instances (PostgreSQL): the status poll may run on
    /// another instance than the removal.
    marks: Option<Arc<dyn SharedMarks>>,
    /// listkey → hashes of addresses optinsync unsubscribed itself, not yet seen in a poll.
    own_removals: std::sync::Mutex<BTreeMap<String, BTreeSet<String>>>,
}

/// A failed call: Zoho's in-body error, or already a connector error.
#[derive(Debug)]
enum CallError {
    Api { code: String, message: String },
    Connector(ConnectorError),
}

impl From<ConnectorError> for CallError {
    fn from(e: ConnectorError) -> Self {
        Self::Connector(e)
    }
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

fn code_of(v: &Value) -> String {
    match v.get("code") {
        Some(Value::String(s)) => s.trim().to_owned(),
        Some(Value::Number(n)) => n.to_string(),
        _ => String::new(),
    }
}

fn str_of(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::Bool(b)) => b.to_string(),
        _ => String::new(),
    }
}

/// FNV-1a 64: a stable short fingerprint (the cursor must read the same after an upgrade).
fn fingerprint(parts: &[&str]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain(std::iter::once(0xff)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

fn address_key(email: &str) -> String {
    fingerprint(&[&email.trim().to_lowercase()])
}

/// Parse `"500/1m"`.
fn parse_limit(setting: &str, text: &str) -> Result<(u32, Duration), ConfigError> {
    let (n, per) = text
        .split_once('/')
        .ok_or_else(|| invalid(setting, format!("`{text}` is not like \"500/1m\"")))?;
    let n: u32 = n
        .trim()
        .parse()
        .map_err(|_| invalid(setting, format!("`{text}`: `{n}` is not a number of calls")))?;
    let per = parse_duration(setting, per)?;
    if n == 0 || per.is_zero() {
        return Err(invalid(setting, format!("`{text}` allows no calls")));
    }
    Ok((n, per))
}

impl ZohoCampaigns {
    /// Build from the connector's TOML table (`base_dir` is unused: no local paths).
    pub fn from_config(settings: toml::Table, _base_dir: &Path) -> Result<Self, ConfigError> {
        Self::new(parse_settings(settings)?)
    }

    /// Build from already-parsed settings.
    pub fn new(c: ZohoCampaignsConfig) -> Result<Self, ConfigError> {
        let oauth = OAuthSettings::new(
            &c.client_id,
            &c.client_secret,
            &c.refresh_token,
            &c.data_centre,
            c.accounts_url.as_deref(),
            SETTING_PREFIX,
        )?;
        let http = crate::config::http_client(&c.timeout)?;
        let oauth = Arc::new(ZohoOAuth::new(http.clone(), oauth));
        Self::with_oauth(c, http, oauth)
    }

    /// Build with an OAuth client shared with the Zoho CRM connector (one refresh token, one
    /// token-request budget).
    pub fn with_oauth(
        c: ZohoCampaignsConfig,
        http: reqwest::Client,
        oauth: Arc<ZohoOAuth>,
    ) -> Result<Self, ConfigError> {
        let base_url = match c.campaigns_url.as_deref() {
            Some(u) => check_url("campaigns_url", u)?,
            None if DATA_CENTRES.contains(&c.data_centre.as_str()) => {
                format!("https://campaigns.zoho.{}", c.data_centre)
            }
            None => {
                return Err(invalid(
                    "data_centre",
                    format!(
                        "no known Zoho Campaigns host for `{}`; set campaigns_url",
                        c.data_centre
                    ),
                ));
            }
        };
        if c.lists.is_empty() {
            return Err(invalid(
                "lists",
                "map at least one list, e.g. [connectors.campaigns.lists.newsletter] listkey = \"...\"",
            ));
        }
        for (name, m) in &c.lists {
            if m.listkey.trim().is_empty() {
                return Err(invalid(
                    &format!("lists.{name}.listkey"),
                    "must not be empty",
                ));
            }
        }
        for (display, source) in &c.fields {
            if display.trim().is_empty() || source.trim().is_empty() {
                return Err(invalid("fields", "field names must not be empty"));
            }
            if display.eq_ignore_ascii_case("Contact Email") {
                return Err(invalid(
                    "fields",
                    "`Contact Email` is always the contact's address; do not map it",
                ));
            }
        }
        if !(c.time_scale > 0.0 && c.time_scale <= 1.0) {
            return Err(invalid("time_scale", "must be more than 0 and at most 1"));
        }
        if !(1..=1000).contains(&c.page_size) {
            return Err(invalid("page_size", "must be 1 to 1000"));
        }
        if c.max_concurrency == 0 {
            return Err(invalid("max_concurrency", "must be at least 1"));
        }
        let status_interval = parse_duration("status_interval", &c.status_interval)?;
        let max_wait = parse_duration("max_wait", &c.max_wait)?;
        let scale = |d: Duration| ((d.as_millis() as f64) * c.time_scale).round().max(1.0) as i64;
        let mut budgets = BTreeMap::new();
        for api in Api::ALL {
            let (documented, lock) = api.documented_limits();
            let mut windows: Vec<(u32, Duration)> = documented
                .iter()
                .map(|(n, s)| (*n, Duration::from_secs(*s)))
                .collect();
            if let Some(custom) = c.limits.get(api.name()) {
                let setting = format!("limits.{}", api.name());
                windows = custom
                    .iter()
                    .map(|t| parse_limit(&setting, t))
                    .collect::<Result<_, _>>()?;
                if windows.is_empty() {
                    return Err(invalid(
                        &setting,
                        "name at least one limit, e.g. \"500/1m\"",
                    ));
                }
            }
            budgets.insert(
                api.name(),
                Endpoint::new(
                    windows
                        .into_iter()
                        .map(|(n, per)| Window::new(n, scale(per)))
                        .collect(),
                    scale(Duration::from_secs(lock)),
                ),
            );
        }
        if let Some(unknown) = c.limits.keys().find(|k| Api::from_name(k).is_none()) {
            return Err(invalid(
                &format!("limits.{unknown}"),
                format!(
                    "unknown endpoint; known: {}",
                    Api::ALL.map(Api::name).join(", ")
                ),
            ));
        }
        Ok(Self {
            settings: Settings {
                base_url,
                lists: c.lists,
                fields: c.fields,
                language_field: c.language_field,
                source: c.source,
                status_interval_ms: i64::try_from(status_interval.as_millis()).unwrap_or(i64::MAX),
                page_size: c.page_size,
                max_wait,
                lock_codes: c.lock_codes,
                time_scale: c.time_scale,
            },
            http,
            oauth,
            gate: Semaphore::new(c.max_concurrency),
            budgets: std::sync::Mutex::new(budgets),
            ledger: None,
            marks: None,
            own_removals: std::sync::Mutex::new(BTreeMap::new()),
        })
    }

    /// Take every quota slot from `ledger`, shared with the other instances on the same
    /// database, instead of this process's own budgets: several daemons together then stay
    /// within Zoho's limits, and a lock-out one of them meets pauses all of them.
    pub fn with_quota_ledger(mut self, ledger: Arc<dyn QuotaLedger>) -> Self {
        self.ledger = Some(ledger);
        self
    }

    /// Keep the addresses optinsync removed itself in `marks`, shared with the other
    /// instances, as well as in memory: whichever instance polls the unsubscribes recognises
    /// them (no echo turning a lapsed contact into a withdrawn one).
    pub fn with_shared_marks(mut self, marks: Arc<dyn SharedMarks>) -> Self {
        self.marks = Some(marks);
        self
    }

    /// The shared set of a list's own removals.
    fn removals_set(listkey: &str) -> String {
        format!("zoho-campaigns:own-removals:{listkey}")
    }

    /// The ledger key of an endpoint's budget.
    fn quota_key(api: Api) -> String {
        format!("zoho-campaigns:{}", api.name())
    }

    /// The windows of `api` (documented or configured, time-scaled).
    fn quota_windows(&self, api: Api) -> Vec<QuotaWindow> {
        self.lock_budgets()
            .get(api.name())
            .map(|ep| {
                ep.windows
                    .iter()
                    .map(|w| QuotaWindow {
                        limit: w.limit,
                        length_ms: w.length_ms,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Calls counted in the current windows of `api` and its lock end, from the shared
    /// ledger when there is one, else from this process's budgets.
    pub async fn shared_usage(&self, api: Api) -> ConnectorResult<(Vec<u32>, Option<i64>)> {
        match &self.ledger {
            Some(l) => {
                l.usage(&Self::quota_key(api), &self.quota_windows(api), now_ms())
                    .await
            }
            None => Ok((
                self.budget_usage(api),
                self.locked_until(api).map(|t| t.timestamp_millis()),
            )),
        }
    }

    /// The OAuth client (to share, or for diagnostics).
    pub fn oauth(&self) -> &Arc<ZohoOAuth> {
        &self.oauth
    }

    /// Calls counted in the current windows of `api`: one number per window, in the order
    /// of [`Api::documented_limits`] (or the configured override).
    pub fn budget_usage(&self, api: Api) -> Vec<u32> {
        let now = now_ms();
        let mut b = self.lock_budgets();
        b.get_mut(api.name())
            .map(|ep| ep.windows.iter_mut().map(|w| w.used(now)).collect())
            .unwrap_or_default()
    }

    /// Until when `api` is paused by a Zoho lock, if it is.
    pub fn locked_until(&self, api: Api) -> Option<DateTime<Utc>> {
        let b = self.lock_budgets();
        b.get(api.name())
            .and_then(|ep| ep.locked_until)
            .filter(|u| *u > now_ms())
            .and_then(DateTime::from_timestamp_millis)
    }

    fn lock_budgets(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, Endpoint>> {
        self.budgets.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_removals(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, BTreeSet<String>>> {
        self.own_removals.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn mapping(&self, list: &str) -> ConnectorResult<&ListMapping> {
        self.settings
            .lists
            .get(list)
            .ok_or_else(|| ConnectorError::Config {
                setting: format!("{SETTING_PREFIX}.lists.{list}"),
                message: format!(
                    "list `{list}` has no Zoho Campaigns mapping; add [{SETTING_PREFIX}.lists.{list}] with its listkey (mapped: {})",
                    self.settings.lists.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            })
    }

    // -----------------------------------------------------------------------------------------
    // Quotas
    // -----------------------------------------------------------------------------------------

    /// Wait for a slot of `api`'s quota; returns the time the call was counted at.
    async fn slot(&self, api: Api) -> ConnectorResult<i64> {
        let mut waited = false;
        let result = loop {
            let now = now_ms();
            let shared = match &self.ledger {
                Some(l) => match l
                    .take(&Self::quota_key(api), &self.quota_windows(api), now)
                    .await
                {
                    Ok(QuotaSlot::Go(at)) => Some(Slot::Go(at)),
                    Ok(QuotaSlot::Wait(d)) => Some(Slot::Wait(d)),
                    Ok(QuotaSlot::Locked(d)) => Some(Slot::Locked(d)),
                    Err(e) => break Err(e),
                },
                None => None,
            };
            let (slot, log) = {
                let mut budgets = self.lock_budgets();
                let Some(ep) = budgets.get_mut(api.name()) else {
                    break Ok(now);
                };
                let slot = match shared {
                    Some(s) => s,
                    None => ep.slot(now),
                };
                let mut log = None;
                if let Slot::Wait(wait) = slot {
                    if !waited {
                        ep.waiting += 1;
                        waited = true;
                    }
                    // One INFO line per endpoint every few seconds, not one per waiting call.
                    let quiet = i64::try_from(self.scaled(Duration::from_secs(10)).as_millis())
                        .unwrap_or(10_000);
                    if ep.last_wait_log.is_none_or(|t| now - t >= quiet) {
                        ep.last_wait_log = Some(now);
                        let per_call = ep
                            .tightest()
                            .map(|(n, len)| len as f64 / f64::from(n.max(1)))
                            .unwrap_or(0.0);
                        let rest = (ep.waiting.saturating_sub(1) as f64 * per_call) as i64;
                        log = Some((wait, ep.waiting, now + wait.as_millis() as i64 + rest));
                    }
                }
                (slot, log)
            };
            match slot {
                Slot::Go(at) => break Ok(at),
                Slot::Locked(rest) => {
                    metrics::counter!("optinsync_zoho_campaigns_lockouts_total", "endpoint" => api.name()).increment(1);
                    break Err(ConnectorError::Transient {
                        message: format!(
                            "Zoho Campaigns has locked `{}` for exceeding its quota; paused for {} s",
                            api.name(),
                            rest.as_secs()
                        ),
                        retry_after: Some(rest),
                        scope: FailureScope::Service,
                    });
                }
                Slot::Wait(wait) => {
                    // Bounded labels: the endpoint name only.
                    metrics::counter!("optinsync_zoho_campaigns_quota_waits_total", "endpoint" => api.name())
                        .increment(1);
                    metrics::histogram!("optinsync_zoho_campaigns_quota_wait_seconds", "endpoint" => api.name())
                        .record(wait.as_secs_f64());
                    if let Some((wait, waiting, done_ms)) = log {
                        let done = DateTime::from_timestamp_millis(done_ms)
                            .map(|d| d.to_rfc3339())
                            .unwrap_or_default();
                        tracing::info!(
                            endpoint = api.name(),
                            wait_ms = wait.as_millis() as u64,
                            waiting,
                            expected_done = %done,
                            "Zoho Campaigns quota in use; calls wait for their slot instead of triggering the lock"
                        );
                    }
                    if wait > self.settings.max_wait {
                        break Err(ConnectorError::Transient {
                            message: format!(
                                "Zoho Campaigns `{}` quota is used up; next slot in {} s",
                                api.name(),
                                wait.as_secs()
                            ),
                            retry_after: Some(wait),
                            scope: FailureScope::Service,
                        });
                    }
                    tokio::time::sleep(wait).await;
                }
            }
        };
        if waited {
            let mut budgets = self.lock_budgets();
            if let Some(ep) = budgets.get_mut(api.name()) {
                ep.waiting = ep.waiting.saturating_sub(1);
            }
        }
        result
    }

    fn scaled(&self, d: Duration) -> Duration {
        d.mul_f64(self.settings.time_scale)
    }

    async fn settle(&self, api: Api, sent: i64) {
        let done = now_ms();
        if let Some(l) = &self.ledger {
            // Best effort: the call stays counted at its send time if this fails.
            if let Err(e) = l
                .settle(&Self::quota_key(api), &self.quota_windows(api), sent, done)
                .await
            {
                tracing::warn!(endpoint = api.name(), error = %e, "shared quota: call not moved to its answer time");
            }
            return;
        }
        let mut budgets = self.lock_budgets();
        if let Some(ep) = budgets.get_mut(api.name()) {
            ep.settle(sent, done);
        }
    }

    async fn mark_locked(&self, api: Api, retry_after: Option<Duration>) -> Duration {
        // (`retry_after` None: the endpoint's documented lock length.)
        let (rest, until) = {
            let mut budgets = self.lock_budgets();
            let Some(ep) = budgets.get_mut(api.name()) else {
                return retry_after.unwrap_or(Duration::from_secs(1800));
            };
            let rest = retry_after.unwrap_or(Duration::from_millis(
                u64::try_from(ep.lock_ms).unwrap_or(1_800_000),
            ));
            let until = now_ms() + i64::try_from(rest.as_millis()).unwrap_or(i64::MAX / 2);
            ep.lock(until);
            (rest, until)
        };
        // Every instance pauses the endpoint, not only the one that met the lock.
        if let Some(l) = &self.ledger
            && let Err(e) = l.lock(&Self::quota_key(api), until).await
        {
            tracing::warn!(endpoint = api.name(), error = %e, "shared quota: lock-out not shared with the other instances");
        }
        rest
    }

    // -----------------------------------------------------------------------------------------
    // HTTP
    // -----------------------------------------------------------------------------------------

    /// One call, within quota, with one token refresh on `1007`/`401`. Parameters go in the
    /// query string for reads and in a form body for writes (addresses stay out of URLs).
    async fn call(&self, api: Api, params: &[(&str, String)]) -> Result<Value, CallError> {
        let _permit =
            self.gate.acquire().await.map_err(|_| {
                ConnectorError::transient("Zoho Campaigns connector is shutting down")
            })?;
        let mut refreshed = false;
        loop {
            let token = self.oauth.token().await?;
            let sent = self.slot(api).await?;
            let url = format!("{}{}", self.settings.base_url, api.path());
            let mut all: Vec<(&str, &str)> = vec![("resfmt", "JSON")];
            all.extend(params.iter().map(|(k, v)| (*k, v.as_str())));
            let builder = self
                .http
                .request(api.method(), &url)
                .header(header::AUTHORIZATION, token.header());
            let builder = if api.method() == Method::GET {
                builder.query(&all)
            } else {
                builder.form(&all)
            };
            let response = builder.send().await;
            self.settle(api, sent).await;
            let response = response.map_err(|e| {
                let what = if e.is_timeout() {
                    "timed out"
                } else {
                    "failed"
                };
                ConnectorError::transient(format!(
                    "Zoho Campaigns `{}` {what}: {}",
                    api.name(),
                    crate::error_chain(&e)
                ))
            })?;
            let status = response.status();
            let retry_after = response
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let body = response.bytes().await.map_err(|e| {
                ConnectorError::transient(format!(
                    "reading Zoho Campaigns' answer to `{}` failed: {e}",
                    api.name()
                ))
            })?;
            if status == StatusCode::TOO_MANY_REQUESTS {
                // Zoho's lock-out says "locked"; any other 429 (a gateway's throttle, with or
                // without `Retry-After`) pauses the endpoint briefly, not for a 30-minute lock
                // that would also hold back the unsubscribe/bounce poll.
                let says_locked = String::from_utf8_lossy(&body)
                    .to_lowercase()
                    .contains("locked");
                let retry_after = if says_locked {
                    retry_after
                } else {
                    Some(retry_after.unwrap_or(THROTTLE_PAUSE))
                };
                let rest = self.mark_locked(api, retry_after).await;
                tracing::warn!(
                    endpoint = api.name(),
                    pause_secs = rest.as_secs(),
                    "Zoho Campaigns answered 429; endpoint paused"
                );
                return Err(ConnectorError::Transient {
                    message: format!("Zoho Campaigns `{}` answered HTTP 429", api.name()),
                    retry_after: Some(rest),
                    scope: FailureScope::Service,
                }
                .into());
            }
            if status == StatusCode::UNAUTHORIZED && !refreshed {
                self.oauth.invalidate(&token).await;
                refreshed = true;
                continue;
            }
            if !status.is_success() {
                tracing::warn!(
                    endpoint = api.name(),
                    status = status.as_u16(),
                    "Zoho Campaigns HTTP error"
                );
                return Err(ConnectorError::Transient {
                    message: format!("Zoho Campaigns `{}` answered HTTP {status}", api.name()),
                    retry_after,
                    scope: FailureScope::Service,
                }
                .into());
            }
            let value: Value = serde_json::from_slice(&body).map_err(|e| {
                tracing::warn!(endpoint = api.name(), "Zoho Campaigns answered with a body that is not JSON");
                ConnectorError::transient(format!(
                    "Zoho Campaigns answered `{}` with a body that is not JSON (is resfmt=JSON honoured?): {e}",
                    api.name()
                ))
            })?;
            let code = code_of(&value);
            let ok_status = value
                .get("status")
                .and_then(Value::as_str)
                .is_some_and(|s| s.eq_ignore_ascii_case("success"));
            let error_status = value
                .get("status")
                .and_then(Value::as_str)
                .is_some_and(|s| s.eq_ignore_ascii_case("error"));
            if !error_status && (ok_status || code == "0" || code == "200") {
                return Ok(value);
            }
            let message = str_of(&value, "message");
            if self.settings.lock_codes.contains(&code) || message.to_lowercase().contains("locked")
            {
                let rest = self.mark_locked(api, retry_after).await;
                tracing::warn!(endpoint = api.name(), code = %code, pause_secs = rest.as_secs(), "Zoho Campaigns locked the endpoint; paused until the lock ends");
                return Err(ConnectorError::Transient {
                    message: format!(
                        "Zoho Campaigns locked `{}` (code {code}: {message})",
                        api.name()
                    ),
                    retry_after: Some(rest),
                    scope: FailureScope::Service,
                }
                .into());
            }
            if matches!(code.as_str(), "1007" | "401") && !refreshed {
                tracing::debug!(code = %code, "Zoho Campaigns refused the access token; refreshing it");
                self.oauth.invalidate(&token).await;
                refreshed = true;
                continue;
            }
            if code.is_empty() && message.is_empty() {
                return Err(ConnectorError::transient(format!(
                    "Zoho Campaigns answered `{}` with JSON that has neither a success status nor an error code",
                    api.name()
                ))
                .into());
            }
            return Err(CallError::Api { code, message });
        }
    }

    /// Map an in-body error of a call concerning `list` (its optinsync name).
    fn api_error(&self, api: Api, list: &str, code: &str, message: &str) -> ConnectorError {
        let what = format!("Zoho Campaigns `{}` error {code}: {message}", api.name());
        match code {
            // Invalid / group address: will never succeed.
            "2004" | "2005" | "1001" => ConnectorError::Rejected { message: what },
            // The list key is wrong, the list is gone, or the token may not use it.
            "2501" | "2102" | "2002" | "2202" | "2206" | "2707" | "2701" | "2704" | "2706" => {
                self.list_config_error(list, &what)
            }
            "1007" | "401" => ConnectorError::Config {
                setting: format!("{SETTING_PREFIX}.refresh_token"),
                message: format!(
                    "{what} (the token was refused twice: check its scopes, ZohoCampaigns.contact.ALL)"
                ),
            },
            "901" | "902" => ConnectorError::Config {
                setting: format!("{SETTING_PREFIX}.refresh_token"),
                message: format!(
                    "{what} (the Zoho Campaigns account is not active for this token)"
                ),
            },
            "914" | "2302" => ConnectorError::Permanent { message: what },
            // "Please retry after sometime" about this address: this record retries with
            // backoff; the service answered, so no other record waits for it.
            c if api.concerns_one_address() && RECORD_RETRY_CODES.contains(&c) => {
                tracing::debug!(
                    endpoint = api.name(),
                    code,
                    "Zoho Campaigns error about one address; that record will retry"
                );
                ConnectorError::record_transient(what)
            }
            // Other "please retry after sometime" and anything unknown: retried with backoff,
            // and counted as a service failure (cautious: it may concern every call).
            _ => {
                tracing::warn!(
                    endpoint = api.name(),
                    code,
                    "Zoho Campaigns error; will retry"
                );
                ConnectorError::transient(what)
            }
        }
    }

    fn list_config_error(&self, list: &str, what: &str) -> ConnectorError {
        ConnectorError::Config {
            setting: format!("{SETTING_PREFIX}.lists.{list}.listkey"),
            message: format!("{what} (check the listkey of list `{list}`)"),
        }
    }

    fn contact_info(&self, s: &Subscriber) -> String {
        let mut info = Map::new();
        info.insert(
            "Contact Email".into(),
            Value::String(s.email.trim().to_owned()),
        );
        for (display, source) in &self.settings.fields {
            let value = match s.fields.get(source) {
                Some(Value::String(v)) if !v.trim().is_empty() => v.trim().to_owned(),
                Some(Value::Number(n)) => n.to_string(),
                _ => continue,
            };
            info.insert(display.clone(), Value::String(value));
        }
        if let (Some(field), Some(lang)) = (&self.settings.language_field, &s.language) {
            info.insert(field.clone(), Value::String(lang.clone()));
        }
        Value::Object(info).to_string()
    }

    fn has_mapped_fields(&self, s: &Subscriber) -> bool {
        let filled = self
            .settings
            .fields
            .values()
            .any(|source| match s.fields.get(source) {
                Some(Value::String(v)) => !v.trim().is_empty(),
                Some(Value::Number(_)) => true,
                _ => false,
            });
        filled || (self.settings.language_field.is_some() && s.language.is_some())
    }

    async fn subscribe_one(
        &self,
        list: &str,
        m: &ListMapping,
        s: &Subscriber,
    ) -> ConnectorResult<()> {
        let params = [
            ("listkey", m.listkey.clone()),
            ("contactinfo", self.contact_info(s)),
            ("source", self.settings.source.clone()),
        ];
        match self.call(Api::ListSubscribe, &params).await {
            Ok(_) => Ok(()),
            // "Contact exists in this list": already done.
            Err(CallError::Api { code, .. }) if code == "2003" => Ok(()),
            Err(CallError::Api { code, message }) => {
                Err(self.api_error(Api::ListSubscribe, list, &code, &message))
            }
            Err(CallError::Connector(e)) => Err(e),
        }
    }

    async fn bulk_add(&self, list: &str, m: &ListMapping, emails: &[&str]) -> ConnectorResult<()> {
        let params = [
            ("listkey", m.listkey.clone()),
            ("emailids", emails.join(",")),
        ];
        match self.call(Api::BulkAdd, &params).await {
            Ok(_) => Ok(()),
            Err(CallError::Api { code, message }) => {
                Err(self.api_error(Api::BulkAdd, list, &code, &message))
            }
            Err(CallError::Connector(e)) => Err(e),
        }
    }

    /// Every mailing list of the org: (listkey, name, is_public).
    pub async fn mailing_lists(&self) -> ConnectorResult<Vec<(String, String, bool)>> {
        let mut out = Vec::new();
        let range: usize = 100;
        let mut from = 1;
        loop {
            let params = [
                ("sort", "asc".to_owned()),
                ("fromindex", from.to_string()),
                ("range", range.to_string()),
            ];
            let value = match self.call(Api::GetMailingLists, &params).await {
                Ok(v) => v,
                // "No mailing list has been created."
                Err(CallError::Api { code, .. }) if code == "2401" => break,
                Err(CallError::Api { code, message }) => {
                    return Err(match code.as_str() {
                        "1007" | "401" | "2706" | "2701" | "2704" | "901" | "902" => {
                            ConnectorError::Config {
                                setting: format!("{SETTING_PREFIX}.refresh_token"),
                                message: format!(
                                    "Zoho Campaigns refused to list the mailing lists (error {code}: {message}); the token needs ZohoCampaigns.contact.READ"
                                ),
                            }
                        }
                        _ => ConnectorError::transient(format!(
                            "Zoho Campaigns `getmailinglists` error {code}: {message}"
                        )),
                    });
                }
                Err(CallError::Connector(e)) => return Err(e),
            };
            let items = value
                .get("list_of_details")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            for item in &items {
                let key = str_of(item, "listkey");
                if key.is_empty() {
                    continue;
                }
                let public = match item.get("is_public") {
                    Some(Value::Bool(b)) => *b,
                    Some(Value::String(s)) => s.trim().eq_ignore_ascii_case("true"),
                    _ => false,
                };
                out.push((key, str_of(item, "listname"), public));
            }
            if items.len() < range {
                break;
            }
            from += range;
        }
        Ok(out)
    }

    /// One page of `getlistsubscribers` (`None` past the end).
    async fn subscribers_page(
        &self,
        list: &str,
        listkey: &str,
        status: &str,
        from: usize,
    ) -> ConnectorResult<Vec<Value>> {
        let params = [
            ("listkey", listkey.to_owned()),
            ("status", status.to_owned()),
            ("sort", "asc".to_owned()),
            ("fromindex", from.to_string()),
            ("range", self.settings.page_size.to_string()),
        ];
        match self.call(Api::GetListSubscribers, &params).await {
            Ok(v) => Ok(v
                .get("list_of_details")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()),
            // "There are no contacts in this list" (the per-endpoint page says "deleted";
            // a deleted list is caught by the start-up check).
            Err(CallError::Api { code, .. }) if code == "2203" || code == "2204" => Ok(Vec::new()),
            Err(CallError::Api { code, message }) => {
                Err(self.api_error(Api::GetListSubscribers, list, &code, &message))
            }
            Err(CallError::Connector(e)) => Err(e),
        }
    }

    /// Whether `listkey` holds `email` as an active member: every page of
    /// `getlistsubscribers?status=active` until the address is found (the reference documents
    /// no lookup of one contact). Read fresh for every ambiguous removal, not cached: a
    /// removal is a legal duty, and a stale "not there" would leave the person on the list.
    /// For the same reason only an empty page ends the read (Zoho may cap `range` below
    /// `page_size`; a short page is not proof of the end).
    async fn holds_active(&self, list: &str, listkey: &str, email: &str) -> ConnectorResult<bool> {
        let wanted = address_key(email);
        let mut from = 1;
        loop {
            let items = self.subscribers_page(list, listkey, "active", from).await?;
            if items.is_empty() {
                return Ok(false);
            }
            if items
                .iter()
                .filter_map(Self::member_email)
                .any(|e| address_key(&e) == wanted)
            {
                return Ok(true);
            }
            from += items.len();
        }
    }

    /// Nothing was unsubscribed after all, so the status poll has nothing to recognise.
    async fn forget_own_removal(&self, listkey: &str, email: &str) {
        if let Some(set) = self.lock_removals().get_mut(listkey) {
            set.remove(&address_key(email));
        }
        if let Some(marks) = &self.marks
            && let Err(e) = marks
                .unmark(&Self::removals_set(listkey), &[address_key(email)])
                .await
        {
            tracing::debug!(error = %e, "shared own-removal mark not cleared");
        }
    }

    /// How the connector reads one answer body: the in-body `code`, whether it counts as
    /// success, the `message`, and each `list_of_details` member's address and time. The
    /// pure part of [`Self::call`] and the status poll, public only for fuzzing.
    #[doc(hidden)]
    pub fn read_answer(body: &[u8]) -> Option<AnswerSummary> {
        let value: Value = serde_json::from_slice(body).ok()?;
        let code = code_of(&value);
        let status = value.get("status").and_then(Value::as_str);
        let ok = !status.is_some_and(|s| s.eq_ignore_ascii_case("error"))
            && (status.is_some_and(|s| s.eq_ignore_ascii_case("success"))
                || code == "0"
                || code == "200");
        let members = value
            .get("list_of_details")
            .and_then(Value::as_array)
            .map(|items| {
                items
                    .iter()
                    .map(|item| {
                        let email = Self::member_email(item);
                        let key = email.as_deref().map(|e| {
                            let added = str_of(item, "added_time");
                            fingerprint(&["unsub", &e.to_lowercase(), &added])
                        });
                        (email.map(|e| address_key(&e)), key, Self::member_time(item))
                    })
                    .collect()
            })
            .unwrap_or_default();
        Some(AnswerSummary {
            code,
            ok,
            message: str_of(&value, "message"),
            members,
        })
    }

    fn member_email(item: &Value) -> Option<String> {
        ["contact_email", "Contact Email", "email"]
            .iter()
            .map(|k| str_of(item, k))
            .find(|e| !e.trim().is_empty())
            .map(|e| e.trim().to_owned())
    }

    fn member_time(item: &Value) -> Option<DateTime<Utc>> {
        let t = str_of(item, "added_time");
        t.trim()
            .parse::<i64>()
            .ok()
            .and_then(DateTime::from_timestamp_millis)
    }
}

/// See [`ZohoCampaigns::read_answer`]; members as (address key, seen-set key, added time).
#[doc(hidden)]
#[derive(Debug)]
pub struct AnswerSummary {
    pub code: String,
    pub ok: bool,
    pub message: String,
    #[allow(clippy::type_complexity)]
    pub members: Vec<(Option<String>, Option<String>, Option<DateTime<Utc>>)>,
}

/// The status cursor: when the last full pass ran and what it had seen.
#[derive(Debug, Default, Serialize, Deserialize)]
struct StatusCursor {
    v: u32,
    /// Wall-clock ms of the last full pass.
    polled: i64,
    /// status → fingerprints of (status, address, added time) already reported.
    seen: BTreeMap<String, BTreeSet<String>>,
}

/// Statuses read back, and what they mean.
const STATUSES: [(&str, StatusKind); 2] = [
    ("unsub", StatusKind::Unsubscribed),
    ("bounce", StatusKind::Bounced),
];

#[async_trait]
impl CampaignsConnector for ZohoCampaigns {
    /// For a `doi = "zoho"` list, `listsubscribe` to its signup form makes Zoho send its own
    /// confirmation mail and hold the contact until the person confirms.
    async fn request_doi(&self, list: &str, subscriber: &Subscriber) -> ConnectorResult<()> {
        let m = self.mapping(list)?;
        if m.doi != DoiMode::Zoho {
            return Err(ConnectorError::Config {
                setting: format!("{SETTING_PREFIX}.lists.{list}.doi"),
                message: format!(
                    "the optinsync list asks Zoho to run the double opt-in (doi = \"campaigns\"), but `{list}` is mapped with doi = \"optinsync\"; set doi = \"zoho\" on a signup-form list"
                ),
            });
        }
        self.subscribe(list, std::slice::from_ref(subscriber)).await
    }

    async fn subscribe(&self, list: &str, subscribers: &[Subscriber]) -> ConnectorResult<()> {
        let m = self.mapping(list)?;
        // Back on the list: a later unsubscribe is the person's own, not an echo of ours.
        if let Some(set) = self.lock_removals().get_mut(&m.listkey) {
            for s in subscribers {
                set.remove(&address_key(&s.email));
            }
        }
        let bulk = m.doi == DoiMode::Optinsync
            && subscribers.len() >= 2
            && subscribers.iter().all(|s| !self.has_mapped_fields(s));
        let mut rejected = 0;
        let mut first_error = None;
        if bulk {
            let emails: Vec<&str> = subscribers.iter().map(|s| s.email.trim()).collect();
            for chunk in emails.chunks(BULK_MAX) {
                self.bulk_add(list, m, chunk).await?;
            }
            tracing::debug!(
                list,
                count = subscribers.len(),
                "subscribed on Zoho Campaigns (bulk)"
            );
            return Ok(());
        }
        for s in subscribers {
            match self.subscribe_one(list, m, s).await {
                Ok(()) => {}
                Err(ConnectorError::Rejected { message }) => {
                    rejected += 1;
                    first_error.get_or_insert(ConnectorError::Rejected { message });
                }
                // A retry repeats the whole batch; the calls done so far are idempotent.
                Err(e) => return Err(e),
            }
        }
        match first_error {
            Some(ConnectorError::Rejected { message }) if subscribers.len() > 1 => {
                Err(ConnectorError::Rejected {
                    message: format!(
                        "{rejected} of {} addresses refused; first: {message}",
                        subscribers.len()
                    ),
                })
            }
            Some(e) => Err(e),
            None => {
                tracing::debug!(
                    list,
                    count = subscribers.len(),
                    doi = m.doi.as_str(),
                    "subscribed on Zoho Campaigns"
                );
                Ok(())
            }
        }
    }

    async fn remove(&self, list: &str, emails: &[String]) -> ConnectorResult<()> {
        let m = self.mapping(list)?;
        for email in emails {
            // Remember first: the poll that follows must not echo this back as the person's
            // own unsubscribe.
            self.lock_removals()
                .entry(m.listkey.clone())
                .or_default()
                .insert(address_key(email));
            if let Some(marks) = &self.marks {
                // Not remembered for the other instances: do not remove yet (retried).
                marks
                    .mark(&Self::removals_set(&m.listkey), &address_key(email))
                    .await?;
            }
            let info = Value::Object(Map::from_iter([(
                "Contact Email".to_owned(),
                Value::String(email.trim().to_owned()),
            )]))
            .to_string();
            let params = [("listkey", m.listkey.clone()), ("contactinfo", info)];
            match self.call(Api::ListUnsubscribe, &params).await {
                Ok(_) => {}
                // Not an address Zoho could hold: nothing to remove.
                Err(CallError::Api { code, .. }) if code == "2004" => {
                    self.forget_own_removal(&m.listkey, email).await;
                    tracing::debug!(list, code = %code, "address invalid for Zoho Campaigns; nothing to remove");
                }
                // Ambiguous: 2101 is both "retry later" and what Zoho answers for an address
                // the list does not hold; 2103 says "does not exist". Read the list to decide.
                Err(CallError::Api { code, message })
                    if matches!(code.as_str(), "2101" | "2103") =>
                {
                    // (The label is one of the two codes matched above: bounded.)
                    let code_label = if code == "2101" { "2101" } else { "2103" };
                    // A failing read is a service failure and propagates as one.
                    if self.holds_active(list, &m.listkey, email).await? {
                        metrics::counter!("optinsync_zoho_campaigns_removal_checks_total", "code" => code_label, "found" => "on_list").increment(1);
                        tracing::info!(
                            list,
                            code = code_label,
                            "Zoho Campaigns refused a removal, and the list still holds the address; this removal will retry"
                        );
                        return Err(self.api_error(Api::ListUnsubscribe, list, &code, &message));
                    }
                    self.forget_own_removal(&m.listkey, email).await;
                    metrics::counter!("optinsync_zoho_campaigns_removal_checks_total", "code" => code_label, "found" => "not_on_list").increment(1);
                    tracing::info!(
                        list,
                        code = code_label,
                        "Zoho Campaigns refused a removal, and the list does not hold the address (checked with getlistsubscribers); nothing to remove, done"
                    );
                }
                Err(CallError::Api { code, message }) => {
                    return Err(self.api_error(Api::ListUnsubscribe, list, &code, &message));
                }
                Err(CallError::Connector(e)) => return Err(e),
            }
        }
        Ok(())
    }

    async fn status_events(
        &self,
        list: &str,
        cursor: Option<&Cursor>,
    ) -> ConnectorResult<StatusPage> {
        let m = self.mapping(list)?;
        let previous: StatusCursor = match cursor {
            None => StatusCursor::default(),
            Some(c) => serde_json::from_str(&c.0).map_err(|e| ConnectorError::InvalidInput {
                message: format!(
                    "the stored Zoho Campaigns status cursor of `{list}` is unreadable: {e}"
                ),
            })?,
        };
        let now = now_ms();
        if cursor.is_some() && now - previous.polled < self.settings.status_interval_ms {
            return Ok(StatusPage {
                events: Vec::new(),
                next_cursor: None,
                has_more: false,
            });
        }
        let mut own: BTreeSet<String> = self
            .lock_removals()
            .get(&m.listkey)
            .cloned()
            .unwrap_or_default();
        if let Some(marks) = &self.marks {
            own.extend(marks.marked(&Self::removals_set(&m.listkey)).await?);
        }
        let mut consumed_own = BTreeSet::new();
        let mut next = StatusCursor {
            v: 1,
            polled: now,
            seen: BTreeMap::new(),
        };
        let mut events = Vec::new();
        let page = self.settings.page_size as usize;
        // On a list whose double opt-in Zoho runs, a newly active member is a confirmation.
        let statuses: Vec<(&str, StatusKind)> = STATUSES
            .into_iter()
            .chain((m.doi == DoiMode::Zoho).then_some(("active", StatusKind::Confirmed)))
            .collect();
        for (status, kind) in statuses {
            let seen_before = previous.seen.get(status);
            let seen_now = next.seen.entry(status.to_owned()).or_default();
            let mut from = 1;
            loop {
                let items = self
                    .subscribers_page(list, &m.listkey, status, from)
                    .await?;
                for item in &items {
                    let Some(email) = Self::member_email(item) else {
                        continue;
                    };
                    let at = Self::member_time(item);
                    let key =
                        fingerprint(&[status, &email.to_lowercase(), &str_of(item, "added_time")]);
                    let fresh = !seen_before.is_some_and(|s| s.contains(&key));
                    seen_now.insert(key);
                    if !fresh {
                        continue;
                    }
                    let addr = address_key(&email);
                    if kind == StatusKind::Unsubscribed && own.contains(&addr) {
                        consumed_own.insert(addr);
                        continue;
                    }
                    events.push(StatusEvent {
                        email,
                        kind,
                        at: at.unwrap_or_else(Utc::now),
                        detail: Some(format!(
                            "Zoho Campaigns list {} reports status `{status}`",
                            m.listkey
                        )),
                    });
                }
                if items.len() < page {
                    break;
                }
                from += page;
            }
        }
        if !consumed_own.is_empty() {
            {
                let mut removals = self.lock_removals();
                if let Some(set) = removals.get_mut(&m.listkey) {
                    set.retain(|k| !consumed_own.contains(k));
                }
            }
            if let Some(marks) = &self.marks {
                let consumed: Vec<String> = consumed_own.iter().cloned().collect();
                marks
                    .unmark(&Self::removals_set(&m.listkey), &consumed)
                    .await?;
            }
        }
        if !events.is_empty() {
            tracing::info!(
                list,
                events = events.len(),
                "Zoho Campaigns reported unsubscribes/bounces"
            );
        }
        let text = serde_json::to_string(&next).map_err(|e| {
            ConnectorError::permanent(format!("cannot write the status cursor: {e}"))
        })?;
        Ok(StatusPage {
            events,
            next_cursor: Some(Cursor(text)),
            has_more: false,
        })
    }

    async fn engagement(
        &self,
        _list: &str,
        _emails: &[String],
    ) -> ConnectorResult<Vec<Engagement>> {
        // No reports/recipients endpoint is documented (in Zoho's public API pages): engagement comes
        // from a CRM field instead. See the module docs.
        Ok(Vec::new())
    }

    async fn health(&self) -> ConnectorResult<Health> {
        let lists = self.mailing_lists().await?;
        let mut notes = Vec::new();
        for (name, m) in &self.settings.lists {
            let setting = format!("{SETTING_PREFIX}.lists.{name}.listkey");
            let Some((_, listname, public)) = lists.iter().find(|(k, _, _)| *k == m.listkey) else {
                let known = if lists.is_empty() {
                    "the org has no mailing lists".to_owned()
                } else {
                    format!(
                        "lists this token can see: {}",
                        lists
                            .iter()
                            .map(|(k, n, _)| format!("`{n}` ({k})"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                };
                return Err(ConnectorError::Config {
                    setting,
                    message: format!(
                        "Zoho Campaigns has no mailing list with listkey `{}` (mapped for optinsync list `{name}`); {known}",
                        m.listkey
                    ),
                });
            };
            match (m.doi, public) {
                (DoiMode::Optinsync, true) => {
                    return Err(ConnectorError::Config {
                        setting: format!("{SETTING_PREFIX}.lists.{name}.doi"),
                        message: format!(
                            "Zoho Campaigns list `{listname}` has its signup form on (is_public), so Zoho would send a second confirmation mail; turn the signup form off or set doi = \"zoho\""
                        ),
                    });
                }
                (DoiMode::Zoho, false) => {
                    return Err(ConnectorError::Config {
                        setting: format!("{SETTING_PREFIX}.lists.{name}.doi"),
                        message: format!(
                            "Zoho Campaigns list `{listname}` has no signup form (is_public = false), so Zoho would add contacts without any confirmation; turn the signup form on or set doi = \"optinsync\""
                        ),
                    });
                }
                _ => notes.push(format!("{name} → `{listname}` (doi: {})", m.doi.as_str())),
            }
        }
        Ok(Health {
            ok: true,
            detail: format!("Zoho Campaigns lists found: {}", notes.join(", ")),
        })
    }

    fn limits(&self) -> Limits {
        Limits {
            max_batch: BULK_MAX,
            calls_per_minute: Some(500),
        }
    }

    async fn list_members(
        &self,
        list: &str,
        cursor: Option<&Cursor>,
    ) -> ConnectorResult<MemberPage> {
        let m = self.mapping(list)?;
        let from: usize = match cursor {
            None => 1,
            Some(c) => c
                .0
                .trim()
                .parse()
                .map_err(|_| ConnectorError::InvalidInput {
                    message: format!("Zoho Campaigns member cursor `{}` is not a position", c.0),
                })?,
        };
        let items = self
            .subscribers_page(list, &m.listkey, "active", from)
            .await?;
        let has_more = items.len() >= self.settings.page_size as usize;
        let members = items
            .iter()
            .filter_map(|item| {
                let email = Self::member_email(item)?;
                let mut fields = BTreeMap::new();
                for (display, source) in &self.settings.fields {
                    // `First Name` comes back as `firstname`.
                    let key: String = display
                        .chars()
                        .filter(|c| !c.is_whitespace())
                        .collect::<String>()
                        .to_lowercase();
                    let v = str_of(item, &key);
                    if !v.is_empty() {
                        fields.insert(source.clone(), Value::String(v));
                    }
                }
                Some(Subscriber {
                    email,
                    language: None,
                    fields,
                })
            })
            .collect();
        Ok(MemberPage {
            members,
            next_cursor: Some(Cursor((from + items.len()).to_string())),
            has_more,
        })
    }

    fn export_state(&self) -> Option<String> {
        let now = now_ms();
        let endpoints = budget::export(&mut self.lock_budgets(), now);
        let own_removals = self
            .lock_removals()
            .iter()
            .filter(|(_, s)| !s.is_empty())
            .map(|(k, s)| (k.clone(), s.iter().cloned().collect()))
            .collect();
        serde_json::to_string(&budget::State {
            v: 1,
            endpoints,
            own_removals,
        })
        .ok()
    }

    fn import_state(&self, state: &str) -> ConnectorResult<()> {
        let saved: budget::State =
            serde_json::from_str(state).map_err(|e| ConnectorError::InvalidInput {
                message: format!("saved Zoho Campaigns state is unreadable: {e}"),
            })?;
        if saved.v != 1 {
            return Err(ConnectorError::InvalidInput {
                message: format!(
                    "saved Zoho Campaigns state has version {}, expected 1",
                    saved.v
                ),
            });
        }
        budget::import(&mut self.lock_budgets(), &saved.endpoints);
        let mut removals = self.lock_removals();
        for (k, v) in saved.own_removals {
            removals.entry(k).or_default().extend(v);
        }
        Ok(())
    }
}
