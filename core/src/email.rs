//! Email address normalisation: the key that makes one contact out of several CRM records.
//!
//! Trimmed and lower-cased as a whole (mailbox providers treat local parts case-insensitively
//! in practice); plus-addressing is kept as given, since `a+news@x` may be a deliberate choice.
//!
//! One mailbox has many Unicode spellings, and every spelling must find the same contact and
//! the same suppression entry (an erased or suppressed person must not be mailed because the
//! CRM holds another spelling). So [`normalise`] also canonicalises:
//!
//! * the whole address is put in Unicode NFC (`jose\u{301}` and `josé` are one local part);
//! * the domain goes through IDNA UTS-46: `xn--bcher-kva.example`, `Bücher.example` and the
//!   NFD spelling all become `bücher.example`. Invalid punycode is refused (`BadDomain`).
//!
//! [`normalise`] returns the *display* form (Unicode domain), which is what is stored, shown
//! and mailed (SMTPUTF8 when needed). [`key`] returns the form with the domain in its ASCII
//! (punycode) form; it is what keyed address hashes are computed over. Suppressions written
//! before canonicalisation existed were keyed on the address merely trimmed and lower-cased;
//! [`spellings`] lists the forms such an entry may have been keyed on, so it still blocks.
//! Limits (254 characters in all, 64 in the local part) are checked on the lower-cased form,
//! which can be longer than the input (`İ` lower-cases to two characters).

use unicode_normalization::UnicodeNormalization;

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

/// An address in its canonical parts.
struct Canonical {
    local: String,
    /// UTS-46 ToUnicode of the domain (what people read and what is mailed).
    display_domain: String,
    /// UTS-46 ToASCII of the domain (what is hashed).
    ascii_domain: String,
}

fn has_bad_character(s: &str) -> bool {
    s.chars()
        .any(|c| c.is_whitespace() || c.is_control() || "<>()[],;:\\\"".contains(c))
}

fn canonical(raw: &str) -> Result<Canonical, AddressError> {
    use idna::uts46::{AsciiDenyList, DnsLength, Hyphens, Uts46};

    let s = raw.trim();
    if s.is_empty() {
        return Err(AddressError::Empty);
    }
    // Checked before lower-casing (cheap refusal of huge input) and after (it may grow).
    if s.chars().count() > 254 {
        return Err(AddressError::TooLong);
    }
    // NFC after lower-casing: lower-casing can leave combining marks uncomposed. ASCII is
    // NFC already, and most addresses are ASCII (the composition was ~5 % of a bulk sync's
    // planning time).
    let lower: String = if s.is_ascii() {
        s.to_ascii_lowercase()
    } else {
        s.to_lowercase().nfc().collect()
    };
    if lower.chars().count() > 254 {
        return Err(AddressError::TooLong);
    }
    if has_bad_character(&lower) {
        return Err(AddressError::BadCharacter);
    }
    let (local, domain) = lower.rsplit_once('@').ok_or(AddressError::NoAt)?;
    if local.is_empty() || local.contains('@') || local.chars().count() > 64 {
        return Err(AddressError::NoAt);
    }
    // Fast path (most addresses, and hashed on every consent decision): UTS-46 leaves a
    // lower-case ASCII domain without punycode labels as it is.
    if domain.is_ascii() && !domain.contains("xn--") {
        return finish(local, domain.to_owned(), domain.to_owned());
    }
    let uts46 = Uts46::new();
    let ascii_domain = uts46
        .to_ascii(
            domain.as_bytes(),
            AsciiDenyList::EMPTY,
            Hyphens::Allow,
            DnsLength::Ignore,
        )
        .map_err(|_| AddressError::BadDomain)?
        .into_owned();
    let (display_domain, decoded) = uts46.to_unicode(
        ascii_domain.as_bytes(),
        AsciiDenyList::EMPTY,
        Hyphens::Allow,
    );
    decoded.map_err(|_| AddressError::BadDomain)?;
    let display_domain = display_domain.into_owned();
    // The display form must lead back to the same key, or normalising it again would give
    // another answer (a punycode label can decode to text that is itself not a valid label).
    let again = uts46
        .to_ascii(
            display_domain.as_bytes(),
            AsciiDenyList::EMPTY,
            Hyphens::Allow,
            DnsLength::Ignore,
        )
        .map_err(|_| AddressError::BadDomain)?;
    // UTS-46 maps a few letters to capitals (Cherokee): such a display form would not be the
    // lower-case one every other address has, so it is refused rather than stored two ways.
    if again != ascii_domain || display_domain.to_lowercase() != display_domain {
        return Err(AddressError::BadDomain);
    }
    // UTS-46 maps some characters onto ASCII ones (a full-width `＜` to `<`, U+3000 to a
    // space): check the result as well as the input.
    if has_bad_character(&display_domain) || has_bad_character(&ascii_domain) {
        return Err(AddressError::BadCharacter);
    }
    finish(local, display_domain, ascii_domain)
}

/// Label rules (on the ASCII form: DNS limits a label to 63 octets) and the final length.
fn finish(
    local: &str,
    display_domain: String,
    ascii_domain: String,
) -> Result<Canonical, AddressError> {
    let labels: Vec<&str> = ascii_domain.split('.').collect();
    let domain_ok = labels.len() >= 2
        && labels
            .iter()
            .all(|l| !l.is_empty() && l.len() <= 63 && !l.starts_with('-') && !l.ends_with('-'));
    if !domain_ok {
        return Err(AddressError::BadDomain);
    }
    if local.chars().count() + 1 + display_domain.chars().count() > 254 {
        return Err(AddressError::TooLong);
    }
    Ok(Canonical {
        local: local.to_owned(),
        display_domain,
        ascii_domain,
    })
}

/// The canonical display form of an address (see the module docs), or why it is not one.
pub fn normalise(raw: &str) -> Result<String, AddressError> {
    let c = canonical(raw)?;
    Ok(format!("{}@{}", c.local, c.display_domain))
}

/// The form keyed address hashes are computed over: [`normalise`]d, with the domain in its
/// ASCII (punycode) form, so every spelling of one mailbox has one key. Input that is not a
/// valid address (e.g. the hash an erased contact keeps) is its own key.
pub fn key(address: &str) -> String {
    match canonical(address) {
        Ok(c) => format!("{}@{}", c.local, c.ascii_domain),
        Err(_) => address.to_owned(),
    }
}

/// Every string a suppression of this address may have been keyed on: [`key`] first, then
/// what normalisation before canonicalisation (trim and lower-case only) made of the
/// address's Unicode-domain, punycode-domain and NFD spellings. Checking all of them keeps
/// entries written before canonicalisation in force.
pub fn spellings(address: &str) -> Vec<String> {
    let Ok(c) = canonical(address) else {
        return vec![address.to_owned()];
    };
    // The common case, an ASCII address whose domain reads as it is written: all four
    // spellings are the same string (NFD leaves ASCII as it is), so skip making them.
    if c.local.is_ascii() && c.display_domain == c.ascii_domain {
        return vec![format!("{}@{}", c.local, c.ascii_domain)];
    }
    every_spelling(&c)
}

fn every_spelling(c: &Canonical) -> Vec<String> {
    let nfd_local: String = c.local.nfd().collect();
    let nfd_domain: String = c.display_domain.nfd().collect();
    let candidates = [
        format!("{}@{}", c.local, c.ascii_domain),
        format!("{}@{}", c.local, c.display_domain),
        format!("{nfd_local}@{nfd_domain}"),
        format!("{nfd_local}@{}", c.ascii_domain),
    ];
    let mut out: Vec<String> = Vec::with_capacity(candidates.len());
    for s in candidates {
        if !out.contains(&s) {
            out.push(s);
        }
    }
    out
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

    /// Found by the `email` fuzz target: a punycode label that decodes to a display form
    /// which does not encode back. Refused, so whatever is accepted normalises to itself.
    #[test]
    fn a_display_form_that_does_not_lead_back_is_refused() {
        let raw = "jos\u{e9}@f.\u{fc}c\u{4ef}?f.\u{fc}c\u{4ef}?e/r.xn--xn------`--67E.#RGeRGe\u{4553}yafE";
        match normalise(raw) {
            Ok(n) => assert_eq!(normalise(&n), Ok(n)),
            Err(e) => assert_eq!(e, AddressError::BadDomain),
        }
    }

    /// Found by the `email` fuzz target: UTS-46 maps Cherokee small letters to capitals, so
    /// the display form would not be lower case. Refused.
    #[test]
    fn a_display_form_that_is_not_lower_case_is_refused() {
        let raw = "a@xn--xn--o5o5mOOssssmOOssssssssssO.R.X";
        match normalise(raw) {
            Ok(n) => assert_eq!(n.to_lowercase(), n),
            Err(e) => assert_eq!(e, AddressError::BadDomain),
        }
    }

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
    fn idn_addresses_are_lower_cased_with_a_unicode_domain() {
        assert_eq!(
            normalise("José@Bücher.Example"),
            Ok("josé@bücher.example".into())
        );
        assert_eq!(normalise("用户@例子.广告"), Ok("用户@例子.广告".into()));
        // An ASCII domain stays ASCII, in the key too.
        assert_eq!(key("Ana@Example.ORG"), "ana@example.org");
        assert_eq!(spellings("ana@example.org"), ["ana@example.org"]);
        // An ASCII address whose domain is punycode has its Unicode spellings too.
        assert_eq!(
            spellings("a@0.xn--p1ai"),
            ["a@0.xn--p1ai", "a@0.\u{440}\u{444}"]
        );
    }

    #[test]
    fn f2_nfd_and_punycode_spellings_have_one_display_form_and_one_key() {
        let nfc = "jos\u{e9}@b\u{fc}cher.example";
        let spellings_of_one_mailbox = [
            nfc,
            "jose\u{301}@bu\u{308}cher.example",
            "jos\u{e9}@xn--bcher-kva.example",
            "JOSE\u{301}@XN--BCHER-KVA.EXAMPLE",
            "jos\u{e9}@B\u{dc}CHER.example",
        ];
        for s in spellings_of_one_mailbox {
            assert_eq!(normalise(s), Ok(nfc.to_owned()), "{s:?}");
            assert_eq!(key(s), "jos\u{e9}@xn--bcher-kva.example", "{s:?}");
        }
        // A key is the key of its own display form (the engine hashes stored addresses).
        assert_eq!(key(nfc), key(&normalise(nfc).expect("valid")));
        // Not a mailbox: its own key, unchanged.
        assert_eq!(key("erased:abc"), "erased:abc");
    }

    proptest! {
        /// The shortcut for ASCII addresses gives what making every spelling gives.
        #[test]
        fn the_ascii_shortcut_agrees_with_every_spelling(
            a in "[a-zA-Z0-9._+-]{1,12}@([a-zA-Z0-9-]{1,10}|xn--bcher-kva|XN--BCHER-KVA)\\.(org|Example|xn--p1ai)"
        ) {
            if let Ok(c) = canonical(&a) {
                prop_assert_eq!(spellings(&a), every_spelling(&c));
            }
        }
    }

    #[test]
    fn f2_legacy_spellings_cover_what_the_old_normalisation_stored() {
        // Before canonicalisation an address was only trimmed and lower-cased, so a
        // suppression may be keyed on any of these.
        let old = |raw: &str| raw.trim().to_lowercase();
        let all = spellings("jos\u{e9}@b\u{fc}cher.example");
        assert_eq!(all[0], "jos\u{e9}@xn--bcher-kva.example");
        for raw in [
            "Jos\u{e9}@B\u{fc}cher.example",
            "jose\u{301}@bu\u{308}cher.example",
            "jos\u{e9}@xn--bcher-kva.example",
            "JOSE\u{301}@XN--BCHER-KVA.example",
        ] {
            assert!(all.contains(&old(raw)), "{raw:?} not in {all:?}");
        }
        assert_eq!(all.len(), 4, "{all:?}");
    }

    #[test]
    fn invalid_idn_domains_are_refused() {
        // Not decodable punycode, and a mapped full-width `<`.
        assert_eq!(
            normalise("a@xn--ls8h-.example"),
            Err(AddressError::BadDomain)
        );
        assert!(normalise("a@ex\u{ff1c}ample.org").is_err());
        // U+3002 (ideographic full stop) is a label separator under UTS-46.
        assert_eq!(
            normalise("a@example\u{3002}org"),
            Ok("a@example.org".into())
        );
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
        fn nfd_input_normalises_like_nfc(l in "[a-zé-ü]{1,12}", d in "[a-zà-ÿ]{1,12}\\.[a-z]{2,4}") {
            let nfd: String = format!("{l}@{d}").nfd().collect();
            prop_assert_eq!(normalise(&nfd), normalise(&format!("{l}@{d}")));
            prop_assert_eq!(key(&nfd), key(&format!("{l}@{d}")));
        }

        #[test]
        fn ascii_fast_path_agrees_with_uts46(d in "[a-z0-9_%!-]{1,10}(\\.[a-z0-9-]{1,8}){1,3}") {
            let through_uts46 = idna::domain_to_ascii(&d).ok();
            match normalise(&format!("a@{d}")) {
                Ok(n) => prop_assert_eq!(Some(n), through_uts46.map(|a| format!("a@{a}"))),
                // Refused by the label rules, which both paths share.
                Err(e) => prop_assert_eq!(e, AddressError::BadDomain),
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
