//! PostgreSQL store: several daemons on one database. Ledger appends are serialised by a
//! transaction-scoped advisory lock; outbox rows are claimed with `FOR UPDATE SKIP LOCKED`,
//! so no two instances work on the same row.

use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions};

#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
    /// The same pool: PostgreSQL readers never wait for writers anyway.
    reader: PgPool,
}

impl PostgresStore {
    pub async fn open(url: &str) -> super::StoreResult<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(30))
            .connect(url)
            .await
            .map_err(|source| super::StoreError::Open {
                url: redact(url),
                source,
            })?;
        Ok(Self {
            reader: pool.clone(),
            pool,
        })
    }

    // The three reads of a link request, through the pool like every other read (the SQLite
    // store makes them through SQLite's C API; `sqlite.rs` says why).

    async fn contacts_page_read(
        &self,
        after: Option<&str>,
        limit: i64,
    ) -> super::StoreResult<Vec<super::Contact>> {
        let rows = sqlx::query(&super::rows::CONTACTS_PAGE_SQL)
            .bind(after.unwrap_or(""))
            .bind(limit)
            .fetch_all(&self.reader)
            .await?;
        rows.iter().map(super::rows::contact_from).collect()
    }

    async fn consents_read(
        &self,
        contact_ids: &[String],
    ) -> super::StoreResult<Vec<(String, String, crate::consent::Consent)>> {
        let sql = super::rows::consents_of_contacts_sql(contact_ids.len());
        let mut query = sqlx::query(&sql);
        for id in contact_ids {
            query = query.bind(id);
        }
        let mut out = Vec::with_capacity(contact_ids.len());
        for row in query.fetch_all(&self.reader).await? {
            let (list_id, consent) = super::rows::consent_from(&row)?;
            out.push((sqlx::Row::try_get(&row, "contact_id")?, list_id, consent));
        }
        Ok(out)
    }

    async fn link_read(
        &self,
        contact_id: &str,
        list_id: &str,
    ) -> super::StoreResult<Option<(super::Contact, Option<crate::consent::Consent>)>> {
        let row = sqlx::query(&super::rows::CONTACT_WITH_CONSENT_SQL)
            .bind(contact_id)
            .bind(list_id)
            .fetch_optional(&self.reader)
            .await?;
        row.as_ref()
            .map(super::rows::contact_with_consent_from)
            .transpose()
    }

    async fn events_read(
        &self,
        contact_id: &str,
        list_id: Option<&str>,
    ) -> super::StoreResult<Vec<crate::ledger::LedgerEvent>> {
        let query = match list_id {
            None => sqlx::query(&super::rows::EVENTS_OF_CONTACT_SQL).bind(contact_id),
            Some(list) => sqlx::query(&super::rows::CONSENT_EVENTS_SQL)
                .bind(contact_id)
                .bind(list),
        };
        let rows = query.fetch_all(&self.reader).await?;
        rows.iter().map(super::rows::event_from).collect()
    }

    async fn suppressions_read(
        &self,
        hashes: &[String],
    ) -> super::StoreResult<Vec<super::Suppressed>> {
        let sql = super::rows::suppressions_of_sql(hashes.len());
        let mut query = sqlx::query(&sql);
        for h in hashes {
            query = query.bind(h);
        }
        let rows = query.fetch_all(&self.reader).await?;
        rows.iter().map(super::rows::suppressed_from).collect()
    }

    /// Run after an erasure commits. Nothing: old row versions stay in PostgreSQL's files
    /// until VACUUM reuses their space (and in WAL archives and backups) — see SECURITY.md.
    async fn clear_old_copies(&self) -> super::StoreResult<()> {
        Ok(())
    }

    async fn run_migrations(&self) -> super::StoreResult<()> {
        // sqlx takes an advisory lock while migrating, so concurrent starts are safe.
        sqlx::migrate!("./migrations/postgres")
            .run(&self.pool)
            .await?;
        Ok(())
    }
}

/// Hide a password in a connection URL before it reaches an error message.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

mod shared {
    use super::PostgresStore;

    crate::store::sql::shared_store_impl!(
        PostgresStore,
        sqlx::Postgres,
        sqlx::postgres::PgRow,
        begin = "BEGIN",
        lock = "SELECT pg_advisory_xact_lock(7262001)",
        for_update = "FOR UPDATE",
        skip_locked = "FOR UPDATE SKIP LOCKED"
    );
}

#[cfg(test)]
mod tests {
    #[test]
    fn password_is_redacted() {
        assert_eq!(
            super::redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(super::redact("postgres://u@h/db"), "postgres://u@h/db");
    }
}
