//! Pieces both kill-9 harnesses (`crash_harness`, `multi_instance`) use: the synthetic
//! addresses, clicking a confirmation link like a browser, copying the set-up, reading the
//! whole ledger.

use std::path::Path;

use anyhow::Context as _;

use optinsync_engine::ledger::LedgerEvent;
use optinsync_engine::store::Store;

pub fn first(v: &[String]) -> &[String] {
    &v[..v.len().min(5)]
}

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
    let body = hidden_fields(&page)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    let resp = client
        .post(link)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await?;
    Ok(resp.status().as_u16())
}
