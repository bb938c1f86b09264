//! Who may use the console: the operator password (an Argon2 hash, or the admin token),
//! sessions held in memory behind an opaque cookie, the per-session CSRF token, and the
//! throttle on failed logins.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::{Argon2, PasswordHash, PasswordVerifier};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use rand::RngCore as _;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::admin::FailureWindow;

/// Name of the session cookie.
pub const COOKIE: &str = "optinsync_console";
/// Failed logins one client (IPv6: its /64) may make in a minute before it waits.
pub const LOGIN_FAILURES_PER_MINUTE: u32 = 5;
/// Failed logins of all clients together in a minute before everyone waits (a spread-out
/// guessing attack still meets a wall).
pub const LOGIN_FAILURES_PER_MINUTE_ALL: u32 = 50;
/// Sessions kept at most; the oldest are forgotten first.
const MAX_SESSIONS: usize = 1_000;
/// How long the login form's token stays usable.
const LOGIN_FORM_TTL_SECS: i64 = 3_600;

/// What the password is checked against.
pub enum Secret {
    /// An Argon2 hash in PHC form (`[console] password_hash`).
    Argon2(String),
    /// SHA-256 of the admin token, compared in constant time.
    AdminToken([u8; 32]),
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Secret::Argon2(_) => "Secret::Argon2(<redacted>)",
            Secret::AdminToken(_) => "Secret::AdminToken(<redacted>)",
        })
    }
}

impl Secret {
    /// Whether `password` is the operator's. Argon2 is slow on purpose: call this off the
    /// async workers (`spawn_blocking`).
    pub fn verify(&self, password: &str) -> bool {
        if password.is_empty() {
            return false;
        }
        match self {
            Secret::Argon2(phc) => PasswordHash::new(phc).is_ok_and(|hash| {
                Argon2::default()
                    .verify_password(password.as_bytes(), &hash)
                    .is_ok()
            }),
            Secret::AdminToken(expected) => {
                let given: [u8; 32] = Sha256::digest(password.as_bytes()).into();
                bool::from(given.ct_eq(expected))
            }
        }
    }
}

/// One logged-in operator.
#[derive(Debug, Clone)]
pub struct Session {
    pub csrf: String,
    pub expires_at: DateTime<Utc>,
    expires: Instant,
}

/// Live sessions, keyed by the SHA-256 of the cookie value (a memory dump shows no usable
/// cookie). In memory: a restart logs everyone out, and each instance has its own.
#[derive(Debug)]
pub struct Sessions {
    ttl: Duration,
    live: Mutex<HashMap<[u8; 32], Session>>,
    login_key: [u8; 32],
    failures: FailureWindow,
    all_failures: FailureWindow,
}

fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

fn digest(cookie: &str) -> [u8; 32] {
    Sha256::digest(cookie.as_bytes()).into()
}

/// Constant-time equality of two short secrets (CSRF tokens).
pub fn same_secret(a: &str, b: &str) -> bool {
    !a.is_empty() && bool::from(digest(a).ct_eq(&digest(b)))
}

impl Sessions {
    pub fn new(ttl: Duration) -> Self {
        let mut login_key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut login_key);
        Self {
            ttl,
            live: Mutex::new(HashMap::new()),
            login_key,
            failures: FailureWindow::new(Duration::from_secs(60), LOGIN_FAILURES_PER_MINUTE),
            all_failures: FailureWindow::new(
                Duration::from_secs(60),
                LOGIN_FAILURES_PER_MINUTE_ALL,
            ),
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Start a session: the cookie value and the session.
    pub fn start(&self) -> (String, Session) {
        let cookie = random_token();
        let session = Session {
            csrf: random_token(),
            expires_at: Utc::now()
                + chrono::Duration::from_std(self.ttl).unwrap_or(chrono::Duration::hours(8)),
            expires: Instant::now() + self.ttl,
        };
        if let Ok(mut live) = self.live.lock() {
            live.retain(|_, s| s.expires > Instant::now());
            if live.len() >= MAX_SESSIONS
                && let Some(oldest) = live.iter().min_by_key(|(_, s)| s.expires).map(|(k, _)| *k)
            {
                live.remove(&oldest);
            }
            live.insert(digest(&cookie), session.clone());
        }
        (cookie, session)
    }

    /// The live session this cookie value names.
    pub fn get(&self, cookie: &str) -> Option<Session> {
        let mut live = self.live.lock().ok()?;
        let key = digest(cookie);
        match live.get(&key) {
            Some(s) if s.expires > Instant::now() => Some(s.clone()),
            Some(_) => {
                live.remove(&key);
                None
            }
            None => None,
        }
    }

    pub fn end(&self, cookie: &str) {
        if let Ok(mut live) = self.live.lock() {
            live.remove(&digest(cookie));
        }
    }

    /// `true` while `client` (or everyone together) has used up its failed logins.
    pub fn throttled(&self, client: IpAddr) -> bool {
        self.failures.blocked(client) || self.all_failures.blocked(ALL)
    }

    pub fn record_failure(&self, client: IpAddr) {
        self.failures.record(client);
        self.all_failures.record(ALL);
    }

    /// The login form's CSRF token: `time.mac`, valid for an hour (no session exists yet).
    pub fn login_token(&self, now: i64) -> String {
        let ts = now.to_string();
        format!("{ts}.{}", URL_SAFE_NO_PAD.encode(self.login_mac(&ts)))
    }

    pub fn login_token_valid(&self, token: &str, now: i64) -> bool {
        let Some((ts, tag)) = token.split_once('.') else {
            return false;
        };
        let (Ok(t), Ok(tag)) = (ts.parse::<i64>(), URL_SAFE_NO_PAD.decode(tag)) else {
            return false;
        };
        t <= now + 60
            && now - t <= LOGIN_FORM_TTL_SECS
            && bool::from(self.login_mac(ts).as_slice().ct_eq(tag.as_slice()))
    }

    fn login_mac(&self, ts: &str) -> Vec<u8> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.login_key)
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        mac.update(b"optinsync console login v1|");
        mac.update(ts.as_bytes());
        mac.finalize().into_bytes().to_vec()
    }
}

/// The key all clients' failures are counted under together.
const ALL: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);

/// The value of cookie `name` in a `Cookie` header.
pub fn cookie_value<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|part| {
        let (k, v) = part.trim().split_once('=')?;
        (k == name).then_some(v)
    })
}

/// `Set-Cookie` for a session: `HttpOnly`, `SameSite=Strict`, `Path=/console`, an expiry, and
/// `Secure` when the console is reached over https.
pub fn set_cookie(value: &str, max_age: Duration, secure: bool) -> String {
    format!(
        "{COOKIE}={value}; Path=/console; Max-Age={}; HttpOnly; SameSite=Strict{}",
        max_age.as_secs(),
        if secure { "; Secure" } else { "" }
    )
}

/// `Set-Cookie` that removes the session cookie.
pub fn clear_cookie(secure: bool) -> String {
    set_cookie("", Duration::ZERO, secure)
}

#[cfg(test)]
mod tests {
    use super::*;
    use argon2::PasswordHasher;
    use argon2::password_hash::SaltString;

    #[test]
    fn argon2_and_token_secrets() {
        let salt = SaltString::encode_b64(b"sixteen byte slt").expect("salt");
        let phc = Argon2::default()
            .hash_password(b"correct horse", &salt)
            .expect("hash")
            .to_string();
        let s = Secret::Argon2(phc);
        assert!(s.verify("correct horse"));
        assert!(!s.verify("correct hors"));
        assert!(!s.verify(""));
        assert!(!Secret::Argon2("$argon2id$garbage".into()).verify("x"));
        let t = Secret::AdminToken(Sha256::digest(b"the-admin-token").into());
        assert!(t.verify("the-admin-token"));
        assert!(!t.verify("the-admin-token "));
    }

    #[test]
    fn sessions_start_end_and_expire() {
        let s = Sessions::new(Duration::from_secs(60));
        let (cookie, session) = s.start();
        assert_eq!(s.get(&cookie).map(|x| x.csrf), Some(session.csrf.clone()));
        assert!(s.get("forged").is_none());
        s.end(&cookie);
        assert!(s.get(&cookie).is_none());
        let short = Sessions::new(Duration::from_millis(1));
        let (cookie, _) = short.start();
        std::thread::sleep(Duration::from_millis(5));
        assert!(
            short.get(&cookie).is_none(),
            "an expired session is refused"
        );
    }

    #[test]
    fn login_token_and_throttle() {
        let s = Sessions::new(Duration::from_secs(60));
        let t = s.login_token(1_000_000);
        assert!(s.login_token_valid(&t, 1_000_010));
        assert!(!s.login_token_valid(&t, 1_000_000 + LOGIN_FORM_TTL_SECS + 1));
        assert!(!s.login_token_valid(&t.replace('.', ".x"), 1_000_010));
        let other = Sessions::new(Duration::from_secs(60));
        assert!(!other.login_token_valid(&t, 1_000_010));
        let ip: IpAddr = "192.0.2.1".parse().expect("ip");
        for _ in 0..LOGIN_FAILURES_PER_MINUTE {
            assert!(!s.throttled(ip));
            s.record_failure(ip);
        }
        assert!(s.throttled(ip));
        assert!(!s.throttled("192.0.2.2".parse().expect("ip")));
    }

    #[test]
    fn cookies() {
        assert_eq!(
            cookie_value("a=1; optinsync_console=xyz; b=2", COOKIE),
            Some("xyz")
        );
        assert_eq!(cookie_value("a=1", COOKIE), None);
        let c = set_cookie("v", Duration::from_secs(60), true);
        for part in [
            "HttpOnly",
            "SameSite=Strict",
            "Secure",
            "Max-Age=60",
            "Path=/console",
        ] {
            assert!(c.contains(part), "{c}");
        }
        assert!(!set_cookie("v", Duration::from_secs(60), false).contains("Secure"));
    }
}
