//! Whether a link may act: its binding to a mailed token, and what the state machine would
//! do with it now (its standing), so the page never disagrees with the POST.

use chrono::Utc;

use optinsync_engine::consent::Input;
use optinsync_engine::engine::Engine;
use optinsync_engine::tokens::Purpose;

use super::Target;

/// What the mail that carried a link recorded about itself.
#[derive(Debug, Default)]
pub(super) struct Mailed {
    pub(super) message_id: Option<String>,
    pub(super) content_hash: Option<String>,
}

/// Whether a link's token id went out in a mail to this contact for this list.
pub(super) enum Binding {
    Mailed(Mailed),
    /// An unsubscribe link, and this list has mails from before unsubscribe token ids were
    /// recorded: honoured on its signature alone.
    Legacy,
    NotMailed,
}

pub(super) async fn binding(
    engine: &Engine,
    t: &Target<'_>,
) -> Result<Binding, optinsync_engine::store::StoreError> {
    // The mails only: a contact's link fetches and notes can be many.
    let events = engine
        .reads()
        .consent_events(&t.contact.id, &t.list.id)
        .await?;
    let mut legacy = false;
    for e in events
        .iter()
        .rev()
        .filter(|e| e.kind.ends_with("_mail_sent"))
    {
        let ev = e.evidence();
        let mailed_id = match t.claims.purpose {
            Purpose::Confirm => ev.token_id.as_deref(),
            Purpose::Unsubscribe => ev.unsubscribe_token_id.as_deref(),
            Purpose::Preferences => ev.preferences_token_id.as_deref(),
        };
        if mailed_id == Some(t.claims.token_id.as_str()) {
            return Ok(Binding::Mailed(Mailed {
                message_id: ev.message_id,
                content_hash: ev.content_hash,
            }));
        }
        legacy |= t.claims.purpose == Purpose::Unsubscribe && ev.unsubscribe_token_id.is_none();
    }
    Ok(if legacy {
        Binding::Legacy
    } else {
        Binding::NotMailed
    })
}

/// Where a confirmation link's signup stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Standing {
    /// Waiting for this link's confirmation (or expired: its page offers a fresh mail).
    Open,
    /// Confirmed through this very link.
    AlreadyConfirmed,
    /// Withdrawn since, replaced by a newer signup, or never waiting: it can confirm nothing.
    Closed,
}

/// What the state machine would make of this link's confirmation now (a dry run of
/// `Input::Confirm`, so the page never disagrees with what the `POST` would do).
pub(super) fn standing(t: &Target<'_>, expired: bool) -> Standing {
    let now = Utc::now();
    let current = t
        .consent
        .clone()
        .unwrap_or_else(|| optinsync_engine::consent::Consent::new(now));
    let input = Input::Confirm {
        token: t.claims.token_id.clone(),
    };
    match optinsync_engine::plan::transition_for(&current, &input, t.list, false, now) {
        Ok(Some(_)) => Standing::Open,
        Ok(None) => Standing::AlreadyConfirmed,
        // An expired link offers a fresh mail whatever became of its signup.
        Err(_) if expired => Standing::Open,
        Err(_) => Standing::Closed,
    }
}
