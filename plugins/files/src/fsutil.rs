//! File helpers shared by the connectors: path resolution, atomic replacement, health probes.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use optinsync_plugin_api::ConnectorError;

use crate::SettingsError;

/// Resolve a path setting: absolute paths are kept, relative ones are taken from `base_dir`
/// (the configuration file's directory) so the daemon does not depend on its working directory.
pub(crate) fn resolve(
    base_dir: &Path,
    setting: &str,
    value: &str,
) -> Result<PathBuf, SettingsError> {
    if value.trim().is_empty() {
        return Err(SettingsError::invalid(
            setting.to_owned(),
            "must not be empty".to_owned(),
        ));
    }
    let path = Path::new(value);
    Ok(if path.is_absolute() {
        path.to_path_buf()
    } else {
        base_dir.join(path)
    })
}

/// The directory holding `path` (`.` for a bare file name).
pub(crate) fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The file name alone, used in locations shown to users (`contacts.csv:12`).
pub(crate) fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |name| name.to_string_lossy().into_owned(),
    )
}

/// A temp file name next to `path`: same directory, so the final rename cannot cross file
/// systems; unique per process and call, so concurrent writers never share one.
fn temp_path(path: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    parent_dir(path).join(format!(
        ".{}.{}.{n}.tmp",
        file_name(path),
        std::process::id()
    ))
}

/// Replace `path` with `contents` atomically: readers see the old or the new file, never a
/// half-written one, even if the process dies mid-write.
pub(crate) async fn write_atomic(path: &Path, contents: &[u8]) -> io::Result<()> {
    let path = path.to_path_buf();
    let contents = contents.to_vec();
    blocking(move || write_atomic_sync(&path, &contents)).await
}

fn write_atomic_sync(path: &Path, contents: &[u8]) -> io::Result<()> {
    std::fs::create_dir_all(parent_dir(path))?;
    let tmp = temp_path(path);
    let result = write_then_rename(&tmp, path, contents);
    if result.is_err() {
        // Best effort: a leftover temp file is harmless but untidy.
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn write_then_rename(tmp: &Path, path: &Path, contents: &[u8]) -> io::Result<()> {
    let mut file = std::fs::File::create(tmp)?;
    file.write_all(contents)?;
    // Flush to disk before the rename publishes the file, or a crash could publish garbage.
    file.sync_all()?;
    drop(file);
    std::fs::rename(tmp, path)
}

/// Append `line` to `path` (creating the file and its directory). One `write_all` on an
/// append-mode file keeps each line whole.
pub(crate) async fn append(path: &Path, line: &[u8]) -> io::Result<()> {
    let path = path.to_path_buf();
    let line = line.to_vec();
    blocking(move || {
        std::fs::create_dir_all(parent_dir(&path))?;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        file.write_all(&line)?;
        file.flush()
    })
    .await
}

/// Run blocking file work off the async runtime.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(io::Error::other)?
}

/// Check that `dir` exists (creating it if needed) and that a file can be written in it.
pub(crate) async fn probe_writable_dir(dir: &Path) -> Result<(), String> {
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|err| format!("cannot create {}: {err}", dir.display()))?;
    let probe = temp_path(&dir.join("health-probe"));
    tokio::fs::write(&probe, b"ok")
        .await
        .map_err(|err| format!("cannot write in {}: {err}", dir.display()))?;
    let _ = tokio::fs::remove_file(&probe).await;
    Ok(())
}

/// An I/O failure while doing `what`: retrying may help (disk full, permissions fixed...).
pub(crate) fn transient(what: &str, path: &Path, err: &io::Error) -> ConnectorError {
    ConnectorError::transient(format!("{what} {}: {err}", path.display()))
}
