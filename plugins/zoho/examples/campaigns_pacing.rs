//! Pacing benchmark: subscribe 20,000 confirmed contacts through the Zoho Campaigns connector
//! against the fake Zoho Campaigns with Zoho's **real** `listsubscribe` limits (500/min,
//! 12,500/h, 75,000/day, 30-minute lock), every window scaled in time by the same factor on
//! both sides (default 0.02: a minute lasts 1.2 s, the run ~90 s instead of ~74 minutes).
//!
//! With `bulk`, the contacts carry no fields and go ten per call, as the outbox batches them
//! (`max_batch` 10), so the connector uses `addlistsubscribersinbulk` (2,000 calls/min, a
//! 10-minute lock): e.g. `-- 100000 0.1 bulk`.
//!
//! ```text
//! cargo run --release -p optinsync-plugin-zoho --example campaigns_pacing [-- COUNT SCALE [bulk]]
//! ```
//!
//! Prints the achieved call rate against the best rate the limits allow (a greedy schedule of
//! instant calls under the same sliding windows), and whether Zoho's lock was ever triggered.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use optinsync_plugin_api::{CampaignsConnector, ConnectorError, Keyed, Subscriber, per_item};
use optinsync_plugin_zoho::ZohoCampaigns;
use optinsync_plugin_zoho::campaigns::Api;
use optinsync_testkit::zoho_campaigns::{self as fake, FakeCampaigns, FakeCampaignsOptions};

const KEY: &str = "benchlistkey";

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let count: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let scale: f64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(0.02);
    let bulk = args.get(3).is_some_and(|a| a == "bulk");
    let (api, endpoint, per_call) = if bulk {
        (Api::BulkAdd, "addlistsubscribersinbulk", 10)
    } else {
        (Api::ListSubscribe, "listsubscribe", 1)
    };

    let f = FakeCampaigns::start_with(FakeCampaignsOptions {
        time_scale: scale,
        ..FakeCampaignsOptions::default()
    });
    f.add_list(KEY, "Bench list", false);
    let settings = format!(
        r#"
client_id = "{}"
client_secret = "{}"
refresh_token = "{}"
accounts_url = "{url}"
campaigns_url = "{url}"
time_scale = {scale}
max_wait = "1h"
max_concurrency = 16
[lists.bench]
listkey = "{KEY}"
"#,
        fake::CLIENT_ID,
        fake::CLIENT_SECRET,
        fake::REFRESH_TOKEN,
        url = f.url(),
    );
    let c = Arc::new(
        ZohoCampaigns::from_config(toml::from_str(&settings).unwrap(), Path::new(".")).unwrap(),
    );
    let (windows, _) = api.documented_limits();
    let calls_needed = count.div_ceil(per_call) as u64;
    let ideal = fake::best_schedule_seconds(calls_needed, windows);
    eprintln!(
        "subscribing {count} contacts; limits {windows:?} (calls, seconds), time scale {scale} \
         (a minute lasts {:.2} s); best possible: {:.1} min unscaled = {:.1} s here",
        60.0 * scale,
        ideal / 60.0,
        ideal * scale
    );

    let next = Arc::new(AtomicUsize::new(0));
    let retries = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let workers: Vec<_> = (0..16)
        .map(|_| {
            let (c, next, retries) = (Arc::clone(&c), Arc::clone(&next), Arc::clone(&retries));
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(per_call, Ordering::Relaxed);
                    if i >= count {
                        break;
                    }
                    let mut items: Vec<Keyed<Subscriber>> = (i..(i + per_call).min(count))
                        .map(|j| {
                            let mut fields = BTreeMap::new();
                            if !bulk {
                                fields.insert(
                                    "First_Name".to_owned(),
                                    serde_json::json!(format!("P{j}")),
                                );
                            }
                            let sub = Subscriber {
                                email: format!("person{j}@example.org"),
                                language: None,
                                fields,
                                proof: None,
                            };
                            Keyed::new(format!("bench-{j}"), sub)
                        })
                        .collect();
                    while !items.is_empty() {
                        let n = items.len();
                        let answer = c.subscribe("bench", &items).await;
                        let mut wait = None;
                        let mut again = Vec::new();
                        for (item, result) in items.into_iter().zip(per_item(n, answer)) {
                            match result {
                                Ok(()) => {}
                                // What the outbox does: come back when the connector says.
                                Err(ConnectorError::Transient { retry_after, .. }) => {
                                    wait = wait.or(retry_after);
                                    again.push(item);
                                }
                                Err(e) => panic!("subscribe failed: {e}"),
                            }
                        }
                        if !again.is_empty() {
                            retries.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(wait.unwrap_or(Duration::from_millis(50))).await;
                        }
                        items = again;
                    }
                    if (i + per_call) % 2500 < per_call {
                        eprintln!(
                            "  {} subscribed after {:.1} s",
                            i + per_call,
                            start.elapsed().as_secs_f64()
                        );
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    let times = f.accepted_times(endpoint);
    let span = times.last().unwrap().duration_since(times[0]).as_secs_f64();
    let achieved = (times.len() as f64) / (span / scale) * 60.0;
    let allowed = calls_needed as f64 / ideal * 60.0;
    // Busiest sliding scaled minute the fake saw.
    let minute = Duration::from_secs_f64(60.0 * scale);
    let (mut lo, mut busiest) = (0, 0);
    for hi in 0..times.len() {
        while times[hi].duration_since(times[lo]) >= minute {
            lo += 1;
        }
        busiest = busiest.max(hi - lo + 1);
    }
    println!("contacts subscribed:   {}", f.active(KEY).len());
    println!(
        "{endpoint} calls: {} ({} retries handed back; {} addresses per call)",
        f.calls(endpoint),
        retries.load(Ordering::Relaxed),
        per_call
    );
    println!(
        "elapsed:               {:.1} s at scale {scale} = {:.1} min unscaled",
        span,
        span / scale / 60.0
    );
    println!("achieved rate:         {achieved:.1} calls/min (unscaled)");
    println!(
        "allowed rate:          {allowed:.1} calls/min (best schedule under {windows:?} (calls, s))"
    );
    println!(
        "addresses per minute:  {:.0} achieved, {:.0} allowed (unscaled)",
        achieved * per_call as f64,
        allowed * per_call as f64
    );
    println!("achieved / allowed:    {:.1}%", 100.0 * achieved / allowed);
    println!(
        "busiest minute:        {busiest} calls (limit {})",
        windows.first().map_or(0, |w| w.0)
    );
    println!(
        "lock ever triggered:   {}",
        if f.locks() == 0 { "no" } else { "YES" }
    );
}
