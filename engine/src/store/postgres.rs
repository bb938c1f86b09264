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

/// Run after an erasure commits. Nothing: old row versions stay in PostgreSQL's files until
/// VACUUM reuses their space (and in WAL archives and backups) — see SECURITY.md.
const AFTER_ERASURE: &str = "SELECT 1";

mod shared {
    use super::PostgresStore;

    crate::store::sql::shared_store_impl!(
        PostgresStore,
        sqlx::Postgres,
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
