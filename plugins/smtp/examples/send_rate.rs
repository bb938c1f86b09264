//! Send N rendered, DKIM-signed DOI-sized messages (~4.4 KB) through [`SmtpTransport`] to a
//! plain-text relay, one after the other (as the outbox does), and print mails/s.
//!
//! ```text
//! smtp-sink -c 127.0.0.1:2525 1000 &
//! cargo run --release -p optinsync-plugin-smtp --example send_rate -- 127.0.0.1:2525 2000
//! cargo run --release -p optinsync-plugin-smtp --example send_rate -- 127.0.0.1:2525 2000 no-dkim
//! ```
//!
//! A measurement for the report, not a test: it never fails on time.

use std::path::Path;
use std::time::Instant;

use optinsync_plugin_api::{MailTransport, OutgoingMessage};
use optinsync_plugin_smtp::SmtpTransport;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:2525".to_owned());
    let count: usize = args.next().map(|n| n.parse()).transpose()?.unwrap_or(2000);
    // `no-dkim` as a third argument leaves signing out, to see what the signature costs.
    let dkim = args.next().as_deref() != Some("no-dkim");
    let (host, port) = addr.rsplit_once(':').ok_or("address must be HOST:PORT")?;
    let key = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/e2e/fixtures");
    let mut settings =
        format!("host = \"{host}\"\nport = {port}\ntls = \"none\"\nrate_per_minute = 100000000\n");
    if dkim {
        settings.push_str(
            "[dkim]\nselector = \"test\"\ndomain = \"example.org\"\nkey_file = \"dkim-test-rsa.pem\"\n",
        );
    }
    let settings: toml::Table = toml::from_str(&settings)?;
    let transport = SmtpTransport::from_config(settings, &key)?;
    // About the size of a rendered DOI mail with its HTML part (≈ 4.4 KB on the wire).
    let text =
        "Please confirm your subscription to our newsletter by opening this link. \n".repeat(21);
    let html = format!(
        "<html><body><p>{}</p></body></html>",
        text.replace('\n', "<br>\n")
    );
    let started = Instant::now();
    for i in 0..count {
        let message = OutgoingMessage {
            idempotency_key: format!("rate-{i}"),
            message_id: format!("rate-{i}@example.org"),
            from: "News <news@example.org>".to_owned(),
            to: format!("person{i}@example.net"),
            subject: "Please confirm your subscription".to_owned(),
            text: text.clone(),
            html: Some(html.clone()),
            headers: vec![
                (
                    "List-Unsubscribe".to_owned(),
                    format!("<https://example.org/u/{i}>"),
                ),
                (
                    "List-Unsubscribe-Post".to_owned(),
                    "List-Unsubscribe=One-Click".to_owned(),
                ),
            ],
        };
        if i == 0 {
            let size = optinsync_plugin_smtp::build_message(&message)?
                .formatted()
                .len();
            println!("send_rate: message size without the DKIM header: {size} bytes");
        }
        transport.send(&message).await?;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "send_rate: {count} mails in {secs:.2} s = {:.0} mails/s (sequential, DKIM {})",
        count as f64 / secs,
        if dkim { "on" } else { "off" }
    );
    Ok(())
}
