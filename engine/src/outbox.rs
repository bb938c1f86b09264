//! Outbox workers: deliver the side effects that commits queued, through the connectors.
//!
//! A row is claimed under a lease, delivered, and finished in one transaction with any ledger
//! event it produces (e.g. `mail_sent` with the Message-ID). Temporary failures retry with
//! capped, jittered exponential backoff; permanent ones become dead letters. A crash leaves
//! the row claimed until its lease ends, then another worker takes it; a `run` daemon
//! restarted on the same host and listen address takes its predecessor's claims back at once
//! (`Store::release_claims`).
//!
//! Whether a failure also counts against the connector's circuit breaker depends on its
//! [`optinsync_plugin_api::FailureScope`]: only service-wide failures do; a failure that
//! concerns one record (one address on one list) retries that row alone.
//!
//! Mail text is composed by [`crate::mail::compose`]; the worker only checks that the signup
//! still waits, stores the snapshot, sends and records.
//!
//! Delivery guarantee: at-least-once. A mail is sent twice only if the process dies after the
//! transport accepted it and before the finish commits; transports that deduplicate on the
//! idempotency key (the `.eml` folder does) close even that window.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::Utc;
use futures_util::{StreamExt as _, future, stream};
use optinsync_plugin_api::{
    BounceClass, ConnectorError, ConsentProof, ConsentWriteBack, Keyed, Subscriber, per_item,
};
use rand::Rng as _;
use serde::Serialize;

use crate::circuit::Verdict;
use crate::consent::{ConsentState, Input, MailKind};
use crate::engine::{Engine, EngineResult};
use crate::ledger::{EventSource, Evidence, NewEvent};
use crate::mail;
use crate::outcomes::Outcome;
use crate::store::{Finish, OutboxFinish, OutboxItem, OutboxWork, StoredWork};
use crate::untrusted::Escaped;
use crate::work::ConnectorRole;

/// How long a claimed row belongs to its worker before others may take it.
pub const LEASE: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DeliverStats {
    pub done: u64,
    pub retried: u64,
    pub dead: u64,
    /// Not attempted: the connector's circuit is open, or the daemon is stopping.
    pub postponed: u64,
}

/// Backoff before attempt `attempts + 1`: 5 s doubling, capped at 1 h, ±20 % jitter.
pub fn backoff(attempts: i32) -> Duration {
    backoff_with(Duration::from_secs(5), Duration::from_secs(3600), attempts)
}

/// Backoff before attempt `attempts + 1`: `base` doubling, ±20 % jitter (so that rows that
/// failed together do not retry together), never more than `cap`.
pub fn backoff_with(base: Duration, cap: Duration, attempts: i32) -> Duration {
    let exp = u32::try_from(attempts.clamp(1, 30) - 1).unwrap_or(0);
    let raw = base.saturating_mul(2u32.saturating_pow(exp)).min(cap);
    let jitter = rand::thread_rng().gen_range(0.8..1.2);
    raw.mul_f64(jitter).min(cap)
}

/// Metric label of a finish.
fn result_label(f: &Finish) -> &'static str {
    match f {
        Finish::Done { .. } => "done",
        Finish::Retry { .. } => "retry",
        Finish::Dead { .. } => "dead",
        Finish::Postpone { .. } => "postponed",
    }
}

impl Engine {
    /// Claim and deliver up to `limit` due rows (legal-deadline rows first). Campaigns
    /// subscribes and removals of one list go in batches of up to the connector's
    /// [`optinsync_plugin_api::CampaignsConnector::max_batch`], each with its own result;
    /// mails up to the transport's [`optinsync_plugin_api::MailTransport::concurrency`] at
    /// once; everything else one row at a time.
    ///
    /// Mails go side by side (up to the transport's concurrency) and beside the other work;
    /// campaigns calls for different contacts go side by side up to the campaigns
    /// connector's [`optinsync_plugin_api::CampaignsConnector::concurrency`]; one contact's
    /// rows, and CRM writes, go one unit at a time in claim order. Each row is finished as
    /// soon as its own delivery ends, so at most [`Self::mail_units_in_flight`] (twice the
    /// transport's concurrency) sent mails are unrecorded at any moment — the bound on
    /// duplicates after a crash.
    pub async fn deliver_due(&self, worker: &str, limit: i64) -> EngineResult<DeliverStats> {
        self.deliver_lane(worker, None, limit).await
    }

    /// [`Self::deliver_due`] for one connector's work only (`None`: all): `run` drives one
    /// lane per connector, so mails never wait behind a slow CRM write-back or a campaigns
    /// call waiting for its quota, and the other way round.
    pub async fn deliver_lane(
        &self,
        worker: &str,
        lane: Option<ConnectorRole>,
        limit: i64,
    ) -> EngineResult<DeliverStats> {
        let now = Utc::now();
        let lease = chrono::Duration::from_std(LEASE).unwrap_or(chrono::Duration::minutes(5));
        let items = match lane {
            Some(role) => {
                self.store
                    .claim_outbox_kinds(worker, now, now + lease, limit, OutboxWork::kinds_of(role))
                    .await?
            }
            None => {
                // Every kind this version knows, one indexed read each (see the store's
                // claim); once none is due, any kind, so that a row of a kind this version
                // cannot read is claimed too and becomes a dead letter saying so.
                let known = self
                    .store
                    .claim_outbox_kinds(worker, now, now + lease, limit, &OutboxWork::KINDS)
                    .await?;
                if known.is_empty() {
                    self.store
                        .claim_outbox_kinds(worker, now, now + lease, limit, &[])
                        .await?
                } else {
                    known
                }
            }
        };
        let in_flight = self.mail_units_in_flight();
        let mut mails = Vec::new();
        let mut campaigns = Vec::new();
        let mut others = Vec::new();
        for unit in units(items, self.connectors.campaigns.max_batch()) {
            match unit.connector() {
                Some(ConnectorRole::Mail) => mails.push(unit),
                Some(ConnectorRole::Campaigns) => campaigns.push(unit),
                _ => others.push(unit),
            }
        }
        // Mails, campaigns calls and CRM writes go side by side, as `run`'s lanes do: nothing
        // orders one connector's work against another's. Within a connector, one contact's
        // rows keep their claim order.
        let mail_run = async {
            let mut run = Finishing::default();
            if mails.is_empty() {
                return (run, None);
            }
            // Composed a chunk at a time, the next chunk while the mails of the one before
            // go out, so the relay does not wait for a whole pass to be composed; each
            // chunk's snapshots share one write.
            let mut chunks: Vec<Vec<Unit>> = Vec::new();
            let mut mails = mails.into_iter().peekable();
            while mails.peek().is_some() {
                chunks.push(mails.by_ref().take(in_flight.saturating_mul(2)).collect());
            }
            let prepared = stream::iter(chunks)
                .map(|chunk| self.prepare_mails(chunk))
                .buffered(2)
                .flat_map(stream::iter);
            let outcomes = prepared
                .map(|(u, pre)| self.deliver_unit_with(worker, u, pre))
                .buffer_unordered(in_flight);
            let first_error = finish_all(outcomes, &mut run).await;
            (run, first_error)
        };
        // Campaigns batches of different contacts go side by side; their calls up to the
        // connector's concurrency at once (each waits for its quota inside the connector).
        let side = self
            .connectors
            .campaigns
            .concurrency()
            .max(1)
            .saturating_mul(CAMPAIGNS_UNITS_PER_CALL);
        let campaigns_run = async {
            let mut run = Finishing::default();
            for group in side_by_side(campaigns) {
                let outcomes = stream::iter(group)
                    .map(|unit| self.deliver_unit(worker, unit))
                    .buffer_unordered(side);
                if let Some(e) = finish_all(outcomes, &mut run).await {
                    return (run, Some(e));
                }
            }
            (run, None)
        };
        let other_run = async {
            let mut run = Finishing::default();
            for unit in others {
                if let Err(e) = run.add(self.deliver_unit(worker, unit).await) {
                    return (run, Some(e));
                }
            }
            (run, None)
        };
        let ((mail_done, mail_error), (campaigns_done, campaigns_error), (other_done, other_error)) =
            tokio::join!(mail_run, campaigns_run, other_run);
        let mut run = Finishing::default();
        run.add(Ok(mail_done))?;
        run.add(Ok(campaigns_done))?;
        run.add(Ok(other_done))?;
        if let Some(e) = mail_error.or(campaigns_error).or(other_error) {
            return Err(e);
        }
        if run.scrub {
            self.store.after_erasure().await?;
        }
        if lane.is_none_or(|l| l == ConnectorRole::Mail)
            && let Err(e) = self.flush_outcomes().await
        {
            // Kept in memory for the next pass; delivery goes on.
            tracing::warn!(error = %e, "mail outcomes not stored yet; the stop rules judge them at the next pass");
        }
        Ok(run.stats)
    }

    /// Check and compose a run of mails, then store all their snapshots in one write: each
    /// mail in flight then waits for one commit (its finish), not two. A mail that cannot be
    /// prepared here (or a failed snapshot write) is left to [`Self::deliver_one`].
    async fn prepare_mails(&self, units: Vec<Unit>) -> Vec<(Unit, Option<Prepared>)> {
        // The contacts and consents of the whole chunk in two reads, not two per mail: each
        // read is a round trip to a store thread.
        let ids: Vec<String> = units
            .iter()
            .filter_map(|u| match u {
                Unit::One(item)
                    if matches!(item.work, StoredWork::Known(OutboxWork::Mail { .. })) =>
                {
                    Some(item.contact_id.clone())
                }
                _ => None,
            })
            .collect();
        let read = async {
            let contacts = self.store.contacts_by_ids(&ids).await?;
            let consents = self.store.consents_of_contacts(&ids).await?;
            Ok::<_, crate::store::StoreError>((contacts, consents))
        };
        let (contacts, consents) = match read.await {
            Ok((contacts, consents)) => (
                contacts
                    .into_iter()
                    .map(|c| (c.id.clone(), c))
                    .collect::<HashMap<_, _>>(),
                consents
                    .into_iter()
                    .map(|(contact, list, consent)| ((contact, list), consent))
                    .collect::<HashMap<_, _>>(),
            ),
            Err(e) => {
                // Each row goes the single-row way, which reads (and reports) on its own.
                tracing::warn!(error = %e, "mail rows not read together; reading each on its own");
                return units.into_iter().map(|u| (u, None)).collect();
            }
        };
        let mut out = Vec::with_capacity(units.len());
        for unit in units {
            let pre = match &unit {
                Unit::One(item) => {
                    // Cloned, not taken: a chunk may hold two mails of one contact.
                    let contact = contacts.get(&item.contact_id).cloned();
                    let consent = consents
                        .get(&(item.contact_id.clone(), item.list_id.clone()))
                        .cloned();
                    match contact {
                        Some(contact) => self.prepare_row(item, contact, consent).await,
                        None => None,
                    }
                }
                Unit::Batch { .. } => None,
            };
            out.push((unit, pre));
        }
        let snapshots: Vec<_> = out
            .iter()
            .filter_map(|(_, pre)| match pre {
                Some(Ok(p)) => Some(p.mail.composed.snapshot.clone()),
                _ => None,
            })
            .collect();
        // The transport's work ahead (SMTP: render and sign), side by side and while the
        // snapshots are written: none of it needs one of the places in flight.
        let transport = &self.connectors.mail;
        let readying = future::join_all(out.iter_mut().filter_map(|(_, pre)| match pre {
            Some(Ok(ready)) => Some(async move {
                let message = ready.mail.composed.message.clone();
                ready.mail.ready = Some(transport.prepare(message).await);
            }),
            _ => None,
        }));
        let stored = async {
            if snapshots.is_empty() {
                Ok(())
            } else {
                self.record_snapshots(snapshots).await
            }
        };
        let (_, stored) = tokio::join!(readying, stored);
        if let Err(e) = stored {
            tracing::warn!(error = %e, "mail snapshots not stored together; storing each before its mail");
            for (_, pre) in &mut out {
                if matches!(pre, Some(Ok(_))) {
                    *pre = None;
                }
            }
        }
        out
    }

    /// [`Self::prepare_mail`] for a mail row with its contact and consent as read for the
    /// chunk; `None` for anything else or on a store error (the row then goes the single-row
    /// way, which reports it).
    async fn prepare_row(
        &self,
        item: &OutboxItem,
        contact: crate::store::Contact,
        consent: Option<crate::consent::Consent>,
    ) -> Option<Prepared> {
        let StoredWork::Known(OutboxWork::Mail { token, mail, wave }) = &item.work else {
            return None;
        };
        let list = self.list(&item.list_id)?;
        match self
            .prepare_mail(item, &contact, consent, list, token, *mail, *wave)
            .await
        {
            Ok(Ok(mail)) => Some(Ok(ReadyMail { contact, mail })),
            Ok(Err(finish)) => Some(Err(finish)),
            Err(_) => None,
        }
    }

    /// Deliver one unit and finish its rows.
    async fn deliver_unit(&self, worker: &str, unit: Unit) -> EngineResult<Finishing> {
        self.deliver_unit_with(worker, unit, None).await
    }

    /// [`Self::deliver_unit`], with a mail row already prepared by [`Self::prepare_mails`].
    async fn deliver_unit_with(
        &self,
        worker: &str,
        unit: Unit,
        pre: Option<Prepared>,
    ) -> EngineResult<Finishing> {
        let connector = unit.connector();
        // Shutdown: hand back what is not started yet. Open circuit: do not call a dead
        // endpoint; the rows wait for the half-open probe (their attempts are not counted).
        let postpone = if self.circuits.is_stopping() {
            Some(Utc::now())
        } else {
            connector
                .and_then(|c| self.circuits.deny(c, std::time::Instant::now()))
                .map(|at| {
                    let wait = at.saturating_duration_since(std::time::Instant::now());
                    Utc::now()
                        + chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::seconds(30))
                })
        };
        let finishes = match (postpone, &unit) {
            (Some(at), _) => vec![Finish::Postpone { at }; unit.len()],
            (None, Unit::One(item)) => {
                let delivered = match pre {
                    Some(Ok(ready)) => match self.list(&item.list_id) {
                        Some(list) => self.send_mail(item, &ready.contact, list, ready.mail).await,
                        None => self.deliver_one(item).await,
                    },
                    Some(Err(finish)) => Ok(finish),
                    None => self.deliver_one(item).await,
                };
                vec![match delivered {
                    Ok(finish) => finish,
                    Err(e) => self.failure(item, ConnectorError::transient(e.to_string())),
                }]
            }
            (None, Unit::Batch { kind, items }) => self.deliver_batch(*kind, items).await,
        };
        if postpone.is_none()
            && let Some(c) = connector
        {
            // A probe that made no call (skipped rows, store error) is not a verdict.
            self.circuits.release(c);
        }
        let mut run = Finishing::default();
        let items = unit.into_items();
        for (item, finish) in items.iter().zip(&finishes) {
            note_finish(&mut run.stats, item, finish);
        }
        // The unit's rows in one commit, shared with whatever else finished meanwhile (mails
        // in flight side by side): one fsync, not one per row.
        let rows = items
            .iter()
            .zip(&finishes)
            .map(|(item, finish)| OutboxFinish {
                id: item.id,
                worker: worker.to_owned(),
                finish: finish.clone(),
            })
            .collect();
        self.finish_rows(rows).await?;
        for (item, finish) in items.iter().zip(&finishes) {
            // A removal or write-back that carried an erased contact's address was the last
            // copy; finishing scrubbed it, and no older copy may stay in the store's files.
            if !run.scrub
                && !matches!(finish, Finish::Retry { .. } | Finish::Postpone { .. })
                && carries_address(&item.work)
                && self
                    .store
                    .contact_by_id(&item.contact_id)
                    .await?
                    .is_some_and(|c| c.erased)
            {
                run.scrub = true;
            }
        }
        Ok(run)
    }

    async fn finish_rows(&self, rows: Vec<OutboxFinish>) -> EngineResult<()> {
        match &self.group_commit {
            Some(g) => g.finish(&*self.store, rows).await?,
            None => self.store.finish_outbox_batch(&rows, Utc::now()).await?,
        }
        Ok(())
    }

    /// Deliver one batch of campaigns subscribes or removals of one list: each row checked
    /// as on its own (a subscribe only while still confirmed), one connector call for the
    /// rest, and each row finished by its own result.
    async fn deliver_batch(&self, kind: BatchKind, items: &[OutboxItem]) -> Vec<Finish> {
        let done = |note: &str| Finish::Done {
            event: None,
            note: Some(note.to_owned()),
        };
        let mut finishes: Vec<Option<Finish>> = vec![None; items.len()];
        let Some(list) = items.first().and_then(|i| self.list(&i.list_id)) else {
            let error = format!(
                "list `{}` is no longer configured",
                items.first().map_or("", |i| i.list_id.as_str())
            );
            return vec![Finish::Dead { error }; items.len()];
        };
        let mut subscribers = Vec::new();
        let mut removals = Vec::new();
        let mut erasures = Vec::new();
        // Row indices of the items sent, per call: subscribes or removals, and erasures.
        let mut sent = Vec::new();
        let mut sent_erasures = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let prepared = match kind {
                BatchKind::Subscribe => self.subscriber_for(item, list).await.map(|s| {
                    s.map(|s| {
                        subscribers.push(Keyed::new(item.idempotency_key.clone(), s));
                        false
                    })
                }),
                BatchKind::Remove => self.removal_for(item).await.map(|e| {
                    e.map(|(email, erased)| {
                        let keyed = Keyed::new(item.idempotency_key.clone(), email);
                        if erased {
                            erasures.push(keyed);
                        } else {
                            removals.push(keyed);
                        }
                        erased
                    })
                }),
            };
            match prepared {
                Ok(Ok(false)) => sent.push(i),
                Ok(Ok(true)) => sent_erasures.push(i),
                Ok(Err(finish)) => finishes[i] = Some(finish),
                Err(e) => {
                    finishes[i] = Some(self.failure(item, ConnectorError::transient(e.to_string())))
                }
            }
        }
        let campaigns = &self.connectors.campaigns;
        let Some(_call) = self.calls.campaigns().await else {
            return vec![Finish::Postpone { at: Utc::now() }; items.len()];
        };
        if !sent_erasures.is_empty() {
            let answer = campaigns.erase(list.campaigns_list(), &erasures).await;
            self.finish_batch(items, &sent_erasures, answer, &mut finishes);
        }
        if !sent.is_empty() {
            metrics::histogram!("optinsync_outbox_batch_items", "kind" => kind.as_str())
                .record(sent.len() as f64);
            let answer = match kind {
                BatchKind::Subscribe => {
                    campaigns
                        .subscribe(list.campaigns_list(), &subscribers)
                        .await
                }
                BatchKind::Remove => campaigns.remove(list.campaigns_list(), &removals).await,
            };
            self.finish_batch(items, &sent, answer, &mut finishes);
        }
        finishes
            .into_iter()
            .map(|f| f.unwrap_or_else(|| done("skipped")))
            .collect()
    }

    /// Each sent row's finish from its item's result; one circuit verdict per call (alive if
    /// any item went through).
    fn finish_batch(
        &self,
        items: &[OutboxItem],
        sent: &[usize],
        answer: optinsync_plugin_api::BatchResult,
        finishes: &mut [Option<Finish>],
    ) {
        {
            let results = per_item(sent.len(), answer);
            let verdict = match results.iter().find(|r| r.is_ok()) {
                Some(_) => Ok(()),
                None => results.first().cloned().unwrap_or(Ok(())),
            };
            self.observe(ConnectorRole::Campaigns, &verdict);
            for (&i, result) in sent.iter().zip(results) {
                finishes[i] = Some(match result {
                    Ok(()) => Finish::Done {
                        event: None,
                        note: None,
                    },
                    Err(e) => self.failure(&items[i], e),
                });
            }
        }
    }

    /// The subscriber a subscribe row puts on the list, or how the row ends without a call.
    async fn subscriber_for(
        &self,
        item: &OutboxItem,
        list: &crate::config::ListConfig,
    ) -> EngineResult<Result<Subscriber, Finish>> {
        let Some(contact) = self.store.contact_by_id(&item.contact_id).await? else {
            return Ok(Err(skipped("skipped: contact no longer exists")));
        };
        // Invariant "only a confirmation subscribes", checked again at delivery: the
        // consent may have changed since.
        let consent = self.store.consent(&contact.id, &list.id).await?;
        if !consent.is_some_and(|c| c.state.on_list()) {
            return Ok(Err(skipped("skipped: no longer confirmed")));
        }
        let proof = self.consent_proof(&contact.id, &list.id).await?;
        Ok(Ok(Subscriber {
            email: contact.email,
            language: contact.language,
            fields: contact.fields,
            proof,
        }))
    }

    /// The confirmation the consent rests on, from the ledger: the last event that entered
    /// `confirmed` from another state, with its IP, and the last confirmation mail sent before
    /// it. `None` when the ledger holds no such event (a consent taken over from elsewhere).
    async fn consent_proof(
        &self,
        contact_id: &str,
        list_id: &str,
    ) -> EngineResult<Option<ConsentProof>> {
        let on_list = self.store.consent_events(contact_id, list_id).await?;
        let confirmed = ConsentState::Confirmed.as_str();
        let Some(at) = on_list
            .iter()
            .rposition(|e| e.to_state == confirmed && e.from_state != confirmed)
        else {
            return Ok(None);
        };
        let time = |text: &str| {
            chrono::DateTime::parse_from_rfc3339(text)
                .ok()
                .map(|t| t.with_timezone(&Utc))
        };
        let event = &on_list[at];
        let Some(confirmed_at) = time(&event.at) else {
            return Ok(None);
        };
        // Evidence redacted by erasure or retention reads as none.
        let confirmed_ip = serde_json::from_str::<crate::ledger::Evidence>(&event.evidence)
            .ok()
            .and_then(|e| e.ip);
        let requested_at = on_list[..at]
            .iter()
            .rev()
            .find(|e| e.kind.ends_with("_mail_sent"))
            .and_then(|e| time(&e.at));
        Ok(Some(ConsentProof {
            confirmed_at,
            confirmed_ip,
            requested_at,
        }))
    }

    /// The address a removal row takes off the list (carried by the row, so it outlives an
    /// erasure) and whether the contact was erased (the connector's `erase` then, not
    /// `remove`), or how the row ends without a call.
    async fn removal_for(&self, item: &OutboxItem) -> EngineResult<Result<(String, bool), Finish>> {
        let carried = match &item.work {
            StoredWork::Known(OutboxWork::CampaignsRemove { email }) => email.clone(),
            _ => None,
        };
        let contact = self.store.contact_by_id(&item.contact_id).await?;
        let erased = contact.as_ref().is_some_and(|c| c.erased);
        let email = carried.or(contact.map(|c| c.email));
        Ok(email.map(|e| (e, erased)).ok_or_else(|| Finish::Dead {
            error: "removal without an address".into(),
        }))
    }

    /// Mails a pass keeps in flight: [`MAIL_UNITS_PER_CALL`] per send the transport takes at
    /// once — the bound on duplicates after a crash.
    pub fn mail_units_in_flight(&self) -> usize {
        self.connectors
            .mail
            .concurrency()
            .max(1)
            .saturating_mul(MAIL_UNITS_PER_CALL)
    }

    /// Rows one pass of a lane claims (`None`: all lanes): at least 20, sixteen per mail the
    /// transport takes at once (four when all lanes share a pass) and four campaigns
    /// batches per call the campaigns connector takes at once (at most 2,000 rows, or four
    /// batches if those are larger), so that concurrent sends are not starved at each
    /// pass's tail (a claim is a store round trip) and a pass ends well within its lease.
    pub fn delivery_claim_size(&self, lane: Option<ConnectorRole>) -> i64 {
        let mails = self.mail_units_in_flight().saturating_mul(4);
        let campaigns = &self.connectors.campaigns;
        let four_batches = campaigns.max_batch().saturating_mul(4);
        let batches = four_batches
            .saturating_mul(campaigns.concurrency().max(1))
            .saturating_mul(CAMPAIGNS_UNITS_PER_CALL)
            .min(four_batches.max(2_000));
        let size = match lane {
            // Sixteen per mail in flight: the pass's snapshots share one write.
            Some(ConnectorRole::Mail) => mails.saturating_mul(4),
            Some(ConnectorRole::Campaigns) => batches,
            Some(ConnectorRole::Crm) => 20,
            None => mails.max(batches),
        };
        i64::try_from(size).unwrap_or(i64::MAX).max(20)
    }

    /// Deliver until nothing is due (used by `sync --once`).
    pub async fn drain_outbox(&self, worker: &str) -> EngineResult<DeliverStats> {
        let mut total = DeliverStats::default();
        loop {
            let s = self
                .deliver_due(worker, self.delivery_claim_size(None).max(50))
                .await?;
            if s == DeliverStats::default() {
                return Ok(total);
            }
            total.done += s.done;
            total.retried += s.retried;
            total.dead += s.dead;
            total.postponed += s.postponed;
        }
    }

    /// Feed a connector call's outcome to that connector's circuit breaker
    /// ([`crate::circuit::verdict`]): a service-wide transient failure without `Retry-After`
    /// counts against it; a throttle that names its wait (the endpoint is alive and pacing
    /// us) counts neither way; anything else, including a per-record "not now"
    /// ([`optinsync_plugin_api::FailureScope::Record`]), proves it alive. The record itself
    /// still retries with its own backoff ([`Self::failure`]).
    pub(crate) fn observe<T>(&self, connector: ConnectorRole, result: &Result<T, ConnectorError>) {
        match crate::circuit::verdict(result) {
            Verdict::Neutral => {
                // The vendor named a wait: a quota lock-out or a spent quota (the alert
                // `OptinsyncVendorQuotaLockout` watches this).
                metrics::counter!("optinsync_connector_paused_total", "connector" => connector.as_str())
                    .increment(1);
                self.circuits.release(connector)
            }
            Verdict::Failure => self.circuits.record(connector, true),
            Verdict::Alive => self.circuits.record(connector, false),
        }
    }

    pub(crate) fn failure(&self, item: &OutboxItem, error: ConnectorError) -> Finish {
        let sync = &self.config.config.sync;
        let max = sync.max_attempts;
        match error {
            // Either scope: a per-record failure retries this row (with backoff) like any other.
            ConnectorError::Transient {
                message,
                retry_after,
                ..
            } if item.attempts < max => {
                let wait = retry_after
                    .unwrap_or_else(|| {
                        backoff_with(sync.retry_base.0, sync.retry_cap.0, item.attempts)
                    })
                    .min(sync.retry_cap.0.max(Duration::from_secs(1)));
                let at = Utc::now()
                    + chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::hours(1));
                Finish::Retry { at, error: message }
            }
            other => Finish::Dead {
                error: format!("after {} attempt(s): {other}", item.attempts),
            },
        }
    }

    async fn deliver_one(&self, item: &OutboxItem) -> EngineResult<Finish> {
        let done = |note: &str| Finish::Done {
            event: None,
            note: Some(note.to_owned()),
        };
        let Some(list) = self.list(&item.list_id) else {
            return Ok(Finish::Dead {
                error: format!("list `{}` is no longer configured", item.list_id),
            });
        };
        let work = match &item.work {
            StoredWork::Known(work) => work,
            // Written by another version or damaged: say so, do not guess.
            StoredWork::Unreadable(u) => {
                return Ok(Finish::Dead {
                    error: u.to_string(),
                });
            }
        };
        let contact = self.store.contact_by_id(&item.contact_id).await?;
        let result = match work {
            OutboxWork::Mail { token, mail, wave } => {
                let Some(contact) = contact else {
                    return Ok(done("skipped: contact no longer exists"));
                };
                return self
                    .deliver_mail(item, &contact, list, token, *mail, *wave)
                    .await;
            }
            // Batched in `deliver_due`; one row at a time only when called directly.
            OutboxWork::CampaignsSubscribe {} => {
                return Ok(self
                    .deliver_batch(BatchKind::Subscribe, std::slice::from_ref(item))
                    .await
                    .pop()
                    .unwrap_or(done("skipped")));
            }
            OutboxWork::CampaignsRequestDoi { token } => {
                let Some(contact) = contact else {
                    return Ok(done("skipped: contact no longer exists"));
                };
                // Like a DOI mail: only while this signup still waits.
                let consent = self.store.consent(&contact.id, &list.id).await?;
                if !consent.is_some_and(|c| {
                    c.state == crate::consent::ConsentState::Pending
                        && c.signup_token.as_deref() == Some(token.as_str())
                }) {
                    return Ok(done("skipped: signup no longer waiting"));
                }
                let sub = Subscriber {
                    email: contact.email.clone(),
                    language: contact.language.clone(),
                    fields: contact.fields.clone(),
                    proof: None,
                };
                let Some(_call) = self.calls.campaigns().await else {
                    return Ok(Finish::Postpone { at: Utc::now() });
                };
                self.connectors
                    .campaigns
                    .request_doi(
                        list.campaigns_list(),
                        &Keyed::new(item.idempotency_key.clone(), sub),
                    )
                    .await
            }
            OutboxWork::CampaignsRemove { .. } => {
                return Ok(self
                    .deliver_batch(BatchKind::Remove, std::slice::from_ref(item))
                    .await
                    .pop()
                    .unwrap_or(done("skipped")));
            }
            OutboxWork::CrmWriteBack {
                state,
                opt_out,
                records: carried_records,
                email: carried_email,
            } => {
                let Some(contact) = contact else {
                    return Ok(done("skipped: contact no longer exists"));
                };
                // Write-backs can arrive out of order (opt-outs jump the queue; a retried
                // row waits out its backoff): one whose consent has moved on to another
                // state must not overwrite the newer state in the CRM.
                if let (Some(seq), Some(current)) = (
                    item.event_seq,
                    self.store.consent(&contact.id, &list.id).await?,
                ) && current.last_seq.is_some_and(|last| last > seq)
                    && state.is_some_and(|s| s != current.state)
                {
                    return Ok(done("skipped: superseded by a newer consent change"));
                }
                // An erasure's write-back carries the records and address it was queued with:
                // by now the contact holds neither.
                let records = carried_records
                    .clone()
                    .unwrap_or_else(|| contact.crm_records.clone());
                let wb = ConsentWriteBack {
                    key: item.idempotency_key.clone(),
                    records,
                    email: carried_email
                        .clone()
                        .unwrap_or_else(|| contact.email.clone()),
                    list: list.id.clone(),
                    // Rows queued before the payload named the state carry none.
                    state: state.unwrap_or(ConsentState::None),
                    opt_out: *opt_out,
                    at: Utc::now(),
                    ledger_seq: item.event_seq.unwrap_or(0),
                };
                self.connectors.crm.write_back(&wb).await
            }
            OutboxWork::PreferencesLinkMail {} => {
                let Some(contact) = contact.filter(|c| !c.erased) else {
                    return Ok(done("skipped: contact no longer exists"));
                };
                return self.deliver_preferences_link(item, &contact, list).await;
            }
            OutboxWork::CrmUpsert {} => {
                let Some(contact) = contact.filter(|c| !c.erased) else {
                    return Ok(done("skipped: contact no longer exists"));
                };
                self.upsert_in_crm(item, &contact, list).await?
            }
        };
        self.observe(work.connector(), &result);
        Ok(match result {
            Ok(()) => Finish::Done {
                event: None,
                note: None,
            },
            Err(e) => self.failure(item, e),
        })
    }

    async fn deliver_mail(
        &self,
        item: &OutboxItem,
        contact: &crate::store::Contact,
        list: &crate::config::ListConfig,
        token: &str,
        kind: MailKind,
        wave: bool,
    ) -> EngineResult<Finish> {
        let consent = self.store.consent(&contact.id, &list.id).await?;
        let prepared = match self
            .prepare_mail(item, contact, consent, list, token, kind, wave)
            .await?
        {
            Ok(p) => p,
            Err(finish) => return Ok(finish),
        };
        // The exact text goes into the store before it leaves, under the hash the ledger names.
        self.record_snapshot(&prepared.composed.snapshot).await?;
        self.send_mail(item, contact, list, prepared).await
    }

    /// Check that the signup still waits and compose its mail; `Err`: how the row ends
    /// without a mail.
    #[allow(clippy::too_many_arguments)]
    async fn prepare_mail(
        &self,
        item: &OutboxItem,
        contact: &crate::store::Contact,
        consent: Option<crate::consent::Consent>,
        list: &crate::config::ListConfig,
        token: &str,
        kind: MailKind,
        wave: bool,
    ) -> EngineResult<Result<PreparedMail, Finish>> {
        // A wave's mail waits while the list's waves are paused (the person's own never does).
        if wave && let Some(at) = self.wave_hold(list).await? {
            return Ok(Err(Finish::Postpone { at }));
        }
        // The signup may have been confirmed, withdrawn or replaced since the row was queued
        // (`consent` is read after the row was claimed).
        let Some(consent) = consent.filter(|c| {
            matches!(c.state, ConsentState::Pending | ConsentState::Revalidating)
                && c.signup_token.as_deref() == Some(token)
        }) else {
            return Ok(Err(Finish::Done {
                event: None,
                note: Some("skipped: signup no longer waiting".into()),
            }));
        };
        let letter = mail::Letter {
            kind,
            contact,
            list,
            signup_token: token,
            outbox_key: &item.idempotency_key,
            now: Utc::now(),
        };
        match mail::compose(&self.config, &self.tokens, &letter) {
            Ok(composed) => Ok(Ok(PreparedMail {
                kind,
                token: token.to_owned(),
                state: consent.state,
                composed,
                ready: None,
            })),
            Err(e) => {
                tracing::error!(contact_id = %contact.id, list = %list.id, error = %e, "confirmation mail cannot be rendered");
                Ok(Err(
                    self.failure(item, ConnectorError::permanent(e.to_string()))
                ))
            }
        }
    }

    /// Send a prepared mail (its snapshot already stored) and say how the row ends.
    async fn send_mail(
        &self,
        item: &OutboxItem,
        contact: &crate::store::Contact,
        list: &crate::config::ListConfig,
        prepared: PreparedMail,
    ) -> EngineResult<Finish> {
        let PreparedMail {
            kind,
            token,
            state,
            composed,
            ready,
        } = prepared;
        let sent = {
            let Some(_call) = self.calls.mail().await else {
                return Ok(Finish::Postpone { at: Utc::now() });
            };
            let transport = &self.connectors.mail;
            match ready {
                Some(Ok(ready)) => transport.send_ready(&ready).await,
                Some(Err(e)) => Err(e),
                None => transport.send(&composed.message).await,
            }
        };
        self.observe(ConnectorRole::Mail, &sent);
        match sent {
            Ok(sent) => {
                let event = NewEvent {
                    // Time-ordered like every event id (the unique index appends).
                    event_id: uuid::Uuid::now_v7().to_string(),
                    at: Utc::now(),
                    contact_id: contact.id.clone(),
                    list_id: list.id.clone(),
                    kind: format!("{}_mail_sent", kind.as_str()),
                    from_state: state,
                    to_state: state,
                    source: EventSource::Outbox,
                    evidence: Evidence {
                        token_id: Some(token),
                        message_id: Some(sent.message_id),
                        content_hash: Some(composed.content_hash),
                        unsubscribe_token_id: Some(composed.unsubscribe_token_id),
                        preferences_token_id: Some(composed.preferences_token_id),
                        key_id: Some(self.tokens.current_key_id().to_owned()),
                        detail: sent
                            .deduplicated
                            .then(|| "transport had already accepted this message".to_owned()),
                        ..Evidence::default()
                    },
                };
                tracing::info!(contact_id = %contact.id, list = %list.id, mail = kind.as_str(), "confirmation mail sent");
                self.count_outcome(list, Outcome::Sent);
                Ok(Finish::Done {
                    event: Some(Box::new(event)),
                    note: None,
                })
            }
            Err(ConnectorError::Rejected { message, class }) => {
                self.count_outcome(list, Outcome::Bounce(class));
                match class {
                    // The receiving side refused the address for good: a hard bounce.
                    BounceClass::Hard => {
                        let evidence = Evidence {
                            detail: Some(format!("hard bounce: {message}")),
                            ..Evidence::default()
                        };
                        self.apply(contact, list, Input::Bounce, EventSource::Mail, evidence)
                            .await?;
                        Ok(Finish::Dead {
                            error: format!("address rejected: {message}"),
                        })
                    }
                    // A full mailbox: counted towards the soft-bounce limit, not retried
                    // (the rules' reminder is the next try).
                    BounceClass::Soft => {
                        if self
                            .soft_bounce(contact, list, &message, EventSource::Mail)
                            .await?
                        {
                            Ok(Finish::Dead {
                                error: format!(
                                    "address rejected: soft-bounce limit reached: {message}"
                                ),
                            })
                        } else {
                            Ok(Finish::Done {
                                event: None,
                                note: Some(format!("soft bounce recorded: {message}")),
                            })
                        }
                    }
                    // The receiving side refuses the sender: never the person's fault. The
                    // row tries again later (the stop rules pause the waves meanwhile).
                    BounceClass::Policy => {
                        tracing::warn!(contact_id = %contact.id, list = %list.id, reply = %Escaped(&message), "the receiving side refused the mail for policy reasons (spam block or reputation)");
                        let wait = (list.sending.day() / 24).max(std::time::Duration::from_secs(1));
                        Ok(self.failure(
                            item,
                            ConnectorError::Transient {
                                message: format!("policy refusal: {message}"),
                                retry_after: Some(wait),
                                scope: optinsync_plugin_api::FailureScope::Record,
                            },
                        ))
                    }
                }
            }
            Err(e) => Ok(self.failure(item, e)),
        }
    }
}

/// A mail row checked and composed ahead of its send, or how it ends without one.
type Prepared = Result<ReadyMail, Finish>;

/// A prepared mail and the contact it goes to.
struct ReadyMail {
    contact: crate::store::Contact,
    mail: PreparedMail,
}

/// A mail composed and checked, ready to send once its snapshot is stored.
struct PreparedMail {
    kind: MailKind,
    token: String,
    /// The consent's state when checked (the event's from and to).
    state: ConsentState,
    composed: mail::Composed,
    /// The transport's [`optinsync_plugin_api::MailTransport::prepare`] of the message, when
    /// the pass made it ahead (`None`: sent with `send`).
    ready: Option<optinsync_plugin_api::ConnectorResult<optinsync_plugin_api::ReadyMessage>>,
}

/// Count and log how one row ended.
fn note_finish(stats: &mut DeliverStats, item: &OutboxItem, finish: &Finish) {
    metrics::counter!("optinsync_outbox_delivery_total", "kind" => item.work.known().map_or("other", OutboxWork::kind), "result" => result_label(finish))
        .increment(1);
    match finish {
        Finish::Postpone { .. } => stats.postponed += 1,
        Finish::Done { .. } => stats.done += 1,
        // `?`: the error text may quote a vendor's answer; Debug escapes it.
        Finish::Retry { error, .. } => {
            tracing::warn!(outbox_id = item.id, kind = %Escaped(item.kind()), attempts = item.attempts, ?error, "delivery failed; will retry");
            stats.retried += 1;
        }
        Finish::Dead { error } => {
            tracing::error!(outbox_id = item.id, kind = %Escaped(item.kind()), attempts = item.attempts, ?error, "delivery failed permanently; dead letter");
            stats.dead += 1;
        }
    }
}

fn skipped(note: &str) -> Finish {
    Finish::Done {
        event: None,
        note: Some(note.to_owned()),
    }
}

/// Mails in flight per send the transport takes at once: one being sent while another, sent
/// already, waits for the commit that records it. Each unit in flight when the process dies
/// may be sent again after the restart: at most `2 × concurrency` duplicates per crash, each
/// with the same Message-ID and one ledger record.
pub const MAIL_UNITS_PER_CALL: usize = 2;
/// Campaigns batches in flight per call the connector takes at once (repeats after a crash
/// are harmless: the calls are idempotent by key).
pub const CAMPAIGNS_UNITS_PER_CALL: usize = 4;

/// What a `deliver_due` pass (or one unit of it) finished.
#[derive(Debug, Default)]
struct Finishing {
    stats: DeliverStats,
    /// An erased contact's last address copy was finished: scrub the store's files after.
    scrub: bool,
}

impl Finishing {
    fn add(&mut self, unit: EngineResult<Finishing>) -> EngineResult<()> {
        let unit = unit?;
        self.stats.done += unit.stats.done;
        self.stats.retried += unit.stats.retried;
        self.stats.dead += unit.stats.dead;
        self.stats.postponed += unit.stats.postponed;
        self.scrub |= unit.scrub;
        Ok(())
    }
}

/// Outbox work the campaigns connector takes in batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BatchKind {
    Subscribe,
    Remove,
}

impl BatchKind {
    fn of(item: &OutboxItem) -> Option<Self> {
        match item.work.known()? {
            OutboxWork::CampaignsSubscribe {} => Some(Self::Subscribe),
            OutboxWork::CampaignsRemove { .. } => Some(Self::Remove),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Subscribe => "campaigns_subscribe",
            Self::Remove => "campaigns_remove",
        }
    }
}

/// What one connector call delivers: a row, or a batch of rows of one kind and list.
#[derive(Debug)]
enum Unit {
    One(Box<OutboxItem>),
    Batch {
        kind: BatchKind,
        items: Vec<OutboxItem>,
    },
}

impl Unit {
    fn connector(&self) -> Option<ConnectorRole> {
        match self {
            Unit::One(item) => item.work.known().map(OutboxWork::connector),
            Unit::Batch { .. } => Some(ConnectorRole::Campaigns),
        }
    }

    fn len(&self) -> usize {
        match self {
            Unit::One(_) => 1,
            Unit::Batch { items, .. } => items.len(),
        }
    }

    fn items(&self) -> &[OutboxItem] {
        match self {
            Unit::One(item) => std::slice::from_ref(item),
            Unit::Batch { items, .. } => items,
        }
    }

    fn into_items(self) -> Vec<OutboxItem> {
        match self {
            Unit::One(item) => vec![*item],
            Unit::Batch { items, .. } => items,
        }
    }
}

/// Group claimed rows into delivery units: subscribes and removals by (kind, list) up to
/// `max_batch` rows each, placed where their first row was claimed, so legal-deadline rows
/// (claimed first) still go first. A row joins an open batch only if no later unit holds a
/// campaigns row of the same contact: one contact's campaigns rows keep their claim order (a
/// removal claimed after a subscribe is not carried ahead of it, nor the other way round).
fn units(items: Vec<OutboxItem>, max_batch: usize) -> Vec<Unit> {
    let max_batch = max_batch.max(1);
    let mut units: Vec<Unit> = Vec::new();
    let mut open: Vec<(BatchKind, String, usize)> = Vec::new();
    // Contact → the last unit holding one of its campaigns rows.
    let mut last_unit: HashMap<String, usize> = HashMap::new();
    for item in items {
        let contact = item.contact_id.clone();
        let Some(kind) = BatchKind::of(&item) else {
            // Only the campaigns connector's rows are ordered against each other here: the
            // connectors' work goes side by side.
            if item.work.known().map(OutboxWork::connector) == Some(ConnectorRole::Campaigns) {
                last_unit.insert(contact, units.len());
            }
            units.push(Unit::One(Box::new(item)));
            continue;
        };
        let earliest = last_unit.get(&contact).copied().unwrap_or(0);
        let slot = open
            .iter()
            .find(|(k, l, u)| {
                *k == kind
                    && *l == item.list_id
                    && *u >= earliest
                    && matches!(&units[*u], Unit::Batch { items, .. } if items.len() < max_batch)
            })
            .map(|(_, _, u)| *u);
        match slot {
            Some(u) => {
                last_unit.insert(contact, u);
                if let Unit::Batch { items, .. } = &mut units[u] {
                    items.push(item);
                }
            }
            None => {
                open.push((kind, item.list_id.clone(), units.len()));
                last_unit.insert(contact, units.len());
                units.push(Unit::Batch {
                    kind,
                    items: vec![item],
                });
            }
        }
    }
    units
}

/// Drive every delivery of `outcomes` to its finish, adding each to `run`, and return the
/// first error: dropping one half-way could leave a sent mail unrecorded.
async fn finish_all(
    outcomes: impl futures_util::Stream<Item = EngineResult<Finishing>>,
    run: &mut Finishing,
) -> Option<crate::engine::EngineError> {
    let mut outcomes = std::pin::pin!(outcomes);
    let mut first_error = None;
    while let Some(outcome) = outcomes.next().await {
        if let Err(e) = run.add(outcome) {
            first_error.get_or_insert(e);
        }
    }
    first_error
}

/// Split campaigns units (in order) into runs that may go side by side: consecutive units of
/// pairwise different contacts. A unit sharing a contact with the run so far starts the next
/// run, so one contact's rows are delivered in claim order.
fn side_by_side(units: Vec<Unit>) -> Vec<Vec<Unit>> {
    let mut runs: Vec<Vec<Unit>> = Vec::new();
    let mut contacts: HashSet<String> = HashSet::new();
    for unit in units {
        let ids: Vec<&str> = unit.items().iter().map(|i| i.contact_id.as_str()).collect();
        let joins = ids.iter().all(|id| !contacts.contains(*id));
        if !joins {
            contacts.clear();
        }
        contacts.extend(ids.into_iter().map(str::to_owned));
        match runs.last_mut() {
            Some(run) if joins => run.push(unit),
            _ => runs.push(vec![unit]),
        }
    }
    runs
}

/// Whether a row carries an address of its own (a removal, an erasure's write-back): once
/// finished, that was the last copy of an erased contact's address.
fn carries_address(work: &StoredWork) -> bool {
    match work {
        StoredWork::Known(OutboxWork::CampaignsRemove { email })
        | StoredWork::Known(OutboxWork::CrmWriteBack { email, .. }) => email.is_some(),
        StoredWork::Known(_) => false,
        // Unknown shape: scrub to be safe.
        StoredWork::Unreadable(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: i64, contact: &str, work: OutboxWork) -> OutboxItem {
        OutboxItem {
            id,
            work: StoredWork::Known(work),
            priority: 0,
            idempotency_key: format!("k{id}"),
            contact_id: contact.to_owned(),
            list_id: "news".to_owned(),
            attempts: 1,
            status: "pending".to_owned(),
            last_error: None,
            event_seq: None,
        }
    }

    fn subscribe(id: i64, contact: &str) -> OutboxItem {
        row(id, contact, OutboxWork::CampaignsSubscribe {})
    }

    fn remove(id: i64, contact: &str) -> OutboxItem {
        row(id, contact, OutboxWork::CampaignsRemove { email: None })
    }

    fn ids(units: &[Unit]) -> Vec<Vec<i64>> {
        units
            .iter()
            .map(|u| u.items().iter().map(|i| i.id).collect())
            .collect()
    }

    /// A contact's removal claimed after its subscribe is not carried into the removal batch
    /// opened before that subscribe (which would take it off the list, then put it back on).
    #[test]
    fn one_contacts_rows_keep_their_claim_order_across_batches() {
        let claimed = vec![
            remove(1, "y"),
            subscribe(2, "x"),
            remove(3, "x"),
            remove(4, "z"),
            subscribe(5, "w"),
        ];
        assert_eq!(ids(&units(claimed, 10)), [vec![1, 4], vec![2, 5], vec![3]]);
        // The other way round too: a subscribe after a removal waits behind it.
        let claimed = vec![subscribe(1, "y"), remove(2, "x"), subscribe(3, "x")];
        assert_eq!(ids(&units(claimed, 10)), [vec![1], vec![2], vec![3]]);
        // Without a shared contact, rows still fill the first open batch of their kind.
        let claimed = vec![subscribe(1, "a"), remove(2, "b"), subscribe(3, "c")];
        assert_eq!(ids(&units(claimed, 10)), [vec![1, 3], vec![2]]);
        // Another connector's row of the same contact does not split a batch.
        let mail = OutboxWork::Mail {
            token: "t".to_owned(),
            mail: MailKind::Doi,
            wave: false,
        };
        let claimed = vec![subscribe(1, "a"), row(2, "b", mail), subscribe(3, "b")];
        assert_eq!(ids(&units(claimed, 10)), [vec![1, 3], vec![2]]);
    }

    /// Campaigns units of different contacts form one run; a shared contact ends it, so
    /// nothing of one contact overtakes its earlier rows.
    #[test]
    fn side_by_side_runs_never_hold_one_contact_twice() {
        let claimed = vec![
            subscribe(1, "a"),
            remove(2, "b"),
            subscribe(3, "c"),
            remove(4, "c"),
            subscribe(5, "d"),
            remove(6, "a"),
        ];
        let runs = side_by_side(units(claimed, 1));
        let runs: Vec<Vec<Vec<i64>>> = runs.iter().map(|r| ids(r)).collect();
        assert_eq!(
            runs,
            [
                vec![vec![1], vec![2], vec![3]],
                vec![vec![4], vec![5], vec![6]],
            ]
        );
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert!(backoff(1) <= Duration::from_secs(6));
        assert!(backoff(4) >= Duration::from_secs(32));
        assert!(
            backoff(50) <= Duration::from_secs(3600),
            "the cap holds after jitter"
        );
    }

    #[test]
    fn backoff_has_jitter_and_respects_a_configured_cap() {
        let base = Duration::from_secs(1);
        let cap = Duration::from_secs(10);
        let samples: Vec<Duration> = (0..50).map(|_| backoff_with(base, cap, 2)).collect();
        assert!(
            samples
                .iter()
                .all(|d| *d >= Duration::from_millis(1600) && *d <= Duration::from_millis(2400))
        );
        let distinct: std::collections::BTreeSet<u128> =
            samples.iter().map(Duration::as_micros).collect();
        assert!(distinct.len() > 1, "jittered: {distinct:?}");
        assert!((0..50).all(|_| backoff_with(base, cap, 30) <= cap));
        assert!(backoff_with(base, cap, 30) >= Duration::from_secs(8));
    }
}
