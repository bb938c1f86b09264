//! The exec connector against small misbehaving children written inline: garbage on stdout,
//! the wrong protocol version, silence, late answers, results of the wrong shape.

mod common;

use std::path::Path;

use common::*;
use optinsync_plugin_api::{
    Built, ConnectorError, HttpMethod, Keyed, OutgoingMessage, Role, SettingsError, Subscriber,
    WebhookRequest,
};
use serde_json::{Value, json};

/// A child that answers `hello` (capabilities `caps`) and `configure`, counts its starts in
/// `starts`, records cancelled ids in `cancelled` and every call's method in `calls`, and
/// hands other requests to `handler` (Python defining `handle(rid, method, params)`).
fn child(dir: &Path, caps: &str, handler: &str) -> Value {
    let source = r#"
import json, os, sys

def send(m):
    sys.stdout.write(json.dumps(m) + "\n")
    sys.stdout.flush()

def bump(name):
    n = int(open(name).read()) + 1 if os.path.exists(name) else 1
    with open(name, "w") as f:
        f.write(str(n))
    return n

def note(name, text):
    with open(name, "a") as f:
        f.write(text + "\n")

STARTS = bump("starts")

HANDLER

for line in sys.stdin:
    msg = json.loads(line)
    rid, method, params = msg.get("id"), msg.get("method"), msg.get("params") or {}
    if rid is None:
        if method == "cancel":
            note("cancelled", str(params["id"]))
        continue
    if method == "hello":
        send({"id": rid, "result": {"protocol_version": 1, "connector": "test-child 1.0",
              "roles": ["crm", "campaigns", "mail"], "capabilities": CAPS, "max_batch": 10}})
    elif method == "configure":
        send({"id": rid, "result": {}})
    elif method == "shutdown":
        send({"id": rid, "result": {}})
        sys.exit(0)
    else:
        note("calls", method)
        handle(rid, method, params)
"#
    .replace("CAPS", caps)
    .replace("HANDLER", handler);
    script(dir, "child.py", &source)
}

fn read(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap_or_default()
}

async fn build_err(role: Role, dir: &Path, section: Value) -> SettingsError {
    match build(role, dir, section, None).await {
        Ok(b) => panic!("built a {} connector", b.role()),
        Err(e) => e,
    }
}

#[tokio::test]
async fn garbage_on_stdout_is_a_protocol_error_and_the_process_is_restarted() {
    let dir = base_dir(&[]);
    let handler = r#"
def handle(rid, method, params):
    if method == "health":
        if STARTS == 1:
            sys.stdout.write("Traceback: this is not JSON\n")
            sys.stdout.flush()
            return
        send({"id": rid, "result": {"ok": True, "detail": f"start {STARTS}"}})
"#;
    let section = json!({"command": child(dir.path(), "[]", handler)});
    let c = crm(dir.path(), section).await;
    let first = c.health().await.expect_err("garbage");
    assert!(transient_wait(&first).is_some(), "{first:?}");
    let message = first.to_string();
    assert!(
        message.contains("protocol error at stdout line 3"),
        "{message}"
    );
    assert!(message.contains("`crm`"), "{message}");
    let health = retrying(|| c.health()).await.expect("restarted");
    assert_eq!(health.detail, "start 2");
    assert_eq!(read(dir.path(), "starts"), "2");
    c.shutdown().await;
}

#[tokio::test]
async fn a_child_speaking_only_version_2_fails_the_build_naming_command_and_versions() {
    let dir = base_dir(&[]);
    let refuses = script(
        dir.path(),
        "v2.py",
        r#"
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    print(json.dumps({"id": m["id"], "error": {"kind": "config", "setting": "command",
                      "message": "speaks protocol 2 only"}}), flush=True)
"#,
    );
    let e = build_err(Role::Campaigns, dir.path(), json!({"command": refuses})).await;
    assert_eq!(e.key.as_deref(), Some("command"));
    for part in [
        "`campaigns`",
        "v2.py",
        "speaks protocol 2 only",
        "protocol version 1",
    ] {
        assert!(e.message.contains(part), "{part} missing: {}", e.message);
    }

    let picks = script(
        dir.path(),
        "picks2.py",
        r#"
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    print(json.dumps({"id": m["id"], "result": {"protocol_version": 2, "connector": "future 2.0",
                      "roles": ["crm"], "capabilities": []}}), flush=True)
"#,
    );
    let e = build_err(Role::Crm, dir.path(), json!({"command": picks})).await;
    assert_eq!(e.key.as_deref(), Some("command"));
    for part in [
        "`crm`",
        "picks2.py",
        "picked protocol version 2",
        "protocol version 1",
    ] {
        assert!(e.message.contains(part), "{part} missing: {}", e.message);
    }
}

#[tokio::test]
async fn a_child_that_never_answers_hello_fails_the_build_after_startup_timeout() {
    let dir = base_dir(&[]);
    let silent = script(
        dir.path(),
        "silent.py",
        "import sys\nfor line in sys.stdin:\n    pass\n",
    );
    let e = build_err(
        Role::Crm,
        dir.path(),
        json!({"command": silent, "startup_timeout": "1s"}),
    )
    .await;
    assert_eq!(e.key.as_deref(), Some("command"));
    assert!(
        e.message.contains("within startup_timeout (1s)"),
        "{}",
        e.message
    );
}

#[tokio::test]
async fn start_up_failures_name_the_setting_to_fix() {
    let dir = base_dir(&["crm.jsonl"]);
    // The connector's own config error names its setting under `settings.`.
    let e = build_err(
        Role::Crm,
        dir.path(),
        json!({"command": example("file_crm.py"), "settings": {"write_back_path": "wb.jsonl"}}),
    )
    .await;
    assert_eq!(e.key.as_deref(), Some("settings.path"), "{e}");
    // A role the connector does not serve.
    let e = build_err(
        Role::Campaigns,
        dir.path(),
        json!({"command": example("file_crm.py")}),
    )
    .await;
    assert_eq!(e.key.as_deref(), Some("command"));
    assert!(e.message.contains("campaigns role"), "{}", e.message);
    // A program that does not exist, one that exits at once, an unknown key.
    let e = build_err(
        Role::Mail,
        dir.path(),
        json!({"command": ["./no-such-program"]}),
    )
    .await;
    assert_eq!(e.key.as_deref(), Some("command"));
    assert!(e.message.contains("no-such-program"), "{}", e.message);
    let exits = script(dir.path(), "exits.py", "import sys\nsys.exit(4)\n");
    let e = build_err(Role::Mail, dir.path(), json!({"command": exits})).await;
    assert_eq!(e.key.as_deref(), Some("command"));
    assert!(e.message.contains("status 4"), "{}", e.message);
    let e = build_err(
        Role::Mail,
        dir.path(),
        json!({"command": ["true"], "timout": "1s"}),
    )
    .await;
    assert_eq!(e.key.as_deref(), Some("timout"));
}

#[tokio::test]
async fn a_call_without_answer_times_out_is_cancelled_and_the_process_keeps_serving() {
    let dir = base_dir(&[]);
    let handler = r#"
def handle(rid, method, params):
    if method == "maintain":
        return  # never answered
    send({"id": rid, "result": {"ok": True, "detail": f"start {STARTS}"}})
"#;
    let section =
        json!({"command": child(dir.path(), r#"["maintain"]"#, handler), "timeout": "500ms"});
    let c = crm(dir.path(), section).await;
    let e = c.maintain().await.expect_err("no answer");
    assert_eq!(transient_wait(&e), Some(None), "{e:?}");
    assert!(
        e.to_string()
            .contains("did not answer `maintain` within 500ms"),
        "{e}"
    );
    // The same process answers the next call, and was told about the abandoned one first.
    assert_eq!(c.health().await.map(|h| h.detail), Ok("start 1".into()));
    assert_eq!(read(dir.path(), "cancelled"), "2\n");
    assert_eq!(read(dir.path(), "starts"), "1");
    c.shutdown().await;
}

#[tokio::test]
async fn results_of_the_wrong_shape_fail_that_call_only() {
    let dir = base_dir(&[]);
    let handler = r#"
def handle(rid, method, params):
    if method == "subscribe":
        send({"id": rid, "result": {"results": [{"ok": True}]}})
    elif method == "remove":
        send({"id": rid, "result": {"results": [{"ok": True}, {"error": {"kind": "fatal", "message": "x"}}]}})
    elif method == "health":
        send({"id": rid, "result": {"ok": "yes"}})
    else:
        send({"id": rid, "result": {"events": [], "next_cursor": None, "has_more": False}})
"#;
    let section = json!({"command": child(dir.path(), "[]", handler)});
    let c = campaigns(dir.path(), section, None).await;
    assert_eq!(c.max_batch(), 10, "from hello");
    let two = [
        Keyed::new("k1", sub("a@example.org")),
        Keyed::new("k2", sub("b@example.org")),
    ];
    let results = c.subscribe("L1", &two).await.expect("answered");
    assert_eq!(results.len(), 2);
    assert!(
        results
            .iter()
            .all(|r| matches!(r, Err(ConnectorError::Transient { .. })))
    );
    let removed = c
        .remove(
            "L1",
            &[
                Keyed::new("r1", "a@example.org".to_owned()),
                Keyed::new("r2", "b@example.org".to_owned()),
            ],
        )
        .await;
    assert!(
        matches!(removed, Err(ConnectorError::Transient { .. })),
        "{removed:?}"
    );
    assert!(matches!(
        c.health().await,
        Err(ConnectorError::Transient { .. })
    ));
    // No restart: the same process answers the next well-formed call at once.
    let page = c.status_events("L1", None).await.expect("well-formed");
    assert!(page.events.is_empty());
    assert_eq!(read(dir.path(), "starts"), "1");
    c.shutdown().await;
}

#[tokio::test]
async fn undeclared_capabilities_are_never_called_and_answer_like_the_api_defaults() {
    let dir = base_dir(&[]);
    let handler = r#"
def handle(rid, method, params):
    send({"id": rid, "error": {"kind": "permanent", "message": f"unknown method {method}"}})
"#;
    let section = json!({"command": child(dir.path(), r#"["teleport"]"#, handler)});
    let c = campaigns(dir.path(), section, None).await;
    assert!(!c.accepts_webhooks());
    assert_eq!(c.export_state().await, None);
    assert_eq!(c.maintain().await, Ok(()));
    let hook = WebhookRequest {
        method: HttpMethod::Get,
        path: "/webhooks/campaigns".into(),
        query: String::new(),
        headers: vec![],
        body: String::new(),
        peer: None,
    };
    assert!(matches!(
        c.webhook(&hook).await,
        Err(ConnectorError::InvalidInput { .. })
    ));
    assert_eq!(
        c.list_members("L1", None).await,
        Err(ConnectorError::Permanent {
            message: "this campaigns connector cannot list members".into()
        })
    );
    assert_eq!(read(dir.path(), "calls"), "", "nothing reached the process");
    c.shutdown().await;
    // Shut down: the process got `shutdown` and exited; later calls fail without a restart.
    assert!(matches!(
        c.health().await,
        Err(ConnectorError::Transient { .. })
    ));
    assert_eq!(read(dir.path(), "starts"), "1");
}

#[tokio::test]
async fn a_mail_transport_sends_and_forgets() {
    let dir = base_dir(&[]);
    let handler = r#"
def handle(rid, method, params):
    if method == "send":
        send({"id": rid, "result": {"message_id": params["message_id"], "deduplicated": params["idempotency_key"] == "seen"}})
    elif method == "forget":
        send({"id": rid, "result": {"deleted": len(params["keys"])}})
"#;
    let section = json!({"command": child(dir.path(), "[]", handler)});
    let Ok(Built::Mail(mail)) = build(Role::Mail, dir.path(), section, None).await else {
        panic!("a mail transport")
    };
    let msg = OutgoingMessage {
        idempotency_key: "doi-1".into(),
        message_id: "1.k@mail.example.org".into(),
        from: "confirm@example.org".into(),
        to: "ana@example.org".into(),
        subject: "Please confirm".into(),
        text: "Hello".into(),
        html: None,
        headers: vec![("List-Unsubscribe".into(), "<https://example.org/u>".into())],
    };
    let sent = mail.send(&msg).await.expect("sent");
    assert_eq!(sent.message_id, "1.k@mail.example.org");
    assert!(!sent.deduplicated);
    assert_eq!(mail.forget(&["doi-1".into(), "doi-2".into()]).await, Ok(2));
    assert_eq!(read(dir.path(), "calls"), "send\nforget\n");
    mail.shutdown().await;
}

fn sub(email: &str) -> Subscriber {
    Subscriber {
        email: email.into(),
        language: None,
        fields: Default::default(),
        proof: None,
    }
}

#[tokio::test]
async fn a_child_that_closes_stdout_is_restarted_after_the_backoff() {
    let dir = base_dir(&[]);
    let handler = r#"
def handle(rid, method, params):
    if STARTS == 1:
        os.close(1)  # stdout gone, process still alive: must be killed and restarted
        import time
        time.sleep(60)
    send({"id": rid, "result": {"ok": True, "detail": f"start {STARTS}"}})
"#;
    let section = json!({"command": child(dir.path(), "[]", handler)});
    let c = crm(dir.path(), section).await;
    let e = c.health().await.expect_err("stdout closed");
    assert!(
        e.to_string()
            .contains("connector process exited: killed by signal 9"),
        "{e}"
    );
    let health = retrying(|| c.health()).await.expect("restarted");
    assert_eq!(health.detail, "start 2");
    c.shutdown().await;
}

#[tokio::test]
async fn answers_in_any_order_reach_their_own_calls() {
    let dir = base_dir(&[]);
    // Holds the answer for list A until the request for list B has come, then answers B first.
    let handler = r#"
HELD = []
def page(lst):
    return {"events": [], "next_cursor": lst, "has_more": False}
def handle(rid, method, params):
    if params.get("list") == "A":
        HELD.append(rid)
        return
    send({"id": rid, "result": page(params.get("list"))})
    for held in HELD:
        send({"id": held, "result": page("A")})
"#;
    let section = json!({"command": child(dir.path(), "[]", handler)});
    let c = campaigns(dir.path(), section, None).await;
    let a = c.status_events("A", None);
    let b = async {
        // B is asked once A's request is surely written (the child records each call).
        while !read(dir.path(), "calls").contains("status_events") {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        c.status_events("B", None).await
    };
    let (a, b) = tokio::join!(a, b);
    assert_eq!(a.expect("A").next_cursor.map(|c| c.0).as_deref(), Some("A"));
    assert_eq!(b.expect("B").next_cursor.map(|c| c.0).as_deref(), Some("B"));
    c.shutdown().await;
}

#[tokio::test]
async fn a_line_over_16_mib_is_a_protocol_error() {
    let dir = base_dir(&[]);
    let handler = r#"
def handle(rid, method, params):
    if STARTS == 1:
        sys.stdout.write("x" * (16 * 1024 * 1024 + 10) + "\n")
        sys.stdout.flush()
        return
    send({"id": rid, "result": {"ok": True, "detail": f"start {STARTS}"}})
"#;
    let section = json!({"command": child(dir.path(), "[]", handler)});
    let c = crm(dir.path(), section).await;
    let e = c.health().await.expect_err("over-long line");
    assert!(e.to_string().contains("longer than 16 MiB"), "{e}");
    assert_eq!(
        retrying(|| c.health()).await.map(|h| h.detail),
        Ok("start 2".into())
    );
    c.shutdown().await;
}

/// Log lines written by the code under test (a current-thread runtime keeps its tasks on the
/// thread where the subscriber is set).
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn stderr_is_forwarded_escaped_and_cut() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let dir = base_dir(&[]);
    let handler = r#"
def handle(rid, method, params):
    sys.stderr.write("forged\x1b[31m\rINFO line\n")
    sys.stderr.write("y" * 5000 + "\n")
    sys.stderr.write("after the long one\n")
    sys.stderr.flush()
    send({"id": rid, "result": {"ok": True, "detail": "ok"}})
"#;
    let section = json!({"command": child(dir.path(), "[]", handler)});
    let c = crm(dir.path(), section).await;
    c.health().await.expect("health");
    c.shutdown().await; // stderr is drained by the time the process has exited
    let text = String::from_utf8_lossy(&captured.0.lock().expect("log")).into_owned();
    let forged = text
        .lines()
        .find(|l| l.contains("forged"))
        .unwrap_or_else(|| panic!("not forwarded: {text}"));
    assert!(forged.contains(r"forged\u{1b}[31m\rINFO line"), "{forged}");
    assert!(forged.contains("connector=crm"), "{forged}");
    let long = text
        .lines()
        .find(|l| l.contains("yyyy"))
        .unwrap_or_else(|| panic!("not forwarded: {text}"));
    let run = long.split(|c| c != 'y').map(str::len).max();
    assert_eq!(run, Some(2048), "cut at 2 KiB");
    assert!(text.contains("after the long one"), "{text}");
}

#[tokio::test]
async fn configure_gets_an_absolute_base_dir_which_is_also_the_working_directory() {
    let scripts = base_dir(&[]);
    let source = r#"
import json, os, sys
for line in sys.stdin:
    m = json.loads(line)
    if "id" not in m:
        continue
    if m["method"] == "hello":
        r = {"protocol_version": 1, "connector": "t", "roles": ["crm"], "capabilities": []}
    elif m["method"] == "configure":
        BASE = m["params"]["base_dir"]
        ENV = sorted(os.environ)
        r = {}
    elif m["method"] == "health":
        r = {"ok": True, "detail": json.dumps([BASE, os.getcwd(), ENV])}
    else:
        r = {}
    print(json.dumps({"id": m["id"], "result": r}), flush=True)
"#;
    let mut command = script(scripts.path(), "where.py", source);
    // The interpreter itself, not a wrapper (a pyenv shim sets variables of its own).
    let real = std::process::Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .expect("python3 runs");
    command[0] = json!(String::from_utf8_lossy(&real.stdout).trim());
    // Relative to the test's working directory (the package), as a config's `.` would be.
    let relative = Path::new("tests/fixtures");
    let Ok(Built::Crm(c)) = build(Role::Crm, relative, json!({"command": command}), None).await
    else {
        panic!("a CRM connector")
    };
    let detail = c.health().await.expect("health").detail;
    let seen: (String, String, Vec<String>) = serde_json::from_str(&detail).expect("json");
    let expected = std::fs::canonicalize(relative).expect("exists");
    assert!(Path::new(&seen.0).is_absolute(), "{}", seen.0);
    assert_eq!(std::fs::canonicalize(&seen.0).ok(), Some(expected.clone()));
    assert_eq!(std::fs::canonicalize(&seen.1).ok(), Some(expected));
    // Only the kept variables (python may add LC_CTYPE of its own).
    let allowed = ["PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "LC_CTYPE"];
    assert!(
        seen.2.iter().all(|k| allowed.contains(&k.as_str())),
        "{:?}",
        seen.2
    );
    c.shutdown().await;
}
