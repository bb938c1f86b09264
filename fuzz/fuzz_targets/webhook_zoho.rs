//! Zoho CRM notification bodies: never panic; nothing is accepted without the channel
//! token and channel id, and accepted ids are alphanumeric in a synced module.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use optinsync_plugin_api::WebhookEvent;
use optinsync_plugin_zoho::crm::ZohoCrm;

pub const TOKEN: &str = "fuzz-channel-token";

fn crm() -> &'static ZohoCrm {
    static CRM: OnceLock<ZohoCrm> = OnceLock::new();
    CRM.get_or_init(|| {
        let settings: toml::Table = toml::from_str(&format!(
            "client_id = \"id\"\nclient_secret = \"s\"\nrefresh_token = \"r\"\n\
             accounts_url = \"http://127.0.0.1:9\"\napi_url = \"http://127.0.0.1:9\"\n\
             modules = [\"Contacts\", \"Leads\"]\n\
             [webhook]\ntoken = \"{TOKEN}\"\nnotify_url = \"http://127.0.0.1:9/webhooks/crm\"\nchannel_id = 42\n"
        ))
        .expect("settings");
        ZohoCrm::from_config(settings, std::path::Path::new(".")).expect("zoho crm")
    })
}

fuzz_target!(|data: &[u8]| {
    let result = crm().parse_webhook(&[], data);
    // (A body with a lone surrogate escape in an ignored field reads as a notification but
    // not as a `Value`; the token check then cannot be repeated here.)
    if result.is_ok()
        && let Ok(v) = serde_json::from_slice::<serde_json::Value>(data)
    {
        assert_eq!(v.get("token").and_then(|t| t.as_str()), Some(TOKEN));
    }
    if let Ok(WebhookEvent::Changed { records }) = result {
        for r in records {
            assert!(r.module == "Contacts" || r.module == "Leads");
            assert!(!r.id.is_empty() && r.id.chars().all(|c| c.is_ascii_alphanumeric()));
        }
    }
});
