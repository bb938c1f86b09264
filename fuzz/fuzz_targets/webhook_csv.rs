//! `POST /webhooks/crm` bodies for the CSV CRM: never panic; an accepted body names only
//! non-empty, trimmed ids in the configured module.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use optinsync_plugin_api::WebhookEvent;
use optinsync_plugin_files::CsvCrm;

fn crm() -> &'static CsvCrm {
    static CRM: OnceLock<CsvCrm> = OnceLock::new();
    CRM.get_or_init(|| {
        let settings: toml::Table =
            toml::from_str("path = \"contacts.csv\"\nmodule = \"Contacts\"").expect("settings");
        CsvCrm::from_config(settings, std::path::Path::new("/nonexistent")).expect("csv crm")
    })
}

fuzz_target!(|data: &[u8]| {
    let headers = vec![("content-type".to_owned(), "application/json".to_owned())];
    if let Ok(WebhookEvent::Changed { records }) = crm().parse_webhook(&headers, data) {
        assert!(!records.is_empty());
        for r in records {
            assert_eq!(r.module, "Contacts");
            assert!(!r.id.is_empty() && r.id.trim() == r.id);
        }
    }
});
