//! Mailchimp (Marketing API v3) as optinsync's campaigns tool (README.md, "Mailchimp"),
//! written from Mailchimp's Marketing API documentation.
//!
//! # Lists and DOI modes
//!
//! Each optinsync list maps to an audience id with a DOI mode ([`DoiMode`]).
//! [`Connector::health`] (run at start-up) pings the API, checks every mapped audience exists
//! (a missing one is a [`ConnectorError::Config`] naming
//! `connectors.campaigns.lists.NAME.audience` and the audiences the key can see) and that
//! every mapped merge tag exists on it.
//!
//! * `doi = "optinsync"`: `subscribe` puts confirmed people on the audience as `subscribed`
//!   (`PUT /lists/{id}/members/{hash}` with `status_if_new` and `status`, or the synchronous
//!   batch `POST /lists/{id}` with `update_existing` for two or more, at most 500 per call).
//!   Such a list never gets `pending` (`request_doi` is refused naming the setting).
//! * `doi = "mailchimp"`: `request_doi` puts the person `pending`, so Mailchimp sends its own
//!   confirmation mail (only when the member is not already pending or subscribed: a retry
//!   sends no second mail). The confirmation is read back as [`StatusKind::Confirmed`]
//!   (weaker evidence: Mailchimp's `ip_opt`/`timestamp_opt`, no text snapshot) by the status
//!   poll (members `subscribed` whose `timestamp_opt` is newer than the cursor) and by the
//!   `subscribe` webhook. Such a list never gets `subscribed` through `subscribe` (refused
//!   with [`ConnectorError::Config`] naming `lists.NAME.doi`).
//!
//! DOI proof in Mailchimp's own fields: a subscribe carries the ledger's proof
//! ([`Subscriber::proof`]); it goes to `timestamp_opt` (when the person confirmed),
//! `ip_opt` (from where, when the ledger still holds it and it is an IP address) and
//! `timestamp_signup` (when the confirmation mail was asked for). `ip_signup` is never sent:
//! the ledger keeps no address for the sign-up request itself (nothing is invented).

//! # Errors
//!
//! HTTP 429 (and a bare 403, reported under heavy throttling) → service `Transient` with
//! `throttle_wait`; 5xx, 408, timeouts and bodies that are not JSON → service `Transient`;
//! 401 / 403 with a problem document → `Config` naming `api_key`. Per member (PUT answer or
//! batch `errors[]`): an address Mailchimp refuses as invalid or fake → `Rejected`; compliance
//! state and permanently deleted ("forgotten") → `Permanent` (never retried, never a bounce);
//! the per-address sign-up throttle → `Transient` of [`FailureScope::Record`] with an hour's
//! wait; invalid merge fields → `Permanent`. A missing audience (404) → `Config`.
//!
//! # Concurrency
//!
//! Mailchimp allows 10 requests in flight per key. Every call takes a permit of one semaphore
//! of `max_concurrency` (default and hard cap 10) and holds it until its answer is read.
//!
//! # Removal
//!
//! `remove` reads the member first: absent (404, also a permanently deleted one) → done;
//! `cleaned` → done (it gets nothing; its bounce stays); `unsubscribed` → done; `subscribed`,
//! `pending`, `transactional` and `archived` → `PATCH` to `unsubscribed` (never `DELETE`:
//! an archived member could be re-added by a later import, an unsubscribed one cannot).
//! Before writing, the member's hash is remembered as an own removal (in memory, in the
//! exported state, and in the engine's [`SharedMarks`] when given) so the status poll and the
//! webhook do not take optinsync's unsubscribe for the person's. A GDPR erasure
//! (`CampaignsConnector::erase`) is such a removal too, unless the operator set
//! `erasure = "delete_permanently"`: then the member is deleted for good with
//! `POST …/members/{hash}/actions/delete-permanent` (absent → done).
//!
//! # Status poll
//!
//! `status_events` reads `GET /lists/{id}/members?status=…&since_last_changed=…
//! &sort_field=last_changed&sort_dir=ASC` for `unsubscribed` (→ Unsubscribed) and `cleaned`
//! (→ Bounced), and for `doi = "mailchimp"` lists `subscribed` (→ Confirmed). The cursor
//! (versioned JSON) holds, per status, the last `last_changed` second seen and the member
//! ids seen at that second: the next read asks from one second before (the filter may be
//! strict and times have whole seconds) and skips what it saw; within the newest second it
//! pages on only while a full page brings nothing new (ties keep creation order, so a member
//! moving into that second may sort before ones seen there). A member whose `last_changed`
//! moves again while its status stays is reported again (the same status, harmless).
//!
//! # Webhooks
//!
//! `/webhooks/campaigns?secret=…`: the secret is checked on every call (constant time).
//! Events come back as [`optinsync_plugin_api::WebhookEvent::Status`] for the optinsync
//! list mapped to the delivery's audience (the name the engine calls `status_events` with,
//! as it matches webhook events to a list's `campaigns_list`; one audience backs one list).
//! `GET` (Mailchimp's validation) → `Ignored`. `POST` (form-encoded, keys percent-encoded):
//! `unsubscribe` → Unsubscribed (`reason=abuse` → Complained; `action=delete`, an archive by
//! the account, → nothing: it is not the person's withdrawal and the poll does not read
//! archives either); `cleaned` → Bounced (`reason=abuse` → Complained); `subscribe` →
//! Confirmed on a `doi = "mailchimp"` list, nothing on others; `upemail` → the old address
//! Unsubscribed (consent is per address; the new address has no consent in optinsync);
//! `profile` and `campaign` → `Ignored`. `maintain` registers the hook on every mapped audience
//! when `register = true` (listing the audience's hooks first; events subscribe, unsubscribe,
//! cleaned, upemail; sources user and admin, not api, so optinsync's own writes do not echo).
//!
//! # Parts
//!
//! `config` parses the settings strictly; `http` makes one call under the concurrency gate
//! and maps Mailchimp's errors (and a member's refusal); `parse` reads webhook forms and
//! member listings (public, fuzzed); `connector` is the push, the removal, Mailchimp's own
//! DOI and the start-up check, and the trait impls; `status` the poll and the member listing;
//! `webhook` registration and deliveries; `removals` the own-removal marks and the state.

mod config;
mod connector;
mod http;
pub mod parse;
mod removals;
mod status;
mod webhook;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use async_trait::async_trait;
use md5::{Digest as _, Md5};
use optinsync_plugin_api::{
    BuildContext, Built, ConnectorError, ConnectorFactory, ConnectorResult, Role, Settings,
    SettingsError, SharedMarks,
};
use tokio::sync::Semaphore;

pub use config::{
    DoiMode, Erasure, ListMapping, MAX_CONNECTIONS, MailchimpConfig, WebhookSettings,
};
pub use parse::{MemberRow, MembersAnswer, WebhookForm, parse_members_answer, parse_webhook_form};

#[cfg(doc)]
use optinsync_plugin_api::{Connector, FailureScope, StatusKind, Subscriber};

const SETTING_PREFIX: &str = "connectors.campaigns";
/// The synchronous batch endpoint takes at most this many members per call.
pub const BATCH_MAX: usize = 500;

/// `kind = "mailchimp"`.
pub fn factories() -> Vec<Arc<dyn ConnectorFactory>> {
    vec![Arc::new(Factory)]
}

struct Factory;

#[async_trait]
impl ConnectorFactory for Factory {
    fn kind(&self) -> &'static str {
        "mailchimp"
    }
    fn roles(&self) -> &'static [Role] {
        &[Role::Campaigns]
    }
    async fn build(&self, settings: Settings, ctx: &BuildContext) -> Result<Built, SettingsError> {
        let mut mc = Mailchimp::new(settings.parse()?, &ctx.http.user_agent)?;
        if let Some(marks) = &ctx.marks {
            mc = mc.with_shared_marks(Arc::clone(marks));
        }
        if let Some(state) = &ctx.state
            && let Err(e) = mc.import_state(state)
        {
            tracing::warn!(error = %e, "Mailchimp state not restored; own removals start empty");
        }
        Ok(Built::Campaigns(Arc::new(mc)))
    }
}

/// `subscriber_hash`: lower-case hex MD5 of the trimmed, lower-cased address.
pub fn subscriber_hash(email: &str) -> String {
    Md5::digest(email.trim().to_lowercase().as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The Mailchimp campaigns connector. See the module docs.
#[derive(Debug)]
pub struct Mailchimp {
    base_url: String,
    api_key: String,
    lists: BTreeMap<String, ListMapping>,
    webhook: Option<WebhookSettings>,
    status_interval: Duration,
    throttle_wait: Duration,
    page_size: u32,
    http: reqwest::Client,
    gate: Semaphore,
    /// `max_concurrency`: the permits of `gate`.
    concurrency: usize,
    marks: Option<Arc<dyn SharedMarks>>,
    /// audience → subscriber hashes optinsync unsubscribed itself, not yet seen in a poll.
    own_removals: std::sync::Mutex<BTreeMap<String, BTreeSet<String>>>,
    /// The webhook is registered on every mapped audience.
    registered: AtomicBool,
    erasure: config::Erasure,
}

impl Mailchimp {
    /// Build from parsed settings; `user_agent` as the engine hands it.
    pub fn new(c: MailchimpConfig, user_agent: &str) -> Result<Self, SettingsError> {
        let key = c.api_key.trim().to_owned();
        if key.is_empty() {
            return Err(SettingsError::invalid("api_key", "must not be empty"));
        }
        let base_url = match c.api_url.as_deref() {
            Some(u) => {
                let u = u.trim().trim_end_matches('/');
                if !(u.starts_with("https://") || u.starts_with("http://")) {
                    return Err(SettingsError::invalid(
                        "api_url",
                        "must be a full http(s) URL such as https://us6.api.mailchimp.com/3.0",
                    ));
                }
                u.to_owned()
            }
            None => match config::data_centre(&key) {
                Some(dc) => format!("https://{dc}.api.mailchimp.com/3.0"),
                None => {
                    return Err(SettingsError::invalid(
                        "api_key",
                        "has no data-centre suffix (a Mailchimp key ends in `-us6` or similar); copy the whole key",
                    ));
                }
            },
        };
        if c.lists.is_empty() {
            return Err(SettingsError::invalid(
                "lists",
                "map at least one list, e.g. [connectors.campaigns.lists.newsletter] audience = \"a1b2c3d4e5\"",
            ));
        }
        for (name, m) in &c.lists {
            if m.audience.trim().is_empty()
                || !m.audience.chars().all(|c| c.is_ascii_alphanumeric())
            {
                return Err(SettingsError::invalid(
                    format!("lists.{name}.audience"),
                    "must be an audience id (letters and digits, e.g. \"a1b2c3d4e5\")",
                ));
            }
            if let Some((other, _)) = c
                .lists
                .iter()
                .find(|(o, o_m)| *o < name && o_m.audience == m.audience)
            {
                return Err(SettingsError::invalid(
                    format!("lists.{name}.audience"),
                    format!(
                        "audience `{}` is already mapped for list `{other}`: membership in Mailchimp is per audience, so one audience backs one optinsync list",
                        m.audience
                    ),
                ));
            }
            for (tag, field) in &m.merge_fields {
                if tag.trim().is_empty() || field.trim().is_empty() {
                    return Err(SettingsError::invalid(
                        format!("lists.{name}.merge_fields"),
                        "merge tags and field names must not be empty",
                    ));
                }
                if tag.eq_ignore_ascii_case("EMAIL") {
                    return Err(SettingsError::invalid(
                        format!("lists.{name}.merge_fields.{tag}"),
                        "EMAIL is always the member's address; do not map it",
                    ));
                }
            }
            if m.marketing_permission
                .as_deref()
                .is_some_and(|p| p.trim().is_empty())
            {
                return Err(SettingsError::invalid(
                    format!("lists.{name}.marketing_permission"),
                    "must not be empty (leave it out when the audience has no GDPR fields)",
                ));
            }
        }
        if let Some(w) = &c.webhook {
            if !(w.url.starts_with("https://") || w.url.starts_with("http://")) {
                return Err(SettingsError::invalid(
                    "webhook.url",
                    "must be the daemon's full public URL of /webhooks/campaigns",
                ));
            }
            if w.secret.trim().len() < 16 {
                return Err(SettingsError::invalid(
                    "webhook.secret",
                    "must be at least 16 characters (it is the only proof a call comes from Mailchimp)",
                ));
            }
        }
        if c.max_concurrency == 0 || c.max_concurrency > MAX_CONNECTIONS {
            return Err(SettingsError::invalid(
                "max_concurrency",
                format!(
                    "must be 1 to {MAX_CONNECTIONS} (Mailchimp allows {MAX_CONNECTIONS} requests in flight per key)"
                ),
            ));
        }
        if !(1..=1000).contains(&c.page_size) {
            return Err(SettingsError::invalid("page_size", "must be 1 to 1000"));
        }
        let status_interval = config::parse_duration("status_interval", &c.status_interval)?;
        let timeout = config::parse_duration("timeout", &c.timeout)?;
        if timeout.is_zero() || timeout > Duration::from_secs(120) {
            return Err(SettingsError::invalid(
                "timeout",
                "must be more than 0 and at most 120s (Mailchimp's own request timeout)",
            ));
        }
        let throttle_wait = config::parse_duration("throttle_wait", &c.throttle_wait)?;
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .user_agent(if user_agent.is_empty() {
                "optinsync"
            } else {
                user_agent
            })
            .build()
            .map_err(|e| SettingsError::general(format!("HTTP client: {e}")))?;
        Ok(Self {
            base_url,
            api_key: key,
            lists: c.lists,
            webhook: c.webhook,
            status_interval,
            throttle_wait,
            page_size: c.page_size,
            http,
            gate: Semaphore::new(c.max_concurrency),
            concurrency: c.max_concurrency,
            marks: None,
            own_removals: std::sync::Mutex::new(BTreeMap::new()),
            registered: AtomicBool::new(false),
            erasure: c.erasure,
        })
    }

    /// Keep own removals in `marks`, shared with the other instances, as well as in memory.
    pub fn with_shared_marks(mut self, marks: Arc<dyn SharedMarks>) -> Self {
        self.marks = Some(marks);
        self
    }

    /// The API root the connector calls.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    fn mapping(&self, list: &str) -> ConnectorResult<&ListMapping> {
        self.lists.get(list).ok_or_else(|| ConnectorError::Config {
            setting: format!("{SETTING_PREFIX}.lists.{list}"),
            message: format!(
                "list `{list}` has no Mailchimp mapping; add [{SETTING_PREFIX}.lists.{list}] with its audience id (mapped: {})",
                self.lists.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        })
    }

    /// The list mapped to an audience id (one at most: checked at construction).
    fn mapping_of_audience(&self, audience: &str) -> Option<(&String, &ListMapping)> {
        self.lists.iter().find(|(_, m)| m.audience == audience)
    }

    fn removals_set(audience: &str) -> String {
        format!("mailchimp:own-removals:{audience}")
    }

    fn lock_removals(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, BTreeSet<String>>> {
        self.own_removals.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The URL Mailchimp calls: the configured one with `secret` as a query parameter.
    pub fn webhook_url(&self) -> Option<String> {
        let w = self.webhook.as_ref()?;
        let secret: String = form_urlencoded::byte_serialize(w.secret.as_bytes()).collect();
        let sep = if w.url.contains('?') { '&' } else { '?' };
        Some(format!("{}{sep}secret={secret}", w.url))
    }
}
