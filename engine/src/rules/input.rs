//! The maps a rule script receives. Built here, in one place, for the daemon, the table tests
//! and the simulator alike, so a test sees exactly what production sees.

use std::sync::OnceLock;

use chrono::{DateTime, Utc};
use rhai::{Dynamic, ImmutableString, Map};

use crate::config::{DoiMode, ListConfig};
use crate::consent::{Consent, ConsentState};
use crate::store::Contact;

fn unix(t: DateTime<Utc>) -> i64 {
    t.timestamp()
}

fn secs_since(now: DateTime<Utc>, t: DateTime<Utc>) -> i64 {
    (now - t).num_seconds().max(0)
}

fn opt(v: Option<i64>) -> Dynamic {
    v.map(Dynamic::from).unwrap_or(Dynamic::UNIT)
}

/// The keys of `contact`; every map has all of them (rules read unknown keys as an error).
pub(crate) const CONTACT_KEYS: [&str; 5] =
    ["id", "language", "email_domain", "fields", "crm_records"];

/// The keys of `ctx`.
pub(crate) const CTX_KEYS: [&str; 2] = ["now", "list"];

/// The keys of `ctx.list`.
pub(crate) const LIST_KEYS: [&str; 9] = [
    "id",
    "name",
    "description",
    "doi",
    "reminder_after",
    "pending_expiry",
    "max_reminders",
    "inactivity",
    "revalidation_grace",
];

/// `contact`: no raw address (rules may print), only its domain.
pub fn contact_map(c: &Contact) -> Map {
    let mut m = Map::new();
    m.insert("id".into(), c.id.clone().into());
    m.insert(
        "language".into(),
        c.language
            .clone()
            .map(Dynamic::from)
            .unwrap_or(Dynamic::UNIT),
    );
    let domain = c
        .email
        .rsplit_once('@')
        .map(|(_, d)| d.to_owned())
        .unwrap_or_default();
    m.insert("email_domain".into(), domain.into());
    m.insert(
        "fields".into(),
        Dynamic::from_map(
            c.fields
                .iter()
                .map(|(k, v)| (k.as_str().into(), json(v)))
                .collect(),
        ),
    );
    m.insert(
        "crm_records".into(),
        c.crm_records
            .iter()
            .map(|r| Dynamic::from(r.to_string()))
            .collect::<rhai::Array>()
            .into(),
    );
    m
}

/// A CRM field value as Rhai sees it: what `rhai::serde::to_dynamic` gives (tested), without
/// the trip through serde.
fn json(v: &serde_json::Value) -> Dynamic {
    use serde_json::Value;
    match v {
        Value::Null => Dynamic::UNIT,
        Value::Bool(b) => (*b).into(),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => i.into(),
            (None, Some(f)) => f.into(),
            (None, None) => Dynamic::UNIT,
        },
        Value::String(s) => s.as_str().into(),
        Value::Array(a) => Dynamic::from_array(a.iter().map(json).collect()),
        Value::Object(o) => Dynamic::from_map(
            o.iter()
                .map(|(k, v)| (k.as_str().into(), json(v)))
                .collect(),
        ),
    }
}

/// The state's name as a shared Rhai string, made once per state: no allocation per call.
fn state_name(state: ConsentState) -> Dynamic {
    static NAMES: OnceLock<Vec<(ConsentState, ImmutableString)>> = OnceLock::new();
    NAMES
        .get_or_init(|| {
            ConsentState::ALL
                .into_iter()
                .map(|s| (s, s.as_str().into()))
                .collect()
        })
        .iter()
        .find(|(s, _)| *s == state)
        .map(|(_, name)| name.clone().into())
        .unwrap_or_else(|| state.as_str().into())
}

/// The keys of `consent`.
pub(crate) const CONSENT_KEYS: [&str; 10] = [
    "state",
    "since",
    "age",
    "doi_mails",
    "reminders_sent",
    "confirmed_at",
    "confirmed_age",
    "last_engagement",
    "engagement_age",
    "inactive_for",
];

/// `consent`: the state, its age, counters, and the signs of life the inactivity rule needs.
/// Ages are seconds; a missing time is `()`.
pub fn consent_map(c: &Consent, last_engagement: Option<DateTime<Utc>>, now: DateTime<Utc>) -> Map {
    // Built per decision, so it is a copy of a map made once, filled in place: cheaper than
    // inserting (and searching for) each key.
    static TEMPLATE: OnceLock<Map> = OnceLock::new();
    // Seconds since the latest sign of life: a confirmation or an open/click.
    let latest = match (c.confirmed_at, last_engagement) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    let mut m = TEMPLATE
        .get_or_init(|| {
            CONSENT_KEYS
                .iter()
                .map(|k| ((*k).into(), Dynamic::UNIT))
                .collect()
        })
        .clone();
    for (key, value) in m.iter_mut() {
        *value = match key.as_str() {
            "state" => state_name(c.state),
            "since" => unix(c.since).into(),
            "age" => secs_since(now, c.since).into(),
            "doi_mails" => i64::from(c.doi_mails).into(),
            "reminders_sent" => i64::from(c.reminders_sent).into(),
            "confirmed_at" => opt(c.confirmed_at.map(unix)),
            "confirmed_age" => opt(c.confirmed_at.map(|t| secs_since(now, t))),
            "last_engagement" => opt(last_engagement.map(unix)),
            "engagement_age" => opt(last_engagement.map(|t| secs_since(now, t))),
            "inactive_for" => opt(latest.map(|t| secs_since(now, t))),
            _ => Dynamic::UNIT,
        };
    }
    m
}

/// `ctx`: the clock and the list's settings (durations in seconds).
pub fn ctx_map(list: &ListConfig, now: DateTime<Utc>) -> Map {
    ListCtx::new(list).at(now)
}

/// The list part of `ctx`, built once per list for a pass over many contacts; [`ListCtx::at`]
/// then only adds the clock. Each call gets its own copy, so a script that changes its `ctx`
/// cannot affect the next contact.
#[derive(Debug, Clone)]
pub struct ListCtx {
    list: Map,
}

impl ListCtx {
    pub fn new(list: &ListConfig) -> Self {
        let mut l = Map::new();
        l.insert("id".into(), list.id.clone().into());
        l.insert("name".into(), list.name.clone().into());
        l.insert("description".into(), list.description.clone().into());
        // Who runs the double opt-in: the engine refuses reminders and re-permission mails
        // on a list whose DOI the campaigns tool runs, so the policy needs to know.
        let doi = match list.doi {
            DoiMode::Optinsync => "optinsync",
            DoiMode::Campaigns => "campaigns",
        };
        l.insert("doi".into(), doi.into());
        l.insert("reminder_after".into(), list.reminder_after.secs().into());
        l.insert("pending_expiry".into(), list.pending_expiry.secs().into());
        l.insert("max_reminders".into(), i64::from(list.max_reminders).into());
        l.insert("inactivity".into(), list.inactivity.secs().into());
        l.insert(
            "revalidation_grace".into(),
            list.revalidation_grace.secs().into(),
        );
        Self { list: l }
    }

    /// The `ctx` map at `now`.
    pub fn at(&self, now: DateTime<Utc>) -> Map {
        let mut m = Map::new();
        m.insert("now".into(), unix(now).into());
        m.insert("list".into(), Dynamic::from_map(self.list.clone()));
        m
    }
}

/// A contact with nothing but an id and an address, for tests of the maps.
#[cfg(test)]
pub(crate) fn test_contact(now: DateTime<Utc>) -> Contact {
    Contact {
        id: "c".into(),
        email: "p@example.org".into(),
        erased: false,
        language: None,
        fields: Default::default(),
        crm_records: vec![],
        created_at: now,
        updated_at: now,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crm_fields_reach_rules_as_serde_would_convert_them() {
        let fields: std::collections::BTreeMap<String, serde_json::Value> =
            serde_json::from_str(
                r#"{"a": null, "b": true, "c": -5, "d": 18446744073709551615, "e": 1.5,
                    "f": "text", "g": [1, "x", [null]], "h": {"k": {"l": 2}}, "i": 9007199254740993}"#,
            )
            .expect("json");
        let direct: Map = fields
            .iter()
            .map(|(k, v)| (k.as_str().into(), json(v)))
            .collect();
        let via_serde = rhai::serde::to_dynamic(&fields).expect("serde");
        assert_eq!(
            format!("{:?}", Dynamic::from_map(direct)),
            format!("{via_serde:?}")
        );
    }

    #[test]
    fn consent_map_holds_every_key_with_its_value() {
        let now = DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default();
        let ago = |s: i64| now - chrono::Duration::seconds(s);
        let consent = Consent {
            state: ConsentState::Confirmed,
            since: ago(100),
            signup_token: None,
            doi_mails: 1,
            reminders_sent: 2,
            confirmed_at: Some(ago(100)),
            confirmed_token: None,
            last_seq: None,
        };
        let m = consent_map(&consent, Some(ago(40)), now);
        let got: Vec<(String, String)> = m
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut want: Vec<(String, String)> = [
            ("state", "confirmed".to_owned()),
            ("since", (1_800_000_000 - 100).to_string()),
            ("age", "100".into()),
            ("doi_mails", "1".into()),
            ("reminders_sent", "2".into()),
            ("confirmed_at", (1_800_000_000 - 100).to_string()),
            ("confirmed_age", "100".into()),
            ("last_engagement", (1_800_000_000 - 40).to_string()),
            ("engagement_age", "40".into()),
            ("inactive_for", "40".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        want.sort();
        assert_eq!(got, want);
        let none = consent_map(&Consent::new(now), None, now);
        assert_eq!(none.len(), CONSENT_KEYS.len());
        assert!(none.get("inactive_for").is_some_and(Dynamic::is_unit));
    }

    /// The key lists are what the load-time check and the docs rely on: every map has exactly
    /// those keys, whatever the contact (absent values are `()`).
    #[test]
    fn maps_hold_exactly_the_known_keys() {
        fn keys(m: &Map) -> Vec<String> {
            let mut k: Vec<String> = m.keys().map(ToString::to_string).collect();
            k.sort();
            k
        }
        fn sorted(k: &[&str]) -> Vec<String> {
            let mut k: Vec<String> = k.iter().map(|s| (*s).to_owned()).collect();
            k.sort();
            k
        }
        let now = DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default();
        assert_eq!(
            keys(&contact_map(&test_contact(now))),
            sorted(&CONTACT_KEYS)
        );
        assert_eq!(
            keys(&consent_map(&Consent::new(now), None, now)),
            sorted(&CONSENT_KEYS)
        );
        let list: ListConfig = toml::from_str(
            "id = \"news\"\nname = \"News\"\ndescription = \"Monthly\"\ndoi = \"campaigns\"",
        )
        .expect("list");
        let ctx = ctx_map(&list, now);
        assert_eq!(keys(&ctx), sorted(&CTX_KEYS));
        let l = ctx
            .get("list")
            .and_then(|l| l.read_lock::<Map>().map(|l| l.clone()))
            .expect("list map");
        assert_eq!(keys(&l), sorted(&LIST_KEYS));
        let get = |k: &str| l.get(k).map(ToString::to_string);
        assert_eq!(get("doi").as_deref(), Some("campaigns"));
        assert_eq!(get("description").as_deref(), Some("Monthly"));
        let plain: ListConfig = toml::from_str("id = \"a\"\nname = \"A\"").expect("list");
        let plain = ListCtx::new(&plain).list;
        assert_eq!(
            plain.get("doi").map(ToString::to_string).as_deref(),
            Some("optinsync")
        );
    }

    #[test]
    fn state_names_are_the_states_own() {
        for s in ConsentState::ALL {
            let name = state_name(s).into_string().expect("a string");
            assert_eq!(name, s.as_str());
        }
    }

    #[test]
    fn list_ctx_matches_a_fresh_ctx_and_copies_per_call() {
        let list: ListConfig =
            toml::from_str("id = \"news\"\nname = \"News\"\ninactivity = \"90d\"").expect("list");
        let now = DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default();
        let ctx = ListCtx::new(&list);
        let mut first = ctx.at(now);
        assert_eq!(format!("{first:?}"), format!("{:?}", ctx_map(&list, now)));
        // A script's change to its copy stays in that copy.
        first.insert("list".into(), Dynamic::UNIT);
        let second = ctx.at(now);
        let inactivity = second
            .get("list")
            .and_then(|l| {
                l.read_lock::<Map>()
                    .and_then(|l| l.get("inactivity").cloned())
            })
            .and_then(|v| v.as_int().ok());
        assert_eq!(inactivity, Some(90 * 86_400));
    }
}
