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
//! The page reads of whole tables ([`Store::contacts_page`](super::Store::contacts_page) and
//! [`Store::consents_of_contacts`](super::Store::consents_of_contacts)) also go through the C
//! API, on a thread of their own ([`PageReader`]): `rules simulate` at 100k took 0.81-0.87 s
//! against 1.49-1.85 s through sqlx. Writes stay on sqlx's one writer connection; the WAL is
//! copied back into the file by a thread and connection of the store's own ([`Checkpointer`]).

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
    /// Page reads of whole tables through the C API on a thread of their own.
    pages: Arc<PageReader>,
    /// Keeps the [`Checkpointer`] thread running; it ends when the last clone is dropped.
    _checkpointer: Arc<Checkpointer>,
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
            // 16 MiB of page cache instead of SQLite's 2 MiB default: the indexes that take
            // random keys (contacts by address, outbox keys) keep their inner pages cached
            // through bulk inserts. Not more: while the file is under 1 GiB, every commit
            // that split a b-tree page scans the writer's whole page-cache hash table (SQLite's
            // `balance_nonroot` parks a page under the locking page's number, 262,145 at 4 KiB
            // pages, and the commit then truncates the cache back to the file's size), and
            // with 64 MiB that scan took 4-5 % of the daemon's CPU under confirm `POST`s.
            .pragma("cache_size", "-16384")
            .pragma("temp_store", "memory")
            // The WAL is copied back into the file by a thread of its own (`Checkpointer`),
            // not by whichever commit crosses SQLite's 1,000-page mark.
            .pragma("wal_autocheckpoint", "0");
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
        let checkpointer = Checkpointer::start(path).map_err(|e| open_err(sqlx::Error::Io(e)))?;
        // Unmapped (a pass over every contact would otherwise count the whole mapped table in
        // the daemon's resident memory) and 1 MiB of cache: a page read visits each page
        // once, and under writes the cache is dropped before the next read anyway.
        let pages = PageReader::start(DirectReads::new(path, 0, -1024))
            .map_err(|e| open_err(sqlx::Error::Io(e)))?;
        Ok(Self {
            pool,
            reader,
            direct: Arc::new(DirectReads::new(path, MMAP_BYTES, -8192)),
            pages: Arc::new(pages),
            _checkpointer: Arc::new(checkpointer),
        })
    }

    async fn link_read(
        &self,
        contact_id: &str,
        list_id: &str,
    ) -> super::StoreResult<Option<(super::Contact, Option<crate::consent::Consent>)>> {
        self.direct.contact_with_consent(contact_id, list_id)
    }

    /// A page of contacts through the [`PageReader`]: one hand-off per page instead of
    /// sqlx's per-statement hand-off and its copy of every column value (in `perf` of `rules
    /// simulate`, reading the pages took more CPU than deciding them).
    async fn contacts_page_read(
        &self,
        after: Option<&str>,
        limit: i64,
    ) -> super::StoreResult<Vec<super::Contact>> {
        let after = after.unwrap_or("").to_owned();
        self.pages
            .read(move |reads| reads.contacts_page(&after, limit))
            .await
    }

    /// One `IN` list of consents through the [`PageReader`], for the same reason (the rules
    /// passes, `rules simulate` and a pull's batch plans read them by the thousand).
    async fn consents_read(
        &self,
        contact_ids: &[String],
    ) -> super::StoreResult<Vec<(String, String, crate::consent::Consent)>> {
        // Owned: the read runs on the page reader's thread.
        let contact_ids = contact_ids.to_vec();
        self.pages
            .read(move |reads| reads.consents_of(&contact_ids))
            .await
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

    /// Run after an erasure commits: the WAL still holds the pages as they were before it,
    /// and a WAL file is reused from its start, not cleared, so copy everything into the main
    /// file (where `secure_delete` zeroed the old content) and truncate the WAL to nothing.
    /// SQLite answers "busy" rather than waiting while the [`Checkpointer`] runs a round (or
    /// readers hold old pages past the busy timeout), so this asks again until it is done.
    async fn clear_old_copies(&self) -> super::StoreResult<()> {
        const TRIES: u32 = 200;
        const PAUSE: Duration = Duration::from_millis(50);
        for _ in 0..TRIES {
            let (busy,): (i64,) = sqlx::query_as("PRAGMA wal_checkpoint(TRUNCATE)")
                .fetch_one(&self.pool)
                .await?;
            if busy == 0 {
                return Ok(());
            }
            tokio::time::sleep(PAUSE).await;
        }
        Err(super::StoreError::WalBusy {
            seconds: (PAUSE * TRIES).as_secs(),
        })
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
    /// `mmap_size` of its connections ([`MMAP_BYTES`] for the link reads, 0 for page reads).
    mmap_bytes: i64,
    /// `cache_size` of its connections (negative: KiB).
    cache_size: i64,
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
    fn new(path: &str, mmap_bytes: i64, cache_size: i64) -> Self {
        Self {
            path: PathBuf::from(path),
            mmap_bytes,
            cache_size,
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
        conn.pragma_update(None, "cache_size", self.cache_size)?;
        conn.pragma_update(None, "mmap_size", self.mmap_bytes)?;
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

    fn contacts_page(&self, after: &str, limit: i64) -> super::StoreResult<Vec<super::Contact>> {
        self.with(|conn| {
            let mut stmt = conn.prepare_cached(&super::rows::CONTACTS_PAGE_SQL)?;
            let mut rows = stmt.query(rusqlite::named_params! { "$1": after, "$2": limit })?;
            let mut out = Vec::new();
            while let Some(row) = rows.next()? {
                out.push(super::rows::contact_from(row)?);
            }
            Ok(out)
        })
    }

    fn consents_of(
        &self,
        contact_ids: &[String],
    ) -> super::StoreResult<Vec<(String, String, crate::consent::Consent)>> {
        use super::rows::Columns as _;
        self.with(|conn| {
            let sql = super::rows::consents_of_contacts_sql(contact_ids.len());
            // `$1` .. `$n` in order of appearance: positional binding is safe here.
            let mut stmt = conn.prepare_cached(&sql)?;
            let mut rows = stmt.query(rusqlite::params_from_iter(contact_ids))?;
            let mut out = Vec::with_capacity(contact_ids.len());
            while let Some(row) = rows.next()? {
                let (list_id, consent) = super::rows::consent_from(row)?;
                out.push((row.text("contact_id")?, list_id, consent));
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

/// Runs whole-page reads (contacts by the thousand, their consents) one after another on a
/// thread and connection of their own.
///
/// On sqlx's pool each such read was a hand-off to a connection thread per statement plus a
/// copy of every column value there; on tokio's blocking pool, spread over whichever of its
/// threads ran it, `sync` at 100k peaked at 253-276 MiB against 212-224 MiB (with 8 MiB or
/// 1 MiB of cache per connection alike); on a runtime thread a 1,000-row read would hold up
/// the requests behind it for a millisecond or more.
#[derive(Debug)]
struct PageReader {
    jobs: std::sync::mpsc::Sender<PageJob>,
}

type PageJob = Box<dyn FnOnce(&DirectReads) + Send>;

impl PageReader {
    fn start(reads: DirectReads) -> std::io::Result<Self> {
        let (jobs, queue) = std::sync::mpsc::channel::<PageJob>();
        // Ends when the store (the last sender) is dropped.
        std::thread::Builder::new()
            .name("sqlite-pages".into())
            .spawn(move || {
                for job in queue {
                    job(&reads);
                }
            })?;
        Ok(Self { jobs })
    }

    async fn read<T: Send + 'static>(
        &self,
        read: impl FnOnce(&DirectReads) -> super::StoreResult<T> + Send + 'static,
    ) -> super::StoreResult<T> {
        let (answer, answered) = tokio::sync::oneshot::channel();
        let job: PageJob = Box::new(move |reads| {
            // The asker may have gone (a cancelled request): nothing to tell then.
            let _ = answer.send(read(reads));
        });
        self.jobs
            .send(job)
            .map_err(|_| super::StoreError::PageReaderStopped)?;
        answered
            .await
            .map_err(|_| super::StoreError::PageReaderStopped)?
    }
}

/// Copies the WAL back into the database file on a thread and connection of its own.
///
/// SQLite's automatic checkpoint runs inside the commit that crosses its mark (1,000 pages),
/// on the store's one writer connection: that commit, and every commit queued behind it (a
/// confirmation's among them), waited for the copy and its fsync. A checkpoint and a writer
/// work side by side in WAL mode, so here the writer only appends. `PASSIVE`: it never waits
/// for readers or the writer; what it cannot copy yet it copies on a later round, and the
/// writer starts the WAL over once everything was copied, as before.
#[derive(Debug)]
struct Checkpointer {
    /// Dropped with the store: the thread sees the channel closed and ends.
    _stop: std::sync::mpsc::SyncSender<()>,
}

/// How often the checkpointer copies what the WAL gained (a round with nothing to copy costs
/// no I/O). Under a stream of commits that is ~20 small copies a second instead of one of
/// 1,000 pages, each with the file's fsync, none inside a commit.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(50);

impl Checkpointer {
    fn start(path: &str) -> std::io::Result<Self> {
        let (stop, stopped) = std::sync::mpsc::sync_channel::<()>(0);
        let path = PathBuf::from(path);
        std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || {
                let conn = match Connection::open_with_flags(
                    &path,
                    OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                ) {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot open the WAL checkpointer's connection; the WAL grows until the next start");
                        return;
                    }
                };
                let mut warned = false;
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(CHECKPOINT_EVERY)
                {
                    match checkpoint_round(&conn) {
                        Ok(()) => warned = false,
                        Err(e) if !warned => {
                            warned = true;
                            tracing::warn!(error = %e, "WAL checkpoint failed; trying again");
                        }
                        Err(_) => {}
                    }
                }
            })?;
        Ok(Self { _stop: stop })
    }
}

/// One round: copy back what the WAL holds and no reader still needs.
fn checkpoint_round(conn: &Connection) -> rusqlite::Result<()> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
}

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
