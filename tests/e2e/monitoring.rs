//! `/metrics` of a running daemon: the scrape parses as Prometheus text (a parser crate and
//! `promtool check metrics`), every family has a HELP line, the store-derived gauges equal
//! what the SQLite file holds, and every metric the alert rules (`deploy/prometheus/`) and
//! the dashboard (`deploy/grafana/`) name is one the daemon exports.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::process::{Command, Stdio};

use promql_parser::parser::{self, Expr};
use promql_parser::util::{ExprVisitor, walk_expr};
use sqlx::Row as _;

use crate::support::*;

const ANA: &str = "ana.garcia@example.org";
const INTRUDER: &str = "intruder@example.org";

/// Metric families that only a vendor connector records (Zoho Campaigns' quota).
const CONNECTOR_ONLY: &[&str] = &["optinsync_vendor_quota_used_ratio"];

/// The demo with every gauge refreshed each second (drift and ledger verification included).
fn demo() -> Demo {
    let demo = Demo::new();
    let mut cfg = std::fs::read_to_string(demo.config()).unwrap();
    cfg.push_str(
        "\n[metrics]\nrefresh_interval = \"1s\"\ndrift_interval = \"1s\"\nledger_verify_interval = \"1s\"\n",
    );
    std::fs::write(demo.config(), cfg).unwrap();
    demo
}

type Scrape = openmetrics_parser::MetricsExposition<
    openmetrics_parser::PrometheusType,
    openmetrics_parser::PrometheusValue,
>;

/// The exposition through a grammar-based parser of the Prometheus text format: any line it
/// cannot read fails the test.
fn parse(text: &str) -> Scrape {
    openmetrics_parser::prometheus::parse_prometheus(text)
        .unwrap_or_else(|e| panic!("not Prometheus text: {e:?}\n{text}"))
}

/// The value of the counter, gauge or untyped sample of family `metric` whose labels include
/// all of `labels`.
fn value(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    use openmetrics_parser::PrometheusValue as V;
    scrape
        .families
        .get(metric)?
        .iter_samples()
        .filter(|s| {
            s.get_labelset().is_ok_and(|set| {
                labels
                    .iter()
                    .all(|(k, v)| set.get_label_value(k) == Some(*v))
            })
        })
        .find_map(|s| match &s.value {
            V::Gauge(n) | V::Unknown(n) => Some(n.as_f64()),
            V::Counter(c) => Some(c.value.as_f64()),
            _ => None,
        })
}

/// Every series name in the exposition (`_bucket`, `_sum`, `_count` included) and every
/// family named by a `# TYPE` line.
fn exported_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            names.insert(rest.split_whitespace().next().unwrap().to_owned());
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_owned());
        }
    }
    names
}

/// Family names with a `# TYPE` line, and those with a `# HELP` line.
fn typed_and_helped(text: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let first = |prefix: &str| -> BTreeSet<String> {
        text.lines()
            .filter_map(|l| l.strip_prefix(prefix))
            .map(|r| r.split_whitespace().next().unwrap().to_owned())
            .collect()
    };
    (first("# TYPE "), first("# HELP "))
}

/// The metric names a PromQL expression selects (through the parser's AST, not a regex).
fn selected_metrics(expr: &str) -> BTreeSet<String> {
    struct Names(BTreeSet<String>);
    impl ExprVisitor for Names {
        type Error = std::convert::Infallible;
        fn pre_visit(&mut self, e: &Expr) -> Result<bool, Self::Error> {
            let vs = match e {
                Expr::VectorSelector(vs) => Some(vs),
                Expr::MatrixSelector(ms) => Some(&ms.vs),
                _ => None,
            };
            if let Some(vs) = vs {
                let name = vs.name.clone().unwrap_or_else(|| {
                    vs.matchers
                        .matchers
                        .iter()
                        .find(|m| m.name == "__name__")
                        .map(|m| m.value.clone())
                        .unwrap_or_default()
                });
                self.0.insert(name);
            }
            Ok(true)
        }
    }
    let ast = parser::parse(expr).unwrap_or_else(|e| panic!("`{expr}` is not PromQL: {e}"));
    let mut names = Names(BTreeSet::new());
    let Ok(_) = walk_expr(&mut names, &ast);
    names.0
}

/// `promtool check metrics` on a scrape: (exit status success, its output).
fn promtool_check_metrics(text: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; scripts/test installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// What the SQLite file holds: consents per state on `newsletter`, pending and dead outbox
/// rows per kind, the ledger head.
struct StoreCounts {
    consents: BTreeMap<String, i64>,
    pending: BTreeMap<String, i64>,
    dead: BTreeMap<String, i64>,
    head: i64,
}

async fn store_counts(demo: &Demo) -> StoreCounts {
    let opts = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(demo.path("var/optinsync.db"))
        .read_only(true);
    let pool = sqlx::SqlitePool::connect_with(opts).await.unwrap();
    let pairs = |rows: Vec<sqlx::sqlite::SqliteRow>| -> BTreeMap<String, i64> {
        rows.iter()
            .map(|r| (r.get::<String, _>(0), r.get::<i64, _>(1)))
            .collect()
    };
    let consents = pairs(
        sqlx::query(
            "SELECT state, COUNT(*) FROM consents WHERE list_id = 'newsletter' GROUP BY state",
        )
        .fetch_all(&pool)
        .await
        .unwrap(),
    );
    let by_kind = |status: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query("SELECT kind, COUNT(*) FROM outbox WHERE status = ? GROUP BY kind")
                .bind(status)
                .fetch_all(&pool)
                .await
                .unwrap()
        }
    };
    let pending = pairs(by_kind("pending").await);
    let dead = pairs(by_kind("dead").await);
    let head: i64 = sqlx::query("SELECT COALESCE(MAX(seq), 0) FROM ledger")
        .fetch_one(&pool)
        .await
        .unwrap()
        .get(0);
    pool.close().await;
    StoreCounts {
        consents,
        pending,
        dead,
        head,
    }
}

/// Differences between the gauges of `scrape` and the store's counts (empty: they agree).
fn disagreements(scrape: &Scrape, store: &StoreCounts) -> Vec<String> {
    let mut out = Vec::new();
    for state in optinsync_engine::consent::ConsentState::ALL {
        let want = store.consents.get(state.as_str()).copied().unwrap_or(0) as f64;
        let got = value(
            scrape,
            "optinsync_consents",
            &[("list", "newsletter"), ("state", state.as_str())],
        );
        if got != Some(want) {
            out.push(format!(
                "consents {}: store {want}, gauge {got:?}",
                state.as_str()
            ));
        }
    }
    for kind in optinsync_engine::work::OutboxWork::KINDS {
        for (metric, counts) in [
            ("optinsync_outbox_pending", &store.pending),
            ("optinsync_outbox_dead_letters", &store.dead),
        ] {
            let want = counts.get(kind).copied().unwrap_or(0) as f64;
            let got = value(scrape, metric, &[("kind", kind)]);
            if got != Some(want) {
                out.push(format!("{metric} {kind}: store {want}, gauge {got:?}"));
            }
        }
    }
    let head = value(scrape, "optinsync_ledger_head_seq", &[]);
    if head != Some(store.head as f64) {
        out.push(format!("ledger head: store {}, gauge {head:?}", store.head));
    }
    out
}

const ADMIN_TOKEN: &str = "monitoring-admin-token-0123456789abcdef";

/// A daemon after some of every kind of traffic: Ana confirms (page, then the button), a
/// forged link, an unknown path, an admin call with a wrong token, webhook calls past their
/// limit; then someone the ledger never heard of appears on the campaigns list (drift).
/// Returns the daemon and Ana's confirmation link.
async fn busy_daemon(demo: &Demo) -> (Daemon, String) {
    let cfg = std::fs::read_to_string(demo.config()).unwrap();
    let cfg = cfg.replace(
        "[server]\n",
        "[server]\nwebhook_rate_limit_per_minute = 2\n",
    );
    std::fs::write(
        demo.config(),
        format!("{cfg}\n[admin]\ntoken = \"{ADMIN_TOKEN}\"\n"),
    )
    .unwrap();
    demo.run_ok(&["sync", "--once"]);
    let daemon = demo.spawn_daemon();
    let client = http();
    let base = format!("http://127.0.0.1:{}", demo.port);

    let link = confirm_mailed(demo, &client, ANA).await;
    let forged = client
        .get(format!("{base}/confirm/not-a-token"))
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 400);
    let missing = client.get(format!("{base}/nowhere")).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    let admin = client
        .get(format!("{base}/admin/status"))
        .bearer_auth("wrong-token")
        .send()
        .await
        .unwrap();
    assert_eq!(admin.status(), 401);
    let mut webhook = Vec::new();
    for _ in 0..3 {
        let r = client
            .post(format!("{base}/webhooks/crm"))
            .send()
            .await
            .unwrap();
        webhook.push(r.status().as_u16());
    }
    assert_eq!(webhook.last(), Some(&429), "{webhook:?}");
    wait_until(20, "Ana on the list", || {
        demo.list_members() == vec![ANA.to_owned()]
    });
    let mut list = std::fs::OpenOptions::new()
        .append(true)
        .open(demo.path("var/lists.jsonl"))
        .unwrap();
    writeln!(
        list,
        r#"{{"list":"newsletter","email":"{INTRUDER}","subscribed_at":"2026-01-01T00:00:00Z"}}"#
    )
    .unwrap();
    (daemon, link)
}

#[tokio::test(flavor = "multi_thread")]
async fn scrape_parses_has_help_and_matches_the_store() {
    let demo = demo();
    let (daemon, link) = busy_daemon(&demo).await;

    // The gauges catch up within a refresh or two; then they must equal the store.
    let mut last = (String::new(), Vec::new());
    for _ in 0..40 {
        let text = demo.metrics().await;
        let scrape = parse(&text);
        let store = store_counts(&demo).await;
        let diff = disagreements(&scrape, &store);
        let drift = value(
            &scrape,
            "optinsync_drift_on_list_without_consent",
            &[("list", "newsletter")],
        );
        let settled = store.pending.values().sum::<i64>() == 0;
        last = (text, diff);
        if last.1.is_empty() && drift == Some(1.0) && settled {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    let (text, diff) = last;
    assert!(
        diff.is_empty(),
        "gauges disagree with the store: {diff:?}\n{text}"
    );
    let scrape = parse(&text);
    let store = store_counts(&demo).await;
    assert_eq!(store.consents.get("confirmed"), Some(&1), "seeded scenario");
    assert_eq!(
        value(
            &scrape,
            "optinsync_consents",
            &[("list", "newsletter"), ("state", "confirmed")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &scrape,
            "optinsync_drift_on_list_without_consent",
            &[("list", "newsletter")]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(
            &scrape,
            "optinsync_drift_confirmed_missing",
            &[("list", "newsletter")]
        ),
        Some(0.0)
    );
    assert_eq!(value(&scrape, "optinsync_ledger_verify_ok", &[]), Some(1.0));
    assert!(
        value(&scrape, "optinsync_ledger_verified_events", &[]).unwrap_or(0.0) >= 1.0,
        "{text}"
    );
    assert_eq!(
        value(
            &scrape,
            "optinsync_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0),
        "{text}"
    );

    // HTTP by route template, never by raw path.
    assert_eq!(
        value(
            &scrape,
            "optinsync_link_actions_total",
            &[("action", "confirm"), ("result", "changed")]
        ),
        Some(1.0),
        "{text}"
    );
    assert!(
        value(
            &scrape,
            "optinsync_http_requests_total",
            &[
                ("route", "/confirm/{token}"),
                ("method", "POST"),
                ("status", "200")
            ]
        )
        .is_some_and(|n| n >= 1.0),
        "{text}"
    );
    assert_eq!(
        value(
            &scrape,
            "optinsync_http_requests_total",
            &[("route", "unmatched"), ("status", "404")]
        ),
        Some(1.0),
        "{text}"
    );
    // The forged link, the wrong admin token, the webhook past its limit.
    for (metric, labels) in [
        ("optinsync_link_refused_total", &[][..]),
        (
            "optinsync_admin_refused_total",
            &[("reason", "bad_token")][..],
        ),
        (
            "optinsync_http_rate_limited_total",
            &[("limit", "webhook")][..],
        ),
    ] {
        assert!(
            value(&scrape, metric, labels).is_some_and(|n| n >= 1.0),
            "{metric} {labels:?}: {text}"
        );
    }
    // Two webhook calls without a body reached the connector (refused), the third the limit.
    assert_eq!(
        value(
            &scrape,
            "optinsync_webhook_calls_total",
            &[("connector", "crm"), ("result", "refused")]
        ),
        Some(2.0),
        "{text}"
    );
    let token = link.rsplit('/').next().unwrap();
    for forbidden in [token, "not-a-token", "/nowhere", ANA, INTRUDER] {
        assert!(
            !text.contains(forbidden),
            "`{forbidden}` in a label:\n{text}"
        );
    }
    assert!(
        text.contains("optinsync_http_request_duration_seconds_bucket{"),
        "latency is a histogram: {text}"
    );

    // Every family has its HELP line (as the parser read it, and in the text).
    let without: Vec<&String> = scrape
        .families
        .iter()
        .filter(|(_, f)| f.help.trim().is_empty())
        .map(|(name, _)| name)
        .collect();
    assert!(without.is_empty(), "families without HELP: {without:?}");
    let (typed, helped) = typed_and_helped(&text);
    let without: Vec<_> = typed.difference(&helped).collect();
    assert!(without.is_empty(), "families without HELP: {without:?}");
    assert!(scrape.families.len() >= 20, "{typed:?}");

    // Prometheus' own parser and linter accept the exposition.
    let (ok, report) = promtool_check_metrics(&text);
    assert!(ok, "promtool check metrics: {report}\n{text}");

    assert_eq!(daemon.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn alert_rules_and_dashboard_name_exported_metrics() {
    let demo = demo();
    let (daemon, _) = busy_daemon(&demo).await;
    // The slower series appear after the first job pass, verification and drift check.
    let needed = [
        "optinsync_job_last_success_timestamp_seconds",
        "optinsync_drift_last_computed_timestamp_seconds",
        "optinsync_ledger_verify_ok",
        "optinsync_outbox_delivery_total",
    ];
    let mut text = String::new();
    wait_until(30, "the periodic gauges", || {
        text = futures_block(demo.metrics());
        needed.iter().all(|n| text.contains(n))
    });
    let mut exported = exported_names(&text);
    // Families only a vendor connector records (the demo's files connectors have no quota):
    // checked against the daemon's described families instead, which is what the recorder
    // is given at start-up.
    for family in CONNECTOR_ONLY {
        assert!(
            !exported.contains(*family),
            "{family} is exported by the demo now: drop it from CONNECTOR_ONLY"
        );
        assert!(
            optinsync_web::metrics::FAMILIES
                .iter()
                .any(|(name, _, _)| name == family),
            "{family} is not described"
        );
        exported.insert((*family).to_owned());
    }

    let rules: serde_norway::Value = serde_norway::from_str(
        &std::fs::read_to_string(repo().join("deploy/prometheus/alerts.yml")).unwrap(),
    )
    .unwrap();
    let mut alerts = 0;
    for group in rules["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            let name = rule["alert"].as_str().unwrap();
            let expr = rule["expr"].as_str().unwrap();
            let metrics = selected_metrics(expr);
            assert!(!metrics.is_empty(), "{name}: `{expr}` selects no metric");
            for m in metrics {
                assert!(
                    exported.contains(&m),
                    "alert {name} names `{m}`, which the daemon does not export:\n{text}"
                );
            }
            alerts += 1;
        }
    }
    assert!(alerts >= 8, "{alerts} alert rules");

    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("deploy/grafana/optinsync.json")).unwrap(),
    )
    .unwrap();
    let mut exprs = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            for m in selected_metrics(expr) {
                assert!(
                    exported.contains(&m),
                    "panel {} names `{m}`, which the daemon does not export",
                    panel["title"]
                );
            }
            exprs += 1;
        }
    }
    assert!(exprs >= 20, "{exprs} panel expressions");
    assert_eq!(daemon.terminate(), Some(0));
}

/// Block on a future from a synchronous `wait_until` condition.
fn futures_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}
