//! A mail transport that writes each message as an RFC 5322 `.eml` file instead of sending it.
//!
//! The file is named after the message's idempotency key, which makes the transport
//! deduplicating: a key that already has a file is not written again. The same name lets
//! erasure find a person's mails: [`MailTransport::forget`] deletes them.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use lettre::Message;
use lettre::message::Body;
use lettre::message::header::{ContentTransferEncoding, ContentType};
use lettre::message::header::{HeaderName, HeaderValue};
use lettre::message::{Mailbox, MultiPart, SinglePart};
use optinsync_plugin_api::{
    Connector, ConnectorError, ConnectorResult, Health, MailTransport, OutgoingMessage, SentMessage,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

use crate::{SettingsError, fsutil, parse_settings};

/// Settings of [`EmlDir`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmlDirConfig {
    /// Folder receiving the `.eml` files. Relative to the configuration file's directory.
    pub dir: String,
}

/// A [`MailTransport`] writing `<idempotency key>.eml` files into a folder.
#[derive(Debug)]
pub struct EmlDir {
    dir: PathBuf,
    /// Makes "is the key already written?" and "write it" one step, so two concurrent sends
    /// of the same key cannot both write.
    lock: Mutex<()>,
}

/// Longest file stem kept verbatim; longer keys are shortened with a hash suffix so the
/// name stays under common file-name limits (255 bytes) and stays unique.
const MAX_STEM: usize = 200;

impl EmlDir {
    /// Build from the connector's TOML table; a relative `dir` is resolved against `base_dir`.
    pub fn from_config(settings: toml::Table, base_dir: &Path) -> Result<Self, SettingsError> {
        let config: EmlDirConfig = parse_settings(settings)?;
        Self::new(&config, base_dir)
    }

    /// Build from already-parsed settings; a relative `dir` is resolved against `base_dir`.
    pub fn new(config: &EmlDirConfig, base_dir: &Path) -> Result<Self, SettingsError> {
        Ok(Self {
            dir: fsutil::resolve(base_dir, "dir", &config.dir)?,
            lock: Mutex::new(()),
        })
    }

    /// The resolved folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the message with this idempotency key is (or would be) written.
    pub fn path_for(&self, idempotency_key: &str) -> PathBuf {
        self.dir.join(format!("{}.eml", file_stem(idempotency_key)))
    }
}

#[async_trait]
impl Connector for EmlDir {
    async fn health(&self) -> ConnectorResult<Health> {
        Ok(match fsutil::probe_writable_dir(&self.dir).await {
            Ok(()) => Health {
                ok: true,
                detail: format!("{} is writable", self.dir.display()),
            },
            Err(detail) => Health { ok: false, detail },
        })
    }
}

#[async_trait]
impl MailTransport for EmlDir {
    async fn send(&self, message: &OutgoingMessage) -> ConnectorResult<SentMessage> {
        if message.idempotency_key.trim().is_empty() {
            return Err(ConnectorError::permanent(
                "message has an empty idempotency key",
            ));
        }
        let path = self.path_for(&message.idempotency_key);
        let _guard = self.lock.lock().await;
        let exists = tokio::fs::try_exists(&path)
            .await
            .map_err(|err| fsutil::transient("cannot check", &path, &err))?;
        if exists {
            return Ok(SentMessage {
                message_id: message.message_id.clone(),
                deduplicated: true,
            });
        }
        let mail = build(message)?;
        fsutil::write_atomic(&path, &mail.formatted())
            .await
            .map_err(|err| fsutil::transient("cannot write", &path, &err))?;
        tracing::debug!(file = %path.display(), "mail written");
        Ok(SentMessage {
            message_id: message.message_id.clone(),
            deduplicated: false,
        })
    }

    /// Deletes the `.eml` files of these keys: erasure must not leave the address in the
    /// `To:` of a mail copy.
    async fn forget(&self, idempotency_keys: &[String]) -> ConnectorResult<u64> {
        let _guard = self.lock.lock().await;
        let mut deleted = 0;
        for key in idempotency_keys {
            let path = self.path_for(key);
            match tokio::fs::remove_file(&path).await {
                Ok(()) => deleted += 1,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => return Err(fsutil::transient("cannot delete", &path, &err)),
            }
        }
        Ok(deleted)
    }
}

/// Keep `[A-Za-z0-9._-]`, replace everything else by `_`, so a key can never escape the
/// folder or produce an awkward file name.
fn file_stem(key: &str) -> String {
    let stem: String = key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if stem.len() <= MAX_STEM {
        return stem;
    }
    let digest = hex::encode(Sha256::digest(key.as_bytes()));
    format!("{}-{}", &stem[..MAX_STEM - 17], &digest[..16])
}

/// Render the message with lettre. Addresses are not echoed in errors: they are personal
/// data and errors end up in logs and dead-letter tables.
fn build(message: &OutgoingMessage) -> ConnectorResult<Message> {
    // A bad sender is a configuration problem, not the recipient's: reporting it as
    // `Rejected` would make the engine treat every recipient as a hard bounce.
    let from: Mailbox = message
        .from
        .parse()
        .map_err(|_| ConnectorError::permanent("sender address is not a valid mailbox"))?;
    let to: Mailbox = message
        .to
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
    // 8bit rather than quoted-printable where lettre accepts it (CRLF lines under 998
    // octets): a person reading the .eml file can copy the confirmation link as one line.
    let text_part = SinglePart::builder()
        .header(ContentType::TEXT_PLAIN)
        .body(eight_bit(&message.text));
    let built = match &message.html {
        Some(html) => builder.multipart(
            MultiPart::alternative().singlepart(text_part).singlepart(
                SinglePart::builder()
                    .header(ContentType::TEXT_HTML)
                    .body(eight_bit(html)),
            ),
        ),
        None => builder.singlepart(text_part),
    };
    built.map_err(|err| ConnectorError::permanent(format!("cannot build mail: {err}")))
}

/// The body as 8bit when every line is within RFC 5322's 998 octets (lettre's own check
/// wants 76, which would fold long links), else whatever encoding lettre picks.
fn eight_bit(text: &str) -> Body {
    let crlf = text.replace("\r\n", "\n").replace('\n', "\r\n");
    // Bare CR or NUL would make the pre-encoded body invalid; lettre handles those.
    let fits = !text.contains('\r')
        && !text.contains('\0')
        && crlf.split("\r\n").all(|line| line.len() <= 998);
    if fits {
        Body::dangerous_pre_encoded(crlf.into_bytes(), ContentTransferEncoding::EightBit)
    } else {
        Body::new(text.to_owned())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn transport(dir: &Path) -> EmlDir {
        let settings: toml::Table = toml::from_str("dir = \"outbox\"").unwrap();
        EmlDir::from_config(settings, dir).unwrap()
    }

    fn message(key: &str, to: &str, html: bool) -> OutgoingMessage {
        OutgoingMessage {
            idempotency_key: key.to_owned(),
            message_id: "doi-42@optinsync.example".to_owned(),
            from: "Newsletter <news@example.com>".to_owned(),
            to: to.to_owned(),
            subject: "Please confirm your subscription – ¡gracias!".to_owned(),
            text: "Click https://example.com/c/abc to confirm.".to_owned(),
            html: html
                .then(|| "<p>Click <a href=\"https://example.com/c/abc\">here</a>.</p>".to_owned()),
            headers: vec![
                (
                    "List-Unsubscribe".to_owned(),
                    "<https://example.com/u/abc>".to_owned(),
                ),
                (
                    "List-Unsubscribe-Post".to_owned(),
                    "List-Unsubscribe=One-Click".to_owned(),
                ),
            ],
        }
    }

    #[tokio::test]
    async fn f12_forget_deletes_the_mails_of_the_keys_only() {
        let dir = tempfile::tempdir().unwrap();
        let t = transport(dir.path());
        for key in ["mail-1", "mail-2", "mail-3"] {
            t.send(&message(key, "jos\u{e9}@b\u{fc}cher.example", false))
                .await
                .unwrap();
        }
        let forgotten = t
            .forget(&[
                "mail-1".to_owned(),
                "mail-3".to_owned(),
                "mail-9".to_owned(),
            ])
            .await
            .unwrap();
        assert_eq!(
            forgotten, 2,
            "the two existing files, the unknown key ignored"
        );
        assert!(!t.path_for("mail-1").exists());
        assert!(
            t.path_for("mail-2").exists(),
            "another contact's mail stays"
        );
        assert!(!t.path_for("mail-3").exists());
        assert_eq!(t.forget(&["mail-1".to_owned()]).await.unwrap(), 0);
    }

    /// The Content-Type of each part of a multipart body, found through the boundary.
    fn part_types(mail: &str) -> Vec<String> {
        let boundary = mail
            .split("boundary=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        let delimiter = format!("--{boundary}");
        mail.split(delimiter.as_str())
            .skip(1)
            .filter(|part| !part.starts_with("--"))
            .map(|part| {
                let headers = part.split("\r\n\r\n").next().unwrap();
                headers
                    .lines()
                    .find(|l| l.starts_with("Content-Type:"))
                    .unwrap()
                    .to_owned()
            })
            .collect()
    }

    #[tokio::test]
    async fn writes_once_then_deduplicates() {
        let dir = tempfile::tempdir().unwrap();
        let eml = transport(dir.path());
        let msg = message("doi/42:ann", "Ann <ann@example.com>", true);
        let sent = eml.send(&msg).await.unwrap();
        assert_eq!(
            sent,
            SentMessage {
                message_id: "doi-42@optinsync.example".into(),
                deduplicated: false
            }
        );
        let path = dir.path().join("outbox/doi_42_ann.eml");
        let first = std::fs::read(&path).unwrap();

        let again = eml.send(&msg).await.unwrap();
        assert!(again.deduplicated);
        assert_eq!(std::fs::read(&path).unwrap(), first);
        let names: Vec<_> = std::fs::read_dir(dir.path().join("outbox"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["doi_42_ann.eml"], "one file, no temp files left");
    }

    #[tokio::test]
    async fn eml_is_mime_with_text_and_html() {
        let dir = tempfile::tempdir().unwrap();
        let eml = transport(dir.path());
        eml.send(&message("k1", "ann@example.com", true))
            .await
            .unwrap();
        let mail = std::fs::read_to_string(eml.path_for("k1")).unwrap();
        let (headers, _) = mail.split_once("\r\n\r\n").unwrap();
        assert!(
            headers.contains("Message-ID: <doi-42@optinsync.example>"),
            "{headers}"
        );
        assert!(
            headers.contains("List-Unsubscribe: <https://example.com/u/abc>"),
            "{headers}"
        );
        assert!(
            headers.contains("List-Unsubscribe-Post: List-Unsubscribe=One-Click"),
            "{headers}"
        );
        assert!(headers.contains("MIME-Version: 1.0"), "{headers}");
        assert!(
            headers.contains("Content-Type: multipart/alternative;"),
            "{headers}"
        );
        assert!(headers.contains("To: ann@example.com"), "{headers}");
        assert!(headers.contains("Date: "), "{headers}");
        assert!(
            headers.contains("Subject: Please confirm your subscription =?utf-8?"),
            "non-ASCII subject is encoded: {headers}"
        );
        let types = part_types(&mail);
        assert_eq!(types.len(), 2, "{mail}");
        assert!(
            types[0].starts_with("Content-Type: text/plain"),
            "{types:?}"
        );
        assert!(types[1].starts_with("Content-Type: text/html"), "{types:?}");
    }

    #[tokio::test]
    async fn text_only_mail_is_single_part() {
        let dir = tempfile::tempdir().unwrap();
        let eml = transport(dir.path());
        eml.send(&message("k2", "ann@example.com", false))
            .await
            .unwrap();
        let mail = std::fs::read_to_string(eml.path_for("k2")).unwrap();
        assert!(
            mail.contains("Content-Type: text/plain; charset=utf-8"),
            "{mail}"
        );
        assert!(!mail.contains("multipart"), "{mail}");
        assert!(mail.contains("https://example.com/c/abc"), "{mail}");
    }

    #[tokio::test]
    async fn invalid_recipient_is_rejected_without_echoing_it() {
        let dir = tempfile::tempdir().unwrap();
        let eml = transport(dir.path());
        let err = eml
            .send(&message("k3", "not-an-address@@secret", true))
            .await
            .unwrap_err();
        match &err {
            ConnectorError::Rejected { message, .. } => {
                assert_eq!(message, "recipient address is not a valid mailbox");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(!err.to_string().contains("secret"));
        assert!(!eml.path_for("k3").exists());
    }

    #[tokio::test]
    async fn header_injection_is_encoded() {
        let dir = tempfile::tempdir().unwrap();
        let eml = transport(dir.path());
        let mut msg = message("k4", "ann@example.com", false);
        msg.headers = vec![("X-Test".into(), "a\r\nBcc: evil@example.com".into())];
        eml.send(&msg).await.unwrap();
        let mail = std::fs::read_to_string(eml.path_for("k4")).unwrap();
        assert!(!mail.contains("\r\nBcc:"), "{mail}");
    }

    #[test]
    fn file_stems_are_safe_and_bounded() {
        assert_eq!(file_stem("a.B-c_9"), "a.B-c_9");
        assert_eq!(file_stem("../../etc/passwd"), ".._.._etc_passwd");
        let long = "k".repeat(500);
        let stem = file_stem(&long);
        assert_eq!(stem.len(), MAX_STEM);
        assert_ne!(stem, file_stem(&"k".repeat(501)));
    }

    #[tokio::test]
    async fn health_and_config() {
        let dir = tempfile::tempdir().unwrap();
        assert!(transport(dir.path()).health().await.unwrap().ok);
        let settings: toml::Table = toml::from_str("directory = \"x\"").unwrap();
        let err = EmlDir::from_config(settings, dir.path()).unwrap_err();
        assert!(
            err.to_string().contains("unknown field `directory`"),
            "{err}"
        );
    }
}
