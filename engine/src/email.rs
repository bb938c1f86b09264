//! Email address normalisation: the key that makes one contact out of several CRM records.
//!
//! Trimmed and lower-cased as a whole (mailbox providers treat local parts case-insensitively
//! in practice); plus-addressing is kept as given, since `a+news@x` may be a deliberate choice.
//!
//! Internationalised addresses are kept as given, lower-cased (Unicode lower case), and are
//! **not** converted to or from punycode: `josé@bücher.example` stays Unicode (SMTPUTF8), and
//! `a@xn--bcher-kva.example` stays ASCII. The two spellings of one IDN domain are therefore
//! two contacts; CRMs store what people typed, so in practice one spelling is seen per person.
//! Limits (254 characters in all, 64 in the local part) are checked on the lower-cased form,
//! which can be longer than the input (`İ` lower-cases to two characters).

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("address is empty")]
    Empty,
    #[error("address is longer than 254 characters")]
    TooLong,
    #[error("address has no single `@` separating a local part and a domain")]
    NoAt,
    #[error("address contains whitespace, control or forbidden characters")]
    BadCharacter,
    #[error("address domain is not a valid host name")]
    BadDomain,
}

pub fn normalise(raw: &str) -> Result<String, AddressError> {
    let s = raw.trim();
    if s.is_empty() {
        return Err(AddressError::Empty);
    }
    // Checked before lower-casing (cheap refusal of huge input) and after (it may grow).
    if s.chars().count() > 254 {
        return Err(AddressError::TooLong);
    }
    let lower = s.to_lowercase();
    let s = lower.as_str();
    if s.chars().count() > 254 {
        return Err(AddressError::TooLong);
    }
    if s.chars()
        .any(|c| c.is_whitespace() || c.is_control() || "<>()[],;:\\\"".contains(c))
    {
        return Err(AddressError::BadCharacter);
    }
    let (local, domain) = s.rsplit_once('@').ok_or(AddressError::NoAt)?;
    if local.is_empty() || local.contains('@') || local.chars().count() > 64 {
        return Err(AddressError::NoAt);
    }
    let labels: Vec<&str> = domain.split('.').collect();
    let domain_ok = labels.len() >= 2
        && labels
            .iter()
            .all(|l| !l.is_empty() && l.len() <= 63 && !l.starts_with('-') && !l.ends_with('-'));
    if !domain_ok {
        return Err(AddressError::BadDomain);
    }
    Ok(lower)
}

/// `ab***@example.org` — for messages a person may see; logs use contact ids instead.
pub fn mask(email: &str) -> String {
    match email.split_once('@') {
        Some((local, domain)) => {
            format!("{}***@{domain}", local.chars().take(2).collect::<String>())
        }
        None => "***".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn examples() {
        assert_eq!(
            normalise("  Ana.Garcia+News@Example.ORG "),
            Ok("ana.garcia+news@example.org".into())
        );
        assert_eq!(normalise(""), Err(AddressError::Empty));
        assert_eq!(normalise("no-at-sign"), Err(AddressError::NoAt));
        assert_eq!(
            normalise("a b@example.org"),
            Err(AddressError::BadCharacter)
        );
        assert_eq!(normalise("a@localhost"), Err(AddressError::BadDomain));
        assert_eq!(normalise("a@@example.org"), Err(AddressError::NoAt));
    }

    #[test]
    fn idn_addresses_are_kept_as_given_lower_cased() {
        assert_eq!(
            normalise("José@Bücher.Example"),
            Ok("josé@bücher.example".into())
        );
        // Punycode is not decoded: the ASCII spelling is a different key.
        assert_eq!(
            normalise("Jose@XN--BCHER-KVA.example"),
            Ok("jose@xn--bcher-kva.example".into())
        );
        assert_eq!(normalise("用户@例子.广告"), Ok("用户@例子.广告".into()));
    }

    #[test]
    fn oversize_input_is_refused_even_when_lower_casing_grows_it() {
        let long = format!("{}@example.org", "a".repeat(250));
        assert_eq!(normalise(&long), Err(AddressError::TooLong));
        assert_eq!(
            normalise(&"x".repeat(1_000_000)),
            Err(AddressError::TooLong)
        );
        // 60 x `İ` (one char) lower-cases to 120 chars: the local part is then too long.
        let grows = format!("{}@example.org", "İ".repeat(60));
        assert!(normalise(&grows).is_err());
        // 146 characters before lower-casing, 283 after.
        let label = "İ".repeat(21);
        let grows = format!("{}@{}.org", "İ".repeat(32), [label.as_str(); 5].join("."));
        assert!(grows.chars().count() <= 254);
        assert_eq!(normalise(&grows), Err(AddressError::TooLong));
    }

    fn local() -> impl Strategy<Value = String> {
        "[A-Za-z0-9._%-]{1,20}"
    }
    fn domain() -> impl Strategy<Value = String> {
        "[A-Za-z0-9]{1,15}(\\.[A-Za-z]{2,6}){1,2}"
    }

    proptest! {
        #[test]
        fn case_does_not_matter(l in local(), d in domain()) {
            let a = format!("{l}@{d}");
            prop_assert_eq!(normalise(&a.to_uppercase()), normalise(&a.to_lowercase()));
            prop_assert_eq!(normalise(&a), Ok(a.to_lowercase()));
        }

        #[test]
        fn surrounding_whitespace_is_trimmed(
            l in local(), d in domain(), pre in "[ \\t\\r\\n]{0,4}", post in "[ \\t\\r\\n\\u{a0}]{0,4}"
        ) {
            let a = format!("{l}@{d}");
            prop_assert_eq!(normalise(&format!("{pre}{a}{post}")), normalise(&a));
        }

        #[test]
        fn inner_whitespace_is_refused(l in local(), d in domain(), ws in "[ \\t\\n\\u{a0}\\u{2003}]") {
            prop_assert_eq!(normalise(&format!("{l}{ws}x@{d}")), Err(AddressError::BadCharacter));
        }

        #[test]
        fn plus_addressing_is_kept(l in local(), tag in "[a-z0-9]{1,10}", d in domain()) {
            let n = normalise(&format!("{l}+{tag}@{d}")).expect("valid");
            prop_assert!(n.ends_with(&format!("+{tag}@{}", d.to_lowercase())), "{}", n);
            prop_assert_ne!(n, normalise(&format!("{l}@{d}")).expect("valid"));
        }

        #[test]
        fn oversize_never_passes(s in "\\PC{255,600}") {
            prop_assert!(normalise(&s).map_or(true, |n| n.chars().count() <= 254));
        }

        #[test]
        fn never_panics_and_results_are_bounded(s in "(\\PC|[İ@. ]){0,400}") {
            if let Ok(n) = normalise(&s) {
                prop_assert!(n.chars().count() <= 254);
                prop_assert_eq!(n.matches('@').count(), 1);
                prop_assert_eq!(normalise(&n), Ok(n.clone()));
            }
        }

        #[test]
        fn normalise_is_idempotent(s in "\\PC{0,80}") {
            if let Ok(n) = normalise(&s) {
                prop_assert_eq!(normalise(&n), Ok(n.clone()));
                prop_assert!(n.contains('@'));
            }
        }
    }
}
