//! HubSpot CRM as optinsync's CRM (`kind = "hubspot"`; README.md, "HubSpot CRM").
//!
//! # Change feed
//!
//! The opaque cursor is versioned JSON (`{"kind":"hubspot","v":1,...}`, see `feed`):
//!
//! * **Full scan** first: `GET /crm/v3/objects/contacts` page by page with HubSpot's opaque
//!   `after` cursor (no index lag, the ordinary rate limit).
//! * **Incremental passes** after it: `POST /crm/v3/objects/contacts/search` on
//!   `lastmodifieddate`. Every page is a fresh query from a keyset position (never the
//!   `after` offset), so the 10,000-result cap of search is never reached, and an edit during
//!   a pass cannot shift offsets and skip a record. Only one sort is allowed, so records that
//!   share a timestamp are read in a *tie pass*: `T <= lastmodifieddate <= T` and
//!   `hs_object_id > last id`, sorted by `hs_object_id` — any number of contacts modified in
//!   one millisecond is read exactly once.
//! * Search sees a write only after an index lag. Each pass starts `overlap` (default 2 m)
//!   before the latest change the previous pass saw; records re-read inside that window are
//!   recognised by `(id, lastmodifieddate)` kept in the cursor and not delivered twice.
//! * Records that optinsync itself just wrote back are recognised by the
//!   `lastmodifieddate` of the write and not reported as CRM input (no sync loop); an opt-out
//!   is never taken for an echo unless optinsync wrote that opt-out.
//!
//! # Errors
//!
//! 429 → [`ConnectorError::Transient`] with the wait (`Retry-After`, else by `policyName`:
//! 10 s burst, 1 s search, 1 h daily); 5xx, 477 and timeouts → transient; 423 (record
//! locked) → transient for that record; 401 and 403 (missing scopes) →
//! [`ConnectorError::Config`] naming the credential setting and the scopes; 400 →
//! permanent; a body that is not JSON → transient.
//!
//! [`ConnectorError::Transient`]: optinsync_plugin_api::ConnectorError::Transient
//! [`ConnectorError::Config`]: optinsync_plugin_api::ConnectorError::Config

pub mod config;
mod connector;
mod feed;
mod http;
mod records;
pub mod webhook;
mod writeback;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use optinsync_plugin_api::{
    BuildContext, Built, ConnectorFactory, CrmRecord, QuotaLedger, Role, Settings as ApiSettings,
    SettingsError,
};

pub use config::HubSpotConfig;
use config::{AssertRule, check_property, check_url, invalid, parse_duration};
use http::{Api, Auth, Limiter, OAuth, OAuthState};
pub use webhook::{WebhookNotice, parse_webhook_body};

pub(crate) const SETTING_PREFIX: &str = "connectors.crm";
/// `RecordRef::module` of every HubSpot record.
pub const MODULE: &str = "contacts";
/// The largest page of the list and search endpoints (the stricter documented value).
pub const MAX_PAGE: u32 = 100;
/// Inputs per batch call.
pub const MAX_BATCH: usize = 100;

/// `kind = "hubspot"`.
pub fn factories() -> Vec<Arc<dyn ConnectorFactory>> {
    vec![Arc::new(Factory)]
}

struct Factory;

#[async_trait]
impl ConnectorFactory for Factory {
    fn kind(&self) -> &'static str {
        "hubspot"
    }
    fn roles(&self) -> &'static [Role] {
        &[Role::Crm]
    }
    async fn build(
        &self,
        settings: ApiSettings,
        ctx: &BuildContext,
    ) -> Result<Built, SettingsError> {
        let mut crm = HubSpotCrm::new(settings.parse()?)?;
        // Several instances on one store keep HubSpot's limits together.
        if let Some(quota) = &ctx.quota {
            crm = crm.with_quota_ledger(Arc::clone(quota));
        }
        Ok(Built::Crm(Arc::new(crm)))
    }
}

/// Per list: what is written back.
#[derive(Debug, Clone)]
pub(crate) struct ListTarget {
    pub(crate) subscription_id: Option<String>,
    pub(crate) legal_basis: String,
    pub(crate) consent_property: Option<String>,
}

#[derive(Debug, Clone)]
pub(crate) struct WebhookSettings {
    pub(crate) client_secret: String,
    pub(crate) url: String,
    pub(crate) max_age: Duration,
}

#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) asserts: BTreeMap<String, AssertRule>,
    pub(crate) fields: Vec<String>,
    pub(crate) language_property: Option<String>,
    pub(crate) opt_out_property: String,
    /// `hs_email_optout_<id>` → list id, for every mapped subscription type.
    pub(crate) type_opt_outs: BTreeMap<String, String>,
    pub(crate) opt_out_subscriptions: bool,
    /// Every property read (`properties=`).
    pub(crate) properties: Vec<String>,
    pub(crate) overlap_ms: i64,
    pub(crate) page_size: u32,
    pub(crate) webhook: Option<WebhookSettings>,
    pub(crate) write_back_enabled: bool,
    pub(crate) unsubscribe_all: bool,
    pub(crate) lists: BTreeMap<String, ListTarget>,
}

/// Records fetched in one batch for a webhook, handed to the `fetch` calls that follow.
const PREFETCH_TTL: Duration = Duration::from_secs(60);

/// The HubSpot CRM connector.
#[derive(Debug)]
pub struct HubSpotCrm {
    pub(crate) settings: Settings,
    pub(crate) api: Api,
    /// Contact id → (`lastmodifieddate` ms before and after optinsync's own last write,
    /// whether it wrote an opt-out).
    pub(crate) echoes: std::sync::Mutex<HashMap<u64, (i64, i64, bool)>>,
    /// Write-back keys already done (idempotency within this process).
    pub(crate) done_keys: std::sync::Mutex<(HashSet<String>, VecDeque<String>)>,
    pub(crate) prefetched: std::sync::Mutex<HashMap<String, (CrmRecord, tokio::time::Instant)>>,
}

impl HubSpotCrm {
    /// Build from parsed settings, checking every value.
    pub fn new(c: HubSpotConfig) -> Result<Self, SettingsError> {
        let nonempty = |v: &Option<String>| v.as_deref().is_some_and(|s| !s.trim().is_empty());
        let oauth_keys = [
            ("client_id", &c.client_id),
            ("client_secret", &c.client_secret),
            ("refresh_token", &c.refresh_token),
        ];
        let auth = match (&c.token, oauth_keys.iter().any(|(_, v)| v.is_some())) {
            (Some(_), true) => {
                return Err(invalid(
                    "token",
                    "set either `token` (a private-app token) or client_id, client_secret and refresh_token (OAuth), not both",
                ));
            }
            (Some(t), false) => {
                if t.trim().is_empty() {
                    return Err(invalid("token", "must not be empty"));
                }
                Auth::Static(t.trim().to_owned())
            }
            (None, true) => {
                if let Some((k, _)) = oauth_keys.iter().find(|(_, v)| !nonempty(v)) {
                    return Err(invalid(
                        k,
                        "must be set and not empty (OAuth needs client_id, client_secret and refresh_token)",
                    ));
                }
                Auth::OAuth(OAuth {
                    client_id: c.client_id.clone().unwrap_or_default().trim().to_owned(),
                    client_secret: c
                        .client_secret
                        .clone()
                        .unwrap_or_default()
                        .trim()
                        .to_owned(),
                    state: tokio::sync::Mutex::new(OAuthState {
                        refresh_token: c
                            .refresh_token
                            .clone()
                            .unwrap_or_default()
                            .trim()
                            .to_owned(),
                        access: None,
                    }),
                })
            }
            (None, false) => {
                return Err(invalid(
                    "token",
                    "missing: set `token` (a private-app token) or client_id, client_secret and refresh_token",
                ));
            }
        };
        let base = check_url("api_url", &c.api_url)?;
        check_property("opt_out_property", &c.opt_out_property)?;
        if let Some(l) = &c.language_property {
            check_property("language_property", l)?;
        }
        for f in &c.fields {
            check_property("fields", f)?;
        }
        for (list, rule) in &c.asserts {
            check_property(&format!("asserts.{list}"), rule.property())?;
        }
        let mut lists = BTreeMap::new();
        let mut type_opt_outs = BTreeMap::new();
        for (list, wb) in &c.write_back.lists {
            let key = |k: &str| format!("write_back.lists.{list}.{k}");
            let subscription_id = match &wb.subscription_id {
                None => None,
                Some(id) => Some(id.as_digits().ok_or_else(|| {
                    invalid(
                        &key("subscription_id"),
                        "must be the subscription type's numeric id",
                    )
                })?),
            };
            if !config::LEGAL_BASES.contains(&wb.legal_basis.as_str()) {
                return Err(invalid(
                    &key("legal_basis"),
                    format!(
                        "`{}` is not one of {}",
                        wb.legal_basis,
                        config::LEGAL_BASES.join(", ")
                    ),
                ));
            }
            if let Some(p) = &wb.consent_property {
                check_property(&key("consent_property"), p)?;
            }
            if subscription_id.is_none() && wb.consent_property.is_none() {
                return Err(invalid(
                    &key("subscription_id"),
                    "name a subscription_id, a consent_property, or both",
                ));
            }
            if let Some(id) = &subscription_id {
                type_opt_outs.insert(format!("hs_email_optout_{id}"), list.clone());
            }
            lists.insert(
                list.clone(),
                ListTarget {
                    subscription_id,
                    legal_basis: wb.legal_basis.clone(),
                    consent_property: wb.consent_property.clone(),
                },
            );
        }
        let overlap = parse_duration("overlap", &c.overlap)?;
        if overlap > Duration::from_secs(86_400) {
            return Err(invalid("overlap", "must be at most 1d"));
        }
        if !(1..=MAX_PAGE).contains(&c.page_size) {
            return Err(invalid(
                "page_size",
                format!("must be 1 to {MAX_PAGE} (HubSpot's largest page)"),
            ));
        }
        if c.requests_per_10s == 0 {
            return Err(invalid("requests_per_10s", "must be at least 1"));
        }
        if c.searches_per_second == 0 {
            return Err(invalid("searches_per_second", "must be at least 1"));
        }
        let webhook = match &c.webhook {
            None => None,
            Some(w) => {
                if w.client_secret.trim().is_empty() {
                    return Err(invalid("webhook.client_secret", "must not be empty"));
                }
                let max_age = parse_duration("webhook.max_age", &w.max_age)?;
                if max_age.is_zero() {
                    return Err(invalid("webhook.max_age", "must be more than 0s"));
                }
                Some(WebhookSettings {
                    client_secret: w.client_secret.trim().to_owned(),
                    url: check_url("webhook.url", &w.url)?,
                    max_age,
                })
            }
        };
        let mut properties: Vec<String> = vec![
            "email".into(),
            "hs_object_id".into(),
            "lastmodifieddate".into(),
        ];
        let mut add = |p: &str| {
            if !properties.iter().any(|q| q == p) {
                properties.push(p.to_owned());
            }
        };
        add(&c.opt_out_property);
        if let Some(l) = &c.language_property {
            add(l);
        }
        for rule in c.asserts.values() {
            add(rule.property());
        }
        for f in &c.fields {
            add(f);
        }
        for p in type_opt_outs.keys() {
            add(p);
        }
        let timeout = parse_duration("timeout", &c.timeout)?;
        if timeout.is_zero() {
            return Err(invalid("timeout", "must be more than 0s"));
        }
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("optinsync/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| invalid("timeout", format!("cannot build the HTTP client: {e}")))?;
        Ok(Self {
            settings: Settings {
                asserts: c.asserts.clone(),
                fields: c.fields.clone(),
                language_property: c.language_property.clone(),
                opt_out_property: c.opt_out_property.clone(),
                type_opt_outs,
                opt_out_subscriptions: c.opt_out_subscriptions,
                properties,
                overlap_ms: i64::try_from(overlap.as_millis()).unwrap_or(i64::MAX),
                page_size: c.page_size.min(MAX_PAGE),
                webhook,
                write_back_enabled: c.write_back.enabled,
                unsubscribe_all: c.write_back.unsubscribe_all,
                lists,
            },
            api: Api {
                http: client,
                base,
                auth,
                burst: Limiter::new(c.requests_per_10s, Duration::from_secs(10)),
                search: Limiter::new(c.searches_per_second, Duration::from_secs(1)),
            },
            echoes: std::sync::Mutex::new(HashMap::new()),
            done_keys: std::sync::Mutex::new((HashSet::new(), VecDeque::new())),
            prefetched: std::sync::Mutex::new(HashMap::new()),
        })
    }

    /// Count HubSpot's limits in `ledger`, shared by every instance that uses it (keys
    /// `hubspot:{api_url}:requests` and `:searches`).
    pub fn with_quota_ledger(mut self, ledger: Arc<dyn QuotaLedger>) -> Self {
        let base = self.api.base.clone();
        self.api
            .burst
            .share(Arc::clone(&ledger), format!("hubspot:{base}:requests"));
        self.api
            .search
            .share(ledger, format!("hubspot:{base}:searches"));
        self
    }

    /// Build from the connector's settings table.
    pub fn from_settings(settings: &ApiSettings) -> Result<Self, SettingsError> {
        Self::new(settings.parse()?)
    }

    pub(crate) fn setting(key: &str) -> String {
        format!("{SETTING_PREFIX}.{key}")
    }
}

pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
