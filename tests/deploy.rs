//! The deployment kit (`deploy/`) checked by the tools that consume it: `promtool check
//! rules` and `promtool test rules` for the alert rules, `systemd-analyze verify` for the
//! unit (both installed by `scripts/test`). Whether the alerts and the dashboard name metrics
//! the daemon exports is checked against a running daemon in `tests/e2e/monitoring.rs`.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::{Command, Output};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(program: &str, args: &[&str], dir: &std::path::Path) -> Output {
    Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e} (scripts/test installs it)"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn alert_rules_pass_promtool_check() {
    let out = run(
        "promtool",
        &["check", "rules", "alerts.yml"],
        &repo().join("deploy/prometheus"),
    );
    let report = text(&out);
    assert!(out.status.success(), "{report}");
    assert!(report.contains("SUCCESS"), "{report}");
}

/// `alerts.test.yml`: each alert fires on its condition (after its `for`), and not before.
#[test]
fn alert_rules_unit_tests_pass() {
    let out = run(
        "promtool",
        &["test", "rules", "alerts.test.yml"],
        &repo().join("deploy/prometheus"),
    );
    assert!(out.status.success(), "{}", text(&out));
}

/// Every alert of `alerts.yml` has at least one unit test.
#[test]
fn every_alert_is_unit_tested() {
    let dir = repo().join("deploy/prometheus");
    let rules: serde_norway::Value =
        serde_norway::from_str(&std::fs::read_to_string(dir.join("alerts.yml")).unwrap()).unwrap();
    let tests: serde_norway::Value =
        serde_norway::from_str(&std::fs::read_to_string(dir.join("alerts.test.yml")).unwrap())
            .unwrap();
    let tested: Vec<&str> = tests["tests"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_sequence().unwrap())
        .filter(|t| t["exp_alerts"].as_sequence().is_some_and(|a| !a.is_empty()))
        .map(|t| t["alertname"].as_str().unwrap())
        .collect();
    for group in rules["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            let name = rule["alert"].as_str().unwrap();
            assert!(
                tested.contains(&name),
                "{name} never fires in alerts.test.yml"
            );
        }
    }
}

/// `systemd-analyze verify` on the unit, with `ExecStart` pointed at the binary just built
/// (verify refuses a unit whose program does not exist). It exits 0 on unknown keys and
/// unparsable values too, only saying so: any output fails the test.
#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    let unit = std::fs::read_to_string(repo().join("deploy/systemd/optinsync.service")).unwrap();
    assert!(unit.contains("/usr/local/bin/optinsync "), "{unit}");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("optinsync.service"),
        unit.replace(
            "/usr/local/bin/optinsync ",
            &format!("{} ", env!("CARGO_BIN_EXE_optinsync")),
        ),
    )
    .unwrap();
    let out = run(
        "systemd-analyze",
        &["verify", "optinsync.service"],
        dir.path(),
    );
    let report = text(&out);
    assert!(out.status.success(), "{report}");
    assert!(report.trim().is_empty(), "systemd-analyze verify: {report}");
}

/// The hardening the deployment promises (README "Running as a service").
#[test]
fn systemd_unit_is_hardened() {
    let unit = std::fs::read_to_string(repo().join("deploy/systemd/optinsync.service")).unwrap();
    let lines: Vec<&str> = unit.lines().map(str::trim).collect();
    for wanted in [
        "User=optinsync",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "StateDirectory=optinsync",
        "EnvironmentFile=/etc/optinsync/optinsync.env",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "CapabilityBoundingSet=",
        "RestartPreventExitStatus=2",
    ] {
        assert!(lines.contains(&wanted), "missing `{wanted}`");
    }
    // The state directory is the only writable place: the unit grants no other.
    assert!(!lines.iter().any(|l| l.starts_with("ReadWritePaths=")));
}
