//! Harness: a temporary copy of the demo set-up, and helpers to run the binary.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use optinsync_engine::ledger::LedgerEvent;
use optinsync_engine::store;
use optinsync_testkit::harness::util;

pub use optinsync_testkit::harness::util::{form_body, hidden_fields};

pub const BIN: &str = env!("CARGO_BIN_EXE_optinsync");

/// The token secret of the shipped demo `config.toml`.
pub const DEMO_TOKEN_SECRET: &str = optinsync_engine::config::DEMO_TOKEN_SECRET;
/// The secret [`Demo::use_private_secret`] puts in its place.
pub const TEST_TOKEN_SECRET: &str = "e2e-private-token-secret-0123456789abcdef";

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A temporary copy of the shipped demo: `config.toml`, `rules/`, `demo/contacts.csv`, with
/// its own port and optional store URL.
pub struct Demo {
    pub dir: tempfile::TempDir,
    pub port: u16,
}

impl Demo {
    pub fn new() -> Demo {
        Self::with_store(None)
    }

    pub fn with_store(store_url: Option<&str>) -> Demo {
        let dir = tempfile::tempdir().unwrap();
        let port = optinsync_testkit::free_port();
        let mut config = std::fs::read_to_string(repo().join("config.toml")).unwrap();
        config = config
            .replace(
                "listen = \"127.0.0.1:8080\"",
                &format!("listen = \"127.0.0.1:{port}\""),
            )
            .replace(
                "public_url = \"http://127.0.0.1:8080\"",
                &format!("public_url = \"http://127.0.0.1:{port}\""),
            )
            .replace("poll_interval = \"10s\"", "poll_interval = \"1s\"");
        if let Some(url) = store_url {
            config = config.replace(
                "url = \"sqlite://var/optinsync.db\"",
                &format!("url = \"{url}\""),
            );
        }
        std::fs::write(dir.path().join("config.toml"), config).unwrap();
        std::fs::create_dir_all(dir.path().join("rules")).unwrap();
        for entry in std::fs::read_dir(repo().join("rules")).unwrap() {
            let path = entry.unwrap().path();
            std::fs::copy(
                &path,
                dir.path().join("rules").join(path.file_name().unwrap()),
            )
            .unwrap();
        }
        for lang in std::fs::read_dir(repo().join("templates")).unwrap() {
            let lang = lang.unwrap().path();
            let to = dir.path().join("templates").join(lang.file_name().unwrap());
            std::fs::create_dir_all(&to).unwrap();
            for f in std::fs::read_dir(&lang).unwrap() {
                let f = f.unwrap().path();
                std::fs::copy(&f, to.join(f.file_name().unwrap())).unwrap();
            }
        }
        std::fs::create_dir_all(dir.path().join("demo")).unwrap();
        std::fs::copy(
            repo().join("demo/contacts.csv"),
            dir.path().join("demo/contacts.csv"),
        )
        .unwrap();
        Demo { dir, port }
    }

    /// Replace the published demo secret with [`TEST_TOKEN_SECRET`]: start-up refuses the
    /// demo secret once mail leaves the machine (SMTP) or links leave loopback.
    pub fn use_private_secret(&self) {
        let cfg = std::fs::read_to_string(self.config()).unwrap();
        let demo = format!("secret = \"{DEMO_TOKEN_SECRET}\"");
        assert!(cfg.contains(&demo), "shipped config changed: {cfg}");
        std::fs::write(
            self.config(),
            cfg.replace(&demo, &format!("secret = \"{TEST_TOKEN_SECRET}\"")),
        )
        .unwrap();
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn config(&self) -> PathBuf {
        self.path("config.toml")
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.arg("--config")
            .arg(self.config())
            .args(args)
            .env("RUST_LOG", "info")
            .env_remove("OPTINSYNC_CONFIG");
        c
    }

    pub fn run_ok(&self, args: &[&str]) -> String {
        let out = self.cmd(args).output().unwrap();
        assert!(
            out.status.success(),
            "optinsync {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn output(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// Start `optinsync run` and wait until its HTTP server answers.
    pub fn spawn_daemon(&self) -> Daemon {
        let log = std::fs::File::create(self.path("daemon.log")).unwrap();
        let child = self
            .cmd(&["run"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut d = Daemon { child: Some(child) };
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(status) = d.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "daemon exited early with {status}: {}",
                    std::fs::read_to_string(self.path("daemon.log")).unwrap_or_default()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(30 * LOAD_FACTOR),
                "daemon did not start listening"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        d
    }

    pub fn mails(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(self.path("var/mail"))
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "eml"))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// The confirmation link in the mail sent to `email`.
    pub fn confirm_link(&self, email: &str) -> String {
        link_in(&self.mail_to(email), "/confirm/")
    }

    pub fn unsubscribe_link(&self, email: &str) -> String {
        link_in(&self.mail_to(email), "/unsubscribe/")
    }

    pub fn mail_to(&self, email: &str) -> String {
        self.mails()
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap())
            .find(|m| {
                m.lines()
                    .any(|l| l.eq_ignore_ascii_case(&format!("To: {email}")))
            })
            .unwrap_or_else(|| panic!("no mail to {email}"))
    }

    pub fn list_members(&self) -> Vec<String> {
        std::fs::read_to_string(self.path("var/lists.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["email"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect()
    }

    pub fn contact_json(&self, email: &str) -> serde_json::Value {
        serde_json::from_str(&self.run_ok(&["contact", "show", email, "--json"])).unwrap()
    }

    pub fn state(&self, email: &str, list: &str) -> String {
        state_in(&self.contact_json(email), list)
    }

    pub fn sqlite_url(&self) -> String {
        format!("sqlite://{}", self.path("var/optinsync.db").display())
    }
}

/// The state on `list` in a `contact show --json` answer (`none` if it has none).
pub fn state_in(contact: &serde_json::Value, list: &str) -> String {
    contact["consents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["list"] == list)
        .map(|c| c["consent"]["state"].as_str().unwrap().to_owned())
        .unwrap_or_else(|| "none".into())
}

pub fn link_in(mail: &str, marker: &str) -> String {
    util::link_in(mail, marker).unwrap_or_else(|| panic!("no {marker} link in mail"))
}

pub struct Daemon {
    child: Option<Child>,
}

impl Daemon {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Send a signal by name (e.g. `"HUP"`).
    pub fn signal(&self, name: &str) {
        let pid = self.child.as_ref().unwrap().id().to_string();
        assert!(
            Command::new("kill")
                .arg(format!("-{name}"))
                .arg(pid)
                .status()
                .unwrap()
                .success()
        );
    }

    /// SIGTERM and wait; returns the exit status code.
    pub fn terminate(mut self) -> Option<i32> {
        let mut child = self.child.take().unwrap();
        Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .unwrap();
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                start.elapsed() < Duration::from_secs(30 * LOAD_FACTOR),
                "daemon did not stop after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// How much longer than on an idle machine a wait may take: CI runs the suite on 2 cores
/// under full load, where a daemon's start or a delivery can take several times as long.
/// Only the give-up point moves; a wait that succeeds returns as soon as it does.
pub const LOAD_FACTOR: u64 = 4;

/// Poll `cond` until true or panic after `secs` (times [`LOAD_FACTOR`]).
pub fn wait_until(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(secs * LOAD_FACTOR),
            "timed out waiting for {what} ({} s)",
            secs * LOAD_FACTOR
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        // Shorter than the daemon's idle keep-alive (`server.client_timeout`, 10 s), so a
        // request never goes out on a connection the daemon is closing at that moment.
        .pool_idle_timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

pub async fn all_events(url: &str) -> Vec<LedgerEvent> {
    let store = store::open(url).await.unwrap();
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let page = store.ledger_page(after, 1000).await.unwrap();
        let Some(last) = page.last() else { break };
        after = last.seq;
        out.extend(page);
    }
    out
}

pub fn write_contacts(path: &Path, n: usize) {
    let mut csv =
        String::from("Id,First_Name,Last_Name,Email,Language,Newsletter_Requested,Email_Opt_Out\n");
    for i in 0..n {
        csv.push_str(&format!(
            "{},P{i},Q{i},person{i}@example.org,en,true,false\n",
            5000 + i
        ));
    }
    std::fs::write(path, csv).unwrap();
}

impl Demo {
    /// Replace the `[connectors.ROLE]` section (with its sub-tables) of the copied config by
    /// `section`.
    pub fn replace_connector(&self, role: &str, section: &str) {
        let config = std::fs::read_to_string(self.config()).unwrap();
        let header = format!("[connectors.{role}]");
        let sub = format!("[connectors.{role}.");
        let start = config.find(&header).expect("the section exists");
        let mut end = config.len();
        let mut offset = start + header.len();
        for line in config[offset..].split_inclusive('\n') {
            let t = line.trim_start();
            if t.starts_with('[') && !t.starts_with(&sub) {
                end = offset;
                break;
            }
            offset += line.len();
        }
        let config = format!("{}{section}\n{}", &config[..start], &config[end..]);
        std::fs::write(self.config(), config).unwrap();
    }

    /// Mail over SMTP in clear text to a sink on loopback `port`, with `extra` settings
    /// (lines of `[connectors.mail]`, e.g. `"timeout_secs = 10\n"`).
    pub fn use_smtp_sink(&self, port: u16, extra: &str) {
        self.replace_connector(
            "mail",
            &format!(
                "[connectors.mail]\nkind = \"smtp\"\nhost = \"127.0.0.1\"\nport = {port}\ntls = \"none\"\n{extra}"
            ),
        );
    }

    /// No CRM contacts, and an existing campaigns list of these JSON lines (the demo's
    /// `var/lists.jsonl`): only the existing list matters.
    pub fn only_existing_list(&self, jsonl: &str) {
        std::fs::write(
            self.path("demo/contacts.csv"),
            "Id,First_Name,Last_Name,Email,Language,Newsletter_Requested,Email_Opt_Out\n",
        )
        .unwrap();
        std::fs::create_dir_all(self.path("var")).unwrap();
        std::fs::write(self.path("var/lists.jsonl"), jsonl).unwrap();
    }

    /// `optinsync campaign report --list LIST --json`, parsed.
    pub fn campaign_report(&self, list: &str) -> serde_json::Value {
        serde_json::from_str(&self.run_ok(&["campaign", "report", "--list", list, "--json"]))
            .unwrap()
    }

    /// Set list settings in the copied config (e.g. `("reminder_after", "2s")`).
    pub fn set_list_windows(&self, windows: &[(&str, &str)]) {
        let mut cfg = std::fs::read_to_string(self.config()).unwrap();
        for key in [
            "reminder_after",
            "pending_expiry",
            "inactivity",
            "revalidation_grace",
        ] {
            // Drop the shipped value so the new one is the only one.
            cfg = cfg
                .lines()
                .filter(|l| !l.starts_with(&format!("{key} =")))
                .collect::<Vec<_>>()
                .join("\n")
                + "\n";
        }
        for (k, v) in windows {
            cfg.push_str(&format!("{k} = \"{v}\"\n"));
        }
        std::fs::write(self.config(), cfg).unwrap();
    }

    /// Replace a rules file the way editors do: write a temp file, then rename it over.
    pub fn save_rule_file(&self, name: &str, content: &str) {
        let tmp = self.path(&format!("rules/.{name}.swp"));
        std::fs::write(&tmp, content).unwrap();
        std::fs::rename(&tmp, self.path(&format!("rules/{name}"))).unwrap();
    }

    /// The mail whose Message-ID the ledger recorded.
    pub fn mail_with_message_id(&self, message_id: &str) -> String {
        self.mails()
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap())
            .find(|m| m.contains(&format!("<{message_id}>")))
            .unwrap_or_else(|| panic!("no mail with Message-ID {message_id}"))
    }

    /// Ledger event kinds of one contact, in order.
    pub fn event_kinds(&self, email: &str) -> Vec<String> {
        self.contact_json(email)["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["kind"].as_str().unwrap().to_owned())
            .collect()
    }

    pub async fn metrics(&self) -> String {
        http()
            .get(format!("http://127.0.0.1:{}/metrics", self.port))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

/// A `[connectors.crm]` section for the fake Zoho CRM (Contacts, `First_Name` and
/// `Last_Name` read, `Newsletter` asserting the newsletter), with `extra` keys.
pub fn zoho_crm_section(fake: &optinsync_testkit::zoho::FakeZoho, extra: &str) -> String {
    use optinsync_testkit::zoho;
    format!(
        r#"[connectors.crm]
kind = "zoho-crm"
client_id = "{}"
client_secret = "{}"
refresh_token = "{}"
accounts_url = "{url}"
api_url = "{url}"
modules = ["Contacts"]
fields = ["First_Name", "Last_Name"]
{extra}

[connectors.crm.asserts]
newsletter = "Newsletter"
"#,
        zoho::CLIENT_ID,
        zoho::CLIENT_SECRET,
        zoho::REFRESH_TOKEN,
        url = fake.url(),
    )
}

/// Confirm the signup mailed to `email` as a browser does (page, then button); the answer
/// must be 200. Returns the link.
pub async fn confirm_mailed(demo: &Demo, client: &reqwest::Client, email: &str) -> String {
    let link = demo.confirm_link(email);
    let status = click_confirm(client, &link, "e2e-browser/1.0")
        .await
        .status();
    assert_eq!(status, 200, "confirming {email}");
    link
}

/// Open the confirmation page as a browser does and press its button: a POST carrying the
/// page's hidden fields (the per-page nonce and the page hash).
pub async fn click_confirm(
    client: &reqwest::Client,
    link: &str,
    user_agent: &str,
) -> reqwest::Response {
    let page = client
        .get(link)
        .header("user-agent", user_agent)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    client
        .post(link)
        .header("user-agent", user_agent)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form_body(&page))
        .send()
        .await
        .unwrap()
}

/// An RFC 8058 one-click unsubscribe `POST` to `link`, as mailbox providers send it.
pub async fn one_click(client: &reqwest::Client, link: &str) -> reqwest::Response {
    client
        .post(link)
        .header("content-type", "application/x-www-form-urlencoded")
        .body("List-Unsubscribe=One-Click")
        .send()
        .await
        .unwrap()
}
