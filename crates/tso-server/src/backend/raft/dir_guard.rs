//! One live backend per data directory: a reopen in the same process waits until the previous
//! raft on the directory has stopped, and an exclusive lock on `LOCK` in the directory refuses
//! a second process at once, so a log never has two writers.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use super::RaftOpenError;
use crate::backend::dir::DirError;

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
    crate::backend::dir::create_and_lock(dir).map_err(|e| match e {
        DirError::Locked => RaftOpenError::Locked(dir.to_owned()),
        DirError::Io { path, source } => RaftOpenError::DataDir { path, source },
    })
}

impl Drop for DirGuard {
    fn drop(&mut self) {
        if let Some(dirs) = OPEN_DIRS.lock().expect("open dirs lock").as_mut() {
            dirs.remove(&self.path);
        }
    }
}
