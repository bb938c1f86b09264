//! Row 7: a CRM edit brought in by the Zoho webhook, timed from the notification callback
//! to the DOI mail accepted by the SMTP sink, against `optinsync run` with the whole synced
//! store. Each sample is a contact the synthetic source left unasserted: the bench edits the
//! record in the fake to assert the list (as a CRM user would), then fires the callback.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use optinsync_testkit::smtp::SmtpSink;
use optinsync_testkit::zoho::{FakeZoho, SyntheticSource};
use serde_json::json;

/// One latency per sample, in sample order.
pub async fn run(
    fake: &FakeZoho,
    sink: &SmtpSink,
    src: &SyntheticSource,
    samples: usize,
) -> anyhow::Result<Vec<Duration>> {
    let mut out = Vec::with_capacity(samples);
    for index in src.unasserted().take(samples) {
        let before = sink.count();
        let id = fake.edit_synthetic("Contacts", index, json!({ "Newsletter": true }));
        let start = Instant::now();
        let status = fake
            .notify("Contacts", &[&id], "update", None)
            .await
            .map_err(anyhow::Error::msg)
            .context("sending the Zoho notification")?;
        if status != 200 {
            bail!("the daemon answered the Zoho notification with HTTP {status}");
        }
        while sink.count() <= before {
            if start.elapsed() > Duration::from_secs(60) {
                bail!("no DOI mail within 60 s of the webhook for synthetic record {index}");
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        let took = start.elapsed();
        let to = src.email(index);
        if !sink
            .messages_since(before)
            .iter()
            .any(|m| m.rcpt_to.iter().any(|r| r.eq_ignore_ascii_case(&to)))
        {
            bail!("the mail after the webhook for record {index} was not the DOI mail to it");
        }
        out.push(took);
    }
    Ok(out)
}
