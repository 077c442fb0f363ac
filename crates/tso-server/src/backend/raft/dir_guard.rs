//! One live backend per data directory: a reopen in the same process waits until the previous
//! raft on the directory has stopped, and an exclusive lock on `LOCK` in the directory refuses
//! a second process at once, so a log never has two writers.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use super::RaftOpenError;

/// How long [`DirGuard::acquire`] waits for a previous backend on the same directory in this
/// process to finish shutting down (openraft stops its tasks within a heartbeat or two).
const REOPEN_WAIT: Duration = Duration::from_secs(10);

/// How often a waiting open looks again.
const REOPEN_POLL: Duration = Duration::from_millis(10);

/// Directories opened by a live backend of this process. A directory is released when the
/// raft that owned it has stopped, so a reopen never has two writers on one log.
static OPEN_DIRS: Mutex<Option<HashSet<PathBuf>>> = Mutex::new(None);

/// Holds a data directory for one backend; released on drop.
pub struct DirGuard {
    path: PathBuf,
    /// Holds the advisory lock for as long as the guard lives.
    _lock: Option<std::fs::File>,
}

impl DirGuard {
    pub async fn acquire(dir: &Path) -> Result<Self, RaftOpenError> {
        let path = std::path::absolute(dir).unwrap_or_else(|_| dir.to_owned());
        let deadline = tokio::time::Instant::now() + REOPEN_WAIT;
        loop {
            if Self::try_insert(&path) {
                let mut guard = Self { path, _lock: None };
                guard._lock = Some(lock_file(dir)?);
                return Ok(guard);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(RaftOpenError::DirInUse(path));
            }
            tokio::time::sleep(REOPEN_POLL).await;
        }
    }

    fn try_insert(path: &Path) -> bool {
        let mut dirs = OPEN_DIRS.lock().expect("open dirs lock");
        dirs.get_or_insert_with(HashSet::new)
            .insert(path.to_owned())
    }
}

/// Takes the exclusive lock on `dir/LOCK` (creating the directory), refusing at once if
/// another process holds it.
fn lock_file(dir: &Path) -> Result<std::fs::File, RaftOpenError> {
    let data_dir = |source| RaftOpenError::DataDir {
        path: dir.to_owned(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(data_dir)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("LOCK"))
        .map_err(data_dir)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(RaftOpenError::Locked(dir.to_owned())),
        Err(std::fs::TryLockError::Error(source)) => Err(data_dir(source)),
    }
}

impl Drop for DirGuard {
    fn drop(&mut self) {
        if let Some(dirs) = OPEN_DIRS.lock().expect("open dirs lock").as_mut() {
            dirs.remove(&self.path);
        }
    }
}
