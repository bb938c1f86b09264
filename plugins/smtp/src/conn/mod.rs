//! Connections to the relay, opened by us so that every one has `TCP_NODELAY`, and a small
//! pool of idle ones.
//!
//! lettre writes each command, the message and its final `.\r\n` in separate small writes
//! and never sets `TCP_NODELAY`: Nagle's algorithm then holds the last write back until the
//! relay's delayed ACK (~40 ms), once per mail. lettre accepts a stream it did not open
//! ([`AsyncSmtpConnection::connect_with_transport`]), so we open the TCP stream ourselves,
//! set `TCP_NODELAY`, wrap it in TLS for implicit TLS, and let lettre speak SMTP on it.
//!
//! Every step (connect, TLS, greeting + EHLO, STARTTLS, AUTH, each command of a transaction,
//! the message) runs under the configured timeout: lettre's tokio client only times the TCP
//! connect.
//!
//! The pool, and sending through it, are in `pool`.

mod pool;

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use lettre::address::Envelope;
use lettre::transport::smtp::authentication::{Credentials, DEFAULT_MECHANISMS};
use lettre::transport::smtp::client::{AsyncSmtpConnection, AsyncTokioStream, TlsParameters};
use lettre::transport::smtp::commands::{Data, Mail, Rcpt};
use lettre::transport::smtp::extension::{ClientId, Extension, MailBodyParameter, MailParameter};
use lettre::transport::smtp::response::Response;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::ServerName;

pub(crate) use self::pool::Pool;

/// Why a connection or a transaction failed. Our own texts never name an address; a relay's
/// refusal is passed on as lettre reports it.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The TCP connection could not be opened.
    #[error("cannot connect to the relay: {0}")]
    Connect(#[source] io::Error),
    /// The implicit-TLS handshake failed (certificate, protocol, or a relay that is not TLS).
    #[error("TLS handshake with the relay failed: {0}")]
    Tls(#[source] io::Error),
    /// A step did not finish within the configured timeout.
    #[error("{step} timed out after {secs} s")]
    Timeout { step: &'static str, secs: u64 },
    /// The message needs an extension the relay does not offer.
    #[error("the relay does not offer {0}, which this message needs")]
    Unsupported(&'static str),
    /// The relay answered with an error, or lettre failed to speak SMTP with it.
    #[error(transparent)]
    Smtp(#[from] lettre::transport::smtp::Error),
}

impl SendError {
    /// The SMTP reply code, when the relay answered.
    pub fn code(&self) -> Option<u16> {
        match self {
            SendError::Smtp(e) => e.status().map(u16::from),
            _ => None,
        }
    }
}

/// How the TCP stream is secured before lettre gets it.
#[derive(Clone)]
pub(crate) enum Security {
    /// Plain text (loopback relays and tests).
    Plain,
    /// Plain, then `STARTTLS` (required: failing to upgrade fails the connection).
    Starttls(TlsParameters),
    /// TLS from the first byte.
    Implicit {
        connector: TlsConnector,
        server_name: ServerName<'static>,
    },
}

/// Opens authenticated, ready-to-send SMTP connections.
pub(crate) struct Connector {
    pub host: String,
    pub port: u16,
    pub security: Security,
    pub hello: ClientId,
    pub credentials: Option<Credentials>,
    pub timeout: Duration,
}

/// Run `fut` under the per-step timeout.
async fn timed<T, E>(
    timeout: Duration,
    step: &'static str,
    fut: impl Future<Output = Result<T, E>>,
) -> Result<T, SendError>
where
    SendError: From<E>,
{
    match tokio::time::timeout(timeout, fut).await {
        Ok(result) => result.map_err(SendError::from),
        Err(_) => Err(SendError::Timeout {
            step,
            secs: timeout.as_secs(),
        }),
    }
}

impl Connector {
    /// Open the TCP stream with `TCP_NODELAY` set.
    pub(crate) async fn tcp(&self) -> Result<TcpStream, SendError> {
        let connect = async {
            TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(SendError::Connect)
        };
        let stream = timed(self.timeout, "connect", connect).await?;
        stream.set_nodelay(true).map_err(SendError::Connect)?;
        Ok(stream)
    }

    /// A new connection: TCP (+ TLS), greeting, EHLO, STARTTLS + EHLO, AUTH.
    pub(crate) async fn open(&self) -> Result<AsyncSmtpConnection, SendError> {
        let tcp = self.tcp().await?;
        let stream: Box<dyn AsyncTokioStream> = match &self.security {
            Security::Implicit {
                connector,
                server_name,
            } => {
                let handshake = async {
                    connector
                        .connect(server_name.clone(), tcp)
                        .await
                        .map_err(SendError::Tls)
                };
                Box::new(TlsTcp(
                    timed(self.timeout, "TLS handshake", handshake).await?,
                ))
            }
            Security::Plain | Security::Starttls(_) => Box::new(tcp),
        };
        let mut conn = timed(
            self.timeout,
            "greeting",
            AsyncSmtpConnection::connect_with_transport(stream, &self.hello),
        )
        .await?;
        if let Security::Starttls(params) = &self.security {
            // lettre refuses when the relay does not offer STARTTLS: never plain text.
            timed(
                self.timeout,
                "STARTTLS",
                conn.starttls(params.clone(), &self.hello),
            )
            .await?;
        }
        if let Some(credentials) = &self.credentials {
            timed(
                self.timeout,
                "AUTH",
                conn.auth(DEFAULT_MECHANISMS, credentials),
            )
            .await?;
        }
        Ok(conn)
    }
}

/// A failed transaction, and whether the message could have reached the relay.
#[derive(Debug)]
pub(crate) struct Failed {
    pub error: SendError,
    /// The message (DATA content) started going out: the relay may have accepted it, so
    /// sending it again could deliver it twice.
    pub content_sent: bool,
}

/// One mail transaction (MAIL, RCPT…, DATA, content) on `conn`, as lettre's `send` does it,
/// but step by step so that the caller knows whether the content went out.
pub(crate) async fn transact(
    conn: &mut AsyncSmtpConnection,
    envelope: &Envelope,
    email: &[u8],
    timeout: Duration,
) -> Result<Response, Failed> {
    let before = |error: SendError| Failed {
        error,
        content_sent: false,
    };
    let mut options = Vec::new();
    let non_ascii_address = envelope
        .from()
        .into_iter()
        .chain(envelope.to())
        .any(|a: &lettre::Address| !AsRef::<str>::as_ref(a).is_ascii());
    if non_ascii_address {
        if !conn.server_info().supports_feature(Extension::SmtpUtfEight) {
            return Err(before(SendError::Unsupported("SMTPUTF8")));
        }
        options.push(MailParameter::SmtpUtfEight);
    }
    if !email.is_ascii() {
        if !conn.server_info().supports_feature(Extension::EightBitMime) {
            return Err(before(SendError::Unsupported("8BITMIME")));
        }
        options.push(MailParameter::Body(MailBodyParameter::EightBitMime));
    }
    timed(
        timeout,
        "MAIL FROM",
        conn.command(Mail::new(envelope.from().cloned(), options)),
    )
    .await
    .map_err(before)?;
    for to in envelope.to() {
        timed(
            timeout,
            "RCPT TO",
            conn.command(Rcpt::new(to.clone(), vec![])),
        )
        .await
        .map_err(before)?;
    }
    timed(timeout, "DATA", conn.command(Data))
        .await
        .map_err(before)?;
    // From here on the relay may accept the message even if we never see its answer.
    timed(timeout, "message", conn.message(email))
        .await
        .map_err(|error| Failed {
            error,
            content_sent: true,
        })
}

/// Whether a failure on a *reused* connection before any content went out is the
/// connection's fault (closed by the relay while idle, half-open), so one more try on a
/// fresh connection is safe and cannot duplicate the mail.
pub(crate) fn stale_connection(failed: &Failed) -> bool {
    if failed.content_sent {
        return false;
    }
    match &failed.error {
        // 421: the relay is closing this session (idle timeout, shutting down).
        SendError::Smtp(e) => e.status().is_none() || e.status().map(u16::from) == Some(421),
        SendError::Timeout { .. } | SendError::Connect(_) | SendError::Tls(_) => true,
        SendError::Unsupported(_) => false,
    }
}

/// A TLS stream over TCP, in the shape lettre takes.
#[derive(Debug)]
struct TlsTcp(TlsStream<TcpStream>);

impl AsyncRead for TlsTcp {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsTcp {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

impl AsyncTokioStream for TlsTcp {
    fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.0.get_ref().0.peer_addr()
    }
}

/// The rustls client configuration for implicit TLS: Mozilla roots, certificates checked.
pub(crate) fn implicit_tls(host: &str) -> Result<Security, String> {
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    implicit_tls_with(host, roots)
}

fn implicit_tls_with(
    host: &str,
    roots: tokio_rustls::rustls::RootCertStore,
) -> Result<Security, String> {
    let server_name = ServerName::try_from(host.to_owned())
        .map_err(|e| format!("`{host}` is not a valid TLS server name: {e}"))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("cannot set up TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Security::Implicit {
        connector: TlsConnector::from(Arc::new(config)),
        server_name,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn connector(port: u16) -> Connector {
        Connector {
            host: "127.0.0.1".to_owned(),
            port,
            security: Security::Plain,
            hello: ClientId::Domain("test".to_owned()),
            credentials: None,
            timeout: Duration::from_secs(5),
        }
    }

    #[tokio::test]
    async fn connections_have_tcp_nodelay() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let stream = connector(port).tcp().await.unwrap();
        assert!(stream.nodelay().unwrap(), "TCP_NODELAY is set");
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let result = connector(port).open().await;
        assert!(
            matches!(result, Err(SendError::Connect(_))),
            "{:?}",
            result.err()
        );
    }

    // --- STARTTLS, implicit TLS and AUTH against a small TLS SMTP server in the test ---
    //
    // The server's certificate (tests/fixtures/localhost.pem, for `localhost`) is signed by
    // a test CA (tests/fixtures/ca.pem) that the client is told to trust; certificates are
    // checked as in production, only the root store differs.

    use lettre::transport::smtp::client::Certificate;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject as _;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

    const CA: &str = include_str!("../../tests/fixtures/ca.pem");
    const CERT: &str = include_str!("../../tests/fixtures/localhost.pem");
    const KEY: &str = include_str!("../../tests/fixtures/localhost-key.pem");

    fn acceptor() -> tokio_rustls::TlsAcceptor {
        let cert = CertificateDer::from_pem_slice(CERT.as_bytes()).unwrap();
        let key = PrivateKeyDer::from_pem_slice(KEY.as_bytes()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .unwrap();
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }

    fn test_roots() -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(CA.as_bytes()).unwrap())
            .unwrap();
        roots
    }

    /// What the server saw: commands in plain text, then commands inside TLS.
    #[derive(Debug, Default)]
    struct Seen {
        plain: Vec<String>,
        tls: Vec<String>,
    }

    /// The SMTP dialog after the greeting; `AUTH PLAIN` accepts only user `u`, password `pw`.
    async fn dialog<S>(stream: S, seen: &mut Vec<String>) -> io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        use base64::Engine as _;
        let mut stream = BufReader::new(stream);
        let mut line = String::new();
        loop {
            line.clear();
            if stream.read_line(&mut line).await? == 0 {
                return Ok(());
            }
            let cmd = line.trim_end().to_owned();
            seen.push(cmd.clone());
            let reply: &[u8] = if cmd.starts_with("EHLO") {
                b"250-test\r\n250-AUTH PLAIN\r\n250 8BITMIME\r\n"
            } else if let Some(arg) = cmd.strip_prefix("AUTH PLAIN ") {
                let ok = base64::engine::general_purpose::STANDARD
                    .decode(arg)
                    .is_ok_and(|d| d == b"\0u\0pw");
                if ok {
                    b"235 2.7.0 ok\r\n"
                } else {
                    b"535 5.7.8 no\r\n"
                }
            } else if cmd == "DATA" {
                stream.get_mut().write_all(b"354 go\r\n").await?;
                loop {
                    line.clear();
                    if stream.read_line(&mut line).await? == 0 || line.trim_end() == "." {
                        break;
                    }
                }
                b"250 2.0.0 queued\r\n"
            } else if cmd == "QUIT" {
                stream.get_mut().write_all(b"221 bye\r\n").await?;
                return Ok(());
            } else {
                b"250 ok\r\n"
            };
            stream.get_mut().write_all(reply).await?;
        }
    }

    /// Serve one connection: implicit TLS, or plain text with STARTTLS offered.
    async fn tls_server(implicit: bool) -> (u16, tokio::task::JoinHandle<Seen>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let handle = tokio::spawn(async move {
            let mut seen = Seen::default();
            let (mut tcp, _) = listener.accept().await.unwrap();
            if implicit {
                let Ok(mut tls) = acceptor().accept(tcp).await else {
                    return seen;
                };
                tls.write_all(b"220 test\r\n").await.unwrap();
                let _ = dialog(tls, &mut seen.tls).await;
                return seen;
            }
            tcp.write_all(b"220 test\r\n").await.unwrap();
            let mut plain = BufReader::new(tcp);
            let mut line = String::new();
            loop {
                line.clear();
                if plain.read_line(&mut line).await.unwrap_or(0) == 0 {
                    return seen;
                }
                let cmd = line.trim_end().to_owned();
                seen.plain.push(cmd.clone());
                let reply: &[u8] = if cmd.starts_with("EHLO") {
                    b"250-test\r\n250-AUTH PLAIN\r\n250 STARTTLS\r\n"
                } else if cmd == "STARTTLS" {
                    b"220 go ahead\r\n"
                } else {
                    b"530 5.7.0 STARTTLS first\r\n"
                };
                plain.get_mut().write_all(reply).await.unwrap();
                if cmd == "STARTTLS" {
                    break;
                }
            }
            let Ok(tls) = acceptor().accept(plain.into_inner()).await else {
                return seen;
            };
            let _ = dialog(tls, &mut seen.tls).await;
            seen
        });
        (port, handle)
    }

    fn envelope() -> Envelope {
        Envelope::new(
            Some("news@example.org".parse().unwrap()),
            vec!["p@example.net".parse().unwrap()],
        )
        .unwrap()
    }

    fn tls_connector(host: &str, port: u16, implicit: bool, password: &str) -> Connector {
        let security = if implicit {
            implicit_tls_with(host, test_roots()).unwrap()
        } else {
            let params = TlsParameters::builder(host.to_owned())
                .add_root_certificate(Certificate::from_pem(CA.as_bytes()).unwrap())
                .build_rustls()
                .unwrap();
            Security::Starttls(params)
        };
        Connector {
            host: host.to_owned(),
            port,
            security,
            hello: ClientId::Domain("client.test".to_owned()),
            credentials: Some(Credentials::new("u".to_owned(), password.to_owned())),
            timeout: Duration::from_secs(5),
        }
    }

    const MAIL: &[u8] = b"Subject: hi\r\n\r\nhello\r\n";

    #[tokio::test]
    async fn starttls_then_auth_then_mail_all_inside_tls() {
        let (port, server) = tls_server(false).await;
        let c = tls_connector("localhost", port, false, "pw");
        let pool = Pool::new(1, Duration::from_secs(60));
        c.send(&pool, &envelope(), MAIL).await.unwrap();
        drop(pool);
        let seen = server.await.unwrap();
        assert_eq!(seen.plain, ["EHLO client.test", "STARTTLS"], "{seen:?}");
        assert_eq!(
            seen.tls.first().map(String::as_str),
            Some("EHLO client.test")
        );
        assert!(
            seen.tls.iter().any(|l| l.starts_with("AUTH PLAIN ")),
            "{seen:?}"
        );
        assert!(
            seen.tls.iter().any(|l| l.starts_with("MAIL FROM:")),
            "{seen:?}"
        );
    }

    #[tokio::test]
    async fn implicit_tls_then_auth_then_mail() {
        let (port, server) = tls_server(true).await;
        let c = tls_connector("localhost", port, true, "pw");
        let pool = Pool::new(1, Duration::from_secs(60));
        c.send(&pool, &envelope(), MAIL).await.unwrap();
        drop(pool);
        let seen = server.await.unwrap();
        assert!(seen.plain.is_empty());
        assert!(
            seen.tls.iter().any(|l| l.starts_with("AUTH PLAIN ")),
            "{seen:?}"
        );
        assert!(
            seen.tls.iter().any(|l| l.starts_with("RCPT TO:")),
            "{seen:?}"
        );
    }

    #[tokio::test]
    async fn a_certificate_for_another_name_is_refused() {
        for implicit in [true, false] {
            let (port, server) = tls_server(implicit).await;
            // The certificate names `localhost`, not `127.0.0.1`.
            let c = tls_connector("127.0.0.1", port, implicit, "pw");
            let pool = Pool::new(1, Duration::from_secs(60));
            let result = c.send(&pool, &envelope(), MAIL).await;
            assert!(result.is_err(), "implicit {implicit}: {:?}", result.ok());
            let seen = server.await.unwrap();
            assert!(seen.tls.is_empty(), "implicit {implicit}: {seen:?}");
            assert!(
                !seen.plain.iter().any(|l| l.starts_with("MAIL")),
                "{seen:?}"
            );
        }
    }

    #[tokio::test]
    async fn refused_credentials_are_about_us_and_send_nothing() {
        let (port, server) = tls_server(true).await;
        let c = tls_connector("localhost", port, true, "wrong");
        let pool = Pool::new(1, Duration::from_secs(60));
        let e = c.send(&pool, &envelope(), MAIL).await.unwrap_err();
        assert_eq!(e.code(), Some(535), "{e}");
        let mapped = crate::classify_send(&e);
        assert!(
            matches!(
                mapped,
                optinsync_plugin_api::ConnectorError::Permanent { .. }
            ),
            "{mapped:?}"
        );
        drop(pool);
        let seen = server.await.unwrap();
        assert!(!seen.tls.iter().any(|l| l.starts_with("MAIL")), "{seen:?}");
    }

    #[test]
    fn only_failures_before_the_content_on_a_dead_connection_are_retried() {
        let timeout = || SendError::Timeout {
            step: "MAIL FROM",
            secs: 1,
        };
        assert!(stale_connection(&Failed {
            error: timeout(),
            content_sent: false,
        }));
        assert!(!stale_connection(&Failed {
            error: timeout(),
            content_sent: true,
        }));
        assert!(!stale_connection(&Failed {
            error: SendError::Unsupported("8BITMIME"),
            content_sent: false,
        }));
    }
}
