//! Mailchimp webhook bodies and member listings: never panic; an accepted delivery names one
//! of Mailchimp's six event types, an audience, and (for member events) an address.
#![no_main]

use libfuzzer_sys::fuzz_target;
use optinsync_plugin_mailchimp::{parse_members_answer, parse_webhook_form};

fuzz_target!(|data: &[u8]| {
    if let Ok(body) = std::str::from_utf8(data)
        && let Ok(form) = parse_webhook_form(body)
    {
        assert!(matches!(
            form.kind.as_str(),
            "subscribe" | "unsubscribe" | "profile" | "upemail" | "cleaned" | "campaign"
        ));
        assert!(!form.list_id.is_empty());
        if matches!(form.kind.as_str(), "subscribe" | "unsubscribe" | "profile" | "cleaned") {
            assert!(form.email.contains('@'));
        }
        if form.kind == "upemail" {
            assert!(form.old_email.contains('@'));
        }
    }
    if let Ok(answer) = parse_members_answer(data) {
        assert!(answer.members.iter().all(|m| m.email.contains('@')));
    }
});
