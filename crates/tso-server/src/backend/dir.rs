//! Data directories, for both backends: created so that the creation survives a crash, and
//! locked for the life of the process (an exclusive advisory lock on `LOCK`), so a directory
//! never has two writers.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

/// The lock file in every data directory.
pub(crate) const LOCK_FILE: &str = "LOCK";

/// Why a data directory could not be created, locked or synced.
#[derive(Debug)]
pub(crate) enum DirError {
    /// Another process holds the lock.
    Locked,
    Io {
        path: PathBuf,
        source: io::Error,
    },
}

/// Creates `dir` durably (see [`create_durably`]) and takes its lock, refusing at once if
/// another process holds it. The lock lasts as long as the returned file is open.
pub(crate) fn create_and_lock(dir: &Path) -> Result<File, DirError> {
    create_durably(dir)?;
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_at(&path))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => Err(DirError::Locked),
        Err(fs::TryLockError::Error(source)) => Err(DirError::Io { path, source }),
    }
}

/// Creates `dir` (and missing parents) so that the creation itself survives a crash: each
/// created directory's parent is fsync'd.
pub(crate) fn create_durably(dir: &Path) -> Result<(), DirError> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_durably(parent)?;
    }
    match fs::create_dir(dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(io_at(dir)(e)),
        _ => {}
    }
    match dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(parent) => sync(parent),
        None => Ok(()),
    }
}

/// Makes the directory's entries (a rename, a new file) durable.
pub(crate) fn sync(dir: &Path) -> Result<(), DirError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_at(dir))
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> DirError + '_ {
    move |source| DirError::Io {
        path: path.to_path_buf(),
        source,
    }
}
