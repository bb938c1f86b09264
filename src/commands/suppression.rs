//! `suppression list|show|lift`: the global suppression list (keyed address hashes) and the
//! operator's lift, recorded in the ledger by `cli`. A lift sends nothing by itself.

use std::path::Path;

use anyhow::Context as _;
use optinsync_engine::email;
use optinsync_engine::ledger::EventSource;
use optinsync_engine::store::Suppressed;
use optinsync_engine::suppression::Lift;

use super::boot;
use crate::Failure;

fn address(raw: &str) -> Result<String, Failure> {
    email::normalise(raw).map_err(|e| Failure::Config(anyhow::anyhow!("`{raw}`: {e}")))
}

fn print_rows(rows: &[Suppressed], json: bool) -> Result<(), Failure> {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(rows).context("formatting JSON")?
        );
        return Ok(());
    }
    for r in rows {
        println!("{}  {:<12} {}", r.address_hash, r.reason, r.at.to_rfc3339());
    }
    Ok(())
}

/// `suppression list`: every suppressed address hash, why, since when (addresses are not
/// kept on the list; `suppression show ADDRESS` finds one).
pub async fn suppression_list(path: &Path, json: bool) -> Result<(), Failure> {
    let engine = boot(path).await?;
    let rows = engine
        .suppressions()
        .await
        .context("reading the suppression list")?;
    print_rows(&rows, json)?;
    if !json {
        println!("{} suppressed address hash(es)", rows.len());
    }
    Ok(())
}

/// `suppression show ADDRESS`: whether the address is suppressed, why and since when.
pub async fn suppression_show(path: &Path, raw: &str, json: bool) -> Result<(), Failure> {
    let address = address(raw)?;
    let engine = boot(path).await?;
    let rows = engine
        .suppressions_of_address(&address)
        .await
        .context("reading the suppression list")?;
    if !json && rows.is_empty() {
        println!("{address} is not suppressed");
        return Ok(());
    }
    print_rows(&rows, json)
}

/// `suppression lift ADDRESS --reason TEXT`.
pub async fn suppression_lift(path: &Path, raw: &str, reason: &str) -> Result<(), Failure> {
    let address = address(raw)?;
    if reason.trim().is_empty() {
        return Err(Failure::Config(anyhow::anyhow!(
            "--reason must say why the suppression is lifted"
        )));
    }
    let engine = boot(path).await?;
    match engine
        .lift_suppression(&address, reason.trim(), EventSource::Cli)
        .await
        .context("lifting the suppression")?
    {
        Lift::Lifted { rows, events } => {
            println!(
                "lifted the suppression of {address} ({rows} row(s)); recorded in {events} ledger event(s). Nothing is sent: the person must sign up and confirm again to be mailed"
            );
            Ok(())
        }
        Lift::NotSuppressed => {
            println!("{address} is not suppressed; nothing changed");
            Ok(())
        }
        Lift::NoContact => Err(Failure::Runtime(anyhow::anyhow!(
            "no contact carries {address}, so the lift cannot be recorded; nothing changed"
        ))),
    }
}
