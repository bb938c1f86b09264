//! What the harnesses and the end-to-end tests share: the synthetic addresses, clicking a
//! confirmation link like a browser, finding a link in a mail, copying the set-up, reading the
//! whole ledger.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use super::{LedgerEvent, Store};
use crate::smtp::{self, ParsedMail, Received};
use crate::zoho;

/// The first five, for a message that names examples.
pub fn first(v: &[String]) -> &[String] {
    &v[..v.len().min(5)]
}

/// The address of synthetic contact `i` (the fake Zoho CRM's seeded records).
pub fn email_of(i: usize) -> String {
    format!("person{i}@example.org")
}

/// The hidden form fields of a page (`<input type="hidden" name=".." value="..">`).
pub fn hidden_fields(page: &str) -> Vec<(String, String)> {
    page.split("<input ")
        .skip(1)
        .filter(|i| i.contains("type=\"hidden\""))
        .filter_map(|i| {
            let attr = |name: &str| {
                i.split(&format!("{name}=\""))
                    .nth(1)
                    .and_then(|r| r.split('"').next())
                    .map(str::to_owned)
            };
            Some((attr("name")?, attr("value")?))
        })
        .collect()
}

/// The page's hidden fields as the form body its button posts (`nonce=..&page=..`).
pub fn form_body(page: &str) -> String {
    hidden_fields(page)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// The first `http…` word of a mail containing `marker`.
pub fn link_in(text: &str, marker: &str) -> Option<String> {
    text.split(|c: char| c.is_whitespace() || c == '<' || c == '>' || c == '"' || c == ',')
        .find(|w| w.starts_with("http") && w.contains(marker))
        .map(str::to_owned)
}

/// The `optinsync` binary a harness example runs: `OPTINSYNC_BIN`, else the one beside the
/// example's directory (`target/<profile>/examples/x` → `target/<profile>/optinsync`, the same
/// build); when neither exists, what to do about it.
pub fn binary_for_example() -> Result<PathBuf, &'static str> {
    if let Some(p) = std::env::var_os("OPTINSYNC_BIN") {
        return Ok(PathBuf::from(p));
    }
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent()?.parent().map(|d| d.join("optinsync")))
        .filter(|p| p.exists())
        .ok_or(
            "optinsync binary not found beside the example: run `cargo build --bin optinsync` (same profile) or set OPTINSYNC_BIN",
        )
}

/// The HTTP client the harnesses' people click with.
pub fn people_client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        // Below the daemon's idle keep-alive (10 s): never reuse a closing connection.
        .pool_idle_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .build()
        .expect("HTTP client")
}

/// A Message-ID without its angle brackets.
pub fn bare_message_id(id: &str) -> String {
    id.trim().trim_matches(|c| c == '<' || c == '>').to_owned()
}

/// The Message-ID an event's evidence records (a `*_mail_sent` event), without brackets.
pub fn evidence_message_id(e: &LedgerEvent) -> Option<String> {
    let ev: serde_json::Value = serde_json::from_str(&e.evidence).unwrap_or_default();
    ev.get("message_id")
        .and_then(|m| m.as_str())
        .map(bare_message_id)
}

/// Message-ID → how many `*_mail_sent` events record it.
pub fn recorded_message_ids(events: &[LedgerEvent]) -> HashMap<String, usize> {
    let mut recorded = HashMap::new();
    for e in events {
        if e.kind.ends_with("_mail_sent")
            && let Some(mid) = evidence_message_id(e)
        {
            *recorded.entry(mid).or_default() += 1;
        }
    }
    recorded
}

/// The mails the SMTP sink received, per recipient.
#[derive(Debug, Default)]
pub struct Mailbox {
    /// Sink messages already filed.
    pub read: usize,
    /// Recipient (lower case) → (Message-ID, sink index) in arrival order.
    pub by_recipient: HashMap<String, Vec<(String, usize)>>,
}

/// A mail [`Mailbox::file`] just filed.
#[derive(Debug)]
pub struct NewMail {
    /// The recipient, lower case.
    pub to: String,
    pub mail: ParsedMail,
    /// The recipient's first mail.
    pub first: bool,
}

impl Mailbox {
    /// File the sink messages from index `start` on (`new`, as [`smtp::SmtpSink::messages_since`]
    /// returned them); the filed mails, in order.
    pub fn file(&mut self, start: usize, new: &[Received]) -> Vec<NewMail> {
        self.read = start + new.len();
        let mut filed = Vec::new();
        for (n, m) in new.iter().enumerate() {
            let Some(to) = m.rcpt_to.first().map(|t| t.to_ascii_lowercase()) else {
                continue;
            };
            let mail = smtp::parse(&m.data);
            let mid = bare_message_id(mail.header("Message-ID").unwrap_or_default());
            let entry = self.by_recipient.entry(to.clone()).or_default();
            let first = entry.is_empty();
            entry.push((mid, start + n));
            filed.push(NewMail { to, mail, first });
        }
        filed
    }

    /// Mails received in all.
    pub fn count(&self) -> usize {
        self.by_recipient.values().map(Vec::len).sum()
    }

    /// Synthetic contacts `0..contacts` ([`email_of`]) against the Message-IDs the ledger
    /// records ([`recorded_message_ids`]).
    pub fn check(&self, contacts: usize, recorded: &HashMap<String, usize>) -> MailCheck<'_> {
        let mut check = MailCheck::default();
        for i in 0..contacts {
            let email = email_of(i);
            let Some(mails) = self.by_recipient.get(&email) else {
                check.without_mail.push(email);
                continue;
            };
            for (mid, _) in mails {
                if !recorded.contains_key(mid) && !check.unrecorded.iter().any(|(_, m)| m == mid) {
                    check.unrecorded.push((email.clone(), mid.clone()));
                }
            }
            if mails.len() < 2 {
                continue;
            }
            let mut ids: Vec<&str> = mails.iter().map(|(m, _)| m.as_str()).collect();
            ids.sort_unstable();
            ids.dedup();
            check.duplicates.push(Copies {
                ledger_records: recorded.get(mails[0].0.as_str()).copied().unwrap_or(0),
                message_ids: ids.len(),
                mails,
                email,
            });
        }
        check
    }
}

/// What [`Mailbox::check`] found.
#[derive(Debug, Default)]
pub struct MailCheck<'a> {
    /// Contacts that never got a mail.
    pub without_mail: Vec<String>,
    /// `(email, Message-ID)` of the mails no ledger event records, each Message-ID once.
    pub unrecorded: Vec<(String, String)>,
    /// Contacts that got more than one mail.
    pub duplicates: Vec<Copies<'a>>,
}

/// The mails of a contact that got more than one.
#[derive(Debug)]
pub struct Copies<'a> {
    pub email: String,
    /// (Message-ID, sink index) in arrival order.
    pub mails: &'a [(String, usize)],
    /// Distinct Message-IDs among them (1 = the same outbox row each time).
    pub message_ids: usize,
    /// How many `*_mail_sent` events record the first one's Message-ID.
    pub ledger_records: usize,
}

/// Start `optinsync --config CONFIG run` with its log appended to `log`, after a line naming
/// the start (`===== harness: {start} =====`).
pub fn spawn_daemon(bin: &Path, config: &Path, log: &Path, start: &str) -> anyhow::Result<Child> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    writeln!(file, "===== harness: {start} =====")?;
    Command::new(bin)
        .arg("--config")
        .arg(config)
        .arg("run")
        .env("RUST_LOG", "info")
        .env_remove("OPTINSYNC_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))
}

/// The last 30 lines of a daemon's log.
pub fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// SIGTERM, and wait for the daemon to stop; past `timeout` it is killed and this fails.
pub async fn terminate(child: &mut Child, timeout: Duration) -> anyhow::Result<()> {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let t = Instant::now();
    while child.try_wait()?.is_none() {
        if t.elapsed() > timeout {
            child.kill()?;
            bail!("a daemon did not stop after SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// The end of a report: the kept directory, then each guarantee violated, or that all held.
pub fn print_outcome(dir: Option<&Path>, violations: &[String]) {
    if let Some(dir) = dir {
        println!("  working directory    {} (kept)", dir.display());
    }
    if violations.is_empty() {
        println!("  result               all guarantees held");
    } else {
        for x in violations {
            println!("  VIOLATED             {x}");
        }
    }
}

/// The repository's shipped `config.toml`, edited for a daemon under test. Each edit fails when
/// the shipped file no longer holds what it replaces: a harness must not quietly run another
/// set-up than the one it describes.
#[derive(Debug, Clone)]
pub struct ShippedConfig(String);

impl ShippedConfig {
    pub fn read(repo: &Path) -> anyhow::Result<ShippedConfig> {
        let text =
            std::fs::read_to_string(repo.join("config.toml")).context("reading config.toml")?;
        Ok(ShippedConfig(text))
    }

    /// Replace the first `from` with `to`.
    pub fn replace(&mut self, from: &str, to: &str) -> anyhow::Result<()> {
        if !self.0.contains(from) {
            bail!("shipped config.toml changed: `{from}` not found");
        }
        self.0 = self.0.replacen(from, to, 1);
        Ok(())
    }

    /// Replace the sections from the one headed `first` up to the one headed `next` with `with`.
    pub fn replace_sections(&mut self, first: &str, next: &str, with: &str) -> anyhow::Result<()> {
        let (Some(start), Some(end)) = (self.0.find(first), self.0.find(next)) else {
            bail!("shipped config.toml changed: no {first} / {next}");
        };
        self.0 = format!("{}{with}{}", &self.0[..start], &self.0[end..]);
        Ok(())
    }

    /// Listen on, and publish links to, `127.0.0.1:{port}`.
    pub fn serve_on(&mut self, port: u16) -> anyhow::Result<()> {
        self.replace(
            "listen = \"127.0.0.1:8080\"",
            &format!("listen = \"127.0.0.1:{port}\""),
        )?;
        self.replace(
            "public_url = \"http://127.0.0.1:8080\"",
            &format!("public_url = \"http://127.0.0.1:{port}\""),
        )
    }

    /// The store at `url` instead of the shipped SQLite file.
    pub fn store(&mut self, url: &str) -> anyhow::Result<()> {
        self.replace(
            "url = \"sqlite://var/optinsync.db\"",
            &format!("url = \"{url}\""),
        )
    }

    /// Per-IP and global rate limits of the public pages raised to `limit` (every client of a
    /// harness is 127.0.0.1).
    pub fn lift_rate_limits(&mut self, limit: u64) -> anyhow::Result<()> {
        self.replace(
            "[server]\n",
            &format!(
                "[server]\nrate_limit_per_minute = {limit}\nglobal_rate_limit_per_second = {limit}\n"
            ),
        )
    }

    /// A token secret of our own: the published demo secret is refused once mail goes over SMTP.
    pub fn secret(&mut self, secret: &str) -> anyhow::Result<()> {
        self.replace(
            "secret = \"demo-only-secret-change-me-0123456789abcdef\"",
            &format!("secret = \"{secret}\""),
        )
    }

    /// Mail over SMTP to `127.0.0.1:{port}` (the sink), unthrottled, instead of `.eml` files.
    pub fn smtp_to(&mut self, port: u16) -> anyhow::Result<()> {
        self.replace(
            "[connectors.mail]\nkind = \"eml\"\ndir = \"var/mail\"\n",
            &format!(
                "[connectors.mail]\nkind = \"smtp\"\nhost = \"127.0.0.1\"\nport = {port}\ntls = \"none\"\ntimeout_secs = 10\nrate_per_minute = 1000000\n"
            ),
        )
    }

    /// After [`Self::smtp_to`]: at most `n` connections, so at most `n` mails in flight.
    pub fn smtp_pool(&mut self, n: u32) -> anyhow::Result<()> {
        self.replace(
            "rate_per_minute = 1000000\n",
            &format!("rate_per_minute = 1000000\npool_size = {n}\n"),
        )
    }

    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        Ok(std::fs::write(path, &self.0)?)
    }
}

/// The `[connectors.crm]` sections for the fake Zoho CRM at `url`: its Contacts, the
/// newsletter asserted by the `Newsletter` field; `extra` goes into `[connectors.crm]`.
pub fn zoho_crm_section(url: &str, extra: &str) -> String {
    format!(
        "[connectors.crm]\nkind = \"zoho-crm\"\nclient_id = \"{}\"\nclient_secret = \"{}\"\nrefresh_token = \"{}\"\n\
         accounts_url = \"{url}\"\napi_url = \"{url}\"\nmodules = [\"Contacts\"]\n{extra}fields = [\"First_Name\", \"Last_Name\"]\n\n\
         [connectors.crm.asserts]\nnewsletter = \"Newsletter\"\n\n",
        zoho::CLIENT_ID,
        zoho::CLIENT_SECRET,
        zoho::REFRESH_TOKEN,
    )
}

/// Copy the files (not the subdirectories) of `from` into `to`.
pub fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let p = e?.path();
        if p.is_file() {
            let name = p.file_name().context("file name")?;
            std::fs::copy(&p, to.join(name))?;
        }
    }
    Ok(())
}

/// Copy the repository's `rules/` and `templates/<language>/` into a daemon's directory.
pub fn copy_setup(repo: &Path, dir: &Path) -> anyhow::Result<()> {
    copy_dir(&repo.join("rules"), &dir.join("rules"))?;
    for lang in std::fs::read_dir(repo.join("templates"))? {
        let lang = lang?.path();
        if lang.is_dir() {
            let name = lang.file_name().context("template directory name")?;
            copy_dir(&lang, &dir.join("templates").join(name))?;
        }
    }
    Ok(())
}

/// Every ledger event, in order.
pub async fn all_events(store: &dyn Store) -> anyhow::Result<Vec<LedgerEvent>> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let page = store.ledger_page(after, 5000).await?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        out.extend(page);
    }
    Ok(out)
}

/// Open the confirmation page as a browser does and press its button; the POST's status.
pub async fn confirm(client: &reqwest::Client, link: &str) -> Result<u16, reqwest::Error> {
    let page = client.get(link).send().await?;
    if page.status() != reqwest::StatusCode::OK {
        return Ok(page.status().as_u16());
    }
    let page = page.text().await?;
    let resp = client
        .post(link)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form_body(&page))
        .send()
        .await?;
    Ok(resp.status().as_u16())
}
