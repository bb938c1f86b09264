//! What the harnesses and the end-to-end tests share: the synthetic addresses, clicking a
//! confirmation link like a browser, finding a link in a mail, copying the set-up, reading the
//! whole ledger.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use super::{LedgerEvent, Store};

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
