//! HMAC-SHA256 signed link tokens with a key id for rotation.
//!
//! Format: `base64url(payload) "." base64url(tag)`, payload
//! `v1|kid|purpose|token_id|contact_id|list_id|expires_unix` (`0` = never expires).
//! Unsubscribe tokens do not expire; confirmation tokens do.
//!
//! Keys: the current key signs; `[[tokens.previous]]` keys still verify links already mailed.
//! A previous key marked `unsubscribe_only` verifies unsubscribe links and nothing else: an
//! unsubscribe link never expires (the law wants it honoured for as long as it is in a
//! mailbox), so a key that ever signed one must stay able to verify it, even after it is
//! retired for everything else. The engine's start-up check of signing keys refuses a
//! configuration that drops a key id that signed mailed links.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Confirm,
    Unsubscribe,
    /// The preference centre (`/preferences/{token}`): never expires, like unsubscribe links.
    Preferences,
}

impl Purpose {
    fn as_str(self) -> &'static str {
        match self {
            Self::Confirm => "confirm",
            Self::Unsubscribe => "unsubscribe",
            Self::Preferences => "preferences",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub purpose: Purpose,
    pub token_id: String,
    pub contact_id: String,
    pub list_id: String,
    /// Unix seconds; `None` = never.
    pub expires: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("link is malformed")]
    Malformed,
    #[error("link was signed with an unknown key")]
    UnknownKey,
    #[error("link signature is invalid")]
    BadSignature,
    #[error("link is for another purpose")]
    WrongPurpose,
    #[error("link has expired")]
    Expired(Box<Claims>),
}

/// Current signing key plus older keys still accepted.
#[derive(Clone)]
pub struct TokenKeys {
    current: (String, Vec<u8>),
    previous: Vec<(String, Vec<u8>)>,
    /// Retired keys kept to verify unsubscribe links only.
    unsubscribe_only: Vec<(String, Vec<u8>)>,
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("TokenKeys")
            .field("key_id", &self.current.0)
            .finish_non_exhaustive()
    }
}

impl TokenKeys {
    pub fn new(key_id: &str, secret: &[u8], previous: Vec<(String, Vec<u8>)>) -> Self {
        Self {
            current: (key_id.to_owned(), secret.to_vec()),
            previous,
            unsubscribe_only: Vec::new(),
        }
    }

    /// Add retired keys that verify unsubscribe links only.
    pub fn with_unsubscribe_only(mut self, keys: Vec<(String, Vec<u8>)>) -> Self {
        self.unsubscribe_only = keys;
        self
    }

    /// The id of the key that signs new links.
    pub fn current_key_id(&self) -> &str {
        &self.current.0
    }

    /// Every key id configured, for any purpose.
    pub fn key_ids(&self) -> impl Iterator<Item = &str> {
        std::iter::once(&self.current)
            .chain(self.previous.iter())
            .chain(self.unsubscribe_only.iter())
            .map(|(id, _)| id.as_str())
    }

    fn mac(key: &[u8]) -> HmacSha256 {
        // HMAC accepts keys of any length.
        <HmacSha256 as Mac>::new_from_slice(key)
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"))
    }

    pub fn mint(&self, c: &Claims) -> String {
        let payload = format!(
            "v1|{}|{}|{}|{}|{}|{}",
            self.current.0,
            c.purpose.as_str(),
            c.token_id,
            c.contact_id,
            c.list_id,
            c.expires.unwrap_or(0)
        );
        let mut mac = Self::mac(&self.current.1);
        mac.update(payload.as_bytes());
        let tag = mac.finalize().into_bytes();
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(payload),
            URL_SAFE_NO_PAD.encode(tag)
        )
    }

    /// Check signature (constant time), purpose and expiry.
    pub fn verify(
        &self,
        token: &str,
        purpose: Purpose,
        now_unix: i64,
    ) -> Result<Claims, TokenError> {
        if token.len() > 1024 {
            return Err(TokenError::Malformed);
        }
        let (p64, t64) = token.split_once('.').ok_or(TokenError::Malformed)?;
        let payload = URL_SAFE_NO_PAD
            .decode(p64)
            .map_err(|_| TokenError::Malformed)?;
        let tag = URL_SAFE_NO_PAD
            .decode(t64)
            .map_err(|_| TokenError::Malformed)?;
        let payload = String::from_utf8(payload).map_err(|_| TokenError::Malformed)?;
        let parts: Vec<&str> = payload.split('|').collect();
        let [version, kid, purp, token_id, contact_id, list_id, expires] = parts.as_slice() else {
            return Err(TokenError::Malformed);
        };
        if *version != "v1" {
            return Err(TokenError::Malformed);
        }
        let key = std::iter::once(&self.current)
            .chain(self.previous.iter())
            .chain(
                self.unsubscribe_only
                    .iter()
                    .filter(|_| purpose == Purpose::Unsubscribe),
            )
            .find(|(id, _)| id == kid)
            .ok_or(TokenError::UnknownKey)?;
        let mut mac = Self::mac(&key.1);
        mac.update(payload.as_bytes());
        mac.verify_slice(&tag)
            .map_err(|_| TokenError::BadSignature)?;
        let purpose_found = match *purp {
            "confirm" => Purpose::Confirm,
            "unsubscribe" => Purpose::Unsubscribe,
            "preferences" => Purpose::Preferences,
            _ => return Err(TokenError::Malformed),
        };
        if purpose_found != purpose {
            return Err(TokenError::WrongPurpose);
        }
        let exp: i64 = expires.parse().map_err(|_| TokenError::Malformed)?;
        let claims = Claims {
            purpose,
            token_id: (*token_id).to_owned(),
            contact_id: (*contact_id).to_owned(),
            list_id: (*list_id).to_owned(),
            expires: (exp != 0).then_some(exp),
        };
        match claims.expires {
            Some(e) if e < now_unix => Err(TokenError::Expired(Box::new(claims))),
            _ => Ok(claims),
        }
    }

    /// Keyed hash of an address's canonical key ([`crate::email::key`]: every spelling of
    /// one mailbox hashes alike) under the current key, for suppression entries that outlive
    /// erasure.
    pub fn address_hash(&self, email: &str) -> String {
        Self::hash_with(&self.current.1, &crate::email::key(email))
    }

    /// The address's hash under the current key and every older key still configured, each
    /// for every spelling a suppression may have been keyed on ([`crate::email::spellings`],
    /// which covers entries from before address canonicalisation): a suppression written
    /// before a key rotation or that change must still be found after it. The first one is
    /// [`TokenKeys::address_hash`].
    pub fn address_hashes(&self, email: &str) -> Vec<String> {
        let spellings = crate::email::spellings(email);
        std::iter::once(&self.current)
            .chain(self.previous.iter())
            .chain(self.unsubscribe_only.iter())
            .flat_map(|(_, key)| spellings.iter().map(|s| Self::hash_with(key, s)))
            .collect()
    }

    fn hash_with(key: &[u8], email: &str) -> String {
        let mut mac = Self::mac(key);
        mac.update(b"optinsync address hash v1\0");
        mac.update(email.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn keys() -> TokenKeys {
        TokenKeys::new(
            "k2",
            b"0123456789abcdef0123456789abcdef",
            vec![("k1".into(), b"old-key-old-key-old-key-old-key!".to_vec())],
        )
    }

    fn claims(expires: Option<i64>) -> Claims {
        Claims {
            purpose: Purpose::Confirm,
            token_id: "t1".into(),
            contact_id: "c1".into(),
            list_id: "news".into(),
            expires,
        }
    }

    #[test]
    fn round_trip_and_expiry() {
        let k = keys();
        let t = k.mint(&claims(Some(100)));
        assert_eq!(k.verify(&t, Purpose::Confirm, 50), Ok(claims(Some(100))));
        assert!(matches!(
            k.verify(&t, Purpose::Confirm, 101),
            Err(TokenError::Expired(_))
        ));
        assert_eq!(
            k.verify(&t, Purpose::Unsubscribe, 50),
            Err(TokenError::WrongPurpose)
        );
    }

    #[test]
    fn old_key_still_verifies_unknown_key_does_not() {
        let old = TokenKeys::new("k1", b"old-key-old-key-old-key-old-key!", vec![]);
        let t = old.mint(&claims(None));
        assert!(keys().verify(&t, Purpose::Confirm, 0).is_ok());
        let other = TokenKeys::new("k9", b"zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz", vec![]);
        assert_eq!(
            keys().verify(&other.mint(&claims(None)), Purpose::Confirm, 0),
            Err(TokenError::UnknownKey)
        );
    }

    /// F3: a retired key kept as `unsubscribe_only` still verifies the unsubscribe links it
    /// signed (they never expire), but no longer any confirmation link.
    #[test]
    fn f3_unsubscribe_only_key_verifies_unsubscribe_links_only() {
        let old = TokenKeys::new("k1", b"old-key-old-key-old-key-old-key!", vec![]);
        let unsub = old.mint(&Claims {
            purpose: Purpose::Unsubscribe,
            ..claims(None)
        });
        let confirm = old.mint(&claims(None));
        let now = TokenKeys::new("k2", b"0123456789abcdef0123456789abcdef", vec![])
            .with_unsubscribe_only(vec![(
                "k1".into(),
                b"old-key-old-key-old-key-old-key!".to_vec(),
            )]);
        assert!(now.verify(&unsub, Purpose::Unsubscribe, 0).is_ok());
        assert_eq!(
            now.verify(&confirm, Purpose::Confirm, 0),
            Err(TokenError::UnknownKey)
        );
        assert_eq!(now.key_ids().collect::<Vec<_>>(), ["k2", "k1"]);
        // Suppressions written under the retired key are still found.
        assert!(
            now.address_hashes("a@example.org")
                .contains(&old.address_hash("a@example.org"))
        );
    }

    proptest! {
        #[test]
        fn any_tampering_is_rejected(pos in 0usize..200, byte in any::<u8>()) {
            let k = keys();
            let t = k.mint(&claims(None));
            let mut bytes = t.clone().into_bytes();
            let i = pos % bytes.len();
            prop_assume!(bytes[i] != byte);
            bytes[i] = byte;
            if let Ok(s) = String::from_utf8(bytes) {
                prop_assert!(k.verify(&s, Purpose::Confirm, 0).is_err() || s == t);
            }
        }

        #[test]
        fn garbage_never_verifies(s in ".{0,300}") {
            prop_assert!(keys().verify(&s, Purpose::Confirm, 0).is_err());
        }
    }

    #[test]
    fn address_hashes_cover_old_keys() {
        let k = keys();
        let hashes = k.address_hashes("a@example.org");
        assert_eq!(hashes.len(), 2);
        assert_eq!(hashes[0], k.address_hash("a@example.org"));
        let old = TokenKeys::new("k1", b"old-key-old-key-old-key-old-key!", vec![]);
        assert_eq!(
            hashes[1],
            old.address_hash("a@example.org"),
            "a suppression from before the rotation is found"
        );
        assert_ne!(hashes[0], hashes[1]);
    }
}
