//! `campaign import-existing`: record the people already on a campaigns list as asserted
//! (never confirmed), so the rules can ask them to confirm.

use chrono::Utc;
use futures_util::StreamExt as _;
use optinsync_plugin_api::{Cursor, Keyed, per_item};
use serde::Serialize;

use crate::config::ListConfig;
use crate::consent::{ConsentState, Input};
use crate::email;
use crate::engine::{Applied, Engine, EngineError, EngineResult};
use crate::ledger::{EventSource, Evidence};
use crate::store::ContactUpsert;
use crate::untrusted::clean_fields;

/// Assertions of one page applied at once (each its own commit, written in groups).
const IMPORT_IN_FLIGHT: usize = 64;

/// What `import_existing` did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ImportStats {
    pub members: u64,
    /// Taken into the ledger as `asserted`: the rules will ask them to confirm.
    pub asserted: u64,
    /// Already known with consent (pending, confirmed, ...): left as they are.
    pub already_known: u64,
    /// On the list although withdrawn, bounced, complained or lapsed: taken off it.
    pub removed: u64,
    pub invalid: u64,
}

impl Engine {
    /// One page of the members of `list`'s campaigns list (`None` = the first).
    pub(crate) async fn members_page(
        &self,
        list: &ListConfig,
        cursor: Option<&Cursor>,
    ) -> EngineResult<optinsync_plugin_api::MemberPage> {
        self.connectors
            .campaigns
            .list_members(list.campaigns_list(), cursor)
            .await
            .map_err(|source| EngineError::Connector {
                connector: "campaigns",
                source,
            })
    }

    /// Take the members of an existing Campaigns list — people put there without DOI proof,
    /// the usual starting point — into the ledger as `asserted`, so the rules run a
    /// re-permission campaign: DOI mail, reminder, removal of those who do not confirm.
    pub async fn import_existing(
        &self,
        list: &ListConfig,
        mut progress: impl FnMut(&ImportStats),
    ) -> EngineResult<ImportStats> {
        let mut stats = ImportStats::default();
        let mut cursor: Option<Cursor> = None;
        let today = Utc::now().format("%Y-%m-%d").to_string();
        loop {
            let page = self.members_page(list, cursor.as_ref()).await?;
            let mut upserts = Vec::with_capacity(page.members.len());
            for member in &page.members {
                stats.members += 1;
                let Ok(address) = email::normalise(&member.email) else {
                    tracing::warn!(list = %list.id, "existing list member with an invalid address; skipped");
                    stats.invalid += 1;
                    continue;
                };
                if self.is_erased(&address).await? {
                    // Erased: take it off the list without storing the address again.
                    self.remove_member(list, &address).await?;
                    tracing::info!(list = %list.id, "existing member with an erased address removed");
                    stats.removed += 1;
                    continue;
                }
                upserts.push(ContactUpsert {
                    email: address,
                    language: member.language.as_deref().map(crate::untrusted::clean_text),
                    fields: clean_fields(&member.fields),
                    crm_record: None,
                });
            }
            // The page's contacts in one transaction, then their assertions side by side:
            // the group commit writes many of them with one fsync.
            let contacts = self.store.upsert_contacts(&upserts, Utc::now()).await?;
            let evidence = Evidence {
                detail: Some(format!(
                    "member of Campaigns list `{}` without DOI proof; imported {today}",
                    list.campaigns_list()
                )),
                ..Evidence::default()
            };
            let mut applied = futures_util::stream::iter(contacts.iter())
                .map(|contact| {
                    let evidence = evidence.clone();
                    async move {
                        let a = self
                            .apply(
                                contact,
                                list,
                                Input::CrmAsserted,
                                EventSource::CampaignsImport,
                                evidence,
                            )
                            .await;
                        (contact, a)
                    }
                })
                .buffered(IMPORT_IN_FLIGHT);
            let mut others = Vec::new();
            while let Some((contact, a)) = applied.next().await {
                match a? {
                    Applied::Changed(_) => stats.asserted += 1,
                    _ => others.push(contact),
                }
            }
            drop(applied);
            for contact in others {
                let state = self
                    .store
                    .consent(&contact.id, &list.id)
                    .await?
                    .map(|c| c.state);
                let keeps_place = matches!(
                    state,
                    Some(
                        ConsentState::Asserted
                            | ConsentState::Pending
                            | ConsentState::Confirmed
                            | ConsentState::Revalidating
                    )
                );
                if keeps_place {
                    stats.already_known += 1;
                } else {
                    // Withdrawal wins: someone who left must not stay on the list.
                    self.remove_member(list, &contact.email).await?;
                    tracing::info!(contact_id = %contact.id, list = %list.id, state = ?state, "existing member without consent removed");
                    stats.removed += 1;
                }
            }
            progress(&stats);
            if !page.has_more {
                return Ok(stats);
            }
            cursor = page.next_cursor;
        }
    }

    /// Take one existing member off the campaigns list, now. The key names the list and the
    /// keyed hash of the address (never the address), so a repeated import re-sends the same
    /// write.
    async fn remove_member(&self, list: &ListConfig, address: &str) -> EngineResult<()> {
        let key = format!(
            "import-existing:{}:{}",
            list.id,
            self.tokens.address_hash(address)
        );
        let item = Keyed::new(key, address.to_owned());
        let answer = self
            .connectors
            .campaigns
            .remove(list.campaigns_list(), std::slice::from_ref(&item))
            .await;
        match per_item(1, answer).pop() {
            Some(Ok(())) => Ok(()),
            Some(Err(source)) => Err(EngineError::Connector {
                connector: "campaigns",
                source,
            }),
            None => Err(EngineError::Connector {
                connector: "campaigns",
                source: optinsync_plugin_api::ConnectorError::transient(
                    "no answer for the removal",
                ),
            }),
        }
    }
}
