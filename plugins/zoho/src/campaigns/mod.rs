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
//!
//! # Parts
//!
//! `api` names the endpoints and their documented quotas; `quota` takes a slot of them
//! (from this process's `budget` or the shared ledger) before each call; `http` makes the
//! call and maps Zoho's in-body errors; `lists` reads mailing lists and subscribers; `push`
//! builds subscribe calls; `removals` remembers optinsync's own unsubscribes so the status
//! poll does not echo them; `connector` is the [`CampaignsConnector`] impl that puts them
//! together. This file holds the settings, the state, the construction and small helpers
//! the parts share.
//!
//! [`CampaignsConnector`]: optinsync_plugin_api::CampaignsConnector
//! [`CampaignsConnector::health`]: optinsync_plugin_api::CampaignsConnector::health
//! [`CampaignsConnector::list_members`]: optinsync_plugin_api::CampaignsConnector::list_members
//! [`CampaignsConnector::status_events`]: optinsync_plugin_api::CampaignsConnector::status_events
//! [`CampaignsConnector::export_state`]: optinsync_plugin_api::CampaignsConnector::export_state
//! [`CampaignsConnector::import_state`]: optinsync_plugin_api::CampaignsConnector::import_state
//! [`FailureScope::Record`]: optinsync_plugin_api::FailureScope::Record
//! [`FailureScope::Service`]: optinsync_plugin_api::FailureScope::Service

mod api;
pub(crate) mod budget;
pub mod config;
mod connector;
mod http;
mod lists;
mod push;
mod quota;
mod removals;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use optinsync_plugin_api::{ConnectorError, ConnectorResult, QuotaLedger, SharedMarks};
use serde_json::Value;
use tokio::sync::Semaphore;

pub use self::api::Api;
use self::budget::{Endpoint, Window};
pub use self::config::{DoiMode, ListMapping, ZohoCampaignsConfig};
pub use self::lists::AnswerSummary;
use crate::config::{
    DATA_CENTRES, OAuthSettings, check_url, invalid, parse_duration, parse_settings,
};
use crate::oauth::ZohoOAuth;
use optinsync_plugin_api::SettingsError;

const SETTING_PREFIX: &str = "connectors.campaigns";
/// `addlistsubscribersinbulk` takes at most this many addresses (Zoho's bulk-add page).
pub const BULK_MAX: usize = 10;

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

/// A [`CampaignsConnector`](optinsync_plugin_api::CampaignsConnector) for Zoho Campaigns. See
/// the module docs.
#[derive(Debug)]
pub struct ZohoCampaigns {
    settings: Settings,
    http: reqwest::Client,
    oauth: Arc<ZohoOAuth>,
    gate: Semaphore,
    /// `max_concurrency`: the permits of `gate`.
    concurrency: usize,
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
fn parse_limit(setting: &str, text: &str) -> Result<(u32, Duration), SettingsError> {
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
    pub fn from_config(settings: toml::Table, _base_dir: &Path) -> Result<Self, SettingsError> {
        Self::new(parse_settings(settings)?)
    }

    /// Build from already-parsed settings.
    pub fn new(c: ZohoCampaignsConfig) -> Result<Self, SettingsError> {
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
    ) -> Result<Self, SettingsError> {
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
            concurrency: c.max_concurrency,
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

    /// The OAuth client (to share, or for diagnostics).
    pub fn oauth(&self) -> &Arc<ZohoOAuth> {
        &self.oauth
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
}
