//! [`Connector`] and [`CampaignsConnector`] for [`Mailchimp`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::Ordering;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use optinsync_plugin_api::{
    BatchResult, CampaignsConnector, Connector, ConnectorError, ConnectorResult, Cursor, Health,
    HttpMethod, Keyed, MemberPage, StatusEvent, StatusKind, StatusPage, Subscriber, WebhookEvent,
    WebhookRequest,
};
use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use subtle::ConstantTimeEq as _;

use crate::http::{CallError, member_refusal};
use crate::parse::{MemberRow, members_answer, parse_webhook_form};
use crate::{BATCH_MAX, DoiMode, ListMapping, Mailchimp, SETTING_PREFIX, subscriber_hash};

/// Pages one `status_events` call reads at most per status before it answers `has_more`.
const PAGES_PER_POLL: usize = 20;
/// Fields a status read asks for.
const STATUS_FIELDS: &str = "members.id,members.email_address,members.status,members.last_changed,members.timestamp_opt,members.ip_opt,members.unsubscribe_reason,total_items";

/// The status cursor (versioned, opaque to the engine).
#[derive(Debug, Default, Serialize, Deserialize)]
struct StatusCursor {
    v: u32,
    /// status → where its stream stands.
    streams: BTreeMap<String, Stream>,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Stream {
    /// The latest `last_changed` seen (unix seconds).
    t: i64,
    /// Member ids seen with exactly `t`.
    seen: BTreeSet<String>,
}

/// The state kept across restarts.
#[derive(Debug, Default, Serialize, Deserialize)]
struct SavedState {
    v: u32,
    own_removals: BTreeMap<String, Vec<String>>,
}

fn iso(t: DateTime<Utc>) -> String {
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
    fn item_error(&self, list: &str, m: &ListMapping, e: CallError) -> ConnectorError {
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
                results[i] = Some(Err(ConnectorError::Rejected {
                    message: "not an address; not sent to Mailchimp".into(),
                }));
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

    async fn mark_own_removal(&self, audience: &str, hash: &str) -> ConnectorResult<()> {
        self.lock_removals()
            .entry(audience.to_owned())
            .or_default()
            .insert(hash.to_owned());
        if let Some(marks) = &self.marks {
            marks.mark(&Self::removals_set(audience), hash).await?;
        }
        Ok(())
    }

    async fn forget_own_removals(&self, audience: &str, hashes: &[String]) {
        if hashes.is_empty() {
            return;
        }
        if let Some(set) = self.lock_removals().get_mut(audience) {
            for h in hashes {
                set.remove(h);
            }
        }
        if let Some(marks) = &self.marks
            && let Err(e) = marks.unmark(&Self::removals_set(audience), hashes).await
        {
            tracing::debug!(error = %e, "shared own-removal marks not cleared");
        }
    }

    async fn own_removals(&self, audience: &str) -> ConnectorResult<BTreeSet<String>> {
        let mut own = self
            .lock_removals()
            .get(audience)
            .cloned()
            .unwrap_or_default();
        if let Some(marks) = &self.marks {
            own.extend(marks.marked(&Self::removals_set(audience)).await?);
        }
        Ok(own)
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

    /// One status stream (`unsubscribed`, `cleaned`, `subscribed`) from its cursor position.
    async fn read_stream(
        &self,
        list: &str,
        m: &ListMapping,
        status: &str,
        from: Option<&Stream>,
        mut on_row: impl FnMut(&MemberRow, Option<&Stream>),
    ) -> ConnectorResult<(Stream, bool)> {
        let mut stream = from.cloned().unwrap_or_default();
        let started = from.is_some();
        let count = self.page_size as usize;
        let mut offset = 0usize;
        for _ in 0..PAGES_PER_POLL {
            let mut q = vec![
                ("status", status.to_owned()),
                ("sort_field", "last_changed".to_owned()),
                ("sort_dir", "ASC".to_owned()),
                ("count", count.to_string()),
                ("offset", offset.to_string()),
                ("fields", STATUS_FIELDS.to_owned()),
            ];
            if started || stream.t > 0 {
                let since = DateTime::from_timestamp(stream.t - 1, 0).unwrap_or_default();
                q.push(("since_last_changed", iso(since)));
            }
            let answer = self
                .call(
                    Method::GET,
                    &format!("/lists/{}/members", m.audience),
                    &q,
                    None,
                )
                .await
                .map_err(|e| self.item_error(list, m, e))?;
            let page = members_answer(&answer).map_err(|why| {
                ConnectorError::transient(format!(
                    "Mailchimp's member listing is unreadable: {why}"
                ))
            })?;
            let n = page.members.len();
            for row in &page.members {
                let Some(lc) = row.last_changed else { continue };
                let t = lc.timestamp();
                if t < stream.t || (t == stream.t && stream.seen.contains(&row.id)) {
                    continue;
                }
                on_row(row, from);
                if t > stream.t {
                    stream.t = t;
                    stream.seen.clear();
                }
                stream.seen.insert(row.id.clone());
            }
            if n < count {
                return Ok((stream, false));
            }
            // Ask again from the newest second seen, skipping what was seen at it (a member
            // that changes during the walk moves to the end instead of shifting the pages).
            offset = stream.seen.len();
        }
        Ok((stream, true))
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
        let (Some(w), Some(url)) = (&self.webhook, self.webhook_url()) else {
            return Ok(());
        };
        if !w.register || self.registered.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut done = BTreeSet::new();
        for (name, m) in &self.lists {
            if !done.insert(m.audience.clone()) {
                continue;
            }
            let path = format!("/lists/{}/webhooks", m.audience);
            let existing = self
                .call(Method::GET, &path, &[], None)
                .await
                .map_err(|e| self.item_error(name, m, e))?;
            let present = existing
                .get("webhooks")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .any(|h| h.get("url").and_then(Value::as_str) == Some(url.as_str()));
            if present {
                continue;
            }
            let body = json!({
                "url": url,
                "events": {"subscribe": true, "unsubscribe": true, "profile": false,
                           "cleaned": true, "upemail": true, "campaign": false},
                "sources": {"user": true, "admin": true, "api": false},
            });
            match self.call(Method::POST, &path, &[], Some(&body)).await {
                Ok(_) => tracing::info!(list = %name, "Mailchimp webhook registered"),
                Err(CallError::Problem { title, detail, .. }) => {
                    return Err(ConnectorError::Config {
                        setting: format!("{SETTING_PREFIX}.webhook.url"),
                        message: format!(
                            "Mailchimp did not register the webhook ({}: {}); the URL must be reachable from the internet and answer GET",
                            title.escape_debug(),
                            detail.escape_debug()
                        ),
                    });
                }
                Err(CallError::Connector(e)) => return Err(e),
            }
        }
        self.registered.store(true, Ordering::Relaxed);
        Ok(())
    }

    async fn export_state(&self) -> Option<String> {
        self.saved_state()
    }

    fn accepts_webhooks(&self) -> bool {
        self.webhook.is_some()
    }

    async fn webhook(&self, request: &WebhookRequest) -> ConnectorResult<WebhookEvent> {
        let invalid = |message: &str| ConnectorError::InvalidInput {
            message: message.to_owned(),
        };
        let Some(w) = &self.webhook else {
            return Err(invalid(
                "this connector takes no webhooks (no [webhook] table)",
            ));
        };
        let given = request.query_param("secret").unwrap_or_default();
        if given.is_empty() || !bool::from(given.as_bytes().ct_eq(w.secret.as_bytes())) {
            return Err(invalid("missing or wrong webhook secret"));
        }
        if request.method == HttpMethod::Get {
            return Ok(WebhookEvent::Ignored);
        }
        let form = parse_webhook_form(&request.body)
            .map_err(|e| invalid(&format!("not a Mailchimp webhook delivery: {e}")))?;
        let Some((name, m)) = self.mapping_of_audience(&form.list_id) else {
            return Err(invalid("the delivery names an audience that no list maps"));
        };
        let at = form.fired_at.unwrap_or_else(Utc::now);
        let event = |email: &str, kind: StatusKind, detail: String| StatusEvent {
            email: email.to_owned(),
            kind,
            at,
            detail: Some(detail),
        };
        let mut events = Vec::new();
        match form.kind.as_str() {
            "unsubscribe" if form.action == "delete" => {}
            "unsubscribe" => {
                let own = self.own_removals(&m.audience).await?;
                if form.reason == "abuse" {
                    events.push(event(
                        &form.email,
                        StatusKind::Complained,
                        "Mailchimp webhook: unsubscribed as a spam complaint".into(),
                    ));
                } else if !own.contains(&subscriber_hash(&form.email)) {
                    events.push(event(
                        &form.email,
                        StatusKind::Unsubscribed,
                        "Mailchimp webhook: unsubscribed".into(),
                    ));
                }
            }
            "cleaned" => {
                let (kind, what) = if form.reason == "abuse" {
                    (StatusKind::Complained, "cleaned after a spam complaint")
                } else {
                    (StatusKind::Bounced, "cleaned (bounced)")
                };
                events.push(event(
                    &form.email,
                    kind,
                    format!("Mailchimp webhook: {what}"),
                ));
            }
            "subscribe" if m.doi == DoiMode::Mailchimp => {
                events.push(event(
                    &form.email,
                    StatusKind::Confirmed,
                    format!(
                        "Mailchimp webhook: confirmed Mailchimp's own opt-in mail (ip_opt {})",
                        form.ip_opt.escape_debug()
                    ),
                ));
            }
            "upemail" => {
                events.push(event(
                    &form.old_email,
                    StatusKind::Unsubscribed,
                    "Mailchimp webhook: the member changed this address to another one".into(),
                ));
            }
            _ => {}
        }
        if events.is_empty() {
            return Ok(WebhookEvent::Ignored);
        }
        tracing::info!(
            events = events.len(),
            kind = %form.kind.escape_debug(),
            "Mailchimp webhook"
        );
        // The engine applies webhook events to the lists whose `campaigns_list` is `list`:
        // the name this audience is mapped under (the name `subscribe` and `status_events`
        // are called with), not the audience id.
        Ok(WebhookEvent::Status {
            list: name.clone(),
            events,
        })
    }
}

impl Mailchimp {
    /// The state [`Connector::export_state`] hands the engine: the own removals the status
    /// poll must not echo.
    pub fn saved_state(&self) -> Option<String> {
        let own_removals = self
            .lock_removals()
            .iter()
            .filter(|(_, s)| !s.is_empty())
            .map(|(k, s)| (k.clone(), s.iter().cloned().collect()))
            .collect();
        serde_json::to_string(&SavedState { v: 1, own_removals }).ok()
    }

    /// Take back state from an earlier [`Connector::export_state`].
    pub fn import_state(&self, state: &str) -> ConnectorResult<()> {
        let saved: SavedState =
            serde_json::from_str(state).map_err(|e| ConnectorError::InvalidInput {
                message: format!("saved Mailchimp state is unreadable: {e}"),
            })?;
        if saved.v != 1 {
            return Err(ConnectorError::InvalidInput {
                message: format!("saved Mailchimp state has version {}, expected 1", saved.v),
            });
        }
        let mut removals = self.lock_removals();
        for (k, v) in saved.own_removals {
            removals.entry(k).or_default().extend(v);
        }
        Ok(())
    }
}

#[async_trait]
impl CampaignsConnector for Mailchimp {
    fn max_batch(&self) -> usize {
        BATCH_MAX
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
            return Err(ConnectorError::Rejected {
                message: "not an address; not sent to Mailchimp".into(),
            });
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
        let m = self.mapping(list)?;
        let previous: StatusCursor = match cursor {
            None => StatusCursor::default(),
            Some(c) => serde_json::from_str(&c.0).map_err(|e| ConnectorError::InvalidInput {
                message: format!(
                    "the stored Mailchimp status cursor of `{list}` is unreadable: {e}"
                ),
            })?,
        };
        if cursor.is_some() && previous.v != 1 {
            return Err(ConnectorError::InvalidInput {
                message: format!(
                    "the stored Mailchimp status cursor of `{list}` has version {}, expected 1",
                    previous.v
                ),
            });
        }
        let own = self.own_removals(&m.audience).await?;
        let mut consumed = Vec::new();
        let mut events = Vec::new();
        let mut next = StatusCursor {
            v: 1,
            streams: BTreeMap::new(),
        };
        let mut has_more = false;
        let mut statuses = vec![
            ("unsubscribed", StatusKind::Unsubscribed),
            ("cleaned", StatusKind::Bounced),
        ];
        if m.doi == DoiMode::Mailchimp {
            statuses.push(("subscribed", StatusKind::Confirmed));
        }
        for (status, kind) in statuses {
            let from = previous.streams.get(status);
            let (stream, more) = self
                .read_stream(list, m, status, from, |row, from| {
                    let at = row.last_changed.unwrap_or_else(Utc::now);
                    match kind {
                        StatusKind::Unsubscribed if own.contains(&row.id) => {
                            consumed.push(row.id.clone());
                        }
                        StatusKind::Confirmed => {
                            // A confirmation since the last read (a profile change of a long
                            // confirmed member moves `last_changed`, not `timestamp_opt`).
                            let Some(opt) = row.timestamp_opt else { return };
                            if from.is_some_and(|f| opt.timestamp() < f.t - 1) {
                                return;
                            }
                            events.push(StatusEvent {
                                email: row.email.clone(),
                                kind,
                                at: opt,
                                detail: Some(format!(
                                    "Mailchimp reports the member confirmed Mailchimp's own opt-in mail (ip_opt {})",
                                    row.ip_opt.escape_debug()
                                )),
                            });
                        }
                        _ => events.push(StatusEvent {
                            email: row.email.clone(),
                            kind,
                            at,
                            detail: Some(format!(
                                "Mailchimp audience {} reports status `{status}`",
                                m.audience
                            )),
                        }),
                    }
                })
                .await?;
            has_more |= more;
            next.streams.insert(status.to_owned(), stream);
        }
        if !consumed.is_empty() {
            self.forget_own_removals(&m.audience, &consumed).await;
        }
        if !events.is_empty() {
            tracing::info!(
                list,
                events = events.len(),
                "Mailchimp reported unsubscribes/bounces/confirmations"
            );
        }
        let text = serde_json::to_string(&next).map_err(|e| {
            ConnectorError::permanent(format!("cannot write the status cursor: {e}"))
        })?;
        Ok(StatusPage {
            events,
            next_cursor: Some(Cursor(text)),
            has_more,
        })
    }

    /// Subscribed members, `page_size` a page, by `count`/`offset` (the cursor is the offset).
    async fn list_members(
        &self,
        list: &str,
        cursor: Option<&Cursor>,
    ) -> ConnectorResult<MemberPage> {
        let m = self.mapping(list)?;
        let offset: usize = match cursor {
            None => 0,
            Some(c) => {
                c.0.trim()
                    .parse()
                    .map_err(|_| ConnectorError::InvalidInput {
                        message: "the Mailchimp member cursor is not an offset".into(),
                    })?
            }
        };
        let fields = "members.id,members.email_address,members.status,members.language,members.merge_fields,total_items";
        let q = [
            ("status", "subscribed".to_owned()),
            ("count", self.page_size.to_string()),
            ("offset", offset.to_string()),
            ("fields", fields.to_owned()),
        ];
        let answer = self
            .call(
                Method::GET,
                &format!("/lists/{}/members", m.audience),
                &q,
                None,
            )
            .await
            .map_err(|e| self.item_error(list, m, e))?;
        let n = answer
            .get("members")
            .and_then(Value::as_array)
            .map_or(0, Vec::len);
        let language: Vec<Option<String>> = answer
            .get("members")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|v| {
                v.get("email_address")
                    .and_then(Value::as_str)
                    .is_some_and(|e| e.contains('@'))
            })
            .map(|v| {
                v.get("language")
                    .and_then(Value::as_str)
                    .filter(|l| !l.is_empty())
                    .map(str::to_owned)
            })
            .collect();
        let page = members_answer(&answer).map_err(|why| {
            ConnectorError::transient(format!("Mailchimp's member listing is unreadable: {why}"))
        })?;
        let total = page.total_items.unwrap_or(0) as usize;
        let members = page
            .members
            .into_iter()
            .zip(language)
            .map(|(row, language)| {
                let fields = m
                    .merge_fields
                    .iter()
                    .filter_map(|(tag, field)| {
                        let v = row.merge_fields.get(tag)?;
                        (!v.is_null() && v.as_str() != Some("")).then(|| (field.clone(), v.clone()))
                    })
                    .collect();
                Subscriber {
                    email: row.email,
                    language,
                    fields,
                    proof: None,
                }
            })
            .collect();
        let next = offset + n;
        Ok(MemberPage {
            members,
            next_cursor: Some(Cursor(next.to_string())),
            has_more: n > 0 && next < total,
        })
    }
}
