//! Email address normalisation: the key that makes one contact out of several CRM records.
//!
//! Trimmed and lower-cased as a whole (mailbox providers treat local parts case-insensitively
//! in practice); plus-addressing is kept as given, since `a+news@x` may be a deliberate choice.

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
    Ok(s.to_lowercase())
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

    proptest! {
        #[test]
        fn normalise_is_idempotent(s in "\\PC{0,80}") {
            if let Ok(n) = normalise(&s) {
                prop_assert_eq!(normalise(&n), Ok(n.clone()));
                prop_assert!(n.contains('@'));
            }
        }
    }
}
