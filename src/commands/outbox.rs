//! `outbox failed`, `outbox retry`, `outbox drop`: the dead letters.

use std::path::Path;

use anyhow::Context as _;

use super::{load_config, open_store};
use crate::Failure;

pub async fn outbox_failed(path: &Path, json: bool) -> Result<(), Failure> {
    let config = load_config(path)?;
    let store = open_store(&config).await?;
    let dead = store.outbox_dead().await.context("reading dead letters")?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&dead).context("formatting JSON")?
        );
        return Ok(());
    }
    if dead.is_empty() {
        println!("no dead letters");
        return Ok(());
    }
    println!(
        "{:>6}  {:<20} {:<12} {:>8}  reason",
        "id", "kind", "list", "attempts"
    );
    for d in &dead {
        println!(
            "{:>6}  {:<20} {:<12} {:>8}  {}",
            d.id,
            d.kind(),
            d.list_id,
            d.attempts,
            d.last_error.as_deref().unwrap_or("-")
        );
    }
    println!(
        "{} dead letter(s); `optinsync outbox retry ID...` queues them again, `optinsync outbox drop ID...` gives up",
        dead.len()
    );
    Ok(())
}

pub async fn outbox_retry(path: &Path, ids: &[i64], all: bool) -> Result<(), Failure> {
    let config = load_config(path)?;
    let store = open_store(&config).await?;
    let ids: Vec<i64> = if all {
        store
            .outbox_dead()
            .await
            .context("reading dead letters")?
            .iter()
            .map(|d| d.id)
            .collect()
    } else if ids.is_empty() {
        return Err(Failure::Config(anyhow::anyhow!(
            "name the outbox ids to retry, or pass --all"
        )));
    } else {
        ids.to_vec()
    };
    let mut missing = Vec::new();
    for id in &ids {
        if !store
            .retry_dead(*id, chrono::Utc::now())
            .await
            .context("queueing again")?
        {
            missing.push(*id);
        }
    }
    println!("{} dead letter(s) queued again", ids.len() - missing.len());
    if !missing.is_empty() {
        return Err(Failure::Runtime(anyhow::anyhow!(
            "not dead letters (unknown or not failed): {missing:?}"
        )));
    }
    Ok(())
}

pub async fn outbox_drop(path: &Path, ids: &[i64], force: bool) -> Result<(), Failure> {
    use optinsync_engine::operator::{DropOutcome, drop_dead_letter};
    if ids.is_empty() {
        return Err(Failure::Config(anyhow::anyhow!(
            "name the outbox ids to drop"
        )));
    }
    let config = load_config(path)?;
    let store = open_store(&config).await?;
    let mut refused = Vec::new();
    let mut missing = Vec::new();
    let mut dropped = 0;
    for id in ids {
        // Dropping a removal leaves a withdrawn address on the marketing list: only forced.
        match drop_dead_letter(store.as_ref(), *id, force, chrono::Utc::now())
            .await
            .context("dropping")?
        {
            DropOutcome::Dropped => dropped += 1,
            DropOutcome::RemovalNeedsForce => refused.push(*id),
            DropOutcome::NotDead => missing.push(*id),
        }
    }
    println!("{dropped} dead letter(s) dropped");
    if !refused.is_empty() {
        return Err(Failure::Config(anyhow::anyhow!(
            "refused to drop removals {refused:?}: the address would stay on the campaigns list; fix the cause and `retry`, or pass --force"
        )));
    }
    if !missing.is_empty() {
        return Err(Failure::Runtime(anyhow::anyhow!(
            "not dead letters (unknown or not failed): {missing:?}"
        )));
    }
    Ok(())
}
