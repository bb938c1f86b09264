//! Zoho CRM `data` items → records: never panics on any JSON; a record always has an id
//! and an address, and an invalid item says where it is.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use optinsync_plugin_zoho::crm::ZohoCrm;

fn crm() -> &'static ZohoCrm {
    static CRM: OnceLock<ZohoCrm> = OnceLock::new();
    CRM.get_or_init(|| {
        let settings: toml::Table = toml::from_str(
            "client_id = \"id\"\nclient_secret = \"s\"\nrefresh_token = \"r\"\n\
             accounts_url = \"http://127.0.0.1:9\"\napi_url = \"http://127.0.0.1:9\"\n\
             language_field = \"Language\"\nfields = [\"First_Name\"]\n\
             [asserts]\nnewsletter = \"Newsletter\"\nevents = { field = \"Interests\", value = \"Events\" }\n",
        )
        .expect("settings");
        ZohoCrm::from_config(settings, std::path::Path::new(".")).expect("zoho crm")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    // A list answer (`{"data": [...]}`) or a single item.
    let items: Vec<&serde_json::Value> = match value.get("data").and_then(|d| d.as_array()) {
        Some(items) => items.iter().collect(),
        None => vec![&value],
    };
    for (index, item) in items.into_iter().enumerate() {
        let (id, _ts, parsed) = crm().parse_record("Contacts", index, item);
        match parsed {
            Ok(rec) => {
                assert_eq!(Some(&rec.record.id), id.as_ref());
                assert!(!rec.record.id.is_empty());
                assert!(rec.email.as_deref().is_some_and(|e| !e.is_empty()));
            }
            Err(bad) => assert!(bad.location.starts_with("Contacts")),
        }
    }
});
