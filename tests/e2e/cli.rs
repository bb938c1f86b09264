//! Exit codes and error messages of the command line (README.md, "Commands").

use crate::support::*;

#[test]
fn unknown_config_key_exits_2_naming_key_and_line() {
    let demo = Demo::new();
    let cfg = std::fs::read_to_string(demo.config()).unwrap().replace(
        "max_reminders = 1",
        "max_reminders = 1\nremind_after = \"1d\"",
    );
    std::fs::write(demo.config(), &cfg).unwrap();
    let line = cfg
        .lines()
        .position(|l| l.starts_with("remind_after"))
        .unwrap()
        + 1;
    let out = demo.output(&["sync", "--once"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("remind_after") && err.contains(&format!("config.toml:{line}:")),
        "{err}"
    );
}

#[test]
fn unknown_connector_setting_exits_2_naming_key_and_line() {
    let demo = Demo::new();
    let cfg = std::fs::read_to_string(demo.config()).unwrap().replace(
        "dir = \"var/mail\"",
        "dir = \"var/mail\"\ndirectory = \"x\"",
    );
    std::fs::write(demo.config(), &cfg).unwrap();
    let line = cfg
        .lines()
        .position(|l| l.starts_with("directory"))
        .unwrap()
        + 1;
    let out = demo.output(&["sync", "--once"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("directory") && err.contains(&format!(":{line}:")),
        "{err}"
    );
}

#[test]
fn unknown_connector_kind_and_missing_env_secret_exit_2() {
    let demo = Demo::new();
    let base = std::fs::read_to_string(demo.config()).unwrap();
    std::fs::write(
        demo.config(),
        // Mail leaves the machine: the published demo secret would be refused first.
        base.replace("kind = \"eml\"", "kind = \"carrier-pigeon\"")
            .replace(
                &format!("secret = \"{DEMO_TOKEN_SECRET}\""),
                &format!("secret = \"{TEST_TOKEN_SECRET}\""),
            ),
    )
    .unwrap();
    let out = demo.output(&["sync", "--once"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("carrier-pigeon"));

    std::fs::write(
        demo.config(),
        base.replace(
            "secret = \"demo-only-secret-change-me-0123456789abcdef\"",
            "secret = \"${OPTINSYNC_E2E_UNSET}\"",
        ),
    )
    .unwrap();
    let out = demo.output(&["sync", "--once"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("OPTINSYNC_E2E_UNSET"));
}

#[test]
fn secret_from_environment_is_used() {
    let demo = Demo::new();
    let cfg = std::fs::read_to_string(demo.config()).unwrap().replace(
        "secret = \"demo-only-secret-change-me-0123456789abcdef\"",
        "secret = \"${OPTINSYNC_E2E_SECRET}\"",
    );
    std::fs::write(demo.config(), cfg).unwrap();
    let out = demo
        .cmd(&["sync", "--once"])
        .env("OPTINSYNC_E2E_SECRET", "x".repeat(40))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn broken_rule_script_exits_2_with_file_and_line() {
    let demo = Demo::new();
    std::fs::write(
        demo.path("rules/consent.rhai"),
        "fn decide(contact, consent, ctx) {\n  let x = ;\n}\n",
    )
    .unwrap();
    let out = demo.output(&["sync", "--once"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("consent.rhai:2:"), "{err}");
    assert!(demo.mails().is_empty());
}

#[test]
fn usage_errors_exit_2_and_missing_contact_exits_1() {
    let demo = Demo::new();
    assert_eq!(demo.output(&["sync"]).status.code(), Some(2));
    assert_eq!(demo.output(&["no-such-command"]).status.code(), Some(2));
    let missing = std::process::Command::new(BIN)
        .args(["--config", "/nonexistent/config.toml", "migrate"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/config.toml"));
    demo.run_ok(&["migrate"]);
    let out = demo.output(&["contact", "show", "nobody@example.org"]);
    assert_eq!(out.status.code(), Some(1));
    let out = demo.output(&["contact", "show", "not an address"]);
    assert_eq!(out.status.code(), Some(2));
}
