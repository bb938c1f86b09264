//! The data-subject commands: `evidence export` (proof bundles, JSON and printable HTML, one
//! person or a whole list), `subject export` (the person's own data) and `retention run`.
//! All of them read stored data only; `retention run` is the one that changes anything.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use optinsync_engine::export::{self, ChainSummary};
use optinsync_engine::store::{Contact, Store};
use serde_json::{Value, json};

use crate::Failure;
use crate::commands::{boot, find_contact, load_config, open_store};

/// Output format of `evidence export`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProofFormat {
    /// Readable summary for the terminal.
    Text,
    /// The proof bundle (schema `optinsync.proof-bundle`).
    Json,
    /// The same bundle as one printable, self-contained HTML page.
    Html,
}

fn verify_failure(e: export::ExportError) -> Failure {
    Failure::Runtime(anyhow::Error::new(e))
}

fn write_out(out: Option<&Path>, text: &str) -> Result<(), Failure> {
    match out {
        Some(path) => std::fs::write(path, text)
            .with_context(|| format!("writing {}", path.display()))
            .map_err(Failure::Runtime),
        None => {
            println!("{text}");
            Ok(())
        }
    }
}

fn pretty(v: &Value) -> Result<String, Failure> {
    Ok(serde_json::to_string_pretty(v).context("formatting JSON")?)
}

/// `evidence export EMAIL [--format text|json|html] [--out FILE]`.
pub async fn evidence_export(
    path: &Path,
    raw_email: &str,
    format: ProofFormat,
    out: Option<&Path>,
) -> Result<(), Failure> {
    let config = load_config(path)?;
    let store = open_store(&config).await?;
    let contact = find_contact(store.as_ref().into(), raw_email).await?;
    // The bundle is only worth anything if the ledger it quotes is intact.
    let chain = export::verify_ledger(store.as_ref())
        .await
        .map_err(verify_failure)?;
    let bundle = export::proof_bundle(
        &config,
        store.as_ref(),
        &contact,
        &chain,
        chrono::Utc::now(),
    )
    .await
    .map_err(verify_failure)?;
    match format {
        ProofFormat::Json => write_out(out, &pretty(&bundle)?),
        ProofFormat::Html => write_out(out, &export::proof_html(&bundle).map_err(verify_failure)?),
        ProofFormat::Text => write_out(out, &proof_text(&bundle)),
    }
}

/// The bundle as plain text (the terminal view).
fn proof_text(b: &Value) -> String {
    let s = |v: &Value| v.as_str().unwrap_or("-").to_owned();
    let mut out = format!(
        "Evidence of consent for {} (contact {})\nLedger verified: {} events, head seq {} hash {}\n",
        s(&b["subject"]["email"]),
        s(&b["subject"]["contact_id"]),
        b["ledger"]["events_checked"],
        b["ledger"]["head_seq"],
        s(&b["ledger"]["head_hash"])
    );
    for c in b["consent"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "List {}: {} since {}{}\n",
            s(&c["list"]),
            s(&c["state"]),
            s(&c["since"]),
            c["confirmed_at"]
                .as_str()
                .map(|t| format!(", confirmed {t}"))
                .unwrap_or_default()
        ));
    }
    for e in b["events"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "\n#{} {}  {}: {} -> {} ({}) by {}\n   event hash {}\n",
            e["seq"],
            s(&e["at"]),
            s(&e["list_id"]),
            s(&e["from_state"]),
            s(&e["to_state"]),
            s(&e["kind"]),
            s(&e["source"]),
            s(&e["hash"])
        ));
        if let Some(ev) = e["evidence"].as_object() {
            for (k, v) in ev {
                out.push_str(&format!(
                    "   {k}: {}\n",
                    v.as_str().unwrap_or(&v.to_string())
                ));
            }
        }
    }
    if let Some(texts) = b["texts"].as_object().filter(|t| !t.is_empty()) {
        out.push_str("\nTexts shown (stored snapshots, by hash):\n");
        for (hash, t) in texts {
            out.push_str(&format!(
                "--- {} [{}] sha256 {hash}\n",
                s(&t["kind"]),
                s(&t["language"])
            ));
            if let Some(subject) = t["subject"].as_str() {
                out.push_str(&format!("Subject: {subject}\n"));
            }
            out.push_str(t["text"].as_str().or(t["html"].as_str()).unwrap_or(""));
            out.push('\n');
        }
    }
    out
}

/// `evidence export --all --list NAME --out DIR`: one bundle per contact with consent on the
/// list (`<contact id>.json` and `.html`; ids, not addresses, name the files), plus
/// `index.json` and `index.html`.
pub async fn evidence_export_all(path: &Path, list_id: &str, dir: &Path) -> Result<(), Failure> {
    let config = load_config(path)?;
    let Some(list) = config.list(list_id).cloned() else {
        let known: Vec<&str> = config.config.lists.iter().map(|l| l.id.as_str()).collect();
        return Err(Failure::Config(anyhow::anyhow!(
            "no list `{list_id}` in the config (lists: {})",
            known.join(", ")
        )));
    };
    let store = open_store(&config).await?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let chain = export::verify_ledger(store.as_ref())
        .await
        .map_err(verify_failure)?;
    let members = list_members(store.as_ref(), &list.id).await?;
    let bar = indicatif::ProgressBar::new(members.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} {wide_bar} {pos}/{len} bundles ({eta} left)",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(format!("exporting {}", list.id));
    let generated_at = chrono::Utc::now();
    let mut index = Vec::with_capacity(members.len());
    for contact in &members {
        let bundle = export::proof_bundle(&config, store.as_ref(), contact, &chain, generated_at)
            .await
            .map_err(verify_failure)?;
        let html = export::proof_html(&bundle).map_err(verify_failure)?;
        let base: PathBuf = dir.join(&contact.id);
        write_out(Some(&base.with_extension("json")), &pretty(&bundle)?)?;
        write_out(Some(&base.with_extension("html")), &html)?;
        let consent = bundle["consent"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["list"] == list.id.as_str())
            .cloned()
            .unwrap_or(Value::Null);
        index.push(json!({
            "contact_id": contact.id,
            "email": contact.email,
            "state": consent["state"],
            "confirmed_at": consent["confirmed_at"],
            "json": format!("{}.json", contact.id),
            "html": format!("{}.html", contact.id),
        }));
        bar.inc(1);
    }
    bar.finish_and_clear();
    let index = json!({
        "schema": "optinsync.proof-index",
        "version": 1,
        "generated_at": generated_at,
        "list": list.id,
        "list_name": list.name,
        "ledger": chain_json(&chain),
        "bundles": index,
    });
    write_out(Some(&dir.join("index.json")), &pretty(&index)?)?;
    write_out(Some(&dir.join("index.html")), &index_html(&index)?)?;
    println!(
        "exported {} proof bundle(s) of list {} to {} (JSON and HTML, index.html); ledger verified: {} events, head seq {}",
        members.len(),
        list.id,
        dir.display(),
        chain.events_checked,
        chain.head_seq
    );
    Ok(())
}

fn chain_json(c: &ChainSummary) -> Value {
    json!({ "verified": c.verified, "events_checked": c.events_checked, "head_seq": c.head_seq, "head_hash": c.head_hash })
}

/// Contacts with a recorded consent (any state) on `list_id`, in id order.
async fn list_members(store: &dyn Store, list_id: &str) -> Result<Vec<Contact>, Failure> {
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = store
            .contacts_page(after.as_deref(), 500)
            .await
            .context("reading contacts")?;
        let Some(last) = page.last() else { break };
        after = Some(last.id.clone());
        for c in page {
            let consents = store
                .consents_of_contact(&c.id)
                .await
                .context("reading consent")?;
            if consents.iter().any(|(l, _)| l == list_id) {
                out.push(c);
            }
        }
    }
    Ok(out)
}

fn index_html(index: &Value) -> Result<String, Failure> {
    const TEMPLATE: &str = r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Proof bundles: {{ i.list_name }}</title>
<style>body{font-family:Georgia,serif;margin:2em auto;max-width:60em}table{border-collapse:collapse;width:100%}th,td{border:1px solid #bbb;padding:.25em .45em;text-align:left}th{background:#eee}code{font-family:monospace}</style>
</head><body>
<h1>Proof bundles of list {{ i.list_name }} (<code>{{ i.list }}</code>)</h1>
<p>Generated {{ i.generated_at }}. Ledger verified: {{ i.ledger.events_checked }} events, head #{{ i.ledger.head_seq }} <code>{{ i.ledger.head_hash }}</code>.</p>
<table><tr><th>Address</th><th>State</th><th>Confirmed at</th><th>Bundle files</th></tr>
{% for b in i.bundles %}<tr><td>{{ b.email }}</td><td>{{ b.state }}</td><td>{{ b.confirmed_at or "never" }}</td><td><code>{{ b.html }}</code>, <code>{{ b.json }}</code></td></tr>
{% endfor %}</table></body></html>
"#;
    let mut env = minijinja::Environment::new();
    env.add_template("index.html", TEMPLATE)
        .context("index template")?;
    let t = env.get_template("index.html").context("index template")?;
    Ok(
        t.render(minijinja::context! { i => minijinja::Value::from_serialize(index) })
            .context("rendering the index")?,
    )
}

/// `subject export EMAIL [--out FILE]`: the person's data (schema `optinsync.subject-export`).
pub async fn subject_export(
    path: &Path,
    raw_email: &str,
    out: Option<&Path>,
) -> Result<(), Failure> {
    let config = load_config(path)?;
    let store = open_store(&config).await?;
    let contact = find_contact(store.as_ref().into(), raw_email).await?;
    let keys = config.config.tokens.keys();
    let suppressed = store
        .is_any_suppressed(&keys.address_hashes(&contact.email))
        .await
        .context("reading the suppression list")?;
    let doc = export::subject_export(
        &config,
        store.as_ref(),
        &contact,
        suppressed,
        chrono::Utc::now(),
    )
    .await
    .map_err(verify_failure)?;
    write_out(out, &pretty(&doc)?)?;
    if let Some(p) = out {
        eprintln!(
            "subject export of contact {} written to {}",
            contact.id,
            p.display()
        );
    }
    Ok(())
}

/// `retention run [--dry-run] [--json]`.
pub async fn retention_run(path: &Path, dry_run: bool, json: bool) -> Result<(), Failure> {
    let engine = boot(path).await?;
    let r = &engine.settings().retention;
    if !r.enabled() {
        return Err(Failure::Config(anyhow::anyhow!(
            "no retention period is configured: set `[retention] withdrawn_proof` and/or `unconfirmed`"
        )));
    }
    let report = engine
        .apply_retention(dry_run)
        .await
        .context("applying retention")?;
    // Like `erase`: hand the queued removals and CRM opt-outs over now.
    if !dry_run && !report.purged.is_empty() {
        engine
            .drain_outbox(&crate::commands::worker_id())
            .await
            .context("delivering removals")?;
    }
    if json {
        println!(
            "{}",
            pretty(&serde_json::to_value(&report).context("formatting JSON")?)?
        );
        return Ok(());
    }
    let verb = if dry_run { "would purge" } else { "purged" };
    println!(
        "retention{}: {} contacts checked; {verb} {} after withdrawal (withdrawn_proof) and {} never-confirmed signups (unconfirmed){}",
        if dry_run {
            " (dry run, nothing changed)"
        } else {
            ""
        },
        report.contacts_checked,
        report.withdrawn_proof,
        report.unconfirmed,
        if dry_run {
            String::new()
        } else {
            format!(
                "; evidence removed from {} ledger event(s); the addresses stay as keyed hashes on the suppression list",
                report.events_redacted
            )
        }
    );
    for p in &report.purged {
        println!(
            "  {} {} (last consent change {})",
            p.contact_id,
            p.category.as_str(),
            p.last_change.to_rfc3339()
        );
    }
    Ok(())
}
