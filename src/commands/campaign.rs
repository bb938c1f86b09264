//! `campaign plan`, `campaign resume`, `campaign report`: the re-permission waves of a list
//! (`optinsync_engine::waves`).

use std::path::Path;

use anyhow::Context as _;
use optinsync_engine::config::ListConfig;
use optinsync_engine::engine::Engine;
use optinsync_engine::ledger::EventSource;
use optinsync_engine::waves::report::Figure;

use super::boot;
use crate::Failure;

/// The list `id`, or a usage error naming the configured ones.
fn list_of(engine: &Engine, id: &str) -> Result<ListConfig, Failure> {
    engine.list(id).cloned().ok_or_else(|| {
        let known: Vec<&str> = engine.lists().iter().map(|l| l.id.as_str()).collect();
        Failure::Config(anyhow::anyhow!(
            "no list `{id}` in the config (lists: {})",
            known.join(", ")
        ))
    })
}

/// The lists a command covers: `--list ID`, or all.
fn lists_of(engine: &Engine, id: Option<&str>) -> Result<Vec<ListConfig>, Failure> {
    match id {
        Some(id) => Ok(vec![list_of(engine, id)?]),
        None => Ok(engine.lists().to_vec()),
    }
}

pub async fn campaign_plan(
    path: &Path,
    list: Option<&str>,
    days: u32,
    json: bool,
) -> Result<(), Failure> {
    let engine = boot(path).await?;
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut forecasts = Vec::new();
    for list in lists_of(&engine, list)? {
        let f = engine
            .forecast(&list, days, |n| {
                if tty {
                    eprint!("\r{}: {n} contacts read", list.id);
                }
            })
            .await
            .with_context(|| format!("forecasting list `{}`", list.id))?;
        if tty {
            eprintln!();
        }
        forecasts.push(f);
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&forecasts).context("formatting JSON")?
        );
        return Ok(());
    }
    for f in &forecasts {
        let paced = if f.paced.is_empty() {
            "no sending plan: every mail the rules start goes out at once".to_owned()
        } else {
            let caps: Vec<String> = f
                .paced
                .iter()
                .map(|(k, cap)| format!("{k} {cap}/day today"))
                .collect();
            format!("paced: {}", caps.join(", "))
        };
        println!("campaign plan {}: {} contacts; {paced}", f.list, f.contacts);
        if let Some(p) = &f.paused {
            println!("  {p}");
        }
        println!("  assumes {}", f.assumes);
        println!(
            "  {:>3}  {:<14}  {:>7}  {:>8}  {:>13}  {:>7}  {:>6}  {:>13}",
            "day", "starts", "doi", "reminder", "re-permission", "held", "lapsed", "re-perm. ended"
        );
        // Plan days shorter than a day (drills) need the time too.
        let format = if f.days.len() > 1
            && f.days[1].starts - f.days[0].starts < chrono::Duration::days(1)
        {
            "%m-%d %H:%M:%S"
        } else {
            "%Y-%m-%d"
        };
        for d in &f.days {
            println!(
                "  {:>3}  {:<14}  {:>7}  {:>8}  {:>13}  {:>7}  {:>6}  {:>13}",
                d.day,
                d.starts.format(format),
                d.doi,
                d.reminder,
                d.revalidation,
                d.held,
                d.lapsed,
                d.revalidations_ended
            );
        }
    }
    Ok(())
}

pub async fn campaign_resume(path: &Path, list: &str) -> Result<(), Failure> {
    let engine = boot(path).await?;
    let list = list_of(&engine, list)?;
    let state = engine
        .wave_state(&list.id)
        .await
        .context("reading the list's waves")?;
    let Some(pause) = state.paused else {
        return Err(Failure::Runtime(anyhow::anyhow!(
            "list `{}` is not paused: nothing to resume",
            list.id
        )));
    };
    let resume = engine
        .resume_waves(&list, EventSource::Cli)
        .await
        .context("resuming")?;
    println!(
        "resumed list `{}` (paused at {}: {}); ledger event {}; the stop rules judge only what is sent from now on",
        list.id,
        pause.at.format("%Y-%m-%d %H:%M:%S UTC"),
        pause.reason,
        resume.event_seq
    );
    Ok(())
}

pub async fn campaign_report(path: &Path, list: &str, json: bool) -> Result<(), Failure> {
    let engine = boot(path).await?;
    let list = list_of(&engine, list)?;
    let report = engine
        .campaign_report(&list)
        .await
        .context("reading the list's ledger")?;
    let state = engine
        .wave_state(&list.id)
        .await
        .context("reading the list's waves")?;
    if json {
        let v = serde_json::json!({ "report": report, "waves": state });
        println!(
            "{}",
            serde_json::to_string_pretty(&v).context("formatting JSON")?
        );
        return Ok(());
    }
    println!("campaign report {} ({})", list.id, list.name);
    let line = |label: &str, f: &Figure| {
        let when = match (f.first, f.last) {
            (Some(a), Some(b)) => format!(
                "  {} .. {}",
                a.format("%Y-%m-%d %H:%M"),
                b.format("%Y-%m-%d %H:%M")
            ),
            _ => String::new(),
        };
        println!("  {label:<28} {:>8} contacts{when}", f.contacts);
    };
    line("taken in (asserted)", &report.asserted);
    line("asked (DOI mail sent)", &report.doi_mails);
    line("reminded", &report.reminders);
    line("asked again (re-permission)", &report.revalidation_mails);
    line("confirmed", &report.confirmed);
    line("lapsed (no answer in time)", &report.lapsed);
    line("unsubscribed", &report.unsubscribed);
    line("bounced hard (suppressed)", &report.bounced_hard);
    println!(
        "  {:<28} {:>8} events",
        "bounced soft (counted)", report.bounced_soft.events
    );
    println!(
        "  {:<28} {:>8} refusals",
        "refused for policy", report.policy_refusals
    );
    line("complained", &report.complained);
    line("removed", &report.removed);
    println!(
        "  stop rules: paused {} time(s), resumed {} time(s); {}",
        report.pauses.events,
        report.resumes.events,
        match &state.paused {
            Some(p) => format!(
                "PAUSED since {}: {}",
                p.at.format("%Y-%m-%d %H:%M:%S UTC"),
                p.reason
            ),
            None => "running".to_owned(),
        }
    );
    Ok(())
}
