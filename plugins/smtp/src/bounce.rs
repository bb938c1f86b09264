//! Bounce classes from an SMTP refusal: hard (the address), soft (the mailbox, for now) or
//! policy (the sender). The enhanced status code (RFC 3463, `5.1.1`) decides when the reply
//! has one; otherwise the words of the reply, then the basic code.

use optinsync_plugin_api::BounceClass;

/// The class of a permanent (5xx) refusal of a recipient with reply `code` and `text`.
pub fn classify(code: Option<u16>, text: &str) -> BounceClass {
    if let Some((class, subject, detail)) = enhanced_code(text)
        && (class == 5 || class == 4)
    {
        return match (subject, detail) {
            // 5.1.x: the address (unknown user, bad domain, moved).
            (1, _) => BounceClass::Hard,
            // 5.2.1 mailbox disabled is lasting; 5.2.2 full, 5.2.3 too big, 5.2.x other.
            (2, 1) => BounceClass::Hard,
            // 5.7.x security or policy, 5.6.x content refused.
            (7, _) | (6, _) => BounceClass::Policy,
            // 5.2.x, 5.3.x mail system, 5.4.x routing, 5.5.x protocol: not the address.
            _ => {
                if mentions_policy(text) {
                    BounceClass::Policy
                } else {
                    BounceClass::Soft
                }
            }
        };
    }
    if mentions_policy(text) {
        return BounceClass::Policy;
    }
    let lower = text.to_ascii_lowercase();
    if [
        "mailbox full",
        "over quota",
        "quota exceeded",
        "insufficient storage",
        "mailbox is full",
    ]
    .iter()
    .any(|w| lower.contains(w))
    {
        return BounceClass::Soft;
    }
    match code {
        // 552: exceeded storage allocation.
        Some(552) => BounceClass::Soft,
        // 554 "transaction failed" is what most providers answer to a blocked sender.
        Some(554) => BounceClass::Policy,
        // 550, 551, 553 and anything else about the recipient.
        _ => BounceClass::Hard,
    }
}

/// Words providers use when they refuse the sender rather than the address.
fn mentions_policy(text: &str) -> bool {
    let lower = text.to_ascii_lowercase();
    [
        "spam",
        "blocked",
        "blacklist",
        "blocklist",
        "block list",
        "reputation",
        "policy",
        "spamhaus",
        "dnsbl",
        "rbl",
        "too many",
        "rate limit",
    ]
    .iter()
    .any(|w| lower.contains(w))
}

/// The first `class.subject.detail` enhanced status code in the reply text.
fn enhanced_code(text: &str) -> Option<(u16, u16, u16)> {
    text.split(|c: char| {
        c.is_whitespace() || matches!(c, '-' | ';' | ',' | '(' | ')' | '<' | '>' | ':' | '#')
    })
    .filter_map(|word| {
        let word = word.trim_matches(|c: char| !c.is_ascii_digit() && c != '.');
        let mut parts = word.split('.');
        let class = parts.next()?.parse::<u16>().ok()?;
        let subject = parts.next()?.parse::<u16>().ok()?;
        let detail = parts.next()?.parse::<u16>().ok()?;
        (parts.next().is_none() && matches!(class, 2 | 4 | 5) && subject < 10 && detail < 1000)
            .then_some((class, subject, detail))
    })
    .next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enhanced_codes_decide() {
        let cases = [
            (
                550,
                "550 5.1.1 <x@example.org>: Recipient address rejected: User unknown",
                BounceClass::Hard,
            ),
            (
                550,
                "5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found",
                BounceClass::Hard,
            ),
            (
                550,
                "550-5.2.1 The email account that you tried to reach is disabled",
                BounceClass::Hard,
            ),
            (
                552,
                "552-5.2.2 The email account that you tried to reach is over quota",
                BounceClass::Soft,
            ),
            (
                550,
                "550-5.7.1 Our system has detected an unusual rate of unsolicited mail",
                BounceClass::Policy,
            ),
            (
                554,
                "554 5.7.1 Service unavailable; Client host blocked using Spamhaus",
                BounceClass::Policy,
            ),
            (
                550,
                "550 5.4.1 Recipient address rejected: Access denied",
                BounceClass::Soft,
            ),
            (
                550,
                "5.3.0 mail system full of spam complaints",
                BounceClass::Policy,
            ),
        ];
        for (code, text, want) in cases {
            assert_eq!(classify(Some(code), text), want, "{text}");
        }
    }

    #[test]
    fn without_an_enhanced_code_the_words_then_the_code_decide() {
        assert_eq!(
            classify(Some(550), "550 No such user here"),
            BounceClass::Hard
        );
        assert_eq!(classify(Some(550), "550 Mailbox full"), BounceClass::Soft);
        assert_eq!(
            classify(Some(550), "550 Message rejected as spam"),
            BounceClass::Policy
        );
        assert_eq!(
            classify(Some(552), "552 Requested action aborted"),
            BounceClass::Soft
        );
        assert_eq!(
            classify(Some(554), "554 Transaction failed"),
            BounceClass::Policy
        );
        assert_eq!(
            classify(Some(553), "553 mailbox name not allowed"),
            BounceClass::Hard
        );
        assert_eq!(classify(None, "rejected"), BounceClass::Hard);
    }

    #[test]
    fn numbers_that_are_not_status_codes_are_ignored() {
        assert_eq!(enhanced_code("550 version 1.2.3.4 of nothing"), None);
        assert_eq!(enhanced_code("550 see 10.0.0.1"), None);
        assert_eq!(enhanced_code("(5.1.1)"), Some((5, 1, 1)));
    }
}
