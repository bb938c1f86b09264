//! HubSpot contact objects (list, search and batch-read answers) → records: never panics on
//! any JSON; a record has the contact's id and an address; an invalid one says where it is.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use optinsync_plugin_hubspot::HubSpotCrm;

fn crm() -> &'static HubSpotCrm {
    static CRM: OnceLock<HubSpotCrm> = OnceLock::new();
    CRM.get_or_init(|| {
        let settings: toml::Table = toml::from_str(
            "token = \"pat-na1-fuzz\"\napi_url = \"http://127.0.0.1:9\"\n\
             fields = [\"firstname\"]\nlanguage_property = \"hs_language\"\n\
             [asserts]\nnewsletter = \"newsletter_requested\"\n\
             events = { property = \"interests\", value = \"Events\" }\n",
        )
        .expect("settings");
        let config = optinsync_plugin_api::Settings::from_serialize(&settings)
            .and_then(|s| s.parse())
            .expect("settings parse");
        HubSpotCrm::new(config).expect("hubspot crm")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    // A page (`{"results": [...]}`) or a single contact.
    let items: Vec<&serde_json::Value> = match value.get("results").and_then(|d| d.as_array()) {
        Some(items) => items.iter().collect(),
        None => vec![&value],
    };
    for item in items {
        let (id, _modified, record) = crm().read_contact(item);
        match record {
            Ok(rec) => {
                assert_eq!(Some(rec.record.id.clone()), id.map(|i| i.to_string()));
                assert!(rec.email.as_deref().is_some_and(|e| !e.is_empty()));
            }
            Err(bad) => assert!(!bad.location.is_empty() && !bad.reason.is_empty()),
        }
    }
});
