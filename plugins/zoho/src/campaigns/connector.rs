//! [`Connector`] and [`CampaignsConnector`] for [`ZohoCampaigns`]: push (in batches of
//! [`BULK_MAX`]), removal, statuses, members, health, state.

use std::collections::{BTreeMap, BTreeSet};

use async_trait::async_trait;
use chrono::Utc;
use optinsync_plugin_api::{
    BatchResult, CampaignsConnector, Connector, ConnectorError, ConnectorResult, Cursor,
    FailureScope, Health, Keyed, MemberPage, StatusEvent, StatusKind, StatusPage, Subscriber,
    per_item,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::http::CallError;
use super::{
    Api, BULK_MAX, DoiMode, ListMapping, SETTING_PREFIX, ZohoCampaigns, address_key, budget,
    fingerprint, now_ms, str_of,
};

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

impl ZohoCampaigns {
    /// Subscribers for a `doi = "optinsync"` list that need no fields go ten per bulk call
    /// (`addlistsubscribersinbulk`); the others one `listsubscribe` each. One result per
    /// subscriber; a failure of the service stops the calls (the rest get the same answer).
    async fn subscribe_all(&self, list: &str, subscribers: &[&Subscriber]) -> BatchResult {
        let m = self.mapping(list)?;
        // Back on the list: a later unsubscribe is the person's own, not an echo of ours.
        if let Some(set) = self.lock_removals().get_mut(&m.listkey) {
            for s in subscribers {
                set.remove(&address_key(&s.email));
            }
        }
        let mut results: Vec<Option<ConnectorResult<()>>> = vec![None; subscribers.len()];
        // Refused as `listsubscribe` refuses it (2004, rejected for good), before a bulk call
        // that would take it silently.
        for (i, s) in subscribers.iter().enumerate() {
            if !s.email.trim().contains('@') {
                results[i] = Some(Err(ConnectorError::rejected(
                    "not an address; not sent to Zoho Campaigns",
                )));
            }
        }
        let bulk: Vec<usize> = if m.doi == DoiMode::Optinsync {
            (0..subscribers.len())
                .filter(|&i| results[i].is_none() && !self.has_mapped_fields(subscribers[i]))
                .collect()
        } else {
            Vec::new()
        };
        if bulk.len() >= 2 {
            for chunk in bulk.chunks(BULK_MAX) {
                let emails: Vec<&str> =
                    chunk.iter().map(|&i| subscribers[i].email.trim()).collect();
                let result = self.bulk_add(list, m, &emails).await;
                for &i in chunk {
                    results[i] = Some(result.clone());
                }
            }
            tracing::debug!(
                list,
                count = bulk.len(),
                "subscribed on Zoho Campaigns (bulk)"
            );
        }
        for (i, s) in subscribers.iter().enumerate() {
            if results[i].is_some() {
                continue;
            }
            let result = self.subscribe_one(list, m, s).await;
            if let Err(
                e @ ConnectorError::Transient {
                    scope: FailureScope::Service,
                    ..
                },
            ) = &result
            {
                let e = e.clone();
                for r in results.iter_mut().filter(|r| r.is_none()) {
                    *r = Some(Err(e.clone()));
                }
                break;
            }
            if result.is_ok() {
                tracing::debug!(list, doi = m.doi.as_str(), "subscribed on Zoho Campaigns");
            }
            results[i] = Some(result);
        }
        Ok(results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(ConnectorError::transient("not attempted"))))
            .collect())
    }

    async fn remove_one(&self, list: &str, m: &ListMapping, email: &str) -> ConnectorResult<()> {
        {
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

    /// The state [`Connector::export_state`] hands the engine: quota windows, locks and the
    /// removals of our own the status poll must not echo.
    pub fn saved_state(&self) -> Option<String> {
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

    /// Take back state from an earlier [`Connector::export_state`] (at build, from
    /// [`optinsync_plugin_api::BuildContext::state`]). State it cannot read is an error saying
    /// why; the caller logs it and goes on with fresh budgets.
    pub fn import_state(&self, state: &str) -> ConnectorResult<()> {
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

#[async_trait]
impl Connector for ZohoCampaigns {
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

    async fn export_state(&self) -> Option<String> {
        self.saved_state()
    }
}

#[async_trait]
impl CampaignsConnector for ZohoCampaigns {
    /// For a `doi = "zoho"` list, `listsubscribe` to its signup form makes Zoho send its own
    /// confirmation mail and hold the contact until the person confirms.
    async fn request_doi(&self, list: &str, subscriber: &Keyed<Subscriber>) -> ConnectorResult<()> {
        let m = self.mapping(list)?;
        if m.doi != DoiMode::Zoho {
            return Err(ConnectorError::Config {
                setting: format!("{SETTING_PREFIX}.lists.{list}.doi"),
                message: format!(
                    "the optinsync list asks Zoho to run the double opt-in (doi = \"campaigns\"), but `{list}` is mapped with doi = \"optinsync\"; set doi = \"zoho\" on a signup-form list"
                ),
            });
        }
        per_item(1, self.subscribe_all(list, &[&subscriber.item]).await)
            .pop()
            .unwrap_or_else(|| Err(ConnectorError::transient("no answer")))
    }

    fn max_batch(&self) -> usize {
        BULK_MAX
    }

    /// `max_concurrency`: calls beyond it would only queue at the connector's gate.
    fn concurrency(&self) -> usize {
        self.concurrency
    }

    /// Zoho's report changes slowly and costs quota: polled at `status_interval`, whatever
    /// the daemon's `poll_interval`.
    fn status_interval(&self) -> Option<std::time::Duration> {
        u64::try_from(self.settings.status_interval_ms)
            .ok()
            .map(std::time::Duration::from_millis)
    }

    async fn subscribe(&self, list: &str, items: &[Keyed<Subscriber>]) -> BatchResult {
        let subscribers: Vec<&Subscriber> = items.iter().map(|k| &k.item).collect();
        self.subscribe_all(list, &subscribers).await
    }

    /// One `listunsubscribe` per address; a failure of the service stops the batch (the rest
    /// get the same answer and retry with it), a failure about one address does not.
    async fn remove(&self, list: &str, items: &[Keyed<String>]) -> BatchResult {
        let m = self.mapping(list)?;
        let mut results = Vec::with_capacity(items.len());
        for item in items {
            let result = self.remove_one(list, m, &item.item).await;
            let service_down = matches!(
                result,
                Err(ConnectorError::Transient {
                    scope: FailureScope::Service,
                    ..
                })
            );
            results.push(result);
            if service_down {
                break;
            }
        }
        if let Some(Err(e)) = results.last().cloned()
            && results.len() < items.len()
        {
            results.resize(items.len(), Err(e));
        }
        Ok(results)
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
                        // Zoho moves an address to `bounce` after a hard bounce (or repeated
                        // soft ones): a lasting refusal of the address.
                        bounce: (kind == StatusKind::Bounced)
                            .then_some(optinsync_plugin_api::BounceClass::Hard),
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
                    proof: None,
                })
            })
            .collect();
        Ok(MemberPage {
            members,
            next_cursor: Some(Cursor((from + items.len()).to_string())),
            has_more,
        })
    }
}
