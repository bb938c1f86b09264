//! The consent ledger: append-only, hash-chained events with their evidence.
//!
//! Each event's `hash` is SHA-256 over its own fields and the previous event's hash, so editing
//! or deleting any stored event breaks the chain from that point; [`verify_chain`] names the
//! first event that does not match.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::consent::ConsentState;

/// What GDPR erasure leaves in place of an event's evidence. The event's hash covers a digest
/// of the evidence, not the text, so the chain still verifies after the text is gone.
pub const REDACTED_EVIDENCE: &str = r#"{"erased":true}"#;

fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// Hash that stands before the first event.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What an event proves. Serialised with a fixed field order; the stored JSON text is what the
/// chain hash covers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ip: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub user_agent: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub token_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub message_id: Option<String>,
    /// SHA-256 of the text the person was shown (mail or page).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub content_hash: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub rule_file: Option<String>,
    /// SHA-256 of the rule file that proposed the action.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub rule_hash: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reason: Option<String>,
    /// CRM record that carried the change (`Contacts/123`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub crm_record: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub detail: Option<String>,
    /// HTTP method of the request (`GET`, `HEAD`, `POST`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub method: Option<String>,
    /// Snapshot hash of the confirmation mail this event answers (its Message-ID is in
    /// `message_id`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub mail_content_hash: Option<String>,
    /// Token id of the unsubscribe link a mail carried: only links that were mailed are
    /// honoured (a leaked key alone cannot unsubscribe anyone). Absent on mails sent before
    /// it was recorded.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub unsubscribe_token_id: Option<String>,
    /// Id of the token key that signed a mail's links (it must stay configured, see
    /// `signing_keys`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub key_id: Option<String>,
    /// Token id of the preference-centre link a mail carried (honoured only if mailed).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub preferences_token_id: Option<String>,
    /// The page or form a website signup came from (its `Origin`, else its `Referer`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub origin: Option<String>,
    /// The hash of the form's text as the organisation's site declares it in its signup
    /// form (`form_text_hash`): the text the person saw on a page optinsync did not serve.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub form_text_hash: Option<String>,
}

impl Evidence {
    pub fn to_json(&self) -> String {
        // Serialising a struct of strings cannot fail.
        serde_json::to_string(self).unwrap_or_else(|_| String::from("{}"))
    }
}

/// Who caused a ledger event. Sealed, stored and hashed as the text of [`EventSource::as_str`]
/// (the serde names are the same), exactly the strings events were written with before this
/// type existed, so existing chains still verify.
///
/// There is no catch-all variant: stored events keep their source as the text they were sealed
/// with ([`LedgerEvent::source`]), and reading, verifying and exporting a ledger never parses
/// it, so old data needs none. What is parsed ([`std::str::FromStr`]) is refused with
/// [`UnknownSource`] if it names no variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventSource {
    /// A CRM page or webhook.
    #[serde(rename = "crm")]
    Crm,
    /// The campaigns tool's status feed (unsubscribes, bounces, its own DOI confirmations).
    #[serde(rename = "campaigns")]
    Campaigns,
    /// `import-existing`: members of an existing Campaigns list taken in as `asserted`.
    #[serde(rename = "campaigns-import")]
    CampaignsImport,
    /// A confirmation or unsubscribe link (or a fetch of one).
    #[serde(rename = "web")]
    Web,
    /// A rule's proposal.
    #[serde(rename = "rules")]
    Rules,
    /// Outbox delivery (`*_mail_sent`).
    #[serde(rename = "outbox")]
    Outbox,
    /// The mail transport refused the address for good (a hard bounce).
    #[serde(rename = "mail")]
    Mail,
    /// An operator's command (`erase`, ...).
    #[serde(rename = "cli")]
    Cli,
    /// The admin API (`POST /admin/erase`).
    #[serde(rename = "admin")]
    Admin,
    /// The `[retention]` purge.
    #[serde(rename = "retention")]
    Retention,
}

impl EventSource {
    pub const ALL: [EventSource; 10] = [
        Self::Crm,
        Self::Campaigns,
        Self::CampaignsImport,
        Self::Web,
        Self::Rules,
        Self::Outbox,
        Self::Mail,
        Self::Cli,
        Self::Admin,
        Self::Retention,
    ];

    /// The text sealed into the ledger (and covered by its hash).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Crm => "crm",
            Self::Campaigns => "campaigns",
            Self::CampaignsImport => "campaigns-import",
            Self::Web => "web",
            Self::Rules => "rules",
            Self::Outbox => "outbox",
            Self::Mail => "mail",
            Self::Cli => "cli",
            Self::Admin => "admin",
            Self::Retention => "retention",
        }
    }
}

impl std::fmt::Display for EventSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A source text that names no [`EventSource`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown ledger event source `{0}`")]
pub struct UnknownSource(pub String);

impl std::str::FromStr for EventSource {
    type Err = UnknownSource;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| UnknownSource(s.to_owned()))
    }
}

/// An event about to be appended; the store assigns `seq`, `prev_hash` and `hash`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    pub event_id: String,
    pub at: DateTime<Utc>,
    pub contact_id: String,
    pub list_id: String,
    pub kind: String,
    pub from_state: ConsentState,
    pub to_state: ConsentState,
    /// Who caused it.
    pub source: EventSource,
    pub evidence: Evidence,
}

impl NewEvent {
    /// Seal the event at position `seq` after `prev_hash`.
    pub fn seal(&self, seq: i64, prev_hash: &str) -> LedgerEvent {
        self.unsealed().seal(seq, prev_hash)
    }

    /// Everything of the stored event but its place in the chain: the text fields, the
    /// evidence JSON and its digest. Computed ahead, sealing is one digest more; a store
    /// with one writer seals a batch while it holds the chain's head.
    pub fn unsealed(&self) -> Unsealed {
        let evidence = self.evidence.to_json();
        Unsealed {
            event_id: self.event_id.clone(),
            at: format_time(self.at),
            contact_id: self.contact_id.clone(),
            list_id: self.list_id.clone(),
            kind: self.kind.clone(),
            from_state: self.from_state.as_str().to_owned(),
            to_state: self.to_state.as_str().to_owned(),
            source: self.source.as_str().to_owned(),
            evidence_sha256: sha256_hex(&evidence),
            evidence,
        }
    }
}

/// A [`NewEvent`] in its stored form but for `seq`, `prev_hash` and `hash`
/// ([`NewEvent::unsealed`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsealed {
    event_id: String,
    at: String,
    contact_id: String,
    list_id: String,
    kind: String,
    from_state: String,
    to_state: String,
    source: String,
    evidence: String,
    evidence_sha256: String,
}

impl Unsealed {
    /// Seal the event at position `seq` after `prev_hash`.
    pub fn seal(&self, seq: i64, prev_hash: &str) -> LedgerEvent {
        let mut ev = LedgerEvent {
            seq,
            event_id: self.event_id.clone(),
            at: self.at.clone(),
            contact_id: self.contact_id.clone(),
            list_id: self.list_id.clone(),
            kind: self.kind.clone(),
            from_state: self.from_state.clone(),
            to_state: self.to_state.clone(),
            source: self.source.clone(),
            evidence: self.evidence.clone(),
            evidence_sha256: Some(self.evidence_sha256.clone()),
            prev_hash: prev_hash.to_owned(),
            hash: String::new(),
        };
        ev.hash = ev.compute_hash();
        ev
    }
}

/// A stored event, exactly as in the database (all text, so the hash is reproducible).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEvent {
    pub seq: i64,
    pub event_id: String,
    pub at: String,
    pub contact_id: String,
    pub list_id: String,
    pub kind: String,
    pub from_state: String,
    pub to_state: String,
    /// [`EventSource::as_str`] of the source it was sealed with; kept as stored text because
    /// the hash covers exactly this text.
    pub source: String,
    /// Evidence JSON text ([`REDACTED_EVIDENCE`] after erasure).
    pub evidence: String,
    /// SHA-256 of the evidence as sealed. `None` only for events sealed before this field
    /// existed: their hash covers the evidence text itself, so they cannot be redacted.
    #[serde(default)]
    pub evidence_sha256: Option<String>,
    pub prev_hash: String,
    pub hash: String,
}

impl LedgerEvent {
    pub fn compute_hash(&self) -> String {
        let mut h = Sha256::new();
        // The evidence enters through its digest (so erasure can remove the text); events from
        // before the digest existed hash the text. JSON text never starts with `sha256:`.
        let evidence = match &self.evidence_sha256 {
            Some(d) => format!("sha256:{d}"),
            None => self.evidence.clone(),
        };
        // Length-prefix every field so no two different events serialise alike.
        for field in [
            self.seq.to_string().as_str(),
            &self.event_id,
            &self.at,
            &self.contact_id,
            &self.list_id,
            &self.kind,
            &self.from_state,
            &self.to_state,
            &self.source,
            &evidence,
            &self.prev_hash,
        ] {
            h.update((field.len() as u64).to_be_bytes());
            h.update(field.as_bytes());
        }
        hex::encode(h.finalize())
    }

    pub fn evidence(&self) -> Evidence {
        serde_json::from_str(&self.evidence).unwrap_or_default()
    }
}

pub fn format_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// Why the chain does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error(
        "ledger event seq {seq} (id {event_id}) was altered: its stored hash does not match its content"
    )]
    Altered { seq: i64, event_id: String },
    #[error(
        "ledger event seq {seq} (id {event_id}) does not follow the previous event: prev_hash mismatch (an event before it was edited or deleted)"
    )]
    Broken { seq: i64, event_id: String },
    #[error("ledger sequence gap: expected seq {expected}, found {found} (events deleted)")]
    Gap { expected: i64, found: i64 },
    #[error(
        "ledger event seq {seq} (id {event_id}) has its evidence removed, but contact {contact_id} was never erased"
    )]
    UnexplainedRedaction {
        seq: i64,
        event_id: String,
        contact_id: String,
    },
}

/// Incremental verifier: feed events in `seq` order.
#[derive(Debug, Clone)]
pub struct ChainVerifier {
    expected_seq: i64,
    prev_hash: String,
    pub checked: u64,
    /// First redacted event per contact, to be explained by an `erased` event.
    redacted: std::collections::BTreeMap<String, (i64, String)>,
    erased: std::collections::BTreeSet<String>,
}

impl Default for ChainVerifier {
    fn default() -> Self {
        Self {
            expected_seq: 1,
            prev_hash: GENESIS_HASH.to_owned(),
            checked: 0,
            redacted: Default::default(),
            erased: Default::default(),
        }
    }
}

impl ChainVerifier {
    pub fn check(&mut self, ev: &LedgerEvent) -> Result<(), ChainError> {
        if ev.seq != self.expected_seq {
            return Err(ChainError::Gap {
                expected: self.expected_seq,
                found: ev.seq,
            });
        }
        if ev.compute_hash() != ev.hash {
            return Err(ChainError::Altered {
                seq: ev.seq,
                event_id: ev.event_id.clone(),
            });
        }
        if ev.prev_hash != self.prev_hash {
            return Err(ChainError::Broken {
                seq: ev.seq,
                event_id: ev.event_id.clone(),
            });
        }
        if let Some(digest) = &ev.evidence_sha256 {
            if ev.evidence == REDACTED_EVIDENCE {
                self.redacted
                    .entry(ev.contact_id.clone())
                    .or_insert((ev.seq, ev.event_id.clone()));
            } else if sha256_hex(&ev.evidence) != *digest {
                return Err(ChainError::Altered {
                    seq: ev.seq,
                    event_id: ev.event_id.clone(),
                });
            }
        }
        if ev.kind == "erased" {
            self.erased.insert(ev.contact_id.clone());
        }
        self.prev_hash = ev.hash.clone();
        self.expected_seq += 1;
        self.checked += 1;
        Ok(())
    }
}

impl ChainVerifier {
    /// After the last event: every redacted event must belong to an erased contact.
    pub fn finish(&self) -> Result<u64, ChainError> {
        for (contact_id, (seq, event_id)) in &self.redacted {
            if !self.erased.contains(contact_id) {
                return Err(ChainError::UnexplainedRedaction {
                    seq: *seq,
                    event_id: event_id.clone(),
                    contact_id: contact_id.clone(),
                });
            }
        }
        Ok(self.checked)
    }
}

/// Verify a whole chain held in memory.
pub fn verify_chain<'a>(
    events: impl IntoIterator<Item = &'a LedgerEvent>,
) -> Result<u64, ChainError> {
    let mut v = ChainVerifier::default();
    for ev in events {
        v.check(ev)?;
    }
    v.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: usize) -> Vec<LedgerEvent> {
        let mut prev = GENESIS_HASH.to_owned();
        (0..n)
            .map(|i| {
                let ev = NewEvent {
                    event_id: format!("e{i}"),
                    at: Utc::now(),
                    contact_id: "c1".into(),
                    list_id: "news".into(),
                    kind: "asserted".into(),
                    from_state: ConsentState::None,
                    to_state: ConsentState::Asserted,
                    source: EventSource::Crm,
                    evidence: Evidence {
                        reason: Some(format!("r{i}")),
                        ..Evidence::default()
                    },
                }
                .seal(i as i64 + 1, &prev);
                prev = ev.hash.clone();
                ev
            })
            .collect()
    }

    /// The texts (and so the hashes) are those events were sealed with before the enum.
    #[test]
    fn sources_seal_as_their_old_texts() {
        let texts: Vec<&str> = EventSource::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            texts,
            [
                "crm",
                "campaigns",
                "campaigns-import",
                "web",
                "rules",
                "outbox",
                "mail",
                "cli",
                "admin",
                "retention"
            ]
        );
        for s in EventSource::ALL {
            assert_eq!(
                serde_json::to_value(s).ok(),
                Some(serde_json::Value::String(s.as_str().to_owned()))
            );
            assert_eq!(s.as_str().parse::<EventSource>(), Ok(s));
        }
        assert_eq!(
            "other".parse::<EventSource>(),
            Err(UnknownSource("other".into()))
        );
        // The hash of this event as the string-typed code sealed it (computed independently).
        let at = DateTime::parse_from_rfc3339("2024-01-01T00:00:00Z")
            .map(|t| t.with_timezone(&Utc))
            .expect("a valid time");
        let ev = NewEvent {
            event_id: "e0".into(),
            at,
            contact_id: "c1".into(),
            list_id: "news".into(),
            kind: "asserted".into(),
            from_state: ConsentState::None,
            to_state: ConsentState::Asserted,
            source: EventSource::CampaignsImport,
            evidence: Evidence {
                reason: Some("r".into()),
                ..Evidence::default()
            },
        }
        .seal(1, GENESIS_HASH);
        assert_eq!(ev.source, "campaigns-import");
        assert_eq!(
            ev.hash,
            "01beb8fa9b9334fabeac0baf4516add9a1d7c23d3f28dd4fd9741109f1a9224b"
        );
    }

    #[test]
    fn intact_chain_verifies() {
        assert_eq!(verify_chain(&chain(5)), Ok(5));
    }

    #[test]
    fn edit_is_detected_and_named() {
        let mut c = chain(5);
        c[2].evidence = r#"{"reason":"forged"}"#.into();
        assert_eq!(
            verify_chain(&c),
            Err(ChainError::Altered {
                seq: 3,
                event_id: "e2".into()
            })
        );
    }

    #[test]
    fn rehashed_edit_breaks_the_next_link() {
        let mut c = chain(5);
        c[2].to_state = "confirmed".into();
        c[2].hash = c[2].compute_hash();
        assert_eq!(
            verify_chain(&c),
            Err(ChainError::Broken {
                seq: 4,
                event_id: "e3".into()
            })
        );
    }

    #[test]
    fn deletion_is_detected() {
        let mut c = chain(5);
        c.remove(1);
        assert_eq!(
            verify_chain(&c),
            Err(ChainError::Gap {
                expected: 2,
                found: 3
            })
        );
    }

    #[test]
    fn redaction_keeps_the_chain_only_for_erased_contacts() {
        let mut c = chain(4);
        c[1].evidence = REDACTED_EVIDENCE.into();
        assert_eq!(
            verify_chain(&c),
            Err(ChainError::UnexplainedRedaction {
                seq: 2,
                event_id: "e1".into(),
                contact_id: "c1".into()
            }),
            "removing evidence without an erasure is tampering"
        );
        let erased = NewEvent {
            event_id: "e-erase".into(),
            at: Utc::now(),
            contact_id: "c1".into(),
            list_id: "news".into(),
            kind: "erased".into(),
            from_state: ConsentState::Asserted,
            to_state: ConsentState::Erased,
            source: EventSource::Cli,
            evidence: Evidence::default(),
        }
        .seal(5, &c[3].hash);
        c.push(erased);
        assert_eq!(verify_chain(&c), Ok(5));
    }

    #[test]
    fn legacy_events_hash_their_evidence_text() {
        let mut c = chain(2);
        // An event sealed before evidence digests existed.
        c[0].evidence_sha256 = None;
        c[0].hash = c[0].compute_hash();
        c[1].prev_hash = c[0].hash.clone();
        c[1].hash = c[1].compute_hash();
        assert_eq!(verify_chain(&c), Ok(2));
        c[0].evidence = r#"{"reason":"forged"}"#.into();
        assert!(matches!(
            verify_chain(&c),
            Err(ChainError::Altered { seq: 1, .. })
        ));
    }
}
