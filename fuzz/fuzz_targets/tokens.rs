//! Link tokens: any text given as a confirm/unsubscribe link never panics, and only a token
//! minted with one of our keys verifies (checked by re-minting the claims it yields); claims
//! made of fuzzed fields survive mint → verify unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use optinsync_engine::tokens::{Claims, Purpose, TokenError, TokenKeys};

fn keys() -> (TokenKeys, TokenKeys, TokenKeys) {
    let current = b"fuzz-current-secret-fuzz-current-secret";
    let old = b"fuzz-previous-secret-fuzz-previous-secr";
    (
        TokenKeys::new("k2", current, vec![("k1".into(), old.to_vec())]),
        TokenKeys::new("k2", current, vec![]),
        TokenKeys::new("k1", old, vec![]),
    )
}

fuzz_target!(|data: &[u8]| {
    let (keys, current, old) = keys();
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // 1. The text as a link token.
    for purpose in [Purpose::Confirm, Purpose::Unsubscribe, Purpose::Preferences] {
        for now in [0, i64::MAX, i64::MIN] {
            match keys.verify(text, purpose, now) {
                Ok(claims) => {
                    assert_eq!(claims.purpose, purpose);
                    assert!(
                        current.mint(&claims) == text || old.mint(&claims) == text,
                        "a token verified that none of our keys minted: {text:?}"
                    );
                }
                Err(TokenError::Expired(claims)) => {
                    assert!(claims.expires.is_some_and(|e| e < now));
                }
                Err(_) => {}
            }
        }
    }
    // 2. The text as claims: fields separated by newlines.
    let mut parts = text.split('\n');
    let (Some(token_id), Some(contact_id), Some(list_id), Some(exp)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return;
    };
    if [token_id, contact_id, list_id]
        .iter()
        .any(|f| f.contains('|'))
    {
        return; // ids are UUIDs and list ids [a-z0-9_-]: never a separator
    }
    let expires = exp.parse::<i64>().ok().filter(|e| *e != 0);
    let claims = Claims {
        purpose: Purpose::Unsubscribe,
        token_id: token_id.to_owned(),
        contact_id: contact_id.to_owned(),
        list_id: list_id.to_owned(),
        expires,
    };
    let token = keys.mint(&claims);
    match keys.verify(&token, Purpose::Unsubscribe, i64::MIN) {
        Ok(back) => assert_eq!(back, claims),
        // Over-long claims make an over-long token, refused before decoding.
        Err(TokenError::Malformed) => assert!(token.len() > 1024),
        Err(e) => panic!("minted token refused: {e:?}"),
    }
    assert_eq!(
        keys.verify(&token, Purpose::Confirm, i64::MIN),
        if token.len() > 1024 {
            Err(TokenError::Malformed)
        } else {
            Err(TokenError::WrongPurpose)
        }
    );
});
