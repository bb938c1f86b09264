//! Adaptive pacing against the testkit's SMTP sink: a relay that answers "try later" slows
//! the transport down and nothing is bounced; a relay that accepts speeds it up again.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use optinsync_plugin_api::{ConnectorError, MailTransport, OutgoingMessage};
use optinsync_plugin_smtp::SmtpTransport;
use optinsync_plugin_smtp::pace::{FLOOR, STEP};
use optinsync_testkit::smtp::SmtpSink;

fn transport(sink: &SmtpSink) -> SmtpTransport {
    let settings: toml::Table = toml::from_str(&format!(
        "host = \"127.0.0.1\"\nport = {}\ntls = \"none\"\ntimeout_secs = 5\n",
        sink.port()
    ))
    .unwrap();
    SmtpTransport::from_config(settings, Path::new(".")).unwrap()
}

fn message(n: usize, to: &str) -> OutgoingMessage {
    OutgoingMessage {
        idempotency_key: format!("k{n}"),
        message_id: format!("m{n}@example.org"),
        from: "news@example.org".to_owned(),
        to: to.to_owned(),
        subject: format!("Mail {n}"),
        text: "Please confirm.".to_owned(),
        html: None,
        headers: vec![],
    }
}

#[tokio::test]
async fn try_later_answers_slow_the_transport_and_accepts_speed_it_up() {
    let sink = SmtpSink::start();
    let t = transport(&sink);
    // No ceiling is configured and the relay has not pushed back: not pacing.
    for n in 0..3 {
        t.send(&message(n, &format!("p{n}@example.net")))
            .await
            .unwrap();
    }
    assert_eq!(t.paced_rate(), None);

    sink.refuse("busy@example.net", 451, "4.7.1 Try again later", Some(2));
    for n in 0..2 {
        let err = t
            .send(&message(10 + n, "busy@example.net"))
            .await
            .unwrap_err();
        // Temporary: the outbox retries it; never a bounce.
        assert!(
            matches!(err, ConnectorError::Transient { .. }),
            "451 must stay temporary: {err:?}"
        );
    }
    let slowed = t.paced_rate().expect("pacing after the relay pushed back");
    assert!(slowed >= FLOOR, "{slowed}");

    // The relay accepts again: each accepted message adds STEP.
    t.send(&message(20, "busy@example.net")).await.unwrap();
    t.send(&message(21, "p21@example.net")).await.unwrap();
    let faster = t.paced_rate().expect("still pacing");
    assert!(
        (faster - (slowed + 2.0 * STEP)).abs() < 1e-9,
        "{slowed} -> {faster}"
    );
    assert_eq!(
        sink.messages_to("busy@example.net").len(),
        1,
        "sent once it was accepted"
    );
}

#[tokio::test]
async fn a_permanent_refusal_does_not_slow_the_transport() {
    let sink = SmtpSink::start();
    let t = transport(&sink);
    sink.refuse("gone@example.net", 550, "5.1.1 No such user", None);
    let err = t.send(&message(1, "gone@example.net")).await.unwrap_err();
    assert!(matches!(err, ConnectorError::Rejected { .. }), "{err:?}");
    assert_eq!(t.paced_rate(), None);
}

#[test]
fn a_zero_rate_ceiling_is_refused_naming_the_setting() {
    let settings: toml::Table =
        toml::from_str("host = \"127.0.0.1\"\nrate_per_minute = 0\n").unwrap();
    let err = SmtpTransport::from_config(settings, Path::new(".")).unwrap_err();
    assert!(err.to_string().contains("rate_per_minute"), "{err}");
}
