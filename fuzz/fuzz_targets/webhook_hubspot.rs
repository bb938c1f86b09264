//! HubSpot webhook bodies: never panic; only contact creations and property changes with a
//! positive numeric `objectId` name contacts, each once.
#![no_main]

use std::collections::BTreeSet;

use libfuzzer_sys::fuzz_target;
use optinsync_plugin_hubspot::parse_webhook_body;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(notice) = parse_webhook_body(text) {
        let unique: BTreeSet<u64> = notice.changed.iter().copied().collect();
        assert_eq!(unique.len(), notice.changed.len(), "a contact named twice");
        assert!(notice.changed.iter().all(|id| *id > 0));
        for (id, _, _) in &notice.properties {
            assert!(unique.contains(id));
        }
        let events = serde_json::from_str::<serde_json::Value>(text)
            .ok()
            .and_then(|v| v.as_array().map(Vec::len));
        if let Some(n) = events {
            assert!(notice.changed.len() + notice.ignored <= n);
        }
    }
});
