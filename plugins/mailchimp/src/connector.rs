//! [`Connector`] and [`CampaignsConnector`] for [`Mailchimp`]: push (one upsert, or the
//! synchronous batch), removal, Mailchimp's own DOI and the start-up check; the status poll,
//! webhooks and own removals live in their modules.

use std::collections::{BTreeSet, HashMap};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use optinsync_plugin_api::{
    BatchResult, CampaignsConnector, Connector, ConnectorError, ConnectorResult, Cursor, Health,
    Keyed, MemberPage, StatusPage, Subscriber, WebhookEvent, WebhookRequest,
};
use reqwest::Method;
use serde_json::{Map, Value, json};

use crate::http::{CallError, member_refusal};
use crate::parse::MemberRow;
use crate::{BATCH_MAX, DoiMode, ListMapping, Mailchimp, SETTING_PREFIX, subscriber_hash};

/// Mailchimp's time format (`2024-05-01T10:05:12+00:00`).
pub(crate) fn iso(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S+00:00").to_string()
}

/// A contact field as a merge field value (`None`: leave the merge field alone).
fn merge_value(v: &Value) -> Option<Value> {
    match v {
        Value::String(s) => Some(Value::String(s.clone())),
        Value::Number(n) => Some(Value::Number(n.clone())),
        Value::Bool(b) => Some(Value::String(b.to_string())),
        _ => None,
    }
}

/// Plausible enough to send (Mailchimp itself refuses the rest; this only spares a call).
fn looks_like_address(email: &str) -> bool {
    let e = email.trim();
    e.matches('@').count() == 1 && !e.starts_with('@') && !e.ends_with('@')
}

impl Mailchimp {
    /// The member body for `status` (`subscribed` or `pending`).
    pub(crate) fn member_body(m: &ListMapping, s: &Subscriber, status: &str) -> Map<String, Value> {
        let mut body = Map::new();
        body.insert("email_address".into(), json!(s.email.trim()));
        body.insert("status".into(), json!(status));
        let merges: Map<String, Value> = m
            .merge_fields
            .iter()
            .filter_map(|(tag, field)| Some((tag.clone(), merge_value(s.fields.get(field)?)?)))
            .collect();
        if !merges.is_empty() {
            body.insert("merge_fields".into(), Value::Object(merges));
        }
        if let Some(lang) = s.language.as_deref().filter(|l| !l.trim().is_empty()) {
            body.insert("language".into(), json!(lang.trim()));
        }
        if let Some(p) = &m.marketing_permission {
            body.insert(
                "marketing_permissions".into(),
                json!([{"marketing_permission_id": p, "enabled": true}]),
            );
        }
        // The DOI proof optinsync holds, in Mailchimp's own opt-in fields. `ip_signup` is not
        // sent: the ledger keeps no address for the sign-up request itself.
        if let Some(p) = &s.proof {
            body.insert("timestamp_opt".into(), json!(iso(p.confirmed_at)));
            if let Some(ip) = p
                .confirmed_ip
                .as_deref()
                .filter(|ip| ip.trim().parse::<std::net::IpAddr>().is_ok())
            {
                body.insert("ip_opt".into(), json!(ip.trim()));
            }
            if let Some(at) = p.requested_at {
                body.insert("timestamp_signup".into(), json!(iso(at)));
            }
        }
        body
    }

    fn audience_missing(&self, list: &str, m: &ListMapping) -> ConnectorError {
        ConnectorError::Config {
            setting: format!("{SETTING_PREFIX}.lists.{list}.audience"),
            message: format!(
                "Mailchimp has no audience `{}` (mapped for optinsync list `{list}`)",
                m.audience
            ),
        }
    }

    /// A failed member call as the item's result.
    pub(crate) fn item_error(&self, list: &str, m: &ListMapping, e: CallError) -> ConnectorError {
        match e {
            CallError::Connector(e) => e,
            CallError::Problem { status: 404, .. } => self.audience_missing(list, m),
            CallError::Problem {
                title,
                detail,
                fields,
                ..
            } => member_refusal(&title, &detail, &fields),
        }
    }

    /// One `PUT …/members/{hash}`: `status_if_new` and `status` both `status`.
    async fn put_member(
        &self,
        list: &str,
        m: &ListMapping,
        s: &Subscriber,
        status: &str,
    ) -> ConnectorResult<()> {
        let mut body = Self::member_body(m, s, status);
        body.insert("status_if_new".into(), json!(status));
        let path = format!(
            "/lists/{}/members/{}",
            m.audience,
            subscriber_hash(&s.email)
        );
        self.call(Method::PUT, &path, &[], Some(&Value::Object(body)))
            .await
            .map(|_| ())
            .map_err(|e| self.item_error(list, m, e))
    }

    /// One synchronous batch call (≤ 500 distinct addresses): one result per subscriber.
    async fn batch_subscribe(
        &self,
        list: &str,
        m: &ListMapping,
        subs: &[&Subscriber],
    ) -> Vec<ConnectorResult<()>> {
        let members: Vec<Value> = subs
            .iter()
            .map(|s| Value::Object(Self::member_body(m, s, "subscribed")))
            .collect();
        let body = json!({"members": members, "update_existing": true});
        let answer = match self
            .call(
                Method::POST,
                &format!("/lists/{}", m.audience),
                &[],
                Some(&body),
            )
            .await
        {
            Ok(a) => a,
            Err(e) => {
                let e = self.item_error(list, m, e);
                return vec![Err(e); subs.len()];
            }
        };
        let mut by_hash: HashMap<String, ConnectorResult<()>> = HashMap::new();
        for key in ["new_members", "updated_members"] {
            for v in answer
                .get(key)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(e) = v.get("email_address").and_then(Value::as_str) {
                    by_hash.insert(subscriber_hash(e), Ok(()));
                }
            }
        }
        for v in answer
            .get("errors")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let Some(e) = v.get("email_address").and_then(Value::as_str) else {
                continue;
            };
            let detail = v.get("error").and_then(Value::as_str).unwrap_or_default();
            let code = v
                .get("error_code")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let fields: Vec<String> = v
                .get("field")
                .and_then(Value::as_str)
                .filter(|f| !f.is_empty())
                .map(|f| vec![f.to_owned()])
                .unwrap_or_default();
            by_hash.insert(
                subscriber_hash(e),
                Err(member_refusal(code, detail, &fields)),
            );
        }
        subs.iter()
            .map(|s| {
                by_hash
                    .remove(&subscriber_hash(&s.email))
                    .unwrap_or_else(|| {
                        Err(ConnectorError::record_transient(
                            "Mailchimp's batch answer did not mention this address",
                        ))
                    })
            })
            .collect()
    }

    async fn subscribe_all(&self, list: &str, subscribers: &[&Subscriber]) -> BatchResult {
        let m = self.mapping(list)?;
        if m.doi == DoiMode::Mailchimp {
            return Err(ConnectorError::Config {
                setting: format!("{SETTING_PREFIX}.lists.{list}.doi"),
                message: format!(
                    "`{list}` is mapped with doi = \"mailchimp\": Mailchimp runs its confirmation, so optinsync never sets anyone `subscribed` there; set doi = \"optinsync\" if optinsync confirms this list"
                ),
            });
        }
        let mut results: Vec<Option<ConnectorResult<()>>> = vec![None; subscribers.len()];
        // One call per distinct address; a repeated address shares the first one's result.
        let mut first_of: HashMap<String, usize> = HashMap::new();
        let mut send: Vec<usize> = Vec::new();
        let mut copies: Vec<(usize, usize)> = Vec::new();
        for (i, s) in subscribers.iter().enumerate() {
            if !looks_like_address(&s.email) {
                results[i] = Some(Err(ConnectorError::rejected(
                    "not an address; not sent to Mailchimp",
                )));
                continue;
            }
            let h = subscriber_hash(&s.email);
            match first_of.get(&h) {
                Some(&j) => copies.push((i, j)),
                None => {
                    first_of.insert(h, i);
                    send.push(i);
                }
            }
        }
        // Back on the list: a later unsubscribe is the person's own, not an echo of ours.
        let hashes: Vec<String> = first_of.keys().cloned().collect();
        self.forget_own_removals(&m.audience, &hashes).await;
        if send.len() == 1 {
            let i = send[0];
            results[i] = Some(self.put_member(list, m, subscribers[i], "subscribed").await);
        } else if !send.is_empty() {
            let calls = send.chunks(BATCH_MAX).map(|chunk| async move {
                let subs: Vec<&Subscriber> = chunk.iter().map(|&i| subscribers[i]).collect();
                (chunk, self.batch_subscribe(list, m, &subs).await)
            });
            for (chunk, answers) in futures_util::future::join_all(calls).await {
                for (&i, r) in chunk.iter().zip(answers) {
                    results[i] = Some(r);
                }
            }
        }
        for (i, j) in copies {
            results[i] = results[j].clone();
        }
        let done = results.iter().filter(|r| matches!(r, Some(Ok(())))).count();
        tracing::debug!(
            list,
            done,
            of = subscribers.len(),
            "subscribed on Mailchimp"
        );
        Ok(results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(ConnectorError::transient("not attempted"))))
            .collect())
    }

    /// Read one member; `None` when absent.
    async fn get_member(
        &self,
        list: &str,
        m: &ListMapping,
        hash: &str,
    ) -> ConnectorResult<Option<MemberRow>> {
        let path = format!("/lists/{}/members/{hash}", m.audience);
        let q = [(
            "fields",
            "id,email_address,status,last_changed,timestamp_opt,ip_opt".to_owned(),
        )];
        match self.call(Method::GET, &path, &q, None).await {
            Ok(v) => Ok(crate::parse::member_row(&v)),
            Err(CallError::Problem { status: 404, .. }) => {
                // A missing audience is a 404 too: tell them apart.
                self.audience_exists(list, m).await?;
                Ok(None)
            }
            Err(e) => Err(self.item_error(list, m, e)),
        }
    }

    async fn audience_exists(&self, list: &str, m: &ListMapping) -> ConnectorResult<()> {
        let q = [("fields", "id".to_owned())];
        match self
            .call(Method::GET, &format!("/lists/{}", m.audience), &q, None)
            .await
        {
            Ok(_) => Ok(()),
            Err(CallError::Problem { status: 404, .. }) => Err(self.audience_missing(list, m)),
            Err(e) => Err(self.item_error(list, m, e)),
        }
    }

    async fn remove_one(&self, list: &str, m: &ListMapping, email: &str) -> ConnectorResult<()> {
        let hash = subscriber_hash(email);
        let Some(member) = self.get_member(list, m, &hash).await? else {
            tracing::debug!(list, "removal: not on the Mailchimp audience; done");
            return Ok(());
        };
        match member.status.as_str() {
            // Gets nothing already; keep the bounce Mailchimp recorded.
            "cleaned" => return Ok(()),
            // Already off (perhaps by an earlier attempt of this very removal whose answer
            // was lost: the mark, if any, stays so the poll does not echo it).
            "unsubscribed" => return Ok(()),
            _ => {}
        }
        // Remember first: the poll that follows must not take this for the person's own
        // unsubscribe. Not remembered for the other instances: not removed yet (retried).
        self.mark_own_removal(&m.audience, &hash).await?;
        let path = format!("/lists/{}/members/{hash}", m.audience);
        let body = json!({"status": "unsubscribed"});
        match self.call(Method::PATCH, &path, &[], Some(&body)).await {
            Ok(_) => Ok(()),
            Err(CallError::Problem { status: 404, .. }) => {
                self.forget_own_removals(&m.audience, std::slice::from_ref(&hash))
                    .await;
                Ok(())
            }
            Err(e) => {
                let e = self.item_error(list, m, e);
                // Refused for good: nothing was unsubscribed, so a later unsubscribe is the
                // person's own. (A temporary failure may have gone through: keep the mark.)
                if e.transient_scope().is_none() {
                    self.forget_own_removals(&m.audience, std::slice::from_ref(&hash))
                        .await;
                }
                Err(e)
            }
        }
    }
}

#[async_trait]
impl Connector for Mailchimp {
    async fn health(&self) -> ConnectorResult<Health> {
        self.call(Method::GET, "/ping", &[], None)
            .await
            .map_err(|e| match e {
                CallError::Connector(e) => e,
                CallError::Problem { title, .. } => ConnectorError::Config {
                    setting: format!("{SETTING_PREFIX}.api_key"),
                    message: format!("Mailchimp's ping failed ({})", title.escape_debug()),
                },
            })?;
        let mut audiences: Vec<(String, String)> = Vec::new();
        let mut offset = 0usize;
        loop {
            let q = [
                ("count", "1000".to_owned()),
                ("offset", offset.to_string()),
                ("fields", "lists.id,lists.name,total_items".to_owned()),
            ];
            let v = self
                .call(Method::GET, "/lists", &q, None)
                .await
                .map_err(|e| match e {
                    CallError::Connector(e) => e,
                    CallError::Problem { title, .. } => ConnectorError::permanent(format!(
                        "Mailchimp refused to list audiences ({})",
                        title.escape_debug()
                    )),
                })?;
            let page = v
                .get("lists")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let n = page.len();
            for l in page {
                let id = l.get("id").and_then(Value::as_str).unwrap_or_default();
                let name = l.get("name").and_then(Value::as_str).unwrap_or_default();
                audiences.push((id.to_owned(), name.to_owned()));
            }
            let total = v.get("total_items").and_then(Value::as_u64).unwrap_or(0) as usize;
            offset += n;
            if n == 0 || offset >= total {
                break;
            }
        }
        let mut notes = Vec::new();
        for (name, m) in &self.lists {
            let Some((_, aname)) = audiences.iter().find(|(id, _)| *id == m.audience) else {
                let visible = if audiences.is_empty() {
                    "the key sees no audiences".to_owned()
                } else {
                    format!(
                        "audiences this key can see: {}",
                        audiences
                            .iter()
                            .map(|(id, n)| format!("`{}` ({id})", n.escape_debug()))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                };
                return Err(ConnectorError::Config {
                    setting: format!("{SETTING_PREFIX}.lists.{name}.audience"),
                    message: format!(
                        "Mailchimp has no audience `{}` (mapped for optinsync list `{name}`); {visible}",
                        m.audience
                    ),
                });
            };
            if !m.merge_fields.is_empty() {
                let q = [
                    ("count", "1000".to_owned()),
                    ("fields", "merge_fields.tag".to_owned()),
                ];
                let v = self
                    .call(
                        Method::GET,
                        &format!("/lists/{}/merge-fields", m.audience),
                        &q,
                        None,
                    )
                    .await
                    .map_err(|e| self.item_error(name, m, e))?;
                let tags: BTreeSet<String> = v
                    .get("merge_fields")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|f| f.get("tag").and_then(Value::as_str))
                    .map(str::to_uppercase)
                    .collect();
                if let Some(tag) = m
                    .merge_fields
                    .keys()
                    .find(|t| !tags.contains(&t.to_uppercase()))
                {
                    return Err(ConnectorError::Config {
                        setting: format!("{SETTING_PREFIX}.lists.{name}.merge_fields.{tag}"),
                        message: format!(
                            "audience `{}` has no merge field `{tag}` (it has: {})",
                            aname.escape_debug(),
                            tags.iter().cloned().collect::<Vec<_>>().join(", ")
                        ),
                    });
                }
            }
            notes.push(format!(
                "{name} → `{}` (doi: {})",
                aname.escape_debug(),
                m.doi.as_str()
            ));
        }
        Ok(Health {
            ok: true,
            detail: format!("Mailchimp audiences found: {}", notes.join(", ")),
        })
    }

    /// Register the webhook on every mapped audience (once per process when it worked;
    /// listing the audience's webhooks first, so a restart adds none twice).
    async fn maintain(&self) -> ConnectorResult<()> {
        self.register_webhooks().await
    }

    async fn export_state(&self) -> Option<String> {
        self.saved_state()
    }

    fn accepts_webhooks(&self) -> bool {
        self.webhook.is_some()
    }

    async fn webhook(&self, request: &WebhookRequest) -> ConnectorResult<WebhookEvent> {
        self.handle_webhook(request).await
    }
}

#[async_trait]
impl CampaignsConnector for Mailchimp {
    fn max_batch(&self) -> usize {
        BATCH_MAX
    }

    /// `max_concurrency`: Mailchimp's connections per key; more would queue at the gate.
    fn concurrency(&self) -> usize {
        self.concurrency
    }

    fn status_interval(&self) -> Option<std::time::Duration> {
        Some(self.status_interval)
    }

    async fn subscribe(&self, list: &str, items: &[Keyed<Subscriber>]) -> BatchResult {
        let subs: Vec<&Subscriber> = items.iter().map(|k| &k.item).collect();
        self.subscribe_all(list, &subs).await
    }

    /// Each address is read and, when on the audience, set `unsubscribed`; up to
    /// `max_concurrency` at once.
    async fn remove(&self, list: &str, items: &[Keyed<String>]) -> BatchResult {
        let m = self.mapping(list)?;
        let calls = items.iter().map(|k| async move {
            if !looks_like_address(&k.item) {
                // The audience cannot hold it: nothing to remove.
                return Ok(());
            }
            self.remove_one(list, m, &k.item).await
        });
        Ok(futures_util::future::join_all(calls).await)
    }

    /// GDPR erasure: a removal, or — with `erasure = "delete_permanently"` — Mailchimp's
    /// permanent delete (the member's data is gone and the API refuses the address from then on).
    async fn erase(&self, list: &str, items: &[Keyed<String>]) -> BatchResult {
        if self.erasure != crate::config::Erasure::DeletePermanently {
            return self.remove(list, items).await;
        }
        let m = self.mapping(list)?;
        let calls = items.iter().map(|k| async move {
            if !looks_like_address(&k.item) {
                return Ok(());
            }
            let hash = subscriber_hash(&k.item);
            let path = format!(
                "/lists/{}/members/{hash}/actions/delete-permanent",
                m.audience
            );
            match self.call(Method::POST, &path, &[], None).await {
                Ok(_) => Ok(()),
                // Not on the audience (or already deleted): nothing left to erase.
                Err(CallError::Problem { status: 404, .. }) => Ok(()),
                Err(e) => Err(self.item_error(list, m, e)),
            }
        });
        Ok(futures_util::future::join_all(calls).await)
    }

    /// `pending`: Mailchimp sends its own confirmation mail. Only for a member not already
    /// pending or subscribed, so a retried request sends no second mail.
    async fn request_doi(&self, list: &str, subscriber: &Keyed<Subscriber>) -> ConnectorResult<()> {
        let m = self.mapping(list)?;
        if m.doi != DoiMode::Mailchimp {
            return Err(ConnectorError::Config {
                setting: format!("{SETTING_PREFIX}.lists.{list}.doi"),
                message: format!(
                    "the optinsync list asks Mailchimp to run the double opt-in, but `{list}` is mapped with doi = \"optinsync\"; set doi = \"mailchimp\""
                ),
            });
        }
        let s = &subscriber.item;
        if !looks_like_address(&s.email) {
            return Err(ConnectorError::rejected(
                "not an address; not sent to Mailchimp",
            ));
        }
        let hash = subscriber_hash(&s.email);
        if let Some(member) = self.get_member(list, m, &hash).await?
            && matches!(member.status.as_str(), "pending" | "subscribed")
        {
            return Ok(());
        }
        self.forget_own_removals(&m.audience, std::slice::from_ref(&hash))
            .await;
        self.put_member(list, m, s, "pending").await
    }

    async fn status_events(
        &self,
        list: &str,
        cursor: Option<&Cursor>,
    ) -> ConnectorResult<StatusPage> {
        self.poll_status(list, cursor).await
    }

    /// Subscribed members, `page_size` a page, by `count`/`offset` (the cursor is the offset).
    async fn list_members(
        &self,
        list: &str,
        cursor: Option<&Cursor>,
    ) -> ConnectorResult<MemberPage> {
        self.members_page(list, cursor).await
    }
}
