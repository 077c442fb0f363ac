//! Disaster recovery: read the durable [`OracleState`] out of a stopped node's data directory
//! (or a copy of it), and seed a fresh directory with a state (`tso export`, `tso init --from`).
//!
//! Reading never changes the directory: no file is created, no torn tail cut, no mark written,
//! no temporary file removed. A directory a running server holds (its `LOCK` is locked) is
//! refused: its records move under the reader, and the server would not see the export as a
//! stop. The lock is taken, shared with nobody, for the time of the read when the `LOCK` file
//! exists, so a server cannot start on the directory half-way through.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use super::OracleState;
use super::dir::LOCK_FILE;
use super::file::{self, FileError};
use crate::stamping::LeaseSet;

/// Which backend a data directory belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirKind {
    File,
    Raft,
}

impl DirKind {
    pub fn name(self) -> &'static str {
        match self {
            DirKind::File => "file",
            DirKind::Raft => "raft",
        }
    }
}

/// What a stopped node's data directory holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirExport {
    pub kind: DirKind,
    /// The raft node id the directory belongs to, when it records one.
    pub node_id: Option<u64>,
    pub state: OracleState,
}

/// Why a directory could not be read or seeded.
#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    #[error(
        "data directory {dir} is in use by a running tso process (its LOCK is held): export \
         from a stopped node, or from a copy of its directory"
    )]
    Locked { dir: PathBuf },
    #[error(
        "{dir} is not a tso data directory (no file-backend record, no raft log, snapshot or \
         identity in it)"
    )]
    NotADataDir { dir: PathBuf },
    #[error(
        "{dir} is not empty ({entry} is there): `tso init` seeds only a fresh directory, so \
         that nothing it holds can be below the seed"
    )]
    NotEmpty { dir: PathBuf, entry: String },
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{0}")]
    Raft(String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// Reads the state of the stopped node's directory `dir` (file or raft backend, told apart by
/// the files in it). For raft: the snapshot (or the seed) and every entry of the log after it,
/// committed or not, so the result is at least everything that copy of the node could have
/// answered.
pub fn export_dir(dir: &Path) -> Result<DirExport, RecoverError> {
    if !dir.is_dir() {
        return Err(RecoverError::NotADataDir {
            dir: dir.to_owned(),
        });
    }
    let _lock = lock_if_present(dir)?;
    #[cfg(feature = "raft")]
    if super::raft::is_raft_dir(dir) {
        let (state, node_id) =
            super::raft::export_offline(dir).map_err(|e| RecoverError::Raft(e.to_string()))?;
        return Ok(DirExport {
            kind: DirKind::Raft,
            node_id,
            state,
        });
    }
    if file::is_file_dir(dir) {
        return Ok(DirExport {
            kind: DirKind::File,
            node_id: None,
            state: file::read_offline(dir)?,
        });
    }
    Err(RecoverError::NotADataDir {
        dir: dir.to_owned(),
    })
}

/// Takes the directory's lock for the time of a read, if it has a `LOCK` file (every server
/// makes one); a lock another process holds is [`RecoverError::Locked`]. Opened read-only: a
/// read-only copy can be exported.
fn lock_if_present(dir: &Path) -> Result<Option<File>, RecoverError> {
    let path = dir.join(LOCK_FILE);
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(RecoverError::Io { path, source }),
    };
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(fs::TryLockError::WouldBlock) => Err(RecoverError::Locked {
            dir: dir.to_owned(),
        }),
        Err(fs::TryLockError::Error(source)) => Err(RecoverError::Io { path, source }),
    }
}

/// Refuses a directory that exists and holds anything: a seed goes only into a fresh one.
pub fn check_fresh(dir: &Path) -> Result<(), RecoverError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(RecoverError::Io {
                path: dir.to_owned(),
                source,
            });
        }
    };
    if let Some(entry) = entries.into_iter().next() {
        let entry = entry.map_err(|source| RecoverError::Io {
            path: dir.to_owned(),
            source,
        })?;
        return Err(RecoverError::NotEmpty {
            dir: dir.to_owned(),
            entry: entry.file_name().to_string_lossy().into_owned(),
        });
    }
    Ok(())
}

/// Seeds the fresh file-backend directory `dir` with `state` (all of it: high-water, counters,
/// lease set).
pub fn seed_file_dir(dir: &Path, state: &OracleState) -> Result<(), RecoverError> {
    check_fresh(dir)?;
    Ok(file::init_state(dir, state)?)
}

/// Seeds the fresh raft directory `dir` of one initial member of a new cluster with `state`
/// (see `backend/raft/seed.rs`: every initial member must get the same seed).
#[cfg(feature = "raft")]
pub fn seed_raft_dir(dir: &Path, state: &OracleState) -> Result<(), RecoverError> {
    check_fresh(dir)?;
    super::raft::seed_dir(dir, state).map_err(|e| RecoverError::Raft(e.to_string()))
}

/// The CRC32C of `bytes` (the checksum of `tso export` files).
pub fn crc32c(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

/// What an encoded stamping-lease set holds, decoded for an operator and for the restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LeaseSummary {
    /// Leases in the set (live, superseded, or expired but not yet forgotten).
    pub count: usize,
    /// The next lease id the set would hand out.
    pub next_id: u64,
    /// The highest bound of any lease in the set, in ms (0 when none).
    pub bound_max_ms: u64,
}

/// Decodes the encoded lease set `record` (empty: the empty set).
pub fn lease_summary(record: &[u8]) -> Result<LeaseSummary, String> {
    let set = LeaseSet::decode(record)?;
    Ok(LeaseSummary {
        count: set.leases.len(),
        next_id: set.next_id,
        bound_max_ms: set.leases.values().map(|l| l.bound_ms).max().unwrap_or(0),
    })
}

/// The lease set `record` with its next lease id raised to at least `next_id_at_least`, encoded
/// again (lease ids are never reused, across a restore too).
pub fn raise_lease_next_id(record: &[u8], next_id_at_least: u64) -> Result<Vec<u8>, String> {
    let mut set = LeaseSet::decode(record)?;
    set.next_id = set.next_id.max(next_id_at_least);
    Ok(set.encode())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(high_water_ms: u64, keys: &[(&str, u64)]) -> OracleState {
        OracleState {
            high_water_ms,
            sequences: keys.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            ..OracleState::default()
        }
    }

    #[test]
    fn a_seeded_file_dir_exports_what_was_seeded_and_refuses_a_second_seed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d");
        let seed = state(1_700_000_000_000, &[("a", 5), ("invoice", 42)]);
        seed_file_dir(&path, &seed).unwrap();
        let got = export_dir(&path).unwrap();
        assert_eq!(got.kind, DirKind::File);
        assert_eq!(got.state, seed);
        assert!(matches!(
            seed_file_dir(&path, &seed),
            Err(RecoverError::NotEmpty { .. })
        ));
        let opened = file::FileBackend::open(&path).unwrap();
        assert!(
            matches!(export_dir(&path), Err(RecoverError::Locked { .. })),
            "a directory a backend holds is refused"
        );
        drop(opened);
        assert_eq!(export_dir(&path).unwrap().state, seed);
    }

    #[test]
    fn an_interrupted_seed_is_refused_by_export_and_open() {
        let dir = tempfile::tempdir().unwrap();
        seed_file_dir(dir.path(), &state(5, &[])).unwrap();
        File::create(dir.path().join("INIT-PENDING")).unwrap();
        assert!(matches!(export_dir(dir.path()), Err(RecoverError::File(_))));
        assert!(file::FileBackend::open(dir.path()).is_err());
    }

    #[test]
    fn an_empty_or_foreign_directory_is_not_a_data_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            export_dir(dir.path()),
            Err(RecoverError::NotADataDir { .. })
        ));
        fs::write(dir.path().join("notes.txt"), b"x").unwrap();
        assert!(matches!(
            export_dir(dir.path()),
            Err(RecoverError::NotADataDir { .. })
        ));
        assert!(matches!(
            check_fresh(dir.path()),
            Err(RecoverError::NotEmpty { .. })
        ));
    }

    #[cfg(feature = "raft")]
    #[test]
    fn a_seeded_raft_dir_exports_its_seed() {
        let dir = tempfile::tempdir().unwrap();
        let seed = state(1_700_000_000_000, &[("k", 9)]);
        seed_raft_dir(dir.path(), &seed).unwrap();
        let got = export_dir(dir.path()).unwrap();
        assert_eq!((got.kind, got.node_id), (DirKind::Raft, None));
        assert_eq!(got.state, seed);
    }

    #[test]
    fn the_lease_summary_and_a_raised_next_id() {
        assert_eq!(lease_summary(&[]).unwrap().next_id, 1);
        let mut set = LeaseSet {
            next_id: 4,
            ..LeaseSet::default()
        };
        for (id, bound_ms) in [(1, 10), (3, 30)] {
            set.leases.insert(
                id,
                crate::stamping::LeaseRecord {
                    holder: b"h".to_vec(),
                    holder_epoch: 1,
                    ttl_ms: 5_000,
                    bound_ms,
                    expires_at_ms: bound_ms,
                    superseded: false,
                },
            );
        }
        let record = set.encode();
        assert_eq!(
            lease_summary(&record).unwrap(),
            LeaseSummary {
                count: 2,
                next_id: 4,
                bound_max_ms: 30
            }
        );
        let raised = raise_lease_next_id(&record, 1_004).unwrap();
        assert_eq!(lease_summary(&raised).unwrap().next_id, 1_004);
        assert_eq!(raise_lease_next_id(&record, 2).unwrap(), record);
        assert!(lease_summary(b"\x09junk").is_err());
    }
}
