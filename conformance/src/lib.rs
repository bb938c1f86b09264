//! The connector conformance kit: drives a built connector through the contract of the plugin
//! API (`optinsync_plugin_api`) and says, one line per check, whether it keeps it. The same
//! checks run for a Rust connector and an out-of-process one (`kind = "exec"`), against a test
//! account or a fake. `optinsync connector check` prints them; the test suite runs them against
//! the fakes.
//!
//! What the kit can check from outside is what any implementation must do whatever its vendor:
//! paging to the end, resuming from a saved cursor, fetching, refusing a forged webhook,
//! idempotent writes, removing an absent address as done, a bad address as a permanent (never a
//! temporary) failure, status events since a cursor, health. Writes (subscribe, remove,
//! write-back, a test mail) run only when asked ([`Options::write`]): against a real account they
//! change data. Temporary and throttled failures need a service that fails on purpose: the
//! [`expect_temporary`] check is run by tests whose fake is told to fail.

use std::collections::BTreeSet;
use std::future::Future;
use std::time::Duration;

use chrono::Utc;
use optinsync_plugin_api::{
    CampaignsConnector, ConnectorError, ConnectorResult, ConsentState, ConsentWriteBack,
    CrmConnector, Cursor, HttpMethod, Keyed, MailTransport, OutgoingMessage, RecordRef, Subscriber,
    WebhookRequest, per_item,
};

/// How one check ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Pass(String),
    Fail(String),
    /// Not run, and why (never counted as a pass).
    Skipped(String),
}

/// One check's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// `crm`, `campaigns` or `mail`.
    pub connector: String,
    pub name: &'static str,
    pub outcome: Outcome,
}

impl Check {
    pub fn passed(&self) -> bool {
        matches!(self.outcome, Outcome::Pass(_))
    }

    /// `PASS crm: pages to the end — 3 pages, 12 records`
    pub fn line(&self) -> String {
        let (tag, text) = match &self.outcome {
            Outcome::Pass(t) => ("PASS", t),
            Outcome::Fail(t) => ("FAIL", t),
            Outcome::Skipped(t) => ("SKIP", t),
        };
        format!("{tag} {}: {} — {text}", self.connector, self.name)
    }
}

/// What the kit may do.
#[derive(Debug, Clone)]
pub struct Options {
    /// Run the checks that write (subscribe/remove a test address, a write-back, a test mail).
    pub write: bool,
    /// The address the write checks use (it is subscribed and removed again).
    pub address: String,
    /// Records per page when paging through the CRM (small, so paging is exercised).
    pub page_size: usize,
    /// Pages at most before the kit calls the feed endless.
    pub max_pages: usize,
    /// Longest a single call may take.
    pub call_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            write: false,
            address: "conformance-check@example.org".into(),
            page_size: 2,
            max_pages: 10_000,
            call_timeout: Duration::from_secs(60),
        }
    }
}

struct Report {
    connector: &'static str,
    checks: Vec<Check>,
}

impl Report {
    fn new(connector: &'static str) -> Self {
        Self {
            connector,
            checks: Vec::new(),
        }
    }

    fn push(&mut self, name: &'static str, outcome: Outcome) {
        self.checks.push(Check {
            connector: self.connector.into(),
            name,
            outcome,
        });
    }

    fn result<T>(
        &mut self,
        name: &'static str,
        r: Result<T, String>,
        pass: impl FnOnce(T) -> String,
    ) {
        let outcome = match r {
            Ok(v) => Outcome::Pass(pass(v)),
            Err(e) => Outcome::Fail(e),
        };
        self.push(name, outcome);
    }
}

/// Wait for `fut` at most `limit`.
async fn timed<T>(
    limit: Duration,
    fut: impl Future<Output = ConnectorResult<T>>,
) -> Result<T, String> {
    let started = std::time::Instant::now();
    let out = fut.await.map_err(|e| e.to_string())?;
    if started.elapsed() > limit {
        return Err(format!(
            "answered after {:?} (limit {limit:?})",
            started.elapsed()
        ));
    }
    Ok(out)
}

/// The one item's result of a one-item batch call.
fn one_item(answer: Result<Vec<ConnectorResult<()>>, String>) -> Result<(), String> {
    per_item(1, Ok(answer?))
        .pop()
        .unwrap_or(Ok(()))
        .map_err(|e| e.to_string())
}

/// An error that must not be temporary: the operator would retry it forever.
fn is_final(e: &ConnectorError) -> bool {
    !matches!(e, ConnectorError::Transient { .. })
}

/// The CRM checks.
pub async fn check_crm(crm: &dyn CrmConnector, options: &Options) -> Vec<Check> {
    let mut r = Report::new("crm");
    let health = timed(options.call_timeout, crm.health()).await;
    r.result(
        "health",
        health.and_then(|h| if h.ok { Ok(h.detail) } else { Err(h.detail) }),
        |d| d,
    );

    // Page to the end with a small page size; remember the cursor after the first page.
    let mut cursor: Option<Cursor> = None;
    let mut after_first: Option<Option<Cursor>> = None;
    let mut seen: Vec<RecordRef> = Vec::new();
    let mut pages = 0;
    let paged: Result<(), String> = async {
        loop {
            let page = timed(
                options.call_timeout,
                crm.changes(cursor.as_ref(), options.page_size),
            )
            .await?;
            pages += 1;
            if page.records.len() > options.page_size {
                return Err(format!(
                    "a page held {} records; the limit asked was {}",
                    page.records.len(),
                    options.page_size
                ));
            }
            seen.extend(page.records.iter().map(|r| r.record.clone()));
            if page.next_cursor.is_some() {
                cursor = page.next_cursor;
            }
            if after_first.is_none() {
                after_first = Some(cursor.clone());
            }
            if !page.has_more {
                return Ok(());
            }
            if pages >= options.max_pages {
                return Err(format!("still `has_more` after {pages} pages"));
            }
        }
    }
    .await;
    let records = seen.len();
    r.result("pages to the end", paged, |()| {
        format!("{pages} page(s), {records} record(s)")
    });

    // Resume from the cursor saved after the first page: the records after it come again.
    match after_first {
        Some(saved) if pages > 1 => {
            let first_page: BTreeSet<&RecordRef> = seen.iter().take(options.page_size).collect();
            let expected: BTreeSet<&RecordRef> =
                seen.iter().filter(|r| !first_page.contains(r)).collect();
            let mut again: BTreeSet<RecordRef> = BTreeSet::new();
            let mut c = saved;
            let resumed: Result<(), String> = async {
                for _ in 0..options.max_pages {
                    let page = timed(
                        options.call_timeout,
                        crm.changes(c.as_ref(), options.page_size),
                    )
                    .await?;
                    again.extend(page.records.into_iter().map(|r| r.record));
                    if page.next_cursor.is_some() {
                        c = page.next_cursor;
                    }
                    if !page.has_more {
                        return Ok(());
                    }
                }
                Err("endless after resuming".into())
            }
            .await;
            let missing: Vec<String> = expected
                .iter()
                .filter(|e| !again.contains(e))
                .map(|e| e.to_string())
                .collect();
            let resumed = resumed.and_then(|()| {
                if missing.is_empty() {
                    Ok(())
                } else {
                    Err(format!(
                        "resuming from the saved cursor lost {} record(s), e.g. {}",
                        missing.len(),
                        missing[0]
                    ))
                }
            });
            r.result("resumes from a saved cursor", resumed, |()| {
                format!(
                    "{} record(s) after the first page came again",
                    expected.len()
                )
            });
        }
        _ => r.push(
            "resumes from a saved cursor",
            Outcome::Skipped(
                "the feed has one page; give the test account more records than the page size"
                    .into(),
            ),
        ),
    }

    // From the final cursor nothing old comes back as new endlessly.
    let tail = timed(
        options.call_timeout,
        crm.changes(cursor.as_ref(), options.page_size),
    )
    .await;
    r.result("answers from the final cursor", tail, |p| {
        format!("{} record(s) changed since", p.records.len())
    });

    match seen.first() {
        Some(first) => {
            let fetched = timed(options.call_timeout, crm.fetch(first))
                .await
                .and_then(|f| match f {
                    Some(rec) if &rec.record == first => Ok(()),
                    Some(rec) => Err(format!("asked for {first}, got {}", rec.record)),
                    None => Err(format!(
                        "{first} came in the feed but fetch says it does not exist"
                    )),
                });
            r.result("fetches a record from the feed", fetched, |()| {
                first.to_string()
            });
            let missing = RecordRef {
                module: first.module.clone(),
                // Digits only: a well-formed id in every CRM we know, that names nothing.
                id: "999999999999999999".into(),
            };
            let none = timed(options.call_timeout, crm.fetch(&missing))
                .await
                .and_then(|f| match f {
                    None => Ok(()),
                    Some(_) => Err("a record that does not exist was returned".into()),
                });
            r.result(
                "fetch of a missing record is None, not an error",
                none,
                |()| missing.to_string(),
            );
        }
        None => {
            r.push(
                "fetches a record from the feed",
                Outcome::Skipped("the feed is empty".into()),
            );
            r.push(
                "fetch of a missing record is None, not an error",
                Outcome::Skipped("the feed is empty".into()),
            );
        }
    }

    if crm.accepts_webhooks() {
        let forged = forged_webhook("crm");
        let refused = match crm.webhook(&forged).await {
            Err(ConnectorError::InvalidInput { .. }) => Ok(()),
            Err(e) => Err(format!("a forged call must be invalid_input, was: {e}")),
            Ok(ev) => Err(format!("a forged call was accepted: {ev:?}")),
        };
        r.result("refuses a forged webhook", refused, |()| {
            "invalid_input".into()
        });
    } else {
        r.push(
            "refuses a forged webhook",
            Outcome::Skipped("the connector takes no webhooks".into()),
        );
    }

    match (options.write, seen.first()) {
        (false, _) => r.push(
            "write-back is idempotent",
            Outcome::Skipped("pass --write to run the writes".into()),
        ),
        (true, None) => r.push(
            "write-back is idempotent",
            Outcome::Skipped("the feed is empty".into()),
        ),
        (true, Some(first)) => {
            let fetched = crm.fetch(first).await.ok().flatten();
            let wb = ConsentWriteBack {
                key: format!("conformance-{}", Utc::now().timestamp_millis()),
                records: vec![first.clone()],
                email: fetched
                    .and_then(|f| f.email)
                    .unwrap_or_else(|| options.address.clone()),
                list: "conformance-check".into(),
                state: ConsentState::Confirmed,
                opt_out: false,
                at: Utc::now(),
                ledger_seq: 0,
            };
            let twice = async {
                timed(options.call_timeout, crm.write_back(&wb)).await?;
                timed(options.call_timeout, crm.write_back(&wb)).await
            }
            .await;
            r.result("write-back is idempotent", twice, |()| {
                format!("{first} written back twice under one key")
            });
        }
    }
    r.checks
}

/// A webhook call no vendor would send: no signature, no secret, a body of nothing known.
fn forged_webhook(name: &str) -> WebhookRequest {
    WebhookRequest {
        method: HttpMethod::Post,
        path: format!("/webhooks/{name}"),
        query: String::new(),
        headers: vec![("content-type".into(), "application/json".into())],
        body: r#"{"forged": true}"#.into(),
        peer: None,
    }
}

/// The campaigns checks, on the tool's list `list`.
pub async fn check_campaigns(
    campaigns: &dyn CampaignsConnector,
    list: &str,
    options: &Options,
) -> Vec<Check> {
    let mut r = Report::new("campaigns");
    let health = timed(options.call_timeout, campaigns.health()).await;
    r.result(
        "health",
        health.and_then(|h| if h.ok { Ok(h.detail) } else { Err(h.detail) }),
        |d| d,
    );
    let batch = campaigns.max_batch();
    r.result(
        "declares a batch size",
        if batch >= 1 {
            Ok(batch)
        } else {
            Err("max_batch is 0".into())
        },
        |b| format!("{b} item(s) per call"),
    );

    let status = async {
        let first = timed(options.call_timeout, campaigns.status_events(list, None)).await?;
        let next = timed(
            options.call_timeout,
            campaigns.status_events(list, first.next_cursor.as_ref()),
        )
        .await?;
        Ok::<_, String>((first.events.len(), next.events.len()))
    }
    .await;
    r.result("status events since a cursor", status, |(a, b)| {
        format!("{a} event(s) from the start, {b} after its cursor")
    });

    match campaigns.list_members(list, None).await {
        Err(ConnectorError::Permanent { message }) if message.contains("cannot list members") => r
            .push(
                "lists members",
                Outcome::Skipped("the connector cannot list members".into()),
            ),
        first => {
            let mut pages = 1;
            let mut members = 0;
            let listed: Result<(), String> = async {
                let mut page = first.map_err(|e| e.to_string())?;
                loop {
                    members += page.members.len();
                    if !page.has_more {
                        return Ok(());
                    }
                    if pages >= options.max_pages {
                        return Err(format!("still `has_more` after {pages} pages"));
                    }
                    pages += 1;
                    page = timed(
                        options.call_timeout,
                        campaigns.list_members(list, page.next_cursor.as_ref()),
                    )
                    .await?;
                }
            }
            .await;
            r.result("lists members", listed, |()| {
                format!("{members} member(s) in {pages} page(s)")
            });
        }
    }

    if campaigns.accepts_webhooks() {
        let refused = match campaigns.webhook(&forged_webhook("campaigns")).await {
            Err(ConnectorError::InvalidInput { .. }) => Ok(()),
            Err(e) => Err(format!("a forged call must be invalid_input, was: {e}")),
            Ok(ev) => Err(format!("a forged call was accepted: {ev:?}")),
        };
        r.result("refuses a forged webhook", refused, |()| {
            "invalid_input".into()
        });
    } else {
        r.push(
            "refuses a forged webhook",
            Outcome::Skipped("the connector takes no webhooks".into()),
        );
    }

    if !options.write {
        for name in [
            "subscribe is idempotent",
            "a bad address fails for good, alone",
            "removal is idempotent",
            "removing an absent address is done",
        ] {
            r.push(
                name,
                Outcome::Skipped("pass --write to run the writes".into()),
            );
        }
        return r.checks;
    }
    let stamp = Utc::now().timestamp_millis();
    let subscriber = Subscriber {
        email: options.address.clone(),
        language: None,
        fields: Default::default(),
        proof: None,
    };
    let item = Keyed::new(format!("conformance-sub-{stamp}"), subscriber.clone());
    let twice = async {
        for _ in 0..2 {
            one_item(
                timed(
                    options.call_timeout,
                    campaigns.subscribe(list, std::slice::from_ref(&item)),
                )
                .await,
            )?;
        }
        Ok::<_, String>(())
    }
    .await;
    r.result("subscribe is idempotent", twice, |()| {
        "the test address subscribed twice under one key".into()
    });

    // A bad address fails for good (never "try later"), and where the batch holds two, next
    // to a good one that goes through.
    let bad = Keyed::new(
        format!("conformance-bad-{stamp}"),
        Subscriber {
            email: "not-an-address".into(),
            ..subscriber.clone()
        },
    );
    let items: Vec<Keyed<Subscriber>> = if batch >= 2 {
        vec![item.clone(), bad]
    } else {
        vec![bad]
    };
    let bad_result = match campaigns.subscribe(list, &items).await {
        Err(e) if items.len() == 1 && is_final(&e) => Ok(e.to_string()),
        Err(e) => Err(format!("the whole call failed: {e}")),
        Ok(answer) => {
            let mut results = per_item(items.len(), Ok(answer));
            let bad = results.pop().unwrap_or(Ok(()));
            match (results.pop().unwrap_or(Ok(())), bad) {
                (Ok(()), Err(e)) if is_final(&e) => Ok(e.to_string()),
                (Ok(()), Err(e)) => Err(format!("a bad address must fail for good, not: {e}")),
                (Ok(()), Ok(())) => Err("`not-an-address` was accepted".into()),
                (Err(e), _) => Err(format!("the good address failed next to a bad one: {e}")),
            }
        }
    };
    r.result("a bad address fails for good, alone", bad_result, |e| e);

    let removal = Keyed::new(format!("conformance-rm-{stamp}"), options.address.clone());
    let removed = async {
        for _ in 0..2 {
            one_item(
                timed(
                    options.call_timeout,
                    campaigns.remove(list, std::slice::from_ref(&removal)),
                )
                .await,
            )?;
        }
        Ok::<_, String>(())
    }
    .await;
    r.result("removal is idempotent", removed, |()| {
        "the test address removed twice under one key".into()
    });

    let absent = Keyed::new(
        format!("conformance-absent-{stamp}"),
        format!("absent-{stamp}-{}", options.address),
    );
    let done = one_item(
        timed(
            options.call_timeout,
            campaigns.remove(list, std::slice::from_ref(&absent)),
        )
        .await,
    );
    r.result("removing an absent address is done", done, |()| "ok".into());
    r.checks
}

/// The mail checks: one test message, sent twice under one key.
pub async fn check_mail(mail: &dyn MailTransport, options: &Options) -> Vec<Check> {
    let mut r = Report::new("mail");
    let health = timed(options.call_timeout, mail.health()).await;
    r.result(
        "health",
        health.and_then(|h| if h.ok { Ok(h.detail) } else { Err(h.detail) }),
        |d| d,
    );
    if !options.write {
        r.push(
            "sends a message",
            Outcome::Skipped("pass --write to send a test message".into()),
        );
        return r.checks;
    }
    let stamp = Utc::now().timestamp_millis();
    let message = OutgoingMessage {
        idempotency_key: format!("conformance-mail-{stamp}"),
        message_id: format!("conformance-{stamp}@optinsync.invalid"),
        from: "optinsync conformance <conformance@example.org>".into(),
        to: options.address.clone(),
        subject: "optinsync conformance check".into(),
        text: "A test message from `optinsync connector check`.\n".into(),
        html: None,
        headers: vec![],
    };
    let sent = timed(options.call_timeout, mail.send(&message))
        .await
        .and_then(|s| {
            if s.message_id.is_empty() {
                Err("no Message-ID in the answer".into())
            } else {
                Ok(s.message_id)
            }
        });
    r.result("sends a message", sent, |id| format!("accepted as {id}"));
    r.checks
}

/// A check that a connector reports a temporary failure as temporary (with the vendor's wait
/// where it named one): for tests whose fake fails on purpose.
pub async fn expect_temporary<T: std::fmt::Debug>(
    connector: &str,
    name: &'static str,
    call: impl Future<Output = ConnectorResult<T>>,
    wants_wait: bool,
) -> Check {
    let outcome = match call.await {
        Err(ConnectorError::Transient { retry_after, .. })
            if !wants_wait || retry_after.is_some() =>
        {
            Outcome::Pass(format!(
                "temporary{}",
                retry_after
                    .map(|w| format!(", retry after {w:?}"))
                    .unwrap_or_default()
            ))
        }
        Err(ConnectorError::Transient { .. }) => {
            Outcome::Fail("temporary, but without the wait the vendor named".into())
        }
        Err(e) => Outcome::Fail(format!("must be temporary, was: {e}")),
        Ok(v) => Outcome::Fail(format!("must fail, answered {v:?}")),
    };
    Check {
        connector: connector.into(),
        name,
        outcome,
    }
}
