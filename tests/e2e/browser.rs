//! Headless Chromium over the DevTools protocol (Debian package `chromium`), shared by the
//! tests that click pages like a person and render pages for print.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::support::{LOAD_FACTOR, wait_until};

pub struct Chromium {
    child: Child,
    _profile: tempfile::TempDir,
}

impl Drop for Chromium {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub struct Cdp {
    ws: Ws,
    next_id: u64,
    session: Option<String>,
    /// Events the browser sent while a call waited for its answer (after `Runtime.enable` /
    /// `Log.enable`: console messages, exceptions, log entries).
    pub events: Vec<serde_json::Value>,
}

impl Cdp {
    pub async fn call(&mut self, method: &str, params: serde_json::Value) -> serde_json::Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = serde_json::json!({ "id": id, "method": method, "params": params });
        if let Some(s) = &self.session {
            msg["sessionId"] = serde_json::Value::String(s.clone());
        }
        self.ws
            .send(WsMessage::Text(msg.to_string().into()))
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30 * LOAD_FACTOR);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let frame = tokio::time::timeout(left, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("no answer to {method}"))
                .unwrap()
                .unwrap();
            if let WsMessage::Text(t) = frame {
                let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
                if v["id"] == id {
                    assert!(v.get("error").is_none(), "{method}: {v}");
                    return v["result"].clone();
                }
                if v.get("method").is_some() {
                    self.events.push(v);
                }
            }
        }
    }

    pub async fn eval(&mut self, expression: &str) -> serde_json::Value {
        let r = self
            .call(
                "Runtime.evaluate",
                serde_json::json!({ "expression": expression, "returnByValue": true }),
            )
            .await;
        r["result"]["value"].clone()
    }

    /// A PNG of the whole page as rendered (`Page.captureScreenshot`).
    pub async fn screenshot(&mut self) -> Vec<u8> {
        use base64::Engine as _;
        let r = self
            .call(
                "Page.captureScreenshot",
                serde_json::json!({ "format": "png", "captureBeyondViewport": true }),
            )
            .await;
        base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().expect("screenshot data"))
            .expect("screenshot is base64")
    }

    /// Errors the page reported since the last call: console errors, uncaught exceptions, and
    /// log entries at level error (failed loads, CSP violations). Clears them.
    pub fn take_errors(&mut self) -> Vec<String> {
        std::mem::take(&mut self.events)
            .into_iter()
            .filter(|e| match e["method"].as_str() {
                Some("Runtime.exceptionThrown") => true,
                Some("Runtime.consoleAPICalled") => e["params"]["type"] == "error",
                Some("Log.entryAdded") => e["params"]["entry"]["level"] == "error",
                _ => false,
            })
            .map(|e| e.to_string())
            .collect()
    }

    pub async fn wait_for(&mut self, expression: &str, what: &str) {
        let start = Instant::now();
        while self.eval(expression).await != serde_json::Value::Bool(true) {
            assert!(
                start.elapsed() < Duration::from_secs(30 * LOAD_FACTOR),
                "browser: timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

pub async fn start_chromium(url: &str) -> (Chromium, Cdp) {
    let profile = tempfile::tempdir().unwrap();
    let child = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--remote-debugging-port=0",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("about:blank")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromium must be installed (Debian package `chromium`; scripts/test installs it)");
    let chromium = Chromium {
        child,
        _profile: profile,
    };
    let port_file = chromium._profile.path().join("DevToolsActivePort");
    wait_until(60, "Chromium's DevTools port", || {
        std::fs::read_to_string(&port_file).is_ok_and(|s| s.lines().count() >= 2)
    });
    let info = std::fs::read_to_string(&port_file).unwrap();
    let mut lines = info.lines();
    let port = lines.next().unwrap().trim();
    let path = lines.next().unwrap().trim();
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}{path}"))
        .await
        .unwrap();
    let mut cdp = Cdp {
        ws,
        next_id: 0,
        session: None,
        events: Vec::new(),
    };
    let target = cdp
        .call("Target.createTarget", serde_json::json!({ "url": url }))
        .await;
    let attached = cdp
        .call(
            "Target.attachToTarget",
            serde_json::json!({ "targetId": target["targetId"], "flatten": true }),
        )
        .await;
    cdp.session = Some(attached["sessionId"].as_str().unwrap().to_owned());
    (chromium, cdp)
}

/// Click the element with `id` like a person: a mouse press and release at its centre.
pub async fn click(cdp: &mut Cdp, id: &str) {
    let rect = cdp
        .eval(&format!(
            "(() => {{ const r = document.getElementById('{id}').getBoundingClientRect(); \
             return [r.x + r.width / 2, r.y + r.height / 2]; }})()"
        ))
        .await;
    let (x, y) = (rect[0].as_f64().unwrap(), rect[1].as_f64().unwrap());
    for kind in ["mouseMoved", "mousePressed", "mouseReleased"] {
        cdp.call(
            "Input.dispatchMouseEvent",
            serde_json::json!({ "type": kind, "x": x, "y": y, "button": "left", "clickCount": 1 }),
        )
        .await;
    }
}
