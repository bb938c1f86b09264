//! SQLite store: the embedded default. One file, WAL journal, one connection — a single
//! writer, so appends to the ledger are serialised without lock statements.
//!
//! Every query goes through sqlx but the three reads a link request makes
//! ([`Store::contact_with_consent`](super::Store::contact_with_consent) for every confirm,
//! unsubscribe or preferences page; [`Store::suppressions_of`](super::Store::suppressions_of)
//! and [`Store::events_of_contact`](super::Store::events_of_contact) for a confirmation),
//! which read through SQLite's C API (rusqlite) on the calling thread ([`DirectReads`]). sqlx
//! runs each SQLite connection on a worker thread of its own and hands every query over a
//! channel; on the 2-core bench machine (December 2026) that hop, two thread wake-ups per
//! query, held the link look-up to ~40,000/s using both cores, against ~110,000/s through the
//! C API on the calling thread (the bench's row 9 ceiling prints both), and the confirm page
//! target is 20,000 pages/s on the same two cores as the HTTP server and the load client.
//! Writes stay on sqlx's one writer connection.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension as _};

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

#[derive(Debug, Clone)]
pub struct SqliteStore {
    /// The one writer connection.
    pool: SqlitePool,
    /// Read-only connections: in WAL mode readers never wait for the writer (or its fsync),
    /// so link pages and lookups keep flowing while a batch commits.
    reader: SqlitePool,
    direct: Arc<DirectReads>,
}

impl SqliteStore {
    /// Open (creating if missing) the database file at `path`.
    pub async fn open(path: &str) -> super::StoreResult<Self> {
        let url = format!("sqlite://{path}");
        let open_err = |source| super::StoreError::Open {
            url: url.clone(),
            source,
        };
        if let Some(parent) = std::path::Path::new(path)
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
        {
            std::fs::create_dir_all(parent).map_err(|e| open_err(sqlx::Error::Io(e)))?;
        }
        let opts = SqliteConnectOptions::from_str(&url)
            .map_err(open_err)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10))
            // Erasure must leave no copy behind: without this, SQLite keeps deleted and
            // overwritten rows (an erased address, its evidence) in free pages and cell gaps
            // of the file until they happen to be reused.
            .pragma("secure_delete", "ON")
            // 64 MiB of page cache instead of SQLite's 2 MiB default: the ledger's and the
            // outbox's unique indexes take random keys, and a cache that holds their inner
            // pages keeps bulk inserts from re-reading them for every row.
            .pragma("cache_size", "-65536")
            .pragma("temp_store", "memory");
        // No ping before each use: a local file connection does not go stale, and the ping is
        // one more round trip to the connection's worker thread per query.
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .test_before_acquire(false)
            .connect_with(opts.clone())
            .await
            .map_err(open_err)?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .test_before_acquire(false)
            // Readers look up single rows: a small cache each keeps memory bounded.
            .connect_lazy_with(
                opts.read_only(true)
                    .create_if_missing(false)
                    .pragma("cache_size", "-8192"),
            );
        Ok(Self {
            pool,
            reader,
            direct: Arc::new(DirectReads::new(path)),
        })
    }

    async fn link_read(
        &self,
        contact_id: &str,
        list_id: &str,
    ) -> super::StoreResult<Option<(super::Contact, Option<crate::consent::Consent>)>> {
        self.direct.contact_with_consent(contact_id, list_id)
    }

    async fn events_read(
        &self,
        contact_id: &str,
        list_id: Option<&str>,
    ) -> super::StoreResult<Vec<crate::ledger::LedgerEvent>> {
        self.direct.events_of_contact(contact_id, list_id)
    }

    async fn suppressions_read(
        &self,
        hashes: &[String],
    ) -> super::StoreResult<Vec<super::Suppressed>> {
        self.direct.suppressions_of(hashes)
    }

    async fn run_migrations(&self) -> super::StoreResult<()> {
        sqlx::migrate!("./migrations/sqlite")
            .run(&self.pool)
            .await?;
        Ok(())
    }
}

/// The reads of a link request through SQLite's C API, on the calling thread (the module
/// says why).
///
/// They run synchronously inside an async request: indexed point reads of a few rows, a few
/// microseconds each, less than rendering the page they serve. In WAL mode a reader does not
/// wait for the writer, so the thread is not held while a batch commits. Connections are
/// read-only and kept for reuse; at most as many are open as threads read at once.
#[derive(Debug)]
struct DirectReads {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

/// Bytes of the database file a reader maps instead of copying pages into its cache: in
/// WAL mode a reader drops its whole page cache whenever the file changed since its last
/// read (under a stream of appends, before nearly every read), and mapped pages need no
/// `pread` to be read again.
const MMAP_BYTES: i64 = 1 << 30;

/// Idle connections kept; more are closed after use (a burst of blocking threads reading).
const DIRECT_READERS_KEPT: usize = 16;

impl DirectReads {
    fn new(path: &str) -> Self {
        Self {
            path: PathBuf::from(path),
            idle: Mutex::new(Vec::new()),
        }
    }

    fn connect(&self) -> rusqlite::Result<Connection> {
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        // Short: a WAL reader waits only while the WAL index itself is being rebuilt, and this
        // wait holds a runtime thread.
        conn.busy_timeout(Duration::from_millis(500))?;
        conn.pragma_update(None, "cache_size", -8192)?;
        conn.pragma_update(None, "mmap_size", MMAP_BYTES)?;
        Ok(conn)
    }

    /// Run `read` on an idle connection (or a new one) and put it back.
    fn with<T>(
        &self,
        read: impl FnOnce(&Connection) -> super::StoreResult<T>,
    ) -> super::StoreResult<T> {
        let idle = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        let conn = match idle {
            Some(c) => c,
            None => self.connect()?,
        };
        let result = read(&conn);
        if let Ok(mut idle) = self.idle.lock()
            && idle.len() < DIRECT_READERS_KEPT
        {
            idle.push(conn);
        }
        result
    }

    fn contact_with_consent(
        &self,
        contact_id: &str,
        list_id: &str,
    ) -> super::StoreResult<Option<(super::Contact, Option<crate::consent::Consent>)>> {
        self.with(|conn| {
            let mut stmt = conn.prepare_cached(&super::rows::CONTACT_WITH_CONSENT_SQL)?;
            stmt.query_row(
                rusqlite::named_params! { "$1": contact_id, "$2": list_id },
                |row| Ok(super::rows::contact_with_consent_from(row)),
            )
            .optional()?
            .transpose()
        })
    }

    /// A contact's events, or with `list_id` its consent events on that list.
    fn events_of_contact(
        &self,
        contact_id: &str,
        list_id: Option<&str>,
    ) -> super::StoreResult<Vec<crate::ledger::LedgerEvent>> {
        self.with(|conn| {
            let (mut stmt, mut rows);
            match list_id {
                None => {
                    stmt = conn.prepare_cached(&super::rows::EVENTS_OF_CONTACT_SQL)?;
                    rows = stmt.query(rusqlite::named_params! { "$1": contact_id })?;
                }
                Some(list) => {
                    stmt = conn.prepare_cached(&super::rows::CONSENT_EVENTS_SQL)?;
                    rows = stmt.query(rusqlite::named_params! { "$1": contact_id, "$2": list })?;
                }
            }
            let mut out = Vec::new();
            while let Some(row) = rows.next()? {
                out.push(super::rows::event_from(row)?);
            }
            Ok(out)
        })
    }

    fn suppressions_of(&self, hashes: &[String]) -> super::StoreResult<Vec<super::Suppressed>> {
        self.with(|conn| {
            // `$1` .. `$n` in order of appearance: positional binding is safe here.
            let mut stmt = conn.prepare_cached(&super::rows::suppressions_of_sql(hashes.len()))?;
            let mut rows = stmt.query(rusqlite::params_from_iter(hashes))?;
            let mut out = Vec::with_capacity(hashes.len());
            while let Some(row) = rows.next()? {
                out.push(super::rows::suppressed_from(row)?);
            }
            Ok(out)
        })
    }
}

/// Run after an erasure commits: the WAL still holds the pages as they were before it, and a
/// WAL file is reused from its start, not cleared, so copy everything into the main file
/// (where `secure_delete` zeroed the old content) and truncate the WAL to nothing.
const AFTER_ERASURE: &str = "PRAGMA wal_checkpoint(TRUNCATE)";

mod shared {
    use super::SqliteStore;

    crate::store::sql::shared_store_impl!(
        SqliteStore,
        sqlx::Sqlite,
        sqlx::sqlite::SqliteRow,
        begin = "BEGIN IMMEDIATE",
        lock = "",
        for_update = "",
        skip_locked = ""
    );
}
