//! The CSV CRM on arbitrary file content (invalid UTF-8, ragged rows, quotes, BOMs):
//! never panics; every row ends up a record or an invalid-row report, never both, and a
//! second pass with the cursor of the first reports nothing new.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use optinsync_plugin_files::CsvCrm;

fn crm() -> &'static CsvCrm {
    static CRM: OnceLock<CsvCrm> = OnceLock::new();
    CRM.get_or_init(|| {
        let settings: toml::Table =
            toml::from_str("path = \"contacts.csv\"\nasserts = { newsletter = \"Newsletter\" }")
                .expect("settings");
        CsvCrm::from_config(settings, std::path::Path::new("/nonexistent")).expect("csv crm")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(first) = crm().changes_of_bytes(data, None, usize::MAX) else {
        return; // a header-level problem is a configuration error, reported as such
    };
    assert!(!first.has_more);
    for r in &first.records {
        assert!(!r.record.id.trim().is_empty());
        assert!(r.email.as_deref().is_some_and(|e| !e.trim().is_empty()));
    }
    for bad in &first.invalid {
        assert!(!bad.location.is_empty() && !bad.reason.is_empty());
    }
    let cursor = first.next_cursor.expect("a cursor");
    let second = crm()
        .changes_of_bytes(data, Some(&cursor), usize::MAX)
        .expect("same bytes parse again");
    assert!(second.records.is_empty(), "unchanged rows reported twice");
    assert!(
        second.invalid.is_empty(),
        "unchanged invalid rows reported twice"
    );
    assert!(second.deleted.is_empty());
});
