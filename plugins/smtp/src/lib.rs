//! SMTP mail transport for optinsync, built on lettre's async (tokio) SMTP client.
//!
//! * Connection security: `tls = "starttls"` (default, port 587), `"tls"` (implicit TLS, port
//!   465) or `"none"` (plain text, for local test servers only; must be written explicitly).
//!   Certificates are checked against the Mozilla roots (webpki-roots), through rustls: no
//!   OpenSSL.
//! * Every connection is opened here with `TCP_NODELAY` (see [`conn`]) and handed to lettre,
//!   which speaks SMTP on it; up to `pool_size` idle connections are kept and reused.
//! * Optional authentication (`username`/`password`, may be `"${ENV}"` references), a
//!   per-command timeout, adaptive pacing on the relay's "try later" answers ([`pace`]) and
//!   an optional rate ceiling (`rate_per_minute`).
//! * Optional DKIM signing (RSA-SHA256 or Ed25519-SHA256) whose `h=` covers From, To,
//!   Subject, Date, Message-ID, List-Unsubscribe and List-Unsubscribe-Post (RFC 8058 §4 needs
//!   the last two signed for one-click unsubscribe).
//!
//! Failures map onto what the engine must do with the message: a permanent (5xx) answer about
//! the recipient is [`ConnectorError::Rejected`] in a bounce class ([`bounce`]: hard for the
//! address, soft for a full mailbox, policy for a refused sender), a
//! temporary (4xx) answer, a timeout or a broken connection is [`ConnectorError::Transient`]
//! (retried with backoff). 5xx answers that are about *us* — authentication required or
//! failed, command syntax — are [`ConnectorError::Permanent`]: they must not bounce the
//! recipient.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use lettre::Message;
use lettre::message::header::{ContentType, HeaderName, HeaderValue};
use lettre::message::{Mailbox, MultiPart, SinglePart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::TlsParameters;
use lettre::transport::smtp::extension::ClientId;
use optinsync_plugin_api::{
    ConnectorError, ConnectorResult, Health, MailTransport, OutgoingMessage, ReadyMessage,
    SentMessage, SettingsError, WireMessage,
};
use serde::Deserialize;

pub mod bounce;
pub mod conn;
pub mod dkim;
pub mod pace;

pub use conn::SendError;
use conn::{Connector, Pool, Security};

/// How long a connection may sit unused in the pool before it is closed rather than reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Headers every DKIM signature covers, in this order.
pub const DKIM_SIGNED_HEADERS: &[&str] = &[
    "From",
    "To",
    "Subject",
    "Date",
    "Message-ID",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
];

fn invalid(setting: &str, message: impl Into<String>) -> SettingsError {
    SettingsError::invalid(setting.to_owned(), message.into())
}

/// How the connection to the relay is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Plain connection upgraded with STARTTLS (required, never silently skipped).
    #[default]
    Starttls,
    /// TLS from the first byte ("SMTPS").
    Tls,
    /// No encryption at all: only for a relay on the same machine or a test server.
    None,
}

/// `[connectors.mail]` settings for `kind = "smtp"`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpConfig {
    pub host: String,
    /// Defaults to 587 (starttls), 465 (tls) or 25 (none).
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub tls: TlsMode,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// Name sent with EHLO; defaults to this machine's host name.
    #[serde(default)]
    pub hello_name: Option<String>,
    /// Timeout of each SMTP command, in seconds.
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: u64,
    /// Most connections open to the relay at once (in use or idle).
    #[serde(default = "default_pool_size")]
    pub pool_size: u32,
    /// Most messages handed to the relay per minute (a ceiling; unset: none). Below it the
    /// transport paces itself on the relay's "try later" answers ([`pace`]).
    #[serde(default)]
    pub rate_per_minute: Option<u32>,
    #[serde(default)]
    pub dkim: Option<DkimSettings>,
}

impl std::fmt::Debug for SmtpConfig {
    /// The password prints as `<redacted>`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("hello_name", &self.hello_name)
            .field("timeout_secs", &self.timeout_secs)
            .field("pool_size", &self.pool_size)
            .field("rate_per_minute", &self.rate_per_minute)
            .field("dkim", &self.dkim)
            .finish()
    }
}

fn default_timeout_secs() -> u64 {
    30
}
fn default_pool_size() -> u32 {
    4
}

/// `[connectors.mail.dkim]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DkimSettings {
    /// Selector published in DNS as `SELECTOR._domainkey.DOMAIN`.
    pub selector: String,
    /// Signing domain (`d=`); should align with the From domain for DMARC.
    pub domain: String,
    /// `rsa-sha256` (PKCS#1 PEM key, 2048 bits recommended) or `ed25519-sha256` (base64 of
    /// the raw 32-byte key).
    #[serde(default = "default_algorithm")]
    pub algorithm: String,
    /// Private key file, relative to the configuration file.
    pub key_file: String,
}

fn default_algorithm() -> String {
    "rsa-sha256".into()
}

/// The SMTP [`MailTransport`].
pub struct SmtpTransport {
    connector: Connector,
    pool: Pool,
    pacer: pace::Pacer,
    /// Shared with the blocking threads that sign.
    dkim: Option<std::sync::Arc<dkim::DkimSigner>>,
    rate_per_minute: Option<u32>,
    pool_size: usize,
    host: String,
}

impl std::fmt::Debug for SmtpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print credentials or key material.
        f.debug_struct("SmtpTransport")
            .field("host", &self.host)
            .field("port", &self.connector.port)
            .field("rate_per_minute", &self.rate_per_minute)
            .field("dkim", &self.dkim.is_some())
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

impl SmtpTransport {
    /// Build from the connector's TOML table; a relative DKIM `key_file` is resolved against
    /// `base_dir`.
    pub fn from_config(settings: toml::Table, base_dir: &Path) -> Result<Self, SettingsError> {
        let config: SmtpConfig =
            optinsync_plugin_api::Settings::from_serialize(&settings)?.parse()?;
        Self::new(&config, base_dir)
    }

    pub fn new(config: &SmtpConfig, base_dir: &Path) -> Result<Self, SettingsError> {
        if config.host.trim().is_empty() {
            return Err(invalid("host", "must not be empty"));
        }
        let port = config.port.unwrap_or(match config.tls {
            TlsMode::Starttls => 587,
            TlsMode::Tls => 465,
            TlsMode::None => 25,
        });
        let security = match config.tls {
            TlsMode::None => Security::Plain,
            TlsMode::Starttls => Security::Starttls(
                TlsParameters::new(config.host.clone())
                    .map_err(|e| invalid("tls", format!("cannot set up TLS: {e}")))?,
            ),
            TlsMode::Tls => conn::implicit_tls(&config.host).map_err(|e| invalid("tls", e))?,
        };
        let credentials = match (&config.username, &config.password) {
            (Some(u), Some(p)) => Some(Credentials::new(u.clone(), p.clone())),
            (None, None) => None,
            _ => {
                return Err(invalid("username", "`username` and `password` go together"));
            }
        };
        let connector = Connector {
            host: config.host.clone(),
            port,
            security,
            hello: config
                .hello_name
                .clone()
                .map(ClientId::Domain)
                .unwrap_or_default(),
            credentials,
            timeout: Duration::from_secs(config.timeout_secs.max(1)),
        };
        let pool_size = usize::try_from(config.pool_size.max(1)).unwrap_or(1);
        if config.rate_per_minute == Some(0) {
            return Err(invalid(
                "rate_per_minute",
                "must be at least 1 (or left out)",
            ));
        }
        let dkim = config
            .dkim
            .as_ref()
            .map(|d| dkim_config(d, base_dir).map(std::sync::Arc::new))
            .transpose()?;
        Ok(Self {
            connector,
            pool: Pool::new(pool_size, IDLE_TIMEOUT),
            pacer: pace::Pacer::new(config.rate_per_minute, std::time::Instant::now()),
            dkim,
            rate_per_minute: config.rate_per_minute,
            pool_size,
            host: config.host.clone(),
        })
    }

    /// The paced send rate in mails per second (`None`: not pacing; the relay has not asked
    /// to slow down, or the transport has sped up past [`pace::RELEASE`] since).
    pub fn paced_rate(&self) -> Option<f64> {
        self.pacer.rate()
    }

    /// How many connections to the relay this transport has opened so far (pool reuse
    /// keeps this low; a stale pooled connection adds one).
    pub fn connections_opened(&self) -> u64 {
        self.pool.opened()
    }
}

fn dkim_config(d: &DkimSettings, base_dir: &Path) -> Result<dkim::DkimSigner, SettingsError> {
    let algorithm = match d.algorithm.as_str() {
        "rsa-sha256" | "rsa" => dkim::Algorithm::RsaSha256,
        "ed25519-sha256" | "ed25519" => dkim::Algorithm::Ed25519Sha256,
        other => {
            return Err(invalid(
                "dkim.algorithm",
                format!("`{other}` is not `rsa-sha256` or `ed25519-sha256`"),
            ));
        }
    };
    let path = if Path::new(&d.key_file).is_absolute() {
        PathBuf::from(&d.key_file)
    } else {
        base_dir.join(&d.key_file)
    };
    let text = std::fs::read_to_string(&path).map_err(|e| {
        invalid(
            "dkim.key_file",
            format!("cannot read {}: {e}", path.display()),
        )
    })?;
    dkim::DkimSigner::new(
        d.selector.clone(),
        d.domain.clone(),
        algorithm,
        &text,
        DKIM_SIGNED_HEADERS,
    )
    .map_err(|e| {
        invalid(
            "dkim.key_file",
            format!("{} is not a usable key: {e}", path.display()),
        )
    })
}

/// The message as sent: rendered, then DKIM-signed when a key is configured.
pub fn render(
    message: &OutgoingMessage,
    dkim: Option<&dkim::DkimSigner>,
) -> ConnectorResult<(lettre::address::Envelope, Vec<u8>)> {
    let mail = build_message(message)?;
    let raw = mail.formatted();
    let raw = match dkim {
        Some(signer) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            signer
                .sign(&raw, now)
                .map_err(|e| ConnectorError::permanent(e.to_string()))?
        }
        None => raw,
    };
    Ok((mail.envelope().clone(), raw))
}

/// Render the message (unsigned: [`render`] signs). Addresses are never echoed in errors:
/// errors end up in logs and dead-letter rows.
pub fn build_message(message: &OutgoingMessage) -> ConnectorResult<Message> {
    // A bad sender is our configuration, not the recipient's fault: never `Rejected`.
    let from: Mailbox = message
        .from
        .parse()
        .map_err(|_| ConnectorError::permanent("sender address is not a valid mailbox"))?;
    let to: Mailbox = deliverable(&message.to)
        .parse()
        .map_err(|_| ConnectorError::rejected("recipient address is not a valid mailbox"))?;
    let id = message
        .message_id
        .trim_start_matches('<')
        .trim_end_matches('>');
    let mut builder = Message::builder()
        .from(from)
        .to(to)
        .subject(message.subject.as_str())
        .message_id(Some(format!("<{id}>")))
        .date_now();
    for (name, value) in &message.headers {
        let header_name = HeaderName::new_from_ascii(name.clone())
            .map_err(|_| ConnectorError::permanent(format!("invalid mail header name {name:?}")))?;
        // `HeaderValue::new` encodes the value (RFC 2047), so CR/LF cannot inject headers.
        builder = builder.raw_header(HeaderValue::new(header_name, value.clone()));
    }
    let text = SinglePart::builder()
        .header(ContentType::TEXT_PLAIN)
        .body(message.text.clone());
    let built = match &message.html {
        Some(html) => builder.multipart(
            MultiPart::alternative().singlepart(text).singlepart(
                SinglePart::builder()
                    .header(ContentType::TEXT_HTML)
                    .body(html.clone()),
            ),
        ),
        None => builder.singlepart(text),
    };
    built.map_err(|err| ConnectorError::permanent(format!("cannot build mail: {err}")))
}

/// The engine keeps an IDN domain in its Unicode (display) form. With an ASCII local part
/// the address is sent with the domain's ASCII form (A-labels, as DNS knows it), so a relay
/// without SMTPUTF8 still takes it; a non-ASCII local part needs SMTPUTF8 anyway.
fn deliverable(to: &str) -> std::borrow::Cow<'_, str> {
    match to.rsplit_once('@') {
        Some((local, domain)) if local.is_ascii() && !domain.is_ascii() && !to.contains('<') => {
            match idna::domain_to_ascii(domain) {
                Ok(ascii) => format!("{local}@{ascii}").into(),
                Err(_) => to.into(),
            }
        }
        _ => to.into(),
    }
}

/// SMTP reply codes that are about the sender or the session, not the recipient.
fn is_our_fault(code: u16) -> bool {
    matches!(code, 500..=504 | 530 | 534 | 535 | 538)
}

/// Map a lettre SMTP error onto what the engine must do with the message.
pub fn classify(err: &lettre::transport::smtp::Error) -> ConnectorError {
    let code = err.status().and_then(|c| c.to_string().parse::<u16>().ok());
    let message = err.to_string();
    if err.is_permanent() {
        match code {
            Some(c) if is_our_fault(c) => ConnectorError::permanent(format!("SMTP {c}: {message}")),
            _ => ConnectorError::bounced(bounce::classify(code, &message), message),
        }
    } else {
        // 4xx, timeouts, connection and TLS trouble: try again later.
        ConnectorError::transient(message)
    }
}

/// Map a failed connection or transaction onto what the engine must do with the message.
pub fn classify_send(err: &SendError) -> ConnectorError {
    match err {
        SendError::Smtp(e) => classify(e),
        // Connection, TLS and timeouts are passing trouble; a missing extension was a
        // lettre client error before and stays temporary (the relay may be reconfigured).
        SendError::Connect(_)
        | SendError::Tls(_)
        | SendError::Timeout { .. }
        | SendError::Unsupported(_) => ConnectorError::transient(err.to_string()),
    }
}

#[async_trait]
impl optinsync_plugin_api::Connector for SmtpTransport {
    async fn health(&self) -> ConnectorResult<Health> {
        Ok(match self.connector.check(&self.pool).await {
            Ok(()) => Health {
                ok: true,
                detail: format!("SMTP relay {} answers", self.host),
            },
            Err(e) => Health {
                ok: false,
                detail: format!("SMTP relay {}: {e}", self.host),
            },
        })
    }
}

#[async_trait]
impl MailTransport for SmtpTransport {
    fn concurrency(&self) -> usize {
        self.pool_size
    }

    async fn send(&self, message: &OutgoingMessage) -> ConnectorResult<SentMessage> {
        // One way out for every mail: made ready, then sent as made.
        let ready = self.prepare(message.clone()).await?;
        self.send_ready(&ready).await
    }

    async fn prepare(&self, message: OutgoingMessage) -> ConnectorResult<ReadyMessage> {
        // The DKIM signature (RSA) is ~1 ms of CPU: on a blocking thread, so that mails made
        // ready side by side are signed on every core, not one after another on the
        // outbox's task.
        let dkim = self.dkim.clone();
        let (message, rendered) = tokio::task::spawn_blocking(move || {
            let rendered = render(&message, dkim.as_deref());
            (message, rendered)
        })
        .await
        .map_err(|e| ConnectorError::transient(format!("message build task failed: {e}")))?;
        let (envelope, bytes) = rendered?;
        Ok(ReadyMessage {
            message,
            wire: Some(WireMessage {
                mail_from: envelope.from().map(ToString::to_string),
                rcpt_to: envelope.to().iter().map(ToString::to_string).collect(),
                bytes,
            }),
        })
    }

    async fn send_ready(&self, ready: &ReadyMessage) -> ConnectorResult<SentMessage> {
        let Some(wire) = &ready.wire else {
            return self.send(&ready.message).await;
        };
        // The addresses were lettre's own a moment ago; failing to read them back would be
        // a bug here, not the recipient's fault.
        let address = |a: &str| {
            a.parse::<lettre::Address>().map_err(|_| {
                ConnectorError::permanent("prepared envelope holds an invalid address")
            })
        };
        let from = wire.mail_from.as_deref().map(address).transpose()?;
        let to = wire
            .rcpt_to
            .iter()
            .map(|a| address(a))
            .collect::<ConnectorResult<Vec<_>>>()?;
        let envelope = lettre::address::Envelope::new(from, to)
            .map_err(|e| ConnectorError::permanent(format!("prepared envelope: {e}")))?;
        self.send_rendered(&ready.message.message_id, &envelope, &wire.bytes)
            .await
    }
}

impl SmtpTransport {
    /// One SMTP transaction for a rendered message, paced by the relay's answers.
    async fn send_rendered(
        &self,
        message_id: &str,
        envelope: &lettre::address::Envelope,
        raw: &[u8],
    ) -> ConnectorResult<SentMessage> {
        let wait = self.pacer.reserve(std::time::Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        let result = self.connector.send(&self.pool, envelope, raw).await;
        let answer = match &result {
            Ok(_) => pace::Answer::Accepted,
            Err(e) => pace::Answer::of_code(
                e.code(),
                matches!(e, SendError::Connect(io) if io.kind() == std::io::ErrorKind::ConnectionRefused),
            ),
        };
        if let Some(rate) = self.pacer.observe(answer) {
            tracing::warn!(
                rate_per_second = rate,
                "SMTP relay asked to try later; slowing down (the message is retried)"
            );
        }
        metrics::gauge!("optinsync_smtp_paced_rate").set(self.pacer.rate().unwrap_or(0.0));
        match result {
            Ok(response) => {
                tracing::debug!(code = %response.code(), "relay accepted the message");
                Ok(SentMessage {
                    message_id: message_id.to_owned(),
                    deduplicated: false,
                })
            }
            Err(e) => {
                let mapped = classify_send(&e);
                tracing::debug!(error = %e, "SMTP send failed");
                Err(mapped)
            }
        }
    }
}

/// `kind = "smtp"`: the mail role.
pub fn factories() -> Vec<std::sync::Arc<dyn optinsync_plugin_api::ConnectorFactory>> {
    vec![std::sync::Arc::new(SmtpFactory)]
}

struct SmtpFactory;

#[async_trait]
impl optinsync_plugin_api::ConnectorFactory for SmtpFactory {
    fn kind(&self) -> &'static str {
        "smtp"
    }
    fn roles(&self) -> &'static [optinsync_plugin_api::Role] {
        &[optinsync_plugin_api::Role::Mail]
    }
    async fn build(
        &self,
        settings: optinsync_plugin_api::Settings,
        ctx: &optinsync_plugin_api::BuildContext,
    ) -> Result<optinsync_plugin_api::Built, SettingsError> {
        let transport = SmtpTransport::new(&settings.parse()?, &ctx.base_dir)?;
        Ok(optinsync_plugin_api::Built::Mail(std::sync::Arc::new(
            transport,
        )))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn table(s: &str) -> toml::Table {
        toml::from_str(s).unwrap()
    }

    #[test]
    fn idn_domains_with_an_ascii_local_part_need_no_smtputf8() {
        let message = |to: &str| OutgoingMessage {
            idempotency_key: "mail-1".into(),
            message_id: "m1@example.org".into(),
            from: "Example <confirm@example.org>".into(),
            to: to.into(),
            subject: "Please confirm".into(),
            text: "text".into(),
            html: None,
            headers: vec![],
        };
        let ascii = build_message(&message("ana@b\u{fc}cher.example")).unwrap();
        let to: Vec<String> = ascii
            .envelope()
            .to()
            .iter()
            .map(|a| a.to_string())
            .collect();
        assert_eq!(to, ["ana@xn--bcher-kva.example"]);
        // A Unicode local part stays as it is (SMTPUTF8), and so do ASCII addresses.
        let unicode = build_message(&message("jos\u{e9}@b\u{fc}cher.example")).unwrap();
        assert!(!unicode.envelope().to()[0].to_string().is_ascii());
        assert_eq!(deliverable("ana@example.org"), "ana@example.org");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = SmtpTransport::from_config(table("host = \"h\"\nprot = 25"), Path::new("."))
            .unwrap_err();
        assert!(e.to_string().contains("prot"), "{e}");
    }

    #[test]
    fn username_without_password_is_refused() {
        let e = SmtpTransport::from_config(
            table("host = \"h\"\ntls = \"none\"\nusername = \"u\""),
            Path::new("."),
        )
        .unwrap_err();
        assert!(e.to_string().contains("password"), "{e}");
    }

    #[tokio::test]
    async fn builds_each_tls_mode() {
        for mode in ["starttls", "tls", "none"] {
            let t = SmtpTransport::from_config(
                table(&format!("host = \"127.0.0.1\"\ntls = \"{mode}\"")),
                Path::new("."),
            );
            assert!(t.is_ok(), "{mode}: {t:?}");
        }
    }

    #[test]
    fn missing_dkim_key_names_the_setting() {
        let e = SmtpTransport::from_config(
            table(
                "host = \"h\"\n[dkim]\nselector = \"s\"\ndomain = \"example.org\"\nkey_file = \"nope.pem\"",
            ),
            Path::new("/nonexistent"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("dkim.key_file"), "{e}");
    }
}
