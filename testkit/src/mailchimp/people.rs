//! What people and Mailchimp itself do, for tests: confirmation clicks, unsubscribes, spam
//! complaints, bounces, address and profile changes; each fires its webhook.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::{
    Delivery, FakeMailchimp, Member, Source, Status, WebhookEvent, members, subscriber_hash,
    webhooks,
};

impl FakeMailchimp {
    // ----- what people and Mailchimp do (fire webhooks) -----------------------------------

    /// Deliver `event` on `list` as coming from `source` to every hook that wants it; the
    /// first attempts are awaited (retries go on in the background).
    pub async fn fire(&self, list: &str, event: WebhookEvent, source: Source) -> Vec<Delivery> {
        let rendered = {
            let s = self.lock();
            webhooks::render(&s, list, &event, Some(source))
        };
        self.dispatch(rendered).await
    }

    async fn dispatch(&self, rendered: Option<webhooks::Rendered>) -> Vec<Delivery> {
        let Some(r) = rendered else {
            return Vec::new();
        };
        let state = Arc::clone(&self.state);
        self.handle
            .spawn(webhooks::deliver(state, vec![r]))
            .await
            .unwrap_or_default()
    }

    fn change(
        &self,
        list: &str,
        email: &str,
        f: impl FnOnce(&mut Member, DateTime<Utc>),
    ) -> Option<()> {
        let mut s = self.lock();
        let now = s.now();
        let m = s
            .lists
            .get_mut(list)?
            .members
            .get_mut(&subscriber_hash(email))?;
        f(m, now);
        m.last_changed = now;
        Some(())
    }

    /// The person clicks Mailchimp's confirmation mail: `pending` → `subscribed`, `ip_opt` and
    /// `timestamp_opt` filled, `subscribe` webhook (source `user`). Panics unless pending.
    /// Over HTTP: `POST /__fake/confirm/{list_id}/{subscriber_hash}` (no auth; optional body
    /// `{"ip": "…"}`) does the same and answers 204, or 404 when the member is not pending.
    pub async fn confirm(&self, list: &str, email: &str, ip: &str) -> Vec<Delivery> {
        let rendered = {
            let mut s = self.lock();
            members::confirm(&mut s, list, email, ip)
        };
        assert!(rendered.is_some(), "{email} is not pending on {list}");
        self.dispatch(rendered).await
    }

    /// The person clicks "unsubscribe" in a campaign (reason `manual`), or reports spam
    /// (`abuse = true`): `unsubscribe` webhook, source `user`; a compliance state.
    pub async fn unsubscribe_by_user(&self, list: &str, email: &str, abuse: bool) -> Vec<Delivery> {
        self.change(list, email, |m, _| {
            m.status = Status::Unsubscribed;
            m.unsubscribed_by = Some(Source::User);
            m.unsubscribe_reason = if abuse { "abuse" } else { "manual" }.into();
        })
        .unwrap_or_else(|| panic!("{email} is not on {list}"));
        let event = WebhookEvent::Unsubscribe {
            email: email.to_owned(),
            action: "unsub".into(),
            reason: if abuse { "abuse" } else { "manual" }.into(),
            campaign_id: Some("cb398d21d2".into()),
        };
        self.fire(list, event, Source::User).await
    }

    /// The account owner unsubscribes the member in the web app (source `admin`).
    pub async fn unsubscribe_by_admin(&self, list: &str, email: &str) -> Vec<Delivery> {
        self.change(list, email, |m, _| {
            m.status = Status::Unsubscribed;
            m.unsubscribed_by = Some(Source::Admin);
        })
        .unwrap_or_else(|| panic!("{email} is not on {list}"));
        let event = WebhookEvent::Unsubscribe {
            email: email.to_owned(),
            action: "unsub".into(),
            reason: "manual".into(),
            campaign_id: None,
        };
        self.fire(list, event, Source::Admin).await
    }

    /// A hard bounce: `cleaned`, `cleaned` webhook with `reason=hard`.
    pub async fn bounce(&self, list: &str, email: &str) -> Vec<Delivery> {
        self.change(list, email, |m, _| m.status = Status::Cleaned)
            .unwrap_or_else(|| panic!("{email} is not on {list}"));
        let event = WebhookEvent::Cleaned {
            email: email.to_owned(),
            reason: "hard".into(),
            campaign_id: Some("4fjk2ma9xd".into()),
        };
        self.fire(list, event, Source::Admin).await
    }

    /// The person changes their address on their profile page: the member moves to the new
    /// hash, `upemail` webhook (source `user`).
    pub async fn change_email(&self, list: &str, old: &str, new: &str) -> Vec<Delivery> {
        {
            let mut s = self.lock();
            let now = s.now();
            let l = s
                .lists
                .get_mut(list)
                .unwrap_or_else(|| panic!("no list {list}"));
            let mut m = l
                .members
                .remove(&subscriber_hash(old))
                .unwrap_or_else(|| panic!("{old} is not on {list}"));
            m.email_address = new.trim().to_owned();
            m.id = subscriber_hash(new);
            m.last_changed = now;
            if let Some(v) = m.merge_fields.get_mut("EMAIL") {
                *v = Value::String(m.email_address.clone());
            }
            l.members.insert(m.id.clone(), m);
        }
        let event = WebhookEvent::Upemail {
            old_email: old.to_owned(),
            new_email: new.to_owned(),
        };
        self.fire(list, event, Source::User).await
    }

    /// The person edits their profile (merge fields): `profile` webhook (source `user`).
    pub async fn update_profile(
        &self,
        list: &str,
        email: &str,
        merge_fields: BTreeMap<String, Value>,
    ) -> Vec<Delivery> {
        self.change(list, email, |m, _| m.merge_fields.extend(merge_fields))
            .unwrap_or_else(|| panic!("{email} is not on {list}"));
        let event = WebhookEvent::Profile {
            email: email.to_owned(),
        };
        self.fire(list, event, Source::User).await
    }

    /// Wait (polling) until at least `n` delivery attempts are recorded; the attempts so far.
    pub async fn wait_for_deliveries(&self, n: usize, timeout: Duration) -> Vec<Delivery> {
        let end = Instant::now() + timeout;
        loop {
            let d = self.deliveries();
            if d.len() >= n || Instant::now() >= end {
                return d;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
