//! The transport against the testkit's SMTP sink: connections are reused, replaced when the
//! relay dropped them, never retried once the message went out, and TLS / auth are never
//! skipped.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;

use optinsync_plugin_api::Connector as _;
use optinsync_plugin_api::{ConnectorError, MailTransport, OutgoingMessage};
use optinsync_plugin_smtp::SmtpTransport;
use optinsync_testkit::smtp::SmtpSink;

fn transport(sink: &SmtpSink, extra: &str) -> SmtpTransport {
    let settings: toml::Table = toml::from_str(&format!(
        "host = \"127.0.0.1\"\nport = {}\ntls = \"none\"\ntimeout_secs = 5\n\
         rate_per_minute = 100000\n{extra}",
        sink.port()
    ))
    .unwrap();
    SmtpTransport::from_config(settings, Path::new(".")).unwrap()
}

fn message(n: usize) -> OutgoingMessage {
    OutgoingMessage {
        idempotency_key: format!("k{n}"),
        message_id: format!("m{n}@example.org"),
        from: "news@example.org".to_owned(),
        to: format!("p{n}@example.net"),
        subject: format!("Mail {n}"),
        text: "Please confirm.".to_owned(),
        html: None,
        headers: vec![],
    }
}

fn to(n: usize) -> String {
    format!("p{n}@example.net")
}

#[tokio::test]
async fn messages_reuse_one_connection() {
    let sink = SmtpSink::start();
    let t = transport(&sink, "");
    for n in 0..5 {
        t.send(&message(n)).await.unwrap();
    }
    assert_eq!(sink.count(), 5);
    assert_eq!(
        sink.sessions(),
        1,
        "every mail went over the first connection"
    );
    assert_eq!(t.connections_opened(), 1);
    // The health check also uses the pooled connection.
    assert!(t.health().await.unwrap().ok);
    assert_eq!(sink.sessions(), 1);
}

#[tokio::test]
async fn a_connection_the_relay_dropped_is_replaced() {
    let sink = SmtpSink::start();
    let t = transport(&sink, "");
    t.send(&message(0)).await.unwrap();
    sink.kick_sessions();
    // The pooled connection fails at MAIL FROM (nothing sent yet): one retry on a new one.
    t.send(&message(1)).await.unwrap();
    t.send(&message(2)).await.unwrap();
    assert_eq!(
        sink.sessions(),
        2,
        "one replacement connection, then reused"
    );
    for n in 0..3 {
        assert_eq!(sink.messages_to(&to(n)).len(), 1, "mail {n} delivered once");
    }
}

#[tokio::test]
async fn never_sent_twice_when_the_answer_to_the_content_is_lost() {
    let sink = SmtpSink::start();
    let t = transport(&sink, "");
    // On a reused connection: the relay stores the message and hangs up before `250`.
    t.send(&message(0)).await.unwrap();
    sink.drop_after_data(1);
    let e = t.send(&message(1)).await.unwrap_err();
    assert!(matches!(e, ConnectorError::Transient { .. }), "{e:?}");
    assert_eq!(sink.messages_to(&to(1)).len(), 1, "not sent a second time");
    assert_eq!(sink.sessions(), 1, "no retry connection was opened");
    // On a fresh connection: the same.
    sink.drop_after_data(1);
    let e = t.send(&message(2)).await.unwrap_err();
    assert!(matches!(e, ConnectorError::Transient { .. }), "{e:?}");
    assert_eq!(sink.messages_to(&to(2)).len(), 1);
    assert_eq!(sink.sessions(), 2);
    // A broken connection is not reused.
    t.send(&message(3)).await.unwrap();
    assert_eq!(sink.sessions(), 3);
}

#[tokio::test]
async fn refusals_are_classified_and_the_connection_is_dropped() {
    let sink = SmtpSink::start();
    let t = transport(&sink, "");
    sink.refuse(&to(0), 550, "5.1.1 no such user", None);
    sink.refuse(&to(1), 451, "4.3.0 try later", Some(1));
    let e = t.send(&message(0)).await.unwrap_err();
    assert!(matches!(e, ConnectorError::Rejected { .. }), "{e:?}");
    let e = t.send(&message(1)).await.unwrap_err();
    assert!(matches!(e, ConnectorError::Transient { .. }), "{e:?}");
    // Not retried by the pool: one RCPT per send.
    assert_eq!(sink.rcpt_attempts(&to(0)), 1);
    assert_eq!(sink.rcpt_attempts(&to(1)), 1);
    t.send(&message(1)).await.unwrap();
    assert_eq!(
        sink.sessions(),
        3,
        "each refused transaction closed its connection"
    );
    assert_eq!(sink.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sends_stay_within_pool_size() {
    let sink = SmtpSink::start();
    let t = Arc::new(transport(&sink, "pool_size = 2"));
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..12 {
        let t = Arc::clone(&t);
        tasks.spawn(async move { t.send(&message(n)).await.map(|_| ()) });
    }
    while let Some(result) = tasks.join_next().await {
        result.unwrap().unwrap();
    }
    assert_eq!(sink.count(), 12);
    assert!(sink.sessions() <= 2, "{} connections", sink.sessions());
}

#[tokio::test]
async fn starttls_is_required() {
    let sink = SmtpSink::start();
    // The sink does not offer STARTTLS: refuse rather than send in plain text.
    let settings: toml::Table = toml::from_str(&format!(
        "host = \"127.0.0.1\"\nport = {}\ntls = \"starttls\"\ntimeout_secs = 5",
        sink.port()
    ))
    .unwrap();
    let t = SmtpTransport::from_config(settings, Path::new(".")).unwrap();
    let e = t.send(&message(0)).await.unwrap_err();
    assert!(matches!(e, ConnectorError::Transient { .. }), "{e:?}");
    assert!(e.to_string().contains("STARTTLS"), "{e}");
    assert_eq!(sink.rcpt_attempts(&to(0)), 0);
    assert_eq!(sink.count(), 0);
}

#[tokio::test]
async fn implicit_tls_speaks_tls_first() {
    let sink = SmtpSink::start();
    // The sink greets in plain text; a TLS client cannot take that for a ServerHello.
    let settings: toml::Table = toml::from_str(&format!(
        "host = \"127.0.0.1\"\nport = {}\ntls = \"tls\"\ntimeout_secs = 5",
        sink.port()
    ))
    .unwrap();
    let t = SmtpTransport::from_config(settings, Path::new(".")).unwrap();
    let e = t.send(&message(0)).await.unwrap_err();
    assert!(matches!(e, ConnectorError::Transient { .. }), "{e:?}");
    assert!(e.to_string().contains("TLS"), "{e}");
    assert_eq!(sink.rcpt_attempts(&to(0)), 0);
    assert_eq!(sink.count(), 0);
}

#[tokio::test]
async fn authentication_is_not_skipped() {
    let sink = SmtpSink::start();
    // The sink offers no AUTH mechanism: the credentials cannot be used, so nothing is sent.
    let t = transport(&sink, "username = \"u\"\npassword = \"secret\"");
    assert!(t.send(&message(0)).await.is_err());
    assert_eq!(sink.rcpt_attempts(&to(0)), 0);
    assert_eq!(sink.count(), 0);
}

#[tokio::test]
async fn unreachable_relay_is_temporary() {
    let port = optinsync_testkit::free_port();
    let settings: toml::Table = toml::from_str(&format!(
        "host = \"127.0.0.1\"\nport = {port}\ntls = \"none\"\ntimeout_secs = 5"
    ))
    .unwrap();
    let t = SmtpTransport::from_config(settings, Path::new(".")).unwrap();
    let e = t.send(&message(0)).await.unwrap_err();
    assert!(matches!(e, ConnectorError::Transient { .. }), "{e:?}");
    assert!(!t.health().await.unwrap().ok);
}

/// The conformance kit's mail checks against the sink: healthy, and a test message accepted.
#[tokio::test]
async fn the_smtp_transport_passes_the_conformance_kit() {
    let sink = SmtpSink::start();
    let t = transport(&sink, "");
    let options = optinsync_conformance::Options {
        write: true,
        ..optinsync_conformance::Options::default()
    };
    let checks = optinsync_conformance::check_mail(&t, &options).await;
    assert!(
        checks.iter().all(|c| c.passed()),
        "{:#?}",
        checks.iter().map(|c| c.line()).collect::<Vec<_>>()
    );
    assert_eq!(sink.count(), 1, "the test message reached the relay");
    // A relay that refuses the recipient for good makes the check fail, and says so.
    let refusing = SmtpSink::start();
    refusing.refuse(
        "conformance-check@example.org",
        550,
        "5.1.1 no such user",
        None,
    );
    let checks = optinsync_conformance::check_mail(&transport(&refusing, ""), &options).await;
    assert!(
        checks
            .iter()
            .any(|c| c.name == "sends a message" && !c.passed()),
        "{:#?}",
        checks.iter().map(|c| c.line()).collect::<Vec<_>>()
    );
}

/// A message made ready ahead (rendered and DKIM-signed, no connection yet) goes out byte for
/// byte as prepared, to the envelope prepared; a recipient that cannot be a mailbox is
/// refused when made ready, as `send` refuses it; and a message nothing was made ahead for
/// is sent as `send` sends it.
#[tokio::test]
async fn a_message_made_ready_ahead_goes_out_as_prepared() {
    let sink = SmtpSink::start();
    let key =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/e2e/fixtures/dkim-test-rsa.pem");
    let t = transport(
        &sink,
        &format!(
            "[dkim]\nselector = \"s1\"\ndomain = \"example.org\"\nkey_file = {:?}\n",
            key.display().to_string()
        ),
    );
    let ready = t.prepare(message(1)).await.unwrap();
    assert_eq!(
        sink.sessions(),
        0,
        "nothing goes to the relay while made ready"
    );
    let wire = ready
        .wire
        .clone()
        .expect("the SMTP transport renders ahead");
    assert_eq!(wire.mail_from.as_deref(), Some("news@example.org"));
    assert_eq!(wire.rcpt_to, vec![to(1)]);
    let text = String::from_utf8(wire.bytes.clone()).unwrap();
    assert!(text.starts_with("DKIM-Signature: "), "{text}");
    assert!(text.contains("Message-ID: <m1@example.org>"), "{text}");

    let sent = t.send_ready(&ready).await.unwrap();
    assert_eq!(sent.message_id, "m1@example.org");
    let received = sink.messages_to(&to(1));
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].mail_from, "news@example.org");
    assert_eq!(
        received[0].data.trim_end(),
        text.trim_end(),
        "sent as prepared"
    );

    let mut bad = message(2);
    bad.to = "not a mailbox".to_owned();
    assert!(
        matches!(t.prepare(bad).await, Err(ConnectorError::Rejected { .. })),
        "an impossible recipient is refused when made ready"
    );

    let unprepared = optinsync_plugin_api::ReadyMessage::unprepared(message(3));
    t.send_ready(&unprepared).await.unwrap();
    let received = sink.messages_to(&to(3));
    assert_eq!(received.len(), 1);
    assert!(
        received[0].data.starts_with("DKIM-Signature: "),
        "signed when sent"
    );
    assert_eq!(sink.count(), 2);
}
