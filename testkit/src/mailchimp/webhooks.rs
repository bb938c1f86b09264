//! List webhooks: what a registered hook is, the validation GET Mailchimp makes before it
//! accepts one, and delivery as form-encoded POSTs.
//!
//! Delivery follows Mailchimp's Marketing API documentation and recorded captures: `POST`,
//! `Content-Type: application/x-www-form-urlencoded`, User-Agent `MailChimp.com`, keys
//! `type`, `fired_at` (`YYYY-MM-DD HH:MM:SS`, UTC) and PHP-style `data[…]` keys
//! (`data[merges][FNAME]`). The keys are form-encoded like the values (`data%5Bemail%5D`);
//! stricter: a receiver must decode keys as well as values.
//!
//! `events` and `sources` gate every delivery: a hook gets an event only when its `events`
//! flag for the type is true and, for events a person, the account owner or the API caused
//! (`subscribe`, `unsubscribe`, `profile`, `upemail`), its `sources` flag for who caused it
//! is true. `cleaned` and `campaign` come from Mailchimp itself and are gated by `events`
//! only (which source flag, if any, governs them is not documented). Stricter: a flag left out
//! when the hook was registered counts as false (Mailchimp does not document the defaults).
//!
//! Signing: Mailchimp Support says audience webhooks are unsigned, and that is the default
//! here; some recent sources describe an optional per-hook HMAC, which
//! [`super::MailchimpOptions::webhook_signing`] turns on: the create answer carries
//! `signing_enabled: true` and a one-time `signing_secret`, and every delivery an
//! `X-Mailchimp-Signature: t=<unix>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">` header.
//!
//! A delivery that fails (no 2xx within the timeout) is retried at increasing intervals
//! (1, 2, 4, … minutes, time-scaled) for the retry window (75 minutes).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

use super::errors::{Answer, ApiError};

use super::{MailchimpState, Shared, Source, lock_state, subscriber_hash};

/// The event types a list webhook knows.
pub const EVENT_TYPES: [&str; 6] = [
    "subscribe",
    "unsubscribe",
    "profile",
    "cleaned",
    "upemail",
    "campaign",
];
/// The source names.
pub const SOURCES: [&str; 3] = ["user", "admin", "api"];

/// A registered list webhook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Webhook {
    pub id: String,
    pub url: String,
    /// Event type → wanted.
    pub events: std::collections::BTreeMap<String, bool>,
    /// Source → wanted.
    pub sources: std::collections::BTreeMap<String, bool>,
    /// The signing secret (only with [`super::MailchimpOptions::webhook_signing`]).
    pub signing_secret: Option<String>,
}

impl Webhook {
    pub(super) fn json(&self, list_id: &str) -> Value {
        let flags = |names: &[&str], m: &std::collections::BTreeMap<String, bool>| {
            names
                .iter()
                .map(|n| ((*n).to_owned(), json!(m.get(*n).copied().unwrap_or(false))))
                .collect::<serde_json::Map<_, _>>()
        };
        let mut v = json!({"id": self.id, "url": self.url, "events": flags(&EVENT_TYPES, &self.events),
               "sources": flags(&SOURCES, &self.sources), "list_id": list_id, "_links": []});
        if self.signing_secret.is_some()
            && let Value::Object(o) = &mut v
        {
            o.insert("signing_enabled".into(), json!(true));
        }
        v
    }
}

/// An event to deliver (see [`super::FakeMailchimp::fire`]); member data (id, merges, ip_opt,
/// …) is read from the member's current state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WebhookEvent {
    Subscribe {
        email: String,
    },
    /// `action`: `unsub` or `delete`; `reason`: `manual` or `abuse`.
    Unsubscribe {
        email: String,
        action: String,
        reason: String,
        campaign_id: Option<String>,
    },
    /// `reason`: `hard` or `abuse`.
    Cleaned {
        email: String,
        reason: String,
        campaign_id: Option<String>,
    },
    Profile {
        email: String,
    },
    Upemail {
        old_email: String,
        new_email: String,
    },
    Campaign {
        id: String,
        subject: String,
        status: String,
        reason: String,
    },
}

/// One delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub webhook_id: String,
    pub url: String,
    /// `subscribe`, `unsubscribe`, …
    pub event_type: String,
    /// The form-encoded body as sent.
    pub body: String,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// The receiver's answer; None when it did not answer in time.
    pub status: Option<u16>,
    /// The `X-Mailchimp-Signature` header sent, if the hook signs.
    pub signature: Option<String>,
}

/// An event rendered for one list, ready to go to its hooks.
#[derive(Debug, Clone)]
pub(super) struct Rendered {
    pub list_id: String,
    pub kind: &'static str,
    /// None: not gated by `sources`.
    pub source: Option<Source>,
    pub pairs: Vec<(String, String)>,
}

fn member_pairs(s: &MailchimpState, list_id: &str, email: &str, out: &mut Vec<(String, String)>) {
    let member = s
        .lists
        .get(list_id)
        .and_then(|l| l.members.get(&subscriber_hash(email)));
    let Some(m) = member else {
        out.push(("data[list_id]".into(), list_id.into()));
        out.push(("data[email]".into(), email.into()));
        return;
    };
    out.push(("data[id]".into(), m.unique_email_id.clone()));
    out.push(("data[list_id]".into(), list_id.into()));
    out.push(("data[email]".into(), m.email_address.clone()));
    out.push(("data[email_type]".into(), m.email_type.clone()));
    out.push(("data[ip_opt]".into(), m.ip_opt.clone()));
    out.push(("data[ip_signup]".into(), m.ip_signup.clone()));
    out.push(("data[web_id]".into(), m.web_id.to_string()));
    out.push(("data[merges][EMAIL]".into(), m.email_address.clone()));
    for (tag, v) in &m.merge_fields {
        let text = match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        out.push((format!("data[merges][{tag}]"), text));
    }
}

pub(super) fn render(
    s: &MailchimpState,
    list_id: &str,
    event: &WebhookEvent,
    source: Option<Source>,
) -> Option<Rendered> {
    s.lists.get(list_id)?;
    let mut pairs = Vec::new();
    let (kind, source) = match event {
        WebhookEvent::Subscribe { email } => {
            member_pairs(s, list_id, email, &mut pairs);
            ("subscribe", source)
        }
        WebhookEvent::Unsubscribe {
            email,
            action,
            reason,
            campaign_id,
        } => {
            pairs.push(("data[action]".into(), action.clone()));
            pairs.push(("data[reason]".into(), reason.clone()));
            member_pairs(s, list_id, email, &mut pairs);
            if let Some(c) = campaign_id {
                pairs.push(("data[campaign_id]".into(), c.clone()));
            }
            ("unsubscribe", source)
        }
        WebhookEvent::Cleaned {
            email,
            reason,
            campaign_id,
        } => {
            pairs.push(("data[list_id]".into(), list_id.into()));
            if let Some(c) = campaign_id {
                pairs.push(("data[campaign_id]".into(), c.clone()));
            }
            pairs.push(("data[reason]".into(), reason.clone()));
            pairs.push(("data[email]".into(), email.clone()));
            ("cleaned", None)
        }
        WebhookEvent::Profile { email } => {
            member_pairs(s, list_id, email, &mut pairs);
            pairs.retain(|(k, _)| k != "data[ip_signup]");
            ("profile", source)
        }
        WebhookEvent::Upemail {
            old_email,
            new_email,
        } => {
            let new_id = s
                .lists
                .get(list_id)
                .and_then(|l| l.members.get(&subscriber_hash(new_email)))
                .map(|m| m.unique_email_id.clone())
                .unwrap_or_default();
            pairs.push(("data[list_id]".into(), list_id.into()));
            pairs.push(("data[new_id]".into(), new_id));
            pairs.push(("data[new_email]".into(), new_email.clone()));
            pairs.push(("data[old_email]".into(), old_email.clone()));
            ("upemail", source)
        }
        WebhookEvent::Campaign {
            id,
            subject,
            status,
            reason,
        } => {
            pairs.push(("data[id]".into(), id.clone()));
            pairs.push(("data[subject]".into(), subject.clone()));
            pairs.push(("data[status]".into(), status.clone()));
            pairs.push(("data[reason]".into(), reason.clone()));
            pairs.push(("data[list_id]".into(), list_id.into()));
            ("campaign", None)
        }
    };
    Some(Rendered {
        list_id: list_id.to_owned(),
        kind,
        source,
        pairs,
    })
}

fn body(s: &MailchimpState, r: &Rendered) -> String {
    let mut ser = form_urlencoded::Serializer::new(String::new());
    ser.append_pair("type", r.kind);
    ser.append_pair("fired_at", &s.now().format("%Y-%m-%d %H:%M:%S").to_string());
    for (k, v) in &r.pairs {
        ser.append_pair(k, v);
    }
    ser.finish()
}

/// The hooks of `r`'s list that want it, with the body to send each.
/// (webhook id, url, body, signing secret) for each hook that wants `r`.
fn targets(s: &MailchimpState, r: &Rendered) -> Vec<(String, String, String, Option<String>)> {
    let Some(list) = s.lists.get(&r.list_id) else {
        return Vec::new();
    };
    let body = body(s, r);
    list.webhooks
        .iter()
        .filter(|h| h.events.get(r.kind).copied().unwrap_or(false))
        .filter(|h| {
            r.source
                .is_none_or(|src| h.sources.get(src.as_str()).copied().unwrap_or(false))
        })
        .map(|h| {
            (
                h.id.clone(),
                h.url.clone(),
                body.clone(),
                h.signing_secret.clone(),
            )
        })
        .collect()
}

fn client(timeout: Duration, agent: &str) -> Option<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(timeout)
        .user_agent(agent)
        .build()
        .ok()
}

/// `t=<unix>,v1=<hex HMAC-SHA256 of "<t>.<body>">`.
pub fn signature(secret: &str, unix: i64, body: &str) -> String {
    use hmac::{Hmac, Mac as _};
    let mut mac = match Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(format!("{unix}.{body}").as_bytes());
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("t={unix},v1={hex}")
}

async fn post_once(
    client: &reqwest::Client,
    url: &str,
    body: &str,
    secret: Option<&str>,
) -> (Option<u16>, Option<String>) {
    let sig = secret.map(|k| signature(k, chrono::Utc::now().timestamp(), body));
    let mut rb = client.post(url);
    if let Some(sig) = &sig {
        rb = rb.header("X-Mailchimp-Signature", sig);
    }
    let status = rb
        .header(
            reqwest::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .body(body.to_owned())
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16());
    (status, sig)
}

/// Deliver events to every hook that wants them (runs on the fake's runtime); returns the
/// first attempts, and keeps retrying failed ones in the background.
pub(super) async fn deliver(state: Shared, events: Vec<Rendered>) -> Vec<Delivery> {
    let (jobs, timeout, window, scale) = {
        let s = lock_state(&state);
        let jobs: Vec<_> = events
            .iter()
            .flat_map(|r| {
                targets(&s, r)
                    .into_iter()
                    .map(move |(id, url, body, secret)| Job {
                        id,
                        url,
                        body,
                        secret,
                        kind: r.kind,
                    })
            })
            .collect();
        (
            jobs,
            s.options.webhook_timeout(),
            s.options.scaled(s.options.webhook_retry_window),
            s.options.time_scale.max(0.0),
        )
    };
    let Some(client) = client(timeout, "MailChimp.com") else {
        return Vec::new();
    };
    let mut tasks = Vec::new();
    for job in jobs {
        let client = client.clone();
        let state = Arc::clone(&state);
        tasks.push(tokio::spawn(async move {
            let first = job.attempt(&client, &state, 1).await;
            if !first.status.is_some_and(|c| (200..300).contains(&c)) {
                tokio::spawn(async move {
                    let start = Instant::now();
                    let mut wait = Duration::from_secs(60);
                    for attempt in 2.. {
                        let pause = wait.mul_f64(scale);
                        if start.elapsed() + pause > window {
                            return;
                        }
                        tokio::time::sleep(pause).await;
                        let d = job.attempt(&client, &state, attempt).await;
                        if d.status.is_some_and(|c| (200..300).contains(&c)) {
                            return;
                        }
                        wait *= 2;
                    }
                });
            }
            first
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        if let Ok(d) = t.await {
            out.push(d);
        }
    }
    out
}

/// One event for one hook.
struct Job {
    id: String,
    url: String,
    body: String,
    secret: Option<String>,
    kind: &'static str,
}

impl Job {
    /// POST once and record the attempt.
    async fn attempt(&self, client: &reqwest::Client, state: &Shared, attempt: u32) -> Delivery {
        let (status, signature) =
            post_once(client, &self.url, &self.body, self.secret.as_deref()).await;
        let d = Delivery {
            webhook_id: self.id.clone(),
            url: self.url.clone(),
            event_type: self.kind.to_owned(),
            body: self.body.clone(),
            attempt,
            status,
            signature,
        };
        lock_state(state).deliveries.push(d.clone());
        d
    }
}

/// Mailchimp's validation GET: the status the URL answered, None when it did not answer.
pub(super) async fn validate(url: &str, timeout: Duration) -> Option<u16> {
    let client = client(timeout, "MailChimp.com WebHook Validator")?;
    client
        .get(url)
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

fn flags(
    body: &Map<String, Value>,
    key: &str,
    names: &[&str],
) -> Result<std::collections::BTreeMap<String, bool>, ApiError> {
    let mut out: std::collections::BTreeMap<String, bool> =
        names.iter().map(|n| ((*n).to_owned(), false)).collect();
    match body.get(key) {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) => {
            for (k, v) in m {
                if !names.contains(&k.as_str()) {
                    return Err(ApiError::field(
                        &format!("{key}.{k}"),
                        "This property is not allowed.",
                    ));
                }
                let Some(b) = v.as_bool() else {
                    return Err(ApiError::field(
                        &format!("{key}.{k}"),
                        "Schema describes boolean.",
                    ));
                };
                out.insert(k.clone(), b);
            }
        }
        Some(_) => return Err(ApiError::field(key, "Schema describes object.")),
    }
    Ok(out)
}

/// `POST /lists/{id}/webhooks`: validate the URL with a real GET, then register.
pub(super) async fn create_webhook(
    state: &Shared,
    list_id: &str,
    body: &Map<String, Value>,
) -> Result<Answer, ApiError> {
    let url = body
        .get("url")
        .and_then(Value::as_str)
        .map(str::trim)
        .unwrap_or_default()
        .to_owned();
    let parsed = reqwest::Url::parse(&url)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
    if parsed.is_none() {
        return Err(ApiError::field("url", "This value should be a valid URL."));
    }
    let events = flags(body, "events", &EVENT_TYPES)?;
    let sources = flags(body, "sources", &SOURCES)?;
    let timeout = {
        let s = lock_state(state);
        let l = s.lists.get(list_id).ok_or_else(ApiError::not_found)?;
        if l.webhooks.iter().any(|h| h.url == url) {
            return Err(ApiError::field(
                "url",
                "A webhook with this URL already exists on this list.",
            ));
        }
        s.options.webhook_timeout()
    };
    let answered = validate(&url, timeout).await;
    let mut s = lock_state(state);
    s.validations.push((url.clone(), answered));
    if !answered.is_some_and(|c| (200..300).contains(&c)) {
        return Err(ApiError::field(
            "url",
            "We couldn't verify the URL is working. Please double check and try again.",
        ));
    }
    let secret = s.options.webhook_signing.then(|| MailchimpState::hex(40));
    let l = s.lists.get_mut(list_id).ok_or_else(ApiError::not_found)?;
    let hook = Webhook {
        id: MailchimpState::hex(10),
        url,
        events,
        sources,
        signing_secret: secret.clone(),
    };
    let mut v = hook.json(&l.id);
    l.webhooks.push(hook);
    // The secret is shown once, in the create answer.
    if let (Some(secret), Value::Object(o)) = (secret, &mut v) {
        o.insert("signing_secret".into(), json!(secret));
    }
    Ok(Answer::Json(200, v))
}
