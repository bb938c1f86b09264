//! Every example message of `docs/connector-protocol.md` parses into its type and round-trips:
//! the document and these types cannot drift apart unnoticed.

use std::collections::HashSet;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::*;

const DOC: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../docs/connector-protocol.md"
));

/// The lines of the doc's ```json blocks.
fn doc_json_lines() -> Vec<String> {
    let mut lines = Vec::new();
    let mut in_json = false;
    for line in DOC.lines() {
        let t = line.trim();
        if t.starts_with("```") {
            in_json = !in_json && t == "```json";
            continue;
        }
        if in_json && !t.is_empty() {
            lines.push(t.to_owned());
        }
    }
    lines
}

/// `T` read from `v`, written back equal to `v`, and read again equal.
fn round_trip<T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug>(v: &Value) -> T {
    let typed: T = serde_json::from_value(v.clone())
        .unwrap_or_else(|e| panic!("{v} does not parse as {}: {e}", std::any::type_name::<T>()));
    let back = serde_json::to_value(&typed).expect("serialises");
    assert_eq!(
        &back,
        v,
        "{} does not round-trip",
        std::any::type_name::<T>()
    );
    let again: T = serde_json::from_value(back).expect("parses again");
    assert_eq!(again, typed);
    typed
}

fn params_round_trip(method: Method, params: &Value) {
    match method {
        Method::Hello => {
            round_trip::<HelloParams>(params);
        }
        Method::Configure => {
            round_trip::<ConfigureParams>(params);
        }
        Method::Health | Method::Maintain | Method::ExportState | Method::Shutdown => {
            round_trip::<Empty>(params);
        }
        Method::Webhook => {
            round_trip::<WebhookParams>(params);
        }
        Method::Changes => {
            round_trip::<ChangesParams>(params);
        }
        Method::Fetch => {
            round_trip::<FetchParams>(params);
        }
        Method::WriteBack => {
            round_trip::<WriteBackParams>(params);
        }
        Method::Subscribe => {
            round_trip::<SubscribeParams>(params);
        }
        Method::Remove => {
            round_trip::<RemoveParams>(params);
        }
        Method::StatusEvents => {
            round_trip::<StatusEventsParams>(params);
        }
        Method::RequestDoi => {
            round_trip::<RequestDoiParams>(params);
        }
        Method::ListMembers => {
            round_trip::<ListMembersParams>(params);
        }
        Method::Send => {
            round_trip::<SendParams>(params);
        }
        Method::Forget => {
            round_trip::<ForgetParams>(params);
        }
        Method::Cancel => panic!("cancel is not a request"),
    }
}

fn result_round_trip(method: Method, result: &Value) {
    match method {
        Method::Hello => {
            round_trip::<HelloResult>(result);
        }
        Method::Configure => {
            round_trip::<ConfigureResult>(result);
        }
        Method::Health => {
            round_trip::<HealthResult>(result);
        }
        Method::Maintain | Method::WriteBack | Method::RequestDoi | Method::Shutdown => {
            round_trip::<Empty>(result);
        }
        Method::ExportState => {
            round_trip::<ExportStateResult>(result);
        }
        Method::Webhook => {
            round_trip::<WebhookResult>(result);
        }
        Method::Changes => {
            round_trip::<ChangesResult>(result);
        }
        Method::Fetch => {
            round_trip::<FetchResult>(result);
        }
        Method::Subscribe | Method::Remove => {
            round_trip::<BatchResults>(result);
        }
        Method::StatusEvents => {
            round_trip::<StatusEventsResult>(result);
        }
        Method::ListMembers => {
            round_trip::<ListMembersResult>(result);
        }
        Method::Send => {
            round_trip::<SendResult>(result);
        }
        Method::Forget => {
            round_trip::<ForgetResult>(result);
        }
        Method::Cancel => panic!("cancel has no answer"),
    }
}

#[test]
fn every_example_message_in_the_doc_parses_into_its_type() {
    let lines = doc_json_lines();
    assert!(lines.len() > 40, "found only {} example lines", lines.len());
    // An answer belongs to the request shown last before it (the doc's answers follow their
    // request; the webhook section shows several answers to one request).
    let mut last: Option<Method> = None;
    let mut requested = HashSet::new();
    let mut answered = HashSet::new();
    let mut errors = 0;
    for line in &lines {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}"));
        let obj = v
            .as_object()
            .unwrap_or_else(|| panic!("{line}: not an object"));
        if obj.contains_key("kind") {
            // A bare ERROR object.
            {
                round_trip::<ConnectorError>(&v);
            };
            errors += 1;
        } else if obj.contains_key("method") && !obj.contains_key("id") {
            let c = round_trip::<Cancel>(&v);
            assert_eq!(c, Cancel { id: 7 });
        } else if obj.contains_key("method") {
            let r: Request = round_trip(&v);
            params_round_trip(r.method, &r.params);
            requested.insert(r.method);
            last = Some(r.method);
        } else {
            let method = last.unwrap_or_else(|| panic!("{line}: an answer before any request"));
            let r = Response::parse_line(line).unwrap_or_else(|e| panic!("{line}: {e}"));
            assert_eq!(serde_json::to_value(&r).ok().as_ref(), Some(&v), "{line}");
            if let Ok(result) = &r.outcome {
                result_round_trip(method, result);
                answered.insert(method);
            }
        }
    }
    assert_eq!(errors, 7, "the seven ERROR examples");
    for m in Method::ALL {
        if m != Method::Cancel {
            assert!(requested.contains(&m), "no example request for {m}");
            assert!(answered.contains(&m), "no example result for {m}");
        }
    }
}

#[test]
fn the_top_level_error_is_read_strictly_and_makes_a_bad_line_a_protocol_error() {
    for bad in [
        r#"{"id":3,"error":{"kind":"fatal","message":"x"}}"#,
        r#"{"id":3,"error":{"kind":"permanent"}}"#,
        r#"{"id":3,"error":{"kind":"permanent","message":"x","retry_after_ms":5}}"#,
        r#"{"id":3,"error":{"kind":"config","message":"x"}}"#,
        r#"{"id":3,"error":"oops"}"#,
        r#"{"id":3}"#,
        r#"{"id":3,"result":{},"error":{"kind":"permanent","message":"x"}}"#,
        r#"{"result":{}}"#,
        r#"{"id":-1,"result":{}}"#,
        r#"{"id":"3","result":{}}"#,
        r#"[1,2]"#,
        r#"hello"#,
        r#"{"method":"log","params":{}}"#,
    ] {
        assert!(Response::parse_line(bad).is_err(), "{bad} accepted");
    }
    // Unknown fields outside ERROR are ignored; ids above 2^53 keep their digits.
    let r = Response::parse_line(r#"{"id":18446744073709551615,"result":{"x":1},"extra":true}"#)
        .expect("valid");
    assert_eq!(r.id, u64::MAX);
    let e = Response::parse_line(
        r#"{"id":4,"error":{"kind":"transient","message":"slow","retry_after_ms":250,"scope":"record"}}"#,
    )
    .expect("valid");
    assert_eq!(
        e.outcome,
        Err(ConnectorError::Transient {
            message: "slow".into(),
            retry_after: Some(std::time::Duration::from_millis(250)),
            scope: optinsync_plugin_api::FailureScope::Record,
        })
    );
}

#[test]
fn a_bad_error_inside_results_fails_the_result_not_the_line() {
    let line =
        r#"{"id":14,"result":{"results":[{"ok":true},{"error":{"kind":"fatal","message":"x"}}]}}"#;
    let r = Response::parse_line(line).expect("the envelope is fine");
    let typed = r.typed::<BatchResults>(Method::Subscribe);
    assert!(matches!(
        typed.outcome,
        Err(ConnectorError::Transient { .. })
    ));
    for bad in [
        json!({"ok": false}),
        json!({}),
        json!({"ok": true, "error": {"kind": "permanent", "message": "x"}}),
        json!({"error": {"kind": "permanent", "message": "x", "scope": "record"}}),
    ] {
        assert!(
            serde_json::from_value::<ItemResult>(bad.clone()).is_err(),
            "{bad}"
        );
    }
    let ok: ItemResult =
        serde_json::from_value(json!({"ok": true, "note": "ignored"})).expect("valid");
    assert_eq!(ok, ItemResult(Ok(())));
}

#[test]
fn unknown_capabilities_are_ignored_and_configure_tells_null_from_absent() {
    let hello: HelloResult = serde_json::from_value(json!({
        "protocol_version": 1, "connector": "x", "roles": ["campaigns", "future-role"],
        "capabilities": ["state", "teleport", "list_members"], "extra": 1
    }))
    .expect("valid");
    assert_eq!(
        hello.capabilities,
        [Capability::State, Capability::ListMembers]
    );
    assert_eq!(hello.max_batch, None);
    assert!(
        serde_json::from_value::<HelloResult>(json!({
            "protocol_version": 1, "connector": "x", "roles": [], "max_batch": 0
        }))
        .is_err(),
        "max_batch is at least 1"
    );
    let absent: ConfigureResult = serde_json::from_value(json!({})).expect("valid");
    assert_eq!(absent.status_interval_ms, None);
    let null: ConfigureResult =
        serde_json::from_value(json!({"status_interval_ms": null})).expect("valid");
    assert_eq!(null.status_interval_ms, Some(None));
    let set: ConfigureResult =
        serde_json::from_value(json!({"status_interval_ms": 5000, "max_batch": 3})).expect("valid");
    assert_eq!(set.status_interval_ms, Some(Some(5000)));
    assert_eq!(set.max_batch.map(NonZeroUsize::get), Some(3));
    for m in Method::ALL {
        let name = serde_json::to_value(m).expect("json");
        assert_eq!(name, Value::String(m.as_str().into()));
    }
    assert_eq!(
        Capability::from_name("request_doi"),
        Some(Capability::RequestDoi)
    );
    assert_eq!(
        Method::ListMembers.capability(),
        Some(Capability::ListMembers)
    );
}
