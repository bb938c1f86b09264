//! A small SMTP sink on loopback for tests: it speaks enough SMTP for a real client
//! (EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT), stores every message it accepts as raw
//! text, and can be told to answer a recipient with a permanent (5xx) or temporary (4xx)
//! refusal. It runs on its own thread and runtime, so tests that block (polling loops,
//! `std::thread::sleep`) do not starve it.
//!
//! [`parse`] splits a stored message into unfolded headers and decoded MIME parts.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// One message the sink accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub mail_from: String,
    pub rcpt_to: Vec<String>,
    /// The message as sent after DATA, dot-unstuffed, CRLF line ends.
    pub data: String,
}

#[derive(Debug, Clone)]
struct Refusal {
    reply: String,
    /// How many more times to refuse; `None` = always.
    remaining: Option<usize>,
}

#[derive(Debug, Default)]
struct State {
    messages: Vec<Received>,
    refusals: HashMap<String, Refusal>,
    /// RCPT commands seen (also refused ones), to count attempts.
    rcpt_attempts: Vec<String>,
    /// Answer every connection `421` and close it (the server is "down").
    down: bool,
    /// Seeded random faults at RCPT: (rng, rate); a fault is a `451` or a dropped connection.
    random: Option<(rand::rngs::StdRng, f64)>,
    /// Faults injected: (451 answers, dropped connections, 421 greetings while down).
    injected: (u64, u64, u64),
    /// Connections accepted.
    sessions: u64,
    /// Sessions that started before the current epoch close at their next command, without
    /// an answer (as if the server had closed them while idle).
    epoch: u64,
    /// Store this many more messages but close the connection instead of answering `250`.
    drop_after_data: usize,
    /// Wait this long after storing a message before answering `250`: a slow relay, and a
    /// wider window in which the sender has handed a mail over but not heard back.
    accept_delay: std::time::Duration,
    /// Answer every `RCPT` with this "try later" code (`421` also closes the session).
    throttle: Option<u16>,
    throttled: u64,
    /// Messages stored and not yet answered, now and at most.
    unanswered: usize,
    peak_unanswered: usize,
}

/// A running SMTP sink; it stops when dropped (its thread ends with the process).
#[derive(Debug)]
pub struct SmtpSink {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl SmtpSink {
    /// Start on a free port of 127.0.0.1.
    pub fn start() -> SmtpSink {
        let state = Arc::new(Mutex::new(State::default()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let st = Arc::clone(&state);
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("build SMTP sink runtime");
            rt.block_on(async move {
                let listener = TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind SMTP sink");
                addr_tx
                    .send(listener.local_addr().expect("sink address"))
                    .expect("report sink address");
                let accept = async {
                    loop {
                        let Ok((stream, _)) = listener.accept().await else {
                            continue;
                        };
                        let st = Arc::clone(&st);
                        tokio::spawn(async move {
                            let _ = session(stream, st).await;
                        });
                    }
                };
                tokio::select! {
                    _ = accept => {}
                    _ = stop_rx => {}
                }
            });
        });
        let addr = addr_rx.recv().expect("SMTP sink started");
        SmtpSink {
            addr,
            state,
            stop: Some(stop_tx),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Answer `RCPT TO:<recipient>` with `code text`, `times` times (`None` = always).
    pub fn refuse(&self, recipient: &str, code: u16, text: &str, times: Option<usize>) {
        self.lock().refusals.insert(
            recipient.to_ascii_lowercase(),
            Refusal {
                reply: format!("{code} {text}"),
                remaining: times,
            },
        );
    }

    /// Take the server "down" (every session gets `421` and is closed) or back up.
    pub fn set_down(&self, down: bool) {
        self.lock().down = down;
    }

    /// Inject faults at `rate` of `RCPT` commands (seeded): a `451` temporary refusal or a
    /// dropped connection, half and half. No message is stored for a faulted session.
    pub fn random_faults(&self, seed: u64, rate: f64) {
        use rand::SeedableRng as _;
        self.lock().random = Some((rand::rngs::StdRng::seed_from_u64(seed), rate));
    }

    /// Wait `delay` after storing each message before answering `250`.
    pub fn set_accept_delay(&self, delay: std::time::Duration) {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .accept_delay = delay;
    }

    /// Answer every `RCPT` with `code` (421, 450, 451, 452 or 454: "try later"), or normally
    /// again with `None`. Counted in [`Self::throttled`].
    pub fn set_throttle(&self, code: Option<u16>) {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .throttle = code;
    }

    /// The most messages stored but not yet answered at one moment: how many senders were
    /// waiting for the `250` side by side (see [`Self::set_accept_delay`]).
    pub fn peak_unanswered(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .peak_unanswered
    }

    /// `RCPT` commands answered with the throttle code.
    pub fn throttled(&self) -> u64 {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .throttled
    }

    /// Faults injected so far: (451 answers, dropped connections, 421 greetings while down).
    pub fn injected(&self) -> (u64, u64, u64) {
        self.lock().injected
    }

    /// How many connections the sink has accepted.
    pub fn sessions(&self) -> u64 {
        self.lock().sessions
    }

    /// Close every open session at its next command, without an answer: what a client sees
    /// when the server dropped an idle pooled connection.
    pub fn kick_sessions(&self) {
        self.lock().epoch += 1;
    }

    /// For the next `times` messages: store the message, then close the connection instead
    /// of answering `250` (the client cannot know the message was accepted).
    pub fn drop_after_data(&self, times: usize) {
        self.lock().drop_after_data = times;
    }

    /// Messages accepted so far.
    pub fn messages(&self) -> Vec<Received> {
        self.lock().messages.clone()
    }

    /// Messages accepted after the first `from` (for pollers that keep their place).
    pub fn messages_since(&self, from: usize) -> Vec<Received> {
        self.lock()
            .messages
            .get(from..)
            .unwrap_or_default()
            .to_vec()
    }

    /// How many messages were accepted so far.
    pub fn count(&self) -> usize {
        self.lock().messages.len()
    }

    /// Messages accepted for `recipient`.
    pub fn messages_to(&self, recipient: &str) -> Vec<Received> {
        let r = recipient.to_ascii_lowercase();
        self.messages()
            .into_iter()
            .filter(|m| m.rcpt_to.iter().any(|t| t.to_ascii_lowercase() == r))
            .collect()
    }

    /// How many `RCPT TO` commands named `recipient` (accepted or refused).
    pub fn rcpt_attempts(&self, recipient: &str) -> usize {
        let r = recipient.to_ascii_lowercase();
        self.lock()
            .rcpt_attempts
            .iter()
            .filter(|t| t.to_ascii_lowercase() == r)
            .count()
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn angle_arg(line: &str) -> String {
    let start = line.find('<').map(|i| i + 1).unwrap_or(0);
    let end = line[start..]
        .find('>')
        .map(|i| start + i)
        .unwrap_or(line.len());
    line[start..end].trim().to_owned()
}

async fn session(stream: TcpStream, state: Arc<Mutex<State>>) -> std::io::Result<()> {
    // Replies go out in small writes: without this, Nagle's algorithm meets the client's
    // delayed ACK and every reply waits ~40 ms (≈ 200 ms per message).
    stream.set_nodelay(true)?;
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let (down, epoch) = {
        let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
        st.sessions += 1;
        if st.down {
            st.injected.2 += 1;
        }
        (st.down, st.epoch)
    };
    if down {
        write
            .write_all(b"421 4.3.2 optinsync-testkit is down\r\n")
            .await?;
        return Ok(());
    }
    write
        .write_all(b"220 optinsync-testkit SMTP sink\r\n")
        .await?;
    let mut from = String::new();
    let mut rcpts: Vec<String> = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let cmd = line.trim_end().to_owned();
        let upper = cmd.to_ascii_uppercase();
        let (down, kicked) = {
            let st = state.lock().unwrap_or_else(|p| p.into_inner());
            (st.down, st.epoch != epoch)
        };
        if kicked {
            return Ok(());
        }
        // Going down also ends sessions a client keeps open (pooled connections).
        if down {
            write
                .write_all(b"421 4.3.2 optinsync-testkit is down\r\n")
                .await?;
            return Ok(());
        }
        let reply: String = if upper.starts_with("EHLO") {
            "250-optinsync-testkit\r\n250-8BITMIME\r\n250 SMTPUTF8".into()
        } else if upper.starts_with("HELO") {
            "250 optinsync-testkit".into()
        } else if upper.starts_with("MAIL FROM:") {
            from = angle_arg(&cmd);
            rcpts.clear();
            "250 2.1.0 OK".into()
        } else if upper.starts_with("RCPT TO:") {
            let to = angle_arg(&cmd);
            let throttle = {
                let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
                st.rcpt_attempts.push(to.clone());
                if st.throttle.is_some() {
                    st.throttled += 1;
                }
                st.throttle
            };
            if let Some(code) = throttle {
                write
                    .write_all(format!("{code} 4.7.0 too busy, try again later\r\n").as_bytes())
                    .await?;
                if code == 421 {
                    return Ok(());
                }
                continue;
            }
            let roll = {
                let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
                let roll = st.random.as_mut().and_then(|(rng, rate)| {
                    use rand::Rng as _;
                    rng.gen_bool(rate.clamp(0.0, 1.0))
                        .then(|| rng.gen_bool(0.5))
                });
                match roll {
                    Some(true) => st.injected.1 += 1,
                    Some(false) => st.injected.0 += 1,
                    None => {}
                }
                roll
            };
            match roll {
                // Drop the connection without an answer.
                Some(true) => return Ok(()),
                Some(false) => {
                    write
                        .write_all(b"451 4.3.0 injected temporary failure\r\n")
                        .await?;
                    continue;
                }
                None => {}
            }
            let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
            let key = to.to_ascii_lowercase();
            let refusal = match st.refusals.get_mut(&key) {
                Some(r) if r.remaining != Some(0) => {
                    if let Some(n) = r.remaining.as_mut() {
                        *n -= 1;
                    }
                    Some(r.reply.clone())
                }
                _ => None,
            };
            match refusal {
                Some(reply) => reply,
                None => {
                    rcpts.push(to);
                    "250 2.1.5 OK".into()
                }
            }
        } else if upper == "DATA" {
            if rcpts.is_empty() {
                "554 5.5.1 no valid recipients".into()
            } else {
                write.write_all(b"354 end with <CRLF>.<CRLF>\r\n").await?;
                let mut data = String::new();
                loop {
                    line.clear();
                    if reader.read_line(&mut line).await? == 0 {
                        return Ok(());
                    }
                    let l = line.trim_end_matches(['\r', '\n']);
                    if l == "." {
                        break;
                    }
                    let l = l.strip_prefix('.').unwrap_or(l);
                    data.push_str(l);
                    data.push_str("\r\n");
                }
                let (drop_now, delay) = {
                    let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
                    st.messages.push(Received {
                        mail_from: from.clone(),
                        rcpt_to: std::mem::take(&mut rcpts),
                        data,
                    });
                    let drop_now = st.drop_after_data > 0;
                    st.drop_after_data = st.drop_after_data.saturating_sub(1);
                    st.unanswered += 1;
                    st.peak_unanswered = st.peak_unanswered.max(st.unanswered);
                    (drop_now, st.accept_delay)
                };
                if !drop_now && !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                state.lock().unwrap_or_else(|p| p.into_inner()).unanswered -= 1;
                if drop_now {
                    return Ok(());
                }
                "250 2.0.0 queued".into()
            }
        } else if upper == "RSET" {
            from.clear();
            rcpts.clear();
            "250 2.0.0 OK".into()
        } else if upper == "NOOP" {
            "250 2.0.0 OK".into()
        } else if upper == "QUIT" {
            write.write_all(b"221 2.0.0 bye\r\n").await?;
            return Ok(());
        } else {
            "502 5.5.2 command not implemented".into()
        };
        write.write_all(reply.as_bytes()).await?;
        write.write_all(b"\r\n").await?;
    }
}

/// A message split into unfolded headers and decoded leaf parts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParsedMail {
    /// Top-level headers in order, names as written, values unfolded.
    pub headers: Vec<(String, String)>,
    /// Leaf parts: (content type without parameters, lower case; decoded body).
    pub parts: Vec<(String, String)>,
}

impl ParsedMail {
    /// Every value of header `name` (case-insensitive).
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.header_all(name).into_iter().next()
    }

    /// The decoded body of the first part of this content type (`text/plain`, `text/html`).
    pub fn part(&self, content_type: &str) -> Option<&str> {
        self.parts
            .iter()
            .find(|(t, _)| t == content_type)
            .map(|(_, b)| b.as_str())
    }
}

fn split_head(raw: &str) -> (&str, &str) {
    match raw.find("\r\n\r\n") {
        Some(i) => (&raw[..i], &raw[i + 4..]),
        None => match raw.find("\n\n") {
            Some(i) => (&raw[..i], &raw[i + 2..]),
            None => (raw, ""),
        },
    }
}

fn parse_headers(head: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in head.lines() {
        if line.starts_with([' ', '\t']) {
            if let Some(last) = out.last_mut() {
                last.1.push(' ');
                last.1.push_str(line.trim());
            }
        } else if let Some((n, v)) = line.split_once(':') {
            out.push((n.trim().to_owned(), v.trim().to_owned()));
        }
    }
    out
}

fn param(value: &str, name: &str) -> Option<String> {
    value.split(';').skip(1).find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().trim_matches('"').to_owned())
    })
}

/// Decode quoted-printable (RFC 2045 §6.7).
pub fn decode_quoted_printable(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'=' {
            if b.get(i + 1) == Some(&b'\r') && b.get(i + 2) == Some(&b'\n') {
                i += 3;
                continue;
            }
            if b.get(i + 1) == Some(&b'\n') {
                i += 2;
                continue;
            }
            if let Some(hex) = s.get(i + 1..i + 3)
                && let Ok(v) = u8::from_str_radix(hex, 16)
            {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn decode_body(body: &str, encoding: Option<&str>) -> String {
    use base64::Engine as _;
    match encoding.map(str::to_ascii_lowercase).as_deref() {
        Some("quoted-printable") => decode_quoted_printable(body),
        Some("base64") => {
            let compact: String = body.chars().filter(|c| !c.is_whitespace()).collect();
            base64::engine::general_purpose::STANDARD
                .decode(compact)
                .map(|v| String::from_utf8_lossy(&v).into_owned())
                .unwrap_or_default()
        }
        _ => body.to_owned(),
    }
}

fn collect_parts(headers: &[(String, String)], body: &str, out: &mut Vec<(String, String)>) {
    let get = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| v.as_str())
    };
    let ctype = get("Content-Type").unwrap_or("text/plain");
    let base = ctype
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if base.starts_with("multipart/") {
        let Some(boundary) = param(ctype, "boundary") else {
            return;
        };
        let delim = format!("--{boundary}");
        for chunk in body.split(&delim).skip(1) {
            if chunk.starts_with("--") {
                break;
            }
            let chunk = chunk.trim_start_matches(['\r', '\n']);
            let (h, b) = split_head(chunk);
            let ph = parse_headers(h);
            let b = b.strip_suffix("\r\n").unwrap_or(b);
            collect_parts(&ph, b, out);
        }
    } else {
        out.push((base, decode_body(body, get("Content-Transfer-Encoding"))));
    }
}

/// Parse a raw message (as stored by the sink or written to a `.eml` file).
pub fn parse(raw: &str) -> ParsedMail {
    let (head, body) = split_head(raw);
    let headers = parse_headers(head);
    let mut parts = Vec::new();
    collect_parts(&headers, body, &mut parts);
    ParsedMail { headers, parts }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_printable_round() {
        assert_eq!(
            decode_quoted_printable("a=3Db =\r\nc=C3=A9"),
            "a=b c\u{e9}".to_owned()
        );
    }

    #[test]
    fn parses_multipart() {
        let raw = "From: a@b\r\nContent-Type: multipart/alternative;\r\n boundary=\"XX\"\r\n\r\n--XX\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\nhi=\r\n there\r\n--XX\r\nContent-Type: text/html\r\n\r\n<p>x</p>\r\n--XX--\r\n";
        let m = parse(raw);
        assert_eq!(m.header("from"), Some("a@b"));
        assert_eq!(m.part("text/plain"), Some("hi there"));
        assert_eq!(m.part("text/html"), Some("<p>x</p>"));
    }
}
