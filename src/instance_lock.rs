//! One `optinsync run` per SQLite file. SQLite has a single writer and the daemon's jobs and
//! outbox claims assume one instance per file (several instances need PostgreSQL), so `run`
//! holds an exclusive OS advisory lock on `<database>.lock` for its whole life. The lock dies
//! with the process (even `kill -9`), so a stale file never blocks a restart. Commands that
//! only read (`status`, `contact show`, `ledger verify`, `evidence export`) do not take it.

use std::fs::{File, OpenOptions};
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};

use crate::Failure;

/// Held for the life of the daemon; the OS releases the lock when the file is closed.
#[derive(Debug)]
pub struct InstanceLock {
    _file: File,
    pub path: PathBuf,
}

/// The lock file of a `sqlite://PATH` store URL; `None` for other stores.
pub fn lock_path(store_url: &str) -> Option<PathBuf> {
    let db = store_url.strip_prefix("sqlite://")?;
    let mut p = Path::new(db).as_os_str().to_owned();
    p.push(".lock");
    Some(PathBuf::from(p))
}

/// Take the lock for a SQLite store (nothing to do for PostgreSQL). A second `run` on the
/// same file gets a usage error (exit 2) naming the file, the holder's PID and the way out.
pub fn acquire(store_url: &str) -> Result<Option<InstanceLock>, Failure> {
    let Some(path) = lock_path(store_url) else {
        return Ok(None);
    };
    let db = store_url.trim_start_matches("sqlite://");
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| {
            Failure::Runtime(anyhow::anyhow!("cannot create {}: {e}", dir.display()))
        })?;
    }
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| {
            Failure::Runtime(anyhow::anyhow!(
                "cannot open the instance lock file {}: {e}",
                path.display()
            ))
        })?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            let who = if holder.chars().all(|c| c.is_ascii_digit()) && !holder.is_empty() {
                format!("`optinsync run` (PID {holder})")
            } else {
                "`optinsync run`".to_owned()
            };
            return Err(Failure::Config(anyhow::anyhow!(
                "another {who} is already using the SQLite database {db} (lock file {}); SQLite allows one running instance per database file: stop the other one, or use PostgreSQL (store.url = \"postgres://...\") to run several instances",
                path.display()
            )));
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(Failure::Runtime(anyhow::anyhow!(
                "cannot lock {}: {e}",
                path.display()
            )));
        }
    }
    // Name the holder for the next one who tries (informational; the lock is what counts).
    let pid = std::process::id().to_string();
    let written = file
        .set_len(0)
        .and_then(|()| file.seek(SeekFrom::Start(0)))
        .and_then(|_| file.write_all(pid.as_bytes()))
        .and_then(|()| file.flush());
    if let Err(e) = written {
        tracing::warn!(error = %e, path = %path.display(), "cannot write the PID into the instance lock file");
    }
    Ok(Some(InstanceLock { _file: file, path }))
}
