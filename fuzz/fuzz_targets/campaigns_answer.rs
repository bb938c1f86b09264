//! Zoho Campaigns answers and saved connector state: never panic on any bytes.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use optinsync_plugin_zoho::campaigns::ZohoCampaigns;

fn campaigns() -> &'static ZohoCampaigns {
    static C: OnceLock<ZohoCampaigns> = OnceLock::new();
    C.get_or_init(|| {
        let settings: toml::Table = toml::from_str(
            "client_id = \"id\"\nclient_secret = \"s\"\nrefresh_token = \"r\"\n\
             accounts_url = \"http://127.0.0.1:9\"\ncampaigns_url = \"http://127.0.0.1:9\"\n\
             [lists.newsletter]\nlistkey = \"LK1\"\n",
        )
        .expect("settings");
        ZohoCampaigns::from_config(settings, std::path::Path::new(".")).expect("campaigns")
    })
}

fuzz_target!(|data: &[u8]| {
    if let Some(a) = ZohoCampaigns::read_answer(data) {
        if a.ok {
            assert_ne!(
                serde_json::from_slice::<serde_json::Value>(data)
                    .ok()
                    .and_then(|v| v
                        .get("status")
                        .and_then(|s| s.as_str())
                        .map(str::to_lowercase))
                    .as_deref(),
                Some("error")
            );
        }
    }
    // The state the connector saves across restarts (quota windows, own removals).
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = campaigns().import_state(text);
        let _ = campaigns().saved_state();
    }
});
