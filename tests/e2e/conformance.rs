//! `optinsync connector check`: the conformance kit over the configured connectors, through the
//! binary, on the demo's CSV, JSONL and `.eml` connectors.

use crate::support::Demo;

#[test]
fn the_file_connectors_pass_the_conformance_kit_with_the_writes() {
    let demo = Demo::new();
    let out = demo.output(&["connector", "check", "--write"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!stdout.contains("FAIL "), "{stdout}");
    for check in [
        "PASS crm: pages to the end",
        "PASS crm: resumes from a saved cursor",
        "PASS crm: fetch of a missing record is None",
        "PASS crm: refuses a forged webhook",
        "PASS crm: write-back is idempotent",
        "PASS campaigns: subscribe is idempotent",
        "PASS campaigns: a bad address fails for good, alone",
        "PASS campaigns: removing an absent address is done",
        "PASS mail: sends a message",
    ] {
        assert!(stdout.contains(check), "{check} missing:\n{stdout}");
    }
    // The kit leaves the list as it found it: the test address was removed again.
    assert!(demo.list_members().is_empty(), "{:?}", demo.list_members());
}

#[test]
fn without_write_the_kit_changes_nothing_and_says_what_it_skipped() {
    let demo = Demo::new();
    let out = demo.output(&["connector", "check", "--connector", "campaigns"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("SKIP campaigns: subscribe is idempotent — pass --write"),
        "{stdout}"
    );
    assert!(
        !stdout.contains("crm:") && !stdout.contains("mail:"),
        "{stdout}"
    );
    assert!(!demo.path("var/lists.jsonl").exists());
}

#[test]
fn a_failing_check_exits_1_and_an_unknown_connector_name_exits_2() {
    let demo = Demo::new();
    // The CRM file is gone: health and paging fail, and say so.
    std::fs::remove_file(demo.path("demo/contacts.csv")).unwrap();
    let out = demo.output(&["connector", "check", "--connector", "crm"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("FAIL crm: health"), "{stdout}");
    let out = demo.output(&["connector", "check", "--connector", "crn"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("crm, campaigns or mail"));
}
