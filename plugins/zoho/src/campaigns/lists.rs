//! Reading Zoho Campaigns: the org's mailing lists, a list's subscribers, one answer body.

use chrono::{DateTime, Utc};
use optinsync_plugin_api::{ConnectorError, ConnectorResult};
use serde_json::Value;

use super::http::CallError;
use super::{Api, SETTING_PREFIX, ZohoCampaigns, address_key, code_of, fingerprint, str_of};

impl ZohoCampaigns {
    /// Every mailing list of the org: (listkey, name, is_public).
    pub async fn mailing_lists(&self) -> ConnectorResult<Vec<(String, String, bool)>> {
        let mut out = Vec::new();
        let range: usize = 100;
        let mut from = 1;
        loop {
            let params = [
                ("sort", "asc".to_owned()),
                ("fromindex", from.to_string()),
                ("range", range.to_string()),
            ];
            let value = match self.call(Api::GetMailingLists, &params).await {
                Ok(v) => v,
                // "No mailing list has been created."
                Err(CallError::Api { code, .. }) if code == "2401" => break,
                Err(CallError::Api { code, message }) => {
                    return Err(match code.as_str() {
                        "1007" | "401" | "2706" | "2701" | "2704" | "901" | "902" => {
                            ConnectorError::Config {
                                setting: format!("{SETTING_PREFIX}.refresh_token"),
                                message: format!(
                                    "Zoho Campaigns refused to list the mailing lists (error {code}: {message}); the token needs ZohoCampaigns.contact.READ"
                                ),
                            }
                        }
                        _ => ConnectorError::transient(format!(
                            "Zoho Campaigns `getmailinglists` error {code}: {message}"
                        )),
                    });
                }
                Err(CallError::Connector(e)) => return Err(e),
            };
            let items = value
                .get("list_of_details")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            for item in &items {
                let key = str_of(item, "listkey");
                if key.is_empty() {
                    continue;
                }
                let public = match item.get("is_public") {
                    Some(Value::Bool(b)) => *b,
                    Some(Value::String(s)) => s.trim().eq_ignore_ascii_case("true"),
                    _ => false,
                };
                out.push((key, str_of(item, "listname"), public));
            }
            if items.len() < range {
                break;
            }
            from += range;
        }
        Ok(out)
    }

    /// One page of `getlistsubscribers` (empty past the end).
    pub(super) async fn subscribers_page(
        &self,
        list: &str,
        listkey: &str,
        status: &str,
        from: usize,
    ) -> ConnectorResult<Vec<Value>> {
        let params = [
            ("listkey", listkey.to_owned()),
            ("status", status.to_owned()),
            ("sort", "asc".to_owned()),
            ("fromindex", from.to_string()),
            ("range", self.settings.page_size.to_string()),
        ];
        match self.call(Api::GetListSubscribers, &params).await {
            Ok(v) => Ok(v
                .get("list_of_details")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()),
            // "There are no contacts in this list" (the per-endpoint page says "deleted";
            // a deleted list is caught by the start-up check).
            Err(CallError::Api { code, .. }) if code == "2203" || code == "2204" => Ok(Vec::new()),
            Err(CallError::Api { code, message }) => {
                Err(self.api_error(Api::GetListSubscribers, list, &code, &message))
            }
            Err(CallError::Connector(e)) => Err(e),
        }
    }

    /// Whether `listkey` holds `email` as an active member: every page of
    /// `getlistsubscribers?status=active` until the address is found (the reference documents
    /// no lookup of one contact). Read fresh for every ambiguous removal, not cached: a
    /// removal is a legal duty, and a stale "not there" would leave the person on the list.
    /// For the same reason only an empty page ends the read (Zoho may cap `range` below
    /// `page_size`; a short page is not proof of the end).
    pub(super) async fn holds_active(
        &self,
        list: &str,
        listkey: &str,
        email: &str,
    ) -> ConnectorResult<bool> {
        let wanted = address_key(email);
        let mut from = 1;
        loop {
            let items = self.subscribers_page(list, listkey, "active", from).await?;
            if items.is_empty() {
                return Ok(false);
            }
            if items
                .iter()
                .filter_map(Self::member_email)
                .any(|e| address_key(&e) == wanted)
            {
                return Ok(true);
            }
            from += items.len();
        }
    }

    /// How the connector reads one answer body: the in-body `code`, whether it counts as
    /// success, the `message`, and each `list_of_details` member's address and time. The
    /// pure part of [`Self::call`] and the status poll, public only for fuzzing.
    #[doc(hidden)]
    pub fn read_answer(body: &[u8]) -> Option<AnswerSummary> {
        let value: Value = serde_json::from_slice(body).ok()?;
        let code = code_of(&value);
        let status = value.get("status").and_then(Value::as_str);
        let ok = !status.is_some_and(|s| s.eq_ignore_ascii_case("error"))
            && (status.is_some_and(|s| s.eq_ignore_ascii_case("success"))
                || code == "0"
                || code == "200");
        let members = value
            .get("list_of_details")
            .and_then(Value::as_array)
            .map(|items| {
                items
                    .iter()
                    .map(|item| {
                        let email = Self::member_email(item);
                        let key = email.as_deref().map(|e| {
                            let added = str_of(item, "added_time");
                            fingerprint(&["unsub", &e.to_lowercase(), &added])
                        });
                        (email.map(|e| address_key(&e)), key, Self::member_time(item))
                    })
                    .collect()
            })
            .unwrap_or_default();
        Some(AnswerSummary {
            code,
            ok,
            message: str_of(&value, "message"),
            members,
        })
    }

    pub(super) fn member_email(item: &Value) -> Option<String> {
        ["contact_email", "Contact Email", "email"]
            .iter()
            .map(|k| str_of(item, k))
            .find(|e| !e.trim().is_empty())
            .map(|e| e.trim().to_owned())
    }

    pub(super) fn member_time(item: &Value) -> Option<DateTime<Utc>> {
        let t = str_of(item, "added_time");
        t.trim()
            .parse::<i64>()
            .ok()
            .and_then(DateTime::from_timestamp_millis)
    }
}

/// See [`ZohoCampaigns::read_answer`]; members as (address key, seen-set key, added time).
#[doc(hidden)]
#[derive(Debug)]
pub struct AnswerSummary {
    pub code: String,
    pub ok: bool,
    pub message: String,
    #[allow(clippy::type_complexity)]
    pub members: Vec<(Option<String>, Option<String>, Option<DateTime<Utc>>)>,
}
