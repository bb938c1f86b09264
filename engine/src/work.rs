//! What an outbox row asks for, typed: [`OutboxWork`], and the connector that carries it out,
//! [`ConnectorRole`].
//!
//! The store keeps a row's work as a `kind` column and a JSON `payload` (the shape existing
//! databases hold); [`OutboxWork::to_stored`] and [`OutboxWork::from_stored`] convert at the
//! store boundary, so the rest of the engine matches on variants, never on strings. A row
//! whose kind or payload cannot be read (written by another version, or damaged) comes back
//! as [`StoredWork::Unreadable`]: the outbox turns it into a dead letter naming the reason.

use serde::{Deserialize, Serialize};

use optinsync_plugin_api::RecordRef;

use crate::consent::{ConsentState, MailKind};

/// The connectors outbox work is delivered through; each has its own circuit breaker. The
/// plugin API's role: one connector per role.
pub use optinsync_plugin_api::Role as ConnectorRole;

/// The mail kind of rows written before the payload named it.
fn doi() -> MailKind {
    MailKind::Doi
}

/// One effect to deliver. Serialised adjacently tagged: the tag is the row's `kind` column,
/// the content its `payload` (see [`OutboxWork::to_stored`]).
///
/// Erasure scrubs the payload of finished rows to `{}`, and such a row may come back (a dead
/// letter queued again), so every field a scrubbed row lacks has a default that delivers
/// nothing wrong: an empty token matches no signup (the row is skipped), a removal without
/// an address is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "payload", rename_all = "snake_case")]
pub enum OutboxWork {
    /// DOI, reminder or re-permission mail for the signup `token`.
    Mail {
        #[serde(default)]
        token: String,
        #[serde(default = "doi")]
        mail: MailKind,
        /// Started by the rules (part of a wave), not asked for by the person: held while
        /// the list's waves are paused ([`crate::waves`]). Rows written before waves existed
        /// read as not held.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        wave: bool,
    },
    /// Put the (confirmed) contact on the Campaigns list.
    CampaignsSubscribe {},
    /// Ask the campaigns tool to run its own double opt-in for the signup `token`.
    CampaignsRequestDoi {
        #[serde(default)]
        token: String,
    },
    /// Take the address off the Campaigns list. It travels with the row, so the removal
    /// still works after the contact was erased.
    CampaignsRemove {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        email: Option<String>,
    },
    /// Tell the CRM the consent state.
    CrmWriteBack {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        state: Option<ConsentState>,
        #[serde(default)]
        opt_out: bool,
        /// CRM records carried by an erasure's write-back (stored as `Module/id`): by
        /// delivery time the contact holds none.
        #[serde(
            default,
            skip_serializing_if = "Option::is_none",
            with = "optinsync_plugin_api::record_ref_text::option"
        )]
        records: Option<Vec<RecordRef>>,
        /// The address carried by an erasure's write-back.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        email: Option<String>,
    },
    /// Create the person of a website signup in the CRM (or update the record with their
    /// address); the record it answers is kept on the contact for later write-backs.
    CrmUpsert {},
    /// A mail with a preference-centre link the person asked for (`GET /preferences`).
    PreferencesLinkMail {},
}

impl OutboxWork {
    /// Every stored `kind` (one per variant), for gauges that report each kind, zero included.
    pub const KINDS: [&'static str; 7] = [
        "mail",
        "campaigns_subscribe",
        "campaigns_request_doi",
        "campaigns_remove",
        "crm_write_back",
        "crm_upsert",
        "preferences_link_mail",
    ];

    /// The stored `kind`; bounded, so also the metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Mail { .. } => "mail",
            Self::CampaignsSubscribe {} => "campaigns_subscribe",
            Self::CampaignsRequestDoi { .. } => "campaigns_request_doi",
            Self::CampaignsRemove { .. } => "campaigns_remove",
            Self::CrmWriteBack { .. } => "crm_write_back",
            Self::CrmUpsert {} => "crm_upsert",
            Self::PreferencesLinkMail {} => "preferences_link_mail",
        }
    }

    /// The stored kinds a connector delivers (its delivery lane).
    pub fn kinds_of(role: ConnectorRole) -> &'static [&'static str] {
        match role {
            ConnectorRole::Mail => &["mail", "preferences_link_mail"],
            ConnectorRole::Campaigns => &[
                "campaigns_subscribe",
                "campaigns_request_doi",
                "campaigns_remove",
            ],
            ConnectorRole::Crm => &["crm_write_back", "crm_upsert"],
        }
    }

    /// The connector that delivers this work.
    pub fn connector(&self) -> ConnectorRole {
        match self {
            Self::Mail { .. } | Self::PreferencesLinkMail {} => ConnectorRole::Mail,
            Self::CampaignsSubscribe {}
            | Self::CampaignsRequestDoi { .. }
            | Self::CampaignsRemove { .. } => ConnectorRole::Campaigns,
            Self::CrmWriteBack { .. } | Self::CrmUpsert {} => ConnectorRole::Crm,
        }
    }

    /// `(kind, payload)` as the store keeps them.
    pub fn to_stored(&self) -> (&'static str, serde_json::Value) {
        // Serialising plain strings, bools and enums cannot fail; `{}` keeps the row
        // readable (as a scrubbed one) should it ever.
        let payload = match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(mut m)) => m.remove("payload"),
            _ => None,
        };
        (
            self.kind(),
            payload.unwrap_or_else(|| serde_json::json!({})),
        )
    }

    /// The work of a stored row (the inverse of [`Self::to_stored`]).
    pub fn from_stored(kind: &str, payload: serde_json::Value) -> Result<Self, UnreadableWork> {
        let tagged = serde_json::json!({ "kind": kind, "payload": payload });
        serde_json::from_value(tagged).map_err(|e| UnreadableWork {
            kind: kind.to_owned(),
            payload,
            reason: e.to_string(),
        })
    }
}

/// A stored row whose work this version cannot read: an unknown kind or a payload of the
/// wrong shape. Kept as stored, so listing dead letters still shows it.
#[derive(Debug, Clone, PartialEq, Serialize, thiserror::Error)]
#[error("unreadable outbox work of kind `{kind}`: {reason}")]
pub struct UnreadableWork {
    pub kind: String,
    pub payload: serde_json::Value,
    #[serde(skip)]
    pub reason: String,
}

/// An outbox row's work as read from the store. Serialises as the stored `kind` and
/// `payload` either way.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum StoredWork {
    Known(OutboxWork),
    Unreadable(UnreadableWork),
}

impl StoredWork {
    /// The work of a row's `kind` and `payload` text.
    pub fn read(kind: &str, payload: &str) -> Self {
        let parsed = match serde_json::from_str(payload) {
            Ok(v) => OutboxWork::from_stored(kind, v),
            Err(e) => Err(UnreadableWork {
                kind: kind.to_owned(),
                payload: serde_json::Value::String(payload.to_owned()),
                reason: format!("payload is not JSON: {e}"),
            }),
        };
        match parsed {
            Ok(w) => Self::Known(w),
            Err(u) => Self::Unreadable(u),
        }
    }

    /// The stored `kind`.
    pub fn kind(&self) -> &str {
        match self {
            Self::Known(w) => w.kind(),
            Self::Unreadable(u) => &u.kind,
        }
    }

    pub fn known(&self) -> Option<&OutboxWork> {
        match self {
            Self::Known(w) => Some(w),
            Self::Unreadable(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// `KINDS` names each variant's kind once.
    #[test]
    fn kinds_lists_every_variant() {
        let all = [
            OutboxWork::Mail {
                token: String::new(),
                mail: MailKind::Doi,
                wave: false,
            },
            OutboxWork::CampaignsSubscribe {},
            OutboxWork::CampaignsRequestDoi {
                token: String::new(),
            },
            OutboxWork::CampaignsRemove { email: None },
            OutboxWork::CrmWriteBack {
                state: None,
                opt_out: false,
                records: None,
                email: None,
            },
            OutboxWork::CrmUpsert {},
            OutboxWork::PreferencesLinkMail {},
        ];
        // A new variant does not compile here until it has a place, and then needs a sample
        // above: the samples cover every variant.
        let place = |w: &OutboxWork| match w {
            OutboxWork::Mail { .. } => 0,
            OutboxWork::CampaignsSubscribe {} => 1,
            OutboxWork::CampaignsRequestDoi { .. } => 2,
            OutboxWork::CampaignsRemove { .. } => 3,
            OutboxWork::CrmWriteBack { .. } => 4,
            OutboxWork::CrmUpsert {} => 5,
            OutboxWork::PreferencesLinkMail {} => 6,
        };
        let places: Vec<usize> = all.iter().map(place).collect();
        assert_eq!(places, (0..OutboxWork::KINDS.len()).collect::<Vec<_>>());
        let kinds: Vec<&str> = all.iter().map(OutboxWork::kind).collect();
        assert_eq!(kinds, OutboxWork::KINDS);
        // Each kind is in its own connector's delivery lane and in no other.
        for work in &all {
            for role in ConnectorRole::ALL {
                assert_eq!(
                    OutboxWork::kinds_of(role).contains(&work.kind()),
                    role == work.connector(),
                    "{} in the {} lane",
                    work.kind(),
                    role.as_str()
                );
            }
        }
    }

    /// The stored shapes are those rows were written in before the enum existed.
    #[test]
    fn stored_shapes_are_unchanged() {
        let cases = [
            (
                OutboxWork::Mail {
                    token: "t1".into(),
                    mail: MailKind::Reminder,
                    wave: false,
                },
                "mail",
                json!({ "token": "t1", "mail": "reminder" }),
            ),
            (
                OutboxWork::CampaignsSubscribe {},
                "campaigns_subscribe",
                json!({}),
            ),
            (
                OutboxWork::CampaignsRequestDoi { token: "t2".into() },
                "campaigns_request_doi",
                json!({ "token": "t2" }),
            ),
            (
                OutboxWork::CampaignsRemove {
                    email: Some("a@example.org".into()),
                },
                "campaigns_remove",
                json!({ "email": "a@example.org" }),
            ),
            (
                OutboxWork::CrmWriteBack {
                    state: Some(ConsentState::Withdrawn),
                    opt_out: true,
                    records: None,
                    email: None,
                },
                "crm_write_back",
                json!({ "state": "withdrawn", "opt_out": true }),
            ),
            (
                OutboxWork::CrmWriteBack {
                    state: Some(ConsentState::Erased),
                    opt_out: true,
                    records: Some(vec![RecordRef {
                        module: "Leads".into(),
                        id: "1".into(),
                    }]),
                    email: Some("a@example.org".into()),
                },
                "crm_write_back",
                json!({ "state": "erased", "opt_out": true, "records": ["Leads/1"], "email": "a@example.org" }),
            ),
        ];
        for (work, kind, payload) in cases {
            assert_eq!(work.to_stored(), (kind, payload.clone()));
            assert_eq!(OutboxWork::from_stored(kind, payload), Ok(work));
        }
    }

    #[test]
    fn old_and_scrubbed_payloads_read_with_defaults() {
        assert_eq!(
            OutboxWork::from_stored("mail", json!({ "token": "t" })),
            Ok(OutboxWork::Mail {
                token: "t".into(),
                mail: MailKind::Doi,
                wave: false,
            })
        );
        assert_eq!(
            OutboxWork::from_stored("mail", json!({})),
            Ok(OutboxWork::Mail {
                token: String::new(),
                mail: MailKind::Doi,
                wave: false,
            })
        );
        assert_eq!(
            OutboxWork::from_stored("campaigns_remove", json!({})),
            Ok(OutboxWork::CampaignsRemove { email: None })
        );
        assert_eq!(
            OutboxWork::from_stored("crm_write_back", json!({ "records": null })),
            Ok(OutboxWork::CrmWriteBack {
                state: None,
                opt_out: false,
                records: None,
                email: None
            })
        );
    }

    #[test]
    fn unknown_kinds_and_bad_payloads_are_unreadable_not_panics() {
        let w = StoredWork::read("fax", r#"{"n":1}"#);
        assert_eq!(w.kind(), "fax");
        assert!(w.known().is_none());
        let StoredWork::Unreadable(u) = &w else {
            panic!("{w:?}")
        };
        assert!(u.to_string().contains("`fax`"), "{u}");
        assert!(
            StoredWork::read("mail", r#"{"mail":"postcard"}"#)
                .known()
                .is_none()
        );
        assert!(StoredWork::read("mail", r#""text""#).known().is_none());
        assert!(StoredWork::read("mail", "{not json").known().is_none());
        // Listing shows the row as stored.
        assert_eq!(
            serde_json::to_value(&w).ok(),
            Some(json!({ "kind": "fax", "payload": { "n": 1 } }))
        );
        assert_eq!(
            serde_json::to_value(StoredWork::Known(OutboxWork::CampaignsSubscribe {})).ok(),
            Some(json!({ "kind": "campaigns_subscribe", "payload": {} }))
        );
    }

    #[test]
    fn work_names_its_connector() {
        let mail = OutboxWork::Mail {
            token: String::new(),
            mail: MailKind::Doi,
            wave: false,
        };
        assert_eq!(mail.connector(), ConnectorRole::Mail);
        assert_eq!(
            OutboxWork::CampaignsRemove { email: None }.connector(),
            ConnectorRole::Campaigns
        );
        assert_eq!(
            OutboxWork::CampaignsSubscribe {}.connector(),
            ConnectorRole::Campaigns
        );
        assert_eq!(
            OutboxWork::CampaignsRequestDoi {
                token: String::new()
            }
            .connector(),
            ConnectorRole::Campaigns
        );
        assert_eq!(
            OutboxWork::CrmWriteBack {
                state: None,
                opt_out: false,
                records: None,
                email: None
            }
            .connector(),
            ConnectorRole::Crm
        );
    }
}
