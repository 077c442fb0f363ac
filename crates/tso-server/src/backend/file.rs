//! The single-node file backend (the default).
//!
//! The data directory holds `LOCK` (an exclusive advisory lock held for the life of the
//! process, so two servers never share a directory) and `high-water`, one small record: magic,
//! version, high-water, start counter, CRC32C. A write goes to a temporary file, is fsync'd,
//! renamed over the record and the directory is fsync'd, so the record on disk is always a
//! whole old one or a whole new one. A damaged record stops start-up with an error naming the
//! file; the backend never silently restarts from 0. `INITIALIZED` is written (durably) after
//! the first record, so a directory whose record went missing is refused too.
//!
//! The node is always leader. Its epoch is the start counter, raised and made durable on every
//! open, so epochs grow across restarts and the fence runs on every start.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tso_core::{Epoch, PHYSICAL_MAX_MS};

use crate::consensus::{BoxFuture, Consensus, ConsensusError, Leadership};

const LOCK_FILE: &str = "LOCK";
const RECORD_FILE: &str = "high-water";
/// Created (and made durable) once the first record is: a directory that has it but no record
/// lost its record, and is refused rather than treated as new.
const MARK_FILE: &str = "INITIALIZED";
const TEMP_FILE: &str = "high-water.tmp";
const MAGIC: [u8; 4] = *b"TSOH";
const VERSION: u16 = 1;
/// magic (4) + version (2) + reserved (2) + high-water (8) + start counter (8) + CRC32C (4).
const RECORD_LEN: usize = 28;
const CRC_OFFSET: usize = RECORD_LEN - 4;

/// Why the data directory could not be used.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error(
        "data directory {dir} is in use by another tso process: stop it, or use another --data-dir"
    )]
    Locked { dir: PathBuf },
    #[error(
        "{path}: {problem}; the file is damaged: restore it from a backup, or seed a new directory with `tso init` above the last issued timestamp"
    )]
    Damaged { path: PathBuf, problem: String },
    #[error("{path} already exists: refusing to overwrite an initialized data directory")]
    AlreadyInitialized { path: PathBuf },
    #[error("high-water {value_ms} ms is above the 46-bit maximum {PHYSICAL_MAX_MS}")]
    OutOfRange { value_ms: u64 },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// The durable content of the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Record {
    high_water_ms: u64,
    starts: u64,
}

impl Record {
    fn encode(&self) -> [u8; RECORD_LEN] {
        assert!(
            self.high_water_ms <= PHYSICAL_MAX_MS,
            "encoding an out-of-range high-water"
        );
        let mut buf = [0u8; RECORD_LEN];
        buf[0..4].copy_from_slice(&MAGIC);
        buf[4..6].copy_from_slice(&VERSION.to_le_bytes());
        buf[8..16].copy_from_slice(&self.high_water_ms.to_le_bytes());
        buf[16..24].copy_from_slice(&self.starts.to_le_bytes());
        let crc = crc32c::crc32c(&buf[..CRC_OFFSET]);
        buf[CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
        buf
    }

    fn decode(bytes: &[u8]) -> Result<Record, String> {
        if bytes.len() != RECORD_LEN {
            return Err(format!(
                "record is {} bytes, expected {RECORD_LEN}",
                bytes.len()
            ));
        }
        if bytes[0..4] != MAGIC {
            return Err(format!(
                "wrong magic {:02x?}, expected {:02x?} (not a tso high-water file)",
                &bytes[0..4],
                MAGIC
            ));
        }
        let version = u16::from_le_bytes([bytes[4], bytes[5]]);
        if version != VERSION {
            return Err(format!(
                "unsupported record version {version}, this build reads version {VERSION}"
            ));
        }
        let stored_crc = u32::from_le_bytes(bytes[CRC_OFFSET..].try_into().expect("4 bytes"));
        let crc = crc32c::crc32c(&bytes[..CRC_OFFSET]);
        if stored_crc != crc {
            return Err(format!(
                "checksum mismatch (stored {stored_crc:08x}, computed {crc:08x})"
            ));
        }
        let high_water_ms = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
        let starts = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
        if high_water_ms > PHYSICAL_MAX_MS {
            return Err(format!(
                "high-water {high_water_ms} ms is above the 46-bit maximum"
            ));
        }
        Ok(Record {
            high_water_ms,
            starts,
        })
    }
}

/// An open data directory: holds the lock and the current record.
struct Store {
    dir: PathBuf,
    record: Record,
    _lock: File,
}

impl Store {
    fn open(dir: &Path) -> Result<Store, FileError> {
        create_dir_durably(dir)?;
        let lock = lock_dir(dir)?;
        remove_stale_temp(dir)?;
        let record = read_record(dir)?;
        let marked = dir.join(MARK_FILE).exists();
        if record.is_none() && marked {
            return Err(FileError::Damaged {
                path: dir.join(RECORD_FILE),
                problem: format!(
                    "the record is missing from a directory that held one ({MARK_FILE} is \
                     there); it was deleted or lost"
                ),
            });
        }
        let mut store = Store {
            dir: dir.to_path_buf(),
            record: record.unwrap_or_default(),
            _lock: lock,
        };
        if record.is_some() && !marked {
            store.mark()?;
        }
        Ok(store)
    }

    /// Records durably that this directory holds a record.
    fn mark(&mut self) -> Result<(), FileError> {
        let path = self.dir.join(MARK_FILE);
        File::create(&path)
            .and_then(|f| f.sync_all())
            .map_err(io_at(&path))?;
        sync_dir(&self.dir)
    }

    /// Writes `record` durably and only then adopts it.
    fn write(&mut self, record: Record) -> Result<(), FileError> {
        let temp = self.dir.join(TEMP_FILE);
        let path = self.dir.join(RECORD_FILE);
        let mut file = File::create(&temp).map_err(io_at(&temp))?;
        file.write_all(&record.encode()).map_err(io_at(&temp))?;
        file.sync_all().map_err(io_at(&temp))?;
        drop(file);
        fs::rename(&temp, &path).map_err(io_at(&path))?;
        sync_dir(&self.dir)?;
        let first = !self.dir.join(MARK_FILE).exists();
        self.record = record;
        if first {
            self.mark()?;
        }
        Ok(())
    }
}

fn sync_dir(dir: &Path) -> Result<(), FileError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_at(dir))
}

/// Creates `dir` (and missing parents) so that the creation itself survives a crash: each
/// created directory's parent is fsync'd.
fn create_dir_durably(dir: &Path) -> Result<(), FileError> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_dir_durably(parent)?;
    }
    match fs::create_dir(dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(io_at(dir)(e)),
        _ => {}
    }
    match dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(parent) => sync_dir(parent),
        None => Ok(()),
    }
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> FileError + '_ {
    move |source| FileError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn lock_dir(dir: &Path) -> Result<File, FileError> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_at(&path))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => Err(FileError::Locked {
            dir: dir.to_path_buf(),
        }),
        Err(fs::TryLockError::Error(source)) => Err(FileError::Io { path, source }),
    }
}

/// A temporary file left by a crash before its rename was never adopted: drop it.
fn remove_stale_temp(dir: &Path) -> Result<(), FileError> {
    let temp = dir.join(TEMP_FILE);
    match fs::remove_file(&temp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(FileError::Io {
            path: temp,
            source: e,
        }),
        _ => Ok(()),
    }
}

fn read_record(dir: &Path) -> Result<Option<Record>, FileError> {
    let path = dir.join(RECORD_FILE);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(FileError::Io { path, source }),
    };
    Record::decode(&bytes)
        .map(Some)
        .map_err(|problem| FileError::Damaged { path, problem })
}

/// Seeds a fresh data directory so the first timestamps are above `seed_physical_ms`.
/// Refuses a directory that already holds a record.
pub fn init(dir: &Path, seed_physical_ms: u64) -> Result<(), FileError> {
    if seed_physical_ms > PHYSICAL_MAX_MS {
        return Err(FileError::OutOfRange {
            value_ms: seed_physical_ms,
        });
    }
    let mut store = Store::open(dir)?;
    let path = dir.join(RECORD_FILE);
    if path.exists() {
        return Err(FileError::AlreadyInitialized { path });
    }
    store.write(Record {
        high_water_ms: seed_physical_ms,
        starts: 0,
    })
}

/// The file backend. Cheap to share (`Arc`); the directory stays locked until it is dropped.
pub struct FileBackend {
    store: Arc<Mutex<Store>>,
    epoch: Epoch,
    leadership: watch::Sender<Leadership>,
}

impl FileBackend {
    /// Opens (creating if needed) and locks `dir`, and records this start.
    pub fn open(dir: &Path) -> Result<FileBackend, FileError> {
        let mut store = Store::open(dir)?;
        let record = Record {
            starts: store.record.starts + 1,
            ..store.record
        };
        store.write(record)?;
        let epoch = Epoch::new(record.starts as u128);
        let (leadership, _) = watch::channel(Leadership::Leader { epoch });
        Ok(FileBackend {
            store: Arc::new(Mutex::new(store)),
            epoch,
            leadership,
        })
    }

    pub fn dir(&self) -> PathBuf {
        self.store.lock().expect("store lock").dir.clone()
    }

    /// The epoch of this start.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }
}

fn classify(err: FileError) -> ConsensusError {
    match &err {
        FileError::Io { source, .. } if is_transient(source) => {
            ConsensusError::Transient(err.to_string())
        }
        // A failed fsync leaves the page cache in an unknown state: retrying could report a
        // value durable that is not. Everything else is Permanent too.
        _ => ConsensusError::Permanent(err.to_string()),
    }
}

/// Errors that may pass once load drops or space is freed: interrupted or timed-out calls, a
/// full disk or quota, and running out of file handles or memory (SEMANTICS §4).
fn is_transient(e: &io::Error) -> bool {
    let kind = matches!(
        e.kind(),
        io::ErrorKind::Interrupted
            | io::ErrorKind::TimedOut
            | io::ErrorKind::WouldBlock
            | io::ErrorKind::StorageFull
            | io::ErrorKind::QuotaExceeded
            | io::ErrorKind::OutOfMemory
    );
    let errno = matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::EDQUOT | libc::ENOMEM | libc::ENOSPC)
    );
    kind || errno
}

impl Consensus for FileBackend {
    fn leadership(&self) -> watch::Receiver<Leadership> {
        self.leadership.subscribe()
    }

    fn load_high_water(&self) -> BoxFuture<'_, Result<u64, ConsensusError>> {
        // The directory lock makes this process the only writer: memory equals disk.
        let value = self.store.lock().expect("store lock").record.high_water_ms;
        Box::pin(async move { Ok(value) })
    }

    fn persist_high_water(
        &self,
        at_least_ms: u64,
        epoch: Epoch,
    ) -> BoxFuture<'_, Result<u64, ConsensusError>> {
        let store = Arc::clone(&self.store);
        let current = self.epoch;
        Box::pin(async move {
            if at_least_ms > PHYSICAL_MAX_MS {
                return Err(ConsensusError::Permanent(
                    FileError::OutOfRange {
                        value_ms: at_least_ms,
                    }
                    .to_string(),
                ));
            }
            if epoch != current {
                return Err(ConsensusError::Fenced {
                    expected: epoch,
                    current,
                });
            }
            // A blocking task finishes its write even if this future is dropped: harmless,
            // the stored value only ratchets up, under the store's mutex.
            let write = tokio::task::spawn_blocking(move || {
                let mut store = store.lock().expect("store lock");
                let record = store.record;
                if at_least_ms <= record.high_water_ms {
                    return Ok(record.high_water_ms);
                }
                store
                    .write(Record {
                        high_water_ms: at_least_ms,
                        ..record
                    })
                    .map_err(classify)?;
                Ok(at_least_ms)
            });
            write
                .await
                .map_err(|e| ConsensusError::Permanent(format!("file write task failed: {e}")))?
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Out of file handles, memory or quota: may succeed once connections close or space is
    /// freed (SEMANTICS §4), so the node retries instead of stopping.
    #[test]
    fn resource_exhaustion_is_transient_and_damage_permanent() {
        let at = |errno| FileError::Io {
            path: PathBuf::from("/d/high-water.tmp"),
            source: io::Error::from_raw_os_error(errno),
        };
        for errno in [
            libc::EMFILE,
            libc::ENFILE,
            libc::EDQUOT,
            libc::ENOMEM,
            libc::ENOSPC,
            libc::EINTR,
            libc::EAGAIN,
        ] {
            assert!(
                matches!(classify(at(errno)), ConsensusError::Transient(_)),
                "errno {errno} must be transient"
            );
        }
        for errno in [libc::EIO, libc::EROFS, libc::EACCES] {
            assert!(
                matches!(classify(at(errno)), ConsensusError::Permanent(_)),
                "errno {errno} must be permanent"
            );
        }
    }

    #[test]
    fn record_round_trips_and_detects_damage() {
        let record = Record {
            high_water_ms: 1_700_000_000_000,
            starts: 7,
        };
        let bytes = record.encode();
        assert_eq!(Record::decode(&bytes), Ok(record));
        for bit in 0..RECORD_LEN * 8 {
            let mut damaged = bytes;
            damaged[bit / 8] ^= 1 << (bit % 8);
            assert!(
                Record::decode(&damaged).is_err(),
                "bit {bit} flip not detected"
            );
        }
        assert!(
            Record::decode(&bytes[..RECORD_LEN - 1])
                .unwrap_err()
                .contains("27 bytes")
        );
        let mut long = bytes.to_vec();
        long.push(0);
        assert!(Record::decode(&long).unwrap_err().contains("29 bytes"));
    }
}
