//! The connector factories this build registers: one line per connector crate. Adding a
//! connector is adding its crate to the workspace and its `factories()` here; the engine
//! builds whatever `kind` a `[connectors.ROLE]` section names
//! (`optinsync_engine::connectors`). Connectors outside Rust use `kind = "exec"`
//! (docs/connector-protocol.md).

use std::sync::Arc;

use optinsync_plugin_api::ConnectorFactory;

/// Every registered factory, by crate.
pub fn factories() -> Vec<Arc<dyn ConnectorFactory>> {
    let mut all = Vec::new();
    all.extend(optinsync_plugin_files::factories());
    all.extend(optinsync_plugin_zoho::factories());
    all.extend(optinsync_plugin_mailchimp::factories());
    all.extend(optinsync_plugin_hubspot::factories());
    all.extend(optinsync_plugin_smtp::factories());
    all.extend(optinsync_plugin_exec::factories());
    all
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn every_kind_is_registered_once() {
        let all = factories();
        let kinds: HashSet<&str> = all.iter().map(|f| f.kind()).collect();
        assert_eq!(kinds.len(), all.len(), "a kind registered twice");
        for kind in [
            "csv",
            "jsonl",
            "eml",
            "zoho-crm",
            "zoho-campaigns",
            "mailchimp",
            "hubspot",
            "smtp",
            "exec",
        ] {
            assert!(kinds.contains(kind), "{kind} missing");
        }
    }
}
