//! Exports for auditors and data subjects, built from stored data only (ledger, consent
//! projection, text snapshots, configuration) — no connector is asked, so they work offline.
//!
//! * [`proof_bundle`]: the proof of one person's consent (README.md, "Proof, erasure, retention, subject access"): every event with
//!   its evidence, the exact texts shown, the rule files that acted, and the ledger chain
//!   segment with its verification. [`proof_html`] renders the same bundle as one printable,
//!   self-contained HTML page (inline CSS, no scripts, no external resources, all escaped).
//! * [`subject_export`]: the person's own data in a portable JSON file (GDPR Art. 15/20).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Value, json};

use crate::config::LoadedConfig;
use crate::consent::{Consent, ConsentState};
use crate::ledger::{ChainError, ChainVerifier, GENESIS_HASH, LedgerEvent, REDACTED_EVIDENCE};
use crate::store::{Contact, Snapshot, Store, StoreError};

/// `schema` of a proof bundle; `version` changes when a field changes meaning or goes away.
pub const PROOF_SCHEMA: &str = "optinsync.proof-bundle";
pub const PROOF_VERSION: u32 = 1;
/// `schema` of a subject-access export.
pub const SUBJECT_SCHEMA: &str = "optinsync.subject-export";
pub const SUBJECT_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A bundle quoting a broken ledger proves nothing: no bundle is written.
    #[error("ledger verification FAILED: {0}")]
    Chain(#[from] ChainError),
    #[error("cannot render the HTML proof: {0}")]
    Template(#[from] minijinja::Error),
}

pub type ExportResult<T> = Result<T, ExportError>;

/// The result of verifying the whole ledger, quoted by every bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChainSummary {
    pub verified: bool,
    pub events_checked: u64,
    pub head_seq: i64,
    pub head_hash: String,
}

/// Recompute the whole hash chain (page by page); fails naming the first bad event.
pub async fn verify_ledger(store: &dyn Store) -> ExportResult<ChainSummary> {
    let mut verifier = ChainVerifier::default();
    let (mut after, mut head) = (0, (0, GENESIS_HASH.to_owned()));
    loop {
        let page = store.ledger_page(after, 1000).await?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        for ev in &page {
            verifier.check(ev)?;
        }
        head = (last.seq, last.hash.clone());
    }
    let checked = verifier.finish()?;
    Ok(ChainSummary {
        verified: true,
        events_checked: checked,
        head_seq: head.0,
        head_hash: head.1,
    })
}

/// Whether one stored event still matches its own hash and evidence digest (the segment
/// check; the link to its neighbours is what [`verify_ledger`] checks).
fn event_intact(e: &LedgerEvent) -> bool {
    if e.compute_hash() != e.hash {
        return false;
    }
    match &e.evidence_sha256 {
        Some(d) if e.evidence != REDACTED_EVIDENCE => sha256_hex(&e.evidence) == *d,
        _ => true,
    }
}

fn sha256_hex(text: &str) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

fn event_json(e: &LedgerEvent) -> Value {
    json!({
        "seq": e.seq,
        "event_id": e.event_id,
        "at": e.at,
        "list_id": e.list_id,
        "kind": e.kind,
        "from_state": e.from_state,
        "to_state": e.to_state,
        "source": e.source,
        "evidence": serde_json::from_str::<Value>(&e.evidence).unwrap_or(Value::Null),
        "evidence_sha256": e.evidence_sha256,
        "prev_hash": e.prev_hash,
        "hash": e.hash,
        "intact": event_intact(e),
    })
}

fn snapshot_json(s: &Snapshot) -> Value {
    // Mails are stored as `{"subject","text","html"}`; pages as their HTML.
    let mail: Option<Value> = s
        .kind
        .starts_with("mail:")
        .then(|| serde_json::from_str(&s.content).ok())
        .flatten();
    json!({
        "kind": s.kind,
        "language": s.language,
        "template_version": s.template_version,
        "first_stored_at": s.created_at,
        // Exactly as stored (its SHA-256 is the key); the fields below are its parts.
        "content": s.content,
        "subject": mail.as_ref().and_then(|m| m.get("subject").cloned()),
        "text": mail.as_ref().and_then(|m| m.get("text").cloned()),
        "html": mail.as_ref().map_or_else(|| Value::String(s.content.clone()), |m| m.get("html").cloned().unwrap_or(Value::Null)),
    })
}

/// When the proof of a consent in `state` since `since` is purged under `[retention]`.
pub fn retain_until(
    config: &LoadedConfig,
    state: ConsentState,
    since: DateTime<Utc>,
    ever_confirmed: bool,
) -> Option<DateTime<Utc>> {
    let r = &config.config.retention;
    let ttl = match state {
        ConsentState::Withdrawn
        | ConsentState::Bounced
        | ConsentState::Complained
        | ConsentState::Lapsed
            if ever_confirmed || state != ConsentState::Lapsed =>
        {
            r.withdrawn_proof?
        }
        ConsentState::Asserted | ConsentState::Pending | ConsentState::Lapsed => r.unconfirmed?,
        _ => return None,
    };
    Some(since + chrono::Duration::seconds(ttl.secs()))
}

/// The proof of one person's consent. `chain` is the verification of the whole ledger
/// ([`verify_ledger`], done once for many bundles).
pub async fn proof_bundle(
    config: &LoadedConfig,
    store: &dyn Store,
    contact: &Contact,
    chain: &ChainSummary,
    generated_at: DateTime<Utc>,
) -> ExportResult<Value> {
    let consents = store.consents_of_contact(&contact.id).await?;
    let events = store.events_of_contact(&contact.id).await?;
    let mut texts = BTreeMap::new();
    for e in &events {
        let ev = e.evidence();
        for hash in [ev.content_hash, ev.mail_content_hash]
            .into_iter()
            .flatten()
        {
            if texts.contains_key(&hash) {
                continue;
            }
            if let Some(snap) = store.snapshot(&hash).await? {
                texts.insert(hash, snapshot_json(&snap));
            }
        }
    }
    // Every rule file (and its SHA-256) that proposed one of these events.
    let mut rules: BTreeMap<(String, String), Vec<i64>> = BTreeMap::new();
    for e in &events {
        let ev = e.evidence();
        if let (Some(file), Some(hash)) = (ev.rule_file, ev.rule_hash) {
            rules.entry((file, hash)).or_default().push(e.seq);
        }
    }
    let proof: Vec<Value> = consents
        .iter()
        .map(|(list, c)| list_proof(config, contact, list, c, &events, &texts))
        .collect();
    let segment_intact = events.iter().all(event_intact);
    Ok(json!({
        "schema": PROOF_SCHEMA,
        "version": PROOF_VERSION,
        "generated_at": generated_at,
        "generated_from": "stored data only: ledger, consent projection, text snapshots, configuration; no outside service was asked",
        "clock": "UTC, the optinsync host's system clock",
        "subject": {
            "contact_id": contact.id,
            "email": contact.email,
            "language": contact.language,
            "crm_records": record_texts(contact),
        },
        "consent": consents.iter().map(|(list, c)| {
            let l = config.list(list);
            json!({
                "list": list,
                "list_name": l.map(|l| l.name.clone()),
                "list_description": l.map(|l| l.description.clone()),
                "state": c.state,
                "since": c.since,
                "confirmed_at": c.confirmed_at,
                "retain_until": retain_until(config, c.state, c.since, c.confirmed_at.is_some()),
            })
        }).collect::<Vec<_>>(),
        "proof": proof,
        "events": events.iter().map(event_json).collect::<Vec<_>>(),
        "texts": texts,
        "rules": rules.iter().map(|((file, sha256), seqs)| json!({ "file": file, "sha256": sha256, "events": seqs })).collect::<Vec<_>>(),
        "ledger": {
            "verified": chain.verified,
            "events_checked": chain.events_checked,
            "head_seq": chain.head_seq,
            "head_hash": chain.head_hash,
            "segment": events.iter().map(|e| json!({ "seq": e.seq, "prev_hash": e.prev_hash, "hash": e.hash })).collect::<Vec<_>>(),
            "segment_intact": segment_intact,
            "how_to_check": "each event's hash is SHA-256 over its length-prefixed fields (the evidence through its SHA-256) and the previous event's hash (core/src/ledger.rs); `optinsync ledger verify` recomputes the whole chain and prints the head hash to compare with one recorded elsewhere",
        },
    }))
}

/// The §2 dimensions for one list, picked out of the events: who, when, what they were told,
/// how, the session, the link evidence and what happened later.
fn list_proof(
    config: &LoadedConfig,
    contact: &Contact,
    list: &str,
    c: &Consent,
    events: &[LedgerEvent],
    texts: &BTreeMap<String, Value>,
) -> Value {
    let mine: Vec<&LedgerEvent> = events.iter().filter(|e| e.list_id == list).collect();
    let last = |kinds: &[&str]| mine.iter().rev().find(|e| kinds.contains(&e.kind.as_str()));
    let signup = last(&[
        "doi_requested",
        "signup_requested",
        "revalidation_requested",
    ]);
    let mail = last(&["doi_mail_sent", "revalidation_mail_sent"]);
    let confirmed = last(&["confirmed", "confirmed_by_campaigns"]);
    let l = config.list(list);
    let text_kind = |hash: &Option<String>| {
        hash.as_ref()
            .and_then(|h| texts.get(h))
            .and_then(|t| t["kind"].as_str().map(str::to_owned))
    };
    let asserted = last(&["asserted"]);
    json!({
        "list": list,
        "who": {
            "contact_id": contact.id,
            "email": contact.email,
            "crm_records": record_texts(contact),
            "crm_record_of_signup": asserted.and_then(|e| e.evidence().crm_record),
        },
        "what": {
            "list": list,
            "list_name": l.map(|l| l.name.clone()),
            "purpose": l.map(|l| l.description.clone()),
            "controller": config.config.sender.organisation,
            "channel": "email",
            "legal_basis": "consent (GDPR Art. 6(1)(a)), double opt-in",
            "doi_run_by": l.map(|l| format!("{:?}", l.doi).to_lowercase()),
            "language": mail.and_then(|e| e.evidence().content_hash).and_then(|h| texts.get(&h)).and_then(|t| t["language"].as_str().map(str::to_owned)),
        },
        "asserted": asserted.map(|e| json!({ "at": e.at, "seq": e.seq, "source": e.source, "crm_record": e.evidence().crm_record })),
        "signup": signup.map(|e| {
            let ev = e.evidence();
            // The signup's token is recorded with the mail that carried it.
            let token_id = ev.token_id.or_else(|| mail.and_then(|m| m.evidence().token_id));
            json!({ "at": e.at, "seq": e.seq, "kind": e.kind, "source": e.source, "token_id": token_id,
                    "rule_file": ev.rule_file, "rule_hash": ev.rule_hash, "reason": ev.reason })
        }),
        "confirmation_mail": mail.map(|e| {
            let ev = e.evidence();
            json!({ "sent_at": e.at, "seq": e.seq, "message_id": ev.message_id, "token_id": ev.token_id, "content_hash": ev.content_hash,
                    "text_stored": ev.content_hash.as_ref().is_some_and(|h| texts.contains_key(h)) })
        }),
        "confirmation": confirmed.map(|e| {
            let ev = e.evidence();
            json!({ "at": e.at, "seq": e.seq, "kind": e.kind, "source": e.source, "ip": ev.ip, "user_agent": ev.user_agent,
                    "method": ev.method, "token_id": ev.token_id, "message_id": ev.message_id,
                    "page_content_hash": ev.content_hash, "page_kind": text_kind(&ev.content_hash),
                    "mail_content_hash": ev.mail_content_hash, "detail": ev.detail })
        }),
        "link_fetches": mine.iter().filter(|e| e.kind == "link_fetched").map(|e| {
            let ev = e.evidence();
            json!({ "at": e.at, "seq": e.seq, "method": ev.method, "ip": ev.ip, "user_agent": ev.user_agent, "counted_as_consent": false })
        }).collect::<Vec<_>>(),
        "later": mine.iter().filter(|e| confirmed.is_some_and(|c| e.seq > c.seq) && e.kind != "link_fetched").map(|e| {
            json!({ "at": e.at, "seq": e.seq, "kind": e.kind, "source": e.source, "to_state": e.to_state })
        }).collect::<Vec<_>>(),
        "state": c.state,
        "retain_until": retain_until(config, c.state, c.since, c.confirmed_at.is_some()),
    })
}

const PROOF_TEMPLATE: &str = r#"<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Proof of consent: {{ b.subject.email }}</title>
<style>
body { font-family: Georgia, "Times New Roman", serif; margin: 2em auto; max-width: 60em; color: #111; line-height: 1.4; }
h1 { font-size: 1.6em; border-bottom: 2px solid #333; padding-bottom: .2em; }
h2 { font-size: 1.25em; margin-top: 1.6em; border-bottom: 1px solid #999; }
h3 { font-size: 1.05em; margin-bottom: .3em; }
table { border-collapse: collapse; width: 100%; margin: .5em 0 1em; font-size: .92em; }
th, td { border: 1px solid #bbb; padding: .25em .45em; text-align: left; vertical-align: top; }
th { background: #eee; width: 14em; }
code, pre, .hash { font-family: "DejaVu Sans Mono", Menlo, monospace; font-size: .85em; word-break: break-all; }
pre { white-space: pre-wrap; border: 1px solid #ccc; background: #fafafa; padding: .6em; }
.ok { color: #064; font-weight: bold; }
.bad { color: #a00; font-weight: bold; }
.event { page-break-inside: avoid; }
.muted { color: #555; font-size: .9em; }
@media print { body { margin: 0; max-width: none; } h2 { page-break-after: avoid; } }
</style>
</head>
<body>
<h1>Proof of consent</h1>
<p class="muted">Generated {{ b.generated_at }} from {{ b.generated_from }}. Times are {{ b.clock }}.
Bundle schema <code>{{ b.schema }}</code> version {{ b.version }}.</p>

<h2>Who</h2>
<table>
<tr><th>Email address</th><td id="subject-email">{{ b.subject.email }}</td></tr>
<tr><th>Contact id</th><td><code>{{ b.subject.contact_id }}</code></td></tr>
<tr><th>CRM records</th><td>{% for r in b.subject.crm_records %}<code>{{ r }}</code>{% if not loop.last %}, {% endif %}{% else %}none{% endfor %}</td></tr>
<tr><th>Language</th><td>{{ b.subject.language or "not recorded" }}</td></tr>
</table>

<h2>Consent now</h2>
<table>
<tr><th>List</th><th>State</th><th>Since</th><th>Confirmed at</th><th>Proof kept until</th></tr>
{% for c in b.consent %}
<tr><td>{{ c.list_name or c.list }} <code>({{ c.list }})</code></td><td>{{ c.state }}</td><td>{{ c.since }}</td><td class="confirmed-at">{{ c.confirmed_at or "never" }}</td><td>{{ c.retain_until or "no retention limit set" }}</td></tr>
{% endfor %}
</table>

{% for p in b.proof %}
<h2>List {{ p.what.list_name or p.list }}</h2>
<table>
<tr><th>What was asked</th><td>{{ p.what.list_name }} — {{ p.what.purpose }} (list id <code>{{ p.list }}</code>)</td></tr>
<tr><th>Controller</th><td>{{ p.what.controller }}</td></tr>
<tr><th>Channel, legal basis</th><td>{{ p.what.channel }}; {{ p.what.legal_basis }}; double opt-in run by {{ p.what.doi_run_by }}</td></tr>
{% if p.asserted %}<tr><th>Asserted by the CRM</th><td>{{ p.asserted.at }} (event #{{ p.asserted.seq }}, record <code>{{ p.asserted.crm_record }}</code>) — an assertion is never consent</td></tr>{% endif %}
{% if p.signup %}<tr><th>Signup</th><td>{{ p.signup.at }} — {{ p.signup.kind }} by {{ p.signup.source }} (event #{{ p.signup.seq }}){% if p.signup.rule_file %}; rule <code>{{ p.signup.rule_file }}</code> sha256 <span class="hash">{{ p.signup.rule_hash }}</span>{% endif %}</td></tr>{% endif %}
{% if p.confirmation_mail %}<tr><th>Confirmation mail</th><td>sent {{ p.confirmation_mail.sent_at }}, Message-ID <code>{{ p.confirmation_mail.message_id }}</code>, text sha256 <span class="hash">{{ p.confirmation_mail.content_hash }}</span> ({{ "text stored below" if p.confirmation_mail.text_stored else "text not stored" }})</td></tr>{% endif %}
{% if p.confirmation %}
<tr><th>Confirmed</th><td id="confirmed-{{ p.list }}">{{ p.confirmation.at }} ({{ p.confirmation.kind }}, event #{{ p.confirmation.seq }})</td></tr>
<tr><th>How</th><td>HTTP {{ p.confirmation.method or "—" }} from IP <code>{{ p.confirmation.ip or "not recorded" }}</code>, user agent <code>{{ p.confirmation.user_agent or "not recorded" }}</code></td></tr>
<tr><th>Link</th><td>token <code>{{ p.confirmation.token_id or "—" }}</code> of mail <code>{{ p.confirmation.message_id or "—" }}</code>; page shown sha256 <span class="hash">{{ p.confirmation.page_content_hash or "—" }}</span></td></tr>
{% if p.confirmation.detail %}<tr><th>Note</th><td>{{ p.confirmation.detail }}</td></tr>{% endif %}
{% else %}
<tr><th>Confirmed</th><td>not confirmed</td></tr>
{% endif %}
<tr><th>Link fetches (not consent)</th><td>{% for f in p.link_fetches %}{{ f.at }} {{ f.method }} from <code>{{ f.ip }}</code>{% if not loop.last %}<br>{% endif %}{% else %}none{% endfor %}</td></tr>
<tr><th>Afterwards</th><td>{% for l in p.later %}{{ l.at }} {{ l.kind }} by {{ l.source }} (#{{ l.seq }}){% if not loop.last %}<br>{% endif %}{% else %}nothing{% endfor %}</td></tr>
<tr><th>State now</th><td>{{ p.state }}; proof kept until {{ p.retain_until or "no retention limit set" }}</td></tr>
</table>
{% endfor %}

<h2>Rules that acted</h2>
{% if b.rules %}
<table><tr><th>Rule file</th><th>SHA-256</th><th>Events</th></tr>
{% for r in b.rules %}<tr><td><code>{{ r.file }}</code></td><td class="hash">{{ r.sha256 }}</td><td>{% for s in r.events %}#{{ s }} {% endfor %}</td></tr>{% endfor %}
</table>
{% else %}<p>No rule proposed any of these events.</p>{% endif %}

<h2>Every event, with its evidence</h2>
{% for e in b.events %}
<div class="event">
<h3>#{{ e.seq }} {{ e.at }} — {{ e.kind }} on {{ e.list_id }}: {{ e.from_state }} → {{ e.to_state }} (by {{ e.source }})</h3>
<table>
{% for k, v in e.evidence|items %}<tr><th>{{ k }}</th><td><code>{{ v }}</code></td></tr>{% endfor %}
<tr><th>event hash</th><td class="hash">{{ e.hash }} {% if e.intact %}<span class="ok">matches its content</span>{% else %}<span class="bad">DOES NOT MATCH</span>{% endif %}</td></tr>
</table>
</div>
{% endfor %}

<h2>Texts shown</h2>
{% for hash, t in b.texts|items %}
<div class="event">
<h3>{{ t.kind }} [{{ t.language }}], first stored {{ t.first_stored_at }}</h3>
<p class="muted">sha256 <span class="hash">{{ hash }}</span>; template set {{ t.template_version }}</p>
{% if t.subject %}<p><strong>Subject:</strong> {{ t.subject }}</p>{% endif %}
{% if t.text %}<pre>{{ t.text }}</pre>{% endif %}
<p class="muted">HTML as shown (source):</p>
<pre>{{ t.html }}</pre>
</div>
{% else %}
<p>No text snapshot is referenced by these events.</p>
{% endfor %}

<h2>Ledger verification</h2>
<table>
<tr><th>Whole chain</th><td id="chain-result">{% if b.ledger.verified %}<span class="ok">verified</span>{% else %}<span class="bad">NOT verified</span>{% endif %}: {{ b.ledger.events_checked }} events, head #{{ b.ledger.head_seq }} <span class="hash">{{ b.ledger.head_hash }}</span></td></tr>
<tr><th>These events</th><td>{% if b.ledger.segment_intact %}<span class="ok">each matches its hash</span>{% else %}<span class="bad">an event does not match its hash</span>{% endif %}</td></tr>
<tr><th>How to check</th><td>{{ b.ledger.how_to_check }}</td></tr>
</table>
<table><tr><th>seq</th><th>previous hash</th><th>hash</th></tr>
{% for s in b.ledger.segment %}<tr><td>{{ s.seq }}</td><td class="hash">{{ s.prev_hash }}</td><td class="hash">{{ s.hash }}</td></tr>{% endfor %}
</table>
</body>
</html>
"#;

/// The bundle as one printable HTML page: inline CSS, no scripts, no external resources;
/// every value is HTML-escaped (minijinja auto-escape on an `.html` template).
pub fn proof_html(bundle: &Value) -> ExportResult<String> {
    let mut env = minijinja::Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Chainable);
    // Escape like the mail templates (`mail::html_escape`): minijinja's own escaper also
    // writes `/` as `&#x2f;`, which makes user agents and paths in the source unreadable.
    env.set_formatter(|out, state, value| {
        if state.auto_escape() == minijinja::AutoEscape::Html
            && !value.is_safe()
            && !value.is_none()
        {
            out.write_str(&crate::mail::html_escape(&value.to_string()))
                .map_err(minijinja::Error::from)
        } else {
            minijinja::escape_formatter(out, state, value)
        }
    });
    env.add_template("proof.html", PROOF_TEMPLATE)?;
    let tmpl = env.get_template("proof.html")?;
    Ok(tmpl.render(minijinja::context! { b => minijinja::Value::from_serialize(bundle) })?)
}

/// The person's data as a portable JSON document (schema [`SUBJECT_SCHEMA`]).
pub async fn subject_export(
    config: &LoadedConfig,
    store: &dyn Store,
    contact: &Contact,
    suppressed: bool,
    generated_at: DateTime<Utc>,
) -> ExportResult<Value> {
    let consents = store.consents_of_contact(&contact.id).await?;
    let events = store.events_of_contact(&contact.id).await?;
    let mut engagement = Vec::new();
    for list in &config.config.lists {
        if let Some(at) = store.last_engagement(&contact.id, &list.id).await? {
            engagement.push(json!({ "list": list.id, "last_open_or_click": at }));
        }
    }
    Ok(json!({
        "schema": SUBJECT_SCHEMA,
        "version": SUBJECT_VERSION,
        "generated_at": generated_at,
        "controller": config.config.sender.organisation,
        "contact": {
            "id": contact.id,
            "email": contact.email,
            "language": contact.language,
            "fields": contact.fields,
            "crm_records": record_texts(contact),
            "created_at": contact.created_at,
            "updated_at": contact.updated_at,
        },
        "consents": consents.iter().map(|(list, c)| json!({
            "list": list,
            "list_name": config.list(list).map(|l| l.name.clone()),
            "state": c.state,
            "since": c.since,
            "confirmed_at": c.confirmed_at,
            "doi_mails": c.doi_mails,
            "reminders_sent": c.reminders_sent,
        })).collect::<Vec<_>>(),
        "events": events.iter().map(|e| json!({
            "seq": e.seq,
            "at": e.at,
            "list": e.list_id,
            "kind": e.kind,
            "from_state": e.from_state,
            "to_state": e.to_state,
            "source": e.source,
            "evidence": serde_json::from_str::<Value>(&e.evidence).unwrap_or(Value::Null),
        })).collect::<Vec<_>>(),
        "engagement": engagement,
        "suppressed": suppressed,
    }))
}

/// A contact's CRM records as shown: their `Module/id` texts.
fn record_texts(contact: &Contact) -> Vec<String> {
    contact
        .crm_records
        .iter()
        .map(ToString::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_escapes_everything_and_loads_nothing() {
        let bundle = json!({
            "schema": PROOF_SCHEMA, "version": 1, "generated_at": "t", "generated_from": "x", "clock": "UTC",
            "subject": { "contact_id": "c1", "email": "<script>alert(1)</script>@example.org", "crm_records": ["Contacts/\"1\""] },
            "consent": [], "proof": [], "rules": [],
            "events": [{ "seq": 1, "at": "t", "list_id": "l", "kind": "k", "from_state": "a", "to_state": "b", "source": "web",
                         "evidence": { "user_agent": "<img src=http://evil.example/x>" }, "hash": "h", "intact": true }],
            "texts": { "abc": { "kind": "page:confirm", "language": "en", "html": "<html><script>x()</script></html>" } },
            "ledger": { "verified": true, "events_checked": 1, "head_seq": 1, "head_hash": "h", "segment": [], "segment_intact": true, "how_to_check": "" },
        });
        let html = proof_html(&bundle).expect("renders");
        assert!(!html.contains("<script"), "{html}");
        assert!(!html.contains("<img"), "{html}");
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;@example.org"));
        assert!(html.contains("&lt;img src=http:"));
        // No external resources at all: nothing fetched, nothing linked.
        for bad in ["src=\"", "href=", "<link", "@import", "url("] {
            assert!(!html.contains(bad), "{bad} in {html}");
        }
    }
}
