//! The SQL both backends share. One body, instantiated per backend by [`shared_store_impl!`],
//! so SQLite and PostgreSQL cannot drift apart; only locking and claiming differ.
//!
//! Why one long file: the body is one macro invocation per backend, and keeping every query
//! of the store in one place is what lets a reviewer see that the backends run the same SQL.
//!
//! All timestamps are stored as fixed-width RFC 3339 UTC text (microseconds), which sorts
//! correctly as text in both databases and hashes reproducibly in the ledger.

/// Generates `impl Store for $store` where `$store` has `pool: sqlx::Pool<$db>` (writes) and
/// `reader: sqlx::Pool<$db>` (plain reads), and the inherent `async fn run_migrations(&self)`,
/// `async fn clear_old_copies(&self)` (after an erasure: no old copy of its rows left in the
/// backend's own files, where it can say so) and the three reads a link request makes, whose
/// path differs per backend (`sqlite.rs` says why): `async fn link_read(&self, contact_id,
/// list_id)`
/// ([`Store::contact_with_consent`](crate::store::Store::contact_with_consent)),
/// `events_read(&self, contact_id, list)` ([`Store::events_of_contact`](crate::store::Store::events_of_contact),
/// or with a list [`Store::consent_events`](crate::store::Store::consent_events))
/// and `suppressions_read(&self, hashes)`
/// ([`Store::suppressions_of`](crate::store::Store::suppressions_of): one `IN` list of at most
/// `IN_CHUNK` hashes, never empty; rows in any order), and `contacts_page_read(&self, after,
/// limit)` ([`Store::contacts_page`](crate::store::Store::contacts_page), the page read of the
/// rules passes and `rules simulate`) and `consents_read(&self, contact_ids)` (one `IN` list
/// of [`Store::consents_of_contacts`](crate::store::Store::consents_of_contacts), at most
/// `IN_CHUNK` ids, never empty). Their SQL and row readers are shared
/// ([`super::rows`]).
///
/// - `$row`: the backend's row type (named, not projected from `$db`, so that the row readers
///   of [`super::rows`] can be implemented for it beside rusqlite's).
/// - `begin`: how a ledger-appending transaction begins (`BEGIN IMMEDIATE` on SQLite: another
///   process on the file, a CLI command beside the daemon, would otherwise make the read of
///   the chain's head and then fail to upgrade to a writer with `SQLITE_BUSY` at once
///   instead of waiting its turn).
/// - `lock`: SQL run first in every ledger-appending transaction to serialise appends (empty:
///   none needed).
/// - `for_update`: suffix that locks a selected row for the transaction (`FOR UPDATE` on
///   PostgreSQL, where concurrent upserts of one contact would otherwise lose merges).
/// - `skip_locked`: suffix for the outbox claim sub-select (`FOR UPDATE SKIP LOCKED` on
///   PostgreSQL so several instances never claim the same row).
macro_rules! shared_store_impl {
    ($store:ty, $db:ty, $row:ty, begin = $begin:literal, lock = $lock:literal, for_update = $for_update:literal, skip_locked = $skip:literal) => {
        use std::collections::BTreeMap;

        use async_trait::async_trait;
        use chrono::{DateTime, Utc};
        use sqlx::Row as _;

        use crate::consent::Consent;
        use crate::ledger::{format_time, LedgerEvent, NewEvent, GENESIS_HASH};
        use crate::store::codec::{parse_json, parse_state, to_json};
        use crate::store::rows::{
            consent_from, contact_from, event_from, parse_time, suppressed_from, CONSENT_COLS, CONTACT_COLS, LEDGER_COLS,
        };
        use crate::store::{
            Commit, Contact, ContactUpsert, Finish, OutboxCounts, OutboxItem, Store, StoreError, StoreResult,
            StoredWork,
        };

        type Row = $row;
        type Tx<'a> = sqlx::Transaction<'a, $db>;

        const OUTBOX_COLS: &str =
            "id, kind, priority, idempotency_key, contact_id, list_id, payload, attempts, status, last_error, event_seq";

        /// The stored form of CRM records: a JSON array of their `Module/id` texts.
        fn records_json<'a>(refs: impl IntoIterator<Item = &'a optinsync_plugin_api::RecordRef>) -> String {
            to_json(&refs.into_iter().map(ToString::to_string).collect::<Vec<_>>())
        }

        impl crate::store::rows::Columns for Row {
            fn text(&self, col: &str) -> StoreResult<String> {
                Ok(self.try_get(col)?)
            }
            fn text_opt(&self, col: &str) -> StoreResult<Option<String>> {
                Ok(self.try_get(col)?)
            }
            fn int32(&self, col: &str) -> StoreResult<i32> {
                Ok(self.try_get(col)?)
            }
            fn int64(&self, col: &str) -> StoreResult<i64> {
                Ok(self.try_get(col)?)
            }
            fn flag(&self, col: &str) -> StoreResult<bool> {
                Ok(self.try_get(col)?)
            }
        }

        fn day_count_from(row: &Row) -> StoreResult<crate::store::DayCount> {
            Ok(crate::store::DayCount {
                list_id: row.try_get("list_id")?,
                day: row.try_get("day")?,
                kind: row.try_get("kind")?,
                count: row.try_get("n")?,
            })
        }

        fn outbox_from(row: &Row) -> StoreResult<OutboxItem> {
            Ok(OutboxItem {
                id: row.try_get("id")?,
                // An unknown kind or a payload of another shape is not a corrupt store: the
                // row becomes a dead letter saying why (see `crate::work`).
                work: StoredWork::read(&row.try_get::<String, _>("kind")?, &row.try_get::<String, _>("payload")?),
                priority: row.try_get("priority")?,
                idempotency_key: row.try_get("idempotency_key")?,
                contact_id: row.try_get("contact_id")?,
                list_id: row.try_get("list_id")?,
                attempts: row.try_get("attempts")?,
                status: row.try_get("status")?,
                last_error: row.try_get("last_error")?,
                event_seq: row.try_get("event_seq")?,
            })
        }

        /// Ids per `IN (...)` list: well under both backends' bind-parameter limits.
        const IN_CHUNK: usize = 1000;
        /// Rows per multi-row INSERT (at most 13 columns: < 32,766 SQLite parameters).
        const ROW_CHUNK: usize = 1000;

        fn push_in<'a>(qb: &mut sqlx::QueryBuilder<'a, $db>, ids: &'a [String]) {
            qb.push("(");
            let mut sep = qb.separated(", ");
            for id in ids {
                sep.push_bind(id.as_str());
            }
            sep.push_unseparated(")");
        }

        /// Merge what a CRM record says into a stored contact; `true` if anything changed.
        /// Several CRM records may carry one address: keep every record id, and the newest
        /// values for the fields they carry.
        fn merge_upsert(contact: &mut Contact, c: &ContactUpsert, now: DateTime<Utc>) -> bool {
            let mut changed = false;
            if let Some(rec) = &c.crm_record {
                if !contact.crm_records.contains(rec) {
                    contact.crm_records.push(rec.clone());
                    // In the order of their texts, as they were kept when they were strings.
                    contact.crm_records.sort_by_cached_key(ToString::to_string);
                    changed = true;
                }
            }
            if c.language.is_some() && c.language != contact.language {
                contact.language = c.language.clone();
                changed = true;
            }
            if c.fields.iter().any(|(k, v)| contact.fields.get(k) != Some(v)) {
                contact.fields.extend(c.fields.clone());
                changed = true;
            }
            if changed {
                contact.updated_at = now;
            }
            changed
        }

        /// Take the ledger's append lock for this transaction (nothing to take where `$lock`
        /// is empty: SQLite's one writer connection is the lock, and an empty statement would
        /// still cost a round trip to the connection's thread).
        async fn append_lock(tx: &mut Tx<'_>) -> StoreResult<()> {
            if !$lock.is_empty() {
                sqlx::query($lock).execute(&mut **tx).await?;
            }
            Ok(())
        }

        /// Begin a transaction that appends to the ledger, holding the append lock from its
        /// first statement.
        async fn begin_append(pool: &sqlx::Pool<$db>) -> StoreResult<Tx<'static>> {
            let mut tx = pool.begin_with($begin).await?;
            append_lock(&mut tx).await?;
            Ok(tx)
        }

        /// The seq and hash at the head of the chain (0 and the genesis hash when empty). The
        /// caller holds the append lock.
        async fn chain_head(tx: &mut Tx<'_>) -> StoreResult<(i64, String)> {
            let head = sqlx::query("SELECT seq, hash FROM ledger ORDER BY seq DESC LIMIT 1")
                .fetch_optional(&mut **tx)
                .await?;
            Ok(match head {
                Some(r) => (r.try_get::<i64, _>("seq")?, r.try_get::<String, _>("hash")?),
                None => (0, GENESIS_HASH.to_owned()),
            })
        }

        /// Insert sealed events with multi-row statements. The caller holds the append lock.
        /// Queue outbox rows, each for the event that caused it (an idempotency key seen before
        /// is ignored).
        async fn insert_outbox(
            tx: &mut Tx<'_>,
            outbox: &[(&crate::store::NewOutbox, &LedgerEvent)],
        ) -> StoreResult<()> {
            for chunk in outbox.chunks(ROW_CHUNK) {
                let mut qb = sqlx::QueryBuilder::<$db>::new(
                    "INSERT INTO outbox (kind, priority, idempotency_key, contact_id, list_id, payload, event_seq, next_attempt_at, created_at) ",
                );
                qb.push_values(chunk, |mut b, (o, ev)| {
                    let (kind, payload) = o.work.to_stored();
                    b.push_bind(kind)
                        .push_bind(o.priority)
                        .push_bind(&o.idempotency_key)
                        .push_bind(&o.contact_id)
                        .push_bind(&o.list_id)
                        .push_bind(to_json(&payload))
                        .push_bind(ev.seq)
                        .push_bind(&ev.at)
                        .push_bind(&ev.at);
                });
                qb.push(" ON CONFLICT (idempotency_key) DO NOTHING");
                qb.build().execute(&mut **tx).await?;
            }
            Ok(())
        }

        /// Seal `events` after the chain's head and insert them; the caller holds the
        /// append lock.
        async fn seal_and_insert<E: std::borrow::Borrow<NewEvent>>(
            tx: &mut Tx<'_>,
            events: &[E],
        ) -> StoreResult<Vec<LedgerEvent>> {
            if events.is_empty() {
                return Ok(Vec::new());
            }
            let (mut seq, mut prev) = chain_head(tx).await?;
            let mut sealed = Vec::with_capacity(events.len());
            for e in events {
                seq += 1;
                let ev = e.borrow().seal(seq, &prev);
                prev = ev.hash.clone();
                sealed.push(ev);
            }
            insert_events(tx, &sealed.iter().collect::<Vec<_>>()).await?;
            Ok(sealed)
        }

        async fn insert_events(tx: &mut Tx<'_>, sealed: &[&LedgerEvent]) -> StoreResult<()> {
            for chunk in sealed.chunks(ROW_CHUNK / 2) {
                let mut qb = sqlx::QueryBuilder::<$db>::new(
                    "INSERT INTO ledger (seq, event_id, at, contact_id, list_id, kind, from_state, to_state, source, evidence, prev_hash, hash, evidence_sha256) ",
                );
                qb.push_values(chunk, |mut b, ev| {
                    b.push_bind(ev.seq)
                        .push_bind(&ev.event_id)
                        .push_bind(&ev.at)
                        .push_bind(&ev.contact_id)
                        .push_bind(&ev.list_id)
                        .push_bind(&ev.kind)
                        .push_bind(&ev.from_state)
                        .push_bind(&ev.to_state)
                        .push_bind(&ev.source)
                        .push_bind(&ev.evidence)
                        .push_bind(&ev.prev_hash)
                        .push_bind(&ev.hash)
                        .push_bind(&ev.evidence_sha256);
                });
                qb.build().execute(&mut **tx).await?;
            }
            Ok(())
        }

        /// Append one event at the head of the chain. The caller holds the append lock.
        async fn append_locked(tx: &mut Tx<'_>, e: &NewEvent) -> StoreResult<LedgerEvent> {
            let (seq, prev) = chain_head(tx).await?;
            let ev = e.seal(seq + 1, &prev);
            insert_events(tx, &[&ev]).await?;
            Ok(ev)
        }

        /// The outbox columns a finish sets: status, next attempt, error, note, done time;
        /// `ts` is the finish's time as stored.
        fn finish_columns(
            finish: &Finish,
            ts: &str,
        ) -> (&'static str, String, Option<String>, Option<String>, Option<String>) {
            let (status, next, error, note) = match finish {
                Finish::Done { note, .. } => ("done", ts.to_owned(), None, note.clone()),
                Finish::Retry { at, error } => ("pending", format_time(*at), Some(error.clone()), None),
                Finish::Dead { error } => ("dead", ts.to_owned(), Some(error.clone()), None),
                Finish::Postpone { at } => ("pending", format_time(*at), None, None),
            };
            let done_at = (status != "pending").then(|| ts.to_owned());
            (status, next, error, note, done_at)
        }

        /// Record how one claimed outbox row ended, inside `tx`; `locked`: whether `tx` already
        /// holds the ledger's append lock (taken before the first event).
        async fn finish_row(
            tx: &mut Tx<'_>,
            id: i64,
            worker: &str,
            finish: &Finish,
            now: DateTime<Utc>,
            locked: &mut bool,
        ) -> StoreResult<()> {
            if let Finish::Postpone { at } = finish {
                sqlx::query(
                    "UPDATE outbox SET next_attempt_at = $1, attempts = attempts - 1, claimed_by = NULL, \
                     claimed_until = NULL WHERE id = $2 AND claimed_by = $3 AND status = 'pending'",
                )
                .bind(format_time(*at))
                .bind(id)
                .bind(worker)
                .execute(&mut **tx)
                .await?;
                return Ok(());
            }
            let (status, next, error, note, done_at) = finish_columns(finish, &format_time(now));
            let updated = sqlx::query(
                // A finished row of an erased contact keeps no address (the removal it
                // carried is done), and no vendor error text, which may quote it.
                "UPDATE outbox SET status = $1, next_attempt_at = $2, note = $4, done_at = $5, \
                 last_error = CASE WHEN $3 IS NOT NULL AND EXISTS (SELECT 1 FROM contacts c \
                 WHERE c.id = outbox.contact_id AND c.erased) THEN 'error text withheld: the contact is erased' \
                 ELSE $3 END, \
                 claimed_by = NULL, claimed_until = NULL, \
                 payload = CASE WHEN $1 <> 'pending' AND EXISTS (SELECT 1 FROM contacts c WHERE c.id = outbox.contact_id \
                 AND c.erased) THEN '{}' ELSE payload END \
                 WHERE id = $6 AND claimed_by = $7 AND status = 'pending'",
            )
            .bind(status)
            .bind(next)
            .bind(error)
            .bind(note)
            .bind(done_at)
            .bind(id)
            .bind(worker)
            .execute(&mut **tx)
            .await?
            .rows_affected();
            if updated == 0 {
                // Our lease ran out and another worker owns the row now; it will record
                // the result. Writing the event here would record it twice.
                tracing::warn!(outbox_id = id, worker, "outbox lease lost; result not recorded");
                return Ok(());
            }
            if let Finish::Done { event: Some(e), .. } = finish {
                if !*locked {
                    append_lock(tx).await?;
                    *locked = true;
                }
                append_locked(tx, e).await?;
            }
            Ok(())
        }

        #[async_trait]
        impl Store for $store {
            async fn migrate(&self) -> StoreResult<()> {
                self.run_migrations().await
            }

            async fn upsert_contact(&self, c: &ContactUpsert, now: DateTime<Utc>) -> StoreResult<Contact> {
                let mut tx = self.pool.begin().await?;
                // Stored precision is microseconds; return exactly what is stored.
                let now = parse_time("contacts", &format_time(now))?;
                let ts = format_time(now);
                sqlx::query(
                    "INSERT INTO contacts (id, email, language, fields, crm_records, created_at, updated_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (email) DO NOTHING",
                )
                .bind(uuid::Uuid::now_v7().to_string())
                .bind(&c.email)
                .bind(&c.language)
                .bind(to_json(&c.fields))
                .bind(records_json(&c.crm_record))
                .bind(&ts)
                .bind(&ts)
                .execute(&mut *tx)
                .await?;
                let row = sqlx::query(&format!("SELECT {CONTACT_COLS} FROM contacts WHERE email = $1 {}", $for_update))
                    .bind(&c.email)
                    .fetch_one(&mut *tx)
                    .await?;
                let mut contact = contact_from(&row)?;
                let changed = merge_upsert(&mut contact, c, now);
                if changed {
                    sqlx::query(
                        "UPDATE contacts SET language = $1, fields = $2, crm_records = $3, updated_at = $4 WHERE id = $5",
                    )
                    .bind(&contact.language)
                    .bind(to_json(&contact.fields))
                    .bind(records_json(&contact.crm_records))
                    .bind(&ts)
                    .bind(&contact.id)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                Ok(contact)
            }

            async fn contact_by_email(&self, email: &str) -> StoreResult<Option<Contact>> {
                let row = sqlx::query(&format!("SELECT {CONTACT_COLS} FROM contacts WHERE email = $1"))
                    .bind(email)
                    .fetch_optional(&self.reader)
                    .await?;
                row.as_ref().map(contact_from).transpose()
            }

            async fn erased_contact_by_hash(&self, address_hash: &str) -> StoreResult<Option<Contact>> {
                let row = sqlx::query(&format!("SELECT {CONTACT_COLS} FROM contacts WHERE email = $1 AND erased"))
                    .bind(address_hash)
                    .fetch_optional(&self.reader)
                    .await?;
                row.as_ref().map(contact_from).transpose()
            }

            async fn contact_by_id(&self, id: &str) -> StoreResult<Option<Contact>> {
                let row = sqlx::query(&format!("SELECT {CONTACT_COLS} FROM contacts WHERE id = $1"))
                    .bind(id)
                    .fetch_optional(&self.reader)
                    .await?;
                row.as_ref().map(contact_from).transpose()
            }

            async fn rename_contact(&self, contact_id: &str, email: &str) -> StoreResult<bool> {
                let done = sqlx::query(
                    "UPDATE contacts SET email = $1 WHERE id = $2 \
                     AND NOT EXISTS (SELECT 1 FROM contacts WHERE email = $1)",
                )
                .bind(email)
                .bind(contact_id)
                .execute(&self.pool)
                .await?;
                Ok(done.rows_affected() == 1)
            }

            async fn contacts_page(&self, after: Option<&str>, limit: i64) -> StoreResult<Vec<Contact>> {
                self.contacts_page_read(after, limit).await
            }

            async fn contacts_page_before(&self, after: Option<&str>, limit: i64, updated_before: DateTime<Utc>) -> StoreResult<Vec<Contact>> {
                let rows = sqlx::query(&format!(
                    "SELECT {CONTACT_COLS} FROM contacts WHERE id > $1 AND updated_at < $2 ORDER BY id LIMIT $3"
                ))
                .bind(after.unwrap_or(""))
                .bind(format_time(updated_before))
                .bind(limit)
                .fetch_all(&self.reader)
                .await?;
                rows.iter().map(contact_from).collect()
            }

            async fn consent(&self, contact_id: &str, list_id: &str) -> StoreResult<Option<Consent>> {
                let row = sqlx::query(&format!(
                    "SELECT {CONSENT_COLS} FROM consents WHERE contact_id = $1 AND list_id = $2"
                ))
                .bind(contact_id)
                .bind(list_id)
                .fetch_optional(&self.reader)
                .await?;
                Ok(row.as_ref().map(consent_from).transpose()?.map(|(_, c)| c))
            }

            async fn contact_with_consent(
                &self,
                contact_id: &str,
                list_id: &str,
            ) -> StoreResult<Option<(Contact, Option<Consent>)>> {
                self.link_read(contact_id, list_id).await
            }

            async fn consents_of_contact(&self, contact_id: &str) -> StoreResult<Vec<(String, Consent)>> {
                let rows = sqlx::query(&format!(
                    "SELECT {CONSENT_COLS} FROM consents WHERE contact_id = $1 ORDER BY list_id"
                ))
                .bind(contact_id)
                .fetch_all(&self.reader)
                .await?;
                rows.iter().map(consent_from).collect()
            }

            async fn contacts_by_ids(&self, ids: &[String]) -> StoreResult<Vec<Contact>> {
                let mut out = Vec::with_capacity(ids.len());
                for chunk in ids.chunks(IN_CHUNK) {
                    let mut qb = sqlx::QueryBuilder::<$db>::new(format!("SELECT {CONTACT_COLS} FROM contacts WHERE id IN "));
                    push_in(&mut qb, chunk);
                    for row in qb.build().fetch_all(&self.reader).await? {
                        out.push(contact_from(&row)?);
                    }
                }
                Ok(out)
            }

            async fn consents_of_contacts(&self, contact_ids: &[String]) -> StoreResult<Vec<(String, String, Consent)>> {
                let mut out = Vec::with_capacity(contact_ids.len());
                for chunk in contact_ids.chunks(IN_CHUNK) {
                    out.extend(self.consents_read(chunk).await?);
                }
                Ok(out)
            }

            async fn engagements_of_contacts(&self, contact_ids: &[String]) -> StoreResult<Vec<(String, String, DateTime<Utc>)>> {
                let mut out = Vec::new();
                for chunk in contact_ids.chunks(IN_CHUNK) {
                    let mut qb = sqlx::QueryBuilder::<$db>::new("SELECT contact_id, list_id, last_at FROM engagement WHERE contact_id IN ");
                    push_in(&mut qb, chunk);
                    for row in qb.build().fetch_all(&self.reader).await? {
                        let at = parse_time("engagement", &row.try_get::<String, _>("last_at")?)?;
                        out.push((row.try_get("contact_id")?, row.try_get("list_id")?, at));
                    }
                }
                Ok(out)
            }

            async fn suppressed_among(&self, address_hashes: &[String]) -> StoreResult<Vec<String>> {
                let mut out = Vec::new();
                for chunk in address_hashes.chunks(IN_CHUNK) {
                    let mut qb = sqlx::QueryBuilder::<$db>::new("SELECT address_hash FROM suppressions WHERE address_hash IN ");
                    push_in(&mut qb, chunk);
                    for row in qb.build().fetch_all(&self.reader).await? {
                        out.push(row.try_get("address_hash")?);
                    }
                }
                out.sort();
                out.dedup();
                Ok(out)
            }

            async fn upsert_contacts(&self, batch: &[ContactUpsert], now: DateTime<Utc>) -> StoreResult<Vec<Contact>> {
                if batch.is_empty() {
                    return Ok(Vec::new());
                }
                let now = parse_time("contacts", &format_time(now))?;
                let ts = format_time(now);
                let mut tx = self.pool.begin().await?;
                // New addresses first (the same statement as the single upsert, many rows);
                // then every row is read (and locked on PostgreSQL) and merged like one by one.
                let mut emails: Vec<String> = batch.iter().map(|c| c.email.clone()).collect();
                emails.sort();
                emails.dedup();
                let first: BTreeMap<&str, &ContactUpsert> = batch.iter().rev().map(|c| (c.email.as_str(), c)).collect();
                let fresh: Vec<(&&str, &&ContactUpsert)> = first.iter().collect();
                // Rows inserted now are known without reading them back (RETURNING names them).
                let mut by_email: BTreeMap<String, Contact> = BTreeMap::new();
                for chunk in fresh.chunks(ROW_CHUNK) {
                    let ids: Vec<String> = chunk.iter().map(|_| uuid::Uuid::now_v7().to_string()).collect();
                    let mut qb = sqlx::QueryBuilder::<$db>::new(
                        "INSERT INTO contacts (id, email, language, fields, crm_records, created_at, updated_at) ",
                    );
                    qb.push_values(chunk.iter().zip(&ids), |mut b, ((email, c), id)| {
                        b.push_bind(id.as_str())
                            .push_bind(**email)
                            .push_bind(c.language.clone())
                            .push_bind(to_json(&c.fields))
                            .push_bind(records_json(&c.crm_record))
                            .push_bind(ts.as_str())
                            .push_bind(ts.as_str());
                    });
                    qb.push(" ON CONFLICT (email) DO NOTHING RETURNING id, email");
                    let inserted = qb.build().fetch_all(&mut *tx).await?;
                    let by_id: std::collections::HashMap<&str, &ContactUpsert> =
                        ids.iter().map(String::as_str).zip(chunk.iter().map(|(_, c)| **c)).collect();
                    for row in inserted {
                        let id: String = row.try_get("id")?;
                        let email: String = row.try_get("email")?;
                        let Some(c) = by_id.get(id.as_str()) else { continue };
                        by_email.insert(email.clone(), Contact {
                            id,
                            email,
                            erased: false,
                            language: c.language.clone(),
                            fields: c.fields.clone(),
                            crm_records: c.crm_record.iter().cloned().collect(),
                            created_at: now,
                            updated_at: now,
                        });
                    }
                }
                let existing: Vec<String> = emails.iter().filter(|e| !by_email.contains_key(*e)).cloned().collect();
                for chunk in existing.chunks(IN_CHUNK) {
                    let mut qb = sqlx::QueryBuilder::<$db>::new(format!("SELECT {CONTACT_COLS} FROM contacts WHERE email IN "));
                    push_in(&mut qb, chunk);
                    qb.push(concat!(" ", $for_update));
                    for row in qb.build().fetch_all(&mut *tx).await? {
                        let c = contact_from(&row)?;
                        by_email.insert(c.email.clone(), c);
                    }
                }
                let mut changed: BTreeMap<String, ()> = BTreeMap::new();
                let mut out = Vec::with_capacity(batch.len());
                for c in batch {
                    let contact = by_email.get_mut(&c.email).ok_or_else(|| StoreError::Corrupt {
                        table: "contacts",
                        detail: "a contact inserted in this transaction is missing".into(),
                    })?;
                    if merge_upsert(contact, c, now) {
                        changed.insert(c.email.clone(), ());
                    }
                    out.push(contact.clone());
                }
                let changed: Vec<&Contact> = changed.keys().filter_map(|e| by_email.get(e)).collect();
                for chunk in changed.chunks(ROW_CHUNK) {
                    let mut qb = sqlx::QueryBuilder::<$db>::new(
                        "INSERT INTO contacts (id, email, language, fields, crm_records, created_at, updated_at) ",
                    );
                    qb.push_values(chunk, |mut b, c| {
                        b.push_bind(c.id.clone())
                            .push_bind(c.email.clone())
                            .push_bind(c.language.clone())
                            .push_bind(to_json(&c.fields))
                            .push_bind(records_json(&c.crm_records))
                            .push_bind(format_time(c.created_at))
                            .push_bind(ts.clone());
                    });
                    qb.push(
                        " ON CONFLICT (id) DO UPDATE SET language = excluded.language, fields = excluded.fields, \
                         crm_records = excluded.crm_records, updated_at = excluded.updated_at",
                    );
                    qb.build().execute(&mut *tx).await?;
                }
                tx.commit().await?;
                // Aligned with `batch`; a later record of the same address saw the earlier merge.
                for (c, slot) in batch.iter().zip(out.iter_mut()) {
                    if let Some(latest) = by_email.get(&c.email) {
                        *slot = latest.clone();
                    }
                }
                Ok(out)
            }

            async fn commit_batch(&self, commits: &[crate::store::BatchCommit]) -> StoreResult<Vec<Option<LedgerEvent>>> {
                if commits.is_empty() {
                    return Ok(Vec::new());
                }
                let mut tx = begin_append(&self.pool).await?;
                // Current last_seq of every pair in the batch.
                let mut ids: Vec<String> = commits.iter().map(|b| b.commit.contact_id.clone()).collect();
                ids.sort();
                ids.dedup();
                let mut last: std::collections::HashMap<(String, String), Option<i64>> = std::collections::HashMap::new();
                for chunk in ids.chunks(IN_CHUNK) {
                    let mut qb = sqlx::QueryBuilder::<$db>::new("SELECT contact_id, list_id, last_seq FROM consents WHERE contact_id IN ");
                    push_in(&mut qb, chunk);
                    for row in qb.build().fetch_all(&mut *tx).await? {
                        last.insert((row.try_get("contact_id")?, row.try_get("list_id")?), Some(row.try_get("last_seq")?));
                    }
                }
                let (mut seq, mut prev) = chain_head(&mut tx).await?;
                // Seal in memory, in order; a pair whose check fails is skipped from there on.
                let mut out: Vec<Option<LedgerEvent>> = Vec::with_capacity(commits.len());
                let mut skipped: std::collections::HashSet<(String, String)> = std::collections::HashSet::new();
                let mut finals: BTreeMap<(String, String), (usize, i64)> = BTreeMap::new();
                for (i, b) in commits.iter().enumerate() {
                    let c = &b.commit;
                    let key = (c.contact_id.clone(), c.list_id.clone());
                    let current = last.get(&key).copied().flatten();
                    let ok = if b.follows { !skipped.contains(&key) } else { current == c.expected_seq };
                    if !ok {
                        skipped.insert(key);
                        out.push(None);
                        continue;
                    }
                    skipped.remove(&key);
                    seq += 1;
                    let ev = b.unsealed().seal(seq, &prev);
                    prev = ev.hash.clone();
                    last.insert(key.clone(), Some(seq));
                    finals.insert(key, (i, seq));
                    out.push(Some(ev));
                }
                let sealed: Vec<&LedgerEvent> = out.iter().flatten().collect();
                insert_events(&mut tx, &sealed).await?;
                // The projection gets each pair's final consent.
                let finals: Vec<(&crate::store::Commit, i64)> = finals.values().map(|(i, s)| (&commits[*i].commit, *s)).collect();
                for chunk in finals.chunks(ROW_CHUNK) {
                    let mut qb = sqlx::QueryBuilder::<$db>::new(
                        "INSERT INTO consents (contact_id, list_id, state, since, signup_token, doi_mails, reminders_sent, confirmed_at, confirmed_token, last_seq) ",
                    );
                    qb.push_values(chunk, |mut b, (c, s)| {
                        let k = &c.consent;
                        b.push_bind(&c.contact_id)
                            .push_bind(&c.list_id)
                            .push_bind(k.state.as_str())
                            .push_bind(format_time(k.since))
                            .push_bind(&k.signup_token)
                            .push_bind(i32::try_from(k.doi_mails).unwrap_or(i32::MAX))
                            .push_bind(i32::try_from(k.reminders_sent).unwrap_or(i32::MAX))
                            .push_bind(k.confirmed_at.map(format_time))
                            .push_bind(&k.confirmed_token)
                            .push_bind(*s);
                    });
                    qb.push(
                        " ON CONFLICT (contact_id, list_id) DO UPDATE SET state = excluded.state, since = excluded.since, \
                         signup_token = excluded.signup_token, doi_mails = excluded.doi_mails, reminders_sent = excluded.reminders_sent, \
                         confirmed_at = excluded.confirmed_at, confirmed_token = excluded.confirmed_token, last_seq = excluded.last_seq",
                    );
                    qb.build().execute(&mut *tx).await?;
                }
                let mut outbox: Vec<(&crate::store::NewOutbox, &LedgerEvent)> = Vec::new();
                let mut suppress: Vec<(&crate::store::Suppression, &LedgerEvent)> = Vec::new();
                let mut lift: Vec<&String> = Vec::new();
                for (b, ev) in commits.iter().zip(out.iter()) {
                    if let Some(ev) = ev {
                        outbox.extend(b.commit.outbox.iter().map(|o| (o, ev)));
                        suppress.extend(b.commit.suppress.iter().map(|s| (s, ev)));
                        lift.extend(&b.commit.lift);
                    }
                }
                for h in lift {
                    sqlx::query("DELETE FROM suppressions WHERE address_hash = $1")
                        .bind(h)
                        .execute(&mut *tx)
                        .await?;
                }
                insert_outbox(&mut tx, &outbox).await?;
                for (s, ev) in suppress {
                    sqlx::query(
                        "INSERT INTO suppressions (address_hash, reason, at) VALUES ($1, $2, $3) ON CONFLICT (address_hash) DO NOTHING",
                    )
                    .bind(&s.address_hash)
                    .bind(&s.reason)
                    .bind(&ev.at)
                    .execute(&mut *tx)
                    .await?;
                }
                // Paced mails count against their plan's caps in this same transaction.
                let mut paced: BTreeMap<(&str, &str, i64, &str), i64> = BTreeMap::new();
                for (b, ev) in commits.iter().zip(out.iter()) {
                    if let (Some(p), Some(_)) = (&b.commit.paced, ev) {
                        let kind = p.mail_kind.as_str();
                        *paced.entry((&b.commit.list_id, kind, p.day, crate::store::WAVE_TOTAL)).or_default() += 1;
                        if let Some(bucket) = &p.bucket {
                            *paced.entry((&b.commit.list_id, kind, p.day, bucket)).or_default() += 1;
                        }
                    }
                }
                for ((list, kind, day, bucket), n) in paced {
                    sqlx::query(
                        "INSERT INTO wave_counts (list_id, mail_kind, day, bucket, admitted) VALUES ($1, $2, $3, $4, $5) \
                         ON CONFLICT (list_id, mail_kind, day, bucket) DO UPDATE SET admitted = wave_counts.admitted + excluded.admitted",
                    )
                    .bind(list)
                    .bind(kind)
                    .bind(day)
                    .bind(bucket)
                    .bind(n)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                Ok(out)
            }

            async fn commit(&self, c: &Commit) -> StoreResult<LedgerEvent> {
                // One commit is a batch of one: the same checks and the same SQL.
                let batch = [crate::store::BatchCommit::new(c.clone(), false)];
                match self.commit_batch(&batch).await?.pop().flatten() {
                    Some(ev) => Ok(ev),
                    None => Err(StoreError::Conflict { contact_id: c.contact_id.clone(), list_id: c.list_id.clone() }),
                }
            }

            async fn append_event(&self, e: &NewEvent) -> StoreResult<LedgerEvent> {
                self.append_events(std::slice::from_ref(e))
                    .await?
                    .pop()
                    .ok_or_else(|| StoreError::Corrupt { table: "ledger", detail: "an appended event was not returned".into() })
            }

            async fn append_events(&self, events: &[NewEvent]) -> StoreResult<Vec<LedgerEvent>> {
                if events.is_empty() {
                    return Ok(Vec::new());
                }
                let mut tx = begin_append(&self.pool).await?;
                let sealed = seal_and_insert(&mut tx, events).await?;
                tx.commit().await?;
                Ok(sealed)
            }

            async fn events_of_contact(&self, contact_id: &str) -> StoreResult<Vec<LedgerEvent>> {
                self.events_read(contact_id, None).await
            }

            async fn consent_events(&self, contact_id: &str, list_id: &str) -> StoreResult<Vec<LedgerEvent>> {
                self.events_read(contact_id, Some(list_id)).await
            }

            async fn ledger_page(&self, after: i64, limit: i64) -> StoreResult<Vec<LedgerEvent>> {
                let rows = sqlx::query(&format!("SELECT {LEDGER_COLS} FROM ledger WHERE seq > $1 ORDER BY seq LIMIT $2"))
                    .bind(after)
                    .bind(limit)
                    .fetch_all(&self.reader)
                    .await?;
                rows.iter().map(event_from).collect()
            }

            async fn claim_outbox(
                &self,
                worker: &str,
                now: DateTime<Utc>,
                lease_until: DateTime<Utc>,
                limit: i64,
            ) -> StoreResult<Vec<OutboxItem>> {
                self.claim_outbox_kinds(worker, now, lease_until, limit, &[]).await
            }

            async fn claim_outbox_kinds(
                &self,
                worker: &str,
                now: DateTime<Utc>,
                lease_until: DateTime<Utc>,
                limit: i64,
                kinds: &[&str],
            ) -> StoreResult<Vec<OutboxItem>> {
                // The kinds are bound, never spliced into the text. One indexed read per kind
                // (`outbox_pending`: kind, priority, id), merged: `kind IN (...)` made both
                // planners walk every pending row and sort them (SQLite: 180-260 ms per claim
                // with 300,000 mails queued, on the one writer connection; 1 ms this way).
                // PostgreSQL locks inside each part, as it cannot lock across a UNION. No
                // kinds: every kind, in one read.
                const DUE: &str = "status = 'pending' AND next_attempt_at <= $3 \
                     AND (claimed_until IS NULL OR claimed_until < $3)";
                let due = if kinds.is_empty() {
                    format!("SELECT id FROM outbox WHERE {DUE} ORDER BY priority, id LIMIT $4 {}", $skip)
                } else {
                    let parts: Vec<String> = (0..kinds.len())
                        .map(|i| {
                            format!(
                                "SELECT id, priority FROM (SELECT id, priority FROM outbox WHERE kind = ${} AND {DUE} \
                                 ORDER BY priority, id LIMIT $4 {}) AS k{i}",
                                i + 5,
                                $skip
                            )
                        })
                        .collect();
                    format!("SELECT id FROM ({}) AS due ORDER BY priority, id LIMIT $4", parts.join(" UNION ALL "))
                };
                let sql = format!(
                    "UPDATE outbox SET claimed_by = $1, claimed_until = $2, attempts = attempts + 1 \
                     WHERE id IN ({due}) RETURNING {OUTBOX_COLS}"
                );
                let mut query = sqlx::query(&sql)
                    .bind(worker)
                    .bind(format_time(lease_until))
                    .bind(format_time(now))
                    .bind(limit);
                for kind in kinds {
                    query = query.bind(*kind);
                }
                let rows = query.fetch_all(&self.pool).await?;
                let mut items = rows.iter().map(outbox_from).collect::<StoreResult<Vec<_>>>()?;
                items.sort_by_key(|i| (i.priority, i.id));
                Ok(items)
            }

            async fn finish_outbox(&self, id: i64, worker: &str, finish: &Finish, now: DateTime<Utc>) -> StoreResult<()> {
                let mut tx = self.pool.begin().await?;
                let mut locked = false;
                finish_row(&mut tx, id, worker, finish, now, &mut locked).await?;
                tx.commit().await?;
                Ok(())
            }

            async fn finish_outbox_batch(&self, rows: &[crate::store::OutboxFinish], now: DateTime<Utc>) -> StoreResult<()> {
                if rows.is_empty() {
                    return Ok(());
                }
                // One transaction, one fsync, however many rows finished meanwhile; and a few
                // statements, not three per row: on a loaded machine each statement is a
                // round trip to the connection's thread of some hundred µs, and the store's
                // one writer waited in them (a DOI wave: 5.7 ms to finish ~4 mails).
                let mut tx = self.pool.begin().await?;
                let mut ids = std::collections::HashSet::new();
                if !rows.iter().all(|r| ids.insert(r.id)) {
                    // A row twice (not something the outbox does): one at a time, in order.
                    let mut locked = false;
                    for r in rows {
                        finish_row(&mut tx, r.id, &r.worker, &r.finish, now, &mut locked).await?;
                    }
                    tx.commit().await?;
                    return Ok(());
                }
                let mut ended = Vec::with_capacity(rows.len());
                let mut locked = false;
                for r in rows {
                    if matches!(r.finish, Finish::Postpone { .. }) {
                        finish_row(&mut tx, r.id, &r.worker, &r.finish, now, &mut locked).await?;
                    } else {
                        ended.push(r);
                    }
                }
                let ts = format_time(now);
                let mut updated = std::collections::HashSet::new();
                for chunk in ended.chunks(ROW_CHUNK / 8) {
                    let mut qb = sqlx::QueryBuilder::<$db>::new(
                        "WITH f (fid, fworker, fstatus, fnext, ferror, fnote, fdone) AS (",
                    );
                    qb.push_values(chunk, |mut b, r| {
                        let (status, next, error, note, done_at) = finish_columns(&r.finish, &ts);
                        b.push_bind(r.id)
                            .push_bind(r.worker.clone())
                            .push_bind(status)
                            .push_bind(next)
                            .push_bind(error)
                            .push_bind(note)
                            .push_bind(done_at);
                    });
                    // As `finish_row`: an erased contact's finished row keeps no address and
                    // no vendor error text.
                    qb.push(
                        ") UPDATE outbox SET status = f.fstatus, next_attempt_at = f.fnext, note = f.fnote, \
                         done_at = f.fdone, \
                         last_error = CASE WHEN f.ferror IS NOT NULL AND EXISTS (SELECT 1 FROM contacts c \
                         WHERE c.id = outbox.contact_id AND c.erased) THEN 'error text withheld: the contact is erased' \
                         ELSE f.ferror END, \
                         claimed_by = NULL, claimed_until = NULL, \
                         payload = CASE WHEN f.fstatus <> 'pending' AND EXISTS (SELECT 1 FROM contacts c \
                         WHERE c.id = outbox.contact_id AND c.erased) THEN '{}' ELSE outbox.payload END \
                         FROM f WHERE outbox.id = f.fid AND outbox.claimed_by = f.fworker \
                         AND outbox.status = 'pending' RETURNING outbox.id",
                    );
                    for row in qb.build().fetch_all(&mut *tx).await? {
                        updated.insert(row.try_get::<i64, _>(0)?);
                    }
                }
                let mut events = Vec::new();
                for r in &ended {
                    if !updated.contains(&r.id) {
                        // Our lease ran out and another worker owns the row now; it will
                        // record the result. Writing the event here would record it twice.
                        tracing::warn!(outbox_id = r.id, worker = %r.worker, "outbox lease lost; result not recorded");
                    } else if let Finish::Done { event: Some(e), .. } = &r.finish {
                        events.push(e.as_ref());
                    }
                }
                if !events.is_empty() {
                    if !locked {
                        append_lock(&mut tx).await?;
                    }
                    seal_and_insert(&mut tx, &events).await?;
                }
                tx.commit().await?;
                Ok(())
            }

            async fn release_claims(&self, prefix: &str, current: &str) -> StoreResult<u64> {
                // `substr` rather than LIKE: a prefix may contain `_`, a LIKE wildcard.
                let len = i32::try_from(prefix.chars().count()).unwrap_or(i32::MAX);
                let n = sqlx::query(
                    "UPDATE outbox SET claimed_by = NULL, claimed_until = NULL \
                     WHERE status = 'pending' AND claimed_by <> $1 AND substr(claimed_by, 1, $2) = $3",
                )
                .bind(current)
                .bind(len)
                .bind(prefix)
                .execute(&self.pool)
                .await?
                .rows_affected();
                // Its leases too (e.g. the sync pass): lapse them now rather than at `until`.
                sqlx::query("UPDATE leases SET until = '' WHERE holder <> $1 AND substr(holder, 1, $2) = $3")
                    .bind(current)
                    .bind(len)
                    .bind(prefix)
                    .execute(&self.pool)
                    .await?;
                Ok(n)
            }

            async fn outbox_counts(&self) -> StoreResult<OutboxCounts> {
                let rows = sqlx::query("SELECT status, COUNT(*) AS n FROM outbox GROUP BY status")
                    .fetch_all(&self.reader)
                    .await?;
                let mut counts = OutboxCounts::default();
                for r in rows {
                    let n: i64 = r.try_get("n")?;
                    match r.try_get::<String, _>("status")?.as_str() {
                        "pending" => counts.pending = n,
                        "done" => counts.done = n,
                        "dead" => counts.dead = n,
                        _ => {}
                    }
                }
                Ok(counts)
            }

            async fn outbox_dead(&self) -> StoreResult<Vec<OutboxItem>> {
                let rows = sqlx::query(&format!("SELECT {OUTBOX_COLS} FROM outbox WHERE status = 'dead' ORDER BY id"))
                    .fetch_all(&self.reader)
                    .await?;
                rows.iter().map(outbox_from).collect()
            }

            async fn erase_contact(&self, contact_id: &str, address_hash: &str, now: DateTime<Utc>) -> StoreResult<crate::store::Erasure> {
                let mut tx = self.pool.begin().await?;
                // Evidence of digest-covered events is replaced (the triggers allow exactly
                // this); the `erased` events themselves carry no personal data.
                let redacted = sqlx::query(
                    "UPDATE ledger SET evidence = $1 WHERE contact_id = $2 AND evidence_sha256 IS NOT NULL \
                     AND evidence <> $1 AND kind <> 'erased'",
                )
                .bind(crate::ledger::REDACTED_EVIDENCE)
                .bind(contact_id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                let legacy: i64 = sqlx::query(
                    "SELECT COUNT(*) AS n FROM ledger WHERE contact_id = $1 AND evidence_sha256 IS NULL",
                )
                .bind(contact_id)
                .fetch_one(&mut *tx)
                .await?
                .try_get("n")?;
                let contact = sqlx::query(
                    "UPDATE contacts SET email = $1, erased = TRUE, language = NULL, fields = '{}', crm_records = '[]', \
                     updated_at = $2 WHERE id = $3",
                )
                .bind(address_hash)
                .bind(format_time(now))
                .bind(contact_id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                // Finished effects no longer need the address; pending ones (a removal from
                // the list) keep it until delivered. A vendor's error text may quote the
                // address, so it goes from every row of the contact.
                sqlx::query("UPDATE outbox SET last_error = NULL WHERE contact_id = $1 AND last_error IS NOT NULL")
                    .bind(contact_id)
                    .execute(&mut *tx)
                    .await?;
                let scrubbed = sqlx::query("UPDATE outbox SET payload = '{}' WHERE contact_id = $1 AND status <> 'pending'")
                    .bind(contact_id)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                sqlx::query("DELETE FROM engagement WHERE contact_id = $1").bind(contact_id).execute(&mut *tx).await?;
                tx.commit().await?;
                Ok(crate::store::Erasure {
                    contact_found: contact == 1,
                    redacted_events: redacted,
                    legacy_events: u64::try_from(legacy).unwrap_or(0),
                    scrubbed_outbox_rows: scrubbed,
                })
            }

            async fn after_erasure(&self) -> StoreResult<()> {
                // The backend's own step so no old copy outlives an erasure (SQLite: the WAL).
                self.clear_old_copies().await
            }

            async fn retry_dead(&self, id: i64, now: DateTime<Utc>) -> StoreResult<bool> {
                let n = sqlx::query(
                    "UPDATE outbox SET status = 'pending', attempts = 0, next_attempt_at = $1, done_at = NULL, \
                     claimed_by = NULL, claimed_until = NULL WHERE id = $2 AND status = 'dead'",
                )
                .bind(format_time(now))
                .bind(id)
                .execute(&self.pool)
                .await?
                .rows_affected();
                Ok(n == 1)
            }

            async fn drop_dead(&self, id: i64, now: DateTime<Utc>) -> StoreResult<bool> {
                let n = sqlx::query("UPDATE outbox SET status = 'dropped', done_at = $1 WHERE id = $2 AND status = 'dead'")
                    .bind(format_time(now))
                    .bind(id)
                    .execute(&self.pool)
                    .await?
                    .rows_affected();
                Ok(n == 1)
            }

            async fn try_lease(&self, name: &str, holder: &str, now: DateTime<Utc>, until: DateTime<Utc>) -> StoreResult<bool> {
                let n = sqlx::query(
                    "INSERT INTO leases (name, holder, until) VALUES ($1, $2, $3) \
                     ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, until = excluded.until \
                     WHERE leases.holder = excluded.holder OR leases.until < $4",
                )
                .bind(name)
                .bind(holder)
                .bind(format_time(until))
                .bind(format_time(now))
                .execute(&self.pool)
                .await?
                .rows_affected();
                Ok(n == 1)
            }

            async fn cursor(&self, name: &str) -> StoreResult<Option<String>> {
                let row = sqlx::query("SELECT value FROM cursors WHERE name = $1")
                    .bind(name)
                    .fetch_optional(&self.reader)
                    .await?;
                Ok(row.map(|r| r.try_get("value")).transpose()?)
            }

            async fn wave_counts(&self, list_id: &str, day: i64) -> StoreResult<Vec<crate::store::WaveCount>> {
                let rows = sqlx::query("SELECT mail_kind, bucket, admitted FROM wave_counts WHERE list_id = $1 AND day = $2 ORDER BY mail_kind, bucket")
                    .bind(list_id)
                    .bind(day)
                    .fetch_all(&self.reader)
                    .await?;
                rows.iter()
                    .map(|r| {
                        Ok(crate::store::WaveCount {
                            mail_kind: r.try_get("mail_kind")?,
                            bucket: r.try_get("bucket")?,
                            admitted: r.try_get("admitted")?,
                        })
                    })
                    .collect()
            }

            async fn wave_first_days(&self, list_id: &str) -> StoreResult<Vec<(String, i64)>> {
                let rows = sqlx::query("SELECT mail_kind, MIN(day) AS first FROM wave_counts WHERE list_id = $1 GROUP BY mail_kind ORDER BY mail_kind")
                    .bind(list_id)
                    .fetch_all(&self.reader)
                    .await?;
                rows.iter().map(|r| Ok((r.try_get("mail_kind")?, r.try_get("first")?))).collect()
            }

            async fn add_mail_outcomes(&self, rows: &[(String, i64, crate::store::MailOutcomes)]) -> StoreResult<()> {
                if rows.is_empty() {
                    return Ok(());
                }
                let mut tx = self.pool.begin().await?;
                for (list, slot, o) in rows {
                    sqlx::query(
                        "INSERT INTO mail_outcomes (list_id, slot, sent, hard, soft, policy, complaints) VALUES ($1, $2, $3, $4, $5, $6, $7) \
                         ON CONFLICT (list_id, slot) DO UPDATE SET sent = mail_outcomes.sent + excluded.sent, \
                         hard = mail_outcomes.hard + excluded.hard, soft = mail_outcomes.soft + excluded.soft, \
                         policy = mail_outcomes.policy + excluded.policy, complaints = mail_outcomes.complaints + excluded.complaints",
                    )
                    .bind(list)
                    .bind(*slot)
                    .bind(o.sent)
                    .bind(o.hard)
                    .bind(o.soft)
                    .bind(o.policy)
                    .bind(o.complaints)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                Ok(())
            }

            async fn release_waves(&self, list_id: &str, now: DateTime<Utc>) -> StoreResult<u64> {
                // The payload is the row's JSON as written by `OutboxWork::to_stored`
                // (`serde_json`, no spaces).
                let n = sqlx::query(
                    "UPDATE outbox SET next_attempt_at = $1 WHERE list_id = $2 AND kind = 'mail' AND status = 'pending' \
                     AND next_attempt_at > $1 AND payload LIKE '%\"wave\":true%'",
                )
                .bind(format_time(now))
                .bind(list_id)
                .execute(&self.pool)
                .await?
                .rows_affected();
                Ok(n)
            }

            async fn mail_outcomes(&self, list_id: &str, from_slot: i64) -> StoreResult<crate::store::MailOutcomes> {
                let r = sqlx::query(
                    "SELECT CAST(COALESCE(SUM(sent), 0) AS BIGINT) AS sent, CAST(COALESCE(SUM(hard), 0) AS BIGINT) AS hard, \
                     CAST(COALESCE(SUM(soft), 0) AS BIGINT) AS soft, CAST(COALESCE(SUM(policy), 0) AS BIGINT) AS policy, \
                     CAST(COALESCE(SUM(complaints), 0) AS BIGINT) AS complaints FROM mail_outcomes WHERE list_id = $1 AND slot >= $2",
                )
                .bind(list_id)
                .bind(from_slot)
                .fetch_one(&self.reader)
                .await?;
                Ok(crate::store::MailOutcomes {
                    sent: r.try_get("sent")?,
                    hard: r.try_get("hard")?,
                    soft: r.try_get("soft")?,
                    policy: r.try_get("policy")?,
                    complaints: r.try_get("complaints")?,
                })
            }

            async fn list_event_summary(&self, list_id: &str) -> StoreResult<Vec<crate::store::EventSummary>> {
                let rows = sqlx::query(
                    "SELECT kind, from_state, to_state, COUNT(*) AS events, COUNT(DISTINCT contact_id) AS contacts, \
                     MIN(at) AS first, MAX(at) AS last FROM ledger WHERE list_id = $1 GROUP BY kind, from_state, to_state ORDER BY MIN(at)",
                )
                .bind(list_id)
                .fetch_all(&self.reader)
                .await?;
                rows.iter()
                    .map(|r| {
                        Ok(crate::store::EventSummary {
                            kind: r.try_get("kind")?,
                            from_state: r.try_get("from_state")?,
                            to_state: r.try_get("to_state")?,
                            events: r.try_get("events")?,
                            contacts: r.try_get("contacts")?,
                            first: parse_time("ledger", &r.try_get::<String, _>("first")?)?,
                            last: parse_time("ledger", &r.try_get::<String, _>("last")?)?,
                        })
                    })
                    .collect()
            }

            async fn set_cursor(&self, name: &str, value: &str, now: DateTime<Utc>) -> StoreResult<()> {
                sqlx::query(
                    "INSERT INTO cursors (name, value, updated_at) VALUES ($1, $2, $3) \
                     ON CONFLICT (name) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                )
                .bind(name)
                .bind(value)
                .bind(format_time(now))
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn record_engagement(&self, contact_id: &str, list_id: &str, at: DateTime<Utc>) -> StoreResult<()> {
                // Text timestamps of one fixed format compare correctly, so MAX keeps the latest.
                sqlx::query(
                    "INSERT INTO engagement (contact_id, list_id, last_at) VALUES ($1, $2, $3) \
                     ON CONFLICT (contact_id, list_id) DO UPDATE SET last_at = \
                     CASE WHEN excluded.last_at > engagement.last_at THEN excluded.last_at ELSE engagement.last_at END",
                )
                .bind(contact_id)
                .bind(list_id)
                .bind(format_time(at))
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn last_engagement(&self, contact_id: &str, list_id: &str) -> StoreResult<Option<DateTime<Utc>>> {
                let row = sqlx::query("SELECT last_at FROM engagement WHERE contact_id = $1 AND list_id = $2")
                    .bind(contact_id)
                    .bind(list_id)
                    .fetch_optional(&self.reader)
                    .await?;
                row.map(|r| r.try_get::<String, _>("last_at").map_err(StoreError::from).and_then(|s| parse_time("engagement", &s)))
                    .transpose()
            }

            async fn put_snapshot(&self, s: &crate::store::Snapshot) -> StoreResult<()> {
                self.put_snapshots(std::slice::from_ref(s)).await
            }

            async fn put_snapshots(&self, snaps: &[crate::store::Snapshot]) -> StoreResult<()> {
                if snaps.is_empty() {
                    return Ok(());
                }
                // Multi-row statements: one round trip to the connection per chunk, not per
                // snapshot (a wave's chunk of 32 mails took 11 ms one by one on a loaded
                // machine).
                let mut tx = self.pool.begin().await?;
                for chunk in snaps.chunks(ROW_CHUNK / 8) {
                    let mut qb = sqlx::QueryBuilder::<$db>::new(
                        "INSERT INTO snapshots (hash, kind, language, template_version, content, created_at) ",
                    );
                    qb.push_values(chunk, |mut b, s| {
                        b.push_bind(&s.hash)
                            .push_bind(&s.kind)
                            .push_bind(&s.language)
                            .push_bind(&s.template_version)
                            .push_bind(&s.content)
                            .push_bind(format_time(s.created_at));
                    });
                    qb.push(" ON CONFLICT (hash) DO NOTHING");
                    qb.build().execute(&mut *tx).await?;
                }
                tx.commit().await?;
                Ok(())
            }

            async fn snapshot(&self, hash: &str) -> StoreResult<Option<crate::store::Snapshot>> {
                let row = sqlx::query(
                    "SELECT hash, kind, language, template_version, content, created_at FROM snapshots WHERE hash = $1",
                )
                .bind(hash)
                .fetch_optional(&self.reader)
                .await?;
                row.map(|r| -> StoreResult<crate::store::Snapshot> {
                    Ok(crate::store::Snapshot {
                        hash: r.try_get("hash")?,
                        kind: r.try_get("kind")?,
                        language: r.try_get("language")?,
                        template_version: r.try_get("template_version")?,
                        content: r.try_get("content")?,
                        created_at: parse_time("snapshots", &r.try_get::<String, _>("created_at")?)?,
                    })
                })
                .transpose()
            }

            async fn consent_summary(&self) -> StoreResult<Vec<crate::store::ConsentSummary>> {
                let rows = sqlx::query(
                    "SELECT list_id, state, COUNT(*) AS n, MIN(since) AS oldest, MAX(since) AS newest \
                     FROM consents GROUP BY list_id, state ORDER BY list_id, state",
                )
                .fetch_all(&self.reader)
                .await?;
                rows.iter()
                    .map(|r| {
                        Ok(crate::store::ConsentSummary {
                            list_id: r.try_get("list_id")?,
                            state: r.try_get("state")?,
                            count: r.try_get("n")?,
                            oldest_since: parse_time("consents", &r.try_get::<String, _>("oldest")?)?,
                            newest_since: parse_time("consents", &r.try_get::<String, _>("newest")?)?,
                        })
                    })
                    .collect()
            }

            async fn suppressions_of(&self, address_hashes: &[String]) -> StoreResult<Vec<crate::store::Suppressed>> {
                if address_hashes.is_empty() {
                    return Ok(Vec::new());
                }
                let mut out = Vec::with_capacity(address_hashes.len());
                for chunk in address_hashes.chunks(IN_CHUNK) {
                    out.extend(self.suppressions_read(chunk).await?);
                }
                out.sort_by(|a, b| (a.at, &a.address_hash).cmp(&(b.at, &b.address_hash)));
                Ok(out)
            }

            async fn suppressions(&self) -> StoreResult<Vec<crate::store::Suppressed>> {
                let rows = sqlx::query("SELECT address_hash, reason, at FROM suppressions ORDER BY at, address_hash")
                    .fetch_all(&self.reader)
                    .await?;
                rows.iter().map(suppressed_from).collect()
            }

            async fn append_with_outbox(&self, event: &NewEvent, outbox: &[crate::store::NewOutbox]) -> StoreResult<LedgerEvent> {
                let mut tx = begin_append(&self.pool).await?;
                let sealed = seal_and_insert(&mut tx, std::slice::from_ref(event)).await?;
                let ev = sealed.into_iter().next().ok_or_else(|| StoreError::Corrupt { table: "ledger", detail: "an appended event was not returned".into() })?;
                let rows: Vec<(&crate::store::NewOutbox, &LedgerEvent)> = outbox.iter().map(|o| (o, &ev)).collect();
                insert_outbox(&mut tx, &rows).await?;
                tx.commit().await?;
                Ok(ev)
            }

            async fn lift_suppressions(&self, address_hashes: &[String], events: &[NewEvent]) -> StoreResult<u64> {
                let mut tx = begin_append(&self.pool).await?;
                let mut lifted = 0;
                for h in address_hashes {
                    lifted += sqlx::query("DELETE FROM suppressions WHERE address_hash = $1")
                        .bind(h)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                }
                // Nothing lifted, nothing to record.
                if lifted > 0 {
                    seal_and_insert(&mut tx, events).await?;
                }
                tx.commit().await?;
                Ok(lifted)
            }

            async fn events_per_day(&self, since: DateTime<Utc>) -> StoreResult<Vec<crate::store::DayCount>> {
                let rows = sqlx::query(
                    "SELECT list_id, substr(at, 1, 10) AS day, kind, COUNT(*) AS n FROM ledger \
                     WHERE at >= $1 GROUP BY list_id, substr(at, 1, 10), kind ORDER BY list_id, day, kind",
                )
                .bind(format_time(since))
                .fetch_all(&self.reader)
                .await?;
                rows.iter().map(day_count_from).collect()
            }

            async fn states_reached(&self) -> StoreResult<Vec<crate::store::StateReach>> {
                let rows = sqlx::query(
                    "SELECT list_id, to_state, COUNT(DISTINCT contact_id) AS n FROM ledger \
                     GROUP BY list_id, to_state ORDER BY list_id, to_state",
                )
                .fetch_all(&self.reader)
                .await?;
                rows.iter()
                    .map(|r| {
                        Ok(crate::store::StateReach {
                            list_id: r.try_get("list_id")?,
                            state: r.try_get("to_state")?,
                            contacts: r.try_get("n")?,
                        })
                    })
                    .collect()
            }

            async fn consents_per_day(&self, state: &str) -> StoreResult<Vec<crate::store::DayCount>> {
                let rows = sqlx::query(
                    "SELECT list_id, substr(since, 1, 10) AS day, state AS kind, COUNT(*) AS n FROM consents \
                     WHERE state = $1 GROUP BY list_id, substr(since, 1, 10), state ORDER BY list_id, day",
                )
                .bind(state)
                .fetch_all(&self.reader)
                .await?;
                rows.iter().map(day_count_from).collect()
            }

            async fn outbox_depth(&self) -> StoreResult<Vec<crate::store::OutboxDepth>> {
                let rows = sqlx::query(
                    "SELECT list_id, kind, status, COUNT(*) AS n, MIN(created_at) AS oldest FROM outbox \
                     WHERE status IN ('pending', 'dead') GROUP BY list_id, kind, status ORDER BY list_id, kind, status",
                )
                .fetch_all(&self.reader)
                .await?;
                rows.iter()
                    .map(|r| {
                        Ok(crate::store::OutboxDepth {
                            list_id: r.try_get("list_id")?,
                            kind: r.try_get("kind")?,
                            status: r.try_get("status")?,
                            count: r.try_get("n")?,
                            oldest: parse_time("outbox", &r.try_get::<String, _>("oldest")?)?,
                        })
                    })
                    .collect()
            }

            async fn ledger_head(&self) -> StoreResult<i64> {
                let row = sqlx::query("SELECT COALESCE(MAX(seq), 0) AS head FROM ledger")
                    .fetch_one(&self.reader)
                    .await?;
                Ok(row.try_get::<i64, _>("head")?)
            }

            async fn pending_removal_addresses(&self, list_id: &str) -> StoreResult<Vec<String>> {
                let rows = sqlx::query(
                    "SELECT o.payload, c.email FROM outbox o LEFT JOIN contacts c ON c.id = o.contact_id \
                     WHERE o.status = 'pending' AND o.list_id = $1 AND o.kind = 'campaigns_remove'",
                )
                .bind(list_id)
                .fetch_all(&self.reader)
                .await?;
                let mut out = Vec::with_capacity(rows.len());
                for r in &rows {
                    let payload: serde_json::Value = parse_json("outbox", &r.try_get::<String, _>("payload")?)?;
                    let carried = payload.get("email").and_then(|e| e.as_str()).map(str::to_owned);
                    if let Some(address) = carried.or(r.try_get::<Option<String>, _>("email")?) {
                        out.push(address);
                    }
                }
                Ok(out)
            }

            async fn leases(&self) -> StoreResult<Vec<crate::store::Lease>> {
                let rows = sqlx::query("SELECT name, holder, until FROM leases ORDER BY name")
                    .fetch_all(&self.reader)
                    .await?;
                rows.iter()
                    .map(|r| {
                        Ok(crate::store::Lease {
                            name: r.try_get("name")?,
                            holder: r.try_get("holder")?,
                            until: parse_time("leases", &r.try_get::<String, _>("until")?)?,
                        })
                    })
                    .collect()
            }

            async fn list_consents(&self, list_id: &str) -> StoreResult<Vec<(String, crate::consent::ConsentState)>> {
                let rows = sqlx::query(
                    "SELECT c.email, s.state FROM consents s JOIN contacts c ON c.id = s.contact_id \
                     WHERE s.list_id = $1 AND NOT c.erased ORDER BY c.email",
                )
                .bind(list_id)
                .fetch_all(&self.reader)
                .await?;
                rows.iter()
                    .map(|r| Ok((r.try_get("email")?, parse_state("consents", &r.try_get::<String, _>("state")?)?)))
                    .collect()
            }

            async fn is_suppressed(&self, address_hash: &str) -> StoreResult<bool> {
                let row = sqlx::query("SELECT 1 AS one FROM suppressions WHERE address_hash = $1")
                    .bind(address_hash)
                    .fetch_optional(&self.reader)
                    .await?;
                Ok(row.is_some())
            }

            async fn quota_take(
                &self,
                key: &str,
                windows: &[optinsync_plugin_api::QuotaWindow],
                now_ms: i64,
            ) -> StoreResult<optinsync_plugin_api::QuotaSlot> {
                use optinsync_plugin_api::QuotaSlot;
                let mut tx = self.pool.begin().await?;
                sqlx::query("INSERT INTO quota_keys (key, locked_until) VALUES ($1, 0) ON CONFLICT (key) DO NOTHING")
                    .bind(key)
                    .execute(&mut *tx)
                    .await?;
                // The key's row serialises every take of this endpoint across instances
                // (PostgreSQL: row lock; SQLite: its single writer).
                let locked: i64 = sqlx::query(&format!("SELECT locked_until FROM quota_keys WHERE key = $1 {}", $for_update))
                    .bind(key)
                    .fetch_one(&mut *tx)
                    .await?
                    .try_get("locked_until")?;
                if locked > now_ms {
                    tx.commit().await?;
                    return Ok(QuotaSlot::Locked(crate::store::windows::ms(locked - now_ms)));
                }
                let mut wait = 0i64;
                for w in windows {
                    sqlx::query("DELETE FROM quota_buckets WHERE key = $1 AND length_ms = $2 AND bucket < $3")
                        .bind(key)
                        .bind(w.length_ms)
                        .bind(crate::store::windows::first_live_bucket(w, now_ms))
                        .execute(&mut *tx)
                        .await?;
                    let buckets = sqlx::query("SELECT bucket, used FROM quota_buckets WHERE key = $1 AND length_ms = $2 ORDER BY bucket")
                        .bind(key)
                        .bind(w.length_ms)
                        .fetch_all(&mut *tx)
                        .await?
                        .iter()
                        .map(|r| Ok((r.try_get::<i64, _>("bucket")?, r.try_get::<i64, _>("used")?)))
                        .collect::<StoreResult<Vec<(i64, i64)>>>()?;
                    wait = wait.max(crate::store::windows::wait_ms(&buckets, w, now_ms));
                }
                if wait > 0 {
                    tx.commit().await?;
                    return Ok(QuotaSlot::Wait(crate::store::windows::ms(wait)));
                }
                for w in windows {
                    sqlx::query(
                        "INSERT INTO quota_buckets (key, length_ms, bucket, used) VALUES ($1, $2, $3, 1) \
                         ON CONFLICT (key, length_ms, bucket) DO UPDATE SET used = quota_buckets.used + 1",
                    )
                    .bind(key)
                    .bind(w.length_ms)
                    .bind(now_ms.div_euclid(crate::store::windows::bucket_ms(w)))
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                Ok(QuotaSlot::Go(now_ms))
            }

            async fn quota_settle(
                &self,
                key: &str,
                windows: &[optinsync_plugin_api::QuotaWindow],
                sent_ms: i64,
                done_ms: i64,
            ) -> StoreResult<()> {
                let mut tx = self.pool.begin().await?;
                for w in windows {
                    let bm = crate::store::windows::bucket_ms(w);
                    let (sent, done) = (sent_ms.div_euclid(bm), done_ms.div_euclid(bm));
                    if done <= sent {
                        continue;
                    }
                    let moved = sqlx::query(
                        "UPDATE quota_buckets SET used = used - 1 WHERE key = $1 AND length_ms = $2 AND bucket = $3 AND used > 0",
                    )
                    .bind(key)
                    .bind(w.length_ms)
                    .bind(sent)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                    if moved == 1 {
                        sqlx::query(
                            "INSERT INTO quota_buckets (key, length_ms, bucket, used) VALUES ($1, $2, $3, 1) \
                             ON CONFLICT (key, length_ms, bucket) DO UPDATE SET used = quota_buckets.used + 1",
                        )
                        .bind(key)
                        .bind(w.length_ms)
                        .bind(done)
                        .execute(&mut *tx)
                        .await?;
                    }
                }
                tx.commit().await?;
                Ok(())
            }

            async fn quota_lock(&self, key: &str, until_ms: i64) -> StoreResult<()> {
                sqlx::query(
                    "INSERT INTO quota_keys (key, locked_until) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET locked_until = \
                     CASE WHEN excluded.locked_until > quota_keys.locked_until THEN excluded.locked_until ELSE quota_keys.locked_until END",
                )
                .bind(key)
                .bind(until_ms)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn quota_usage(
                &self,
                key: &str,
                windows: &[optinsync_plugin_api::QuotaWindow],
                now_ms: i64,
            ) -> StoreResult<(Vec<u32>, Option<i64>)> {
                let locked = sqlx::query("SELECT locked_until FROM quota_keys WHERE key = $1")
                    .bind(key)
                    .fetch_optional(&self.pool)
                    .await?
                    .map(|r| r.try_get::<i64, _>("locked_until"))
                    .transpose()?
                    .filter(|u| *u > now_ms);
                let mut used = Vec::with_capacity(windows.len());
                for w in windows {
                    let buckets = sqlx::query("SELECT bucket, used FROM quota_buckets WHERE key = $1 AND length_ms = $2 AND bucket >= $3")
                        .bind(key)
                        .bind(w.length_ms)
                        .bind(crate::store::windows::first_live_bucket(w, now_ms))
                        .fetch_all(&self.pool)
                        .await?
                        .iter()
                        .map(|r| Ok((r.try_get::<i64, _>("bucket")?, r.try_get::<i64, _>("used")?)))
                        .collect::<StoreResult<Vec<(i64, i64)>>>()?;
                    used.push(crate::store::windows::used(&buckets));
                }
                Ok((used, locked))
            }

            async fn quota_overview(&self, now_ms: i64) -> StoreResult<Vec<crate::store::QuotaUse>> {
                let keys = sqlx::query("SELECT key, locked_until FROM quota_keys ORDER BY key")
                    .fetch_all(&self.reader)
                    .await?;
                let buckets = sqlx::query(
                    "SELECT key, length_ms, bucket, used FROM quota_buckets ORDER BY key, length_ms, bucket",
                )
                .fetch_all(&self.reader)
                .await?;
                let mut out = Vec::with_capacity(keys.len());
                for k in &keys {
                    let key: String = k.try_get("key")?;
                    let mut windows: BTreeMap<i64, Vec<(i64, i64)>> = BTreeMap::new();
                    for b in &buckets {
                        if b.try_get::<String, _>("key")? == key {
                            windows
                                .entry(b.try_get("length_ms")?)
                                .or_default()
                                .push((b.try_get("bucket")?, b.try_get("used")?));
                        }
                    }
                    let windows = windows
                        .into_iter()
                        .map(|(length_ms, rows)| {
                            let w = optinsync_plugin_api::QuotaWindow { limit: 0, length_ms };
                            let first = crate::store::windows::first_live_bucket(&w, now_ms);
                            let live: Vec<(i64, i64)> = rows.into_iter().filter(|(i, _)| *i >= first).collect();
                            (length_ms, crate::store::windows::used(&live))
                        })
                        .collect();
                    out.push(crate::store::QuotaUse {
                        key,
                        windows,
                        locked_until: Some(k.try_get::<i64, _>("locked_until")?).filter(|u| *u > now_ms),
                    });
                }
                Ok(out)
            }

            async fn mark_add(&self, set: &str, member: &str) -> StoreResult<()> {
                sqlx::query("INSERT INTO shared_marks (set_name, member) VALUES ($1, $2) ON CONFLICT (set_name, member) DO NOTHING")
                    .bind(set)
                    .bind(member)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn mark_remove(&self, set: &str, members: &[String]) -> StoreResult<()> {
                let mut tx = self.pool.begin().await?;
                for m in members {
                    sqlx::query("DELETE FROM shared_marks WHERE set_name = $1 AND member = $2")
                        .bind(set)
                        .bind(m)
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                Ok(())
            }

            async fn marks(&self, set: &str) -> StoreResult<Vec<String>> {
                sqlx::query("SELECT member FROM shared_marks WHERE set_name = $1 ORDER BY member")
                    .bind(set)
                    .fetch_all(&self.pool)
                    .await?
                    .iter()
                    .map(|r| r.try_get::<String, _>("member").map_err(StoreError::from))
                    .collect()
            }
        }
    };
}

pub(crate) use shared_store_impl;
