//! Consent write-back: the list's subscription type subscribed (with `legalBasis` and an
//! explanation naming the DOI proof) or unsubscribed, an optional consent property, and the
//! echo of these writes recognised in the feed.
//!
//! An unsubscribe through the v3 communication-preferences API is **final**: HubSpot's v3
//! subscribe refuses to subscribe an address that opted out again (only the person, through
//! HubSpot's own preference page, or the v4 API can). A later confirmation in optinsync is
//! then reported as a permanent failure naming the reason.

use std::collections::BTreeMap;

use optinsync_plugin_api::{ConnectorError, ConnectorResult, ConsentState, ConsentWriteBack};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::http::CallError;
use crate::records::parse_time;
use crate::{HubSpotCrm, ListTarget, MAX_BATCH, MODULE, lock};

const STATUS_PATH: &str = "/communication-preferences/v3/status/email/";
const SUBSCRIBE_PATH: &str = "/communication-preferences/v3/subscribe";
const UNSUBSCRIBE_PATH: &str = "/communication-preferences/v3/unsubscribe";
const BATCH_READ: &str = "/crm/v3/objects/contacts/batch/read";
const BATCH_UPDATE: &str = "/crm/v3/objects/contacts/batch/update";
/// Keys remembered as done (bounded).
const DONE_KEYS: usize = 10_000;

/// An address as one path segment (everything but unreserved characters and `@` escaped).
pub(crate) fn path_segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'@') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// What a state means for the list's subscription type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    Subscribe,
    Unsubscribe,
    None,
}

fn change_for(state: ConsentState) -> Change {
    match state {
        ConsentState::Confirmed => Change::Subscribe,
        ConsentState::Withdrawn
        | ConsentState::Lapsed
        | ConsentState::Bounced
        | ConsentState::Complained
        | ConsentState::Erased => Change::Unsubscribe,
        _ => Change::None,
    }
}

/// `legalBasisExplanation`: what happened, when, for which list, and where the proof is.
pub(crate) fn explanation(consent: &ConsentWriteBack) -> String {
    let at = consent.at.format("%Y-%m-%dT%H:%M:%SZ");
    let list = consent.list.replace(|c: char| c.is_control(), " ");
    match consent.state {
        ConsentState::Confirmed => format!(
            "Double opt-in confirmed {at} for list {list}; proof: optinsync consent ledger event {}",
            consent.ledger_seq
        ),
        other => format!(
            "Consent {other} {at} for list {list} (optinsync consent ledger event {})",
            consent.ledger_seq
        ),
    }
}

impl HubSpotCrm {
    /// Was this version of the contact (`lastmodifieddate` `ts`) written by optinsync itself?
    /// Forgets the write once a later version shows up. An opt-out is never taken for an echo
    /// unless optinsync wrote an opt-out (withdrawal wins).
    pub(crate) fn is_echo(&self, id: u64, ts: i64, opted_out: bool) -> bool {
        let mut echoes = lock(&self.echoes);
        match echoes.get(&id).copied() {
            Some((before, after, wrote_opt_out)) if before < ts && ts <= after => {
                wrote_opt_out || !opted_out
            }
            Some((_, after, _)) if after < ts => {
                echoes.remove(&id);
                false
            }
            _ => false,
        }
    }

    /// `(before, after)`: the `lastmodifieddate` range of optinsync's last write to this
    /// contact, if one is remembered.
    pub(crate) fn echo_window(&self, id: u64) -> Option<(i64, i64)> {
        lock(&self.echoes).get(&id).map(|(b, a, _)| (*b, *a))
    }

    fn remember_echo(&self, id: u64, before: i64, after: i64, opt_out: bool) {
        let mut echoes = lock(&self.echoes);
        // Bounded: losing a mark only costs a re-read, never a loop.
        if echoes.len() >= 100_000 {
            echoes.clear();
        }
        // Writes in a row make one window: a write that changed nothing (or within the same
        // millisecond) has an empty window of its own and must not hide the echo of the one
        // before. A gap (someone else's version between them) starts a new window.
        let window = match echoes.get(&id) {
            Some(&(b, a, o)) if before <= a => (b.min(before), a.max(after), o || opt_out),
            _ => (before, after, opt_out),
        };
        echoes.insert(id, window);
    }

    /// Properties optinsync writes (their change webhooks are not CRM input).
    pub(crate) fn written_properties(&self) -> Vec<String> {
        let s = &self.settings;
        let mut out: Vec<String> = s.type_opt_outs.keys().cloned().collect();
        out.extend(s.lists.values().filter_map(|t| t.consent_property.clone()));
        if s.unsubscribe_all {
            out.push(s.opt_out_property.clone());
        }
        out
    }

    /// `lastmodifieddate` (ms) of these contacts now.
    async fn modified_of(&self, ids: &[u64]) -> ConnectorResult<BTreeMap<u64, i64>> {
        let mut out = BTreeMap::new();
        for chunk in ids.chunks(MAX_BATCH) {
            let body = json!({
                "properties": ["lastmodifieddate"],
                "inputs": chunk.iter().map(|id| json!({"id": id.to_string()})).collect::<Vec<_>>(),
            });
            let (_, value) = self
                .api
                .call(Method::POST, BATCH_READ, &[], Some(&body), false)
                .await
                .map_err(|e| self.api.error(e, "contact batch read"))?;
            for item in value
                .get("results")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let p = self.parse_contact(item);
                let ts = item
                    .get("properties")
                    .and_then(|p| p.get("lastmodifieddate"))
                    .and_then(Value::as_str)
                    .and_then(parse_time)
                    .map(|t| t.timestamp_millis());
                if let (Some(id), Some(ts)) = (p.id, ts) {
                    out.insert(id, ts);
                }
            }
        }
        Ok(out)
    }

    pub(crate) async fn write_consent(&self, consent: &ConsentWriteBack) -> ConnectorResult<()> {
        if !self.settings.write_back_enabled {
            return Ok(());
        }
        if lock(&self.done_keys).0.contains(&consent.key) {
            return Ok(());
        }
        let target = self.settings.lists.get(&consent.list);
        let change = change_for(consent.state);
        let subscription = target
            .and_then(|t| t.subscription_id.as_ref())
            .filter(|_| change != Change::None);
        let property = target.and_then(|t| t.consent_property.as_ref());
        let unsubscribe_all = consent.opt_out && self.settings.unsubscribe_all;
        if subscription.is_none() && property.is_none() && !unsubscribe_all {
            tracing::debug!(list = %consent.list, "no HubSpot write-back configured for this list and state");
            self.mark_done(&consent.key);
            return Ok(());
        }
        let ids: Vec<u64> = consent
            .records
            .iter()
            .filter(|r| r.module == MODULE)
            .filter_map(|r| r.id.parse().ok())
            .collect();
        let before = if ids.is_empty() {
            BTreeMap::new()
        } else {
            self.modified_of(&ids).await?
        };
        let wrote_opt_out = unsubscribe_all || change == Change::Unsubscribe;
        if let (Some(sub), Some(t)) = (subscription, target) {
            match change {
                Change::Subscribe => self.subscribe(consent, sub, t).await?,
                Change::Unsubscribe => self.unsubscribe(consent, sub, t).await?,
                Change::None => {}
            }
        }
        if unsubscribe_all {
            let path = format!(
                "/communication-preferences/v4/statuses/{}/unsubscribe-all",
                path_segment(&consent.email)
            );
            self.api
                .call(
                    Method::POST,
                    &path,
                    &[("channel", "EMAIL".to_owned())],
                    None,
                    false,
                )
                .await
                .map_err(|e| self.api.error(e, "unsubscribe from all email"))?;
        }
        if let Some(property) = property
            && !ids.is_empty()
        {
            self.set_property(&ids, property, consent.state.as_str())
                .await?;
        }
        if !before.is_empty() {
            let after = self.modified_of(&ids).await?;
            for (id, after) in after {
                let before = before.get(&id).copied().unwrap_or(after - 1);
                self.remember_echo(id, before, after, wrote_opt_out);
            }
        }
        tracing::info!(records = ids.len(), list = %consent.list, state = %consent.state, "consent written back to HubSpot");
        self.mark_done(&consent.key);
        Ok(())
    }

    fn mark_done(&self, key: &str) {
        let mut done = lock(&self.done_keys);
        if done.0.insert(key.to_owned()) {
            done.1.push_back(key.to_owned());
        }
        while done.1.len() > DONE_KEYS {
            if let Some(old) = done.1.pop_front() {
                done.0.remove(&old);
            }
        }
    }

    /// The v3 status of one subscription type: `(status, sourceOfStatus)`.
    async fn type_status(&self, email: &str, sub: &str) -> ConnectorResult<(String, String)> {
        let path = format!("{STATUS_PATH}{}", path_segment(email));
        let (_, value) = self
            .api
            .call(Method::GET, &path, &[], None, false)
            .await
            .map_err(|e| self.api.error(e, "subscription status"))?;
        let found = value
            .get("subscriptionStatuses")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find(|s| match s.get("id") {
                Some(Value::String(t)) => t == sub,
                Some(Value::Number(n)) => n.to_string() == sub,
                _ => false,
            });
        let text = |k: &str| {
            found
                .and_then(|s| s.get(k))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        Ok((text("status"), text("sourceOfStatus")))
    }

    async fn subscribe(
        &self,
        consent: &ConsentWriteBack,
        sub: &str,
        t: &ListTarget,
    ) -> ConnectorResult<()> {
        let (status, source) = self.type_status(&consent.email, sub).await?;
        if status == "SUBSCRIBED" {
            return Ok(());
        }
        if matches!(source.as_str(), "PORTAL_WIDE_STATUS" | "BRAND_WIDE_STATUS") {
            return Err(ConnectorError::permanent(format!(
                "HubSpot: the address opted out of all email; subscription type {sub} cannot be subscribed through the API (the person can resubscribe on HubSpot's preference page)"
            )));
        }
        let body = json!({
            "emailAddress": consent.email,
            "subscriptionId": sub,
            "legalBasis": t.legal_basis,
            "legalBasisExplanation": explanation(consent),
        });
        match self
            .api
            .call(Method::POST, SUBSCRIBE_PATH, &[], Some(&body), false)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.status() == Some(StatusCode::BAD_REQUEST) => {
                // Already subscribed (a retry) is done; an earlier opt-out is final in v3.
                let (status, _) = self.type_status(&consent.email, sub).await?;
                if status == "SUBSCRIBED" {
                    Ok(())
                } else {
                    Err(match self.api.error(e, "subscribe") {
                        ConnectorError::Permanent { message } => {
                            ConnectorError::permanent(format!(
                                "{message} (an address that unsubscribed cannot be subscribed again through HubSpot's v3 API)"
                            ))
                        }
                        other => other,
                    })
                }
            }
            Err(e) => Err(self.api.error(e, "subscribe")),
        }
    }

    async fn unsubscribe(
        &self,
        consent: &ConsentWriteBack,
        sub: &str,
        t: &ListTarget,
    ) -> ConnectorResult<()> {
        let body = json!({
            "emailAddress": consent.email,
            "subscriptionId": sub,
            "legalBasis": t.legal_basis,
            "legalBasisExplanation": explanation(consent),
        });
        match self
            .api
            .call(Method::POST, UNSUBSCRIBE_PATH, &[], Some(&body), false)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.status() == Some(StatusCode::BAD_REQUEST) => {
                // Already unsubscribed (a retry, or the person's own opt-out) is done.
                let (status, _) = self.type_status(&consent.email, sub).await?;
                if status == "SUBSCRIBED" {
                    Err(self.api.error(e, "unsubscribe"))
                } else {
                    Ok(())
                }
            }
            Err(e) => Err(self.api.error(e, "unsubscribe")),
        }
    }

    async fn set_property(&self, ids: &[u64], property: &str, value: &str) -> ConnectorResult<()> {
        for chunk in ids.chunks(MAX_BATCH) {
            let inputs: Vec<Value> = chunk
                .iter()
                .map(|id| json!({"id": id.to_string(), "properties": {property: value}}))
                .collect();
            let body = json!({ "inputs": inputs });
            let (status, value) = self
                .api
                .call(Method::POST, BATCH_UPDATE, &[], Some(&body), false)
                .await
                .map_err(|e: CallError| self.api.error(e, "consent property update"))?;
            if status.as_u16() == 207 {
                let errors: Vec<&Value> = value
                    .get("errors")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter(|e| {
                        e.get("category").and_then(Value::as_str) != Some("OBJECT_NOT_FOUND")
                    })
                    .collect();
                // A contact deleted since is no failure; anything else is.
                if !errors.is_empty() {
                    return Err(ConnectorError::permanent(format!(
                        "HubSpot refused the consent property for {} contact(s): {}",
                        errors.len(),
                        crate::http::redact(
                            errors
                                .first()
                                .and_then(|e| e.get("message"))
                                .and_then(Value::as_str)
                                .unwrap_or_default()
                        )
                    )));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_one_path_segment() {
        assert_eq!(path_segment("a+b@example.org"), "a%2Bb@example.org");
        assert_eq!(path_segment("x/../y@e.org"), "x%2F..%2Fy@e.org");
    }
}
