//! Re-permission in waves, end to end with time scaled (a plan day is 10 s): the seed user's
//! existing list of 20,000 members taken in with `import-existing`, asked to confirm under a
//! warm-up plan over a real SMTP sink that answers 550 for 3 % of the addresses and for half
//! of a stale segment met in the third wave. The stop rule pauses the waves, a walk-in's own
//! signup still gets its mail at once, the operator drops the stale segment and resumes,
//! some confirm, the rest are removed after the window, and the list ends up holding exactly
//! the people who confirmed.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use optinsync_engine::store;
use optinsync_testkit::smtp::{SmtpSink, parse};

use crate::support::*;

const N: usize = 20_000;
/// A plan day, in milliseconds (`day_length = "10s"`).
const DAY_MS: i64 = 10_000;
const STALE: std::ops::Range<usize> = 6000..6600;

fn domain(i: usize) -> &'static str {
    match i % 5 {
        0 | 1 => "gmail.com",
        2 => "hotmail.com",
        _ => "example.org",
    }
}

fn member(i: usize) -> String {
    format!("m{i:05}@{}", domain(i))
}

/// Addresses the sink refuses for good: every 33rd (3 %), and half of the stale segment.
fn hard(i: usize) -> bool {
    i.is_multiple_of(33) || (STALE.contains(&i) && i.is_multiple_of(2))
}

/// A full mailbox (552 5.2.2): a soft bounce, counted, never suppressing on its own.
fn soft(i: usize) -> bool {
    !hard(i) && i % 97 == 1
}

/// The people who answer: a tenth of those outside the stale segment.
fn confirmer(i: usize) -> bool {
    !hard(i) && !soft(i) && !STALE.contains(&i) && i % 10 == 3
}

/// The warm-up plan's cap on plan day `n` of the wave (1,000 doubling up to 4,000).
fn cap(n: i64) -> usize {
    (1000usize << n.clamp(0, 8)).min(4000)
}

fn wave_demo(sink: &SmtpSink) -> Demo {
    let demo = Demo::new();
    let mut lines = String::new();
    for i in 0..N {
        let source = if STALE.contains(&i) {
            "expo-2016"
        } else {
            "crm-2023"
        };
        lines.push_str(&format!(
            "{{\"list\":\"newsletter\",\"email\":\"{}\",\"language\":\"en\",\"fields\":{{\"source\":\"{source}\"}},\"subscribed_at\":\"2019-01-01T00:00:00Z\"}}\n",
            member(i)
        ));
    }
    demo.only_existing_list(&lines);
    demo.use_smtp_sink(sink.port(), "timeout_secs = 10\npool_size = 8\n");
    demo.use_private_secret();
    let cfg = std::fs::read_to_string(demo.config()).unwrap();
    std::fs::write(
        demo.config(),
        cfg.replacen(
            "[server]\n",
            "[server]\nrate_limit_per_minute = 1000000\nglobal_rate_limit_per_second = 100000\n",
            1,
        ),
    )
    .unwrap();
    // Three plan days to confirm, no reminder; the rules pass every 4 s (a pass over 20,000
    // contacts is work for a debug build). A pass may queue half a day's cap, so that the
    // plan's caps set the pace (400 held it to ~800 mails a plan day: 290 s for the test).
    demo.set_list_windows(&[("reminder_after", "20s"), ("pending_expiry", "30s")]);
    let mut cfg = std::fs::read_to_string(demo.config())
        .unwrap()
        .replace("max_reminders = 1", "max_reminders = 0")
        .replace("poll_interval = \"1s\"", "poll_interval = \"4s\"");
    cfg.push_str(
        "\n[lists.sending]\nday_length = \"10s\"\nhours = \"00:00-18:00\"\nmax_queued = 2000\n\
         [lists.sending.doi]\ndaily_cap = 4000\nwarmup_start = 1000\nwarmup_factor = 2.0\n\
         domains = { \"gmail.com\" = 1500 }\n\
         [lists.sending.stop]\nwindow = \"10s\"\nhard_bounce_rate = 0.05\nmin_sent = 200\n\n\
         [signup]\nper_client_per_hour = 1000\nper_address_per_hour = 1000\n",
    );
    std::fs::write(demo.config(), cfg).unwrap();
    demo
}

/// Consent counts per state of the newsletter list (`status --json`).
fn states(demo: &Demo) -> BTreeMap<String, i64> {
    let v: serde_json::Value = serde_json::from_str(&demo.run_ok(&["status", "--json"])).unwrap();
    v["consent"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["list_id"] == "newsletter")
        .map(|r| {
            (
                r["state"].as_str().unwrap().to_owned(),
                r["count"].as_i64().unwrap(),
            )
        })
        .collect()
}

async fn paused(store: &dyn store::Store) -> bool {
    optinsync_engine::waves::state_in(store, "newsletter")
        .await
        .unwrap()
        .paused
        .is_some()
}

/// The confirm link of the DOI mail the sink took for `email`, if any.
fn confirm_link(sink: &SmtpSink, email: &str) -> Option<String> {
    let received = sink.messages_to(email);
    let mail = parse(&received.first()?.data);
    Some(link_in(mail.part("text/plain")?, "/confirm/"))
}

#[tokio::test(flavor = "multi_thread")]
async fn an_old_list_is_asked_in_waves_paused_by_bounces_resumed_and_ends_with_who_confirmed() {
    let sink = SmtpSink::start();
    for i in (0..N).filter(|&i| hard(i)) {
        let who = member(i);
        sink.refuse(
            &who,
            550,
            &format!("5.1.1 <{who}>: Recipient address rejected: User unknown"),
            None,
        );
    }
    for i in (0..N).filter(|&i| soft(i)) {
        sink.refuse(&member(i), 552, "5.2.2 Mailbox full, try again later", None);
    }
    let demo = wave_demo(&sink);
    let started = Instant::now();
    let out = demo.run_ok(&["campaign", "import-existing", "--list", "newsletter"]);
    assert!(
        out.contains(&format!("{N} members; {N} taken in as asserted")),
        "{out}"
    );
    eprintln!(
        "import-existing of {N} members: {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // The forecast before anything is sent: the warm-up ramp, nobody asked twice, lapses
    // once the window of the first wave ends.
    let plan = demo.run_ok(&["campaign", "plan", "--list", "newsletter", "--days", "8"]);
    eprintln!("{plan}");
    let forecast: serde_json::Value = serde_json::from_str(&demo.run_ok(&[
        "campaign",
        "plan",
        "--list",
        "newsletter",
        "--days",
        "8",
        "--json",
    ]))
    .unwrap();
    let days = forecast[0]["days"].as_array().unwrap();
    let doi: Vec<u64> = days.iter().map(|d| d["doi"].as_u64().unwrap()).collect();
    assert!(
        doi[0] <= 1000 && doi[1] <= 2000 && doi[1] > doi[0],
        "{doi:?}"
    );
    assert_eq!(
        doi.iter().sum::<u64>(),
        N as u64,
        "everyone asked once: {doi:?}"
    );
    assert!(
        days.iter()
            .skip(3)
            .map(|d| d["lapsed"].as_u64().unwrap())
            .sum::<u64>()
            > 0,
        "the first wave lapses once its window ends: {plan}"
    );

    let url = demo.sqlite_url();
    let daemon = demo.spawn_daemon();
    let client = http();
    // One store handle for the test's looks (opening one runs the migration check).
    let watch = store::open(&url).await.unwrap();
    let mut confirmed: BTreeSet<String> = BTreeSet::new();
    // When each confirmer's mail was first seen: a person clicks a moment after it arrives
    // (the link confirms once the mail is on record, a few milliseconds after the relay
    // took it).
    let mut arrived: BTreeMap<String, (Instant, String)> = BTreeMap::new();
    let wanted: BTreeSet<String> = (0..N).filter(|&i| confirmer(i)).map(member).collect();
    let mut read = 0;
    let mut pause_seen: Option<Instant> = None;
    let mut resumed = false;
    let mut last_look = Instant::now();
    // From when no wave mail went out any more (the mails in flight at the pause finished).
    let mut quiet_at: Option<chrono::DateTime<chrono::Utc>> = None;
    let walk_in = "walk.in@example.net";
    let deadline = Instant::now() + Duration::from_secs(420);
    loop {
        let late = pause_seen.is_none() && started.elapsed() > Duration::from_secs(150);
        if late || Instant::now() >= deadline {
            let store = store::open(&url).await.unwrap();
            let o = store.mail_outcomes("newsletter", i64::MIN).await.unwrap();
            let log = std::fs::read_to_string(demo.path("daemon.log")).unwrap_or_default();
            let notable: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("stop rule"))
                .filter(|l| !l.contains("consent change refused"))
                .take(30)
                .collect();
            panic!(
                "campaign did not settle (paused: {}): {:?}; outcomes {o:?}; log:\n{}",
                pause_seen.is_some(),
                states(&demo),
                notable.join("\n")
            );
        }
        // The people who answer click as their mail arrives.
        for m in sink.messages_since(read) {
            read += 1;
            for rcpt in &m.rcpt_to {
                if wanted.contains(rcpt) && !arrived.contains_key(rcpt) {
                    let mail = parse(&m.data);
                    let link = link_in(mail.part("text/plain").expect("text part"), "/confirm/");
                    arrived.insert(rcpt.clone(), (Instant::now(), link));
                }
            }
        }
        for (who, (seen, link)) in &arrived {
            if confirmed.contains(who) || seen.elapsed() < Duration::from_millis(500) {
                continue;
            }
            let status = click_confirm(&client, link, "waves-test/1").await.status();
            assert_eq!(
                status,
                200,
                "{who} (mail seen {:.1} s ago): {}",
                seen.elapsed().as_secs_f64(),
                demo.run_ok(&["contact", "show", who])
            );
            confirmed.insert(who.clone());
        }
        if pause_seen.is_none() && paused(watch.as_ref()).await {
            pause_seen = Some(Instant::now());
            let report = demo.run_ok(&["campaign", "report", "--list", "newsletter"]);
            eprintln!("when the stop rule fired:\n{report}");
            let status = demo.run_ok(&["status"]);
            assert!(status.contains("waves PAUSED"), "{status}");
            // Mails in flight when it fired finish; then the wave stands still...
            let mut last = sink.count();
            let mut still_since = Instant::now();
            wait_until(60, "the wave standing still", || {
                let now = sink.count();
                if now != last {
                    last = now;
                    still_since = Instant::now();
                }
                still_since.elapsed() >= Duration::from_secs(2)
            });
            quiet_at = Some(chrono::Utc::now() - chrono::Duration::seconds(2));
            let held_at = sink.count();
            // ...while a person's own signup is mailed at once.
            let signed = Instant::now();
            let r = client
                .post(format!("http://127.0.0.1:{}/signup/newsletter", demo.port))
                .form(&[("email", walk_in)])
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            wait_until(
                10,
                "the walk-in's DOI mail while the wave is paused",
                || !sink.messages_to(walk_in).is_empty(),
            );
            eprintln!(
                "walk-in signup mailed {:.2} s after the form was sent, while paused",
                signed.elapsed().as_secs_f64()
            );
            tokio::time::sleep(Duration::from_secs(3)).await;
            assert_eq!(
                sink.count(),
                held_at + 1,
                "only the walk-in's mail went out while the waves were paused"
            );
            let link = confirm_link(&sink, walk_in).expect("walk-in mail");
            assert_eq!(
                click_confirm(&client, &link, "waves-test/1").await.status(),
                200
            );
            confirmed.insert(walk_in.to_owned());
            // The operator drops the stale segment before resuming: a rule suppresses the
            // members from the 2016 fair who have not confirmed.
            demo.save_rule_file(
                "50-stale-segment.rhai",
                "fn decide(contact, consent, ctx) {\n    if \"source\" in contact.fields && contact.fields.source == \"expo-2016\" && (consent.state == \"asserted\" || consent.state == \"pending\") {\n        return #{ action: \"suppress\", reason: \"stale 2016 fair segment: half of it bounced\" };\n    }\n}\n",
            );
            let last_stale = member(STALE.end - 1);
            wait_until(60, "the stale segment suppressed", || {
                demo.state(&last_stale, "newsletter") == "withdrawn"
            });
            let out = demo.run_ok(&["campaign", "resume", "--list", "newsletter"]);
            assert!(out.contains("resumed list `newsletter`"), "{out}");
            resumed = true;
        }
        // Whether anyone is still open, asked at most every 2 s (each look starts the binary).
        if resumed && last_look.elapsed() >= Duration::from_secs(2) {
            last_look = Instant::now();
            let s = states(&demo);
            let open =
                s.get("asserted").copied().unwrap_or(0) + s.get("pending").copied().unwrap_or(0);
            if open == 0 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!(
        "campaign settled {:.0} s after import",
        started.elapsed().as_secs_f64()
    );
    assert!(pause_seen.is_some(), "the stop rule fired");

    // The campaigns list holds exactly the people who confirmed.
    wait_until(60, "the list holds exactly who confirmed", || {
        demo.list_members().into_iter().collect::<BTreeSet<_>>() == confirmed
    });
    let report_text = demo.run_ok(&["campaign", "report", "--list", "newsletter"]);
    eprintln!("final report:\n{report_text}");
    let report = demo.campaign_report("newsletter");
    drop(daemon);
    let r = &report["report"];
    let contacts = |k: &str| r[k]["contacts"].as_i64().unwrap();
    assert_eq!(contacts("confirmed") as usize, confirmed.len());
    assert_eq!(contacts("asserted") as usize, N);
    let events = all_events(&url).await;
    let bounced: BTreeSet<&str> = events
        .iter()
        .filter(|e| e.kind == "bounced")
        .map(|e| e.contact_id.as_str())
        .collect();
    assert_eq!(contacts("bounced_hard") as usize, bounced.len());
    assert!(
        r["bounced_soft"]["events"].as_i64().unwrap() > 0,
        "{report}"
    );
    assert!(r["pauses"]["events"].as_i64().unwrap() >= 1, "{report}");
    assert_eq!(r["resumes"]["events"].as_i64().unwrap(), 1, "{report}");
    // Everyone asked ended confirmed, lapsed, bounced or suppressed; nobody is left open.
    let s = states(&demo);
    assert_eq!(
        s.get("confirmed").copied().unwrap_or(0) as usize,
        confirmed.len(),
        "{s:?}"
    );
    assert!(s.get("lapsed").copied().unwrap_or(0) > 0, "{s:?}");

    // The plan held: per plan day, DOI mails started at most the warm-up cap and at most
    // 1,500 to Gmail; none of the wave's mails went out while it was paused.
    let day_of = |at: &str| {
        chrono::DateTime::parse_from_rfc3339(at)
            .unwrap()
            .timestamp_millis()
            .div_euclid(DAY_MS)
    };
    let addresses: BTreeMap<String, String> = {
        let store = store::open(&url).await.unwrap();
        let mut out = BTreeMap::new();
        let mut after: Option<String> = None;
        loop {
            let page = store.contacts_page(after.as_deref(), 1000).await.unwrap();
            let Some(last) = page.last() else { break };
            after = Some(last.id.clone());
            out.extend(page.into_iter().map(|c| (c.id, c.email)));
        }
        out
    };
    let mut per_day: BTreeMap<i64, (usize, usize)> = BTreeMap::new();
    for e in events
        .iter()
        .filter(|e| e.kind == "doi_requested" && e.source == "rules")
    {
        let d = per_day.entry(day_of(&e.at)).or_default();
        d.0 += 1;
        if addresses
            .get(&e.contact_id)
            .is_some_and(|a| a.ends_with("@gmail.com"))
        {
            d.1 += 1;
        }
    }
    let first = *per_day.keys().next().expect("waves ran");
    eprintln!("DOI mails started per plan day (all, gmail.com): {per_day:?}");
    for (day, (all, gmail)) in &per_day {
        assert!(
            *all <= cap(day - first),
            "day {day}: {all} > cap {}",
            cap(day - first)
        );
        assert!(*gmail <= 1500, "day {day}: {gmail} to gmail.com");
    }
    assert!(
        per_day.len() >= 3,
        "the list went out over several days: {per_day:?}"
    );
    let paused_at = events
        .iter()
        .find(|e| e.kind == "wave_paused")
        .expect("pause event")
        .at
        .clone();
    let resumed_at = events
        .iter()
        .find(|e| e.kind == "wave_resumed")
        .expect("resume event")
        .at
        .clone();
    let grace = quiet_at
        .expect("the wave stood still")
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let during: Vec<(&str, &str, &str)> = events
        .iter()
        .filter(|e| e.kind.ends_with("_mail_sent") && e.at > grace && e.at < resumed_at)
        .filter_map(|e| {
            addresses
                .get(&e.contact_id)
                .map(|a| (a.as_str(), e.kind.as_str(), e.at.as_str()))
        })
        .collect();
    eprintln!("paused {paused_at} .. resumed {resumed_at}");
    assert!(
        during.iter().all(|(a, _, _)| *a == walk_in),
        "mails sent while paused: {during:?}"
    );
    assert!(
        during.iter().any(|(a, _, _)| *a == walk_in),
        "the walk-in's mail went out while paused"
    );
    let pause = events.iter().find(|e| e.kind == "wave_paused").unwrap();
    eprintln!("pause evidence: {}", pause.evidence);
}

/// A plan that lets two DOI mails a day through holds the other imported members, and a
/// policy refusal (a blocked sender) is counted without touching the person; meanwhile a
/// website signup is mailed at once.
#[tokio::test(flavor = "multi_thread")]
async fn a_signup_is_mailed_at_once_while_the_plan_holds_the_wave() {
    let sink = SmtpSink::start();
    let blocked = "m0@example.org";
    sink.refuse(
        blocked,
        554,
        "5.7.1 Service unavailable; Client host [127.0.0.1] blocked using Spamhaus",
        None,
    );
    let demo = Demo::new();
    let members: Vec<String> = (0..6).map(|i| format!("m{i}@example.org")).collect();
    let lines: String = members
        .iter()
        .map(|m| format!("{{\"list\":\"newsletter\",\"email\":\"{m}\",\"language\":\"en\",\"fields\":{{}},\"subscribed_at\":\"2019-01-01T00:00:00Z\"}}\n"))
        .collect();
    demo.only_existing_list(&lines);
    demo.use_smtp_sink(sink.port(), "timeout_secs = 10\n");
    demo.use_private_secret();
    let mut cfg = std::fs::read_to_string(demo.config()).unwrap();
    cfg.push_str("\n[lists.sending.doi]\ndaily_cap = 2\n\n[signup]\nper_client_per_hour = 100\n");
    std::fs::write(demo.config(), cfg).unwrap();
    demo.run_ok(&["campaign", "import-existing", "--list", "newsletter"]);
    let daemon = demo.spawn_daemon();

    // Today's two: one refused for policy, one delivered; four wait.
    wait_until(30, "the policy refusal and one delivered mail", || {
        sink.rcpt_attempts(blocked) >= 1 && sink.count() == 1
    });
    let r = http()
        .post(format!("http://127.0.0.1:{}/signup/newsletter", demo.port))
        .form(&[("email", "walk.in@example.net")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    wait_until(
        10,
        "the walk-in's DOI mail while the wave is capped",
        || !sink.messages_to("walk.in@example.net").is_empty(),
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mailed: Vec<&String> = members
        .iter()
        .filter(|m| !sink.messages_to(m).is_empty() || sink.rcpt_attempts(m) > 0)
        .collect();
    assert_eq!(
        mailed.len(),
        2,
        "the plan let two through today: {mailed:?}"
    );
    assert_eq!(sink.count(), 2, "one member's mail and the walk-in's");

    // The refused person is not suppressed and still waits for the retry.
    assert_eq!(demo.state(blocked, "newsletter"), "pending");
    let show = demo.run_ok(&["suppression", "show", blocked]);
    assert!(show.contains("not suppressed"), "{show}");
    let report = demo.campaign_report("newsletter");
    assert_eq!(report["report"]["policy_refusals"], 1, "{report}");
    assert!(
        report["waves"]["paused"].is_null(),
        "one refusal is below the limit of 3"
    );

    // The forecast: nothing more today, two a day after.
    let plan: serde_json::Value = serde_json::from_str(&demo.run_ok(&[
        "campaign",
        "plan",
        "--list",
        "newsletter",
        "--days",
        "3",
        "--json",
    ]))
    .unwrap();
    let doi: Vec<u64> = plan[0]["days"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["doi"].as_u64().unwrap())
        .collect();
    assert_eq!(doi, [0, 2, 2], "{plan}");
    assert_eq!(plan[0]["days"][0]["held"], 4, "{plan}");
    drop(daemon);
}
