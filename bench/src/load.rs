//! Rows 8 and 9: a small HTTP load client (reqwest, keep-alive, a fixed number of concurrent
//! connections) against the running daemon's confirm page. Links are minted the way the
//! engine mints them (`TokenKeys` with the config's secret, the signup token stored in the
//! consent); a person's click is a `GET` of the page (its per-page nonce) and a `POST` of its
//! form. The two are timed apart: all `GET`s first (row 9), then all `POST`s (row 8).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use optinsync_engine::tokens::{Claims, Purpose, TokenKeys};
use optinsync_testkit::harness::util::form_body;

/// What one timed phase did.
#[derive(Debug, Default)]
pub struct LoadResult {
    pub ok: u64,
    pub failed: u64,
    pub wall: Duration,
    /// Latency of every request, sorted.
    pub latencies: Vec<Duration>,
    /// First failure seen, for the report.
    pub first_error: Option<String>,
}

impl LoadResult {
    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.wall.as_secs_f64().max(1e-9)
    }

    pub fn percentile(&self, p: f64) -> Option<Duration> {
        crate::percentile(&self.latencies, p)
    }
}

/// Confirmation links for up to `limit` pending consents of the SQLite store at `url`.
pub async fn confirm_links(
    store_url: &str,
    base: &str,
    limit: usize,
) -> anyhow::Result<Vec<String>> {
    let pool = sqlx::SqlitePool::connect(store_url).await?;
    let rows: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT contact_id, list_id, signup_token FROM consents \
         WHERE state = 'pending' AND signup_token IS NOT NULL ORDER BY contact_id LIMIT $1",
    )
    .bind(limit as i64)
    .fetch_all(&pool)
    .await
    .context("reading pending consents")?;
    pool.close().await;
    let keys = TokenKeys::new(
        crate::setup::KEY_ID,
        crate::setup::SECRET.as_bytes(),
        vec![],
    );
    let expires = (chrono::Utc::now() + chrono::Duration::days(7)).timestamp();
    Ok(rows
        .into_iter()
        .map(|(contact_id, list_id, token_id)| {
            let token = keys.mint(&Claims {
                purpose: Purpose::Confirm,
                token_id,
                contact_id,
                list_id,
                expires: Some(expires),
            });
            format!("{base}/confirm/{token}")
        })
        .collect())
}

pub fn client(concurrency: usize) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(60))
        .build()?)
}

enum Call {
    Get,
    Post(Arc<Vec<String>>),
}

/// Send one request per link, `concurrency` at a time; `GET` returns each page's form.
async fn drive(
    client: &reqwest::Client,
    links: &Arc<Vec<String>>,
    concurrency: usize,
    call: Call,
) -> (LoadResult, Vec<String>) {
    let next = Arc::new(AtomicUsize::new(0));
    let call = Arc::new(call);
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let (client, links, next, call) = (
            client.clone(),
            Arc::clone(links),
            Arc::clone(&next),
            Arc::clone(&call),
        );
        tasks.push(tokio::spawn(async move {
            let mut done: Vec<(usize, Duration, Result<String, String>)> = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(link) = links.get(i) else { break };
                let t = Instant::now();
                let sent = match &*call {
                    Call::Get => client.get(link).send().await,
                    Call::Post(forms) => {
                        client
                            .post(link)
                            .header("content-type", "application/x-www-form-urlencoded")
                            .body(forms.get(i).cloned().unwrap_or_default())
                            .send()
                            .await
                    }
                };
                let outcome = match sent {
                    Ok(r) if r.status().is_success() => r.text().await.map_err(|e| e.to_string()),
                    Ok(r) => Err(format!("HTTP {}", r.status())),
                    Err(e) => Err(e.to_string()),
                };
                done.push((i, t.elapsed(), outcome));
            }
            done
        }));
    }
    let mut result = LoadResult::default();
    let mut forms = vec![String::new(); links.len()];
    for task in tasks {
        let Ok(done) = task.await else {
            result.failed += 1;
            continue;
        };
        for (i, took, outcome) in done {
            result.latencies.push(took);
            match outcome {
                Ok(page) => {
                    result.ok += 1;
                    if matches!(*call, Call::Get) {
                        forms[i] = form_body(&page);
                    }
                }
                Err(e) => {
                    result.failed += 1;
                    result.first_error.get_or_insert(e);
                }
            }
        }
    }
    result.wall = start.elapsed();
    result.latencies.sort();
    (result, forms)
}

/// One `GET` per link, `concurrency` at a time: each page's form, ready to `POST`.
pub async fn page_forms(
    links: Vec<String>,
    concurrency: usize,
) -> anyhow::Result<(LoadResult, Vec<String>)> {
    let client = client(concurrency)?;
    Ok(drive(&client, &Arc::new(links), concurrency, Call::Get).await)
}

/// Row 9 then row 8 over the same links.
pub async fn confirm_load(
    links: Vec<String>,
    concurrency: usize,
) -> anyhow::Result<(LoadResult, LoadResult)> {
    let client = client(concurrency)?;
    let links = Arc::new(links);
    let (gets, forms) = drive(&client, &links, concurrency, Call::Get).await;
    let (posts, _) = drive(&client, &links, concurrency, Call::Post(Arc::new(forms))).await;
    Ok((gets, posts))
}
