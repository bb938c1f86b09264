//! Commands that read or change the store outside the daemon: `migrate`, `ledger verify`,
//! `contact show`, `status`, `campaign import-existing`, `erase`.

use std::path::Path;

use anyhow::Context as _;
use optinsync_engine::email;
use optinsync_engine::operator;

use super::{boot, find_contact, load_config, open_store, since_text, worker_id};
use crate::Failure;

pub async fn migrate(path: &Path) -> Result<(), Failure> {
    let config = load_config(path)?;
    open_store(&config).await?;
    println!("migrations applied");
    Ok(())
}

pub async fn ledger_verify(path: &Path) -> Result<(), Failure> {
    let config = load_config(path)?;
    let store = open_store(&config).await?;
    let v = operator::verify_ledger(store.as_ref(), chrono::Utc::now())
        .await
        .context("reading the ledger")?;
    // Kept for the operator console's "last verification"; failing to keep it changes nothing
    // about the result.
    if let Err(e) = operator::record_verification(store.as_ref(), &v).await {
        eprintln!("note: the result could not be recorded for the console: {e}");
    }
    if let Some(e) = v.error {
        return Err(Failure::Runtime(anyhow::anyhow!(
            "ledger verification FAILED: {e}"
        )));
    }
    match v.events_checked {
        0 => println!("ledger verified: empty"),
        n => println!(
            "ledger verified: {n} events, head seq {} hash {}",
            v.head_seq, v.head_hash
        ),
    }
    Ok(())
}

pub async fn contact_show(path: &Path, raw_email: &str, json: bool) -> Result<(), Failure> {
    let config = load_config(path)?;
    let store = open_store(&config).await?;
    let contact = find_contact(store.as_ref().into(), raw_email).await?;
    let consents = store
        .consents_of_contact(&contact.id)
        .await
        .context("reading consent")?;
    let events = store
        .events_of_contact(&contact.id)
        .await
        .context("reading the ledger")?;
    if json {
        // The same JSON as the admin API's `GET /admin/contacts/{email}`.
        let value = optinsync_web::admin::contact_json(&contact, &consents, &events);
        println!(
            "{}",
            serde_json::to_string_pretty(&value).context("formatting JSON")?
        );
        return Ok(());
    }
    println!("contact {} <{}>", contact.id, contact.email);
    println!("  language: {}", contact.language.as_deref().unwrap_or("-"));
    println!(
        "  CRM records: {}",
        if contact.crm_records.is_empty() {
            "-".to_owned()
        } else {
            contact
                .crm_records
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    println!("consent:");
    if consents.is_empty() {
        println!("  (none recorded)");
    }
    for (list, c) in &consents {
        println!("  {list:<16} {:<12} {}", c.state.as_str(), since_text(c));
    }
    println!("history:");
    for entry in optinsync_web::admin::timeline(&events) {
        println!("  {}", entry.line);
        for (name, value) in entry.fields {
            println!("           {name}: {value}");
        }
    }
    Ok(())
}

pub async fn import_existing(path: &Path, list_id: &str) -> Result<(), Failure> {
    let engine = boot(path).await?;
    let Some(list) = engine.list(list_id).cloned() else {
        let known: Vec<&str> = engine.lists().iter().map(|l| l.id.as_str()).collect();
        return Err(Failure::Config(anyhow::anyhow!(
            "no list `{list_id}` in the config (lists: {})",
            known.join(", ")
        )));
    };
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let stats = engine
        .import_existing(&list, |s| {
            if tty {
                eprint!(
                    "\rimporting: {} members read, {} asserted",
                    s.members, s.asserted
                );
            }
        })
        .await
        .context("importing the existing list")?;
    if tty {
        eprintln!();
    }
    println!(
        "import-existing {}: {} members; {} taken in as asserted (the rules will ask them to confirm), {} already known, {} removed (withdrawn earlier), {} invalid",
        list.id, stats.members, stats.asserted, stats.already_known, stats.removed, stats.invalid
    );
    Ok(())
}

pub async fn status(path: &Path, json: bool) -> Result<(), Failure> {
    let config = load_config(path)?;
    let store = open_store(&config).await?;
    let summary = store.consent_summary().await.context("reading consent")?;
    let outbox = store.outbox_counts().await.context("reading the outbox")?;
    // Open signups settle by the end of their list's pending window (asserted ones are about
    // to be asked, so their window starts now).
    let forecast = optinsync_web::admin::settled_by(&config, &summary, chrono::Utc::now());
    let mut waves = std::collections::BTreeMap::new();
    for list in &config.config.lists {
        let state = optinsync_engine::waves::state_in(store.as_ref(), &list.id)
            .await
            .context("reading the list's waves")?;
        waves.insert(list.id.clone(), state);
    }
    if json {
        // The same JSON as the admin API's `GET /admin/status`.
        let v = optinsync_web::admin::status_json(&summary, &outbox, &forecast, &waves);
        println!(
            "{}",
            serde_json::to_string_pretty(&v).context("formatting JSON")?
        );
        return Ok(());
    }
    for list in &config.config.lists {
        println!("{} ({})", list.id, list.name);
        let rows: Vec<_> = summary.iter().filter(|r| r.list_id == list.id).collect();
        if rows.is_empty() {
            println!("  no consent recorded yet");
        }
        for r in rows {
            println!("  {:<13} {:>9}", r.state, r.count);
        }
        if let Some(end) = forecast.get(&list.id) {
            println!(
                "  open signups settle by {} (confirm, or lapse at the end of their window)",
                end.format("%Y-%m-%d %H:%M UTC")
            );
        }
        if let Some(p) = waves.get(&list.id).and_then(|w| w.paused.as_ref()) {
            println!(
                "  waves PAUSED since {} by the stop rules: {} (resume: optinsync campaign resume --list {})",
                p.at.format("%Y-%m-%d %H:%M UTC"),
                p.reason,
                list.id
            );
        }
    }
    println!(
        "outbox: {} pending, {} done, {} dead letters",
        outbox.pending, outbox.done, outbox.dead
    );
    Ok(())
}

pub async fn erase(path: &Path, raw_email: &str) -> Result<(), Failure> {
    // A typo in the address is a usage error before anything starts.
    email::normalise(raw_email)
        .map_err(|e| Failure::Config(anyhow::anyhow!("`{raw_email}`: {e}")))?;
    let engine = boot(path).await?;
    let contact = find_contact(engine.reads(), raw_email).await?;
    let report = engine.erase(&contact).await.context("erasing")?;
    // Queue the removals now rather than at the next daemon pass (legal deadline).
    let delivered = engine
        .drain_outbox(&worker_id())
        .await
        .context("delivering removals")?;
    println!(
        "erased contact {}: withdrawn and suppressed on {} list(s), evidence removed from {} ledger event(s), {} finished outbox row(s) scrubbed, {} removal(s) and CRM opt-out(s) delivered{}",
        contact.id,
        report.lists,
        report.store.redacted_events,
        report.store.scrubbed_outbox_rows,
        delivered.done,
        if report.store.legacy_events > 0 {
            format!(
                "; {} event(s) recorded before evidence digests existed keep their evidence (removing it would break the chain)",
                report.store.legacy_events
            )
        } else {
            String::new()
        }
    );
    println!(
        "the address stays only as a keyed hash on the suppression list, so it is never mailed again"
    );
    Ok(())
}
