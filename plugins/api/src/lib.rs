//! Connector traits and the serde wire types they exchange with the optinsync engine.
//!
//! # Boundary
//!
//! This crate holds **types and traits only**: it performs no I/O, opens no sockets or files,
//! and depends on no runtime. A connector crate implements [`CrmConnector`],
//! [`CampaignsConnector`] or [`MailTransport`] (each on top of [`Connector`]) and exports a
//! [`ConnectorFactory`] per `kind`; the binary lists the factories, and the engine builds the
//! configured ones and drives them. Every type a call carries is `serde`, and the
//! out-of-process connector protocol (`docs/connector-protocol.md`) carries exactly these
//! forms; the one exception is [`ReadyMessage`], a mail transport's in-process work ahead
//! of a send, whose default needs no protocol call.
//!
//! Consent is never decided here. A connector reports what an outside system says
//! (a CRM field, an unsubscribe inside the Campaigns tool); the engine's state machine decides
//! what that means.

mod campaigns;
mod consent;
mod error;
mod factory;
mod mail;
mod records;
mod shared;
mod traits;
mod webhook;

pub use campaigns::{
    BatchResult, ConsentProof, Keyed, MemberPage, StatusEvent, StatusKind, StatusPage, Subscriber,
    all_items, per_item,
};
pub use consent::{ConsentState, UnknownState};
pub use error::{BounceClass, ConnectorError, ConnectorResult, FailureScope, SettingsError};
pub use factory::{
    BuildContext, Built, ConnectorFactory, HttpDefaults, Role, Settings, parse_duration,
};
pub use mail::{OutgoingMessage, ReadyMessage, SentMessage, WireMessage};
pub use records::{
    ChangePage, ConsentWriteBack, CrmRecord, Cursor, InvalidRecord, InvalidRecordRef, NewContact,
    RecordRef, record_ref_text,
};
pub use shared::{QuotaLedger, QuotaSlot, QuotaWindow, SharedMarks};
pub use traits::{CampaignsConnector, Connector, CrmConnector, Health, MailTransport};
pub use webhook::{HttpMethod, WebhookEvent, WebhookRequest};

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use serde::{Deserialize, Serialize};

    use super::*;

    #[test]
    fn connector_errors_round_trip_as_tagged_json() {
        let errors = [
            ConnectorError::Transient {
                message: "429".into(),
                retry_after: Some(Duration::from_millis(1500)),
                scope: FailureScope::Record,
            },
            ConnectorError::transient("connection reset"),
            ConnectorError::Permanent {
                message: "no such list".into(),
            },
            ConnectorError::rejected("550 5.1.1"),
            ConnectorError::bounced(BounceClass::Policy, "554 5.7.1 blocked"),
            ConnectorError::Config {
                setting: "api_key".into(),
                message: "missing".into(),
            },
            ConnectorError::InvalidInput {
                message: "not JSON".into(),
            },
        ];
        for e in errors {
            let json = serde_json::to_string(&e).expect("serialises");
            let back: ConnectorError = serde_json::from_str(&json).expect("parses");
            assert_eq!(back, e, "{json}");
        }
        let json = serde_json::to_value(ConnectorError::Transient {
            message: "slow down".into(),
            retry_after: Some(Duration::from_secs(2)),
            scope: FailureScope::Service,
        })
        .expect("serialises");
        assert_eq!(
            json,
            serde_json::json!({"kind": "transient", "message": "slow down",
                               "retry_after_ms": 2000, "scope": "service"})
        );
    }

    #[test]
    fn a_connector_error_from_outside_is_read_strictly() {
        // Scope and wait may be left out: a service-wide failure without a named wait.
        let e: ConnectorError =
            serde_json::from_str(r#"{"kind": "transient", "message": "x"}"#).expect("parses");
        assert_eq!(e, ConnectorError::transient("x"));
        // A rejection without a class is a hard bounce (as before classes existed).
        let e: ConnectorError =
            serde_json::from_str(r#"{"kind": "rejected", "message": "550 5.1.1"}"#)
                .expect("parses");
        assert_eq!(e, ConnectorError::rejected("550 5.1.1"));
        let e: ConnectorError = serde_json::from_str(
            r#"{"kind": "rejected", "message": "552 5.2.2 full", "class": "soft"}"#,
        )
        .expect("parses");
        assert_eq!(
            e,
            ConnectorError::bounced(BounceClass::Soft, "552 5.2.2 full")
        );
        for bad in [
            r#"{"kind": "rejected", "message": "x", "class": "bad"}"#,
            r#"{"kind": "fatal", "message": "x"}"#,
            r#"{"kind": "permanent"}"#,
            r#"{"kind": "permanent", "message": "x", "extra": 1}"#,
            r#"{"message": "x"}"#,
        ] {
            assert!(
                serde_json::from_str::<ConnectorError>(bad).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn record_refs_parse_their_text_form_once() {
        let r: RecordRef = "Contacts/4150868000000624001".parse().expect("valid");
        assert_eq!(
            (r.module.as_str(), r.id.as_str()),
            ("Contacts", "4150868000000624001")
        );
        assert_eq!(r.to_string(), "Contacts/4150868000000624001");
        // Split at the first `/`, as the string-typed code did: an id may hold one.
        let odd: RecordRef = "Leads/a/b".parse().expect("valid");
        assert_eq!((odd.module.as_str(), odd.id.as_str()), ("Leads", "a/b"));
        assert_eq!(odd.to_string(), "Leads/a/b");
        for bad in ["", "Contacts", "/1", "Contacts/"] {
            assert_eq!(
                bad.parse::<RecordRef>(),
                Err(InvalidRecordRef(bad.to_owned()))
            );
        }
        assert!(r == "Contacts/4150868000000624001" && r != "Contacts/1");
    }

    #[test]
    fn text_serde_keeps_the_stored_strings() {
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct Row {
            #[serde(with = "record_ref_text")]
            records: Vec<RecordRef>,
            #[serde(default, with = "record_ref_text::option")]
            carried: Option<Vec<RecordRef>>,
        }
        let json = serde_json::json!({ "records": ["Contacts/1", "Leads/2"], "carried": null });
        let row: Row = serde_json::from_value(json.clone()).expect("reads");
        assert_eq!(row.records, ["Contacts/1", "Leads/2"]);
        assert_eq!(serde_json::to_value(&row).ok(), Some(json));
        assert!(serde_json::from_value::<Row>(serde_json::json!({ "records": ["nope"] })).is_err());
    }

    #[test]
    fn settings_errors_name_the_key_also_for_unknown_and_missing_ones() {
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Inner {
            id: String,
        }
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct S {
            path: String,
            #[serde(default)]
            batch: u32,
            #[serde(default)]
            lists: BTreeMap<String, Inner>,
        }
        let settings = |v: serde_json::Value| match v {
            serde_json::Value::Object(m) => Settings::new(m),
            _ => unreachable!("a table"),
        };
        let key = |v| settings(v).parse::<S>().expect_err("refused").key;
        use serde_json::json;
        assert_eq!(key(json!({"path": "a", "pth": 1})).as_deref(), Some("pth"));
        assert_eq!(key(json!({})).as_deref(), Some("path"));
        assert_eq!(
            key(json!({"path": "a", "batch": "x"})).as_deref(),
            Some("batch")
        );
        assert_eq!(
            key(json!({"path": "a", "lists": {"news": {"id": "1", "x": 2}}})).as_deref(),
            Some("lists.news.x")
        );
        assert_eq!(
            key(json!({"path": "a", "lists": {"news": {"id": 3}}})).as_deref(),
            Some("lists.news.id")
        );
        let e = SettingsError::invalid("path", "must not be empty");
        assert_eq!(e.to_string(), "setting `path`: must not be empty");
        assert!(Settings::from_serialize(&3).is_err());
        assert!(settings(json!({"path": "a"})).parse::<S>().is_ok());
    }

    #[test]
    fn webhook_wire_forms_are_tagged_and_requests_read_their_query() {
        let ev = WebhookEvent::Changed {
            records: vec!["Contacts/1".parse().expect("valid")],
        };
        assert_eq!(
            serde_json::to_value(&ev).expect("json"),
            serde_json::json!({"kind": "changed", "records": [{"module": "Contacts", "id": "1"}]})
        );
        let back: WebhookEvent = serde_json::from_str(r#"{"kind": "ignored"}"#).expect("parses");
        assert_eq!(back, WebhookEvent::Ignored);
        let req = WebhookRequest {
            method: HttpMethod::Get,
            path: "/webhooks/campaigns".into(),
            query: "secret=a%2Bb+c&secret=second&x".into(),
            headers: vec![("x-sig".into(), "1".into())],
            body: String::new(),
            peer: None,
        };
        assert_eq!(req.query_param("secret").as_deref(), Some("a+b c"));
        assert_eq!(req.query_param("x").as_deref(), Some(""));
        assert_eq!(req.query_param("y"), None);
        assert_eq!(req.header("X-Sig"), Some("1"));
        let json = serde_json::to_value(&req).expect("json");
        assert_eq!(json["method"], "GET");
    }

    #[test]
    fn batch_answers_are_spread_over_their_items() {
        assert_eq!(
            per_item(2, Ok(vec![Ok(()), Err(ConnectorError::permanent("x"))])).len(),
            2
        );
        let whole = per_item(3, Err(ConnectorError::transient("down")));
        assert!(
            whole
                .iter()
                .all(|r| r == &Err(ConnectorError::transient("down")))
        );
        // A connector that answers for the wrong number of items has nothing taken as done.
        let wrong = per_item(2, Ok(vec![Ok(())]));
        assert!(
            wrong
                .iter()
                .all(|r| matches!(r, Err(ConnectorError::Transient { .. })))
        );
        assert_eq!(all_items(2, Ok(())), Ok(vec![Ok(()), Ok(())]));
    }

    #[test]
    fn durations_read_every_unit_and_name_the_setting() {
        let d = |t| parse_duration("timeout", t);
        assert_eq!(d("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(d(" 30 "), Ok(Duration::from_secs(30)));
        assert_eq!(d("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(d("2h"), Ok(Duration::from_secs(7_200)));
        assert_eq!(d("1d"), Ok(Duration::from_secs(86_400)));
        assert_eq!(d("1w"), Ok(Duration::from_secs(604_800)));
        for bad in ["", "m", "5y", "-1s"] {
            assert_eq!(
                d(bad).map_err(|e| e.key),
                Err(Some("timeout".into())),
                "{bad}"
            );
        }
    }

    #[test]
    fn consent_states_read_back_their_names() {
        for s in ConsentState::ALL {
            assert_eq!(s.as_str().parse::<ConsentState>().ok(), Some(s));
            assert_eq!(
                serde_json::to_value(s).expect("json"),
                serde_json::Value::String(s.as_str().into())
            );
        }
        assert!("subscribed".parse::<ConsentState>().is_err());
    }
}
