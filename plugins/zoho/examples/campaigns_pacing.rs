//! Pacing benchmark: subscribe 20,000 confirmed contacts through the Zoho Campaigns connector
//! against the fake Zoho Campaigns with Zoho's **real** `listsubscribe` limits (500/min,
//! 12,500/h, 75,000/day, 30-minute lock), every window scaled in time by the same factor on
//! both sides (default 0.02: a minute lasts 1.2 s, the run ~90 s instead of ~74 minutes).
//!
//! ```text
//! cargo run --release -p optinsync-plugin-zoho --example campaigns_pacing [-- COUNT SCALE]
//! ```
//!
//! Prints the achieved call rate against the best rate the limits allow (a greedy schedule of
//! instant calls under the same sliding windows), and whether Zoho's lock was ever triggered.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use optinsync_plugin_api::{CampaignsConnector, ConnectorError, Keyed, Subscriber, per_item};
use optinsync_plugin_zoho::ZohoCampaigns;
use optinsync_plugin_zoho::campaigns::Api;
use optinsync_testkit::zoho_campaigns::{self as fake, FakeCampaigns, FakeCampaignsOptions};

const KEY: &str = "benchlistkey";

/// Shortest time (seconds, unscaled) in which `n` instant calls fit the sliding windows.
fn ideal_seconds(n: u64, windows: &[(u32, u64)]) -> f64 {
    let mut sent: VecDeque<(f64, u64)> = VecDeque::new();
    let (mut t, mut left) = (0.0f64, n);
    loop {
        let room = windows
            .iter()
            .map(|(limit, len)| {
                let used: u64 = sent
                    .iter()
                    .filter(|(at, _)| t - at < *len as f64)
                    .map(|(_, k)| k)
                    .sum();
                u64::from(*limit).saturating_sub(used)
            })
            .min()
            .unwrap_or(left);
        let k = room.min(left);
        if k > 0 {
            sent.push_back((t, k));
            left -= k;
        }
        if left == 0 {
            return t;
        }
        // Next moment a full window frees a slot.
        t = windows
            .iter()
            .filter_map(|(limit, len)| {
                let inside: Vec<_> = sent.iter().filter(|(at, _)| t - at < *len as f64).collect();
                let used: u64 = inside.iter().map(|(_, k)| k).sum();
                (used >= u64::from(*limit)).then(|| inside[0].0 + *len as f64)
            })
            .fold(t, f64::max);
        let longest = windows.iter().map(|(_, l)| *l).max().unwrap_or(0) as f64;
        while sent.front().is_some_and(|(at, _)| t - at >= longest) {
            sent.pop_front();
        }
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let count: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let scale: f64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(0.02);

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
    let (windows, _) = Api::ListSubscribe.documented_limits();
    let ideal = ideal_seconds(count as u64, windows);
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
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        break;
                    }
                    let mut fields = BTreeMap::new();
                    fields.insert("First_Name".to_owned(), serde_json::json!(format!("P{i}")));
                    let sub = Subscriber {
                        email: format!("person{i}@example.org"),
                        language: None,
                        fields,
                        proof: None,
                    };
                    let sub = Keyed::new(format!("bench-{i}"), sub);
                    loop {
                        let answer = c.subscribe("bench", std::slice::from_ref(&sub)).await;
                        match per_item(1, answer).remove(0) {
                            Ok(()) => break,
                            // What the outbox does: come back when the connector says.
                            Err(ConnectorError::Transient { retry_after, .. }) => {
                                retries.fetch_add(1, Ordering::Relaxed);
                                tokio::time::sleep(
                                    retry_after.unwrap_or(Duration::from_millis(50)),
                                )
                                .await;
                            }
                            Err(e) => panic!("subscribe failed: {e}"),
                        }
                    }
                    if (i + 1) % 2500 == 0 {
                        eprintln!(
                            "  {} subscribed after {:.1} s",
                            i + 1,
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
    let times = f.accepted_times("listsubscribe");
    let span = times.last().unwrap().duration_since(times[0]).as_secs_f64();
    let achieved = (times.len() as f64) / (span / scale) * 60.0;
    let allowed = count as f64 / ideal * 60.0;
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
        "listsubscribe calls:   {} ({} retries handed back)",
        f.calls("listsubscribe"),
        retries.load(Ordering::Relaxed)
    );
    println!(
        "elapsed:               {:.1} s at scale {scale} = {:.1} min unscaled",
        span,
        span / scale / 60.0
    );
    println!("achieved rate:         {achieved:.1} calls/min (unscaled)");
    println!(
        "allowed rate:          {allowed:.1} calls/min (best schedule under 500/min, 12,500/h, 75,000/day)"
    );
    println!("achieved / allowed:    {:.1}%", 100.0 * achieved / allowed);
    println!("busiest minute:        {busiest} calls (limit 500)");
    println!(
        "lock ever triggered:   {}",
        if f.locks() == 0 { "no" } else { "YES" }
    );
}
